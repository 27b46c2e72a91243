"""Per-step reference of the first-order linear scan ``h_t = a_t ⊙ h_{t−1} + x_t``."""

from __future__ import annotations

import torch


def naive_linear_scan(
    a: torch.Tensor, x: torch.Tensor, initial: torch.Tensor | None = None, reverse: bool = False
) -> torch.Tensor:
    """``h_t = a_t ⊙ h_{t−1} + x_t`` along dim 1 from ``h_0 = initial`` (zeros if None); with
    ``reverse`` the recurrence runs backwards, ``h_t = a_t ⊙ h_{t+1} + x_t`` from ``h_{T+1}``.
    A plain loop, differentiable by autograd; ``a`` and ``x`` are ``[B, T, *]``, initial ``[B, *]``.
    """
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    h = torch.zeros_like(x[:, 0]) if initial is None else initial
    out = [None] * x.shape[1]
    for t in steps:
        h = a[:, t] * h + x[:, t]
        out[t] = h
    return torch.stack(out, dim=1)
