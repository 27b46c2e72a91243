"""Triton path of the deep-memory op: an autograd Function over the forward/backward kernels.

``deep_memory_triton`` is called by the public op with validated inputs and implements the
same semantics (Titans chunked GD with momentum and decay, docs/design.md §3; the Miras hooks of
``naive``) for one linear layer (any ``residual``/``norm``) or the two-layer GELU MLP, with every
attentional bias ψ and retention map (``TRITON_HOOKS`` of ``memlm.kernels.deep_memory``). The forward
stores every chunk-start state (float32; with a retention map also the weights ``W = R(A)``) when a
gradient is needed; the backward walks the chunks in reverse from them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
import triton
from torch.autograd.function import once_differentiable

from ..objectives import BIASES, RETENTIONS, Retention, dual_state, exchanged_state, hook_parameters
from ..spec import MemorySpec
from ..state import State
from .bwd import deep_memory_bwd
from .fwd import block_size, deep_memory_fwd

TRITON_ACTIVATIONS = ("gelu",)
MAX_HEAD_DIM = 128
MAX_CHUNK = 64


@dataclass(frozen=True)
class _Config:
    """Static options of one call (not tensors, so not autograd inputs)."""

    spec: MemorySpec
    block_hidden: int
    store_states: bool
    depth: int
    has_initial_momentum: bool
    hooks: dict[str, object]  # the kernels' BIAS, BIAS_PARAMS, RETENTION, RETENTION_PARAMS
    mirror: Retention  # W = R(A), the same map in PyTorch (initial weights and their VJP)

    @property
    def retains(self) -> bool:
        """Whether a retention map separates the weights ``W = R(A)`` from the state ``A``."""
        return self.hooks["RETENTION"] != "none"


def _slot_layout(
    q: torch.Tensor, cu_seqlens: torch.Tensor | None, chunk_size: int, store: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """First slot of each sequence, the slot of its final state, and the number of slots.

    With ``store`` a sequence of ``c`` chunks owns ``c + 1`` consecutive slots (every chunk-start
    state and the final one); otherwise one slot updated in place.
    """
    B, T = q.shape[:2]
    lengths = [T] * B if cu_seqlens is None else torch.diff(cu_seqlens).tolist()
    owned = [triton.cdiv(n, chunk_size) + 1 if store else 1 for n in lengths]
    first = [0, *accumulate(owned)][:-1]
    final = [f + o - 1 for f, o in zip(first, owned)]
    device = q.device
    return (
        torch.tensor(first, dtype=torch.int32, device=device),
        torch.tensor(final, dtype=torch.long, device=device),
        sum(owned),
    )


def _new_slots(init: torch.Tensor | None, like: torch.Tensor, n_slots: int, first: torch.Tensor) -> torch.Tensor:
    """Float32 slot tensor ``[n_slots, H, d_in, d_out]`` whose first slots hold ``init`` (0 if None)."""
    H, d_in, d_out = like.shape[-3:]
    slots = torch.empty(n_slots, H, d_in, d_out, dtype=torch.float32, device=like.device)
    n = first.numel()
    slots[first.long()] = 0.0 if init is None else init.float().expand(n, H, d_in, d_out)
    return slots


def _weight_slots(A_slots: torch.Tensor, first: torch.Tensor, cfg: _Config) -> torch.Tensor:
    """The weights' slots: ``R(A_0)`` in the first slots with a retention map, else the state's slots."""
    if not cfg.retains:
        return A_slots
    W_slots = torch.empty_like(A_slots)
    W_slots[first.long()] = cfg.mirror(A_slots[first.long()])
    return W_slots


def _reduce(grad: torch.Tensor, like: tuple[int, torch.dtype]) -> torch.Tensor:
    """Gradient of an initial state given shared ``[H, ...]`` (sum over sequences) or per sequence;
    ``like`` is that state's ``(dim, dtype)``."""
    dim, dtype = like
    return (grad.sum(0) if dim == 3 else grad).to(dtype)


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """``grad`` in ``like``'s dtype, None for an absent input."""
    return None if like is None else grad.to(like.dtype)


