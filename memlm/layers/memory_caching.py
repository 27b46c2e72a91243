"""Memory Caching (Behrouz et al. 2026, arXiv 2602.24281; docs/design.md §4.4) over a matrix memory mixer.

The sequence is cut into segments of ``segment_size`` tokens; inside a segment the ``base`` mixer's memory
runs as usual, and at each segment end its state ``S^{(i)}`` is cached. A token ``t`` of segment ``s`` reads
its online memory and the caches of the segments before its own:

    residual:   o_t = q_t S_t + Σ_{i<s} q_t S^{(i)}
    grm:        o_t = γ_t^{on} q_t S_t + Σ_{i<s} γ_t^{(i)} q_t S^{(i)},   γ_t = softmax(⟨u_t, p_on⟩, ⟨u_t, p_i⟩_{i<s})
    soup:       the caches as one memory, their γ-weighted mean read once (× Σ γ^{(i)}), plus γ^{on} q_t S_t:
                for a matrix memory the same as grm; for a deep memory a different read (memory_caching_deep.py)
    ssc:        grm over the online memory and only the ``top_k`` caches with the largest ⟨u_t, p_i⟩

(reads scaled as the base reads). ``segments: log`` groups the closed segments as the binary split of the
prefix (log-linear attention's Fenwick tree, ``layers/cache_list.py``): a token of segment s reads
``popcount(s)`` caches, each a group of segments summarised by the mean of its keys. The rest of the base
mixer (projections, convolutions, gates, output norm and projection) is unchanged: the wrapper replaces only
the base's memory op (``MixerCall``).

Choices the paper leaves open (docs/design.md §4.4): ``p_i`` is the mean (``pool: mean``; or the sum) of
segment i's keys as the base's memory receives them, per head; the online segment's ``p_on`` pools its
positions ≤ t only (so no future token changes γ); ``u_t = x_t W_u`` per head with a key's width
(``gate_input: x``, the paper's) or ``u_t = q_t`` (``gate_input: query``, no new parameter); γ is a softmax
over the online memory and the visible caches. ``segment_init: checkpoint`` starts each segment from the
previous segment's end state (so the online read is the base's own), ``independent`` from the initial state.

Training computes every segment's state from one call of the base's kernel: the segments run as packed
documents with values ``[v | 0]`` and initial state ``[0 | I]``, so each segment returns its own contribution
``ΔS`` and its transition ``T`` (every linear memory is ``S_t = A_t S_{t−1} + B_t(v_t)`` with ``A_t`` free of
the values), and ``S_end = T · S_start + ΔS`` chains the segments; the online read is
``q_t ΔS_{≤t} + (q_t T_{≤t}) S_start``. The caches are then read for all tokens at once
(``memlm.kernels.cached_readout``). Decoding keeps the caches and their key sums in the state, one more per
segment (log: only the live groups): ``state_size(seq_len)`` grows with ``seq_len / segment_size`` (log: its
number of set bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.kernels import cached_readout, linear_memory
from memlm.kernels.cached_readout import select_top_k
from memlm.layers.cache_list import CacheList, members
from memlm.layers.gated_deltanet import GatedDeltaNet
from memlm.layers.linear_common import LinearMixer, MixerCall, check_choice, heads
from memlm.layers.mamba2 import Mamba2
from memlm.layers.memory_caching_deep import DeepCaching
from memlm.layers.mixer import Mixer
from memlm.layers.neural_memory import NeuralMemory
from memlm.layers.registry import build_mixer, parse_spec, register_mixer
from memlm.layers.segments import Segments, cut

BASES = ("gated_deltanet", "delta_net", "gla", "retnet", "mamba2")  # matrix memories
DEEP_BASES = ("titans_memory", "moneta", "yaad", "memora")  # MLP memories (memory_caching_deep.py)


def _accumulate(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (the dtype the kernels return states in)."""
    return torch.promote_types(t.dtype, torch.float32)


