"""A 2-process CPU run through ``accelerate launch`` completes (gloo backend), with the
learning-rate schedule of a 1-process run, and its checkpoint is not resumed by 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memlm.train.checkpoint import CheckpointError
from memlm.train.config import load_config
from memlm.train.metrics import read_jsonl
from memlm.train.trainer import train


def test_two_process_cpu_run(tmp_path: Path, tiny_overrides) -> None:
    extra = {"training.steps": 6, "checkpoint.every": 3, "logging.val_every": 3, "schedule.warmup_steps": 2}
    overrides = tiny_overrides(tmp_path, **extra)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "memlm.train",
           *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n---\n" + "\n".join(
        line for line in proc.stderr.splitlines() if "[rank1]" in line or "Error" in line)[-3000:]
    assert proc.stdout.count("done: 6 steps") == 1  # printed by the main process only
    rows = [r for r in read_jsonl(tmp_path / "t" / "metrics.jsonl") if "loss" in r]
    assert [r["tokens_seen"] for r in rows] == [2 * 4 * 64 * s for s in range(1, 7)]  # two processes' rows
    assert (tmp_path / "t" / "hf" / "model.safetensors").exists()
    checkpoints = sorted((tmp_path / "t" / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step_00000003", "step_00000006"]
    for ckpt in checkpoints:  # both processes' RNG states made it in before the folder was renamed
        assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                           "random_states_1.pkl"]

    # one scheduler step per optimizer step: the same lr at every step as one process
    train(load_config(None, tiny_overrides(tmp_path / "one", **extra)))
    one = [r["lr"] for r in read_jsonl(tmp_path / "one" / "t" / "metrics.jsonl") if "loss" in r]
    assert [r["lr"] for r in rows] == one
    with pytest.raises(CheckpointError, match="processes: checkpoint 2 vs now 1"):
        train(load_config(None, tiny_overrides(tmp_path, **{**extra, "training.steps": 8, "checkpoint.resume": True})))


def test_two_process_continual_stream_equals_one(tmp_path: Path) -> None:
    """``accelerate launch -m memlm.continual`` on 2 CPU processes (micro-batch 4 each) trains a two-task stream
    with the schedule, task steps and replayed rows of 1 process with micro-batch 8, and reaches its loss
    matrix to float tolerance (the gradient all-reduce sums in another order)."""
    import json

    config = Path(__file__).resolve().parents[1] / "configs" / "continual" / "smoke.yaml"
    tasks = ("tasks=[{name: python, data: {source: embedded, max_documents: 60, val_documents: 8, seq_len: 128}, "
             "tokens: 12288}, {name: sums, data: {source: arithmetic, max_documents: 600, val_documents: 40, "
             "seq_len: 128}, tokens: 12288}]")
    common = ["--config", str(config), f"output_dir={tmp_path}", "logging.progress_bar=false", "logging.every=1",
              tasks, "replay.fraction=0.25", "eval.every=4"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "memlm.continual",
           *common, "name=two", "training.micro_batch_size=4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "memlm.continual", *common, "name=one"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert a["task_steps"] == b["task_steps"] == [12, 12] and a["replayed_rows"] == b["replayed_rows"] == 24
    for row_a, row_b in zip(a["loss_matrix"], b["loss_matrix"], strict=True):
        assert row_a == pytest.approx(row_b, abs=2e-3)
    lrs = [[r["lr"] for r in read_jsonl(tmp_path / n / "metrics.jsonl") if "loss" in r] for n in ("one", "two")]
    assert lrs[0] == lrs[1] and len(lrs[0]) == 24
