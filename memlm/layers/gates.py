"""Data-dependent per-token gates of the deep-memory mixers (Titans §3.1, Miras §5).

A gate is ``f(x W + b)`` read from the mixer input: one value per head (Titans: θ_t, η_t, α_t), or
channel-wise, one value per memory output unit, from a rank-``r`` projection ``x W_down W_up``
(Miras §5: channel-wise η, α, δ from low-rank projections). Channel-wise gates have
``C = Σ_l d_l`` values per head, the output units of every memory layer (the kernel's layout).

Initialisation (``GateProjection.init_weights``, called by the model's init after the generic
``Linear`` init): both kinds of gate start with logits of the same spread, so that channel-wise gates
are as data-dependent at the start as per-head ones (with both low-rank factors at the model's
``N(0, σ²)`` they varied about 9× less: logit std 0.018 against 0.16 at hidden 64, rank 32).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class GateProjection(nn.Module):
    """Gate logits ``[B, T, H]`` (``channels=None``) or ``[B, T, H, C]`` from ``x: [B, T, hidden]``.

    Per head it is a single ``Linear(hidden, H)`` named ``proj``; channel-wise it is
    ``Linear(hidden, rank, bias=False)`` (``down``) then ``Linear(rank, H·C)`` (``proj``).

    Initial logit spread: for an input of unit RMS (``‖x‖² = hidden``) and weights ``W ~ N(0, σ²)``,
    a per-head logit ``x·w`` has variance ``σ²·hidden``. Channel-wise, ``h = x W_down`` with
    ``W_down ~ N(0, σ²)`` has entries of variance ``σ²·hidden``, and a logit ``h·u`` with
    ``u ~ N(0, s²)`` has variance ``rank·s²·σ²·hidden``; ``s = 1/√rank`` makes it ``σ²·hidden`` too.
    So ``init_weights`` keeps ``down`` at the model's ``N(0, σ²)`` and draws ``proj.weight`` from
    ``N(0, 1/rank)``: the logits (bias excluded) have std ``σ·√hidden`` in both cases. Biases are the
    mixer's to set (they choose each gate's starting point).
    """

    def __init__(self, hidden_size: int, num_heads: int, channels: int | None = None, rank: int = 32) -> None:
        super().__init__()
        self.num_heads, self.channels = num_heads, channels
        self.down = None if channels is None else nn.Linear(hidden_size, rank, bias=False)
        width = rank if channels is not None else hidden_size
        self.proj = nn.Linear(width, num_heads * (channels or 1))

    def init_weights(self, init: Any, std: float) -> None:
        """Channel-wise: ``down ~ N(0, std²)``, ``proj.weight ~ N(0, 1/rank)`` (see the class docstring).
        Per head nothing: ``proj`` keeps the model's generic ``Linear`` init ``N(0, std²)`` (run before
        this hook, children first), so per-head models draw the same numbers as before. Biases are left
        to the mixer. ``init`` is ``transformers.initialization`` (skips loaded tensors) or ``torch.nn.init``."""
        if self.down is not None:
            init.normal_(self.down.weight, mean=0.0, std=std)
            init.normal_(self.proj.weight, mean=0.0, std=1.0 / math.sqrt(self.down.out_features))

    @property
    def bias(self) -> torch.Tensor:
        """The logits' bias (its initial value sets the gate's starting point)."""
        return self.proj.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.down is None else self.down(x)
        logits = self.proj(h)
        return logits if self.channels is None else logits.unflatten(-1, (self.num_heads, self.channels))
