"""Titans MAL, memory as a layer (arXiv 2501.00663 §4.3, eqs. 29–31): the neural memory, then
sliding-window attention (with persistent memory) over its output: ``o = SWA*(norm(M(x)))``.

The RMSNorm is the attention sub-layer's pre-norm: the memory's output projection is initialised
small, so without it the attention would start from near-zero queries and keys."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memlm.layers.composite import MemoryAttentionMixer, MemoryAttentionOptions
from memlm.layers.registry import register_mixer


@register_mixer("titans_mal")
class MemoryAsLayer(MemoryAttentionMixer):
    def __init__(self, hidden_size: int, config: Any, opts: MemoryAttentionOptions) -> None:
        super().__init__(hidden_size, config, opts)
        self.attn_norm = nn.RMSNorm(hidden_size, eps=config.norm_eps)

    def forward(
        self, x: torch.Tensor, state: Any | None = None, use_cache: bool = False, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any | None]:
        mem_state, attn_state = state if state is not None else (None, None)
        m, mem_state = self.memory(x, mem_state, use_cache, cu_seqlens)
        y, attn_state = self.attention(self.attn_norm(m), attn_state, use_cache, cu_seqlens)
        return y, ((mem_state, attn_state) if use_cache else None)
