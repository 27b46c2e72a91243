"""Our Titans LMM mixer vs titans-pytorch's ``NeuralMemory`` at the same configuration.

dim 256, 4 heads (head dim 64), memory MLP depth 2 expansion 4 (residual + LayerNorm in both),
chunk 16, batch 1; forward + backward of ``output.sum()``; the two run alternately in one
process and the median of ``--repeats`` runs is reported. On CPU the process CPU time is reported
beside the wall-clock time: on a shared machine it does not count the time the process waits for a
core. titans-pytorch (PyPI) is installed beside memlm for this script only
(``pip install -c constraints-cpu.txt -e '.[bench]'``). On CPU memlm runs its compiled chunk loop
(``MEMLM_CPU_KERNEL=0`` measures the PyTorch loop instead).

    python benchmarks/titans_vs_titans_pytorch.py [--lengths 1024 2048 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from memlm.kernels.deep_memory import MemorySpec, select_path
from memlm.layers.registry import build_mixer
from memlm.models import MemLMConfig

DIM, HEADS, DEPTH, EXPANSION, CHUNK = 256, 4, 2, 4, 16


def ours(device: torch.device) -> torch.nn.Module:
    config = MemLMConfig(vocab_size=8, hidden_size=DIM, num_hidden_layers=1, num_heads=HEADS)
    spec = {"name": "titans_memory", "depth": DEPTH, "expansion": EXPANSION, "chunk_size": CHUNK}
    mixer = build_mixer(spec, DIM, config).to(device)
    for w in mixer.memory_weights:
        torch.nn.init.normal_(w, std=w.shape[1] ** -0.5)
    return mixer


def theirs(device: torch.device) -> torch.nn.Module:
    from titans_pytorch import NeuralMemory

    return NeuralMemory(
        dim=DIM,
        chunk_size=CHUNK,
        heads=HEADS,
        dim_head=DIM // HEADS,
        default_model_kwargs={"depth": DEPTH, "expansion_factor": float(EXPANSION)},
    ).to(device)


def step(module: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and process CPU seconds for one forward + backward."""
    if x.is_cuda:
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    from importlib.metadata import version

    import titans_pytorch  # noqa: F401  (fail early with a clear ImportError)

    cpu = platform.processor() or platform.machine()
    probe = torch.zeros(1, device=device)
    path = select_path("auto", probe, MemorySpec(chunk_size=CHUNK))  # the path the mixer's memory takes
    loop = {"cpu": "compiled CPU kernel", "hand_written": "PyTorch loop", "triton": "Triton"}[path]
    print(
        f"# Titans LMM mixer vs titans-pytorch NeuralMemory — {datetime.date.today()}, {args.device} ({cpu}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}, titans-pytorch {version('titans-pytorch')}"
    )
    print(
        f"dim {DIM}, heads {HEADS}, depth {DEPTH}, expansion {EXPANSION}, chunk {CHUNK}, B=1, fwd+bwd, "
        f"median of {args.repeats}; memlm's chunk loop: {loop}\n"
    )
    clocks = ["wall"] + (["CPU"] if device.type == "cpu" else [])
    print("| T | " + " | ".join(f"memlm {c} ms | titans-pytorch {c} ms | speed-up ({c})" for c in clocks) + " |")
    print("|---:|" + "---:|---:|---:|" * len(clocks))
    torch.manual_seed(0)
    a, b = ours(device), theirs(device)
    for length in args.lengths:
        x = torch.randn(1, length, DIM, device=device)
        step(a, x), step(b, x)  # warm-up
        times_a, times_b = [], []
        for _ in range(args.repeats):
            times_a.append(step(a, x))
            times_b.append(step(b, x))
        cells = []
        for clock in range(len(clocks)):
            ta, tb = (statistics.median(t[clock] for t in times) * 1e3 for times in (times_a, times_b))
            cells.append(f"{ta:.1f} | {tb:.1f} | {tb / ta:.2f}×")
        print(f"| {length} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
