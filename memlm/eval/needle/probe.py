"""The S-NIAH / passkey grid: context lengths × needle depths × samples, greedy decoding,
an accuracy table, a JSON record and a length × depth heatmap (prompts: ``memlm.eval.needle.task``)."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from memlm.eval.generation import greedy_generate, model_device
from memlm.eval.io.plots import plot_length_depth
from memlm.eval.io.records import environment, markdown_table, pct, write_json
from memlm.eval.needle.haystack import prose_sentences, stdlib_prose
from memlm.eval.needle.task import DEFAULT_MAX_NEW_TOKENS, build_sample, check_task, token_counter
from memlm.eval.scoring import contains_answer, passkey_correct


def _check_grid(context_lengths: Sequence[int], depths: Sequence[float], num_samples: int) -> None:
    if not context_lengths or any(not isinstance(n, int) or n < 1 for n in context_lengths):
        raise ValueError(f"context_lengths must be a non-empty list of positive integers, "
                         f"got {context_lengths!r}")
    if not depths or any(not 0 <= d <= 100 for d in depths):
        raise ValueError(f"depths must be a non-empty list of percentages in [0, 100], got {depths!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")


def run_needle_probe(
    model: Any,
    tokenizer: Any,
    task: str,
    context_lengths: Sequence[int],
    depths: Sequence[float] = (0, 25, 50, 75, 100),
    num_samples: int = 5,
    haystack_texts: list[str] | None = None,
    max_new_tokens: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    name: str | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Run ``task`` (``s-niah-1|2|3`` or ``passkey``) over the grid; returns the record and, when
    ``out_dir`` is given, writes ``{name}.json`` and ``{name}.png`` there.

    ``haystack_texts`` feed the prose haystack of S-NIAH-2/3 (default: standard-library docstrings).
    Sample ``i`` of cell ``(length, depth)`` is seeded by ``(seed, task, length, depth, i)``;
    ``meta`` (e.g. the model and tokenizer names) is stored in the record. ``batch_size`` prompts are
    decoded together, left-padded (each as it would alone).
    """
    check_task(task)
    _check_grid(context_lengths, depths, num_samples)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    new_tokens = max_new_tokens if max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS[task]
    prose = None
    if task in ("s-niah-2", "s-niah-3"):
        # ~8 characters per token is a generous upper bound for English BPE vocabularies
        prose = prose_sentences(haystack_texts) if haystack_texts is not None else list(
            stdlib_prose(min_chars=max(100_000, 8 * max(context_lengths))))
    count = token_counter(tokenizer)
    was_training = model.training
    model.eval()
    grid = [(i, j, k) for i in range(len(context_lengths)) for j in range(len(depths)) for k in range(num_samples)]
    samples: list[dict[str, Any]] = []
    hits = [[0] * len(depths) for _ in context_lengths]
    start = time.perf_counter()
    bar = tqdm(total=len(grid), desc=task, disable=not progress)
    for first in range(0, len(grid), batch_size):
        cells = grid[first:first + batch_size]
        built = [build_sample(task, count, context_lengths[i], depths[j],
                              random.Random(f"{seed}/{task}/{context_lengths[i]}/{depths[j]}/{k}"), prose, new_tokens)
                 for i, j, k in cells]
        outputs = greedy_generate(model, tokenizer, [b.prompt for b in built], new_tokens)
        for (i, j, k), sample, output in zip(cells, built, outputs, strict=True):
            ok = (passkey_correct(output, int(sample.answer)) if task == "passkey"
                  else contains_answer(output, sample.answer))
            hits[i][j] += ok
            samples.append({"context_length": context_lengths[i], "depth": depths[j], "sample": k,
                            "answer": sample.answer, "output": output, "correct": ok,
                            "prompt_tokens": sample.num_prompt_tokens, "haystack_units": sample.haystack_units})
        bar.update(len(cells))
        bar.set_postfix(acc=pct(sum(s["correct"] for s in samples) / len(samples)))
    acc = [[h / num_samples for h in row] for row in hits]
    bar.close()
    model.train(was_training)
    record: dict[str, Any] = {
        "task": task,
        **(meta or {}),
        "context_lengths": list(context_lengths),
        "depths": list(depths),
        "num_samples": num_samples,
        "max_new_tokens": new_tokens,
        "seed": seed,
        "batch_size": batch_size,
        "haystack": ("noise" if prose is None
                     else "texts" if haystack_texts is not None else "stdlib-docstrings"),
        "accuracy": acc,
        "mean_accuracy": sum(map(sum, acc)) / (len(context_lengths) * len(depths)),
        "accuracy_by_length": {str(n): sum(row) / len(row) for n, row in zip(context_lengths, acc)},
        "time_s": time.perf_counter() - start,
        "env": environment(model_device(model)),
        "samples": samples,
    }
    if out_dir is not None:
        stem = Path(out_dir) / (name or task)
        record["files"] = {"json": f"{stem}.json", "png": f"{stem}.png"}
        plot_length_depth(acc, context_lengths, depths, f"{stem.name}: mean {pct(record['mean_accuracy'])}%",
                          record["files"]["png"])
        write_json(record["files"]["json"], record)
    return record


def needle_table(record: dict[str, Any]) -> str:
    """Markdown accuracy table (%) of a needle record: one row per context length."""
    header = ["length"] + [f"{d:g}%" for d in record["depths"]] + ["mean"]
    rows = [[n] + [pct(v) for v in row] + [pct(sum(row) / len(row))]
            for n, row in zip(record["context_lengths"], record["accuracy"])]
    return markdown_table(header, rows)
