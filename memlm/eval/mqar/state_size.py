"""Recurrent state size: the number of elements one sequence carries between tokens.

This is the x-axis of the Zoology / Based recall-vs-memory figures (Arora et al. 2024,
"Simple linear attention language models balance the recall-throughput tradeoff", Fig. 2):
for attention it is the KV cache at the evaluated length, ``2 · layers · kv_heads · head_dim · T``
(``min(T, window)`` for sliding windows); for a recurrent mixer it is its fixed state.
"""

from __future__ import annotations

from typing import Any


def recurrent_state_size(model: Any, seq_len: int) -> int:
    """State elements per sequence after ``seq_len`` tokens, summed over layers.

    memlm models answer themselves (``model.recurrent_state_size``); a plain transformers
    decoder is measured by its KV cache from its config.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    own = getattr(model, "recurrent_state_size", None)
    if callable(own):
        return int(own(seq_len))
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if cfg is None or heads is None:
        raise ValueError(
            f"recurrent_state_size: {type(model).__name__} has no recurrent_state_size() and its config "
            "is not a transformer decoder (num_attention_heads, num_key_value_heads, head_dim, "
            "num_hidden_layers)"
        )
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    window = getattr(cfg, "sliding_window", None)
    kept = min(seq_len, window) if window else seq_len
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * kept
