"""Rotary position embedding (RoFormer, Su et al. 2021), rotate-half layout as in Llama/fla."""

from __future__ import annotations

import torch


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` by angle ``p · θ^{-2i/D}`` at position ``p`` (``positions`` ``[T]``).

    Pairs are (i, i + D/2): ``x' = x ⊙ cos + rotate_half(x) ⊙ sin``.
    """
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[None, :, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)