def _last_segments(segs: Segments, batch: int) -> list[int]:
    """The index of each row's last segment (the running one after the call)."""
    sequence = segs.sequence.tolist()
    return [max(i for i, s in enumerate(sequence) if s == b) for b in range(batch)]


def _compose(s1: torch.Tensor, t1: torch.Tensor, s2: torch.Tensor, t2: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent pieces in time order as one: ``(T2 S1 + S2, T2 T1)``."""
    return t2 @ s1 + s2, t2 @ t1


def _rows(lists: list[CacheList], name: str, empty: torch.Tensor) -> torch.Tensor:
    """A field of every row's caches, ``[B, n, ...]`` (rows share n), or ``empty`` where there are none."""
    rows = [getattr(c, name) for c in lists]
    return torch.stack([torch.stack(r) for r in rows]) if rows[0] else empty


def key_shape(base: nn.Module) -> tuple[int, int]:
    """(heads, key width) of the memory the base mixer's kernel call receives."""
    if isinstance(base, Mamba2):
        return base.num_heads, base.ssm_state_size
    if isinstance(base, GatedDeltaNet):
        return base.num_v_heads, base.head_k_dim
    if isinstance(base, NeuralMemory):
        return base.num_heads, base.head_dim
    return base.num_heads, base.head_k_dim


class CachingCall(MixerCall):
    """The base mixer's call with its memory op replaced by the cached one (``MemoryCaching.read``)."""

    def __init__(self, owner: MemoryCaching, x: torch.Tensor, state: dict | None, use_cache: bool,
                 cu_seqlens: torch.Tensor | None) -> None:
        super().__init__(None if state is None else state["base"], use_cache, cu_seqlens)
        self.owner, self.x, self.incoming = owner, x, state
        self.cache_state: dict[str, Any] = {}

    def linear_memory(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **decay: Any
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.owner.read(q, k, v, decay, self)


@register_mixer("memory_caching")
class MemoryCaching(DeepCaching, Mixer):
    @dataclass
    class Options:
        base: str | dict = "gated_deltanet"  # the memory mixer wrapped: gated_deltanet, delta_net, gla, retnet, mamba2
        aggregation: str = "grm"  # residual | grm | soup | ssc
        segments: str = "constant"  # constant (every segment a cache) | log (Fenwick groups of segments)
        segment_size: int = 256  # tokens per segment (log: the smallest group)
        segment_init: str = "checkpoint"  # checkpoint (from the previous segment's end) | independent
        top_k: int = 2  # ssc: caches read per token
        gate_input: str = "x"  # u_t = x_t W_u ("x") or u_t = q_t ("query")
        pool: str = "mean"  # p_i: mean or sum of segment i's keys

        def validate(self) -> None:
            check_choice("aggregation", self.aggregation, ("residual", "grm", "soup", "ssc"))
            check_choice("segments", self.segments, ("constant", "log"))
            check_choice("segment_init", self.segment_init, ("checkpoint", "independent"))
            check_choice("gate_input", self.gate_input, ("x", "query"))
            check_choice("pool", self.pool, ("mean", "sum"))
            for name in ("segment_size", "top_k"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            cls, base = parse_spec(self.base, where="memory_caching.base")
            if cls.mixer_name not in BASES + DEEP_BASES:
                raise ValueError(f"memory_caching.base must be one of {list(BASES + DEEP_BASES)}, "
                                 f"got {cls.mixer_name!r}")
            if cls.mixer_name in DEEP_BASES:
                if self.segment_size % base.chunk_size:
                    raise ValueError(f"segment_size={self.segment_size} must be a multiple of the deep memory's "
                                     f"chunk_size={base.chunk_size} (its state is exact at chunk ends only)")
                if self.segments == "log" and self.segment_init == "independent":
                    raise ValueError("memory_caching: segments='log' with segment_init='independent' needs a matrix "
                                     f"memory base {list(BASES)} (a deep memory's groups of segments cannot be "
                                     f"composed from their parts), got {cls.mixer_name!r}; segment_init='checkpoint' "
                                     f"runs log segments over it")

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__()
        self.opts = opts
        self.base: LinearMixer | NeuralMemory = build_mixer(opts.base, hidden_size, config,
                                                            where="memory_caching.base")
        self.num_heads, self.key_dim = key_shape(self.base)
        gated = opts.aggregation != "residual" and opts.gate_input == "x"
        self.u_proj = nn.Linear(hidden_size, self.num_heads * self.key_dim, bias=False) if gated else None

    def state_size(self, seq_len: int) -> int:
        """The base's state, the caches a later token can read with their key sums (independent log: and
        transitions), and the running key sum: one cache per closed segment, or with log segments one per set bit
        of the number of closed segments."""
        units = seq_len // self.opts.segment_size
        caches = units.bit_count() if self.opts.segments == "log" else units
        per_cache = self.cache_numel() + self.num_heads * self.key_dim
        running = self.num_heads * self.key_dim
        if self._composed:
            per_cache += self.num_heads * self.key_dim ** 2
            running += self.num_heads * self.key_dim ** 2
        base = self.base.memory_state_size() if isinstance(self.base, NeuralMemory) else self.base.state_size(seq_len)
        return base + caches * per_cache + running

    def cache_numel(self) -> int:
        """Elements of one cached state: the matrix memory, or the deep memory's weights (its pending segment's
        inputs, kept for exact decoding, are not counted)."""
        if isinstance(self.base, NeuralMemory):
            return sum(w.numel() for w in self.base.memory_weights)
        return self.base.memory_numel

    def forward(
        self,
        x: torch.Tensor,
        state: dict[str, Any] | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        if cu_seqlens is not None and (state is not None or use_cache):
            raise ValueError("memory_caching: cu_seqlens (packed documents) cannot be combined with a decoding cache")
        if isinstance(self.base, NeuralMemory):
            return self.deep_forward(x, state, use_cache, cu_seqlens)
        call = CachingCall(self, x, state, use_cache, cu_seqlens)
        y, memory = self.base.mix(x, call)
        if not use_cache:
            return y, None
        return y, {"base": (memory, call.new_conv_states, call.seen + x.shape[1]), **call.cache_state}

    # --- the cached memory ------------------------------------------------------------------------------
    def read(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: dict[str, Any], call: CachingCall
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base's memory op over ``[B, T, H, ·]`` with the caches read: ``(o, online state after x)``."""
        B, T, H, K = q.shape
        V = v.shape[-1]
        scale = decay.pop("scale", None) or K ** -0.5
        incoming = call.incoming
        phase = 0 if incoming is None else int(incoming["count"])
        lengths = [T] * B if call.cu_seqlens is None else (call.cu_seqlens[1:] - call.cu_seqlens[:-1]).tolist()
        segs = cut(lengths, self.opts.segment_size, phase, q.device)
        flat = {n: t.reshape(1, B * T, *t.shape[2:]) for n, t in {"q": q, "k": k, "v": v, **decay}.items()}
        o_loc, q_T, delta, transition = self._segments(flat, segs, call.memory, scale)
        # unbound once: indexing a tensor per segment costs a full-size zero-filled gradient per index
        deltas, transitions = delta.unbind(0), None if transition is None else transition.unbind(0)
        starts, ends = self._chain(segs, deltas, transitions, call.memory)
        online = o_loc.clone()
        for i, start in enumerate(starts):  # the read of the state each segment started from
            if start is not None:
                lo, hi = segs.cu_seqlens[i], segs.cu_seqlens[i + 1]
                online[0, lo:hi] += torch.einsum("thk,hkv->thv", q_T[0, lo:hi].to(start.dtype), start).to(online.dtype)
        sums, running = self._pools(flat["k"], segs, incoming)
        unit_t = self._unit_transitions(segs, transitions, incoming)
        lists = self._close(segs, ends, sums, unit_t, incoming, B)

        def read_caches(gamma: torch.Tensor, visible: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
            states = torch.cat([torch.stack(c.states) for c in lists if c.states])[None].to(q.dtype)
            return cached_readout(flat["q"], states, gamma, visible, scale=scale, cu_seqlens=segs.seq_cu,
                                  cache_offsets=offsets)

        n_old = 0 if incoming is None else len(incoming["ids"])
        o = self._aggregate(flat["q"], online, lists, running, segs, n_old, call.x, read_caches)
        if call.use_cache:
            call.cache_state = self._next_state(segs, sums, lists, unit_t, phase + T, B, V)
            memory = self._online_after(segs, ends, B)
        else:
            memory = None
        return o.view(B, T, H, V), memory

    @property
    def _composed(self) -> bool:
        """Log caches built from independent segments: composed from each piece's ``(ΔS, T)``."""
        return self.opts.segments == "log" and self.opts.segment_init == "independent"

    def _segments(self, flat: dict[str, torch.Tensor], segs: Segments, memory_in: torch.Tensor | None,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """One call of the base kernel over the segments as packed documents: the local reads ``q ΔS_{≤t}``, the
        reads of the transitions ``q T_{≤t}``, each segment's own state ``ΔS`` and transition ``T`` (the latter
        two only when some segment starts from a nonzero state)."""
        q, k, v = flat["q"], flat["k"], flat["v"]
        decay = {n: t for n, t in flat.items() if n not in ("q", "k", "v")}
        n_seg, (H, K), V = segs.sequence.numel(), q.shape[2:], v.shape[-1]
        chained = self.opts.segment_init == "checkpoint" and n_seg > len(segs.closed)
        if memory_in is None and not chained and not self._composed:  # all from zeros: the base's own call
            o, final = linear_memory(q, k, v, **decay, scale=scale, output_final_state=True,
                                     cu_seqlens=segs.cu_seqlens)
            return o, None, final, None
        eye = torch.eye(K, device=q.device, dtype=_accumulate(q)).expand(n_seg, H, K, K)
        initial = torch.cat([eye.new_zeros(n_seg, H, K, V), eye], dim=-1)
        v_aug = torch.cat([v, v.new_zeros(*v.shape[:-1], K)], dim=-1)
        o, final = linear_memory(q, k, v_aug, **decay, scale=scale, initial_state=initial, output_final_state=True,
                                 cu_seqlens=segs.cu_seqlens)
        return o[..., :V], o[..., V:], final[..., :V], final[..., V:]

    def _chain(self, segs: Segments, deltas: tuple[torch.Tensor, ...], transitions: tuple[torch.Tensor, ...] | None,
               memory_in: torch.Tensor | None) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
        """Each segment's start and end state: ``S_end = T S_start + ΔS``; a segment starts from the incoming
        state (its sequence's first), the previous end (``checkpoint``) or zeros (``independent``)."""
        starts: list[torch.Tensor | None] = []
        ends: list[torch.Tensor] = []
        first, sequence = segs.first.tolist(), segs.sequence.tolist()
        for i in range(len(first)):
            if first[i]:
                start = None if memory_in is None else memory_in[sequence[i]].to(deltas[i].dtype)
            else:
                start = ends[-1] if self.opts.segment_init == "checkpoint" else None
            ends.append(deltas[i] if start is None else transitions[i] @ start + deltas[i])
            starts.append(start)
        return starts, ends

    def _unit_transitions(self, segs: Segments, transitions: tuple[torch.Tensor, ...] | None, incoming: dict | None
                          ) -> list[torch.Tensor] | None:
        """Independent log caches: each segment's transition from its start, continuing a running segment's."""
        if not self._composed:
            return None
        out = list(transitions)
        if incoming is not None:
            for i in segs.first.nonzero().squeeze(-1).tolist():
                out[i] = out[i] @ incoming["transition"][int(segs.sequence[i])].to(out[i].dtype)
        return out

    def _pools(self, k: torch.Tensor, segs: Segments, incoming: dict | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per segment the sum of its keys ``[S, H, K]`` (a first segment adds the incoming running sum), and per
        token the online summary ``p_on`` ``[1, N, H, K]`` over its segment's positions ≤ t."""
        k = k[0].to(_accumulate(k))
        seg = segs.token_segment
        sums = k.new_zeros(segs.sequence.numel(), *k.shape[1:]).index_add_(0, seg, k)
        base = k.new_zeros(sums.shape)
        counts = torch.zeros(segs.sequence.numel(), device=k.device, dtype=k.dtype)
        if incoming is not None:
            first = segs.first.nonzero().squeeze(-1)
            base[first] = incoming["pool_sum"][segs.sequence[first]].to(k.dtype)
            counts[first] = float(incoming["count"])
        sums = sums + base
        position = torch.arange(k.shape[0], device=k.device) - segs.cu_seqlens[:-1][seg]
        # a cumulative sum inside each segment only (one over all tokens minus the segment start's value would
        # let later segments' keys move earlier summaries in the last bit)
        dense = k.new_zeros(sums.shape[0], self.opts.segment_size, *k.shape[1:])
        dense[seg, position] = k
        running = dense.cumsum(1)[seg, position] + base[seg]
        if self.opts.pool == "mean":
            running = running / (position + 1 + counts[seg])[:, None, None]
        return sums, running[None]

    def _close(self, segs: Segments, ends: list[torch.Tensor], sums: torch.Tensor, unit_t: list[torch.Tensor] | None,
               incoming: dict | None, batch: int) -> list[CacheList]:
        """Per sequence its caches: the incoming ones, then those of the segments this call closes."""
        log = self.opts.segments == "log"
        lists = [CacheList(log) if incoming is None else
                 CacheList(log, int(incoming["units"]), list(incoming["ids"]), list(incoming["caches"][s].unbind(0)),
                           list(incoming["sums"][s].unbind(0)),
                           list(incoming["transitions"][s].unbind(0)) if self._composed else [])
                 for s in range(len(segs.closed))]
        compose = _compose if self._composed else None
        full, sequence, sums = segs.full.tolist(), segs.sequence.tolist(), sums.unbind(0)
        for i in range(len(full)):
            if full[i]:
                lists[sequence[i]].close(ends[i], sums[i], None if unit_t is None else unit_t[i], compose)
        return lists

    def _aggregate(self, q: torch.Tensor, online: torch.Tensor, lists: list[CacheList], running: torch.Tensor,
                   segs: Segments, n_old: int, x: torch.Tensor, read: Any) -> torch.Tensor:
        """``γ_on · online + read(γ, visible, offsets)`` per token ``[1, N, H, V]`` (γ by the aggregation):
        ``n_old`` caches per sequence from before this call."""
        counts = [len(c.ids) for c in lists]
        visible = (n_old + segs.ordinal[segs.token_segment])[None]  # caches closed before each token's segment
        if max(counts) == 0:
            if self.u_proj is None or not torch.is_grad_enabled():
                return online
            # γ_on = 1, a softmax over one score, taken through W_u so that every training step's graph uses it
            # (DistributedDataParallel requires each parameter to get a gradient; here a zero one)
            gamma_on, _ = self._gates(q, [None] * len(lists), running, segs, visible, x, 0, None)
            return gamma_on[..., None].to(online.dtype) * online
        width = max(counts)
        member = None
        if self.opts.segments == "log":  # the Fenwick caches of the token's segment among the visible ones
            # padded with id −2: its span [−1, 0) holds no segment, so no token reads it
            ids = torch.tensor([c.ids + [-2] * (width - len(c.ids)) for c in lists], device=q.device)
            seq_of_token = segs.sequence[segs.token_segment]
            before = torch.tensor([c.units - c_closed for c, c_closed in zip(lists, segs.closed)], device=q.device)
            member = members(before[seq_of_token] + segs.ordinal[segs.token_segment], ids[seq_of_token])
            member = member[None, :, None, :]
        if self.opts.aggregation == "residual":
            gamma_on, gamma = online.new_ones(online.shape[:3]), q.new_ones(*q.shape[:3], width)
            if member is not None:
                gamma = gamma * member
        else:
            pools = [torch.stack(c.pools(self.opts.segment_size, self.opts.pool == "mean")) if c.ids else None
                     for c in lists]
            gamma_on, gamma = self._gates(q, pools, running, segs, visible, x, width, member)
        offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], device=q.device)
        return gamma_on[..., None].to(online.dtype) * online + read(gamma.to(q.dtype), visible, offsets)

    def _gates(self, q: torch.Tensor, pools: list, running: torch.Tensor, segs: Segments, visible: torch.Tensor,
               x: torch.Tensor, width: int, member: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """γ: a softmax of ``⟨u_t, p⟩`` over the online summary and the visible (log: the token's own; ssc: the
        ``top_k`` selected among those) caches' summaries. Returns ``(γ_on [1, N, H], γ [1, N, H, width])``."""
        u = q if self.u_proj is None else heads(self.u_proj(x), self.key_dim).flatten(0, 1)[None]
        u = u.to(running.dtype)
        padded = torch.stack([F.pad(p, (0, 0, 0, 0, 0, width - p.shape[0])) if p is not None else
                              u.new_zeros(width, *u.shape[2:]) for p in pools])  # [n_seq, width, H, K]
        seq_of_token = segs.sequence[segs.token_segment]
        score = torch.einsum("thk,tnhk->thn", u[0], padded[seq_of_token].to(u.dtype))[None]  # [1, N, H, width]
        score_on = (u * running).sum(-1)  # [1, N, H]
        if member is not None:
            score = score.masked_fill(~member, -torch.inf)
        keep = select_top_k(score, visible, self.opts.top_k if self.opts.aggregation == "ssc" else None)
        if member is not None:
            keep = keep & member
        score = score.masked_fill(~keep, -torch.inf)
        gamma = torch.cat([score_on[..., None], score], dim=-1).softmax(-1)
        return gamma[..., 0], gamma[..., 1:]

    def _online_after(self, segs: Segments, ends: list[torch.Tensor], batch: int) -> torch.Tensor | None:
        """The online state after the call, per row: the last segment's end, or zeros (None) where it closed a
        segment and segments start independently."""
        last = _last_segments(segs, batch)
        if self.opts.segment_init == "independent" and all(segs.full[i] for i in last):
            return None
        out = torch.stack([ends[i] for i in last])
        if self.opts.segment_init == "independent":
            out = out * (~segs.full[last]).to(out.dtype)[:, None, None, None]
        return out

    def _next_state(self, segs: Segments, sums: torch.Tensor, lists: list[CacheList], unit_t: list | None, seen: int,
                    batch: int, v_dim: int) -> dict[str, Any]:
        """The caches a later token can read with their key sums and ids (rows share the ids), the segments
        closed, the running segment's key sum (and, independent log, its transition)."""
        last = _last_segments(segs, batch)
        open_sum = torch.stack([sums[i] * (0.0 if segs.full[i] else 1.0) for i in last])
        alive = [c.alive() for c in lists]
        empty = sums.new_zeros(batch, 0, self.num_heads, self.key_dim)
        state = {"ids": tuple(alive[0].ids), "units": alive[0].units,
                 "caches": _rows(alive, "states", empty[..., None].expand(*empty.shape, v_dim)),
                 "sums": _rows(alive, "sums", empty), "pool_sum": open_sum, "count": seen % self.opts.segment_size}
        if unit_t is not None:
            state["transitions"] = _rows(alive, "transitions", empty[..., None].expand(*empty.shape, self.key_dim))
            eye = torch.eye(self.key_dim, dtype=unit_t[0].dtype, device=unit_t[0].device)
            state["transition"] = torch.stack([eye.expand_as(unit_t[i]) if segs.full[i] else unit_t[i] for i in last])
        return state
