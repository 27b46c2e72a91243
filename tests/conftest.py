"""Shared fixtures: a small on-disk corpus and tiny run configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memlm.train.corpus import embedded_corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 stdlib sources as a JSONL corpus (one document per line)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [d[:4000] for d in embedded_corpus()[:60]]
    with (root / "docs.jsonl").open("w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return root


def _tiny_overrides(corpus: Path, run_dir: Path, **extra: object) -> list[str]:
    base = {
        "name": "t", "output_dir": str(run_dir), "data.source": "files", "data.path": str(corpus / "docs.jsonl"),
        "data.seq_len": 64, "data.val_documents": 4, "tokenizer.vocab_size": 384,
        "model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_heads": 2,
        "training.steps": 20, "training.micro_batch_size": 4, "optimizer.lr": 3e-3,
        "schedule.warmup_steps": 2, "checkpoint.every": 10, "logging.every": 1, "logging.val_every": 10,
        "logging.val_batches": 2, "logging.progress_bar": False, "logging.probes": False,
        "logging.sample_tokens": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_overrides(corpus_dir: Path):
    """``tiny_overrides(run_dir, **extra)``: dotted overrides for a seconds-long CPU run."""
    return lambda run_dir, **extra: _tiny_overrides(corpus_dir, run_dir, **extra)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
