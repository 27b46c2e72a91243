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


class NormalizedSigmoidGate(nn.Module):
    """Titans' ``y ⊗ m`` (§4.2): both branches RMS-normalised with learnable vector weights, then
    ``norm(y) ⊙ σ(norm(m))``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.y_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.m_norm = nn.RMSNorm(hidden_size, eps=eps)

    def forward(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.y_norm(y) * torch.sigmoid(self.m_norm(m))
