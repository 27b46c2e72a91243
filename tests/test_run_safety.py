"""A training run is safe to stop, resume and misconfigure: checkpoints verify themselves and a
resume falls back past a corrupt one; a resume that trains nothing replaces nothing; the run
directory's tokenizer and setup are checked; metrics have one line per step; config errors come
before any data is read or anything written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memlm.train.__main__ import main as train_main
from memlm.train.checkpoint import CheckpointError, list_checkpoints, verify
from memlm.train.config import ConfigError, load_config
from memlm.train.metrics import read_jsonl
from memlm.train.trainer import train


def run(overrides: list[str]) -> dict:
    return train(load_config(None, overrides))


def _zero_safetensors_data(path: Path) -> None:
    """Zero every tensor byte, keeping the header (a file that still parses)."""
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start:] = bytes(len(raw) - start)
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "zero-length": lambda p: p.write_bytes(b""),
    "one byte flipped": lambda p: p.write_bytes((lambda b: b[:-1] + bytes([b[-1] ^ 1]))(p.read_bytes())),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_overrides) -> Path:
    """The output folder of a finished 20-step run (checkpoints at 10 and 20), to copy and damage."""
    root = tmp_path_factory.mktemp("finished")
    run(tiny_overrides(root, **{"training.steps": 20}))
    return root


def test_every_checkpoint_file_kind_and_damage_is_named(finished_run, tmp_path: Path) -> None:
    """The corruption matrix: every file of a checkpoint, truncated / emptied / one byte changed, and
    the model file with zeroed data under an intact header, fails verification naming that file."""
    src = list_checkpoints(finished_run / "t")[-1]
    verify(src)
    names = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
            "memlm_model.json", "memlm_setup.json"} <= set(names)
    cases = [(name, kind) for name in names for kind in CORRUPTIONS] + [("model.safetensors", "zeroed data")]
    for name, kind in cases:
        ckpt = tmp_path / f"{name}-{kind}".replace("/", "_").replace(" ", "_")
        shutil.copytree(src, ckpt)
        _zero_safetensors_data(ckpt / name) if kind == "zeroed data" else CORRUPTIONS[kind](ckpt / name)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            verify(ckpt)
    damaged = tmp_path / "manifest-gone"
    shutil.copytree(src, damaged)
    (damaged / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify(damaged)


def test_resume_falls_back_past_a_corrupt_checkpoint(finished_run, tmp_path: Path, tiny_overrides) -> None:
    """Newest checkpoint's model zeroed under an intact header: --resume says so, sets it aside, resumes
    from step 10 and ends with the weights of the uninterrupted run; metrics have one line per step."""
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    run_dir = tmp_path / "t"
    reference = load_file(run_dir / "hf" / "model.safetensors")
    newest = list_checkpoints(run_dir)[-1]
    _zero_safetensors_data(newest / "model.safetensors")
    shutil.rmtree(run_dir / "hf")
    summary = run(tiny_overrides(tmp_path, **{"training.steps": 20, "checkpoint.resume": True}))
    assert summary["finished"] and summary["steps"] == 20
    assert (run_dir / "checkpoints" / (newest.name + ".corrupt")).is_dir()
    resumed = load_file(run_dir / "hf" / "model.safetensors")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 21))


def test_no_checkpoint_verifies(finished_run, tmp_path: Path, tiny_overrides) -> None:
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    for ckpt in list_checkpoints(tmp_path / "t"):
        (ckpt / "optimizer.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint verifies: .*optimizer.bin has 0 bytes"):
        run(tiny_overrides(tmp_path, **{"training.steps": 20, "checkpoint.resume": True}))


def test_resuming_a_finished_run_replaces_nothing(finished_run, tmp_path: Path, tiny_overrides) -> None:
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    run_dir = tmp_path / "t"
    before = {p: p.read_bytes() for p in [run_dir / "report.md", run_dir / "summary.json",
                                          *sorted((run_dir / "hf").iterdir())]}
    summary = run(tiny_overrides(tmp_path, **{"training.steps": 20, "checkpoint.resume": True}))
    assert summary["finished"]
    assert {p: p.read_bytes() for p in before} == before
    first_session = json.loads(before[run_dir / "summary.json"])["wall_time_s"]
    assert summary["wall_time_s"] == pytest.approx(first_session, rel=0.2) and first_session > 0.1


def test_killed_run_logs_each_step_once_and_counts_all_wall_time(tmp_path: Path, tiny_overrides) -> None:
    """Killed after step 15 (newest checkpoint: 10): the resume replays 11-15 and logs them once."""
    extra = {"training.steps": 20}
    first = run(tiny_overrides(tmp_path, **extra, **{"training.stop_at_step": 15}))
    shutil.rmtree(list_checkpoints(tmp_path / "t")[-1])  # the kill came before the step-15 save
    second = run(tiny_overrides(tmp_path, **extra, **{"checkpoint.resume": True}))
    steps = [r["step"] for r in read_jsonl(tmp_path / "t" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 21))
    assert second["wall_time_s"] > 0.5 * first["wall_time_s"]


def test_run_directory_tokenizer_and_setup_are_checked(finished_run, tmp_path: Path, tiny_overrides) -> None:
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    resume = {"training.steps": 30, "checkpoint.resume": True}
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size: saved 384 vs config 512"):
        run(tiny_overrides(tmp_path, **resume, **{"tokenizer.vocab_size": 512}))
    with pytest.raises(CheckpointError, match=r"data.seq_len: checkpoint 64 vs now 32"):
        run(tiny_overrides(tmp_path, **resume, **{"data.seq_len": 32}))
    with pytest.raises(CheckpointError, match=r"training.micro_batch_size: checkpoint 4 vs now 2"):
        run(tiny_overrides(tmp_path, **resume, **{"training.micro_batch_size": 2}))


@pytest.mark.parametrize(("override", "needle"), [
    ("model.mixer={name: attn}", "registered mixers"),
    ("model.num_heads=3", "num_heads"),
    ("model.ratio=3:0", "b >= 1"),
])
def test_model_errors_come_before_data_and_writes(tmp_path: Path, tiny_overrides, override: str,
                                                  needle: str) -> None:
    """With a data path that does not exist, the model error is the one reported, and nothing is written."""
    overrides = [*tiny_overrides(tmp_path, **{"data.path": str(tmp_path / "none.jsonl")}), override]
    with pytest.raises(ConfigError, match=needle):
        run(overrides)
    assert not (tmp_path / "t").exists()


def test_overrides_before_flags_and_one_line_errors(tmp_path: Path, tiny_overrides, capsys) -> None:
    """``key=value`` may precede ``--config`` / ``--resume``; a config error is one line, exit code 2."""
    run_file = tmp_path / "run.yaml"
    run_file.write_text("name: t\n")
    code = train_main([*tiny_overrides(tmp_path, **{"model.num_heads": 3}), "--config", str(run_file), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("memlm train: error: model:")


def test_text_files_not_utf8_and_one_big_file(tmp_path: Path, tiny_overrides) -> None:
    bad = tmp_path / "bytes.txt"
    bad.write_bytes(bytes(range(128, 256)) * 64)
    with pytest.raises(ConfigError, match=r"bytes.txt is not UTF-8 text"):
        run(tiny_overrides(tmp_path, **{"data.path": str(bad)}))
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(f"Paragraph {i}: " + "words and more words " * 30 for i in range(60)))
    with pytest.raises(ConfigError, match=r"has 1 documents.*data.text_documents=paragraph"):
        run(tiny_overrides(tmp_path, **{"data.path": str(book)}))
    summary = run(tiny_overrides(tmp_path, **{"data.path": str(book), "data.text_documents": "paragraph",
                                              "training.steps": 2, "checkpoint.export": False}))
    assert summary["finished"]


def test_tracker_that_is_not_installed(tmp_path: Path, tiny_overrides, monkeypatch: pytest.MonkeyPatch) -> None:
    from memlm.train import config

    monkeypatch.setitem(config.TRACKERS, "tensorboard", lambda: False)
    with pytest.raises(ConfigError, match=r"tensorboard is not installed: pip install 'memlm\[tensorboard\]'"):
        run(tiny_overrides(tmp_path, **{"logging.trackers": "[tensorboard]"}))
    assert not (tmp_path / "t").exists()
