"""One sequence's Memory Caching caches, constant or logarithmic segments (docs/design.md §4.4).

Every closed segment (``segment_size`` tokens, the unit) makes one cache, numbered in closing order. With
``segments: constant`` cache ``e`` holds segment ``e`` and every later token reads it. With ``segments: log``
the closed segments before a token's own are split as a Fenwick tree, the binary split of the prefix of
log-linear attention (Guo et al. 2025, arXiv 2506.04761) at segment granularity: cache ``e`` holds the
``lowbit(e+1)`` segments ``[e+1−lowbit(e+1), e+1)``, and a token of segment ``s`` reads exactly the caches
whose span ends at ``s`` with some of its lowest set bits cleared, ``e+1 ≤ s < e+1+lowbit(e+1)``:
``popcount(s)`` of them, a partition of segments ``[0, s)``. A cache is dead once no later segment reads it,
so decoding keeps ``O(log(T / segment_size))`` of them.

A log cache is built when its last segment closes, from the live caches of its span (``sub_buckets``) and
that segment: its key sum is their sum; with ``segment_init: checkpoint`` its state is that segment's end
state (the memory then holds the whole prefix); with ``independent`` it is the memory run from the initial
state over its span, composed from the pieces' ``(ΔS, T)`` (``S_end = T S_start + ΔS``, matrix memories only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def lowbit(n: int) -> int:
    """The lowest set bit of ``n > 0``."""
    return n & -n


def span_length(cache_id: int, log: bool) -> int:
    """Segments held by cache ``cache_id``."""
    return lowbit(cache_id + 1) if log else 1


def sub_buckets(cache_id: int) -> list[int]:
    """The log caches that, with segment ``cache_id``, make cache ``cache_id``'s span, in time order."""
    end = cache_id + 1
    ids, edge, half = [], end - lowbit(end), lowbit(end) // 2
    while half:
        edge += half
        ids.append(edge - 1)
        half //= 2
    return ids


def members(units: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` bool: log cache ``ids[..., i]`` is read by a token of segment ``units[...]``."""
    end = ids + 1
    return (end <= units[..., None]) & (units[..., None] < end + (end & -end))


@dataclass
class CacheList:
    """A sequence's caches in closing order: ids, states (a tensor, or one per deep-memory layer), key sums
    ``[H, K]`` and, for independent log caches, transitions ``T``. ``units``: segments closed so far."""

    log: bool
    units: int = 0
    ids: list[int] = field(default_factory=list)
    states: list[Any] = field(default_factory=list)
    sums: list[torch.Tensor] = field(default_factory=list)
    transitions: list[torch.Tensor] = field(default_factory=list)

    def close(self, state: Any, key_sum: torch.Tensor, transition: torch.Tensor | None = None,
              compose: Callable[[Any, torch.Tensor, Any, torch.Tensor], tuple[Any, torch.Tensor]] | None = None
              ) -> None:
        """Cache the segment that just closed (its end state, key sum and, independent log, transition).
        ``compose(S1, T1, S2, T2) -> (T2 S1 + S2, T2 T1)`` builds an independent log cache."""
        cache_id = self.units
        self.units += 1
        if self.log:
            where = {c: i for i, c in enumerate(self.ids)}
            parts = [where[c] for c in sub_buckets(cache_id)]
            total = None
            for i in parts:
                total = self.sums[i] if total is None else total + self.sums[i]
            key_sum = key_sum if total is None else total + key_sum
            if compose is not None and parts:
                acc, acc_t = self.states[parts[0]], self.transitions[parts[0]]
                for i in parts[1:]:
                    acc, acc_t = compose(acc, acc_t, self.states[i], self.transitions[i])
                state, transition = compose(acc, acc_t, state, transition)
        self.ids.append(cache_id)
        self.states.append(state)
        self.sums.append(key_sum)
        if transition is not None:
            self.transitions.append(transition)

    def pools(self, segment_size: int, mean: bool) -> list[torch.Tensor]:
        """Each cache's summary ``p_i``: its key sum, or their mean over its tokens."""
        if not mean:
            return list(self.sums)
        return [s / float(span_length(c, self.log) * segment_size) for c, s in zip(self.ids, self.sums)]

    def alive(self) -> CacheList:
        """The caches a later token can still read (all of them with constant segments)."""
        if not self.log:
            return self
        keep = [i for i, c in enumerate(self.ids) if self.units < c + 1 + lowbit(c + 1)]
        fields = (self.ids, self.states, self.sums, self.transitions)
        return CacheList(True, self.units, *([xs[i] for i in keep] if xs else [] for xs in fields))
