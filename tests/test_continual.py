"""Continual pretraining (``memlm.continual``): the metrics on hand-made matrices, the stream schedules against
their formulas, replay (reservoir, fraction, process-independence), config errors, and the offline smoke
stream end to end, killed in the middle of its second task and resumed to the same final weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memlm.cli import main as memlm_main
from memlm.continual import metrics
from memlm.continual.config import ContinualScheduleSection, load_continual_config
from memlm.continual.replay import FixedFraction, ReplayBuffer, ReplayMixer
from memlm.continual.schedule import stream_multiplier
from memlm.train.config import ConfigError
from memlm.train.data import Batch

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "continual" / "smoke.yaml"

# ---- metrics ----------------------------------------------------------------------------------------------

L = [[1.0, 3.0, 4.0],
     [1.5, 2.0, 3.5],
     [2.0, 2.5, 1.0]]
L0 = [4.0, 4.0, 4.0]


def test_metrics_on_a_hand_made_matrix() -> None:
    assert metrics.average_forgetting(L) == pytest.approx(((2.0 - 1.0) + (2.5 - 2.0)) / 2)
    assert metrics.backward_transfer(L) == pytest.approx(((1.0 - 2.0) + (2.0 - 2.5)) / 2)
    assert metrics.forward_transfer(L, L0) == pytest.approx(((4.0 - 3.0) + (4.0 - 3.5)) / 2)
    assert metrics.final_average(L) == pytest.approx(5.5 / 3)
    one = [[2.0]]
    assert metrics.average_forgetting(one) is None and metrics.backward_transfer(one) is None
    assert metrics.forward_transfer(one, [3.0]) is None


def test_forgetting_area_by_hand() -> None:
    """Task 0 ends at step 10 (best 1), rises to 2 then 3; task 1 ends at 30 at its best: the curve is
    0, 0, 1, (2 + 0)/2 = 1 at steps 0, 10, 20, 30, whose trapezoid area over 30 steps is 15 / 30."""
    steps, losses = [0, 10, 20, 30], [[4.0, 4.0], [1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]
    assert metrics.forgetting_curve_area(steps, losses, [10, 30]) == pytest.approx(0.5)
    assert metrics.forgetting_curve_area([0], [[1.0, 1.0]], [0, 0]) == 0.0


# ---- schedules --------------------------------------------------------------------------------------------

def test_cosine_per_task_rewarms_and_redecays() -> None:
    cfg = ContinualScheduleSection(name="cosine", warmup_steps=2, min_lr_ratio=0.1)
    steps = [10, 20]
    cosine = lambda local, total: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (local - 2) / (total - 2)))  # noqa: E731
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 9: cosine(9, 10), 10: 0.5, 11: 1.0, 20: cosine(10, 20), 29: cosine(19, 20)}
    for step, value in expected.items():
        assert stream_multiplier(step, steps, cfg) == pytest.approx(value), step


def test_wsd_per_task_decays_over_each_tasks_tail() -> None:
    cfg = ContinualScheduleSection(name="wsd", warmup_steps=1, min_lr_ratio=0.1, decay_fraction=0.5)
    steps = [4, 8]
    assert [round(stream_multiplier(s, steps, cfg), 4) for s in range(12)] == [
        1.0, 1.0, 0.55, 0.1, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1]


def test_infinite_schedule_phases() -> None:
    """Warmup, cosine cooldown to c until the first anneal, constant, and an exponential anneal to m at
    each task's end; the second task starts again at c (no re-warming)."""
    c, m = 0.5, 0.1
    cfg = ContinualScheduleSection(name="infinite", warmup_steps=2, min_lr_ratio=m, constant_lr_ratio=c,
                                   anneal_fraction=0.25)
    steps = [20, 20]  # anneal 5 steps per task; cooldown ends at 15
    anneal = lambda k: c * (m / c) ** ((k + 1) / 5)  # noqa: E731
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 8: c + (1 - c) / 2 * (1 + math.cos(math.pi * 6 / 13)), 14:
                c + (1 - c) / 2 * (1 + math.cos(math.pi * 12 / 13)), 15: anneal(0), 19: m, 20: c, 34: c,
                35: anneal(0), 37: anneal(2), 39: m}
    for step, value in expected.items():
        assert stream_multiplier(step, steps, cfg) == pytest.approx(value), step


# ---- replay -----------------------------------------------------------------------------------------------

def rows(ids: range, seq_len: int = 3) -> Batch:
    t = torch.tensor(list(ids))[:, None].repeat(1, seq_len)
    return Batch(t, torch.zeros_like(t, dtype=torch.bool))


def test_reservoir_keeps_a_uniform_sample() -> None:
    """Algorithm R: 10 of 1000 rows, offered in two calls; over 40 seeds the kept rows average ≈ 500."""
    means = []
    for seed in range(40):
        buf = ReplayBuffer(10, 3, seed)
        buf.offer(rows(range(600)))
        buf.offer(rows(range(600, 1000)))
        kept = buf.rows[:, 0]
        assert len(buf) == 10 and buf.offered == 1000 and len(set(kept.tolist())) == 10
        means.append(kept.float().mean().item())
    assert abs(sum(means) / len(means) - 499.5) < 40  # std of the mean of 400 draws ≈ 14


