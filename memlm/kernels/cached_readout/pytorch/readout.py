"""Vectorised PyTorch paths of the cached readout (the CPU path; docs/design.md §4.4).

Both work on rows of one sequence each: the ``B`` rows of an unpacked call, or the packed documents padded
into rows (``layout.pad_rows``; a padded token has ``γ' = 0``). ``γ'`` (``selection.effective_gamma``) is
already zero outside each token's selection, so every token reads every cache slot of its row, densely.

* Matrix memory: with the caches of a row side by side, ``S = [S_0; …; S_{N−1}]`` (``[N·K, V]`` per head),
  ``o_t = scale · (γ'_t ⊗ q_t) S``: one matrix product per chunk of tokens. :class:`MatrixReadout` has the
  hand-written backward ``dX = do Sᵀ``, ``dq_t = Σ_i γ'_{t,i} dX_{t,i}``, ``dγ'_{t,i} = q_t · dX_{t,i}``,
  ``dS = Xᵀ do``, recomputing ``X = γ' ⊗ q`` chunk by chunk, so no more than one chunk's ``[T_c, N·K]`` is
  alive at a time.
* Deep memory: ``M_{W_i}(q)`` for all caches at once (the weights broadcast over the cache axis), by the
  deep memory's own :func:`..deep_memory.mlp.memory_apply`, then the ``γ'``-weighted sum; chunked over tokens,
  differentiated by autograd (which keeps every chunk's activations for the backward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from ...deep_memory.mlp import memory_apply
from ...deep_memory.spec import MemorySpec

CHUNK_ELEMENTS = 1 << 22  # elements of the largest per-chunk intermediate ([B, H, T_c, N·K] or [B, N, H, T_c, d])


def chunk_length(rows: int, heads: int, n_caches: int, width: int, seqlen: int) -> int:
    """Tokens per chunk so that a ``[rows, heads, T_c, n_caches·width]`` intermediate stays under
    ``CHUNK_ELEMENTS``."""
    per_token = max(rows * heads * n_caches * width, 1)
    return max(1, min(seqlen, CHUNK_ELEMENTS // per_token))


class MatrixReadout(torch.autograd.Function):
    """``o [B, T, H, V] = scale · Σ_i γ'_{t,i} q_t S_i`` from q ``[B, T, H, K]``, states ``[B, N, H, K, V]`` and
    γ' ``[B, T, H, N]`` (one dtype), chunked over T forward and backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, states: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
        B, T, H, K = q.shape
        N, V = states.shape[1], states.shape[-1]
        S = states.permute(0, 2, 1, 3, 4).reshape(B, H, N * K, V)
        qh, gh = q.transpose(1, 2), gamma.transpose(1, 2)  # [B, H, T, K], [B, H, T, N]
        o = q.new_empty(B, H, T, V)
        step = chunk_length(B, H, N, K, T)
        for t0 in range(0, T, step):
            t = slice(t0, t0 + step)
            X = (gh[:, :, t, :, None] * qh[:, :, t, None, :]).flatten(-2)  # [B, H, T_c, N·K]
            o[:, :, t] = X @ S
        ctx.save_for_backward(q, states, gamma)
        ctx.scale = scale
        return (o * scale).transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, do: torch.Tensor):
        q, states, gamma = ctx.saved_tensors
        B, T, H, K = q.shape
        N, V = states.shape[1], states.shape[-1]
        S = states.permute(0, 2, 1, 3, 4).reshape(B, H, N * K, V)
        qh, gh = q.transpose(1, 2), gamma.transpose(1, 2)
        doh = do.transpose(1, 2).to(q.dtype) * ctx.scale  # [B, H, T, V]
        dq, dgamma = torch.zeros_like(qh), torch.zeros_like(gh)
        dS = torch.zeros_like(S)
        step = chunk_length(B, H, N, K, T)
        for t0 in range(0, T, step):
            t = slice(t0, t0 + step)
            dX = (doh[:, :, t] @ S.mT).unflatten(-1, (N, K))  # [B, H, T_c, N, K]
            dq[:, :, t] = (dX * gh[:, :, t, :, None]).sum(-2)
            dgamma[:, :, t] = (dX * qh[:, :, t, None, :]).sum(-1)
            if ctx.needs_input_grad[1]:
                X = (gh[:, :, t, :, None] * qh[:, :, t, None, :]).flatten(-2)
                dS += X.mT @ doh[:, :, t]
        dstates = dS.view(B, H, N, K, V).permute(0, 2, 1, 3, 4)
        return dq.transpose(1, 2), dstates, dgamma.transpose(1, 2), None


def matrix_readout(q: torch.Tensor, states: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """:class:`MatrixReadout` on rows (q ``[B, T, H, K]``, states ``[B, N, H, K, V]``, γ' ``[B, T, H, N]``) in
    one accumulation dtype: float64 stays float64, anything else float32. Returns ``o`` in that dtype."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return MatrixReadout.apply(q.to(dtype), states.to(dtype), gamma.to(dtype), scale)


def mlp_readout(
    q: torch.Tensor, layers: Sequence[torch.Tensor], gamma: torch.Tensor, spec: MemorySpec
) -> torch.Tensor:
    """``o_t = Σ_i γ'_{t,i} M_{W_i}(q_t)`` on rows: q ``[B, T, H, D]``, ``layers[l]`` the read weights
    ``[B, N, H, d_{l−1}, d_l]``, γ' ``[B, T, H, N]``; computed in float64 or float32 like
    :func:`matrix_readout`."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, gamma, layers = q.to(dtype), gamma.to(dtype), [w.to(dtype) for w in layers]
    B, T, H, D = q.shape
    N = gamma.shape[-1]
    step = chunk_length(B, H, N, max(w.shape[-1] for w in layers), T)

    def linear(layer: int, h: torch.Tensor) -> torch.Tensor:
        return h @ layers[layer]  # [B, 1 | N, H, T_c, d_{l−1}] @ [B, N, H, d_{l−1}, d_l]

    chunks = []
    for t0 in range(0, T, step):
        x = q[:, t0 : t0 + step].transpose(1, 2)[:, None]  # [B, 1, H, T_c, D]
        out, _ = memory_apply(x, linear, len(layers), spec)  # [B, N, H, T_c, D]
        chunks.append(torch.einsum("bnhtd,bthn->bthd", out, gamma[:, t0 : t0 + step]))
    return torch.cat(chunks, dim=1)
