"""Kernel benchmarks: one markdown table per run, every row measured in that run.

CPU rows: each op's PyTorch chunked path against its naive per-token reference, forward +
backward, median wall time of ``--reps`` runs after one warm-up, and the speed-up.
GPU rows (only with CUDA): the deep-memory op (Triton), flash-linear-attention's
``chunk_gated_delta_rule`` (GDN), torch SDPA flash attention and, when importable,
titans-pytorch's ``NeuralMemory``, in bfloat16, timed with ``triton.testing.do_bench``
(median); forward is timed with inputs that require grad (a training forward).

Usage: ``python benchmarks/kernel_bench.py`` (``--quick`` for a seconds-long smoke run,
``--cpu-only`` to skip the GPU rows).

FLOP counts (matmul FLOPs only; backward counted as 2× forward, attention 2.5×):
  deep memory, chunk b, layers d_{l−1}×d_l, per token and head, forward:
      Σ_l [2·d_{l−1}·d_l·(5 + [l > 1]) + 2·b·(d_{l−1} + d_l)]
      (keys through W_0, error back-propagation for l > 1, queries through W_0 and S_0,
      the chunk-end W and S updates; the b×b products Q Xᵀ and (G ⊙ ·) Δ)
  GDN, chunk C = 64, per token and head, forward: 6·C·K + 4·C·V + 6·K·V + C²
  causal attention, forward: 2·B·H·T²·D
Bytes (a lower bound, each token tensor moved once per pass, 2 bytes in bf16):
  forward: B·T·H·(4·D + n_gates)·2; forward + backward adds B·T·H·(7·D + 2·n_gates)·2
  (q, k, v, o [+ dO, dq, dk, dv] and per-token gates: deep memory 3, GDN 2, attention 0).
The HBM fraction divides bytes / time by the device's peak bandwidth (``PEAK_HBM_TBPS``);
peak MiB is ``torch.cuda.max_memory_allocated`` over one forward + backward, inputs included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memlm.kernels import deep_memory, linear_memory, linear_scan  # noqa: E402

# peak HBM bandwidth in TB/s by device-name substring, first match wins (vendor datasheets)
PEAK_HBM_TBPS = [
    ("H200", 4.8),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935),
    ("A100", 1.555),
    ("L40S", 0.864),
    ("A10G", 0.6),
    ("RTX 4090", 1.008),
    ("V100", 0.9),
    ("L4", 0.3),
]


@dataclass
class Row:
    op: str
    device: str
    shape: str
    impl: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    ratio: str = "–"
    tflops: float | None = None
    hbm: float | None = None
    peak_mib: float | None = None
    note: str = ""


Case = tuple[list[torch.Tensor], Callable[[str], torch.Tensor]]


def deep_memory_case(B, T, H, D, depth, expansion, device, dtype, chunk_size=16) -> Case:
    """Titans memory inputs: unit-norm keys, small gates; L = 1 is linear memory (no residual/norm)."""
    q, v = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(2))
    k = F.normalize(torch.randn(B, T, H, D, device=device, dtype=dtype), dim=-1)
    lr = 0.1 * torch.rand(B, T, H, device=device, dtype=dtype)
    momentum = 0.9 * torch.rand(B, T, H, device=device, dtype=dtype)
    forget = 0.05 * torch.rand(B, T, H, device=device, dtype=dtype)
    dims = [D] + [expansion * D] * (depth - 1) + [D]
    weights = [torch.randn(H, a, b, device=device, dtype=dtype) / a**0.5 for a, b in zip(dims, dims[1:])]
    inputs = [q, k, v, lr, momentum, forget, *weights]
    deep = depth > 1

    def call(backend: str) -> torch.Tensor:
        return deep_memory(q, k, v, lr, momentum, forget, weights, chunk_size=chunk_size, residual=deep,
                           norm=deep, backend=backend)[0]  # fmt: skip

    return inputs, call


def gated_delta_case(B, T, H, D, device, dtype) -> Case:
    q, k = (F.normalize(torch.randn(B, T, H, D, device=device, dtype=dtype), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, D, device=device, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device=device) + 4)  # float32 log-decay, as fla's layers pass it
    beta = torch.rand(B, T, H, device=device, dtype=dtype)
    return [q, k, v, g, beta], lambda backend: linear_memory(q, k, v, g=g, beta=beta, backend=backend)[0]


def gla_case(B, T, H, D, device, dtype) -> Case:
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(3))
    gk = F.logsigmoid(torch.randn(B, T, H, D, device=device, dtype=dtype) + 4)
    return [q, k, v, gk], lambda backend: linear_memory(q, k, v, gk=gk, backend=backend)[0]


def scan_case(B, T, H, D, device, dtype) -> Case:
    a = torch.rand(B, T, H, D, device=device, dtype=dtype)
    x = torch.randn(B, T, H, D, device=device, dtype=dtype)
    return [a, x], lambda backend: linear_scan(a, x, backend=backend)


def fwd_bwd(inputs: list[torch.Tensor], forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One forward and a backward of a fixed random cotangent into every input."""
    for t in inputs:
        t.requires_grad_()
    cotangent = {}

    def step() -> None:
        o = forward()
        if "do" not in cotangent:
            cotangent["do"] = torch.randn_like(o)
        torch.autograd.grad(o, inputs, cotangent["do"])

    return step