class DeepMemoryTritonFunction(torch.autograd.Function):
    """``(o, A_T..., S_T...) = f(q, k, v, θ, η, α, δ, A_0..., S_0...)`` with Triton forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, lr, momentum, forget, delta, cu_seqlens, cfg: _Config, *state):
        states = state[: cfg.depth]
        init_momentum = state[cfg.depth :] if cfg.has_initial_momentum else (None,) * cfg.depth
        first, final, n_slots = _slot_layout(q, cu_seqlens, cfg.spec.chunk_size, cfg.store_states)
        A_slots = [_new_slots(a, a, n_slots, first) for a in states]
        S_slots = [_new_slots(s, a, n_slots, first) for s, a in zip(init_momentum, states)]
        W_slots = [_weight_slots(a, first, cfg) for a in A_slots]
        o = deep_memory_fwd(
            q, k, v, lr, momentum, forget, delta, A_slots, S_slots, W_slots, first, cu_seqlens,
            chunk_size=cfg.spec.chunk_size, residual=cfg.spec.residual, norm=cfg.spec.norm,
            store_states=cfg.store_states, block_hidden=cfg.block_hidden, hooks=cfg.hooks,
        )
        A_T = [a_slots[final].to(a.dtype) for a_slots, a in zip(A_slots, states)]
        S_T = [ss[final].to(a.dtype if s is None else s.dtype) for ss, s, a in zip(S_slots, init_momentum, states)]
        if cfg.store_states:
            weights = W_slots if cfg.retains else []
            ctx.save_for_backward(q, k, v, lr, momentum, forget, delta, cu_seqlens, first, *A_slots, *S_slots,
                                  *weights)
            ctx.cfg = cfg
            ctx.state_like = [(t.dim(), t.dtype) for t in state]
        ctx.set_materialize_grads(False)
        return (o, *A_T, *S_T)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, *grads_final):
        cfg: _Config = ctx.cfg
        q, k, v, lr, momentum, forget, delta, cu_seqlens, first, *slots = ctx.saved_tensors
        A_slots, S_slots = slots[: cfg.depth], slots[cfg.depth : 2 * cfg.depth]
        W_slots = slots[2 * cfg.depth :] if cfg.retains else A_slots
        n = first.numel()

        def carry(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
            shape = (n, *like.shape[1:])
            return torch.zeros(shape, dtype=torch.float32, device=like.device) if g is None else g.float().clone()

        dA = [carry(g, a) for g, a in zip(grads_final[: cfg.depth], A_slots)]
        dS = [carry(g, s) for g, s in zip(grads_final[cfg.depth :], S_slots)]
        dW = [torch.zeros_like(g) for g in dA] if cfg.retains else dA
        if do is None:
            do = torch.zeros_like(q)
        dq, dk, dv, dlr, dmomentum, dforget, ddelta = deep_memory_bwd(
            q, k, v, lr, momentum, forget, delta, do.contiguous(), list(A_slots), list(S_slots), list(W_slots),
            dA, dS, dW, first, cu_seqlens, chunk_size=cfg.spec.chunk_size, residual=cfg.spec.residual,
            norm=cfg.spec.norm, block_hidden=cfg.block_hidden, hooks=cfg.hooks,
        )
        if cfg.retains:  # ∂L/∂A_0 += J_R(A_0)ᵀ ∂L/∂W_0
            dA = [g + torch.func.vjp(cfg.mirror, a[first.long()])[1](w)[0] for g, a, w in zip(dA, A_slots, dW)]
        like = ctx.state_like
        dA0 = [_reduce(g, a) for g, a in zip(dA, like[: cfg.depth])]
        dS0 = [_reduce(g, s) for g, s in zip(dS, like[cfg.depth :])]
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dlr.to(lr.dtype), _cast(dmomentum, momentum),
            _cast(dforget, forget), _cast(ddelta, delta), None, None, *dA0, *dS0,
        )


def _check_supported(
    q: torch.Tensor, gates: dict[str, torch.Tensor | None], weights: Sequence[torch.Tensor], spec: MemorySpec,
    block_hidden: int | None,
) -> None:
    """ValueError for what the Triton path does not implement (the public op checks the rest; its ``select_path``
    sends only (bias, retention) pairs of ``TRITON_HOOKS`` here)."""
    for name, gate in gates.items():
        if gate is not None and gate.dim() != 3:
            raise ValueError(f"{name}: the Triton path takes per-head gates [B, T, H], got {list(gate.shape)}")
    if spec.activation not in TRITON_ACTIVATIONS:
        raise ValueError(f"activation={spec.activation!r}: the Triton path supports {TRITON_ACTIVATIONS}")
    if len(weights) not in (1, 2):
        raise ValueError(f"weights: the Triton path supports 1 or 2 layers, got {len(weights)}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in [1, {MAX_HEAD_DIM}] for the Triton path, got {q.shape[-1]}")
    if not 1 <= spec.chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}] for the Triton path, got {spec.chunk_size}")
    if block_hidden is not None and (block_hidden < 16 or block_hidden & (block_hidden - 1)):
        raise ValueError(f"block_hidden must be a power of two >= 16, got {block_hidden}")


def _parameters(fn: Callable[..., torch.Tensor], params: Mapping[str, float] | None) -> tuple[float, ...]:
    """A hook's scalar parameters with their defaults, in the order of its signature (the kernels'
    constexpr tuple)."""
    return tuple(float(value) for value in {**hook_parameters(fn), **(params or {})}.values())


def _retention_parameters(spec: MemorySpec, weights: Sequence[torch.Tensor]) -> tuple[float, ...]:
    """The retention map's constexpr tuple: its parameters and, for ``lq`` (whose mean runs over a layer's
    ``d_in·d_out`` entries, which the kernels see only as zero-padded tiles), that number of entries ``n``
    (the same for every layer the kernels take: ``[D, D]``, or ``[D, d_1]`` and ``[d_1, D]``)."""
    params = _parameters(RETENTIONS[spec.retention], spec.retention_params)
    if spec.retention != "lq":
        return params
    sizes = {w.shape[-2] * w.shape[-1] for w in weights}
    if len(sizes) != 1:
        raise ValueError(f"retention='lq' on the Triton path needs layers of one size, got {sorted(sizes)} entries")
    return (*params, float(sizes.pop()))


def deep_memory_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor | None,
    forget: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    spec: MemorySpec,
    *,
    delta: torch.Tensor | None = None,
    initial_momentum: Sequence[torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    block_hidden: int | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Chunked deep memory (Titans eqs. 13–14, chunked GD; Miras biases and retention maps) with Triton kernels.

    The memory is ``spec``; the other arguments and the result are the public ``deep_memory`` op's (inputs
    already validated);
    ``block_hidden`` is the hidden-tile width of the two-layer kernels (power of two, default
    ``min(32, next_pow2(d_1))``). Differentiable w.r.t. every tensor input. The kernels carry the state
    ``A``; the exchange with the caller (``log W`` in, ``R(A_T)`` out for ``softmax``) is
    :func:`.objectives.dual_state` / :func:`.objectives.exchanged_state`, differentiated by autograd.
    """
    gates = dict(lr=lr, momentum=momentum, forget=forget, delta=delta)
    _check_supported(q, gates, weights, spec, block_hidden)
    depth = len(weights)
    if block_hidden is None:
        block_hidden = min(32, block_size(weights[0].shape[-1]))
    inputs = [q, k, v, lr, momentum, forget, delta, *weights, *(initial_momentum or [])]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    mirror = spec.mirror()
    hooks = dict(
        BIAS=spec.bias, BIAS_PARAMS=_parameters(BIASES[spec.bias], spec.bias_params),
        RETENTION=spec.retention, RETENTION_PARAMS=_retention_parameters(spec, weights),
    )
    cfg = _Config(
        spec=spec, block_hidden=block_hidden, store_states=needs_grad, depth=depth,
        has_initial_momentum=initial_momentum is not None, hooks=hooks, mirror=mirror,
    )
    gates = [g if g is None else g.contiguous() for g in gates.values()]
    state = [a.contiguous() for a in dual_state(spec.retention, weights)]
    state += [s.contiguous() for s in (initial_momentum or [])]
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32)
    o, *final = DeepMemoryTritonFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), *gates, cu_seqlens, cfg, *state
    )
    if not output_final_state:
        return o, None
    return o, (exchanged_state(spec.retention, mirror, final[:depth]), final[depth:])
