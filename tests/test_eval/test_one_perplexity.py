"""One held-out perplexity: the trainer's validation loss and the report's perplexity score the
same tokens with the same windows, so ``exp(val_loss)`` equals the report's perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from memlm.eval.needle.haystack import stdlib_prose
from memlm.eval.perplexity import perplexity
from memlm.models import MemLMConfig, MemLMForCausalLM
from memlm.train.config import load_config
from memlm.train.data import pack
from memlm.train.trainer import _validate, train

TEXTS = [" ".join(stdlib_prose(min_chars=20_000)[i:i + 3]) for i in range(0, 24, 3)]


def test_validation_loss_is_the_perplexity_of_its_tokens(tokenizer):
    """``_validate`` on the first ``val_batches × micro_batch_size`` packed rows is the log of
    ``perplexity`` on the same tokens with the trainer's windows (``seq_len``, stride ``seq_len - 1``),
    batches and precision."""
    seq_len, mb, batches = 32, 2, 3
    cfg = load_config(None, ["name=t", f"data.seq_len={seq_len}", f"training.micro_batch_size={mb}",
                             f"logging.val_batches={batches}"])
    rows = pack(TEXTS, tokenizer, seq_len).input_ids
    assert len(rows) > batches * mb  # the validation reads a prefix of the rows
    accelerator = Accelerator()
    model = MemLMForCausalLM(MemLMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                         num_heads=2, max_position_embeddings=256)).to(accelerator.device)
    val_loss = _validate(model, rows, cfg, accelerator)
    with accelerator.autocast():
        ppl = perplexity(model, tokenizer, TEXTS, context_length=seq_len, batch_size=mb,
                         max_tokens=batches * mb * seq_len, progress=False)
    assert ppl["num_tokens_scored"] == batches * mb * seq_len - 1
    assert math.exp(val_loss) == pytest.approx(ppl["perplexity"], rel=1e-5)


def test_report_perplexity_is_exp_validation_loss(tmp_path: Path, tiny_overrides) -> None:
    """A finished run's ``summary.json`` perplexity (the trainer's) is the report's held-out one
    (to bf16 precision where the validation ran under bf16 autocast and the report in float32)."""
    train(load_config(None, tiny_overrides(tmp_path, **{"training.steps": 4, "logging.probes": True})))
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    ppl = json.loads((tmp_path / "t" / "probes" / "perplexity.json").read_text())
    rel = 1e-2 if AcceleratorState().mixed_precision == "bf16" else 1e-5
    assert summary["val_ppl"] == pytest.approx(ppl["perplexity"], rel=rel)
    assert ppl["num_tokens_scored"] == summary["val_tokens"] - 1
    report = (tmp_path / "t" / "report.md").read_text()
    assert f"perplexity {summary['val_ppl']:.2f} on the first {summary['val_tokens']:,} validation tokens" in report