def test_replay_fraction_and_processes() -> None:
    """5% of 8-row global batches over 1000 batches is exactly 400 rows; none in the first task; one
    process with micro-batch 8 and two with 4 build the same global batches."""
    buf = ReplayBuffer(64, 3, 0)
    buf.offer(rows(range(10**6, 10**6 + 64)))

    def global_batches(world: int, task: int) -> list[torch.Tensor]:
        mixers = [ReplayMixer(buf, FixedFraction(0.05), 8 // world, r, world, seed=3) for r in range(world)]
        out = []
        for k in range(1000):
            parts = [m.mix(rows(range(8 * k + (8 // world) * r, 8 * k + (8 // world) * (r + 1))), task, k, k)
                     for r, m in enumerate(mixers)]
            out.append(torch.cat([p.input_ids for p in parts]))
        assert mixers[0].replayed == (400 if task else 0)
        return out

    single, double = global_batches(1, 1), global_batches(2, 1)
    assert all(torch.equal(a, b) for a, b in zip(single, double, strict=True))
    replayed = sum(int((b[:, 0] >= 10**6).sum()) for b in single)
    assert replayed == 400
    assert all(int((b[:, 0] >= 10**6).sum()) == 0 for b in global_batches(1, 0))


# ---- config errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "message"), [
    ("replay.fraction=1.5", r"replay.fraction must lie in \[0, 1\)"),
    ("schedule.name=step", r"schedule.name='step' is not allowed; choose one of \['cosine', 'wsd', 'infinite'\]"),
    ("replay.controler=fixed", r"bad key 'replay.controler'.*allowed keys here: \['fraction', 'buffer_rows', "
                               r"'controller'\]"),
    ("replay.controller=trc2", r"replay.controller='trc2' is not allowed; choose one of \['fixed'\]"),
    ("tasks=[{name: a, tokens: 100}, {name: a, tokens: 100}]", "tasks have repeated names"),
    ("tasks=[{name: a}]", "tokens is required"),
])
def test_bad_configs_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_continual_config(SMOKE, [override])


def test_cli_reports_a_bad_config_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = memlm_main(["continual", "--config", str(SMOKE), f"output_dir={tmp_path}", "tasks.0=x"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("memlm continual: error:") and "Traceback" not in err
    assert not any(tmp_path.iterdir())


# ---- the stream end to end --------------------------------------------------------------------------------

def _run(tmp_path: Path, name: str, *overrides: str) -> int:
    return memlm_main(["continual", "--config", str(SMOKE), f"output_dir={tmp_path}", f"name={name}",
                       "logging.progress_bar=false", *overrides])


def test_two_task_stream_end_to_end(tmp_path: Path) -> None:
    two = ("tasks=[{name: python, data: {source: embedded, max_documents: 60, val_documents: 6, seq_len: 128}, "
           "tokens: 20480}, {name: sums, data: {source: arithmetic, max_documents: 800, val_documents: 40, "
           "seq_len: 128}, tokens: 20480}]")
    assert _run(tmp_path, "two", two, "eval.every=5") == 0
    run = tmp_path / "two"
    res = json.loads((run / "results.json").read_text())
    L, L0 = res["loss_matrix"], res["initial_losses"]
    assert res["finished"] and res["tasks"] == ["python", "sums"] and res["task_steps"] == [20, 20]
    assert len(L) == 2 and all(len(r) == 2 for r in L) and len(L0) == 2
    assert res["perplexity_matrix"][1][0] == pytest.approx(math.exp(L[1][0]))
    assert L[0][0] < L0[0] and L[1][1] < L0[1], "each task's training lowers its own loss"
    assert res["average_forgetting"] == pytest.approx(L[1][0] - L[0][0])
    assert res["backward_transfer"] == pytest.approx(L[0][0] - L[1][0])
    assert res["forward_transfer"] == pytest.approx(L0[1] - L[0][1])
    assert res["curves"]["steps"] == [0, 5, 10, 15, 20, 25, 30, 35, 40] and res["finished_at"] == [20, 40]
    assert res["replayed_rows"] == 8  # 5% of 20 global batches of 8 rows in the second task
    assert (run / "loss_matrix.png").read_bytes()[:4] == b"\x89PNG" and (run / "task_curves.png").exists()
    assert "| after \\ on | python | sums |" in (run / "results.md").read_text()


def test_killed_in_task_two_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """A two-task stream (12 steps each, 25% replay, checkpoints every 5) stopped at step 18, in the middle of
    its second task, then resumed, ends with the uninterrupted run's weights, loss matrix and batches."""
    two = ("tasks=[{name: python, data: {source: embedded, max_documents: 60, val_documents: 6, seq_len: 128}, "
           "tokens: 12288}, {name: sums, data: {source: arithmetic, max_documents: 600, val_documents: 40, "
           "seq_len: 128}, tokens: 12288}]")
    common = (two, "replay.fraction=0.25", "checkpoint.every=5", "eval.every=4", "logging.batch_checksum=true",
              "logging.every=1")
    assert _run(tmp_path, "whole", *common) == 0
    assert _run(tmp_path, "cut", *common, "training.stop_at_step=18") == 0
    assert not (tmp_path / "cut" / "results.json").exists()
    assert _run(tmp_path, "cut", *common, "--resume") == 0
    whole, cut = load_file(tmp_path / "whole" / "hf" / "model.safetensors"), load_file(
        tmp_path / "cut" / "hf" / "model.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("whole", "cut"))
    assert a["loss_matrix"] == b["loss_matrix"] and a["curves"] == b["curves"]
    assert a["replayed_rows"] == b["replayed_rows"] == 24

    def checksums(name: str) -> dict[int, int]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["batch_checksum"] for r in map(json.loads, lines) if "batch_checksum" in r}

    assert checksums("whole") == checksums("cut") and len(checksums("whole")) == 24
    assert _run(tmp_path, "cut", *common) == 2, "a finished run's directory is not overwritten without --resume"
