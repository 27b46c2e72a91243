"""What each memory of a Mixture-of-Memories layer is (``mom``'s ``base``; docs/design.md §4.3).

A memory kind adds its per-memory parameters to the MoM layer, turns the routed tokens' keys,
values and inputs into its kernel's arguments, and runs every bucket (a memory's tokens of one
sequence, packed) in one kernel call, each bucket from its own state:

* ``gated_deltanet`` (fla's MoM): per memory ``b_proj``, ``a_proj``; shared ``A_log``, ``dt_bias``;
  ``S_t = α_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t`` (the Gated DeltaNet recurrence);
* ``delta_net``: per memory ``b_proj``; the delta rule without decay;
* ``gla``: per memory the low-rank ``gk_proj``; channel-wise decay ``logσ(·)/16`` (GLA);
* ``titans_memory`` and its Miras presets (``moneta``, ``yaad``, ``memora``): per memory the deep
  memory's gates and start weights (:class:`memlm.layers.neural_memory.MemoryParameters`), written by
  chunked gradient descent. Its chunks start at each bucket's start, so decoding keeps, per bucket,
  the state at its last chunk start and the pending chunk's kernel inputs (as ``layers/periodic.py``
  does for one stream) and is exact.

Memory ``e < E`` uses the per-memory projections ``{name}.{e}``; the shared memory (index ``E``) uses
``shared_*`` (fla's names), as does every memory with ``single_kv_proj``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.kernels import deep_memory, linear_memory
from memlm.kernels.deep_memory.spec import MemorySpec
from memlm.layers.linear_common import heads, init_decay_rates
from memlm.layers.neural_memory import MemoryParameters, NeuralMemory
from memlm.layers.routing import Buckets

State = Any


def per_memory(owner: nn.Module, name: str, e: int) -> nn.Module:
    """Memory ``e``'s projection ``name`` (``k_proj`` …), or the shared one (``shared_k`` …)."""
    if e == owner.num_memories or owner.single_kv_proj:
        return getattr(owner, "shared_" + name.removesuffix("_proj"))
    return getattr(owner, name)[e]


def add_projections(owner: nn.Module, name: str, make: Any) -> None:
    """``owner.{name}`` (one per memory) and ``owner.shared_{stem}`` (shared memory or single_kv_proj)."""
    if not owner.single_kv_proj:
        setattr(owner, name, nn.ModuleList(make() for _ in range(owner.num_memories)))
    if owner.single_kv_proj or owner.shared_mem:
        setattr(owner, "shared_" + name.removesuffix("_proj"), make())


def by_memory(owner: nn.Module, name: str, x: torch.Tensor, buckets: Buckets) -> torch.Tensor:
    """``[1, N, ...]``: projection ``name`` of each copy's memory (every token projected: :meth:`Buckets.pick`)."""
    modules = [per_memory(owner, name, e) for e in range(owner.num_slots)]
    out = {id(m): m(x) for m in modules}
    return buckets.pick([out[id(m)] for m in modules])


