"""Chunked deep-memory op in plain PyTorch: the TTT "dual form" of docs/design.md §3.

Per chunk of ``b`` tokens: forward the keys through the MLP at the chunk-start weights
``W_0 = R(A_0)``, back-propagate ψ(M(k) − v) to get every layer's (input ``X_l``, error ``Δ_l``)
factors of the per-token gradients ``u^{(l)}_i = X_{l,i}ᵀ Δ_{l,i}``; then read the queries
through ``W_t`` without materialising it, layer by layer,

    ``Z_l = β ⊙ (H_{l−1} W_0) + d ⊙ (H_{l−1} S_0) − (G ⊙ H_{l−1} X_lᵀ) Δ_l``,

and carry the state ``A`` from the chunk's last row. With a retention map ``R`` other than the
identity, a full chunk's last token is read through the exact ``R(A_end)`` instead (the semantics of
``naive``). Batched over sequences and heads; the only Python loop is over chunks. Three loops run the
chunks (``select_path`` in ``memlm.kernels.deep_memory`` picks one): ``autograd``, the loop below
differentiated by autograd (any hook, any gates); for the Titans memory (ℓ2 bias, identity retention)
with per-head gates ``hand_written``, :class:`.dual_form.DualFormChunks` with a hand-written backward,
and ``cpu``, the same loop compiled (:class:`.cpu.function.CompiledDualFormChunks`).

Channel-wise gates (``[B, T, H, C]``, ``C = Σ_l d_l``) give every output unit ``c`` its own β, d, G, m,
n (the channel axis is a leading dim of the coefficients, ``G: [..., C, b, b]``), so a layer's read is
``Z[t, c] = β_t[c] (H W_0)[t, c] + d_t[c] (H S_0)[t, c] − Σ_i G_{t,i}[c] (H X_lᵀ)[t, i] Δ_i[c]``.
Per-head gates are the same with one channel shared by all units (``C = 1``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple

import torch

from ..checks import check_states_every
from ..coefficients import ChunkCoefficients, ClosingRows, chunk_coefficients
from ..cpu.function import CompiledDualFormChunks
from ..mlp import memory_apply, memory_backward, weight_linear
from ..objectives import Bias, Retention, dual_state, exchanged_state
from ..spec import MemorySpec
from ..state import BoundaryStates, State, channel_axis, gates_or_defaults, initial_state, layer_slices
from .dual_form import DualFormChunks, implements

LOOPS = {"hand_written": DualFormChunks, "cpu": CompiledDualFormChunks}  # the loops with a hand-written backward


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


def _gradient_factors(
    k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor | None, W: list[torch.Tensor], psi: Bias, spec: MemorySpec
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Layer inputs ``X_l`` and back-propagated errors ``Δ_l`` at ``W_0`` of a chunk's keys, so
    that ``∇_{W_l} ℓ_i = X_{l,i}ᵀ Δ_{l,i}`` with ``∂ℓ_i/∂M = ψ(M(k_i) − v_i)``."""
    out, trace = memory_apply(k, weight_linear(W), len(W), spec)
    grad = psi(out - v, v=v, delta=delta)
    return trace.inputs, memory_backward(grad, W, trace, spec)


