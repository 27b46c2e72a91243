"""Chunk-parallel PyTorch form of the linear memory (the CPU path, differentiable by autograd).

The sequence is cut into chunks of C tokens. With ``b_t`` the within-chunk cumulative
log-decay (``b_t = Σ_{j≤t} g_j + gk_j``, scalar or per key channel) and ``S_0`` the state
entering the chunk, every recurrence of ``naive.py`` becomes, for positions t of the chunk,

    S_t = exp(b_t) ⊙ S_0 + Σ_{i≤t} exp(b_t − b_i) ⊙ k_iᵀ u_i
    o_t = scale · [(q_t ⊙ exp(b_t)) S_0 + Σ_{i≤t} A_{ti} u_i],  A_{ti} = Σ_c q_tc k_ic exp(b_tc − b_ic)

with ``u_i = v_i`` without β. With β (DeltaNet / Gated DeltaNet, Yang et al. 2024, the
WY/UT transform) the pseudo-values solve a unit lower-triangular system per chunk:

    (I + L) U = diag(β) V − diag(β ⊙ exp(b)) K S_0,   L_{ij} = β_i exp(b_i − b_j) k_i·k_j  (j < i)

so ``U = U_v − W S_0`` with ``U_v, W`` independent of the carried state. Only the chunk-to-chunk
carry ``S_C = exp(b_C) ⊙ S_0 + (K ⊙ exp(b_C − b))ᵀ U`` is a sequential loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils import accumulation_dtype, pad_documents, unpad_documents

SUB_CHUNK = 16


def _causal_log_ratio(b: torch.Tensor, strict: bool) -> torch.Tensor:
    """``b_t − b_i`` for ``i ≤ t`` (``i < t`` if strict) and −inf elsewhere: ``[..., C, C(, K)]``.

    ``b`` is ``[..., C, K]``; a trailing size-1 axis (scalar decay) is squeezed away.
    """
    C = b.shape[-2]
    diff = b[..., :, None, :] - b[..., None, :, :]
    keep = torch.ones(C, C, dtype=torch.bool, device=b.device).tril(-1 if strict else 0)
    diff = diff.masked_fill(~keep[:, :, None], float("-inf"))
    return diff.squeeze(-1) if b.shape[-1] == 1 else diff


def _channel_scores(x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, strict: bool) -> torch.Tensor:
    """``A_{ti} = Σ_c x_tc y_ic exp(b_tc − b_ic)`` for a per-channel log-decay ``b [..., C, K]``.

    Decay ratios are never formed as ``exp(b_t)·exp(−b_i)`` (which overflows): diagonal blocks
    of ``SUB_CHUNK`` tokens use the exact ratio, and a later block ``I`` splits the ratio at
    ``ρ_I``, the cumulative log-decay just before ``I``: ``exp(b_t − ρ_I)·exp(ρ_I − b_i)``, both ≤ 1.
    """
    C, K = x.shape[-2:]
    sub = SUB_CHUNK if C % SUB_CHUNK == 0 else C
    n = C // sub
    xs, ys, bs = (t.unflatten(-2, (n, sub)) for t in (x, y, b))
    ratio = _causal_log_ratio(bs, strict).exp()
    diag = torch.einsum("...tk,...ik,...tik->...ti", xs, ys, ratio)
    blocks = (diag[..., :, :, None, :] * torch.eye(n, dtype=x.dtype, device=x.device)[:, None, :, None])
    scores = blocks.reshape(*x.shape[:-2], C, C)
    if n == 1:
        return scores
    rho = torch.cat([torch.zeros_like(bs[..., :1, -1, :]), bs[..., :-1, -1, :]], dim=-2)  # [..., n, K]
    before = torch.arange(C, device=x.device)[None, :] < torch.arange(n, device=x.device)[:, None] * sub
    y_split = (rho[..., :, None, :] - b[..., None, :, :]).masked_fill(~before[:, :, None], float("-inf"))
    y_split = y[..., None, :, :] * y_split.exp()  # [..., n, C, K]
    x_split = xs * (bs - rho[..., :, None, :]).exp()  # [..., n, sub, K]
    return scores + (x_split @ y_split.transpose(-1, -2)).reshape(*x.shape[:-2], C, C)


def _scores(x: torch.Tensor, y: torch.Tensor, b: torch.Tensor | None, strict: bool) -> torch.Tensor:
    """Causal intra-chunk scores ``A_{ti} = Σ_c x_tc y_ic exp(b_tc − b_ic)``, ``i ≤ t`` (or ``<``)."""
    if b is None:
        C = x.shape[-2]
        keep = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
        return (x @ y.transpose(-1, -2)).masked_fill(~keep, 0.0)
    if b.shape[-1] == 1:
        return (x @ y.transpose(-1, -2)) * _causal_log_ratio(b, strict).exp()
    return _channel_scores(x, y, b, strict)


def _to_chunks(x: torch.Tensor | None, C: int, pad: int) -> torch.Tensor | None:
    """``[B, T, H, ...]`` → ``[B, H, n_chunks, C, ...]``, zero-padding T by ``pad``."""
    if x is None:
        return None
    x = x.movedim(2, 1)
    x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.unflatten(2, (-1, C))


def _chunk_linear_memory(q, k, v, g, gk, beta, scale, initial_state, chunk_size):
    """Equal-length batch ``[B, T, ...]``: returns ``o [B, T, H, V]`` and the final state."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, T)
    pad = -T % C
    q, k, v, g, gk, beta = (_to_chunks(x, C, pad) for x in (q, k, v, g, gk, beta))
    if gk is not None:
        log_decay = gk if g is None else gk + g[..., None]
    else:
        log_decay = None if g is None else g[..., None]
    b = None if log_decay is None else log_decay.cumsum(-2)  # [B, H, n, C, 1 or K]
    q = q * scale

    if beta is None:
        u_v, w = v, None
    else:
        beta = beta[..., None]
        decayed_k = k if b is None else k * b.exp()
        system = torch.eye(C, dtype=q.dtype, device=q.device) + beta * _scores(k, k, b, strict=True)
        solved = torch.linalg.solve_triangular(
            system, torch.cat([beta * v, beta * decayed_k], dim=-1), upper=False, unitriangular=True
        )
        u_v, w = solved.split([V, K], dim=-1)

    if b is None:
        q_in, k_out, carry = q, k, None
    else:
        q_in, k_out, carry = q * b.exp(), k * (b[..., -1:, :] - b).exp(), b[..., -1, :, None].exp()
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    states, pseudo_values = [], []
    for n in range(q.shape[2]):
        u = u_v[:, :, n] if w is None else u_v[:, :, n] - w[:, :, n] @ S
        states.append(S)
        pseudo_values.append(u)
        if carry is not None:
            S = S * carry[:, :, n]
        S = S + k_out[:, :, n].transpose(-1, -2) @ u
    U = torch.stack(pseudo_values, dim=2)
    o = q_in @ torch.stack(states, dim=2) + _scores(q, k, b, strict=False) @ U
    return o.flatten(2, 3)[:, :, :T].movedim(1, 2), S


def chunk_linear_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked evaluation of the recurrence in ``naive.py`` (same arguments and results).

    Packed documents (``cu_seqlens``) are laid out as one zero-padded row each, so chunks never
    straddle a boundary; zero padding is exact (k = 0 writes nothing, log-decay 0 keeps the state).
    """
    out_dtype, dtype = q.dtype, accumulation_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    inputs = [None if x is None else x.to(dtype) for x in (q, k, v, g, gk, beta)]
    if cu_seqlens is not None:
        inputs = [None if x is None else pad_documents(x, cu_seqlens) for x in inputs]
    o, final = _chunk_linear_memory(*inputs, scale, initial_state, chunk_size)
    if cu_seqlens is not None:
        o = unpad_documents(o, cu_seqlens)
    return o.to(out_dtype), (final if output_final_state else None)