def index_rows(state: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``[S, ...]`` of a ``[B, M, ...]`` per-(sequence, memory) state."""
    return state.flatten(0, 1)[rows]


def put_rows(state: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``state`` ``[B, M, ...]`` with ``rows`` replaced (unselected memories unchanged)."""
    flat = state.flatten(0, 1).clone()
    flat[rows] = values.to(flat.dtype)
    return flat.view_as(state)


class LinearKind(ABC):
    """A matrix memory ``[H, K, V]`` per bucket, run by ``memlm.kernels.linear_memory``."""

    normalize_qk = True

    @abstractmethod
    def build(self, owner: nn.Module, hidden_size: int, opts: Any) -> None:
        """Add the per-memory (and shared) gate projections to ``owner``."""

    def init_weights(self, owner: nn.Module, init: Any, std: float) -> None:  # noqa: B027  (optional hook)
        """Set what the generic ``Linear`` init does not (decay rates); nothing by default."""

    @abstractmethod
    def decay(self, owner: nn.Module, x: torch.Tensor, buckets: Buckets) -> dict[str, torch.Tensor]:
        """The kernel's gates (``g``, ``gk``, ``beta``) ``[1, N, H(, K)]`` of the copies, from the input ``x``."""

    def state_numel(self, owner: nn.Module) -> int:
        return owner.num_heads * owner.head_k_dim * owner.head_v_dim

    def fresh(self, owner: nn.Module, batch: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(batch, owner.num_slots, owner.num_heads, owner.head_k_dim, owner.head_v_dim,
                              dtype=torch.float32)

    def run(self, owner: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
            buckets: Buckets, rows: torch.Tensor, state: torch.Tensor | None, want_state: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        initial = None if state is None else index_rows(state, rows)
        o, final = linear_memory(q, k, v, **self.decay(owner, x, buckets), initial_state=initial,
                                 output_final_state=want_state, cu_seqlens=buckets.cu_seqlens)
        return o, (put_rows(state, rows, final) if want_state else None)


class GatedDeltaNetKind(LinearKind):
    """fla's MoM memory: ``g = −exp(A_log)·softplus(x W_a + dt_bias)``, ``β = σ(x W_β)`` (×2 with
    ``allow_neg_eigval``)."""

    def __init__(self, allow_neg_eigval: bool = False) -> None:
        self.allow_neg_eigval = allow_neg_eigval

    def build(self, owner: nn.Module, hidden_size: int, opts: Any) -> None:
        h = owner.num_heads
        add_projections(owner, "b_proj", lambda: nn.Linear(hidden_size, h, bias=False))
        add_projections(owner, "a_proj", lambda: nn.Linear(hidden_size, h, bias=False))
        owner.A_log = nn.Parameter(torch.zeros(h))
        owner.dt_bias = nn.Parameter(torch.zeros(h))

    def init_weights(self, owner: nn.Module, init: Any, std: float) -> None:
        init_decay_rates(init, owner.A_log, owner.dt_bias, 0.0, 16.0)

    def decay(self, owner: nn.Module, x: torch.Tensor, buckets: Buckets) -> dict[str, torch.Tensor]:
        a = by_memory(owner, "a_proj", x, buckets).float()
        g = -owner.A_log.float().exp() * F.softplus(a + owner.dt_bias.float())
        beta = by_memory(owner, "b_proj", x, buckets).float().sigmoid() * (2.0 if self.allow_neg_eigval else 1.0)
        return {"g": g, "beta": beta}


class DeltaNetKind(LinearKind):
    """The delta rule (no decay): ``β = σ(x W_β)`` (×2 with ``allow_neg_eigval``)."""

    def __init__(self, allow_neg_eigval: bool = False) -> None:
        self.allow_neg_eigval = allow_neg_eigval

    def build(self, owner: nn.Module, hidden_size: int, opts: Any) -> None:
        add_projections(owner, "b_proj", lambda: nn.Linear(hidden_size, owner.num_heads, bias=False))

    def decay(self, owner: nn.Module, x: torch.Tensor, buckets: Buckets) -> dict[str, torch.Tensor]:
        beta = by_memory(owner, "b_proj", x, buckets).float().sigmoid() * (2.0 if self.allow_neg_eigval else 1.0)
        return {"beta": beta}


class GLAKind(LinearKind):
    """GLA's channel-wise decay ``log α = logσ(x W_1 W_2 + b) / gate_logit_normalizer`` (clamped below
    at ``clamp_min``), read with the raw (un-normalised) q, k as GLA does."""

    normalize_qk = False

    def __init__(self, gate_logit_normalizer: float = 16.0, gate_low_rank_dim: int = 16,
                 clamp_min: float | None = None) -> None:
        self.normalizer, self.rank, self.clamp_min = gate_logit_normalizer, gate_low_rank_dim, clamp_min

    def build(self, owner: nn.Module, hidden_size: int, opts: Any) -> None:
        add_projections(owner, "gk_proj", lambda: nn.Sequential(nn.Linear(hidden_size, self.rank, bias=False),
                                                                nn.Linear(self.rank, owner.key_dim, bias=True)))

    def decay(self, owner: nn.Module, x: torch.Tensor, buckets: Buckets) -> dict[str, torch.Tensor]:
        gk = F.logsigmoid(heads(by_memory(owner, "gk_proj", x, buckets), owner.head_k_dim).float()) / self.normalizer
        return {"gk": gk if self.clamp_min is None else gk.clamp_min(self.clamp_min)}


class DeepMemoryUnit(MemoryParameters, nn.Module):
    """One deep memory of a MoM layer: its gates and start weights (its k, v projections are the layer's)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, opts: Any, spec: MemorySpec) -> None:
        super().__init__()
        self.opts, self.spec, self.num_heads, self.head_dim = opts, spec, num_heads, head_dim
        self.build_memory(hidden_size)

    def init_weights(self, init: Any, std: float) -> None:
        self.init_memory(init)


class DeepKind:
    """The Titans / Miras deep memory per bucket (``memories.{e}``, the shared one ``shared_memory``)."""

    normalize_qk = True
    # NeuralMemory options the MoM layer owns (its geometry and convolutions) or that have no meaning per bucket
    OWNED = ("num_heads", "head_dim", "short_conv", "conv_size", "num_persistent")

    def __init__(self, opts: Any) -> None:
        self.opts = opts
        self.spec = MemorySpec(chunk_size=opts.chunk_size, activation=opts.activation, residual=opts.residual,
                               norm=opts.memory_norm, lag_token=opts.lag_token, **opts.hooks())

    def build(self, owner: nn.Module, hidden_size: int, opts: Any) -> None:
        def unit() -> DeepMemoryUnit:
            return DeepMemoryUnit(hidden_size, owner.num_heads, owner.head_k_dim, self.opts, self.spec)

        owner.memories = nn.ModuleList(unit() for _ in range(owner.num_memories))
        owner.shared_memory = unit() if owner.shared_mem else None

    def init_weights(self, owner: nn.Module, init: Any, std: float) -> None:
        """The units initialise themselves (``DeepMemoryUnit.init_weights``)."""

    def units(self, owner: nn.Module) -> list[DeepMemoryUnit]:
        return [*owner.memories, *([owner.shared_memory] if owner.shared_memory is not None else [])]

    def state_numel(self, owner: nn.Module) -> int:
        per_layer = sum(w[0].numel() for w in owner.memories[0].memory_weights)
        return owner.num_heads * per_layer * (2 if self.opts.momentum else 1)

    def fresh(self, owner: nn.Module, batch: int, like: torch.Tensor) -> dict[str, Any]:
        """Every (sequence, memory) at its memory's start weights, zero momentum, no pending tokens."""
        start = [torch.stack(ws) for ws in zip(*(u.start_weights() for u in self.units(owner)))]
        weights = [w.detach()[None].expand(batch, *w.shape).clone() for w in start]
        momentum = [torch.zeros_like(w) for w in weights] if self.opts.momentum else None
        return {"weights": weights, "momentum": momentum, "pending": None,
                "count": torch.zeros(batch, owner.num_slots, dtype=torch.long, device=like.device)}

    def inputs(self, owner: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
               buckets: Buckets) -> dict[str, torch.Tensor | None]:
        """The kernel's per-copy inputs ``[1, N, H, ...]``: q, k (unit norm), v (RMS-normalised with
        ``value_norm``) and the gates θ, η, α, δ of each copy's memory."""
        if self.opts.value_norm:
            v = F.rms_norm(v, (v.shape[-1],), eps=1e-6)
        units = self.units(owner)
        per_unit = [u.gates(x) for u in units]
        gates = [None if g[0] is None else buckets.pick(g) for g in zip(*per_unit)]
        return dict(zip(("q", "k", "v", "lr", "eta", "alpha", "delta"), (q, k, v, *gates)))

    def _kernel(self, inputs: dict[str, Any], weights: list[torch.Tensor], momentum: list[torch.Tensor] | None,
                cu_seqlens: torch.Tensor, want_state: bool) -> tuple[torch.Tensor, Any]:
        dtype = inputs["q"].dtype
        return deep_memory(inputs["q"], inputs["k"], inputs["v"], inputs["lr"], inputs["eta"], inputs["alpha"],
                           [w.to(dtype) for w in weights], self.spec, delta=inputs["delta"],
                           initial_momentum=None if momentum is None else [s.to(dtype) for s in momentum],
                           output_final_state=want_state, cu_seqlens=cu_seqlens, backend=self.opts.backend)

    def run(self, owner: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
            buckets: Buckets, rows: torch.Tensor, state: dict[str, Any] | None, want_state: bool
            ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        inputs = self.inputs(owner, q, k, v, x, buckets)
        if state is None:  # a fresh forward: every bucket from its memory's start weights, one call
            start = [torch.stack(ws) for ws in zip(*(u.start_weights() for u in self.units(owner)))]
            weights = [w[buckets.memory] for w in start]
            return self._kernel(inputs, weights, None, buckets.cu_seqlens, False)[0], None
        return self._run_periodic(inputs, buckets, rows, state)

    def _run_periodic(self, inputs: dict[str, Any], buckets: Buckets, rows: torch.Tensor, state: dict[str, Any]
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Each bucket continues its pending chunk: the pending inputs go before the new ones, whole chunks
        run from the chunk-start state (which they advance), the rest runs from the new chunk start and
        becomes the pending chunk. Exactly the fresh forward's chunking, bucket by bucket."""
        chunk, device = self.spec.chunk_size, rows.device
        lengths = buckets.cu_seqlens[1:] - buckets.cu_seqlens[:-1]
        pending_n = state["count"].flatten()[rows]
        total = pending_n + lengths
        # the joined sequence per bucket: pending first (their rows of the padded buffer), then the new copies
        seg = torch.repeat_interleave(torch.arange(rows.numel(), device=device), total)
        starts = F.pad(total.cumsum(0), (1, 0))[:-1]
        pos = torch.arange(int(total.sum()), device=device) - starts[seg]
        is_new = pos >= pending_n[seg]
        new_index = buckets.cu_seqlens[seg] + pos - pending_n[seg]
        joined = {}
        for name, t in inputs.items():
            if t is None:
                joined[name] = None
                continue
            out = t.new_zeros(1, seg.numel(), *t.shape[2:])
            out[0, is_new] = t[0, new_index[is_new]]
            if state["pending"] is not None:
                buf = state["pending"][name].flatten(0, 1)  # [B·M, C−1, ...]
                out[0, ~is_new] = buf[rows[seg[~is_new]], pos[~is_new]].to(t.dtype)
            joined[name] = out
        full = total // chunk * chunk
        in_full = pos < full[seg]
        weights = [index_rows(w, rows) for w in state["weights"]]
        momentum = None if state["momentum"] is None else [index_rows(s, rows) for s in state["momentum"]]
        out = next(iter(joined.values())).new_zeros(1, seg.numel(), *inputs["v"].shape[2:])
        has_full = full > 0
        if bool(has_full.any()):
            cu = F.pad(full[has_full].cumsum(0), (1, 0))
            part = {n: None if t is None else t[:, in_full] for n, t in joined.items()}
            sel = has_full.nonzero().squeeze(-1)
            o, (w_new, s_new) = self._kernel(part, [w[sel] for w in weights],
                                             None if momentum is None else [s[sel] for s in momentum], cu, True)
            out[0, in_full] = o[0]
            weights = [w.index_copy(0, sel, n.to(w.dtype)) for w, n in zip(weights, w_new)]
            if momentum is not None:
                momentum = [s.index_copy(0, sel, n.to(s.dtype)) for s, n in zip(momentum, s_new)]
        rest = total - full
        has_rest = rest > 0
        if bool(has_rest.any()):
            cu = F.pad(rest[has_rest].cumsum(0), (1, 0))
            part = {n: None if t is None else t[:, ~in_full] for n, t in joined.items()}
            sel = has_rest.nonzero().squeeze(-1)
            o, _ = self._kernel(part, [w[sel] for w in weights],
                                None if momentum is None else [s[sel] for s in momentum], cu, False)
            out[0, ~in_full] = o[0]
        new_state = dict(state)
        new_state["weights"] = [put_rows(w, rows, n) for w, n in zip(state["weights"], weights)]
        if momentum is not None:
            new_state["momentum"] = [put_rows(s, rows, n) for s, n in zip(state["momentum"], momentum)]
        new_state["count"] = put_rows(state["count"], rows, rest)
        new_state["pending"] = self._pending(state, joined, rows, seg, pos - full[seg], ~in_full, chunk)
        return out[:, is_new], new_state

    @staticmethod
    def _pending(state: dict[str, Any], joined: dict[str, Any], rows: torch.Tensor, seg: torch.Tensor,
                 offset: torch.Tensor, keep: torch.Tensor, chunk: int) -> dict[str, torch.Tensor]:
        """The padded pending buffers ``[B, M, C−1, ...]`` with each run bucket's unfinished chunk."""
        batch, slots = state["count"].shape
        pending = {}
        for name, t in joined.items():
            if t is None:
                continue
            old = state["pending"][name] if state["pending"] is not None else \
                t.new_zeros(batch, slots, max(chunk - 1, 1), *t.shape[2:])
            flat = old.flatten(0, 1).clone()
            flat[rows[seg[keep]], offset[keep]] = t[0, keep].to(flat.dtype)
            pending[name] = flat.view_as(old)
        return pending


def make_kind(base: Any) -> LinearKind | DeepKind:
    """The memory kind of a validated base spec ``(class, options)`` (:func:`base_kind` checks it)."""
    cls, opts = base
    if issubclass(cls, NeuralMemory):
        return DeepKind(opts)
    extra = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name in KINDS[cls.mixer_name][1]}
    return KINDS[cls.mixer_name][0](**extra)


# linear bases: the kind and the options of the base spec it takes (the rest of the geometry is the MoM layer's)
KINDS: dict[str, tuple[type, tuple[str, ...]]] = {
    "gated_deltanet": (GatedDeltaNetKind, ("allow_neg_eigval",)),
    "delta_net": (DeltaNetKind, ("allow_neg_eigval",)),
    "gla": (GLAKind, ("gate_logit_normalizer", "gate_low_rank_dim", "clamp_min")),
}
