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
    ``W_O (norm(y) ⊙ σ(norm(m)))``. The output projection ``W_O`` (Titans §4.4: normalisation and
    gating before the final output projection) keeps the mixer's output at the scale of the other
    mixers' projections; without it the normalised gate adds an O(1) signal to the residual stream
    at initialisation and the tiny MAC/MAG models barely trained."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.y_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.m_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.y_norm(y) * torch.sigmoid(self.m_norm(m)))
