"""Triton backward kernels of the chunked deep memory, one program per (sequence, head).

Each program walks its chunks in reverse. For chunk ``c`` it reloads the stored chunk-start
state ``(A_0, S_0)`` and weights ``W_0 = R(A_0)``, recomputes the chunk's forward (key errors ``Δ``
with the bias ψ, query reads ``Z``) and applies the exact VJP of every step, carrying the adjoints
of the chunk-end state ``(gA_b, gS_b)`` to the chunk start. The adjoint of ``Δ`` needs second
derivatives of the memory (``φ''``, ψ' and the LayerNorm Hessian term): ``u = ∇_W ℓ`` depends on ``W_0``.

With a retention map the adjoint of the weights ``gW`` is carried apart from that of the state: chunk
``c``'s reads and keys give that of its start weights ``W_c``; the next step in reverse (chunk ``c − 1``,
full, so its last row reads ``W_c`` exactly) adds its share and folds it into the state's adjoint,
``gA_c += J_R(A_c)ᵀ gW_c``, once per boundary. The carried adjoints live in float32 workspaces
``[N, H, d_in, d_out]`` (registers for L = 1) that hold ``∂L/∂(A_T, S_T)`` on entry and
``∂L/∂(A_0, S_0)``, ``∂L/∂W_0`` on exit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .coefficients import chunk_coefficients, chunk_coefficients_bwd, chunk_end_coefficients
from .common import (
    chunk_end_bwd,
    chunk_rows,
    decayed_read,
    decayed_read_bwd,
    dual_correction_bwd,
    end_row_bwd,
    exact_row,
    gelu,
    gelu_grad,
    gelu_grad2,
    key_error,
    key_error_bwd,
    load_gate,
    load_tokens,
    memory_output_bwd,
    mm,
    row,
    sequence_bounds,
    state_ptrs,
    store_gate,
    store_tokens,
    with_row,
)
from .fwd import launch_meta
from .hidden import (
    hidden_tile_ptrs,
    key_hidden_output,
    key_hidden_tile,
    memory_row,
    memory_row_bwd,
    retention_vjp_tiles,
)
from .retention import retention_map_vjp


@triton.jit
def deep_memory_bwd_l1_kernel(
    q, k, v, lr, momentum, forget, delta, do, dq, dk, dv, dlr, dmomentum, dforget, ddelta,
    A1, S1, W1, dA1, dS1, dW1, slots, cu_seqlens, T,
    H: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_ETA: tl.constexpr, HAS_ALPHA: tl.constexpr,
    HAS_DELTA: tl.constexpr, IS_VARLEN: tl.constexpr, BF16_DOT: tl.constexpr,
    BIAS: tl.constexpr, BIAS_PARAMS: tl.constexpr, RETENTION: tl.constexpr, RETENTION_PARAMS: tl.constexpr,
):
    """Backward of :func:`deep_memory_fwd_l1_kernel`; the carried ``gA, gS, gW: [D, D]`` stay in registers."""
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    slot = tl.load(slots + i_n).to(tl.int64)
    o_d = tl.arange(0, BD)
    cm = o_d < D
    p_gA, m_W = state_ptrs(dA1, i_n.to(tl.int64), i_h, H, D, D, o_d, o_d)
    p_gS, m_W = state_ptrs(dS1, i_n.to(tl.int64), i_h, H, D, D, o_d, o_d)
    gA = tl.load(p_gA, mask=m_W, other=0.0)
    gS = tl.load(p_gS, mask=m_W, other=0.0)
    if RETENTION != "none":
        gW = tl.zeros([BD, BD], tl.float32)  # pending ∂L/∂W at the chunk boundary
    n_chunks = tl.cdiv(eos - bos, CHUNK)
    for i_c in range(n_chunks):
        c = n_chunks - 1 - i_c
        pos, valid, last = chunk_rows(bos, eos, c, CHUNK, BT)
        p_A, m_W = state_ptrs(A1, slot + c, i_h, H, D, D, o_d, o_d)
        p_S, m_W = state_ptrs(S1, slot + c, i_h, H, D, D, o_d, o_d)
        A = tl.load(p_A, mask=m_W, other=0.0)
        S = tl.load(p_S, mask=m_W, other=0.0)
        Q = load_tokens(q, pos, valid, i_h, H, D, BD)
        K = load_tokens(k, pos, valid, i_h, H, D, BD)
        V = load_tokens(v, pos, valid, i_h, H, D, BD)
        Dl = load_gate(delta, pos, valid, i_h, H, HAS_DELTA)
        gO = load_tokens(do, pos, valid, i_h, H, D, BD)
        theta = load_gate(lr, pos, valid, i_h, H, True)
        eta = load_gate(momentum, pos, valid, i_h, H, HAS_ETA)
        alpha = load_gate(forget, pos, valid, i_h, H, HAS_ALPHA)
        G, N, beta, d, m = chunk_coefficients(theta, eta, alpha, BT)
        gL, nL, bL, dL, mL = chunk_end_coefficients(G, N, beta, d, m, last, BT)
        if RETENTION == "none":
            W = A
        else:  # the exact read of a full chunk's last row through W_end = R(A_end); gA_end += J_R(A_end)ᵀ gW
            p_W, m_W = state_ptrs(W1, slot + c, i_h, H, D, D, o_d, o_d)
            W = tl.load(p_W, mask=m_W, other=0.0)
            p_A, m_W = state_ptrs(A1, slot + c + 1, i_h, H, D, D, o_d, o_d)
            p_W, m_W = state_ptrs(W1, slot + c + 1, i_h, H, D, D, o_d, o_d)
            W_end = tl.load(p_W, mask=m_W, other=0.0)
            end = exact_row(last, CHUNK)
            x = row(Q, end)
            gO, gQ_end, gz = end_row_bwd(tl.sum(x[:, None] * W_end, 0), gO, end, cm, D, RESIDUAL, NORM)
            gQ_end = with_row(gQ_end, row(gQ_end, end) + tl.sum(W_end * gz[None, :], 1), end)
            gW += x[:, None] * gz[None, :]
            gA += retention_map_vjp(tl.load(p_A, mask=m_W, other=0.0), W_end, gW, RETENTION, RETENTION_PARAMS)
        # forward recompute
        Y, rstd, dY, Delta = key_error(
            mm(K, W, BF16_DOT), K, V, Dl, valid, cm, D, RESIDUAL, NORM, BIAS, BIAS_PARAMS
        )
        QK = mm(Q, tl.trans(K), BF16_DOT)
        C = G * QK
        Z, QW, QS = decayed_read(Q, W, S, beta, d, BF16_DOT)
        Z -= mm(C, Delta, BF16_DOT)
        # query side
        gZ, gQ = memory_output_bwd(Z, gO, cm, D, RESIDUAL, NORM)
        gbeta, gd, gQr, gW0, gS0 = decayed_read_bwd(Q, W, S, QW, QS, gZ, beta, d, BF16_DOT)
        gG, gQc, gK = dual_correction_bwd(-mm(gZ, tl.trans(Delta), BF16_DOT), G, QK, Q, K, BF16_DOT)
        gQ += gQr + gQc
        gDelta = -mm(tl.trans(C), gZ, BF16_DOT)
        # chunk end
        gAe, gSe, gKe, gDe, gG_end, gn_end, gb_end, gd_end, gm_end = chunk_end_bwd(
            A, S, K, Delta, gA, gS, gL, nL, bL, dL, mL, BF16_DOT
        )
        gS = gS0 + gSe
        if RETENTION == "none":  # the weights are the state
            gW0 += gAe
        else:
            gA = gAe
        gK += gKe
        gDelta += gDe
        # key side (second order)
        gZk, gKa, gV, gDl = key_error_bwd(
            Y, rstd, dY, Delta, gDelta, K, V, Dl, valid, cm, D, RESIDUAL, NORM, BIAS, BIAS_PARAMS
        )
        gK += gKa + mm(gZk, tl.trans(W), BF16_DOT)
        gW0 += mm(tl.trans(K), gZk, BF16_DOT)
        gtheta, geta, galpha = chunk_coefficients_bwd(
            theta, eta, alpha, gG, gbeta, gd, gG_end, gn_end, gb_end, gd_end, gm_end, last, BT
        )
        if RETENTION == "none":
            gA = gW0
        else:
            gW = gW0
            gQ += gQ_end
        store_tokens(dq, gQ, pos, valid, i_h, H, D, BD)
        store_tokens(dk, gK, pos, valid, i_h, H, D, BD)
        store_tokens(dv, gV, pos, valid, i_h, H, D, BD)
        store_gate(dlr, gtheta, pos, valid, i_h, H, True)
        store_gate(dmomentum, geta, pos, valid, i_h, H, HAS_ETA)
        store_gate(dforget, galpha, pos, valid, i_h, H, HAS_ALPHA)
        store_gate(ddelta, gDl, pos, valid, i_h, H, HAS_DELTA)
    tl.store(p_gA, gA, mask=m_W)
    tl.store(p_gS, gS, mask=m_W)
    if RETENTION != "none":
        p_gW, m_W = state_ptrs(dW1, i_n.to(tl.int64), i_h, H, D, D, o_d, o_d)
        tl.store(p_gW, gW, mask=m_W)


@triton.jit
def deep_memory_bwd_l2_kernel(
    q, k, v, lr, momentum, forget, delta, do, dq, dk, dv, dlr, dmomentum, dforget, ddelta,
    A1, S1, A2, S2, W1, W2, dA1, dS1, dA2, dS2, dW1, dW2, slots, cu_seqlens, T,
    H: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, CHUNK: tl.constexpr, BT: tl.constexpr,
    BD: tl.constexpr, BH: tl.constexpr,
    RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_ETA: tl.constexpr, HAS_ALPHA: tl.constexpr,
    HAS_DELTA: tl.constexpr, IS_VARLEN: tl.constexpr, BF16_DOT: tl.constexpr,
    BIAS: tl.constexpr, BIAS_PARAMS: tl.constexpr, RETENTION: tl.constexpr, RETENTION_PARAMS: tl.constexpr,
):
    """Backward of :func:`deep_memory_fwd_l2_kernel`, hidden width walked in tiles of ``BH``.

    Per chunk: (0) with a retention map, the VJP of a full chunk's exact last-row read through ``W_end = R(A_end)``
    into the pending weight adjoints ``gW``, then ``gA_end += J_R(A_end)ᵀ gW``; (1) key outputs ``Zk_2``;
    (2) query forward, accumulating ``Z_2`` and ``H_q H_kᵀ``; (3) per tile, the VJP of the reads, the chunk
    end and ``Δ_1 = (Δ_2 W_2ᵀ) ⊙ φ'(Zk_1)``, which completes ``gΔ_2``; (4) per tile, the VJP of
    ``Zk_2 = φ(K W_1) W_2`` for ``gZk_2``. The state adjoints live in ``dA``, the weight adjoints in ``dW``
    (the same workspaces without a retention map).
    """
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    slot = tl.load(slots + i_n).to(tl.int64)
    ws = i_n.to(tl.int64)
    cm = tl.arange(0, BD) < D
    if RETENTION == "none":  # the weights are the state (the same slots and workspaces)
        W1 = A1
        W2 = A2
        dW1 = dA1
        dW2 = dA2
    n_chunks = tl.cdiv(eos - bos, CHUNK)
    for i_c in range(n_chunks):
        c = n_chunks - 1 - i_c
        src = slot + c
        pos, valid, last = chunk_rows(bos, eos, c, CHUNK, BT)
        Q = load_tokens(q, pos, valid, i_h, H, D, BD)
        K = load_tokens(k, pos, valid, i_h, H, D, BD)
        V = load_tokens(v, pos, valid, i_h, H, D, BD)
        Dl = load_gate(delta, pos, valid, i_h, H, HAS_DELTA)
        gO = load_tokens(do, pos, valid, i_h, H, D, BD)
        theta = load_gate(lr, pos, valid, i_h, H, True)
        eta = load_gate(momentum, pos, valid, i_h, H, HAS_ETA)
        alpha = load_gate(forget, pos, valid, i_h, H, HAS_ALPHA)
        G, N, beta, d, m = chunk_coefficients(theta, eta, alpha, BT)
        gL, nL, bL, dL, mL = chunk_end_coefficients(G, N, beta, d, m, last, BT)
        # (0) exact read of a full chunk's last row through W_end = R(A_end)
        if RETENTION != "none":
            end = exact_row(last, CHUNK)
            x = row(Q, end)
            gO, gQ_end, gz2 = end_row_bwd(memory_row(x, W1, W2, src + 1, i_h, H, D, HD, BD, BH), gO, end, cm,
                                          D, RESIDUAL, NORM)
            gx = memory_row_bwd(x, gz2, W1, W2, src + 1, dW1, dW2, ws, i_h, H, D, HD, BD, BH)
            gQ_end = with_row(gQ_end, row(gQ_end, end) + gx, end)
            tl.debug_barrier()
            retention_vjp_tiles(A1, A2, W1, W2, src + 1, dW1, dW2, dA1, dA2, ws, i_h, H, D, HD, BD, BH, RETENTION,
                                RETENTION_PARAMS)
            tl.debug_barrier()
        # (1) keys
        Zk2 = key_hidden_output(K, W1, W2, src, i_h, H, D, HD, BT, BD, BH, BF16_DOT)
        Y, rstd, dY, Delta2 = key_error(Zk2, K, V, Dl, valid, cm, D, RESIDUAL, NORM, BIAS, BIAS_PARAMS)
        QK = mm(Q, tl.trans(K), BF16_DOT)
        C1 = G * QK
        # (2) query forward
        Z2 = tl.zeros([BT, BD], tl.float32)
        HqHk = tl.zeros([BT, BT], tl.float32)
        for j in range(tl.cdiv(HD, BH)):
            p1, p2, m1, m2 = hidden_tile_ptrs(W1, W2, src, i_h, j, H, D, HD, BD, BH)
            s1, s2, m1, m2 = hidden_tile_ptrs(S1, S2, src, i_h, j, H, D, HD, BD, BH)
            W1j = tl.load(p1, mask=m1, other=0.0)
            W2j = tl.load(p2, mask=m2, other=0.0)
            Zk1, Hk, dHk, Delta1 = key_hidden_tile(K, Delta2, W1j, W2j, BF16_DOT)
            Z1, QW1, QS1 = decayed_read(Q, W1j, tl.load(s1, mask=m1, other=0.0), beta, d, BF16_DOT)
            Hq = gelu(Z1 - mm(C1, Delta1, BF16_DOT))
            Z2j, HqW2, HqS2 = decayed_read(Hq, W2j, tl.load(s2, mask=m2, other=0.0), beta, d, BF16_DOT)
            Z2 += Z2j
            HqHk += mm(Hq, tl.trans(Hk), BF16_DOT)
        C2 = G * HqHk
        Z2 -= mm(C2, Delta2, BF16_DOT)
        gZ2, gQ = memory_output_bwd(Z2, gO, cm, D, RESIDUAL, NORM)
        gC2 = -mm(gZ2, tl.trans(Delta2), BF16_DOT)
        gC2G = gC2 * G
        gG = gC2 * HqHk
        gDelta2 = -mm(tl.trans(C2), gZ2, BF16_DOT)
        gbeta = tl.zeros([BT], tl.float32)
        gd = tl.zeros([BT], tl.float32)
        gK = tl.zeros([BT, BD], tl.float32)
        gC1 = tl.zeros([BT, BT], tl.float32)
        gG_end = tl.zeros([BT], tl.float32)
        gn_end = tl.zeros([BT], tl.float32)
        gb_end = tl.zeros([], tl.float32)
        gd_end = tl.zeros([], tl.float32)
        gm_end = tl.zeros([], tl.float32)
        # (3) per tile: reads, chunk end, Δ_1
        for j in range(tl.cdiv(HD, BH)):
            p1, p2, m1, m2 = hidden_tile_ptrs(W1, W2, src, i_h, j, H, D, HD, BD, BH)
            s1, s2, m1, m2 = hidden_tile_ptrs(S1, S2, src, i_h, j, H, D, HD, BD, BH)
            g1, g2, m1, m2 = hidden_tile_ptrs(dA1, dA2, ws, i_h, j, H, D, HD, BD, BH)
            t1, t2, m1, m2 = hidden_tile_ptrs(dS1, dS2, ws, i_h, j, H, D, HD, BD, BH)
            W1j = tl.load(p1, mask=m1, other=0.0)
            S1j = tl.load(s1, mask=m1, other=0.0)
            W2j = tl.load(p2, mask=m2, other=0.0)
            S2j = tl.load(s2, mask=m2, other=0.0)
            if RETENTION == "none":
                A1j = W1j
                A2j = W2j
            else:
                a1, a2, m1, m2 = hidden_tile_ptrs(A1, A2, src, i_h, j, H, D, HD, BD, BH)
                A1j = tl.load(a1, mask=m1, other=0.0)
                A2j = tl.load(a2, mask=m2, other=0.0)
            Zk1, Hk, dHk, Delta1 = key_hidden_tile(K, Delta2, W1j, W2j, BF16_DOT)
            Z1, QW1, QS1 = decayed_read(Q, W1j, S1j, beta, d, BF16_DOT)
            Z1 -= mm(C1, Delta1, BF16_DOT)
            Hq = gelu(Z1)
            Z2j, HqW2, HqS2 = decayed_read(Hq, W2j, S2j, beta, d, BF16_DOT)
            gb, gdd, gHq, gW2j, gS2j = decayed_read_bwd(Hq, W2j, S2j, HqW2, HqS2, gZ2, beta, d, BF16_DOT)
            gbeta += gb
            gd += gdd
            gHq += mm(gC2G, Hk, BF16_DOT)
            gHk = mm(tl.trans(gC2G), Hq, BF16_DOT)
            gZ1 = gHq * gelu_grad(Z1)
            gb, gdd, gQj, gW1j, gS1j = decayed_read_bwd(Q, W1j, S1j, QW1, QS1, gZ1, beta, d, BF16_DOT)
            gbeta += gb
            gd += gdd
            gQ += gQj
            gC1 -= mm(gZ1, tl.trans(Delta1), BF16_DOT)
            gDelta1 = -mm(tl.trans(C1), gZ1, BF16_DOT)
            eA1, eS, eX, eD, eg, en, eb, ed, em = chunk_end_bwd(
                A1j, S1j, K, Delta1, tl.load(g1, mask=m1, other=0.0), tl.load(t1, mask=m1, other=0.0),
                gL, nL, bL, dL, mL, BF16_DOT,
            )
            gS1j += eS
            if RETENTION == "none":  # the weights are the state
                gW1j += eA1
            gK += eX
            gDelta1 += eD
            gG_end += eg
            gn_end += en
            gb_end += eb
            gd_end += ed
            gm_end += em
            eA2, eS, eX, eD, eg, en, eb, ed, em = chunk_end_bwd(
                A2j, S2j, Hk, Delta2, tl.load(g2, mask=m2, other=0.0), tl.load(t2, mask=m2, other=0.0),
                gL, nL, bL, dL, mL, BF16_DOT,
            )
            gS2j += eS
            if RETENTION == "none":
                gW2j += eA2
            gHk += eX
            gDelta2 += eD
            gG_end += eg
            gn_end += en
            gb_end += eb
            gd_end += ed
            gm_end += em
            gdHk = gDelta1 * gelu_grad(Zk1)
            gZk1 = gDelta1 * dHk * gelu_grad2(Zk1) + gHk * gelu_grad(Zk1)
            gDelta2 += mm(gdHk, W2j, BF16_DOT)
            gW2j += mm(tl.trans(gdHk), Delta2, BF16_DOT)
            gK += mm(gZk1, tl.trans(W1j), BF16_DOT)
            gW1j += mm(tl.trans(K), gZk1, BF16_DOT)
            tl.debug_barrier()
            if RETENTION == "none":
                tl.store(g1, gW1j, mask=m1)
                tl.store(g2, gW2j, mask=m2)
            else:
                r1, r2, m1, m2 = hidden_tile_ptrs(dW1, dW2, ws, i_h, j, H, D, HD, BD, BH)
                tl.store(g1, eA1, mask=m1)
                tl.store(g2, eA2, mask=m2)
                tl.store(r1, gW1j, mask=m1)
                tl.store(r2, gW2j, mask=m2)
            tl.store(t1, gS1j, mask=m1)
            tl.store(t2, gS2j, mask=m2)
        gGc, gQc, gKc = dual_correction_bwd(gC1, G, QK, Q, K, BF16_DOT)
        gG += gGc
        gQ += gQc
        gK += gKc
        gZk2, gKa, gV, gDl = key_error_bwd(
            Y, rstd, dY, Delta2, gDelta2, K, V, Dl, valid, cm, D, RESIDUAL, NORM, BIAS, BIAS_PARAMS
        )
        gK += gKa
        tl.debug_barrier()
        # (4) per tile: Zk_2 = φ(K W_1) W_2
        for j in range(tl.cdiv(HD, BH)):
            p1, p2, m1, m2 = hidden_tile_ptrs(W1, W2, src, i_h, j, H, D, HD, BD, BH)
            r1, r2, m1, m2 = hidden_tile_ptrs(dW1, dW2, ws, i_h, j, H, D, HD, BD, BH)
            W1j = tl.load(p1, mask=m1, other=0.0)
            W2j = tl.load(p2, mask=m2, other=0.0)
            Zk1 = mm(K, W1j, BF16_DOT)
            gZk1 = mm(gZk2, tl.trans(W2j), BF16_DOT) * gelu_grad(Zk1)
            gK += mm(gZk1, tl.trans(W1j), BF16_DOT)
            gW1j = tl.load(r1, mask=m1, other=0.0) + mm(tl.trans(K), gZk1, BF16_DOT)
            gW2j = tl.load(r2, mask=m2, other=0.0) + mm(tl.trans(gelu(Zk1)), gZk2, BF16_DOT)
            tl.debug_barrier()
            tl.store(r1, gW1j, mask=m1)
            tl.store(r2, gW2j, mask=m2)
        gtheta, geta, galpha = chunk_coefficients_bwd(
            theta, eta, alpha, gG, gbeta, gd, gG_end, gn_end, gb_end, gd_end, gm_end, last, BT
        )
        if RETENTION != "none":
            gQ += gQ_end
        store_tokens(dq, gQ, pos, valid, i_h, H, D, BD)
        store_tokens(dk, gK, pos, valid, i_h, H, D, BD)
        store_tokens(dv, gV, pos, valid, i_h, H, D, BD)
        store_gate(dlr, gtheta, pos, valid, i_h, H, True)
        store_gate(dmomentum, geta, pos, valid, i_h, H, HAS_ETA)
        store_gate(dforget, galpha, pos, valid, i_h, H, HAS_ALPHA)
        store_gate(ddelta, gDl, pos, valid, i_h, H, HAS_DELTA)
        tl.debug_barrier()


def deep_memory_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor | None,
    forget: torch.Tensor | None,
    delta: torch.Tensor | None,
    do: torch.Tensor,
    A_slots: list[torch.Tensor],
    S_slots: list[torch.Tensor],
    W_slots: list[torch.Tensor],
    dA: list[torch.Tensor],
    dS: list[torch.Tensor],
    dW: list[torch.Tensor],
    slots: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    *,
    chunk_size: int,
    residual: bool,
    norm: bool,
    block_hidden: int,
    hooks: dict[str, object],
) -> tuple[torch.Tensor | None, ...]:
    """Launch the backward kernel. ``dA, dS`` (float32 ``[N, H, d_in, d_out]``) hold the gradients of the
    final state and are overwritten with those of the initial state; with a retention map ``dW`` (zeros on
    entry) receives the gradient of the initial weights ``W_0 = R(A_0)``, still to be mapped back to
    ``A_0`` (without one ``W_slots`` and ``dW`` are ``A_slots`` and ``dA``). Returns float32
    ``(dq, dk, dv, dlr, dmomentum, dforget, ddelta)`` (None for an absent gate)."""
    B, T, H, D = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk, dv = (torch.empty(B, T, H, D, **f32) for _ in range(3))
    dgates = [None if g is None else torch.empty(B, T, H, **f32) for g in (lr, momentum, forget, delta)]
    meta = launch_meta(q, momentum, forget, delta, cu_seqlens, chunk_size=chunk_size, residual=residual, norm=norm,
                       hooks=hooks, backward=True)
    grid = (slots.numel(), H)
    common = (q, k, v, lr, momentum, forget, delta, do, dq, dk, dv, *dgates)
    if len(A_slots) == 1:
        deep_memory_bwd_l1_kernel[grid](
            *common, A_slots[0], S_slots[0], W_slots[0], dA[0], dS[0], dW[0], slots, cu_seqlens, T, **meta
        )
    else:
        deep_memory_bwd_l2_kernel[grid](
            *common, A_slots[0], S_slots[0], A_slots[1], S_slots[1], W_slots[0], W_slots[1], dA[0], dS[0], dA[1],
            dS[1], dW[0], dW[1], slots, cu_seqlens, T, HD=A_slots[0].shape[-1], BH=block_hidden, **meta
        )
    return dq, dk, dv, *dgates
