"""Gated RMSNorm (Mamba2 / fla ``FusedRMSNormGated``): ``RMSNorm(x) ⊙ w ⊙ act(g)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, activation: str = "swish") -> None:
        super().__init__()
        if activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(f"GatedRMSNorm activation must be 'swish', 'silu' or 'sigmoid', got {activation!r}")
        self.eps, self.activation = eps, activation
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        act = torch.sigmoid(gate.float()) if self.activation == "sigmoid" else F.silu(gate.float())
        return (normed * act).to(x.dtype)
