"""Chunked deep-memory op in plain PyTorch: the TTT "dual form" of DESIGN.md §3.

Per chunk of ``b`` tokens: forward the keys through the MLP at the chunk-start weights
``W_0 = R(A_0)``, back-propagate ψ(M(k) − v) to get every layer's (input ``X_l``, error ``Δ_l``)
factors of the per-token gradients ``u^{(l)}_i = X_{l,i}ᵀ Δ_{l,i}``; then read the queries
through ``W_t`` without materialising it, layer by layer,

    ``Z_l = β ⊙ (H_{l−1} W_0) + d ⊙ (H_{l−1} S_0) − (G ⊙ H_{l−1} X_lᵀ) Δ_l``,

and carry the state ``A`` from the chunk's last row. With a retention map ``R`` other than the
identity, the chunk's last token is read through the exact ``R(A_end)`` instead (the semantics of
``naive``). Batched over sequences and heads; the only Python loop is over chunks. For the Titans
memory (ℓ2 bias, identity retention) the loop is :class:`.chunk_function.DualFormChunks` with a
hand-written backward; for the other Miras hooks autograd differentiates the loop below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .chunk_function import SECOND_DERIVATIVES, DualFormChunks
from .coefficients import ChunkCoefficients, chunk_coefficients
from .mlp import memory_apply, memory_backward, weight_linear
from .objectives import Bias, Retention, bias_hook, dual_state, exchanged_state, retention_hook
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


def _end_rows(coef: ChunkCoefficients, last: torch.Tensor, live: torch.Tensor) -> ChunkCoefficients:
    """The coefficients of the row that closes each chunk (``last: [N, n_chunks]``); a chunk past
    its sequence's end (``live`` False) gets the identity update ``β = m = 1``, ``d = G = n = 0``."""
    row = last[:, None, :, None].expand(*coef.beta.shape[:-1], 1)
    mat = row.unsqueeze(-1).expand(*coef.G.shape[:-2], 1, coef.G.shape[-1])
    keep, one = live[:, None], torch.ones((), dtype=coef.beta.dtype, device=coef.beta.device)
    vec = {name: getattr(coef, name).gather(-1, row).squeeze(-1) for name in ("beta", "d", "m")}
    mats = {name: getattr(coef, name).gather(-2, mat).squeeze(-2) for name in ("G", "n")}
    return ChunkCoefficients(
        beta=torch.where(keep, vec["beta"], one),
        d=vec["d"] * keep,
        G=mats["G"] * keep[..., None],
        m=torch.where(keep, vec["m"], one),
        n=mats["n"] * keep[..., None],
    )


