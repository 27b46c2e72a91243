"""Pretraining: loss falls, exact resume, every bad input stops with one clear message."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from memlm.models import MemLMForCausalLM
from memlm.train.checkpoint import CheckpointError, list_checkpoints
from memlm.train.config import ConfigError, ScheduleSection, load_config
from memlm.train.data import Batch, ShuffledLoader
from memlm.train.metrics import read_jsonl
from memlm.train.optim import lr_multiplier
from memlm.train.trainer import train


def run(overrides: list[str]) -> dict:
    return train(load_config(None, overrides))


def test_thirty_steps_loss_falls_and_export_loads(tmp_path: Path, tiny_overrides) -> None:
    summary = run(tiny_overrides(tmp_path, **{"training.steps": 30}))
    rows = [r for r in read_jsonl(tmp_path / "t" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert summary["finished"] and summary["skipped_steps"] == 0 and math.isfinite(summary["val_loss"])
    report = (tmp_path / "t" / "report.md").read_text()
    assert "train loss: first" in report and "perplexity" in report and "`loss_curve.png`" in report
    assert (tmp_path / "t" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import memlm  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "t" / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "t" / "hf")
    assert isinstance(model, MemLMForCausalLM) and model.config.vocab_size == len(tok)
    ids = tok("def f(x):", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    greedy = ids
    for _ in range(5):
        greedy = torch.cat([greedy, model(greedy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, greedy)


@pytest.mark.parametrize("streaming", [False, True], ids=["shuffled", "streaming"])
def test_resume_equals_uninterrupted(tmp_path: Path, tiny_overrides, streaming: bool) -> None:
    """Stopped at step 10 and resumed to 20 == 20 steps in one go: same weights, same data order."""
    extra = {"training.steps": 20, "data.streaming": streaming, "training.grad_accum": 2,
             "logging.batch_checksum": True}
    run(tiny_overrides(tmp_path / "a", **extra))
    stopped = run(tiny_overrides(tmp_path / "b", **extra, **{"training.stop_at_step": 10}))
    assert stopped["steps"] == 10 and not stopped["finished"]
    assert not (tmp_path / "b" / "t" / "hf").exists()
    run(tiny_overrides(tmp_path / "b", **extra, **{"checkpoint.resume": True}))

    def trace(d: Path) -> list[tuple[int, int, int]]:
        rows = read_jsonl(d / "t" / "metrics.jsonl")
        return [(r["step"], r["data_position"], r["batch_checksum"]) for r in rows if "loss" in r]

    assert trace(tmp_path / "a") == trace(tmp_path / "b")
    a = load_file(tmp_path / "a" / "t" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "b" / "t" / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_is_never_overwritten(tmp_path: Path, tiny_overrides) -> None:
    run(tiny_overrides(tmp_path, **{"training.steps": 10}))
    before = {p.name: p.stat().st_mtime for p in list_checkpoints(tmp_path / "t")}
    with pytest.raises(ConfigError, match="already has checkpoints"):
        run(tiny_overrides(tmp_path, **{"training.steps": 10}))
    assert {p.name: p.stat().st_mtime for p in list_checkpoints(tmp_path / "t")} == before


def test_resume_with_incompatible_model_config(tmp_path: Path, tiny_overrides) -> None:
    run(tiny_overrides(tmp_path, **{"training.steps": 10}))
    with pytest.raises(CheckpointError, match=r"model.hidden_size: checkpoint 32 vs now 48"):
        run(tiny_overrides(tmp_path, **{"training.steps": 20, "checkpoint.resume": True, "model.hidden_size": 48}))


def test_half_written_checkpoint_is_ignored(tmp_path: Path, tiny_overrides) -> None:
    run(tiny_overrides(tmp_path, **{"training.steps": 10}))
    (tmp_path / "t" / "checkpoints" / "step_00000099.tmp").mkdir()
    assert list_checkpoints(tmp_path / "t")[-1].name == "step_00000010"


def test_missing_data_files(tmp_path: Path, tiny_overrides) -> None:
    with pytest.raises(ConfigError, match="matches no data files"):
        run(tiny_overrides(tmp_path, **{"data.path": str(tmp_path / "nope" / "*.jsonl")}))


def test_empty_corpus(tmp_path: Path, tiny_overrides) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(ConfigError, match="has no text"):
        run(tiny_overrides(tmp_path, **{"data.path": str(empty)}))


def test_wrong_text_field(tmp_path: Path, tiny_overrides) -> None:
    with pytest.raises(ConfigError, match="data.text_field='body'.*columns: \\['text'\\]"):
        run(tiny_overrides(tmp_path, **{"data.text_field": "body"}))


def test_tokenizer_larger_than_model_vocab(tmp_path: Path, tiny_overrides) -> None:
    with pytest.raises(ConfigError, match="the tokenizer has 384 tokens but model.vocab_size=100"):
        run(tiny_overrides(tmp_path, **{"model.vocab_size": 100}))


def test_unloadable_tokenizer_path(tmp_path: Path, tiny_overrides) -> None:
    with pytest.raises(ConfigError, match="tokenizer.path="):
        run(tiny_overrides(tmp_path, **{"tokenizer.path": str(tmp_path / "no_tokenizer")}))


def test_non_finite_steps_are_skipped_and_counted(tmp_path: Path, tiny_overrides, monkeypatch) -> None:
    original = MemLMForCausalLM.forward
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training and out.loss is not None:
            calls["n"] += 1
            if calls["n"] in (3, 4):
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MemLMForCausalLM, "forward", flaky)
    summary = run(tiny_overrides(tmp_path, **{"training.steps": 6}))
    assert summary["skipped_steps"] == 2
    rows = [r for r in read_jsonl(tmp_path / "t" / "metrics.jsonl") if "loss" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2]
    final = load_file(tmp_path / "t" / "hf" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


def test_document_masking_run(tmp_path: Path, tiny_overrides) -> None:
    summary = run(tiny_overrides(tmp_path, **{"training.steps": 4, "data.document_masking": True}))
    assert summary["finished"] and math.isfinite(summary["val_loss"])


def test_packed_batch_boundaries() -> None:
    ids = torch.arange(12).reshape(2, 6)
    starts = torch.zeros(2, 6, dtype=torch.bool)
    starts[0, 0] = starts[0, 4] = starts[1, 2] = True
    flat, cu, labels = Batch(ids, starts).packed()
    assert flat.shape == (1, 12)
    assert cu.tolist() == [0, 4, 6, 8, 12]
    assert (labels[0, [0, 4, 6, 8]] == -100).all() and (labels[0, [1, 5, 7, 9]] >= 0).all()


def test_loader_ranks_partition_each_global_batch() -> None:
    data = Batch(torch.arange(40).reshape(20, 2), torch.zeros(20, 2, dtype=torch.bool))
    loaders = [ShuffledLoader(data, 3, r, 2, seed=1) for r in range(2)]
    seen = []
    for _ in range(loaders[0].per_epoch):
        rows = [tuple(x.tolist()) for ld in loaders for x in ld.next_batch().input_ids]
        seen += rows
    assert len(seen) == len(set(seen)) == 18  # one epoch: no row twice, the remainder dropped
    second = ShuffledLoader(data, 3, 0, 2, seed=1)
    second.load_state_dict({"position": 1})
    first = ShuffledLoader(data, 3, 0, 2, seed=1)
    first.next_batch()
    assert torch.equal(first.next_batch().input_ids, second.next_batch().input_ids)


@pytest.mark.parametrize("name", ["cosine", "wsd", "constant"])
def test_schedules(name: str) -> None:
    cfg = ScheduleSection(name=name, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    lrs = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=0.02)
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # non-increasing after warmup
    if name != "cosine":
        assert lrs[79] == 1.0 and lrs[81] < 1.0