def cpu_median_s(fn: Callable[[], None], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_rows(shape: tuple[int, int, int, int], reps: int) -> list[Row]:
    B, T, H, D = shape
    cases = {
        "deep memory L=1": lambda: deep_memory_case(B, T, H, D, 1, 1, "cpu", torch.float32),
        "deep memory L=2 (exp. 4)": lambda: deep_memory_case(B, T, H, D, 2, 4, "cpu", torch.float32),
        "linear_memory gated delta": lambda: gated_delta_case(B, T, H, D, "cpu", torch.float32),
        "linear_memory GLA": lambda: gla_case(B, T, H, D, "cpu", torch.float32),
        "linear_scan": lambda: scan_case(B, T, H, D, "cpu", torch.float32),
    }
    rows = []
    for op, make in cases.items():
        inputs, call = make()
        naive = cpu_median_s(fwd_bwd(inputs, partial(call, "naive")), reps)
        chunked = cpu_median_s(fwd_bwd(inputs, partial(call, "torch")), reps)
        where = f"B={B} T={T} H={H} D={D}"
        rows.append(Row(op, "cpu fp32", where, "naive", fwd_bwd_ms=1e3 * naive))
        rows.append(Row(op, "cpu fp32", where, "torch chunked", fwd_bwd_ms=1e3 * chunked,
                        ratio=f"{naive / chunked:.1f}× faster than naive"))  # fmt: skip
    return rows


def deep_memory_flops(T: int, D: int, depth: int, expansion: int, chunk: int) -> int:
    """Forward matmul FLOPs per (batch, head) of the chunked deep-memory op (module docstring)."""
    dims = [D] + [expansion * D] * (depth - 1) + [D]
    per_token = sum(
        2 * a * b * (5 + (l > 0)) + 2 * chunk * (a + b) for l, (a, b) in enumerate(zip(dims, dims[1:]))
    )
    return T * per_token


def gdn_flops(T: int, D: int, C: int = 64) -> int:
    return T * (6 * C * D + 4 * C * D + 6 * D * D + C * C)


def peak_bandwidth_tbps(name: str) -> float | None:
    return next((bw for key, bw in PEAK_HBM_TBPS if key in name), None)


def gpu_measure(inputs: list[torch.Tensor], forward: Callable[[], torch.Tensor]) -> tuple[float | None, ...]:
    """(forward ms, forward+backward ms, peak MiB of one forward+backward); off CUDA (the dry run) one timed
    call of each and no memory figure."""
    step = fwd_bwd(inputs, forward)
    if not inputs[0].is_cuda:
        times = []
        for fn in (forward, step):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return times[0], times[1], None
    fwd_ms = triton.testing.do_bench(forward, return_mode="median")
    both_ms = triton.testing.do_bench(step, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return fwd_ms, both_ms, torch.cuda.max_memory_allocated() / 2**20


def pass_bytes(tokens: int, D: int, n_gates: int) -> int:
    """Forward + backward bytes in bf16 (module docstring): ``tokens·(11·D + 3·n_gates)·2``."""
    return 2 * tokens * (11 * D + 3 * n_gates)


def gdn_forward(q, k, v, g, beta) -> torch.Tensor:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule(q, k, v, g, beta)[0]


def sdpa_forward(q, k, v) -> torch.Tensor:
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def gpu_cases(B: int, T: int, H: int, D: int, chunk: int, dev: str = "cuda", dt: torch.dtype = torch.bfloat16,
              backend: str = "auto") -> dict[str, tuple]:
    """op → (inputs, forward, fwd+bwd FLOPs, fwd+bwd bytes, implementation); the dry run passes the CPU,
    float32 and ``backend="triton"`` (the interpreter)."""
    tokens = B * T * H
    cases = {}
    for label, depth, expansion in (("deep memory L=1", 1, 1), ("deep memory L=2 (exp. 4)", 2, 4)):
        inputs, call = deep_memory_case(B, T, H, D, depth, expansion, dev, dt, chunk)
        flops = 3 * B * H * deep_memory_flops(T, D, depth, expansion, chunk)
        forward = partial(call, backend)
        cases[label] = (inputs, forward, flops, pass_bytes(tokens, D, 3), f"memlm triton b={chunk}")
    gdn, _ = gated_delta_case(B, T, H, D, dev, dt)
    flops = 3 * B * H * gdn_flops(T, D)
    cases["GDN chunk_gated_delta_rule"] = (
        gdn,
        partial(gdn_forward, *gdn),
        flops,
        pass_bytes(tokens, D, 2),
        "fla",
    )
    attn = [torch.randn(B, H, T, D, device=dev, dtype=dt) for _ in range(3)]
    flops = 3.5 * 2 * B * H * T * T * D
    cases["attention (SDPA flash)"] = (
        attn,
        partial(sdpa_forward, *attn),
        flops,
        pass_bytes(tokens, D, 0),
        "torch",
    )
    return cases


def gpu_rows(B: int, H: int, D: int, lengths: list[int], chunk: int = 16, dry_run: bool = False) -> list[Row]:
    """The GPU table; ``dry_run``: the same code on the CPU in float32, Triton in the interpreter."""
    dev, dt, backend = ("cpu", torch.float32, "triton") if dry_run else ("cuda", torch.bfloat16, "auto")
    name = "CPU (dry run)" if dry_run else torch.cuda.get_device_name()
    peak = peak_bandwidth_tbps(name)
    rows: list[Row] = []
    for T in lengths:
        where = f"B={B} T={T} H={H} D={D} {'fp32' if dry_run else 'bf16'}"
        measured: dict[str, Row] = {}
        for op, (inputs, forward, flops, nbytes, impl) in gpu_cases(B, T, H, D, chunk, dev, dt, backend).items():
            try:
                fwd_ms, both_ms, mib = gpu_measure(inputs, forward)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(Row(op, name, where, impl, note="out of memory"))
                continue
            seconds = both_ms * 1e-3
            hbm = None if peak is None else nbytes / seconds / (peak * 1e12)
            measured[op] = Row(op, name, where, impl, fwd_ms, both_ms, tflops=flops / seconds / 1e12, hbm=hbm,
                               peak_mib=mib)  # fmt: skip
        gdn = measured.get("GDN chunk_gated_delta_rule")
        for row in measured.values():
            if gdn is not None:
                row.ratio = f"{row.fwd_ms / gdn.fwd_ms:.2f}× / {row.fwd_bwd_ms / gdn.fwd_bwd_ms:.2f}× GDN"
            rows.append(row)
        rows.append(titans_pytorch_row(B, T, H, D, name, where, dev, dt))
    return rows


def titans_pytorch_row(B: int, T: int, H: int, D: int, device: str, where: str, dev: str = "cuda",
                       dt: torch.dtype = torch.bfloat16) -> Row:
    """titans-pytorch's NeuralMemory (projections included, so only its times are comparable)."""
    op = "titans-pytorch NeuralMemory"
    try:
        from titans_pytorch import NeuralMemory
    except ImportError:
        return Row(op, device, where, "titans-pytorch", note="skipped: titans_pytorch not importable")
    mem = NeuralMemory(dim=H * D, chunk_size=16, heads=H, dim_head=D).to(dev, dt)
    x = torch.randn(B, T, H * D, device=dev, dtype=dt)

    def forward() -> torch.Tensor:
        out = mem(x)
        return out[0] if isinstance(out, tuple) else out

    try:
        fwd_ms, both_ms, mib = gpu_measure([x], forward)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return Row(op, device, where, "titans-pytorch", note="out of memory")
    return Row(
        op,
        device,
        where,
        "titans-pytorch (its defaults, projections included)",
        fwd_ms,
        both_ms,
        peak_mib=mib,
    )


def fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def render(rows: list[Row]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"## memlm kernel benchmark — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}; "
        f"CPU {cpu} ({torch.get_num_threads()} threads)"
        + (f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "; no GPU"),
        "",
        "| op | device | shape | impl | fwd ms | fwd+bwd ms | ratio | TFLOP/s | HBM BW | peak MiB | note |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        hbm = "–" if r.hbm is None else f"{100 * r.hbm:.0f}%"
        times = f"{fmt(r.fwd_ms, '.2f')} | {fmt(r.fwd_bwd_ms, '.2f')}"
        lines.append(
            f"| {r.op} | {r.device} | {r.shape} | {r.impl} | {times} | {r.ratio} | {fmt(r.tflops, '.1f')} "
            f"| {hbm} | {fmt(r.peak_mib, '.0f')} | {r.note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU rows")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU rows")
    parser.add_argument("--dry-run", action="store_true",
                        help="the GPU rows' code at B=1 T=32 H=2 D=16 on the CPU (Triton interpreter), no CPU rows")
    parser.add_argument("--reps", type=int, default=3, help="timed CPU repetitions, >= 3 (median)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    if args.reps < 3:
        parser.error(f"--reps must be >= 3 (a median of at least three runs), got {args.reps}")
    torch.manual_seed(0)
    rows = []
    if args.dry_run:
        from memlm.testing.triton_interpreter import interpret_fla

        interpret_fla()
        rows += gpu_rows(1, 2, 16, [32], dry_run=True)
    elif not args.gpu_only:
        rows += cpu_rows((1, 64, 2, 8) if args.quick else (1, 2048, 4, 32), args.reps)
    if torch.cuda.is_available() and not (args.cpu_only or args.dry_run):
        rows += gpu_rows(2, 4, 64, [256]) if args.quick else gpu_rows(8, 16, 64, [2048, 4096, 8192])
    table = render(rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"table": table, "rows": [vars(r) for r in rows]}, indent=2))
    return table


if __name__ == "__main__":
    main()
