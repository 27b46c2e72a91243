"""Rotary position embedding (RoFormer, Su et al. 2021), rotate-half layout as in Llama/fla.

The cos/sin table of each (θ, head dim, device) is computed once and grown by doubling; a call slices it
(consecutive positions, e.g. one decoding step) or gathers it (packed documents), and one lookup serves both
q and k.
"""

from __future__ import annotations

import torch

from memlm.layers.packing import document_positions

_TABLES: dict[tuple[float, int, torch.device], torch.Tensor] = {}


def _table(length: int, dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """``[2, N, D]`` float32 cos and sin at positions ``0 … N−1`` (``N ≥ length``)."""
    key = (float(theta), dim, torch.device(device))
    table = _TABLES.get(key)
    if table is None or table.shape[1] < length:
        size = max(256, 1 << (max(length, 1) - 1).bit_length())
        with torch.inference_mode(False):  # a table made while decoding also serves later training passes
            inv_freq = theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
            angles = torch.arange(size, device=device).to(torch.float32)[:, None] * inv_freq[None, :]  # [N, D/2]
            table = torch.stack([angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)])
        _TABLES[key] = table
    return table


def rotation(seqlen: int, cu_seqlens: torch.Tensor | None, offset: int, dim: int, theta: float,
             device: torch.device) -> torch.Tensor:
    """``[2, T, D]`` cos and sin at the positions of :func:`document_positions` (``offset + t``, or restarting
    at each packed document)."""
    table = _table(offset + seqlen, dim, theta, device)
    if cu_seqlens is None:
        return table[:, offset:offset + seqlen]
    return table[:, document_positions(seqlen, cu_seqlens, 0, device)]


def rotation_at(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """``[2, *positions.shape, D]`` cos and sin at arbitrary integer ``positions`` (``[T]``, or ``[B, T]``
    for rows at their own positions), one table gather."""
    table = _table(int(positions.max()) + 1 if positions.numel() else 0, dim, theta, positions.device)
    return table[:, positions.long()]


def apply_rotary(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` by angle ``p · θ^{-2i/D}`` at each position: pairs are (i, i + D/2),
    ``x' = x ⊙ cos + rotate_half(x) ⊙ sin`` (``cos_sin`` ``[2, T, D]`` or ``[2, B, T, D]``)."""
    cos, sin = cos_sin[0].unsqueeze(-2), cos_sin[1].unsqueeze(-2)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` at arbitrary integer ``positions`` ``[T]``."""
    return apply_rotary(x, rotation_at(positions.to(x.device), x.shape[-1], theta))
