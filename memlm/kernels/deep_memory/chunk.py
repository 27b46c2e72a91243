"""Chunked deep-memory op in plain PyTorch: the TTT "dual form" of DESIGN.md §3.

Per chunk of ``b`` tokens: forward the keys through the MLP at the chunk-start weights
``W_0``, back-propagate ψ(M(k) − v) to get every layer's (input ``X_l``, error ``Δ_l``)
factors of the per-token gradients ``u^{(l)}_i = X_{l,i}ᵀ Δ_{l,i}``; then read the queries
through ``W_t`` without materialising it, layer by layer,

    ``Z_l = β ⊙ (H_{l−1} W_0) + d ⊙ (H_{l−1} S_0) − (G ⊙ H_{l−1} X_lᵀ) Δ_l``,

and carry the state from the chunk's last row. Batched over sequences and heads; the
only Python loop is over chunks. Autograd provides the backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .coefficients import ChunkCoefficients, chunk_coefficients
from .mlp import memory_apply, memory_backward, weight_linear
from .objectives import BIASES, RETENTIONS, Bias
from .state import gates_or_defaults, initial_state

State = tuple[list[torch.Tensor], list[torch.Tensor]]


def _sequence_lengths(B: int, T: int, cu_seqlens: torch.Tensor | None) -> tuple[list[int], list[int]]:
    """Start offsets (in the flattened ``B·T`` token axis) and lengths of every sequence."""
    if cu_seqlens is None:
        return [i * T for i in range(B)], [T] * B
    c = cu_seqlens.tolist()
    return c[:-1], [b - a for a, b in zip(c, c[1:])]


def _pack(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, ...]`` → ``[N, H, n_chunks, b, ...]``: one zero-padded row per sequence."""
    N, n_chunks, b = valid.shape
    flat = x.reshape(-1, *x.shape[2:])[index]
    flat = flat * valid.reshape(N, n_chunks * b, *[1] * (x.dim() - 2)).to(x.dtype)
    y = flat.reshape(N, n_chunks, b, *x.shape[2:])
    return y.permute(0, 3, 1, 2, *range(4, y.dim()))


def _end_rows(coef: ChunkCoefficients, last: torch.Tensor) -> ChunkCoefficients:
    """The coefficients of the row that closes each chunk (``last: [N, n_chunks]``)."""
    row = last[:, None, :, None].expand(*coef.beta.shape[:-1], 1)
    mat = row.unsqueeze(-1).expand(*coef.G.shape[:-2], 1, coef.G.shape[-1])
    return ChunkCoefficients(
        beta=coef.beta.gather(-1, row).squeeze(-1),
        d=coef.d.gather(-1, row).squeeze(-1),
        G=coef.G.gather(-2, mat).squeeze(-2),
        m=coef.m.gather(-1, row).squeeze(-1),
        n=coef.n.gather(-2, mat).squeeze(-2),
    )


