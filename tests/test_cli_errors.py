"""Bad command-line input: one ``<prog>: error: ...`` line on stderr, exit status 2, no traceback,
raised before any work and without touching anything already saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memlm.cli import main as memlm_main
from memlm.eval import cli as probe_cli
from memlm.models import MemLMConfig, MemLMForCausalLM
from memlm.models.convert.cli import main as convert_main


def error_line(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    """The single error line ``prog`` wrote to stderr (asserting there is exactly one)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny memlm checkpoint (with a tokenizer file, which ``convert`` copies)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    MemLMForCausalLM(MemLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4)).save_pretrained(path)
    (path / "tokenizer_config.json").write_text("{}")
    return path


# ---------------------------------------------------------------- memlm convert

def test_convert_bad_dtype(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert convert_main([str(checkpoint), str(tmp_path / "out"), "--dtype", "int8"]) == 2
    line = error_line(capsys, "memlm convert")
    assert "--dtype" in line and "'int8'" in line and "float32" in line and "bfloat16" in line
    assert not (tmp_path / "out").exists()


def test_convert_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert memlm_main(["convert", str(tmp_path / "nosuch"), str(tmp_path / "out")]) == 2
    line = error_line(capsys, "memlm convert")
    assert "nosuch" in line and "neither a checkpoint directory nor a Hub id" in line
    assert not (tmp_path / "out").exists()


def test_convert_unknown_model_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "nosuch_arch"}))
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    line = error_line(capsys, "memlm convert")
    assert "model_type 'nosuch_arch'" in line and "'memlm'" in line and "'gla'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", [".", "./", "sub", "sub/deeper"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_convert_refuses_target_inside_source(checkpoint: Path, target: str, overwrite: bool,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``memlm convert X X`` (or DST inside SRC) is refused before anything is written, even with
    ``--overwrite``: it used to rewrite the source in place and then fail with SameFileError."""
    before = snapshot(checkpoint)
    argv = [str(checkpoint), f"{checkpoint}/{target}", *(["--overwrite"] if overwrite else [])]
    assert convert_main(argv) == 2
    line = error_line(capsys, "memlm convert")
    assert "destination" in line and "source" in line and str(checkpoint) in line
    assert snapshot(checkpoint) == before  # same files, byte-identical, no sub-folder created


def test_convert_refuses_non_empty_target(checkpoint: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "precious"}')
    assert convert_main([str(checkpoint), str(out)]) == 2
    line = error_line(capsys, "memlm convert")
    assert str(out) in line and "not empty" in line and "--overwrite" in line
    assert snapshot(out) == {"config.json": b'{"model_type": "precious"}'}
    # --overwrite is the explicit way to write into it
    assert convert_main([str(checkpoint), str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "memlm"
    assert (out / "tokenizer_config.json").exists()


def test_convert_into_empty_existing_folder(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    assert convert_main([str(checkpoint), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---------------------------------------------------------------- memlm eval-harness

def test_eval_harness_unknown_task(checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown task names are reported, with close matches, before the model is loaded. (The test
    indexes only memlm's own task folder: lm-eval's full index of ~15k tasks takes 10-20 s.)"""
    from lm_eval.tasks import TaskManager

    from memlm.eval import harness

    def memlm_tasks_only(include_paths: list[str] | None = None) -> TaskManager:
        return TaskManager(include_path=[str(harness.TASKS_DIR), *(include_paths or [])], include_defaults=False)

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the task names were checked")

    monkeypatch.setattr(harness, "task_manager", memlm_tasks_only)
    monkeypatch.setattr(harness.MemLMLM, "__init__", no_model)
    argv = ["--model", str(checkpoint), "--tasks", "memlm_recal,based_drop,nosuch_xyz"]
    assert memlm_main(["eval-harness", *argv]) == 2
    line = error_line(capsys, "memlm eval-harness")
    assert ("unknown lm-eval task(s): 'memlm_recal' (close matches: 'memlm_recall'), "
            "'nosuch_xyz' (no close match)") in line
    assert "based_drop" not in line  # a valid name is not reported


# ---------------------------------------------------------------- memlm probe

def test_probe_mqar_requires_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Without ``--config`` the built-in defaults used to start a ~17 h sweep silently."""
    from memlm.eval.mqar import sweep as mqar_sweep

    def no_sweep(*args: object, **kwargs: object) -> None:
        raise AssertionError("the default sweep started")

    monkeypatch.setattr(mqar_sweep, "run_mqar_sweep", no_sweep)
    assert probe_cli.main(["mqar", "--out", str(tmp_path)]) == 2
    line = error_line(capsys, "memlm probe mqar")
    assert "--config" in line and "mqar_smoke.yaml" in line and "mqar_cpu.yaml" in line
    assert probe_cli.main(["mqar", "--out", str(tmp_path), "epochs=2"]) == 2  # overrides alone: same
    assert "--config" in error_line(capsys, "memlm probe mqar")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- memlm

def test_memlm_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert memlm_main(["nosuch"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith("usage: memlm <command>")
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("memlm: error: ") and "'nosuch'" in last and "convert" in last
    assert memlm_main([]) == 2
    assert "memlm: error: " in capsys.readouterr().err


def test_memlm_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert memlm_main(["-h"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: memlm <command>") and "eval-harness" in captured.out
    assert captured.err == ""
