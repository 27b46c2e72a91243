"""The probes ``make train`` appends to its run report: a short passkey and S-NIAH-1 grid sized
for a tiny CPU model, and the held-out perplexity: :func:`memlm.eval.perplexity.perplexity` with
windows of ``context_length`` tokens every ``context_length - 1`` (the windows of the trainer's
validation loss)."""

from __future__ import annotations

import pathlib
from typing import Any

from memlm.eval.io.records import write_json
from memlm.eval.needle.probe import needle_table, run_needle_probe
from memlm.eval.needle.task import min_context_length, token_counter
from memlm.eval.perplexity import perplexity

CANDIDATE_LENGTHS = (128, 256, 512, 1024)
NUM_LENGTHS = 2
DEFAULT_DEPTHS = (0, 50, 100)
DEFAULT_SAMPLES = 2
PPL_CONTEXT = 256
PPL_MAX_TOKENS = 16_384


def _grid_lengths(model: Any, tokenizer: Any, task: str) -> list[int]:
    """The ``NUM_LENGTHS`` shortest candidate lengths that hold the task's prompt and lie within
    the model's position range (empty when none does)."""
    limit = getattr(model.config, "max_position_embeddings", None) or max(CANDIDATE_LENGTHS)
    need = min_context_length(task, token_counter(tokenizer)) + 16  # room for a little haystack
    return [n for n in CANDIDATE_LENGTHS if need <= n <= limit][:NUM_LENGTHS]


def run_default_probes(model: Any, tokenizer: Any, run_dir: pathlib.Path, val_texts: list[str],
                       context_length: int = PPL_CONTEXT, max_tokens: int = PPL_MAX_TOKENS) -> str:
    """Run the default probes, write their JSON/PNG under ``run_dir/probes`` and return the
    markdown section for the run report; the perplexity scores the first ``max_tokens`` tokens
    of ``val_texts``."""
    out = pathlib.Path(run_dir) / "probes"
    lines = ["## Recall probes", ""]
    for task in ("passkey", "s-niah-1"):
        lengths = _grid_lengths(model, tokenizer, task)
        if not lengths:
            lines += [f"**{task}**: skipped, its prompt does not fit the model's "
                      f"{model.config.max_position_embeddings} positions", ""]
            continue
        record = run_needle_probe(model, tokenizer, task, lengths, DEFAULT_DEPTHS, DEFAULT_SAMPLES,
                                  out_dir=out, progress=False)
        lines += [f"**{task}** (accuracy %, {DEFAULT_SAMPLES} samples per cell, greedy; "
                  f"`{pathlib.Path(record['files']['png']).name}`)", "", needle_table(record), ""]
    context = min(context_length, getattr(model.config, "max_position_embeddings", None) or context_length)
    ppl = perplexity(model, tokenizer, val_texts, context_length=context, max_tokens=max_tokens, progress=False)
    write_json(out / "perplexity.json", ppl)
    lines += [f"**held-out perplexity**: {ppl['perplexity']:.3f} over {ppl['num_tokens_scored']} tokens "
              f"(context {ppl['context_length']}, stride {ppl['stride']})", ""]
    return "\n".join(lines)
