"""The probes ``make train`` appends to its report."""

from __future__ import annotations

import json

from memlm.eval.default_report import run_default_probes
from memlm.eval.needle.haystack import stdlib_prose


def test_default_probes_write_files_and_markdown(tmp_path, memlm_model, tokenizer):
    val = [" ".join(stdlib_prose(min_chars=20_000)[:80])]
    md = run_default_probes(memlm_model, tokenizer, tmp_path, val)
    probes = tmp_path / "probes"
    for task in ("passkey", "s-niah-1"):
        record = json.loads((probes / f"{task}.json").read_text())
        assert (probes / f"{task}.png").exists() and len(record["context_lengths"]) == 2
        assert f"**{task}**" in md
        assert record["context_lengths"][-1] <= memlm_model.config.max_position_embeddings
    ppl = json.loads((probes / "perplexity.json").read_text())
    assert ppl["perplexity"] > 1.0 and f"{ppl['perplexity']:.3f}" in md
    assert md.startswith("## Recall probes") and md.count("| length |") == 2
