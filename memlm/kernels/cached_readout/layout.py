"""Which caches belong to which tokens: the sequences of a call, unpacked (``B`` rows) or packed documents
(``cu_seqlens`` with ``cache_offsets``), and the padding of packed documents into rows for the PyTorch path.

A sequence is a span of tokens and a span of caches in the flattened layout (tokens ``[B·T]``, caches
``[B·N]``; packed: ``[T]`` and ``[N_total]``). A token with ``visible = v`` reads the first ``v`` caches of its
own sequence (docs/design.md §4.4).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Span(NamedTuple):
    """One sequence: tokens ``[tok_start, tok_end)`` and caches ``[cache_start, cache_end)`` (flattened)."""

    tok_start: int
    tok_end: int
    cache_start: int
    cache_end: int


def sequences(
    batch: int, seqlen: int, n_caches: int, cu_seqlens: torch.Tensor | None, cache_offsets: torch.Tensor | None
) -> list[Span]:
    """Every sequence of the call: one per batch row, or one per packed document."""
    if cu_seqlens is None:
        return [Span(b * seqlen, (b + 1) * seqlen, b * n_caches, (b + 1) * n_caches) for b in range(batch)]
    c, o = cu_seqlens.tolist(), cache_offsets.tolist()
    return [Span(*span) for span in zip(c[:-1], c[1:], o[:-1], o[1:])]


def cache_slots(n_caches: int, cache_offsets: torch.Tensor | None) -> int:
    """How many caches one token can address (the last dim of ``gamma``): ``N``, or the largest number of
    caches of one packed document."""
    if cache_offsets is None:
        return n_caches
    return int(torch.diff(cache_offsets).max().item()) if cache_offsets.numel() > 1 else 0


def pad_rows(x: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Spans of the rows of ``x`` (``[R, ...]``) → ``[D, width, ...]``: span ``d`` is ``x[starts[d] :
    starts[d] + lengths[d]]``, zero-padded to ``width`` rows (differentiable; a padded row reads an appended zero
    row, so ``R = 0`` works too)."""
    steps = torch.arange(width, device=x.device)
    valid = steps[None, :] < lengths[:, None]
    index = torch.where(valid, starts[:, None] + steps[None, :], x.shape[0])
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[index]


def unpad_rows(y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pad_rows` for spans that tile the rows in order: ``[D, L, ...]`` → ``[Σ lengths, ...]``."""
    valid = torch.arange(y.shape[1], device=y.device)[None, :] < lengths[:, None]
    return y[valid]
