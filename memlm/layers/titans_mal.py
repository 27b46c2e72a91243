"""Titans MAL, memory as a layer (arXiv 2501.00663 §4.3, eqs. 29–31): the neural memory, then
sliding-window attention (with persistent memory) over its output: ``o = SWA*(M(x))``."""

from __future__ import annotations

from typing import Any

import torch

from memlm.layers.composite import MemoryAttentionOptions
from memlm.layers.mixer import Mixer
from memlm.layers.registry import build_mixer, register_mixer


@register_mixer("titans_mal")
class MemoryAsLayer(Mixer):
    Options = MemoryAttentionOptions

    def __init__(self, hidden_size: int, config: Any, opts: MemoryAttentionOptions) -> None:
        super().__init__()
        self.memory = build_mixer(opts.memory, hidden_size, config, where="titans_mal.memory")
        self.attention = build_mixer(opts.attention, hidden_size, config, where="titans_mal.attention")

    def state_size(self, seq_len: int) -> int:
        return self.memory.state_size(seq_len) + self.attention.state_size(seq_len)

    def forward(
        self, x: torch.Tensor, state: Any | None = None, use_cache: bool = False, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any | None]:
        mem_state, attn_state = state if state is not None else (None, None)
        m, mem_state = self.memory(x, mem_state, use_cache, cu_seqlens)
        y, attn_state = self.attention(m, attn_state, use_cache, cu_seqlens)
        return y, ((mem_state, attn_state) if use_cache else None)
