"""SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate(x)) ⊙ up(x))``; names as in Llama/fla."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_intermediate_size(hidden_size: int) -> int:
    """``8/3 · d`` rounded up to a multiple of 256 (Llama / fla ``hidden_ratio=4`` rule)."""
    return 256 * ((int(hidden_size * 8 / 3) + 255) // 256)


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
