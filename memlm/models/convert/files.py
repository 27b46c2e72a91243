"""Reading a checkpoint: a local directory or a Hugging Face Hub id, its ``config.json`` and tensors
(``model.safetensors``, sharded safetensors with an index, or ``pytorch_model.bin``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]


def resolve(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory, or the Hub snapshot of ``owner/name`` (downloaded on demand)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_id)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ValueError(f"{name!r} is neither a checkpoint directory nor a Hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS))


def _special_floats(obj: dict[str, Any]) -> Any:
    """transformers ≥ 5 writes non-finite floats as ``{"__float__": "Infinity"}``: read them back."""
    return float(obj["__float__"]) if set(obj) == {"__float__"} else obj


def read_config(root: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory."""
    file = root / "config.json"
    if not file.is_file():
        raise ValueError(f"{root} has no config.json")
    return json.loads(file.read_text(), object_hook=_special_floats)


def _shards(root: Path, index: str) -> list[Path]:
    weight_map = json.loads((root / index).read_text())["weight_map"]
    return [root / name for name in sorted(set(weight_map.values()))]


def read_tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``root``, by name, on the CPU in its stored dtype."""
    if (root / "model.safetensors").is_file():
        return load_file(root / "model.safetensors")
    if (root / "model.safetensors.index.json").is_file():
        shards = _shards(root, "model.safetensors.index.json")
        return {k: v for shard in shards for k, v in load_file(shard).items()}
    if (root / "pytorch_model.bin").is_file():
        bins = [root / "pytorch_model.bin"]
    elif (root / "pytorch_model.bin.index.json").is_file():
        bins = _shards(root, "pytorch_model.bin.index.json")
    else:
        found = sorted(p.name for p in root.iterdir())
        raise ValueError(f"{root} has no model.safetensors, sharded safetensors or pytorch_model.bin; "
                         f"found {found}")
    return {k: v for file in bins for k, v in torch.load(file, map_location="cpu", weights_only=True).items()}
