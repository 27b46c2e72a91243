"""Hidden-layer tiles of the two-layer memory ``M(x) = x + LN(φ(x W_1) W_2)`` (Titans, L = 2).

The hidden width ``d_1 = expansion · D`` is walked in tiles of ``BH`` columns so that only a
``[D, BH]`` slice of ``W_1, S_1`` and a ``[BH, D]`` slice of ``W_2, S_2`` is live at a time.
Key side (at the chunk-start weights): ``Zk_1 = K W_1``, ``H_k = φ(Zk_1)``, ``Zk_2 = H_k W_2``; the
back-propagated key errors are ``Δ_2`` (from :func:`key_error` on ``Zk_2``) and
``Δ_1 = (Δ_2 W_2ᵀ) ⊙ φ'(Zk_1)``. Query side: ``Z_1 = β ⊙ (Q W_1) + d ⊙ (Q S_1) − (G ⊙ Q Kᵀ) Δ_1``.
With a retention map the state ``A`` and the weights ``W = R(A)`` are separate: the chunk-end map, the
exact read of the chunk's last row and their VJPs walk the tiles here too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import gelu, gelu_grad, mm, state_ptrs
from .retention import (
    column_inner,
    fresh_columns,
    inner_partial,
    norm_partial,
    retention_apply,
    retention_vjp,
    softmax_columns,
)


@triton.jit
def hidden_tile_ptrs(X1, X2, slot, i_h, j, H: tl.constexpr, D: tl.constexpr, HD: tl.constexpr,
                     BD: tl.constexpr, BH: tl.constexpr):
    """Hidden tile ``j`` of a layer-1 ``[slots, H, D, HD]`` and a layer-2 ``[slots, H, HD, D]`` state:
    pointers of the ``[D, BH]`` and ``[BH, D]`` blocks and their masks."""
    o_d = tl.arange(0, BD)
    o_h = j * BH + tl.arange(0, BH)
    p1, m1 = state_ptrs(X1, slot, i_h, H, D, HD, o_d, o_h)
    p2, m2 = state_ptrs(X2, slot, i_h, H, HD, D, o_h, o_d)
    return p1, p2, m1, m2


@triton.jit
def key_hidden_output(K, W1, W2, slot, i_h, H: tl.constexpr, D: tl.constexpr, HD: tl.constexpr,
                      BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BF16_DOT: tl.constexpr):
    """``Zk_2 = φ(K W_1) W_2`` summed over the hidden tiles of the weights in ``slot``."""
    Zk2 = tl.zeros([BT, BD], tl.float32)
    for j in range(tl.cdiv(HD, BH)):
        p1, p2, m1, m2 = hidden_tile_ptrs(W1, W2, slot, i_h, j, H, D, HD, BD, BH)
        Zk2 += mm(gelu(mm(K, tl.load(p1, mask=m1, other=0.0), BF16_DOT)), tl.load(p2, mask=m2, other=0.0),
                 BF16_DOT)
    return Zk2


@triton.jit
def key_hidden_tile(K, Delta2, W1j, W2j, BF16_DOT: tl.constexpr):
    """Key side of one tile: ``(Zk_1, H_k, Δ_2 W_2ᵀ, Δ_1)``."""
    Zk1 = mm(K, W1j, BF16_DOT)
    dHk = mm(Delta2, tl.trans(W2j), BF16_DOT)
    return Zk1, gelu(Zk1), dHk, dHk * gelu_grad(Zk1)


@triton.jit
def memory_row(x, W1, W2, slot, i_h, H: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, BD: tl.constexpr,
               BH: tl.constexpr):
    """Pre-norm read of one row ``x: [BD]`` through the weights in ``slot``: ``φ(x W_1) W_2``, ``[BD]``."""
    z2 = tl.zeros([BD], tl.float32)
    for j in range(tl.cdiv(HD, BH)):
        p1, p2, m1, m2 = hidden_tile_ptrs(W1, W2, slot, i_h, j, H, D, HD, BD, BH)
        h1 = gelu(tl.sum(x[:, None] * tl.load(p1, mask=m1, other=0.0), 0))
        z2 += tl.sum(h1[:, None] * tl.load(p2, mask=m2, other=0.0), 0)
    return z2


@triton.jit
def memory_row_bwd(x, gz2, W1, W2, slot, gW1, gW2, ws, i_h, H: tl.constexpr, D: tl.constexpr, HD: tl.constexpr,
                   BD: tl.constexpr, BH: tl.constexpr):
    """VJP of :func:`memory_row` for ``gz2``: adds ``x ⊗ gz_1`` and ``φ(z_1) ⊗ gz2`` to the weight adjoints
    in workspace row ``ws``; returns ``gx``."""
    gx = tl.zeros([BD], tl.float32)
    for j in range(tl.cdiv(HD, BH)):
        p1, p2, m1, m2 = hidden_tile_ptrs(W1, W2, slot, i_h, j, H, D, HD, BD, BH)
        g1, g2, m1, m2 = hidden_tile_ptrs(gW1, gW2, ws, i_h, j, H, D, HD, BD, BH)
        W1j = tl.load(p1, mask=m1, other=0.0)
        W2j = tl.load(p2, mask=m2, other=0.0)
        z1 = tl.sum(x[:, None] * W1j, 0)
        gz1 = tl.sum(W2j * gz2[None, :], 1) * gelu_grad(z1)
        gx += tl.sum(W1j * gz1[None, :], 1)
        tl.store(g1, tl.load(g1, mask=m1, other=0.0) + x[:, None] * gz1[None, :], mask=m1)
        tl.store(g2, tl.load(g2, mask=m2, other=0.0) + gelu(z1)[:, None] * gz2[None, :], mask=m2)
    return gx


@triton.jit
def retention_apply_tiles(A1, A2, W1, W2, slot, i_h, total1, total2, m2, s2, H: tl.constexpr, D: tl.constexpr,
                          HD: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, RETENTION: tl.constexpr,
                          PARAMS: tl.constexpr):
    """``W_l = R(A_l)`` of both layers, tile by tile, from the state in ``slot`` into the weights in ``slot``.
    ``total_l`` are the norm statistics of the whole layers, ``m2, s2`` layer 2's softmax column statistics;
    a layer-1 tile holds whole columns (all of ``d_in = D``), so its softmax statistics are its own."""
    for j in range(tl.cdiv(HD, BH)):
        a1, a2, m1, mask2 = hidden_tile_ptrs(A1, A2, slot, i_h, j, H, D, HD, BD, BH)
        w1, w2, m1, mask2 = hidden_tile_ptrs(W1, W2, slot, i_h, j, H, D, HD, BD, BH)
        A1j = tl.load(a1, mask=m1, other=0.0)
        m1j, s1j = fresh_columns(BH)
        m1j, s1j = softmax_columns(A1j, m1, m1j, s1j, RETENTION)
        tl.store(w1, retention_apply(A1j, m1, total1, m1j, s1j, RETENTION, PARAMS), mask=m1)
        W2j = retention_apply(tl.load(a2, mask=mask2, other=0.0), mask2, total2, m2, s2, RETENTION, PARAMS)
        tl.store(w2, W2j, mask=mask2)


@triton.jit
def retention_vjp_tiles(A1, A2, W1, W2, slot, gW1, gW2, gA1, gA2, ws, i_h, H: tl.constexpr, D: tl.constexpr,
                        HD: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, RETENTION: tl.constexpr,
                        PARAMS: tl.constexpr):
    """``gA_l += J_R(A_l)ᵀ gW_l`` for both layers: state and weights in ``slot``, adjoints in workspace row
    ``ws``. A first pass gathers the whole layers' statistics, a second applies the VJP."""
    total1 = tl.zeros([], tl.float32)
    total2 = tl.zeros([], tl.float32)
    inner1 = tl.zeros([], tl.float32)
    inner2 = tl.zeros([], tl.float32)
    colsum2 = tl.zeros([BD], tl.float32)
    for j in range(tl.cdiv(HD, BH)):
        a1, a2, m1, m2 = hidden_tile_ptrs(A1, A2, slot, i_h, j, H, D, HD, BD, BH)
        g1, g2, m1, m2 = hidden_tile_ptrs(gW1, gW2, ws, i_h, j, H, D, HD, BD, BH)
        w1, w2, m1, m2 = hidden_tile_ptrs(W1, W2, slot, i_h, j, H, D, HD, BD, BH)
        A1j = tl.load(a1, mask=m1, other=0.0)
        A2j = tl.load(a2, mask=m2, other=0.0)
        gW1j = tl.load(g1, mask=m1, other=0.0)
        gW2j = tl.load(g2, mask=m2, other=0.0)
        total1 += norm_partial(A1j, RETENTION, PARAMS)
        total2 += norm_partial(A2j, RETENTION, PARAMS)
        inner1 += inner_partial(A1j, gW1j, RETENTION, PARAMS)
        inner2 += inner_partial(A2j, gW2j, RETENTION, PARAMS)
        colsum2 += column_inner(tl.load(w2, mask=m2, other=0.0), gW2j, RETENTION)
    for j in range(tl.cdiv(HD, BH)):
        a1, a2, m1, m2 = hidden_tile_ptrs(A1, A2, slot, i_h, j, H, D, HD, BD, BH)
        g1, g2, m1, m2 = hidden_tile_ptrs(gW1, gW2, ws, i_h, j, H, D, HD, BD, BH)
        w1, w2, m1, m2 = hidden_tile_ptrs(W1, W2, slot, i_h, j, H, D, HD, BD, BH)
        t1, t2, m1, m2 = hidden_tile_ptrs(gA1, gA2, ws, i_h, j, H, D, HD, BD, BH)
        W1j = tl.load(w1, mask=m1, other=0.0)
        gW1j = tl.load(g1, mask=m1, other=0.0)
        gA1j = retention_vjp(tl.load(a1, mask=m1, other=0.0), W1j, gW1j, total1, inner1,
                             column_inner(W1j, gW1j, RETENTION), RETENTION, PARAMS)
        gA2j = retention_vjp(tl.load(a2, mask=m2, other=0.0), tl.load(w2, mask=m2, other=0.0),
                             tl.load(g2, mask=m2, other=0.0), total2, inner2, colsum2, RETENTION, PARAMS)
        tl.store(t1, tl.load(t1, mask=m1, other=0.0) + gA1j, mask=m1)
        tl.store(t2, tl.load(t2, mask=m2, other=0.0) + gA2j, mask=m2)
