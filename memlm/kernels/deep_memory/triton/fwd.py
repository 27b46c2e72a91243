"""Triton forward kernels of the chunked deep memory, one program per (sequence, head).

Each program walks its sequence chunk by chunk (docs/design.md §3): the chunk's gradients are all
taken at the chunk-start weights ``W = R(A)`` with the attentional bias ψ (:mod:`.triton.bias`), its
reads are the dual form of :mod:`.triton.common`, and the chunk-end state ``(A_b, S_b)`` is carried on,
mapped to ``W_b = R(A_b)`` by the retention map (:mod:`.triton.retention`; ``W = A`` without one), through
which the last row of a full chunk is read. States are float32 in *slots*
``[n_slots, H, d_in, d_out]``: slot ``slots[n]`` holds sequence ``n``'s initial state; with
``STORE_STATES`` chunk ``c`` reads slot ``slots[n] + c`` and writes ``slots[n] + c + 1`` (the
chunk-start states the backward needs), otherwise the state is updated in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .coefficients import chunk_coefficients, chunk_end_coefficients
from .common import (
    chunk_end,
    chunk_rows,
    decayed_read,
    exact_row,
    gelu,
    key_error,
    load_gate,
    load_tokens,
    memory_output,
    mm,
    row,
    sequence_bounds,
    state_ptrs,
    store_tokens,
    with_row,
)
from .hidden import hidden_tile_ptrs, key_hidden_output, key_hidden_tile, memory_row, retention_apply_tiles
from .retention import fresh_columns, norm_partial, retention_map, softmax_columns


@triton.jit
def deep_memory_fwd_l1_kernel(
    q, k, v, lr, momentum, forget, delta, o, A1, S1, W1, slots, cu_seqlens, T,
    H: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_ETA: tl.constexpr, HAS_ALPHA: tl.constexpr,
    HAS_DELTA: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_STATES: tl.constexpr, BF16_DOT: tl.constexpr,
    BIAS: tl.constexpr, BIAS_PARAMS: tl.constexpr, RETENTION: tl.constexpr, RETENTION_PARAMS: tl.constexpr,
):
    """One linear layer ``M(x) = x + LN(x W)``: ``A, S, W = R(A): [D, D]`` stay in registers across chunks."""
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    slot = tl.load(slots + i_n).to(tl.int64)
    o_d = tl.arange(0, BD)
    cm = o_d < D
    p_A, m_W = state_ptrs(A1, slot, i_h, H, D, D, o_d, o_d)
    p_S, m_W = state_ptrs(S1, slot, i_h, H, D, D, o_d, o_d)
    A = tl.load(p_A, mask=m_W, other=0.0)
    S = tl.load(p_S, mask=m_W, other=0.0)
    if RETENTION != "none":  # W = R(A) is carried across chunks; without a map it is A itself
        p_W, m_W = state_ptrs(W1, slot, i_h, H, D, D, o_d, o_d)
        W = tl.load(p_W, mask=m_W, other=0.0)
    for c in range(tl.cdiv(eos - bos, CHUNK)):
        if RETENTION == "none":
            W = A
        pos, valid, last = chunk_rows(bos, eos, c, CHUNK, BT)
        Q = load_tokens(q, pos, valid, i_h, H, D, BD)
        K = load_tokens(k, pos, valid, i_h, H, D, BD)
        V = load_tokens(v, pos, valid, i_h, H, D, BD)
        G, N, beta, d, m = chunk_coefficients(
            load_gate(lr, pos, valid, i_h, H, True),
            load_gate(momentum, pos, valid, i_h, H, HAS_ETA),
            load_gate(forget, pos, valid, i_h, H, HAS_ALPHA),
            BT,
        )
        Y, rstd, dY, Delta = key_error(
            mm(K, W, BF16_DOT), K, V, load_gate(delta, pos, valid, i_h, H, HAS_DELTA), valid, cm, D, RESIDUAL,
            NORM, BIAS, BIAS_PARAMS,
        )
        Z, QW, QS = decayed_read(Q, W, S, beta, d, BF16_DOT)
        Z -= mm(G * mm(Q, tl.trans(K), BF16_DOT), Delta, BF16_DOT)
        if RETENTION == "none":  # stored before the chunk end: fewer live tiles
            store_tokens(o, memory_output(Z, Q, cm, D, RESIDUAL, NORM), pos, valid, i_h, H, D, BD)
        gL, nL, bL, dL, mL = chunk_end_coefficients(G, N, beta, d, m, last, BT)
        A, S = chunk_end(A, S, K, Delta, gL, nL, bL, dL, mL, BF16_DOT)
        if RETENTION != "none":  # a full chunk's last row reads through the exact R(A_end)
            W = retention_map(A, m_W, RETENTION, RETENTION_PARAMS)
            end = exact_row(last, CHUNK)
            Z = with_row(Z, tl.sum(row(Q, end)[:, None] * W, 0), end)
            store_tokens(o, memory_output(Z, Q, cm, D, RESIDUAL, NORM), pos, valid, i_h, H, D, BD)
        if STORE_STATES:
            p_A, m_W = state_ptrs(A1, slot + c + 1, i_h, H, D, D, o_d, o_d)
            p_S, m_W = state_ptrs(S1, slot + c + 1, i_h, H, D, D, o_d, o_d)
            tl.store(p_A, A, mask=m_W)
            tl.store(p_S, S, mask=m_W)
            if RETENTION != "none":
                p_W, m_W = state_ptrs(W1, slot + c + 1, i_h, H, D, D, o_d, o_d)
                tl.store(p_W, W, mask=m_W)
    if not STORE_STATES:
        tl.store(p_A, A, mask=m_W)
        tl.store(p_S, S, mask=m_W)


@triton.jit
def deep_memory_fwd_l2_kernel(
    q, k, v, lr, momentum, forget, delta, o, A1, S1, A2, S2, W1, W2, slots, cu_seqlens, T,
    H: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, CHUNK: tl.constexpr, BT: tl.constexpr,
    BD: tl.constexpr, BH: tl.constexpr,
    RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_ETA: tl.constexpr, HAS_ALPHA: tl.constexpr,
    HAS_DELTA: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_STATES: tl.constexpr, BF16_DOT: tl.constexpr,
    BIAS: tl.constexpr, BIAS_PARAMS: tl.constexpr, RETENTION: tl.constexpr, RETENTION_PARAMS: tl.constexpr,
):
    """Two layers ``M(x) = x + LN(φ(x W_1) W_2)``, hidden width ``HD`` walked in tiles of ``BH``.

    The memory reads the weights ``W = R(A)`` (slots ``W1, W2``; the state slots themselves without a
    retention map). With a map, the chunk-end state's statistics are gathered while it is written, then
    ``R(A_end)`` is applied tile by tile and a full chunk's last row is read through it.
    """
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    slot = tl.load(slots + i_n).to(tl.int64)
    cm = tl.arange(0, BD) < D
    if RETENTION == "none":  # the weights are the state (the same slots)
        W1 = A1
        W2 = A2
    for c in range(tl.cdiv(eos - bos, CHUNK)):
        if STORE_STATES:
            src = slot + c
            dst = src + 1
        else:
            src = slot
            dst = slot
        pos, valid, last = chunk_rows(bos, eos, c, CHUNK, BT)
        Q = load_tokens(q, pos, valid, i_h, H, D, BD)
        K = load_tokens(k, pos, valid, i_h, H, D, BD)
        V = load_tokens(v, pos, valid, i_h, H, D, BD)
        G, N, beta, d, m = chunk_coefficients(
            load_gate(lr, pos, valid, i_h, H, True),
            load_gate(momentum, pos, valid, i_h, H, HAS_ETA),
            load_gate(forget, pos, valid, i_h, H, HAS_ALPHA),
            BT,
        )
        gL, nL, bL, dL, mL = chunk_end_coefficients(G, N, beta, d, m, last, BT)
        Zk2 = key_hidden_output(K, W1, W2, src, i_h, H, D, HD, BT, BD, BH, BF16_DOT)
        Y, rstd, dY, Delta2 = key_error(
            Zk2, K, V, load_gate(delta, pos, valid, i_h, H, HAS_DELTA), valid, cm, D, RESIDUAL, NORM, BIAS,
            BIAS_PARAMS,
        )
        C1 = G * mm(Q, tl.trans(K), BF16_DOT)
        Z2 = tl.zeros([BT, BD], tl.float32)
        HqHk = tl.zeros([BT, BT], tl.float32)
        if RETENTION != "none":  # statistics of A_end for R
            total1 = tl.zeros([], tl.float32)
            total2 = tl.zeros([], tl.float32)
            colmax2, colsum2 = fresh_columns(BD)
        for j in range(tl.cdiv(HD, BH)):
            p1, p2, m1, m2 = hidden_tile_ptrs(W1, W2, src, i_h, j, H, D, HD, BD, BH)
            s1, s2, m1, m2 = hidden_tile_ptrs(S1, S2, src, i_h, j, H, D, HD, BD, BH)
            a1, a2, m1, m2 = hidden_tile_ptrs(A1, A2, src, i_h, j, H, D, HD, BD, BH)
            W1j = tl.load(p1, mask=m1, other=0.0)
            W2j = tl.load(p2, mask=m2, other=0.0)
            if RETENTION == "none":
                A1j = W1j
                A2j = W2j
            else:
                A1j = tl.load(a1, mask=m1, other=0.0)
                A2j = tl.load(a2, mask=m2, other=0.0)
            Zk1, Hk, dHk, Delta1 = key_hidden_tile(K, Delta2, W1j, W2j, BF16_DOT)
            S1j = tl.load(s1, mask=m1, other=0.0)
            Z1, QW1, QS1 = decayed_read(Q, W1j, S1j, beta, d, BF16_DOT)
            Hq = gelu(Z1 - mm(C1, Delta1, BF16_DOT))
            # layer 1 of this tile is done: write its chunk-end state before touching layer 2
            A1j, S1j = chunk_end(A1j, S1j, K, Delta1, gL, nL, bL, dL, mL, BF16_DOT)
            a1, a2, m1, m2 = hidden_tile_ptrs(A1, A2, dst, i_h, j, H, D, HD, BD, BH)
            t1, t2, m1, m2 = hidden_tile_ptrs(S1, S2, dst, i_h, j, H, D, HD, BD, BH)
            tl.debug_barrier()
            tl.store(a1, A1j, mask=m1)
            tl.store(t1, S1j, mask=m1)
            S2j = tl.load(s2, mask=m2, other=0.0)
            Z2j, HqW2, HqS2 = decayed_read(Hq, W2j, S2j, beta, d, BF16_DOT)
            Z2 += Z2j
            HqHk += mm(Hq, tl.trans(Hk), BF16_DOT)
            A2j, S2j = chunk_end(A2j, S2j, Hk, Delta2, gL, nL, bL, dL, mL, BF16_DOT)
            tl.debug_barrier()
            tl.store(a2, A2j, mask=m2)
            tl.store(t2, S2j, mask=m2)
            if RETENTION != "none":
                total1 += norm_partial(A1j, RETENTION, RETENTION_PARAMS)
                total2 += norm_partial(A2j, RETENTION, RETENTION_PARAMS)
                colmax2, colsum2 = softmax_columns(A2j, m2, colmax2, colsum2, RETENTION)
        Z2 -= mm(G * HqHk, Delta2, BF16_DOT)
        if RETENTION != "none":  # W_end = R(A_end); a full chunk's last row reads through it exactly
            tl.debug_barrier()
            retention_apply_tiles(A1, A2, W1, W2, dst, i_h, total1, total2, colmax2, colsum2, H, D, HD, BD, BH,
                                  RETENTION, RETENTION_PARAMS)
            tl.debug_barrier()
            end = exact_row(last, CHUNK)
            Z2 = with_row(Z2, memory_row(row(Q, end), W1, W2, dst, i_h, H, D, HD, BD, BH), end)
        store_tokens(o, memory_output(Z2, Q, cm, D, RESIDUAL, NORM), pos, valid, i_h, H, D, BD)
        tl.debug_barrier()


def block_size(n: int) -> int:
    """Power-of-two tile width ≥ 16 (the smallest ``tl.dot`` operand) covering ``n``."""
    return max(16, triton.next_power_of_2(n))


def num_warps(BD: int, backward: bool, retains: bool) -> int:
    """Warps per program: the backward, ``D > 64`` and a retention map (``W = R(A)`` beside the state)
    hold more live tiles (register spills measured with ptxas for sm_90 at ``D = 64/128``, chunk 16,
    hidden tile 32; the L = 1 forward with a retention map at ``D = 64``: 400–500 bytes with 4 warps,
    12–20 with 8)."""
    return 8 if backward or retains or BD > 64 else 4


def launch_meta(q: torch.Tensor, momentum: torch.Tensor | None, forget: torch.Tensor | None,
                delta: torch.Tensor | None, cu_seqlens: torch.Tensor | None, *, chunk_size: int, residual: bool,
                norm: bool, hooks: dict[str, object], backward: bool) -> dict[str, object]:
    """The constexpr arguments shared by the forward and backward kernels (``hooks``: ``BIAS``,
    ``BIAS_PARAMS``, ``RETENTION``, ``RETENTION_PARAMS``)."""
    D = q.shape[-1]
    return dict(
        H=q.shape[2], D=D, CHUNK=chunk_size, BT=block_size(chunk_size), BD=block_size(D), RESIDUAL=residual,
        NORM=norm, HAS_ETA=momentum is not None, HAS_ALPHA=forget is not None, HAS_DELTA=delta is not None,
        IS_VARLEN=cu_seqlens is not None, BF16_DOT=q.dtype == torch.bfloat16,
        num_warps=num_warps(block_size(D), backward, hooks["RETENTION"] != "none"), num_stages=1, **hooks,
    )


def deep_memory_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor | None,
    forget: torch.Tensor | None,
    delta: torch.Tensor | None,
    A_slots: list[torch.Tensor],
    S_slots: list[torch.Tensor],
    W_slots: list[torch.Tensor],
    slots: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    *,
    chunk_size: int,
    residual: bool,
    norm: bool,
    store_states: bool,
    block_hidden: int,
    hooks: dict[str, object],
) -> torch.Tensor:
    """Launch the forward kernel for ``len(A_slots)`` layers; returns ``o`` and updates the slots (state
    ``A``, momentum ``S`` and, with a retention map, the weights ``W = R(A)``; without one ``W_slots``
    are ``A_slots``)."""
    o = torch.empty_like(q)
    meta = launch_meta(q, momentum, forget, delta, cu_seqlens, chunk_size=chunk_size, residual=residual, norm=norm,
                       hooks=hooks, backward=False)
    grid = (slots.numel(), q.shape[2])
    gates = (lr, momentum, forget, delta)
    if len(A_slots) == 1:
        deep_memory_fwd_l1_kernel[grid](
            q, k, v, *gates, o, A_slots[0], S_slots[0], W_slots[0], slots, cu_seqlens, T=q.shape[1],
            STORE_STATES=store_states, **meta,
        )
    else:
        deep_memory_fwd_l2_kernel[grid](
            q, k, v, *gates, o, A_slots[0], S_slots[0], A_slots[1], S_slots[1], W_slots[0], W_slots[1], slots,
            cu_seqlens, T=q.shape[1], HD=A_slots[0].shape[-1], BH=block_hidden, STORE_STATES=store_states, **meta,
        )
    return o
