"""Titans MAL, memory as a layer (arXiv 2501.00663 §4.3, eqs. 29–31): the neural memory, then
sliding-window attention (with persistent memory) over its output: ``o = SWA*(M(x))``."""

from __future__ import annotations

from typing import Any

import torch

from memlm.layers.composite import MemoryAttentionMixer
from memlm.layers.registry import register_mixer


@register_mixer("titans_mal")
class MemoryAsLayer(MemoryAttentionMixer):
    def forward(
        self, x: torch.Tensor, state: Any | None = None, use_cache: bool = False, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any | None]:
        mem_state, attn_state = state if state is not None else (None, None)
        m, mem_state = self.memory(x, mem_state, use_cache, cu_seqlens)
        y, attn_state = self.attention(m, attn_state, use_cache, cu_seqlens)
        return y, ((mem_state, attn_state) if use_cache else None)
