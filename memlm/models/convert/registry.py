"""The registry of foreign checkpoint formats, keyed by the ``model_type`` of their ``config.json``.

A :class:`Format` says how one family becomes a ``MemLMForCausalLM``: the family's config
defaults, the mixer spec of each non-attention layer, model-level config values, and a
state-dict transform (renames, tensors that move between modules). A new layout — as ``mom.py``'s
linear-moe-hub MoM checkpoints (``mom_gated_deltanet``, a fused ``mlp.gate_proj`` to split) —
joins with one :func:`register_format` call and needs nothing else here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Tensors = dict[str, torch.Tensor]
LayerSpec = Callable[[Mapping[str, Any], int], dict[str, Any]]
TensorTransform = Callable[[Mapping[str, Any], Tensors, list[dict[str, Any]]], Tensors]


def keep_tensors(config: Mapping[str, Any], tensors: Tensors, specs: list[dict[str, Any]]) -> Tensors:
    """The identity transform: the family's tensor names are memlm's already."""
    return tensors


@dataclass(frozen=True)
class Format:
    """How checkpoints of one foreign ``model_type`` map onto memlm.

    Attributes:
        model_type: the ``config.json`` ``model_type`` this format reads.
        defaults: the family's config defaults (values an older ``config.json`` may omit).
        layer_spec: ``(config, layer_index) -> mixer spec`` of a layer that is not attention.
        model_config: ``config -> MemLMConfig kwargs`` for the model-level values.
        tensors: ``(config, tensors, layer_specs) -> tensors`` renamed/regrouped into memlm names.
        legacy: regexes of tensors that older releases carry and no computation uses; they are
            dropped with a one-line warning instead of failing the load.
    """

    model_type: str
    defaults: Mapping[str, Any]
    layer_spec: LayerSpec
    model_config: Callable[[Mapping[str, Any]], dict[str, Any]]
    tensors: TensorTransform = keep_tensors
    legacy: tuple[str, ...] = field(default=())


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Make checkpoints whose ``config.json`` says ``model_type == fmt.model_type`` loadable."""
    if fmt.model_type in FORMATS and FORMATS[fmt.model_type] is not fmt:
        raise ValueError(f"checkpoint format {fmt.model_type!r} is already registered")
    FORMATS[fmt.model_type] = fmt
    return fmt


def get_format(model_type: Any) -> Format:
    """The registered format of ``model_type``, or ``ValueError`` naming the supported ones."""
    if model_type not in FORMATS:
        raise ValueError(f"unknown checkpoint model_type {model_type!r}; memlm reads 'memlm' and "
                         f"{sorted(FORMATS)}")
    return FORMATS[model_type]
