"""Checkpoints: ``accelerator.save_state`` for exact resume, an HF export for release.

Every write goes to ``<name>.tmp`` and is renamed when complete, so a run killed mid-save never
leaves a half-written checkpoint under a real name and never overwrites a good one. Each
checkpoint records the model config it was trained with; resuming under a different one stops
with the differing fields named.

Checkpoints verify themselves: ``manifest.json``, written last (and atomically), lists every
other file with its size and sha256. :func:`verify` names the first file that is missing,
truncated or changed; :func:`newest_verified` walks back from the newest checkpoint to the
newest one that verifies, setting aside (``<name>.corrupt``) the ones that do not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

MODEL_CONFIG_FILE = "memlm_model.json"
SETUP_FILE = "memlm_setup.json"  # what else a resume must match: seq_len, batch, processes
MANIFEST = "manifest.json"
PREFIX = "step_"
_NAME = re.compile(rf"{PREFIX}(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupted, incomplete or from another configuration."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints under their final names, oldest first (``.tmp`` leftovers of killed saves and
    ``.corrupt`` ones set aside are not listed)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """``folder/manifest.json``: size and sha256 of every other file, written last and atomically."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp")}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


def verify(folder: Path) -> None:
    """Raise :class:`CheckpointError` naming the first file of ``folder`` that its manifest does
    not vouch for: manifest missing or unreadable, a file missing, truncated or changed."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST} (a save that did not finish, or a "
                              "checkpoint of an older memlm): it cannot be verified") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is corrupted ({err})") from None
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"checkpoint {folder}: {name} has {size} bytes, the manifest says {want['bytes']} "
                                  "(truncated or overwritten)")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: {name} does not match its sha256 in the manifest "
                                  "(the data changed after it was saved)")


def newest_verified(run_dir: Path) -> tuple[Path, list[str]]:
    """The newest checkpoint of ``run_dir`` that verifies, and why each newer one failed; if none
    verifies, raise :class:`CheckpointError` listing every reason."""
    reasons = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify(path)
        except CheckpointError as err:
            reasons.append(str(err))
            continue
        return path, reasons
    raise CheckpointError("no checkpoint verifies: " + "; ".join(reasons))


def set_aside(run_dir: Path, keep: Path) -> None:
    """Rename the checkpoints newer than ``keep`` to ``<name>.corrupt`` so that no later save or
    pruning touches them (called on the main process after every process chose ``keep``)."""
    for path in list_checkpoints(run_dir):
        if int(path.name[len(PREFIX):]) > int(keep.name[len(PREFIX):]):
            target = path.with_name(path.name + ".corrupt")
            if target.exists():
                shutil.rmtree(target)
            os.replace(path, target)


def save(accelerator: Accelerator, run_dir: Path, step: int, model_config: dict[str, Any], setup: dict[str, Any],
         keep_last: int) -> Path:
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
        (tmp / SETUP_FILE).write_text(json.dumps(setup, indent=2, sort_keys=True))
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str) -> list[str]:
    return [f"{prefix}{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def check_compatible(path: Path, model_config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Stop, naming every differing field, unless ``path`` (verified) was trained with this model
    config and this setup (sequence length, micro-batch size, accumulation, process count)."""
    diff = _differences(json.loads((path / MODEL_CONFIG_FILE).read_text()), model_config, "model.")
    diff += _differences(json.loads((path / SETUP_FILE).read_text()), setup, "")
    if diff:
        raise CheckpointError(f"checkpoint {path} was trained with a different configuration: {', '.join(diff)}")


def load(accelerator: Accelerator, path: Path) -> None:
    """Restore model, optimizer, scheduler, RNG and registered objects from ``path`` (verified
    and checked with :func:`check_compatible` first)."""
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # safetensors / torch.load / pickle errors all mean the same to the user
        raise CheckpointError(
            f"checkpoint {path} is corrupted or unreadable ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
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
