"""Checkpoints: ``accelerator.save_state`` for exact resume, an HF export for release.

Every write goes to ``<name>.tmp`` and is renamed when complete, so a run killed mid-save never
leaves a half-written checkpoint under a real name and never overwrites a good one. Each
checkpoint records the model config it was trained with; resuming under a different one stops
with the differing fields named.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

MODEL_CONFIG_FILE = "memlm_model.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupted, incomplete or from another configuration."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp`` leftovers of killed saves are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.suffix != ".tmp"]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def save(accelerator: Accelerator, run_dir: Path, step: int, model_config: dict[str, Any], keep_last: int) -> Path:
    final = checkpoint_dir(run_dir) / f"{PREFIX}{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # save_state returns without a barrier: every process writes its own RNG file, and renaming the
    # folder before they finish loses that file and lets a late process re-create ``.tmp``
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(model_config, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Accelerator, path: Path, model_config: dict[str, Any]) -> None:
    """Restore model, optimizer, scheduler, RNG and registered objects from ``path``."""
    saved_file = path / MODEL_CONFIG_FILE
    if not saved_file.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete: {MODEL_CONFIG_FILE} is missing")
    try:
        saved = json.loads(saved_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path}: {MODEL_CONFIG_FILE} is corrupted ({err})") from None
    diff = {k: (saved.get(k), model_config.get(k)) for k in sorted(set(saved) | set(model_config))
            if saved.get(k) != model_config.get(k)}
    if diff:
        lines = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"checkpoint {path} was trained with a different model config: {lines}")
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # safetensors / torch.load / pickle errors all mean the same to the user
        raise CheckpointError(
            f"checkpoint {path} is corrupted or unreadable ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None


def export(model: Any, tokenizer: Any, dst: Path) -> None:
    """Write ``save_pretrained`` model + tokenizer to ``dst`` atomically (``dst.tmp`` then rename)."""
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
