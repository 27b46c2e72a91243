"""Vectorised PyTorch scan ``h_t = a_t ⊙ h_{t−1} + x_t`` (the CPU path), forward and backward.

Exact for any ``a`` (zeros and negative values included): it never divides by a cumulative
product and never goes to log space. Two levels of the log-depth doubling scan (Hillis &
Steele 1986): within chunks of ``CHUNK`` steps, pairs ``(A, X)`` compose as
``(A₂A₁, A₂X₁ + X₂)`` in log2(CHUNK) vectorised rounds; the chunk-end values then form a
shorter scan of the same kind, whose results are broadcast back with the in-chunk products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64


def _doubling(a: torch.Tensor, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive prefix composition along ``dim``: ``(∏_{j≤t} a_j, h_t)`` with ``h`` from zero."""
    n, step = a.shape[dim], 1
    while step < n:
        a_lo, x_lo = a.narrow(dim, 0, n - step), x.narrow(dim, 0, n - step)  # `step` positions back
        a_hi, x_hi = a.narrow(dim, step, n - step), x.narrow(dim, step, n - step)
        x = torch.cat([x.narrow(dim, 0, step), x_hi + a_hi * x_lo], dim)
        a = torch.cat([a.narrow(dim, 0, step), a_hi * a_lo], dim)
        step *= 2
    return a, x


def chunk_linear_scan(
    a: torch.Tensor, x: torch.Tensor, initial: torch.Tensor | None = None, reverse: bool = False
) -> torch.Tensor:
    """``h_t = a_t ⊙ h_{t−1} + x_t`` along dim 1 of ``[B, T, F]`` (``reverse``: from the end)."""
    if reverse:
        return chunk_linear_scan(a.flip(1), x.flip(1), initial).flip(1)
    if initial is not None:
        x = torch.cat([x[:, :1] + a[:, :1] * initial[:, None], x[:, 1:]], dim=1)
    B, T, F_ = x.shape
    C = min(CHUNK, T)
    pad = -T % C
    a_c = F.pad(a, (0, 0, 0, pad), value=1.0).view(B, -1, C, F_)
    x_c = F.pad(x, (0, 0, 0, pad)).view(B, -1, C, F_)
    prod, h = _doubling(a_c, x_c, dim=2)
    _, carry = _doubling(prod[:, :, -1], h[:, :, -1], dim=1)  # state at every chunk end
    carry = torch.cat([torch.zeros_like(carry[:, :1]), carry[:, :-1]], dim=1)
    return (h + prod * carry[:, :, None]).view(B, -1, F_)[:, :T]


def chunk_linear_scan_backward(
    a: torch.Tensor, h: torch.Tensor, initial: torch.Tensor | None, dh: torch.Tensor, reverse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the scan: ``dx_t = γ_t`` with ``γ_t = dh_t + a_{t+1} γ_{t+1}`` (the opposite
    scan), ``da_t = γ_t h_{t−1}``, ``d initial = a_1 γ_1`` (indices mirrored when ``reverse``).
    """
    if reverse:
        dx, da, dinit = chunk_linear_scan_backward(a.flip(1), h.flip(1), initial, dh.flip(1), False)
        return dx.flip(1), da.flip(1), dinit
    next_a = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
    dx = chunk_linear_scan(next_a, dh, reverse=True)
    h0 = torch.zeros_like(h[:, :1]) if initial is None else initial[:, None].to(h.dtype)
    da = dx * torch.cat([h0, h[:, :-1]], dim=1)
    return dx, da, a[:, 0] * dx[:, 0]
