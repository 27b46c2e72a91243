"""Top-k token routing to memories, with each memory's tokens kept in time order (MoM, docs/design.md §4.3).

A token routed to ``k`` of ``E`` memories is copied ``k`` times; the copies are grouped into
**buckets**, one per (memory, sequence) pair — a sequence is a batch row, or a packed document
when ``cu_seqlens`` is given — in time order inside each bucket (a stable sort on
``(memory, token index)``, so the order never depends on the sort implementation). Memories run
over the non-empty buckets as packed segments (``cu_seqlens``); :meth:`Buckets.combine` brings
their outputs back to the tokens, weighted by the routing weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memlm.layers.conv import ShortConvolution


@dataclass
class Routing:
    """Router output for ``[B, T]`` tokens: top-k memories and their renormalised weights."""

    logits: torch.Tensor  # [B, T, E] in the input dtype
    selected: torch.Tensor  # [B, T, k] memory indices
    weights: torch.Tensor  # [B, T, k], sum 1 over k, in the input dtype


def route(gate: nn.Linear, x: torch.Tensor, topk: int) -> Routing:
    """``softmax(x W_g)`` in float32 → top-k → weights renormalised over the k, cast back to ``x``'s dtype."""
    logits = gate(x)
    scores = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, selected = scores.topk(topk, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return Routing(logits, selected, weights.to(x.dtype))


def sequence_ids(batch: int, seqlen: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The sequence of every token ``[B·T]``: its batch row, or its packed document (batch 1)."""
    if cu_seqlens is None:
        return torch.arange(batch, device=device).repeat_interleave(seqlen)
    return torch.searchsorted(cu_seqlens[1:].to(device), torch.arange(seqlen, device=device), right=True)


class Buckets:
    """Token copies grouped by (memory, sequence), time order kept.

    Attributes:
        token: ``[N]`` the flat token index (``b·T + t``) of each copy, in bucket order.
        slot: ``[N]`` which of the token's routing slots the copy is (its column in ``selected``).
        cu_seqlens: ``[S + 1]`` boundaries of the ``S`` non-empty buckets in bucket order.
        memory: ``[S]`` each bucket's memory; ``sequence``: ``[S]`` its sequence.
        copy_memory: ``[N]`` the memory of each copy.
    """

    def __init__(self, selected: torch.Tensor, sequence: torch.Tensor, num_memories: int, num_sequences: int):
        tokens, k = selected.shape[0] * selected.shape[1], selected.shape[2]
        memory = selected.reshape(tokens * k)
        flat = torch.arange(tokens, device=selected.device).repeat_interleave(k)
        order = torch.sort(memory * tokens + flat, stable=True).indices
        self.token, self.copy_memory, self.order = flat[order], memory[order], order
        bucket = memory * num_sequences + sequence[flat]
        counts = torch.bincount(bucket, minlength=num_memories * num_sequences)
        nonempty = counts.nonzero().squeeze(-1)
        self.cu_seqlens = F.pad(counts[nonempty].cumsum(0), (1, 0))
        self.memory, self.sequence = nonempty // num_sequences, nonempty % num_sequences

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` per token → ``[1, N, ...]`` per copy in bucket order."""
        return x.flatten(0, 1)[self.token][None]

    def pick(self, per_memory: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[1, N, ...]``: each copy's row of its memory's ``[B, T, ...]`` tensor. The tensors are computed
        for every token, so a token's value never depends on how many tokens a memory got (BLAS picks
        its kernel by the number of rows: with per-memory row counts, a change in later tokens'
        routing would move earlier results in the last bit)."""
        if all(t is per_memory[0] for t in per_memory):  # one projection for all (single_kv_proj)
            return self.gather(per_memory[0])
        return torch.stack([t.flatten(0, 1) for t in per_memory], 1)[self.token, self.copy_memory][None]

    def combine(self, out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_slots weight · out`` back per token: ``out`` ``[1, N, ...]`` in bucket order, ``weights``
        ``[B, T, k]`` → ``[B, T, ...]`` (the slots summed in slot order: deterministic)."""
        batch, seqlen, k = weights.shape
        per_copy = torch.empty_like(out[0])
        per_copy[self.order] = out[0]
        per_copy = per_copy.view(batch, seqlen, k, *out.shape[2:])
        w = weights.view(batch, seqlen, k, *([1] * (out.dim() - 2)))
        return (per_copy * w).sum(2)


def segment_conv(
    conv: ShortConvolution, x: torch.Tensor, cu_seqlens: torch.Tensor, history: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal short convolution over each packed segment of ``x`` ``[1, N, D]``, segment ``i``
    continuing from its own last inputs ``history[i]`` ``[S, K−1, D]`` (zeros if None): every segment
    is prefixed by its history and convolved as a packed document. Returns ``y`` ``[1, N, D]`` and
    each segment's last ``K−1`` inputs ``[S, K−1, D]`` (the history, for a short segment, included)."""
    width, dim = conv.kernel_size[0] - 1, x.shape[-1]
    segments = cu_seqlens.numel() - 1
    if history is None:
        history = x.new_zeros(segments, width, dim)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ext_cu = cu_seqlens + width * torch.arange(segments + 1, device=x.device)
    # where each segment's own tokens land in the extended sequence
    own = torch.arange(x.shape[1], device=x.device) + width * torch.repeat_interleave(
        torch.arange(1, segments + 1, device=x.device), lengths)
    hist_at = (ext_cu[:-1, None] + torch.arange(width, device=x.device)).flatten()
    ext = x.new_empty(1, x.shape[1] + segments * width, dim)
    ext[0, own] = x[0]
    ext[0, hist_at] = history.reshape(-1, dim).to(x.dtype)
    y, _ = conv(ext, None, False, ext_cu)
    tail = (ext_cu[1:, None] - width + torch.arange(width, device=x.device)).flatten()
    return y[:, own], ext[0, tail].view(segments, width, dim)
