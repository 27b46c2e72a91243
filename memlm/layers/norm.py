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
    """Titans' ``y ⊗ m`` (§4.2): the memory branch, RMS-normalised with a learnable vector weight,
    gates the other branch through a sigmoid, then the output projection (§4.4: normalisation and
    gating before the final output projection): ``W_O (y ⊙ σ(norm(m)))``.

    The paper normalises ``y`` as well (``normalize_y``: ``W_O (norm(y) ⊙ σ(norm(m)))``). Off by default:
    the attention output starts near zero and the norm divides its gradient by that, so in a tiny MAG
    language model the normalised form starts with a far larger gradient norm and ends at a higher
    validation loss. On MQAR the normalised form is the one whose memory branch learns: with ``y``
    unnormalised the memory's gradient is scaled by the small ``y``. The figures of both: BENCHMARKS.md §6
    (claim 10). The output projection keeps
    the mixer's output at the scale of the other mixers' projections; without it the gate added an O(1)
    signal to the residual stream at initialisation."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, normalize_y: bool = False) -> None:
        super().__init__()
        self.y_norm = nn.RMSNorm(hidden_size, eps=eps) if normalize_y else None
        self.m_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if self.y_norm is not None:
            y = self.y_norm(y)
        return self.o_proj(y * torch.sigmoid(self.m_norm(m)))
