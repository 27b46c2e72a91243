"""Gated Linear Attention (Yang et al. 2023, arXiv 2312.06635), fla ``GatedLinearAttention`` layout.

A data-dependent channel-wise decay from a low-rank projection (eq. 5 with fla's normaliser):

    log α_t = logσ(W_2 W_1 x_t + b) / gate_logit_normalizer      (optionally clamped below)
    S_t = diag(α_t) S_{t−1} + k_tᵀ v_t,   o_t = q_t S_t / √d_k,   y_t = o_proj(RMSNorm(o_t) ⊙ swish(g_t))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.layers.linear_common import (
    MixerCall,
    MultiHeadLinearAttention,
    MultiHeadOptions,
    check_positive,
    heads,
    repeat_heads,
)
from memlm.layers.registry import register_mixer


@register_mixer("gla")
class GatedLinearAttention(MultiHeadLinearAttention):
    @dataclass
    class Options(MultiHeadOptions):
        expand_k: float = 0.5
        gate_logit_normalizer: float = 16.0
        gate_low_rank_dim: int = 16
        clamp_min: float | None = None  # lower clamp of the log-decay

        def validate(self) -> None:
            super().validate()
            check_positive(gate_logit_normalizer=self.gate_logit_normalizer,
                           gate_low_rank_dim=self.gate_low_rank_dim)
            if self.clamp_min is not None and self.clamp_min > 0:
                raise ValueError(f"clamp_min must be <= 0 (a log-decay) or null, got {self.clamp_min}")

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__(hidden_size, config, opts)
        self.gate_logit_normalizer, self.clamp_min = opts.gate_logit_normalizer, opts.clamp_min
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, opts.gate_low_rank_dim, bias=False),
                                     nn.Linear(opts.gate_low_rank_dim, self.k_proj.out_features, bias=True))

    def decay(
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, call: MixerCall
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        gk = F.logsigmoid(heads(self.gk_proj(x), self.head_k_dim).float()) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk = gk.clamp_min(self.clamp_min)
        return q, k, {"gk": repeat_heads(gk, self.groups)}
