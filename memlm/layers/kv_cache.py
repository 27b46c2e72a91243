"""Growing key/value buffers for attention decoding (global attention; a sliding window keeps its last
``window_size`` keys by concatenation instead).

A buffer holds ``[B, H, capacity, D]`` (head-major: each head's keys are contiguous, as SDPA reads them) with
spare rows past the valid ones; an append writes the new rows in place, so a decoding step copies one token's
keys, not the whole cache. States that share a buffer (a state kept and decoded from twice, beam candidates
before a reorder) share its :class:`Growth`: only a state whose valid length is the buffer's latest writes in
place; any other copies its rows into a new buffer first, so no state ever sees another's keys. Under autograd
(a leaf that requires grad, grad mode on) appends concatenate, differentiably.
"""

from __future__ import annotations

import torch


class Growth:
    """How many rows of a buffer the latest append made valid (shared by the states sharing the buffer)."""

    __slots__ = ("length",)

    def __init__(self, length: int) -> None:
        self.length = length


Buffer = tuple[torch.Tensor, torch.Tensor, Growth]


def append(past: Buffer | None, seen: int, k: torch.Tensor, v: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, Buffer]:
    """Keys and values ``[B, seen + T, H, D]`` (views of the buffer) after appending ``k``, ``v`` ``[B, T, H, D]``
    to the ``seen`` rows of ``past``, and the buffer to keep."""
    n = seen + k.shape[1]
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        if past is not None:
            k = torch.cat([past[0][:, :, :seen].transpose(1, 2), k], dim=1)
            v = torch.cat([past[1][:, :, :seen].transpose(1, 2), v], dim=1)
        return k, v, (k.transpose(1, 2), v.transpose(1, 2), Growth(n))
    if past is not None:
        k_buf, v_buf, growth = past
        if growth.length == seen and k_buf.shape[2] >= n:
            k_buf[:, :, seen:n], v_buf[:, :, seen:n] = k.transpose(1, 2), v.transpose(1, 2)
            growth.length = n
            return k_buf[:, :, :n].transpose(1, 2), v_buf[:, :, :n].transpose(1, 2), past
    capacity = _capacity(n)
    bufs = []
    for new, old in ((k, None if past is None else past[0]), (v, None if past is None else past[1])):
        buf = new.new_empty(new.shape[0], new.shape[2], capacity, new.shape[3])
        if old is not None:
            buf[:, :, :seen] = old[:, :, :seen]
        buf[:, :, seen:n] = new.transpose(1, 2)
        bufs.append(buf)
    return bufs[0][:, :, :n].transpose(1, 2), bufs[1][:, :, :n].transpose(1, 2), (bufs[0], bufs[1], Growth(n))


def _capacity(n: int) -> int:
    """Rows allocated for ``n`` valid ones: room for the next appends."""
    return n + max(256, n // 4)


def right_aligned(rows: list[tuple[torch.Tensor, torch.Tensor, int]]) -> Buffer:
    """One buffer of ``B`` rows from single-row buffers ``(k, v, n)`` (``n`` valid rows each): row ``i``'s
    keys end at the longest row's length, so the leading ``longest − n_i`` rows of it are empty (zeros)."""
    frame = max(n for _, _, n in rows)
    bufs = []
    for part in (0, 1):
        first = rows[0][part]
        buf = first.new_zeros(len(rows), first.shape[1], _capacity(frame), first.shape[3])
        for i, row in enumerate(rows):
            buf[i, :, frame - row[2]:frame] = row[part][0, :, :row[2]]
        bufs.append(buf)
    return bufs[0], bufs[1], Growth(frame)
