"""``from_pretrained`` for memlm checkpoints and for every registered foreign format, and
``convert_checkpoint`` (what ``memlm convert SRC DST`` runs)."""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from memlm.models.configuration_memlm import MemLMConfig
from memlm.models.convert.files import read_config, read_tensors, resolve
from memlm.models.convert.fla import attention_layers
from memlm.models.convert.registry import Format, Tensors, get_format
from memlm.models.modeling_memlm import MemLMForCausalLM

# Keys every HF config carries that say nothing about the architecture.
GENERIC_KEYS = frozenset(PretrainedConfig().to_dict()) | {"torch_dtype", "auto_map", "use_return_dict"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
MAX_LISTED = 12


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", … ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def convert_config(config: Mapping[str, Any]) -> tuple[Format, dict[str, Any], MemLMConfig]:
    """A foreign ``config.json`` → ``(format, config with the family's defaults, MemLMConfig)``.

    Every layer gets an explicit mixer spec: attention where the hybrid ``attn`` entry lists it,
    the family's mixer elsewhere. Keys that are neither the family's nor HF-generic are reported.
    """
    fmt = get_format(config.get("model_type"))
    merged = {**fmt.defaults, **config}
    unknown = sorted(set(config) - set(fmt.defaults) - GENERIC_KEYS)
    if unknown:
        warnings.warn(f"{fmt.model_type} config.json: ignored keys {unknown}", stacklevel=3)
    attention = attention_layers(merged)
    specs = [attention.get(i) or fmt.layer_spec(merged, i) for i in range(merged["num_hidden_layers"])]
    return fmt, merged, MemLMConfig(**fmt.model_config(merged), layers=specs)


def load_converted(model: MemLMForCausalLM, tensors: Tensors, legacy: tuple[str, ...] = ()) -> None:
    """Copy ``tensors`` (memlm names) into ``model``; every difference is one ``ValueError``.

    Unexpected tensors matching a ``legacy`` pattern are dropped with a one-line warning; any other
    unexpected, missing or wrongly shaped tensor is listed in the error.
    """
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    unexpected = sorted(set(tensors) - set(expected))
    dropped = [k for k in unexpected if any(re.search(p, k) for p in legacy)]
    if dropped:
        warnings.warn(f"dropped {len(dropped)} legacy tensor(s) that no computation uses: "
                      f"{_listing(dropped)}", stacklevel=3)
    unexpected = [k for k in unexpected if k not in dropped]
    missing = sorted(set(expected) - set(tensors))
    mismatched = [f"{k} {list(tensors[k].shape)} (model: {list(t.shape)})"
                  for k, t in expected.items() if k in tensors and tensors[k].shape != t.shape]
    found = {"missing tensors": missing, "unexpected tensors": unexpected, "shape mismatches": mismatched}
    problems = [f"{what} ({len(names)}): {_listing(names)}" for what, names in found.items() if names]
    if problems:
        raise ValueError("the checkpoint does not fit the converted model: " + "; ".join(problems))
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])


def _dtype(dtype: torch.dtype | str | None, config: Mapping[str, Any]) -> torch.dtype:
    """``None`` → float32; ``"auto"`` → the checkpoint's stored dtype; a name → that dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (config.get("torch_dtype") or config.get("dtype") or "float32") if dtype == "auto" else dtype
    value = getattr(torch, name or "float32", None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, its name, 'auto' or None; got {dtype!r}")
    return value


def from_pretrained(
    path_or_id: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
) -> MemLMForCausalLM:
    """Load a checkpoint directory or Hub id as a ``MemLMForCausalLM`` that runs on any device.

    ``model_type`` "memlm" loads as saved; a registered foreign format (fla's ``gla``,
    ``delta_net``, ``gated_deltanet``, ``hgrn``, ``hgrn2``, ``retnet``, ``mamba2``, ``mom``,
    ``transformer``, with or without a hybrid ``attn``; linear-moe-hub's ``mom_gated_deltanet``) is
    converted on load.
    ``dtype``: None (float32), ``"auto"`` (as stored) or a dtype / its name.
    """
    root = resolve(path_or_id, revision)
    config = read_config(root)
    torch_dtype = _dtype(dtype, config)
    if config.get("model_type") == MemLMConfig.model_type:
        model = MemLMForCausalLM.from_pretrained(root, dtype=torch_dtype)
    else:
        fmt, merged, memlm_config = convert_config(config)
        model = MemLMForCausalLM(memlm_config)
        specs = memlm_config.layer_specs()
        load_converted(model, fmt.tensors(merged, read_tensors(root), specs), fmt.legacy)
        model = model.to(torch_dtype)
    return model.to(device).eval() if device is not None else model.eval()


def convert_checkpoint(
    source: str | Path, target: str | Path, *, dtype: torch.dtype | str | None = None
) -> MemLMForCausalLM:
    """Write ``source`` (any format :func:`from_pretrained` reads) to ``target`` in memlm's format,
    with the source's tokenizer files. Returns the converted model."""
    model = from_pretrained(source, dtype=dtype)
    target = Path(target)
    model.save_pretrained(target)
    root = resolve(source)
    for name in TOKENIZER_FILES:
        if (root / name).is_file():
            shutil.copy2(root / name, target / name)
    return model