def _gradient_factors(
    k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor | None, W: list[torch.Tensor], psi: Bias, mlp: dict
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Layer inputs ``X_l`` and back-propagated errors ``Δ_l`` at ``W_0`` of a chunk's keys, so
    that ``∇_{W_l} ℓ_i = X_{l,i}ᵀ Δ_{l,i}`` with ``∂ℓ_i/∂M = ψ(M(k_i) − v_i)``."""
    out, trace = memory_apply(k, weight_linear(W), **mlp)
    grad = psi(out - v, v=v, delta=delta)
    return trace.inputs, memory_backward(grad, W, trace, activation=mlp["activation"])


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


def _exact_end_read(
    out: torch.Tensor, q: torch.Tensor, W: list[torch.Tensor], last: torch.Tensor, mlp: dict
) -> torch.Tensor:
    """Replace row ``last[n]`` of each sequence's chunk output ``out: [N, H, b, D]`` by ``M_W(q)``
    read at that row through the chunk-end weights ``W``."""
    row = last[:, None, None, None]
    q_end = q.gather(-2, row.expand(*q.shape[:2], 1, q.shape[-1]))
    o_end = memory_apply(q_end, weight_linear(W), **mlp)[0]
    return torch.where(torch.arange(q.shape[-2], device=q.device)[:, None] == row, o_end, out)


def hand_written_backward(bias: str, retention: str, activation: str) -> bool:
    """Whether :class:`DualFormChunks` (ℓ2 bias, identity retention) serves this configuration."""
    return (bias, retention) == ("l2", "none") and activation in SECOND_DERIVATIVES


def _autograd_chunks(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    deltas: Sequence[torch.Tensor | None],
    coef: ChunkCoefficients,
    end: ChunkCoefficients,
    last: torch.Tensor,
    A: list[torch.Tensor],
    S: list[torch.Tensor],
    psi: Bias,
    mirror: Retention,
    exact_ends: bool,
    mlp: dict,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The chunk loop for any bias and retention, differentiated by autograd: outputs
    ``[N, H, n_chunks, b, D]`` and the final dual state ``A`` and momentum ``S``. With ``exact_ends``
    (a retention map other than the identity) each chunk's last row is read through ``R(A_end)``."""
    W = [mirror(a) for a in A]
    # unbind once: indexing chunk c of a tensor that requires grad costs a full-size backward each time
    per_chunk = (
        *(Q, K, V, coef.beta[..., None], coef.d[..., None], coef.G),
        *(end.beta[..., None, None], end.d[..., None, None], end.m[..., None, None]),
        *(end.G[..., None], end.n[..., None]),
    )
    lasts = last.unbind(1)
    outputs = []
    for c, (Qc, Kc, Vc, beta, d, G, beta_e, d_e, m_e, G_e, n_e) in enumerate(
        zip(*(x.unbind(2) for x in per_chunk))
    ):
        X, err = _gradient_factors(Kc, Vc, deltas[c], W, psi, mlp)
        out = _dual_read(Qc, W, S, X, err, beta, d, G, mlp)
        A = [beta_e * a + d_e * s - x.mT @ (G_e * dl) for a, s, x, dl in zip(A, S, X, err)]
        S = [m_e * s - x.mT @ (n_e * dl) for s, x, dl in zip(S, X, err)]
        W = [mirror(a) for a in A]
        outputs.append(_exact_end_read(out, Qc, W, lasts[c], mlp) if exact_ends else out)
    return torch.stack(outputs, dim=2), A, S


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
    bias_params: Mapping[str, float] | None = None,
    retention_params: Mapping[str, float] | None = None,
    delta: torch.Tensor | None = None,
    initial_momentum: Sequence[torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Chunk-parallel Titans/Miras update (mini-batch GD, arXiv 2501.00663, 2504.13173; DESIGN.md §3), same
    semantics and signature as :func:`deep_memory_naive`."""
    psi, mirror = bias_hook(bias, bias_params), retention_hook(retention, retention_params)
    depth, b = len(weights), chunk_size
    B, T, H, D = q.shape
    starts, lengths = _sequence_lengths(B, T, cu_seqlens)
    N, n_chunks = len(lengths), -(-max(lengths) // b)

    pos = torch.arange(n_chunks * b, device=q.device)
    length = torch.tensor(lengths, device=q.device)
    valid = (pos < length[:, None]).view(N, n_chunks, b)
    index = torch.tensor(starts, device=q.device)[:, None] + torch.minimum(pos, length[:, None] - 1)
    Q, K, V = (_pack(x, index, valid) for x in (q, k, v))  # [N, H, n_chunks, b, D]
    deltas = [None] * n_chunks if delta is None else _pack(delta, index, valid)[..., None].unbind(2)

    coef_dtype = torch.promote_types(lr.dtype, torch.float32)
    gates = (_pack(g.to(coef_dtype), index, valid) for g in gates_or_defaults(lr, momentum, forget))
    coef = ChunkCoefficients(*(c.to(q.dtype) for c in chunk_coefficients(*gates)))
    chunk_start = torch.arange(n_chunks, device=q.device) * b
    last = (length[:, None] - 1 - chunk_start).clamp(0, b - 1)  # [N, n_chunks]: row closing each chunk
    end = _end_rows(coef, last, chunk_start < length[:, None])
    A, S = initial_state(weights, initial_momentum, N)
    mlp = dict(depth=depth, activation=activation, residual=residual, norm=norm)
    if hand_written_backward(bias, retention, activation):
        major = [x.movedim(2, 0).flatten(1, 2) for x in (Q, K, V, coef.beta, coef.d, coef.G)]
        major += [x.movedim(2, 0).flatten(1, 2) for x in (end.beta, end.d, end.m, end.G, end.n)]
        o, *state = DualFormChunks.apply(mlp, *major, *(t.flatten(0, 1) for t in (*A, *S)))
        o = o.unflatten(1, (N, H)).movedim(0, 2)  # [N, H, n_chunks, b, D]
        A, S = ([t.unflatten(0, (N, H)) for t in half] for half in (state[:depth], state[depth:]))
    else:
        A = dual_state(retention, A)
        o, A, S = _autograd_chunks(
            Q, K, V, deltas, coef, end, last, A, S, psi, mirror, retention != "none", mlp
        )
        A = exchanged_state(retention, mirror, A)

    o = o.permute(0, 2, 3, 1, 4).reshape(N, n_chunks * b, H, D)
    o = o[valid.view(N, -1)].view(B, T, H, D)
    return o, ((A, S) if output_final_state else None)
