"""Per-token reference of the cached-memory readout: the definition of correctness.

Memory Caching (Behrouz et al. 2026, arXiv 2602.24281; docs/design.md §4.4): the recurrent memory's state is
cached at segment ends, and a token reads the caches visible to it, ``I_t = {0, …, v_t − 1}`` of its own
sequence, weighted by ``γ``:

    matrix memory:  o_t = scale · Σ_{i ∈ J_t} γ'_{t,i} · q_t S_i
    deep memory:    o_t = Σ_{i ∈ J_t} γ'_{t,i} · M_{W_i}(q_t)

with ``J_t ⊆ I_t`` the ``top_k`` caches with the largest ``γ`` and ``γ'`` the kept (optionally renormalised)
weights, written out here token by token and head by head (``selection.py`` has the rule in words). A plain
loop, differentiable by autograd; float64 inputs stay float64, anything else is computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..deep_memory.mlp import memory_apply, weight_linear
from ..deep_memory.spec import MemorySpec
from .layout import sequences
from .retention import read_weights


def token_weights(gamma: torch.Tensor, v: int, top_k: int | None, renormalize: bool) -> list[tuple[int, torch.Tensor]]:
    """``(i, γ'_i)`` for the caches one token reads in one head, from its weights ``gamma`` ``[N]`` and its
    ``v`` visible caches."""
    visible = list(range(v))
    if top_k is None or top_k >= v:
        return [(i, gamma[i]) for i in visible]
    by_weight = sorted(visible, key=lambda i: -gamma[i].item())  # a stable sort: ties keep the lower index first
    kept = sorted(by_weight[:top_k])
    if not renormalize:
        return [(i, gamma[i]) for i in kept]
    total, part = sum(gamma[i] for i in visible), sum(gamma[i] for i in kept)
    factor = total / part if part.item() != 0 else 1.0
    return [(i, gamma[i] * factor) for i in kept]


def _readout(
    q: torch.Tensor,
    read: Callable[[int, torch.Tensor], torch.Tensor],
    n_caches: int,
    gamma: torch.Tensor,
    visible: torch.Tensor,
    top_k: int | None,
    renormalize: bool,
    cu_seqlens: torch.Tensor | None,
    cache_offsets: torch.Tensor | None,
) -> list[list[torch.Tensor | None]]:
    """The loop shared by both memories: ``read(c, q_t)`` is the memory of flattened cache ``c`` read by the
    ``[H, K]`` query of one token, ``[H, V]``. Returns, per token and head, the output (None: reads nothing)."""
    B, T, H = q.shape[:3]
    q_flat, g_flat, v_flat = q.reshape(B * T, H, -1), gamma.reshape(B * T, H, -1), visible.reshape(B * T).tolist()
    outputs = []
    for span in sequences(B, T, n_caches, cu_seqlens, cache_offsets):
        for t in range(span.tok_start, span.tok_end):
            v = v_flat[t]
            reads = [read(span.cache_start + i, q_flat[t]) for i in range(v)]  # [H, V] each
            heads = []
            for h in range(H):
                terms = [w * reads[i][h] for i, w in token_weights(g_flat[t, h], v, top_k, renormalize)]
                heads.append(sum(terms) if terms else None)
            outputs.append(heads)
    return outputs


def _stack(outputs: list[list[torch.Tensor | None]], shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """The per-token, per-head outputs as one ``shape`` tensor (zeros where a token reads nothing)."""
    zero = like.new_zeros(shape[-1])
    rows = [torch.stack([zero if o is None else o for o in heads]) for heads in outputs]
    return torch.stack(rows).reshape(*shape)


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (the reference precision); every other dtype is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def naive_cached_readout(
    q: torch.Tensor,
    states: torch.Tensor,
    gamma: torch.Tensor,
    visible: torch.Tensor,
    top_k: int | None = None,
    renormalize: bool = False,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cache_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """``o_t = scale · Σ_{i ∈ J_t} γ'_{t,i} q_t S_i`` one token and head at a time.

    Shapes: q ``[B, T, H, K]``, states ``[B, N, H, K, V]`` (packed: ``[1, N_total, H, K, V]``), gamma
    ``[B, T, H, N]``, visible ``[B, T]``. Returns ``o [B, T, H, V]`` in q's dtype.
    """
    B, T, H, K = q.shape
    V = states.shape[-1]
    dtype = accumulation_dtype(q)
    scale = K**-0.5 if scale is None else scale
    S = states.to(dtype).reshape(-1, H, K, V)
    q_, g_ = q.to(dtype), gamma.to(dtype)
    outputs = _readout(
        q_, lambda c, q_t: torch.einsum("hk,hkv->hv", q_t, S[c]), states.shape[1], g_, visible, top_k,
        renormalize, cu_seqlens, cache_offsets,
    )
    return (scale * _stack(outputs, (B, T, H, V), q_)).to(q.dtype)


def naive_cached_readout_mlp(
    q: torch.Tensor,
    states: Sequence[torch.Tensor],
    gamma: torch.Tensor,
    visible: torch.Tensor,
    spec: MemorySpec,
    top_k: int | None = None,
    renormalize: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cache_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """``o_t = Σ_{i ∈ J_t} γ'_{t,i} M_{W_i}(q_t)`` one token and head at a time, ``M`` the deep memory of
    ``spec`` computed by :func:`..deep_memory.mlp.memory_apply` with the weights ``W_i = R(A_i)`` of cache ``i``.

    Shapes: q ``[B, T, H, D]``, ``states[l]`` ``[B, N, H, d_{l−1}, d_l]``, gamma ``[B, T, H, N]``, visible
    ``[B, T]``. Returns ``o [B, T, H, D]`` in q's dtype.
    """
    B, T, H, D = q.shape
    dtype = accumulation_dtype(q)
    layers = [w.reshape(-1, *w.shape[2:]) for w in read_weights(spec, [s.to(dtype) for s in states])]
    q_, g_ = q.to(dtype), gamma.to(dtype)

    def read(c: int, q_t: torch.Tensor) -> torch.Tensor:
        out, _ = memory_apply(q_t[:, None, :], weight_linear([w[c] for w in layers]), len(layers), spec)
        return out[:, 0]

    outputs = _readout(q_, read, states[0].shape[1], g_, visible, top_k, renormalize, cu_seqlens, cache_offsets)
    return _stack(outputs, (B, T, H, D), q_).to(q.dtype)
