"""Loading the model and tokenizer a probe runs on.

``--model`` is a checkpoint folder, a Hugging Face hub id (any causal LM: memlm checkpoints,
converted flash-linear-attention ones, plain transformers models), a model config file
(``.yaml``/``.json`` holding ``MemLMConfig`` fields, optionally under a ``model:`` key, and optionally
a ``preset`` to start from) or a preset name (:func:`memlm.load_preset`, e.g. ``attention_tiny``);
a config file or a preset builds a randomly initialised memlm model, e.g. for MQAR or smoke tests.
The tokenizer comes from :func:`memlm.models.convert.tokenizer.load_tokenizer` (``fallback=False``:
a probe reports a model without a tokenizer rather than guess one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def resolve_device(device: str | None) -> torch.device:
    """``auto``/None is CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def is_preset(spec: str | Path) -> bool:
    """``spec`` names a preset (and no local path)."""
    from memlm.presets import resolve_name

    if Path(spec).exists():
        return False
    try:
        resolve_name(str(spec))
    except ValueError:
        return False
    return True


def is_model_config(spec: str | Path) -> bool:
    """``spec`` builds a randomly initialised model: a config file or a preset name (no tokenizer)."""
    path = Path(spec)
    return (path.suffix in _CONFIG_SUFFIXES and path.name != "config.json") or is_preset(spec)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping; the ``model`` sub-mapping when there is one, a ``preset`` in it
    expanded into the preset's fields (which the file's fields override)."""
    p = Path(path)
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
    else:
        from memlm.config_yaml import read_yaml

        data = read_yaml(p)
    if not isinstance(data, dict):
        raise ValueError(f"model config {p} must hold a mapping of MemLMConfig fields, "
                         f"got {type(data).__name__}")
    from memlm.presets import expand_preset

    return expand_preset(data.get("model", data))


def load_model(spec: str | Path, device: str | None = "auto", dtype: str | torch.dtype = "float32",
               config_defaults: dict[str, Any] | None = None) -> Any:
    """A causal LM in eval mode on ``device`` (see module docstring for ``spec``);
    ``config_defaults`` fill the fields a model config file leaves out (e.g. ``vocab_size``)."""
    from transformers import AutoModelForCausalLM

    from memlm.models import MemLMConfig, MemLMForCausalLM  # importing memlm registers it with Auto*

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    path = Path(spec)
    if (path.is_file() and path.suffix in _CONFIG_SUFFIXES and path.name != "config.json") or is_preset(spec):
        from memlm.presets import preset_fields

        fields = read_config_file(path) if path.is_file() else preset_fields(str(spec))
        model = MemLMForCausalLM(MemLMConfig(**{**(config_defaults or {}), **fields}))
        model = model.to(device=dev, dtype=dt)
    else:
        source = path.parent if path.name == "config.json" else spec
        try:
            model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dt).to(dev)
        except OSError as err:
            missing = not path.exists()
            where = "a local path that does not exist, nor a reachable hub id" if missing else "not loadable"
            raise ValueError(f"--model {str(spec)!r} is {where}: {str(err).splitlines()[0]}") from None
    return model.eval()
