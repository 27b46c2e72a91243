"""Memory Caching's training cost: forward + backward time per token of each read over its base memory.

Every row is measured in the same run as its base, round-robin (one step of every model per round, after a
warm-up round), so load on a shared machine falls on all rows alike; the table gives the median per model,
µs per token and the ratio to the base (docs/design.md §4.4).

Model: ``MemLMForCausalLM``, vocabulary 64, hidden 64, 2 layers, 1 head (the MQAR probe's geometry), batch
``--batch`` × ``--seq`` tokens, AdamW not included. Bases: Gated DeltaNet (1 head × 64, expand_v 1) and the
Titans LMM (the ``titans_memory`` defaults: depth 2, expansion 4, chunk 16). Rows: the base, then
``memory_caching`` with residual, grm, soup and ssc (top 1) over constant segments of ``--segment`` tokens,
and grm over log segments of the same size (Log-Linear++).

Usage: ``python benchmarks/memory_caching_cost.py`` (``--quick``: a seconds-long smoke run).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memlm.models import MemLMConfig, MemLMForCausalLM  # noqa: E402

BASES = {
    "gated_deltanet": {"name": "gated_deltanet", "num_heads": 1, "head_dim": 64, "expand_v": 1.0},
    "titans_memory": {"name": "titans_memory"},
}
READS = {  # label: memory_caching options besides base and segment_size
    "residual": {"aggregation": "residual"},
    "grm": {"aggregation": "grm"},
    "soup": {"aggregation": "soup"},
    "ssc (top 1)": {"aggregation": "ssc", "top_k": 1},
    "log grm (Log-Linear++)": {"aggregation": "grm", "segments": "log"},
}


def build(mixer: dict, hidden: int) -> MemLMForCausalLM:
    torch.manual_seed(0)
    config = MemLMConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_heads=1, mixer=mixer)
    return MemLMForCausalLM(config)


def models(segment: int, hidden: int, bases: list[str]) -> dict[tuple[str, str], MemLMForCausalLM]:
    out = {}
    for base in bases:
        out[(base, "base")] = build(BASES[base], hidden)
        for label, read in READS.items():
            mixer = {"name": "memory_caching", "base": BASES[base], "segment_size": segment, **read}
            out[(base, label)] = build(mixer, hidden)
    return out


def step(model: MemLMForCausalLM, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(batch: int, seq: int, segment: int, reps: int, hidden: int, bases: list[str]) -> str:
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(0))
    built = models(segment, hidden, bases)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in built}
    for model in built.values():  # warm-up
        step(model, ids)
    for _ in range(reps):
        for key, model in built.items():
            times[key].append(step(model, ids))
    tokens = batch * seq
    lines = [
        f"Memory Caching, forward + backward, batch {batch} × {seq}, segments of {segment}, hidden {hidden}, "
        f"2 layers; median of {reps} round-robin rounds; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, {datetime.date.today()}",
        "",
        "| base | read | s / step | µs / token | × base |",
        "|---|---|---:|---:|---:|",
    ]
    for (base, label), samples in times.items():
        median = statistics.median(samples)
        ratio = median / statistics.median(times[(base, "base")])
        lines.append(f"| {base} | {label} | {median:.3f} | {median / tokens * 1e6:.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--segment", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5, help="timed rounds, >= 1 (median)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        table = measure(2, 36, 16, 1, 32, ["gated_deltanet", "titans_memory"])
    else:
        table = measure(args.batch, args.seq, args.segment, args.reps, 64, list(BASES))
    print(table)
    return table


if __name__ == "__main__":
    main()