def _gradient_factors(
    k: torch.Tensor, v: torch.Tensor, W: list[torch.Tensor], psi: Bias, mlp: dict
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Layer inputs ``X_l`` and back-propagated errors ``Δ_l`` at ``W_0`` of a chunk's keys, so
    that ``∇_{W_l} ℓ_i = X_{l,i}ᵀ Δ_{l,i}`` with ``∂ℓ_i/∂M = ψ(M(k_i) − v_i)``."""
    out, trace = memory_apply(k, weight_linear(W), **mlp)
    return trace.inputs, memory_backward(psi(out - v), W, trace, activation=mlp["activation"])


def _dual_read(
    q: torch.Tensor,
    W: list[torch.Tensor],
    S: list[torch.Tensor],
    X: list[torch.Tensor],
    delta: list[torch.Tensor],
    beta: torch.Tensor,
    d: torch.Tensor,
    G: torch.Tensor,
    mlp: dict,
) -> torch.Tensor:
    """``M_{W_t}(q_t)`` for every row t of a chunk with
    ``q W^{(l)}_t = β_t q W^{(l)}_0 + d_t q S^{(l)}_0 − Σ_i G_{t,i} (q·X_{l,i}) Δ_{l,i}``."""

    def linear(l: int, h: torch.Tensor) -> torch.Tensor:
        return beta * (h @ W[l]) + d * (h @ S[l]) - ((h @ X[l].mT) * G) @ delta[l]

    return memory_apply(q, linear, **mlp)[0]


def deep_memory_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor | None,
    forget: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    *,
    chunk_size: int = 16,
    residual: bool = True,
    norm: bool = True,
    activation: str = "gelu",
    bias: str = "l2",
    retention: str = "none",
    initial_momentum: Sequence[torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Chunk-parallel Titans update (mini-batch GD, arXiv 2501.00663; DESIGN.md §3), same semantics and
    signature as :func:`deep_memory_naive`."""
    psi, retain = BIASES[bias], RETENTIONS[retention]
    depth, b = len(weights), chunk_size
    B, T, H, D = q.shape
    starts, lengths = _sequence_lengths(B, T, cu_seqlens)
    N, n_chunks = len(lengths), -(-max(lengths) // b)

    pos = torch.arange(n_chunks * b, device=q.device)
    length = torch.tensor(lengths, device=q.device)
    valid = (pos < length[:, None]).view(N, n_chunks, b)
    index = torch.tensor(starts, device=q.device)[:, None] + torch.minimum(pos, length[:, None] - 1)
    Q, K, V = (_pack(x, index, valid) for x in (q, k, v))  # [N, H, n_chunks, b, D]

    coef_dtype = torch.promote_types(lr.dtype, torch.float32)
    gates = (_pack(g.to(coef_dtype), index, valid) for g in gates_or_defaults(lr, momentum, forget))
    coef = ChunkCoefficients(*(c.to(q.dtype) for c in chunk_coefficients(*gates)))
    chunk_start = torch.arange(n_chunks, device=q.device) * b
    end = _end_rows(coef, (length[:, None] - 1 - chunk_start).clamp(0, b - 1))
    W, S = initial_state(weights, initial_momentum, N)

    mlp = dict(depth=depth, activation=activation, residual=residual, norm=norm)
    # unbind once: indexing chunk c of a tensor that requires grad costs a full-size backward each time
    per_chunk = (
        *(Q, K, V, coef.beta[..., None], coef.d[..., None], coef.G),
        *(end.beta[..., None, None], end.d[..., None, None], end.m[..., None, None]),
        *(end.G[..., None], end.n[..., None]),
    )
    outputs = []
    for c, (Qc, Kc, Vc, beta, d, G, beta_e, d_e, m_e, G_e, n_e) in enumerate(
        zip(*(x.unbind(2) for x in per_chunk))
    ):
        X, delta = _gradient_factors(Kc, Vc, W, psi, mlp)
        outputs.append(_dual_read(Qc, W, S, X, delta, beta, d, G, mlp))
        W_next = [retain(beta_e * w + d_e * s - x.mT @ (G_e * dl)) for w, s, x, dl in zip(W, S, X, delta)]
        S_next = [m_e * s - x.mT @ (n_e * dl) for s, x, dl in zip(S, X, delta)]
        if c * b >= min(lengths):  # some sequences ended in an earlier chunk: keep their state
            live = (c * b < length)[:, None, None, None]
            W_next = [torch.where(live, new, old) for new, old in zip(W_next, W)]
            S_next = [torch.where(live, new, old) for new, old in zip(S_next, S)]
        W, S = W_next, S_next

    o = torch.stack(outputs, dim=2).permute(0, 2, 3, 1, 4).reshape(N, n_chunks * b, H, D)
    o = o[valid.view(N, -1)].view(B, T, H, D)
    return o, ((W, S) if output_final_state else None)
