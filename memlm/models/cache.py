"""``MemLMCache``: the per-layer decoding state ``generate()`` carries between steps.

Each entry is whatever that layer's mixer returned as its state (a KV cache for attention,
the recurrent state for memories); the cache only counts tokens and reorders beams.
"""

from __future__ import annotations

from typing import Any

import torch

from memlm.layers.mixer import select_rows


class MemLMCache:
    is_compileable = False

    def __init__(self, num_layers: int) -> None:
        self.states: list[Any | None] = [None] * num_layers
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows of every layer's state (beam search)."""
        self.states = [select_rows(s, beam_idx) for s in self.states]