def _corrections(hx: torch.Tensor, G: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``Σ_i G_{t,i}[c] (h_t·X_i) Δ_i[c]`` from ``hx = H Xᵀ: [..., b, b]``, ``G: [..., 1 | d_l, b, b]`` and
    ``Δ: [..., b, d_l]``; one shared channel (per-head gates) is the matmul ``(G ⊙ H Xᵀ) Δ``. Channel-wise,
    ``(G[c] ⊙ Δ[:, c]ᵀ)`` first, then the row sums against ``H Xᵀ`` (2–3× faster on CPU than an einsum)."""
    if G.shape[-3] == 1:
        return (hx * G.squeeze(-3)) @ delta
    return ((G * delta.mT.unsqueeze(-2)) * hx.unsqueeze(-3)).sum(-1).mT


def _dual_read(
    q: torch.Tensor,
    W: list[torch.Tensor],
    S: list[torch.Tensor],
    X: list[torch.Tensor],
    delta: list[torch.Tensor],
    beta: list[torch.Tensor],
    d: list[torch.Tensor],
    G: list[torch.Tensor],
    spec: MemorySpec,
) -> torch.Tensor:
    """``M_{W_t}(q_t)`` for every row t of a chunk with (per layer, per output unit c; ``β, d:
    [..., b, 1 | d_l]``, ``G: [..., 1 | d_l, b, b]``)
    ``(q W^{(l)}_t)[c] = β_t[c] (q W^{(l)}_0)[c] + d_t[c] (q S^{(l)}_0)[c] − Σ_i G_{t,i}[c] (q·X_{l,i}) Δ_{l,i}[c]``."""

    def linear(l: int, h: torch.Tensor) -> torch.Tensor:
        return beta[l] * (h @ W[l]) + d[l] * (h @ S[l]) - _corrections(h @ X[l].mT, G[l], delta[l])

    return memory_apply(q, linear, len(W), spec)[0]


def _exact_end_read(
    out: torch.Tensor, q: torch.Tensor, W: list[torch.Tensor], full: torch.Tensor, spec: MemorySpec
) -> torch.Tensor:
    """Replace the last row of each sequence's chunk output ``out: [N, H, b, D]`` by ``M_W(q)`` read
    through the chunk-end weights ``W``, where the chunk is full (``full: [N]``)."""
    o_end = memory_apply(q[..., -1:, :], weight_linear(W), len(W), spec)[0]
    last_row = torch.arange(q.shape[-2], device=q.device)[:, None] == q.shape[-2] - 1
    return torch.where(last_row & full[:, None, None, None], o_end, out)


class Piece(NamedTuple):
    """Positions ``[lo, hi)`` of every chunk run as one dual-form step, with their coefficients (``coef``:
    ``[N, H, n_chunks, C, b']``, ``end``: ``[N, H, n_chunks, C]``) and, where ``exact`` and the piece's last
    row is a token (``full: [N, n_chunks]``), that row read through the exact map ``R(A)``."""

    lo: int
    hi: int
    coef: ChunkCoefficients
    end: ClosingRows
    full: torch.Tensor
    exact: bool


def _autograd_chunks(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    deltas: Sequence[torch.Tensor | None],
    pieces: Sequence[Piece],
    A: list[torch.Tensor],
    S: list[torch.Tensor],
    psi: Bias,
    mirror: Retention,
    spec: MemorySpec,
    record: Collection[int] = (),
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[State]]:
    """The chunk loop for any bias, retention and gate layout, differentiated by autograd: outputs
    ``[N, H, n_chunks, b, D]``, the final dual state ``A`` and momentum ``S``, and ``(A, S)`` after each chunk
    whose index is in ``record``, in order (the segment ends of ``output_states_every``). Each chunk runs its
    ``pieces`` in order (one piece of all ``b`` rows; with the lag token, row 0 then rows 1..b−1), each a
    dual-form step from the weights ``W = R(A)`` at its start. The coefficients carry a channel axis cut
    per layer, ``C = 1`` for per-head gates."""
    widths = [w.shape[-1] for w in A]
    # unbind once: indexing chunk c of a tensor that requires grad costs a full-size backward each time;
    # rows t and the channel axis last ([..., b, C]) so that they broadcast against [..., b, d_l]
    per_piece = [
        [x.unbind(2) for x in (
            piece.coef.G, piece.coef.beta.mT, piece.coef.d.mT, piece.end.beta.unsqueeze(-2),
            piece.end.d.unsqueeze(-2), piece.end.m.unsqueeze(-2), piece.end.G.mT, piece.end.n.mT,
        )] + [piece.full.unbind(1)]
        for piece in pieces
    ]
    outputs, recorded, W = [], [], [mirror(a) for a in A]
    for c, (Qc, Kc, Vc) in enumerate(zip(Q.unbind(2), K.unbind(2), V.unbind(2))):
        out = []
        for piece, per_chunk in zip(pieces, per_piece):
            G, *rows, full = (x[c] for x in per_chunk)
            rows_q, rows_k, rows_v = (x[..., piece.lo:piece.hi, :] for x in (Qc, Kc, Vc))
            delta = None if deltas[c] is None else deltas[c][..., piece.lo:piece.hi, :]
            G = layer_slices(G, widths, -3)  # per layer [..., 1 | d_l, b', b']
            beta, d, beta_e, d_e, m_e, G_e, n_e = (layer_slices(r, widths) for r in rows)  # [..., b' | 1, 1 | d_l]
            X, err = _gradient_factors(rows_k, rows_v, delta, W, psi, spec)
            o = _dual_read(rows_q, W, S, X, err, beta, d, G, spec)
            A = [be * a + de * s - x.mT @ (ge * dl) for a, s, x, dl, be, de, ge in zip(A, S, X, err, beta_e, d_e, G_e)]
            S = [me * s - x.mT @ (ne * dl) for s, x, dl, me, ne in zip(S, X, err, m_e, n_e)]
            W = [mirror(a) for a in A]
            out.append(_exact_end_read(o, rows_q, W, full, spec) if piece.exact else o)
        outputs.append(torch.cat(out, dim=-2))
        if c in record:
            recorded.append((A, S))
    return torch.stack(outputs, dim=2), A, S, recorded


def _pieces(
    gates: Sequence[torch.Tensor], valid: torch.Tensor, full: torch.Tensor, spec: MemorySpec, dtype: torch.dtype
) -> list[Piece]:
    """How each chunk runs (``gates``: θ, η, α ``[N, H, n_chunks, C, b]``; ``valid: [N, n_chunks, b]``; ``full``:
    chunks that close inside their sequence): one piece of ``b`` rows, its last row exact where the chunk is full
    and the retention is not the identity; with ``spec.lag_token`` row 0 (exact wherever it is a token) then rows
    ``1..b−1`` (linearised)."""
    b = spec.chunk_size
    exact = spec.retention != "none"
    spans = [(0, 1, valid[..., 0], True), (1, b, full, False)] if spec.lag_token else [(0, b, full, exact)]
    pieces = []
    for lo, hi, piece_full, piece_exact in spans:
        if hi <= lo:
            continue
        coef, end = chunk_coefficients(*(g[..., lo:hi] for g in gates), valid[:, None, :, None, lo:hi])
        coef, end = (type(x)(*(t.to(dtype) for t in x)) for x in (coef, end))
        pieces.append(Piece(lo, hi, coef, end, piece_full, piece_exact))
    return pieces


def deep_memory_chunk(
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
    output_states_every: int | None = None,
    loop: str = "autograd",
) -> tuple[torch.Tensor, State | None] | tuple[torch.Tensor, State | None, BoundaryStates]:
    """Chunk-parallel Titans/Miras update (mini-batch GD, arXiv 2501.00663, 2504.13173; docs/design.md §3), same
    semantics and arguments as :func:`.naive.deep_memory_naive`. ``loop``: ``"autograd"`` (any memory),
    ``"hand_written"`` or ``"cpu"`` (the Titans memory with per-head gates, see :func:`.dual_form.implements`;
    ``"cpu"`` on CPU float32/float64 tensors with the extension loaded). ``output_states_every`` (a positive
    multiple of ``chunk_size``; ``loop="autograd"`` only) adds the states at segment ends,
    :class:`.state.BoundaryStates`, taken after the chunks that close them."""
    if loop not in ("autograd", *LOOPS):
        raise ValueError(f"loop={loop!r} is not one of {('autograd', *LOOPS)}")
    check_states_every(output_states_every, spec.chunk_size)
    if output_states_every is not None and loop != "autograd":
        raise ValueError(
            f"output_states_every needs loop='autograd' (it records the state per chunk); got loop={loop!r}"
        )
    depth, b = len(weights), spec.chunk_size
    B, T, H, D = q.shape
    starts, lengths = _sequence_lengths(B, T, cu_seqlens)
    N, n_chunks = len(lengths), -(-max(lengths) // b)

    pos = torch.arange(n_chunks * b, device=q.device)
    length = torch.tensor(lengths, device=q.device)
    valid = (pos < length[:, None]).view(N, n_chunks, b)
    index = torch.tensor(starts, device=q.device)[:, None] + torch.minimum(pos, length[:, None] - 1)
    Q, K, V = (_pack(x, index, valid) for x in (q, k, v))  # [N, H, n_chunks, b, D]
    deltas = [None] * n_chunks if delta is None else _pack(channel_axis(delta), index, valid).unbind(2)

    gates = gates_or_defaults(lr, momentum, forget)
    channel_wise = any(g.dim() == 4 for g in gates)
    if loop != "autograd" and not implements(spec, channel_wise):
        raise ValueError(f"loop={loop!r} runs the ℓ2 bias, identity retention and per-head gates only; got {spec}")
    C = sum(w.shape[-1] for w in weights) if channel_wise else 1
    coef_dtype = torch.promote_types(lr.dtype, torch.float32)
    gates = [_pack(channel_axis(g).expand(B, T, H, C).to(coef_dtype), index, valid).mT for g in gates]
    chunk_start = torch.arange(n_chunks, device=q.device) * b
    full = length[:, None] - chunk_start >= b  # [N, n_chunks]: chunks that close inside their sequence
    A, S = initial_state(weights, initial_momentum, N)
    if loop != "autograd":
        coef, end = chunk_coefficients(*gates, valid[:, None, :, None])  # [N, H, n_chunks, C, b (, b)]
        coef, end = (type(c)(*(x.to(q.dtype) for x in c)) for c in (coef, end))
        per_head = [x.squeeze(3) for x in (coef.beta, coef.d, coef.G, end.beta, end.d, end.m, end.G, end.n)]
        major = [x.movedim(2, 0).flatten(1, 2) for x in (Q, K, V, *per_head)]
        inputs = [*major, *(t.flatten(0, 1) for t in (*A, *S))]
        keep_tape = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)  # a backward can follow
        o, *state = LOOPS[loop].apply(spec, keep_tape, *inputs)
        o = o.unflatten(1, (N, H)).movedim(0, 2)  # [N, H, n_chunks, b, D]
        A, S = ([t.unflatten(0, (N, H)) for t in half] for half in (state[:depth], state[depth:]))
    else:
        mirror = spec.mirror()
        A = dual_state(spec.retention, A)
        pieces = _pieces(gates, valid, full, spec, q.dtype)
        every = output_states_every
        n_max = 0 if every is None else max(lengths) // every
        closing = [(j + 1) * every // b - 1 for j in range(n_max)]  # the chunk that ends segment j + 1
        o, A, S, recorded = _autograd_chunks(Q, K, V, deltas, pieces, A, S, spec.psi(), mirror, spec, closing)
        A = exchanged_state(spec.retention, mirror, A)
        recorded = [(exchanged_state(spec.retention, mirror, a), s) for a, s in recorded]

    o = o.permute(0, 2, 3, 1, 4).reshape(N, n_chunks * b, H, D)
    o = o[valid.view(N, -1)].view(B, T, H, D)
    final = (A, S) if output_final_state else None
    if output_states_every is None:
        return o, final
    return o, final, _boundary_states(recorded, length // output_states_every, A, S)


def _boundary_states(
    recorded: Sequence[State], counts: torch.Tensor, A: list[torch.Tensor], S: list[torch.Tensor]
) -> BoundaryStates:
    """The states after the chunks closing segments ``1..n_max`` (each per layer ``[N, H, d_{l−1}, d_l]``, for every
    sequence) as :class:`.state.BoundaryStates`: ``[N, n_max, H, d_{l−1}, d_l]``, zero where segment ``j + 1``
    lies past a sequence's end (``j ≥ counts[n]``; those chunks ran on padding)."""
    n_max = len(recorded)
    inside = (torch.arange(n_max, device=counts.device) < counts[:, None])[..., None, None, None]  # [N, n_max, 1, 1, 1]

    def stack(per_boundary: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        if not per_boundary:
            return like.new_zeros(like.shape[0], 0, *like.shape[1:])
        x = torch.stack(list(per_boundary), dim=1)
        return torch.where(inside, x, x.new_zeros(()))

    A_b = [stack([a[layer] for a, _ in recorded], ref) for layer, ref in enumerate(A)]
    S_b = [stack([s[layer] for _, s in recorded], ref) for layer, ref in enumerate(S)]
    return BoundaryStates(A_b, S_b, counts.long())
