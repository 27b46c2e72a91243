"""Fixed-size segments of each sequence, continuing a running segment (Memory Caching, docs/design.md §4.4).

A sequence (a batch row, or a packed document) is cut every ``size`` tokens of its own positions; a call
that continues a sequence ``phase`` tokens into a segment first completes that segment. The cuts are host
integers (the lengths are known), so the segments can be handed to a kernel as packed documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segments:
    """The segments of ``B·T`` flat tokens, in sequence then time order.

    Attributes:
        cu_seqlens: ``[S + 1]`` boundaries over the flat tokens (the kernel's packed documents).
        sequence: ``[S]`` each segment's sequence; ``first``: ``[S]`` True for a sequence's first segment of
            this call (it continues the incoming state); ``full``: ``[S]`` True where the segment closes
            (its state is cached); ``ordinal``: ``[S]`` the number of caches its sequence made before it in
            this call.
        token_segment: ``[B·T]`` the segment of every token; ``seq_cu``: ``[n_seq + 1]`` sequence boundaries.
        closed: host list, per sequence, of how many segments close in this call.
    """

    cu_seqlens: torch.Tensor
    sequence: torch.Tensor
    first: torch.Tensor
    full: torch.Tensor
    ordinal: torch.Tensor
    token_segment: torch.Tensor
    seq_cu: torch.Tensor
    closed: list[int]


def cut(lengths: list[int], size: int, phase: int, device: torch.device) -> Segments:
    """Segments of sequences of ``lengths`` tokens (flat, one after another), every sequence ``phase`` tokens
    into its running segment of ``size``."""
    bounds, seq, first, full, ordinal, closed = [0], [], [], [], [], []
    offset = 0
    for s, length in enumerate(lengths):
        pos, made = 0, 0
        while pos < length:
            room = size - (phase if pos == 0 else 0)
            end = min(length, pos + room)
            is_full = end - pos == room
            bounds.append(offset + end)
            seq.append(s)
            first.append(pos == 0)
            full.append(is_full)
            ordinal.append(made)
            made += int(is_full)
            pos = end
        closed.append(made)
        offset += length
    cu = torch.tensor(bounds, device=device)
    n = len(seq)
    token_segment = torch.repeat_interleave(torch.arange(n, device=device), cu[1:] - cu[:-1])
    seq_cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    as_tensor = {"dtype": torch.long, "device": device}
    return Segments(cu, torch.tensor(seq, **as_tensor), torch.tensor(first, dtype=torch.bool, device=device),
                    torch.tensor(full, dtype=torch.bool, device=device), torch.tensor(ordinal, **as_tensor),
                    token_segment, seq_cu, closed)
