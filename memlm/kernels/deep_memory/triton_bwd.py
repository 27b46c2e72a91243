"""Triton backward kernels of the chunked deep memory, one program per (sequence, head).

Each program walks its chunks in reverse. For chunk ``c`` it reloads the stored chunk-start
state ``(W_0, S_0)``, recomputes the chunk's forward (key errors ``Δ``, query reads ``Z``) and
applies the exact VJP of every step, carrying the adjoints of the chunk-end state
``(gW_b, gS_b)`` to the chunk start. The adjoint of ``Δ`` needs second derivatives of the
memory (``φ''`` and the LayerNorm Hessian term): ``u = ∇_W ℓ`` depends on ``W_0``.
The carried adjoints live in float32 workspaces ``[N, H, d_in, d_out]`` (registers for L = 1)
that hold ``∂L/∂(W_T, S_T)`` on entry and ``∂L/∂(W_0, S_0)`` on exit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_coefficients import chunk_coefficients, chunk_coefficients_bwd, chunk_end_coefficients
from .triton_common import (
    chunk_end_bwd,
    chunk_rows,
    decayed_read,
    decayed_read_bwd,
    dual_correction_bwd,
    gelu,
    gelu_grad,
    gelu_grad2,
    key_error,
    key_error_bwd,
    load_gate,
    load_tokens,
    memory_output_bwd,
    mm,
    sequence_bounds,
    state_ptrs,
    store_gate,
    store_tokens,
)
from .triton_fwd import block_size, num_warps
from .triton_hidden import hidden_tile_ptrs, key_hidden_output, key_hidden_tile


@triton.jit
def deep_memory_bwd_l1_kernel(
    q, k, v, lr, momentum, forget, do, dq, dk, dv, dlr, dmomentum, dforget,
    W1, S1, dW1, dS1, slots, cu_seqlens, T,
    H: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_ETA: tl.constexpr, HAS_ALPHA: tl.constexpr,
    IS_VARLEN: tl.constexpr, BF16_DOT: tl.constexpr,
):
    """Backward of :func:`deep_memory_fwd_l1_kernel`; the carried ``gW, gS: [D, D]`` stay in registers."""
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    slot = tl.load(slots + i_n).to(tl.int64)
    o_d = tl.arange(0, BD)
    cm = o_d < D
    p_gW, m_W = state_ptrs(dW1, i_n.to(tl.int64), i_h, H, D, D, o_d, o_d)
    p_gS, m_W = state_ptrs(dS1, i_n.to(tl.int64), i_h, H, D, D, o_d, o_d)
    gW = tl.load(p_gW, mask=m_W, other=0.0)
    gS = tl.load(p_gS, mask=m_W, other=0.0)
    n_chunks = tl.cdiv(eos - bos, CHUNK)
    for i_c in range(n_chunks):
        c = n_chunks - 1 - i_c
        pos, valid, last = chunk_rows(bos, eos, c, CHUNK, BT)
        p_W, m_W = state_ptrs(W1, slot + c, i_h, H, D, D, o_d, o_d)
        p_S, m_W = state_ptrs(S1, slot + c, i_h, H, D, D, o_d, o_d)
        W = tl.load(p_W, mask=m_W, other=0.0)
        S = tl.load(p_S, mask=m_W, other=0.0)
        Q = load_tokens(q, pos, valid, i_h, H, D, BD)
        K = load_tokens(k, pos, valid, i_h, H, D, BD)
        V = load_tokens(v, pos, valid, i_h, H, D, BD)
        gO = load_tokens(do, pos, valid, i_h, H, D, BD)
        theta = load_gate(lr, pos, valid, i_h, H, True)
        eta = load_gate(momentum, pos, valid, i_h, H, HAS_ETA)
        alpha = load_gate(forget, pos, valid, i_h, H, HAS_ALPHA)
        G, N, beta, d, m = chunk_coefficients(theta, eta, alpha, BT)
        gL, nL, bL, dL, mL = chunk_end_coefficients(G, N, beta, d, m, last, BT)
        # forward recompute
        Y, rstd, dY, Delta = key_error(mm(K, W, BF16_DOT), K, V, valid, cm, D, RESIDUAL, NORM)
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
        gWe, gSe, gKe, gDe, gG_end, gn_end, gb_end, gd_end, gm_end = chunk_end_bwd(
            W, S, K, Delta, gW, gS, gL, nL, bL, dL, mL, BF16_DOT
        )
        gW0 += gWe
        gS0 += gSe
        gK += gKe
        gDelta += gDe
        # key side (second order)
        gA, gKa, gV = key_error_bwd(Y, rstd, dY, Delta, gDelta, valid, cm, D, RESIDUAL, NORM)
        gK += gKa + mm(gA, tl.trans(W), BF16_DOT)
        gW0 += mm(tl.trans(K), gA, BF16_DOT)
        gtheta, geta, galpha = chunk_coefficients_bwd(
            theta, eta, alpha, gG, gbeta, gd, gG_end, gn_end, gb_end, gd_end, gm_end, last, BT
        )
        store_tokens(dq, gQ, pos, valid, i_h, H, D, BD)
        store_tokens(dk, gK, pos, valid, i_h, H, D, BD)
        store_tokens(dv, gV, pos, valid, i_h, H, D, BD)
        store_gate(dlr, gtheta, pos, valid, i_h, H, True)
        store_gate(dmomentum, geta, pos, valid, i_h, H, HAS_ETA)
        store_gate(dforget, galpha, pos, valid, i_h, H, HAS_ALPHA)
        gW = gW0
        gS = gS0
    tl.store(p_gW, gW, mask=m_W)
    tl.store(p_gS, gS, mask=m_W)


@triton.jit
def deep_memory_bwd_l2_kernel(
    q, k, v, lr, momentum, forget, do, dq, dk, dv, dlr, dmomentum, dforget,
    W1, S1, W2, S2, dW1, dS1, dW2, dS2, slots, cu_seqlens, T,
    H: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, CHUNK: tl.constexpr, BT: tl.constexpr,
    BD: tl.constexpr, BH: tl.constexpr,
    RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_ETA: tl.constexpr, HAS_ALPHA: tl.constexpr,
    IS_VARLEN: tl.constexpr, BF16_DOT: tl.constexpr,
):
    """Backward of :func:`deep_memory_fwd_l2_kernel`, hidden width walked in tiles of ``BH``.

    Per chunk: (1) key outputs ``A_2``; (2) query forward, accumulating ``Z_2`` and ``H_q H_kᵀ``;
    (3) per tile, the VJP of the reads, the chunk end and ``Δ_1 = (Δ_2 W_2ᵀ) ⊙ φ'(A_1)``, which
    completes ``gΔ_2``; (4) per tile, the VJP of ``A_2 = φ(K W_1) W_2`` for ``gA_2``.
    """
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    slot = tl.load(slots + i_n).to(tl.int64)
    ws = i_n.to(tl.int64)
    cm = tl.arange(0, BD) < D
    n_chunks = tl.cdiv(eos - bos, CHUNK)
    for i_c in range(n_chunks):
        c = n_chunks - 1 - i_c
        src = slot + c
        pos, valid, last = chunk_rows(bos, eos, c, CHUNK, BT)
        Q = load_tokens(q, pos, valid, i_h, H, D, BD)
        K = load_tokens(k, pos, valid, i_h, H, D, BD)
        V = load_tokens(v, pos, valid, i_h, H, D, BD)
        gO = load_tokens(do, pos, valid, i_h, H, D, BD)
        theta = load_gate(lr, pos, valid, i_h, H, True)
        eta = load_gate(momentum, pos, valid, i_h, H, HAS_ETA)
        alpha = load_gate(forget, pos, valid, i_h, H, HAS_ALPHA)
        G, N, beta, d, m = chunk_coefficients(theta, eta, alpha, BT)
        gL, nL, bL, dL, mL = chunk_end_coefficients(G, N, beta, d, m, last, BT)
        # (1) keys
        A2 = key_hidden_output(K, W1, W2, src, i_h, H, D, HD, BT, BD, BH, BF16_DOT)
        Y, rstd, dY, Delta2 = key_error(A2, K, V, valid, cm, D, RESIDUAL, NORM)
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
            A1, Hk, dHk, Delta1 = key_hidden_tile(K, Delta2, W1j, W2j, BF16_DOT)
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
            g1, g2, m1, m2 = hidden_tile_ptrs(dW1, dW2, ws, i_h, j, H, D, HD, BD, BH)
            t1, t2, m1, m2 = hidden_tile_ptrs(dS1, dS2, ws, i_h, j, H, D, HD, BD, BH)
            W1j = tl.load(p1, mask=m1, other=0.0)
            S1j = tl.load(s1, mask=m1, other=0.0)
            W2j = tl.load(p2, mask=m2, other=0.0)
            S2j = tl.load(s2, mask=m2, other=0.0)
            A1, Hk, dHk, Delta1 = key_hidden_tile(K, Delta2, W1j, W2j, BF16_DOT)
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
            eW, eS, eX, eD, eg, en, eb, ed, em = chunk_end_bwd(
                W1j, S1j, K, Delta1, tl.load(g1, mask=m1, other=0.0), tl.load(t1, mask=m1, other=0.0),
                gL, nL, bL, dL, mL, BF16_DOT,
            )
            gW1j += eW
            gS1j += eS
            gK += eX
            gDelta1 += eD
            gG_end += eg
            gn_end += en
            gb_end += eb
            gd_end += ed
            gm_end += em
            eW, eS, eX, eD, eg, en, eb, ed, em = chunk_end_bwd(
                W2j, S2j, Hk, Delta2, tl.load(g2, mask=m2, other=0.0), tl.load(t2, mask=m2, other=0.0),
                gL, nL, bL, dL, mL, BF16_DOT,
            )
            gW2j += eW
            gS2j += eS
            gHk += eX
            gDelta2 += eD
            gG_end += eg
            gn_end += en
            gb_end += eb
            gd_end += ed
            gm_end += em
            gdHk = gDelta1 * gelu_grad(A1)
            gA1 = gDelta1 * dHk * gelu_grad2(A1) + gHk * gelu_grad(A1)
            gDelta2 += mm(gdHk, W2j, BF16_DOT)
            gW2j += mm(tl.trans(gdHk), Delta2, BF16_DOT)
            gK += mm(gA1, tl.trans(W1j), BF16_DOT)
            gW1j += mm(tl.trans(K), gA1, BF16_DOT)
            tl.debug_barrier()
            tl.store(g1, gW1j, mask=m1)
            tl.store(t1, gS1j, mask=m1)
            tl.store(g2, gW2j, mask=m2)
            tl.store(t2, gS2j, mask=m2)
        gGc, gQc, gKc = dual_correction_bwd(gC1, G, QK, Q, K, BF16_DOT)
        gG += gGc
        gQ += gQc
        gK += gKc
        gA2, gKa, gV = key_error_bwd(Y, rstd, dY, Delta2, gDelta2, valid, cm, D, RESIDUAL, NORM)
        gK += gKa
        tl.debug_barrier()
        # (4) per tile: A_2 = φ(K W_1) W_2
        for j in range(tl.cdiv(HD, BH)):
            p1, p2, m1, m2 = hidden_tile_ptrs(W1, W2, src, i_h, j, H, D, HD, BD, BH)
            g1, g2, m1, m2 = hidden_tile_ptrs(dW1, dW2, ws, i_h, j, H, D, HD, BD, BH)
            W1j = tl.load(p1, mask=m1, other=0.0)
            W2j = tl.load(p2, mask=m2, other=0.0)
            A1 = mm(K, W1j, BF16_DOT)
            gA1 = mm(gA2, tl.trans(W2j), BF16_DOT) * gelu_grad(A1)
            gK += mm(gA1, tl.trans(W1j), BF16_DOT)
            gW1j = tl.load(g1, mask=m1, other=0.0) + mm(tl.trans(K), gA1, BF16_DOT)
            gW2j = tl.load(g2, mask=m2, other=0.0) + mm(tl.trans(gelu(A1)), gA2, BF16_DOT)
            tl.debug_barrier()
            tl.store(g1, gW1j, mask=m1)
            tl.store(g2, gW2j, mask=m2)
        gtheta, geta, galpha = chunk_coefficients_bwd(
            theta, eta, alpha, gG, gbeta, gd, gG_end, gn_end, gb_end, gd_end, gm_end, last, BT
        )
        store_tokens(dq, gQ, pos, valid, i_h, H, D, BD)
        store_tokens(dk, gK, pos, valid, i_h, H, D, BD)
        store_tokens(dv, gV, pos, valid, i_h, H, D, BD)
        store_gate(dlr, gtheta, pos, valid, i_h, H, True)
        store_gate(dmomentum, geta, pos, valid, i_h, H, HAS_ETA)
        store_gate(dforget, galpha, pos, valid, i_h, H, HAS_ALPHA)
        tl.debug_barrier()


def deep_memory_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor | None,
    forget: torch.Tensor | None,
    do: torch.Tensor,
    W_slots: list[torch.Tensor],
    S_slots: list[torch.Tensor],
    dW: list[torch.Tensor],
    dS: list[torch.Tensor],
    slots: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    *,
    chunk_size: int,
    residual: bool,
    norm: bool,
    block_hidden: int,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernel. ``dW, dS`` (float32 ``[N, H, d_in, d_out]``) hold the gradients
    of the final state and are overwritten with those of the initial state. Returns float32
    ``(dq, dk, dv, dlr, dmomentum, dforget)`` (None for an absent gate)."""
    B, T, H, D = q.shape
    BD = block_size(D)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk, dv = (torch.empty(B, T, H, D, **f32) for _ in range(3))
    dlr = torch.empty(B, T, H, **f32)
    dmomentum = None if momentum is None else torch.empty(B, T, H, **f32)
    dforget = None if forget is None else torch.empty(B, T, H, **f32)
    meta = dict(
        H=H, D=D, CHUNK=chunk_size, BT=block_size(chunk_size), BD=BD, RESIDUAL=residual, NORM=norm,
        HAS_ETA=momentum is not None, HAS_ALPHA=forget is not None, IS_VARLEN=cu_seqlens is not None,
        BF16_DOT=q.dtype == torch.bfloat16, num_warps=num_warps(BD, True), num_stages=1,
    )
    grid = (slots.numel(), H)
    common = (q, k, v, lr, momentum, forget, do, dq, dk, dv, dlr, dmomentum, dforget)
    if len(W_slots) == 1:
        deep_memory_bwd_l1_kernel[grid](
            *common, W_slots[0], S_slots[0], dW[0], dS[0], slots, cu_seqlens, T, **meta
        )
    else:
        deep_memory_bwd_l2_kernel[grid](
            *common, W_slots[0], S_slots[0], W_slots[1], S_slots[1], dW[0], dS[0], dW[1], dS[1], slots,
            cu_seqlens, T, HD=W_slots[0].shape[-1], BH=block_hidden, **meta
        )
    return dq, dk, dv, dlr, dmomentum, dforget
