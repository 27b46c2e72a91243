"""Data-dependent per-token gates of the deep-memory mixers (Titans §3.1, Miras §5).

A gate is ``f(x W + b)`` read from the mixer input: one value per head (Titans: θ_t, η_t, α_t), or
channel-wise, one value per memory output unit, from a rank-``r`` projection ``x W_down W_up``
(Miras §5: channel-wise η, α, δ from low-rank projections). Channel-wise gates have
``C = Σ_l d_l`` values per head, the output units of every memory layer (the kernel's layout).
"""

from __future__ import annotations

import torch
from torch import nn


class GateProjection(nn.Module):
    """Gate logits ``[B, T, H]`` (``channels=None``) or ``[B, T, H, C]`` from ``x: [B, T, hidden]``.

    Per head it is a single ``Linear(hidden, H)`` named ``proj``; channel-wise it is
    ``Linear(hidden, rank, bias=False)`` (``down``) then ``Linear(rank, H·C)`` (``proj``).
    """

    def __init__(self, hidden_size: int, num_heads: int, channels: int | None = None, rank: int = 32) -> None:
        super().__init__()
        self.num_heads, self.channels = num_heads, channels
        self.down = None if channels is None else nn.Linear(hidden_size, rank, bias=False)
        width = rank if channels is not None else hidden_size
        self.proj = nn.Linear(width, num_heads * (channels or 1))

    @property
    def bias(self) -> torch.Tensor:
        """The logits' bias (its initial value sets the gate's starting point)."""
        return self.proj.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.down is None else self.down(x)
        logits = self.proj(h)
        return logits if self.channels is None else logits.unflatten(-1, (self.num_heads, self.channels))
