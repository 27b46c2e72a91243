"""Positions and document ids of packed sequences (``cu_seqlens``, FlashAttention style)."""

from __future__ import annotations

import torch


def document_positions(seqlen: int, cu_seqlens: torch.Tensor | None, offset: int, device: torch.device) -> torch.Tensor:
    """Token positions ``[T]``: ``offset + t``, or restarting at 0 at each packed document start."""
    pos = torch.arange(seqlen, device=device)
    if cu_seqlens is None:
        return pos + offset
    bounds = cu_seqlens[:-1].to(device=device, dtype=torch.long)
    starts = torch.zeros(seqlen, dtype=torch.long, device=device)
    starts[bounds] = bounds
    return pos - torch.cummax(starts, dim=0).values


def document_ids(seqlen: int, cu_seqlens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Index of the packed document each position belongs to, ``[T]``."""
    marks = torch.zeros(seqlen, dtype=torch.long, device=device)
    marks[cu_seqlens[1:-1].to(device=device, dtype=torch.long)] = 1
    return torch.cumsum(marks, dim=0)
