"""Test-only references written independently of memlm (importable from every test: pytest
``pythonpath = ["tests"]``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def memory_fn(x: torch.Tensor, weights: list[torch.Tensor], residual: bool, norm: bool) -> torch.Tensor:
    """Titans memory ``M(x)`` (row vectors): GELU between layers, affine-free LayerNorm, residual."""
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = F.gelu(h)
    if norm:
        h = F.layer_norm(h, h.shape[-1:])
    return x + h if residual else h
