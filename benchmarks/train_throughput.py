"""Training throughput of whole models: tokens/s and peak memory of AdamW steps (forward, backward, update)
at one size, memlm's presets and flash-linear-attention's ``GatedDeltaNetForCausalLM`` (our GDN preset's
shape) in the same run, and model FLOPs utilisation on known GPUs (``6N + 6·L·d·T`` per token,
``memlm.train.metrics``).

Each model: built seeded on the device, ``--warmup`` steps, then ``--steps`` timed steps (synchronised on
CUDA); tokens/s = batch · T / median step; peak MiB = ``torch.cuda.max_memory_allocated`` over the timed
steps (CPU: –). bf16 autocast on CUDA, float32 on CPU. A model that fails (out of memory, a missing package)
gets its error in the note and the others still run.

Usage: ``python benchmarks/train_throughput.py`` (340M, T=4096, batch 1 on CUDA; ``--dry-run``: the tiny
presets at T=64 on CPU, fla's model under ``TRITON_INTERPRET=1`` when set; ``--json PATH`` writes the rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memlm import load_preset  # noqa: E402
from memlm.models import MemLMForCausalLM  # noqa: E402
from memlm.train.metrics import flops_per_token, peak_flops  # noqa: E402

MODELS = ("attention", "gated_deltanet", "fla_gated_deltanet", "titans_memory", "titans_mac", "titans_mag",
          "titans_mal", "moneta")
VOCAB = 32000


def build(name: str, size: str, seq_len: int, cuda: bool) -> torch.nn.Module:
    """memlm's preset, or fla's model of our GDN preset's shape (its fused norm and SwiGLU kernels on CUDA;
    on CPU its plain modules, its chunk kernels in the Triton interpreter)."""
    torch.manual_seed(0)
    if name != "fla_gated_deltanet":
        return MemLMForCausalLM(load_preset(f"{name}_{size}", vocab_size=VOCAB, max_position_embeddings=seq_len))
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    if not cuda:
        from memlm.testing.triton_interpreter import interpret_fla

        interpret_fla()

    ours = load_preset(f"gated_deltanet_{size}", vocab_size=VOCAB)
    mixer = ours.mixer
    config = GatedDeltaNetConfig(
        vocab_size=VOCAB, hidden_size=ours.hidden_size, num_hidden_layers=ours.num_hidden_layers,
        num_heads=mixer.get("num_heads", ours.num_heads), head_dim=mixer["head_dim"],
        expand_v=mixer.get("expand_v", 2.0), intermediate_size=ours.intermediate_size,
        tie_word_embeddings=ours.tie_word_embeddings, fuse_cross_entropy=False, fuse_norm=cuda, fuse_swiglu=cuda)
    return GatedDeltaNetForCausalLM(config)


def measure(name: str, size: str, seq_len: int, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    model = build(name, size, seq_len, cuda).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for i in range(warmup + steps):
        if i == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    tok_s = batch * seq_len / statistics.median(times)
    config = model.config
    peak = peak_flops(device)
    mfu = None if peak is None else tok_s * flops_per_token(params, config.num_hidden_layers, config.hidden_size,
                                                           seq_len) / peak
    return {"model": name, "params_m": params / 1e6, "tokens_per_s": tok_s,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None, "mfu": mfu, "note": ""}


def render(rows: list[dict], header: str) -> str:
    lines = [header, "", "| model | params | tokens/s | × Transformer++ | peak MiB | MFU | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    base = next((r["tokens_per_s"] for r in rows if r["model"] == "attention" and r.get("tokens_per_s")), None)
    for r in rows:
        if r.get("tokens_per_s") is None:
            lines.append(f"| {r['model']} | – | – | – | – | – | {r['note']} |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "–"
        mib = "–" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['model']} | {r['params_m']:.1f}M | {r['tokens_per_s']:,.0f} | {ratio} | {mib} | {mfu} | "
                     f"{r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny presets, T=64, 1 step, on CPU")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--size", default="340m")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the rows here")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.dry_run else "cpu")
    if a.dry_run:
        a.size, a.seq_len, a.batch, a.steps, a.warmup = "tiny", 64, 1, 1, 0
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    header = (f"Training throughput, {a.size}, T={a.seq_len}, batch {a.batch}, "
              f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, AdamW, median of {a.steps} steps; "
              f"{gpu}, torch {torch.__version__}")
    rows: list[dict] = []
    for name in a.models:
        try:
            rows.append(measure(name, a.size, a.seq_len, a.batch, a.steps, a.warmup, device))
        except Exception as err:  # noqa: BLE001  (one model's failure is recorded; the others run)
            rows.append({"model": name, "note": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if a.json:  # after every model: a run stopped by its time box keeps the rows it measured
            a.json.write_text(json.dumps({"table": render(rows, header), "rows": rows}, indent=2))
    text = render(rows, header)
    print(text)
    return text


if __name__ == "__main__":
    main()
