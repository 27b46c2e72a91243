"""Greedy generation of a left-padded batch against the same prompts one at a time.

For each model (memlm's tiny presets, seeded, eval, one thread): ``--batch`` random prompts of lengths spread
evenly over ``[--min-len, --max-len]``, left-padded with an attention mask, generate ``--new-tokens`` tokens
greedily in one ``generate()`` call; then each prompt alone. The outputs must agree token for token (the run
stops otherwise). Reported: wall seconds of both (median of ``--repeats``, alternating), generated tokens/s and
the speed-up of the batch, and how the padded prefill keeps each layer's states (``stacked``: rows decode in
one call; ``per row``: the layer decodes each row on its own, ``memlm/models/padding.py``).

Usage: ``python benchmarks/padded_generate.py`` (``--quick``: seconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memlm import load_preset  # noqa: E402
from memlm.layers.mixer import RowStates  # noqa: E402
from memlm.models import MemLMForCausalLM  # noqa: E402

VOCAB = 256
MODELS = ("attention", "gated_deltanet", "titans_memory")


def build(name: str) -> MemLMForCausalLM:
    torch.manual_seed(0)
    return MemLMForCausalLM(load_preset(f"{name}_tiny", vocab_size=VOCAB)).eval()


def padded_prompts(batch: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [lo + (hi - lo) * i // max(batch - 1, 1) for i in range(batch)]
    ids = torch.randint(1, VOCAB, (batch, hi), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(hi) >= hi - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def kept(model: MemLMForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> str:
    cache = model(ids, attention_mask=mask, use_cache=True).cache
    per_row = sum(isinstance(s, RowStates) for s in cache.states)
    return "stacked" if not per_row else f"per row ({per_row}/{len(cache.states)} layers)"


@torch.inference_mode()
def measure(name: str, batch: int, lo: int, hi: int, new_tokens: int, repeats: int) -> dict:
    model = build(name)
    ids, mask = padded_prompts(batch, lo, hi)
    args = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}

    def batched() -> torch.Tensor:
        return model.generate(ids, attention_mask=mask, **args)[:, hi:]

    def alone() -> torch.Tensor:
        rows = [ids[i:i + 1, hi - int(mask[i].sum()):] for i in range(batch)]
        return torch.cat([model.generate(r, attention_mask=torch.ones_like(r), **args)[:, r.shape[1]:] for r in rows])

    times: dict[str, list[float]] = {"batch": [], "alone": []}
    outputs = {}
    order = [("batch", batched), ("alone", alone)]
    for r in range(repeats):
        for label, fn in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            outputs[label] = fn()
            times[label].append(time.perf_counter() - start)
    if not torch.equal(outputs["batch"], outputs["alone"]):
        raise SystemExit(f"{name}: the padded batch generated other tokens than the prompts alone")
    t_batch, t_alone = statistics.median(times["batch"]), statistics.median(times["alone"])
    return {"model": name, "batch_s": t_batch, "alone_s": t_alone, "speedup": t_alone / t_batch,
            "tok_s_batch": batch * new_tokens / t_batch, "tok_s_alone": batch * new_tokens / t_alone,
            "states": kept(model, ids, mask)}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 3, prompts of 8-24 tokens, 4 new tokens")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.min_len, a.max_len, a.new_tokens, a.repeats = 3, 8, 24, 4, 1
    torch.set_num_threads(1)
    lines = [f"batch {a.batch}, prompts {a.min_len}-{a.max_len} tokens (left-padded), {a.new_tokens} new tokens, "
             f"1 thread, torch {torch.__version__}",
             "| model | batch s | alone s | tok/s batch | tok/s alone | speed-up | padded prefill keeps |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name in a.models:
        m = measure(name, a.batch, a.min_len, a.max_len, a.new_tokens, a.repeats)
        lines.append(f"| {name} | {m['batch_s']:.2f} | {m['alone_s']:.2f} | {m['tok_s_batch']:.1f} | "
                     f"{m['tok_s_alone']:.1f} | {m['speedup']:.2f}x | {m['states']} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
