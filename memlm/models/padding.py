"""Padded batches: rows of different lengths in one ``[B, T]`` tensor with an ``attention_mask``
(1 = token, 0 = padding), as tokenizers and ``generate()`` build them.

Padding leaves every state exactly as if it were absent: a padded position never enters a mixer.
- Without a decoding cache the rows' tokens are packed into one row with ``cu_seqlens`` (every mixer
  runs packed documents as separate sequences) and the outputs are put back in place, zeros at pads.
- A prefill into an empty cache runs each row alone; then each layer stacks the rows' states
  (``Mixer.stack_states``) when its mixer decodes rows at different positions together, and keeps
  them as :class:`~memlm.layers.mixer.RowStates` otherwise, which later steps run row by row.
- Later steps (one token per row, as ``generate()`` calls them) need no mask: the states know their rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memlm.layers.mixer import RowStates


def tokens_of(attention_mask: torch.Tensor | None, shape: tuple[int, int], cached: int) -> torch.Tensor | None:
    """The boolean ``[B, T]`` token mask of this call's ``T`` positions, or None when none is padded.

    ``attention_mask`` covers the cached positions too (``[B, cached + T]``, as ``generate()`` passes it)
    or only this call's (``[B, T]``). Raises ``ValueError`` naming the problem."""
    if attention_mask is None:
        return None
    batch, seqlen = shape
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] not in (
            seqlen, cached + seqlen):
        raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}; allowed: [batch, seq_len] = "
                         f"{[batch, seqlen]} or, with a cache, [batch, cached + seq_len] = {[batch, cached + seqlen]}")
    mask = attention_mask[:, -seqlen:] if seqlen else attention_mask[:, :0]
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask holds values other than 0 and 1; allowed: 1 (token) and 0 (padding)")
    mask = mask.bool()
    if bool(mask.all()):
        return None
    if cached:
        raise ValueError("attention_mask pads a position after the decoding cache was filled; allowed: padding "
                         "only in the prompt (left-padded, as generate() expects), then tokens in every row")
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty} have no tokens (all 0); every row needs at least one")
    return mask


def check_generation_padding(tokens: torch.Tensor) -> None:
    """A prompt filling a cache must end with a token in every row: the next token follows it."""
    right = (~tokens[:, -1]).nonzero().flatten().tolist()
    if right:
        raise ValueError(f"attention_mask rows {right} end with padding: prompts that continue from a cache "
                         "must be left-padded (tokenizer.padding_side = 'left')")


def run_packed(run: Callable[..., torch.Tensor], x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``run(x_packed, cu_seqlens=...)`` over the tokens of ``x`` ``[B, T, D]`` packed into one row,
    scattered back to ``[B, T, D']`` with zeros at the padded positions."""
    lengths = tokens.sum(dim=1)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    y = run(x[tokens][None], cu_seqlens=cu_seqlens)[0]
    out = y.new_zeros(*tokens.shape, y.shape[-1])
    out[tokens] = y
    return out


def stack_layer(mixer: nn.Module, states: list[Any]) -> Any:
    """One layer's state for a batch of rows decoded so far alone: the mixer's stacked state, or
    :class:`RowStates` when it cannot decode those rows together."""
    if len(states) == 1:
        return states[0]
    stacked = mixer.stack_states(states)
    return stacked if stacked is not None else RowStates(states)


def run_rows(layer: nn.Module, h: torch.Tensor, state: RowStates, use_cache: bool) -> tuple[torch.Tensor, Any]:
    """``layer`` on each row of ``h`` with that row's own state."""
    outs = [layer(h[i:i + 1], state=s, use_cache=use_cache) for i, s in enumerate(state)]
    return torch.cat([y for y, _ in outs]), (RowStates(s for _, s in outs) if use_cache else None)
