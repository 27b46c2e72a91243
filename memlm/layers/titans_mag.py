"""Titans MAG, memory as a gate (arXiv 2501.00663 §4.2, eqs. 26–28): sliding-window attention
(with persistent memory) and the neural memory read the same input in parallel;
``o = W_O(y_attn ⊙ σ(norm(y_mem)))``, or the paper's ``W_O(norm(y_attn) ⊙ σ(norm(y_mem)))`` with
``normalize_attention`` (the gate: ``layers/norm.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memlm.layers.composite import MemoryAttentionMixer, MemoryAttentionOptions
from memlm.layers.norm import NormalizedSigmoidGate
from memlm.layers.registry import register_mixer


@register_mixer("titans_mag")
class MemoryAsGate(MemoryAttentionMixer):
    @dataclass
    class Options(MemoryAttentionOptions):
        normalize_attention: bool = False  # the paper's gate: RMS-normalise the attention branch too

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__(hidden_size, config, opts)
        self.gate = NormalizedSigmoidGate(hidden_size, eps=config.norm_eps, normalize_y=opts.normalize_attention)

    def forward(
        self, x: torch.Tensor, state: Any | None = None, use_cache: bool = False, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any | None]:
        mem_state, attn_state = state if state is not None else (None, None)
        y, attn_state = self.attention(x, attn_state, use_cache, cu_seqlens)
        m, mem_state = self.memory(x, mem_state, use_cache, cu_seqlens)
        return self.gate(y, m), ((mem_state, attn_state) if use_cache else None)
