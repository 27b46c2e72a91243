"""Sliding-window perplexity with a fixed context length and stride.

The texts are tokenized and joined (EOS between documents when the tokenizer has one) into
one stream ``x_1 … x_N``. Windows of ``context_length`` tokens start every ``stride`` tokens
(``stride < context_length``); each window scores only the tokens no earlier window scored,
so every token but ``x_1`` is scored exactly once, with at least ``context_length - stride``
tokens of context once the stream is long enough:
``PPL = exp(-(1 / (N - 1)) Σ_{t=2..N} log p(x_t | x_{max(1, t-c)} … x_{t-1}))``,
``c`` the context available in the window that scores ``t``.

:func:`run_perplexity_probe` is ``memlm probe perplexity``: the score, a JSON record and a plot of
the loss by context position.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from memlm.eval.generation import model_device
from memlm.eval.io.plots import plot_loss_by_context
from memlm.eval.io.records import environment, write_json


def token_stream(tokenizer: Any, texts: list[str]) -> list[int]:
    """All ``texts`` tokenized (no special tokens) and joined by EOS when the tokenizer has one."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        if stream and eos is not None:
            stream.append(eos)
        stream += ids
    return stream


def window_plan(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window: tokens ``[begin, end)`` are fed and the
    predictions of ``x[first_scored:end]`` (the tokens no earlier window scored) are scored.

    Windows start every ``stride`` tokens; ``stride <= context_length - 1`` so that consecutive
    windows share at least the one token that conditions the next window's first prediction.
    """
    if context_length < 2 or not 1 <= stride <= context_length - 1:
        raise ValueError(
            f"need context_length >= 2 and 1 <= stride <= context_length - 1, got "
            f"context_length={context_length}, stride={stride}"
        )
    if num_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, the texts give {num_tokens}")
    plan, scored_to, begin = [], 1, 0
    while scored_to < num_tokens:
        end = min(begin + context_length, num_tokens)
        plan.append((begin, end, scored_to))
        scored_to = end
        begin += stride
    return plan


@torch.no_grad()
def window_nll(model: Any, ids: torch.Tensor, plan: list[tuple[int, int, int]], context_length: int,
               batch_size: int = 1, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and count of the tokens ``plan`` scores in the 1-D ``ids``, by the number of
    context tokens each prediction saw: ``nll_at[j] = Σ -log p(x_t | x_{t-j} … x_{t-1})`` over
    the scored ``t`` with ``t - begin = j`` (float64, on the CPU)."""
    nll_at = torch.zeros(context_length, dtype=torch.float64)
    count_at = torch.zeros(context_length, dtype=torch.float64)
    # windows of equal length run batched; the (shorter) tail windows run alone
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in plan:
        groups.setdefault(w[1] - w[0], []).append(w)
    bar = tqdm(total=len(plan), desc="perplexity", disable=not progress)
    for wins in groups.values():
        for s in range(0, len(wins), batch_size):
            chunk = wins[s:s + batch_size]
            x = torch.stack([ids[b:e] for b, e, _ in chunk])
            logp = F.log_softmax(model(input_ids=x).logits.float(), dim=-1)
            for row, (b, e, first) in enumerate(chunk):
                pred = logp[row, first - b - 1:e - b - 1]
                token_nll = -pred.gather(-1, ids[first:e, None])[:, 0].double().cpu()
                nll_at[first - b:e - b] += token_nll
                count_at[first - b:e - b] += 1
            bar.update(len(chunk))
            bar.set_postfix(ppl=f"{math.exp(nll_at.sum() / count_at.sum()):.3g}")
    bar.close()
    return nll_at, count_at


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    context_length: int = 1024,
    stride: int | None = None,
    batch_size: int = 1,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``texts`` (module docstring); ``stride`` defaults to
    ``context_length - 1`` (adjacent windows sharing one token) and ``max_tokens`` truncates
    the stream."""
    stride = stride or context_length - 1
    stream = token_stream(tokenizer, texts)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    plan = window_plan(len(stream), context_length, stride)
    ids = torch.tensor(stream, device=model_device(model))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nll_at, count_at = window_nll(model, ids, plan, context_length, batch_size, progress)
    model.train(was_training)
    nll, count = nll_at.sum().item(), int(count_at.sum().item())
    return {
        "perplexity": math.exp(nll / count),
        "nll_per_token": nll / count,
        "num_tokens_scored": count,
        "num_windows": len(plan),
        "context_length": context_length,
        "stride": stride,
        "time_s": time.perf_counter() - start,
        "nll_by_context": _bucketed(nll_at, count_at),
    }


def _bucketed(nll_at: torch.Tensor, count_at: torch.Tensor, buckets: int = 32) -> list[dict[str, float]]:
    """Mean loss and token count per range of context positions (``[start, end)`` tokens of
    context), at most ``buckets`` equal ranges over the positions that were scored."""
    scored = count_at.nonzero()[:, 0]
    lo, hi = int(scored.min()), int(scored.max()) + 1
    step = max(1, -(-(hi - lo) // buckets))
    return [{"start": a, "end": min(a + step, hi), "nll": (nll_at[a:a + step].sum() / n).item(),
             "count": int(n)} for a in range(lo, hi, step) if (n := count_at[a:a + step].sum()) > 0]


def run_perplexity_probe(model: Any, tokenizer: Any, texts: list[str], out_dir: str | Path, name: str,
                         meta: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """:func:`perplexity` of ``texts`` (``options``: its ``context_length``, ``stride``, ``batch_size``,
    ``max_tokens``, ``progress``); writes ``{name}.json`` (the record, with ``meta`` such as the model,
    tokenizer and text source) and ``{name}.png`` (loss by context position) in ``out_dir``."""
    result = perplexity(model, tokenizer, texts, **options)
    record = {"task": "perplexity", **(meta or {}), **result, "env": environment(model_device(model))}
    stem = Path(out_dir) / name
    record["files"] = {"json": f"{stem}.json", "png": f"{stem}.png"}
    plot_loss_by_context(result["nll_by_context"], f"{name}: ppl {result['perplexity']:.4g}",
                         record["files"]["png"])
    write_json(record["files"]["json"], record)
    return record


def perplexity_summary(record: dict[str, Any]) -> str:
    """The one line ``memlm probe perplexity`` prints."""
    return (f"perplexity {record['perplexity']:.4f} over {record['num_tokens_scored']} tokens "
            f"(context {record['context_length']}, stride {record['stride']}); wrote "
            f"{record['files']['json']}, {record['files']['png']}")
