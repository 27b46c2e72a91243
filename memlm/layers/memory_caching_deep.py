"""Memory Caching over the Titans / Miras deep memory (docs/design.md §4.4): the caches are MLP weights.

Mixed into :class:`memlm.layers.memory_caching.MemoryCaching` when its ``base`` is ``titans_memory`` or a
Miras preset. ``checkpoint``: one call of the deep-memory kernel runs the whole sequence (the online read is
the base's own) and returns its state at every segment end (``output_states_every``); ``independent``: the
segments run as packed documents, each from the memory's initial state, one call, and the closed segments'
final states are the caches. A cache ``W^{(i)}`` is read as ``M_{W^{(i)}}(q_t)`` (``cached_readout_mlp``).

Segments are whole chunks of the memory (``segment_size`` a multiple of ``chunk_size``), so decoding keeps the
state at the current segment's start with its pending inputs and recomputes the segment at each step
(``layers/periodic.py`` with the segment as the period): exact, at O(segment_size) per token.

``soup`` mixes the caches' weights (their γ-weighted mean, read once, scaled by their total weight) and keeps
the online memory's own read: the paper mixes the online weights in too, but the chunked kernel never
materialises a token's online weights ``W_t`` inside a chunk. For a matrix memory this is exactly grm.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from memlm.kernels import cached_readout_mlp
from memlm.kernels.cached_readout.layout import pad_rows, unpad_rows
from memlm.kernels.cached_readout.retention import read_weights
from memlm.kernels.deep_memory.mlp import memory_apply
from memlm.layers.cache_list import CacheList
from memlm.layers.neural_memory import per_document
from memlm.layers.periodic import periodic_forward
from memlm.layers.segments import cut


class DeepCaching:
    """The deep-memory path of ``memory_caching`` (the owner has ``base``, ``opts``, ``_pools``, ``_aggregate``)."""

    base: Any
    opts: Any

    def deep_forward(self, x: torch.Tensor, state: dict[str, Any] | None, use_cache: bool,
                     cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any] | None]:
        if cu_seqlens is not None:
            return self._deep_run(x, self._deep_initial(1), False, cu_seqlens)[0], None
        return periodic_forward(self._deep_run, x, state, use_cache, self.opts.segment_size,
                                lambda: self._deep_initial(x.shape[0]))

    def _deep_initial(self, batch: int) -> dict[str, Any]:
        weights, momentum = self.base.initial_memory(batch)
        return {"conv": (None, None, None), "weights": weights, "momentum": momentum, "caches": None, "sums": None,
                "ids": (), "units": 0}

    def _deep_run(self, x: torch.Tensor, start: dict[str, Any], want_state: bool,
                  cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """``x`` from a segment start (``start``: the state there, with the caches so far) → output and, with
        ``want_state`` (``x`` whole segments), the state at its end."""
        B, T = x.shape[:2]
        size = self.opts.segment_size
        q, k, v, gates, convs = self.base.project(x, start["conv"], cu_seqlens)
        lengths = [T] * B if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        segs = cut(lengths, size, 0, x.device)
        flat = {n: t.reshape(1, B * T, *t.shape[2:]) for n, t in {"q": q, "k": k, "v": v}.items()}
        if self.opts.segment_init == "checkpoint":
            memory = per_document((start["weights"], start["momentum"]), cu_seqlens)
            if max(lengths) < size:  # no segment closes: the base's own call (and kernel path)
                o, final = self.base.write_read(q, k, v, gates, memory, want_state, cu_seqlens)
                new = [[] for _ in lengths]
            else:
                o, final, ends = self.base.write_read(q, k, v, gates, memory, want_state, cu_seqlens,
                                                      states_every=size)
                # unbound, not indexed: each index's backward zero-fills a gradient the size of the whole tensor
                rows = [[row.unbind(0) for row in a.unbind(0)] for a in ends.A]  # per layer, per sequence, per cache
                new = [[[layer[n][j] for layer in rows] for j in range(c)] for n, c in enumerate(ends.counts.tolist())]
            after = final
        else:  # every segment from the initial state, as packed documents
            n_seg = segs.sequence.numel()
            flat_gates = tuple(None if g is None else g.reshape(1, B * T, *g.shape[2:]) for g in gates)
            o, finals = self.base.write_read(flat["q"], flat["k"], flat["v"], flat_gates,
                                             self.base.initial_memory(n_seg), True, segs.cu_seqlens)
            full, sequence = segs.full.tolist(), segs.sequence.tolist()
            each = [a.unbind(0) for a in finals[0]]
            new = [[[layer[i] for layer in each] for i in range(n_seg) if full[i] and sequence[i] == s]
                   for s in range(len(lengths))]
            after = self.base.initial_memory(B) if want_state else None
        sums, running = self._pools(flat["k"], segs, None)
        lists = self._deep_lists(start, new, sums, segs)
        spec, empty = self.base.spec, [w[:0] for w in self.base.initial_memory(1)[0]]
        caches = [_layers(c, empty) for c in lists]

        def read_caches(gamma: torch.Tensor, visible: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
            if self.opts.aggregation == "soup":
                return self._soup(flat["q"], caches, gamma, visible, segs)
            states = [torch.cat([c[layer] for c in caches])[None].to(q.dtype) for layer in range(len(empty))]
            return cached_readout_mlp(flat["q"], states, gamma, visible, spec, cu_seqlens=segs.seq_cu,
                                      cache_offsets=offsets)

        o = self._aggregate(flat["q"], o.reshape(flat["q"].shape), lists, running, segs, len(start["ids"]), x,
                            read_caches)
        y = self.base.output(o.view(B, T, *o.shape[2:]), x)
        if not want_state:
            return y, None
        alive = [c.alive() for c in lists]
        kept = [_layers(c, empty) for c in alive]
        return y, {"conv": convs, "weights": after[0], "momentum": after[1],
                   "caches": [torch.stack([c[layer] for c in kept]) for layer in range(len(empty))],
                   "sums": torch.stack([torch.stack(c.sums) if c.sums else sums.new_zeros(0, *sums.shape[1:])
                                        for c in alive]),
                   "ids": tuple(alive[0].ids), "units": alive[0].units}

    def _soup(self, q: torch.Tensor, caches: list, gamma: torch.Tensor, visible: torch.Tensor, segs: Any
              ) -> torch.Tensor:
        """Memory soup over the caches: per token one memory whose weights are the γ-weighted mean of the visible
        caches' weights, read once and scaled by their total weight, ``(Σ_i γ_i) · M_{Σ_i γ_i W^{(i)} / Σ_i γ_i}(q_t)``
        (for a matrix memory exactly the grm read). ``[1, N, H, D]``. Each layer's product with the mixed weights
        is the mix of the products, ``h W_t = Σ_i s_{t,i} (h W^{(i)})``, so no token's weights are formed."""
        width = gamma.shape[-1]
        read = [read_weights(self.base.spec, c) for c in caches]  # per sequence, per layer [n, H, a, b]
        weights = gamma[0] * (torch.arange(width, device=q.device) < visible[0, :, None])[:, None, :]  # [N, H, width]
        total = weights.sum(-1)  # [N, H]
        share = weights / total.clamp_min(torch.finfo(total.dtype).tiny)[..., None]
        starts, lengths = segs.seq_cu[:-1], segs.seq_cu[1:] - segs.seq_cu[:-1]
        rows = int(lengths.max())
        q_rows = pad_rows(q[0], starts, lengths, rows)  # [S, L, H, D]
        share_rows = pad_rows(share, starts, lengths, rows).to(q.dtype)  # [S, L, H, width]
        layers = [torch.stack([F.pad(r[layer], (0, 0, 0, 0, 0, 0, 0, width - r[layer].shape[0])) for r in read])
                  .to(q.dtype) for layer in range(len(self.base.memory_weights))]  # [S, width, H, a, b]

        def linear(layer: int, h: torch.Tensor) -> torch.Tensor:
            each = torch.einsum("slha,snhab->slnhb", h, layers[layer])
            return torch.einsum("slnhb,slhn->slhb", each, share_rows)

        out, _ = memory_apply(q_rows, linear, len(layers), self.base.spec)  # [S, L, H, D]
        return (total[..., None].to(out.dtype) * unpad_rows(out, lengths))[None]

    def _deep_lists(self, start: dict[str, Any], new: list[list[list[torch.Tensor]]], sums: torch.Tensor, segs: Any
                    ) -> list[CacheList]:
        """Per sequence its caches: the incoming ones, then the segments this call closes (``new``: per sequence,
        per cache, per layer ``[H, a, b]``)."""
        log = self.opts.segments == "log"
        full, sequence, sums = segs.full.tolist(), segs.sequence.tolist(), sums.unbind(0)
        lists = []
        for s, closed in enumerate(new):
            c = CacheList(log)
            if start["caches"] is not None:
                old = [w[s].unbind(0) for w in start["caches"]]
                c = CacheList(log, start["units"], list(start["ids"]), [list(layers) for layers in zip(*old)],
                              list(start["sums"][s].unbind(0)))
            own = [i for i in range(len(full)) if full[i] and sequence[i] == s]
            for state, i in zip(closed, own):
                c.close(state, sums[i])
            lists.append(c)
        return lists


def _layers(caches: CacheList, empty: list[torch.Tensor]) -> list[torch.Tensor]:
    """One sequence's deep caches per layer, ``[n, H, a, b]``."""
    if not caches.states:
        return empty
    return [torch.stack([state[layer] for state in caches.states]) for layer in range(len(empty))]
