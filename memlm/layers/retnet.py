"""Multi-scale retention (RetNet, Sun et al. 2023, arXiv 2307.08621), fla ``MultiScaleRetention`` layout.

Fixed per-head decays ``γ_h = 1 − 2^{−5−h}`` (eq. 8) and rotary-rotated q, k (the paper's xPos
without its scaling, as fla):

    S_t = γ_h S_{t−1} + k_tᵀ v_t,   o_t = q_t S_t / √d_k,   y_t = o_proj(RMSNorm(o_t) ⊙ swish(g_t))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memlm.layers.linear_common import MixerCall, MultiHeadLinearAttention, MultiHeadOptions
from memlm.layers.registry import register_mixer
from memlm.layers.rotary import apply_rotary, rotation, rotation_at

ROPE_THETA = 10000.0


def retention_log_decay(num_heads: int, device: torch.device) -> torch.Tensor:
    """``log γ_h = log(1 − 2^{−5−h})`` for h = 0 … H−1."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float32, device=device))))


@register_mixer("retnet")
class MultiScaleRetention(MultiHeadLinearAttention):
    @dataclass
    class Options(MultiHeadOptions):
        expand_v: float = 2.0

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__(hidden_size, config, opts)
        if self.head_k_dim % 2:
            raise ValueError(f"retnet: the key head size {self.head_k_dim} must be even (rotary embeddings)")

    def decay(
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, call: MixerCall
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if isinstance(call.seen, torch.Tensor):  # rows at their own positions (a padded batch)
            positions = call.seen.to(x.device)[:, None] + torch.arange(x.shape[1], device=x.device)
            cos_sin = rotation_at(positions, self.head_k_dim, ROPE_THETA)
        else:
            cos_sin = rotation(x.shape[1], call.cu_seqlens, call.seen, self.head_k_dim, ROPE_THETA, x.device)
        g = retention_log_decay(self.num_heads, x.device).expand(*x.shape[:2], -1).contiguous()
        return apply_rotary(q, cos_sin), apply_rotary(k, cos_sin), {"g": g}
