"""Triton path of the deep-memory op: an autograd Function over the forward/backward kernels.

``deep_memory_triton`` is called by the public op with validated inputs and implements the
same semantics (Titans chunked GD with momentum and decay, DESIGN.md §3) for one linear layer
(any ``residual``/``norm``) or the two-layer GELU MLP, ψ = ℓ2 and no chunk-end retention.
The forward stores every chunk-start state (float32) when a gradient is needed; the backward
walks the chunks in reverse from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
import triton
from torch.autograd.function import once_differentiable

from .triton_bwd import deep_memory_bwd
from .triton_fwd import block_size, deep_memory_fwd

State = tuple[list[torch.Tensor], list[torch.Tensor]]

TRITON_ACTIVATIONS = ("gelu",)
TRITON_BIASES = ("l2",)
TRITON_RETENTIONS = ("none",)
MAX_HEAD_DIM = 128
MAX_CHUNK = 64


@dataclass(frozen=True)
class _Config:
    """Static options of one call (not tensors, so not autograd inputs)."""

    chunk_size: int
    residual: bool
    norm: bool
    block_hidden: int
    store_states: bool
    depth: int
    has_initial_momentum: bool


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


def _reduce(grad: torch.Tensor, like: tuple[int, torch.dtype]) -> torch.Tensor:
    """Gradient of an initial state given shared ``[H, ...]`` (sum over sequences) or per sequence;
    ``like`` is that state's ``(dim, dtype)``."""
    dim, dtype = like
    return (grad.sum(0) if dim == 3 else grad).to(dtype)


class DeepMemoryTritonFunction(torch.autograd.Function):
    """``(o, W_T..., S_T...) = f(q, k, v, θ, η, α, W_0..., S_0...)`` with Triton forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, lr, momentum, forget, cu_seqlens, cfg: _Config, *state):
        weights = state[: cfg.depth]
        init_momentum = state[cfg.depth :] if cfg.has_initial_momentum else (None,) * cfg.depth
        first, final, n_slots = _slot_layout(q, cu_seqlens, cfg.chunk_size, cfg.store_states)
        W_slots = [_new_slots(w, w, n_slots, first) for w in weights]
        S_slots = [_new_slots(s, w, n_slots, first) for s, w in zip(init_momentum, weights)]
        o = deep_memory_fwd(
            q, k, v, lr, momentum, forget, W_slots, S_slots, first, cu_seqlens,
            chunk_size=cfg.chunk_size, residual=cfg.residual, norm=cfg.norm,
            store_states=cfg.store_states, block_hidden=cfg.block_hidden,
        )
        W_T = [ws[final].to(w.dtype) for ws, w in zip(W_slots, weights)]
        S_T = [ss[final].to(w.dtype if s is None else s.dtype) for ss, s, w in zip(S_slots, init_momentum, weights)]
        if cfg.store_states:
            ctx.save_for_backward(q, k, v, lr, momentum, forget, cu_seqlens, first, *W_slots, *S_slots)
            ctx.cfg = cfg
            ctx.state_like = [(t.dim(), t.dtype) for t in state]
        ctx.set_materialize_grads(False)
        return (o, *W_T, *S_T)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, *grads_final):
        cfg: _Config = ctx.cfg
        q, k, v, lr, momentum, forget, cu_seqlens, first, *slots = ctx.saved_tensors
        W_slots, S_slots = slots[: cfg.depth], slots[cfg.depth :]
        n = first.numel()

        def carry(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
            shape = (n, *like.shape[1:])
            return torch.zeros(shape, dtype=torch.float32, device=like.device) if g is None else g.float().clone()

        dW = [carry(g, ws) for g, ws in zip(grads_final[: cfg.depth], W_slots)]
        dS = [carry(g, ss) for g, ss in zip(grads_final[cfg.depth :], S_slots)]
        if do is None:
            do = torch.zeros_like(q)
        dq, dk, dv, dlr, dmomentum, dforget = deep_memory_bwd(
            q, k, v, lr, momentum, forget, do.contiguous(), list(W_slots), list(S_slots), dW, dS, first,
            cu_seqlens, chunk_size=cfg.chunk_size, residual=cfg.residual, norm=cfg.norm,
            block_hidden=cfg.block_hidden,
        )
        like = ctx.state_like
        dW0 = [_reduce(g, w) for g, w in zip(dW, like[: cfg.depth])]
        dS0 = [_reduce(g, s) for g, s in zip(dS, like[cfg.depth :])]
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dlr.to(lr.dtype),
            None if momentum is None else dmomentum.to(momentum.dtype),
            None if forget is None else dforget.to(forget.dtype),
            None, None, *dW0, *dS0,
        )


def _check_supported(
    q: torch.Tensor, weights: Sequence[torch.Tensor], chunk_size: int, activation: str, bias: str,
    retention: str, block_hidden: int | None,
) -> None:
    """ValueError for what the Triton path does not implement (the public op checks the rest)."""
    if activation not in TRITON_ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: the Triton path supports {TRITON_ACTIVATIONS}")
    if bias not in TRITON_BIASES:
        raise ValueError(f"bias={bias!r}: the Triton path supports {TRITON_BIASES}")
    if retention not in TRITON_RETENTIONS:
        raise ValueError(f"retention={retention!r}: the Triton path supports {TRITON_RETENTIONS}")
    if len(weights) not in (1, 2):
        raise ValueError(f"weights: the Triton path supports 1 or 2 layers, got {len(weights)}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in [1, {MAX_HEAD_DIM}] for the Triton path, got {q.shape[-1]}")
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}] for the Triton path, got {chunk_size}")
    if block_hidden is not None and (block_hidden < 16 or block_hidden & (block_hidden - 1)):
        raise ValueError(f"block_hidden must be a power of two >= 16, got {block_hidden}")


def deep_memory_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor | None,
    forget: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    *,
    chunk_size: int,
    residual: bool,
    norm: bool,
    activation: str,
    initial_momentum: Sequence[torch.Tensor] | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    bias: str = "l2",
    retention: str = "none",
    block_hidden: int | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Chunked deep memory (Titans eqs. 13–14, chunked GD) with Triton kernels.

    Same arguments and result as the public ``deep_memory`` op (inputs already validated);
    ``block_hidden`` is the hidden-tile width of the two-layer kernels (power of two, default
    ``min(32, next_pow2(d_1))``). Differentiable w.r.t. every tensor input.
    """
    _check_supported(q, weights, chunk_size, activation, bias, retention, block_hidden)
    depth = len(weights)
    if block_hidden is None:
        block_hidden = min(32, block_size(weights[0].shape[-1]))
    inputs = [q, k, v, lr, momentum, forget, *weights, *(initial_momentum or [])]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    cfg = _Config(
        chunk_size=chunk_size, residual=residual, norm=norm, block_hidden=block_hidden,
        store_states=needs_grad, depth=depth, has_initial_momentum=initial_momentum is not None,
    )
    gates = [g if g is None else g.contiguous() for g in (lr, momentum, forget)]
    state = [w.contiguous() for w in weights] + [s.contiguous() for s in (initial_momentum or [])]
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32)
    o, *final = DeepMemoryTritonFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), *gates, cu_seqlens, cfg, *state
    )
    if not output_final_state:
        return o, None
    return o, (final[:depth], final[depth:])
