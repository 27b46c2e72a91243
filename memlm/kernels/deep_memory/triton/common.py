"""Triton device functions shared by the deep-memory forward and backward kernels.

One chunk of ``b`` tokens is a ``[BT, BD]`` tile (rows past the chunk or the document are
masked to zero). The memory ``M(x) = x + LN(h_L)`` (residual and affine-free LayerNorm
optional) is read in the dual form of docs/design.md §3: a layer with chunk-start weights ``W_0``,
momentum ``S_0``, key-side inputs ``X`` and back-propagated key errors ``Δ`` reads a query-side
input ``X_q`` as ``Z = β ⊙ (X_q W_0) + d ⊙ (X_q S_0) − (G ⊙ X_q Xᵀ) Δ``.
With a retention map the last row of a full chunk is read through the exact ``R(A_end)`` instead
(:func:`exact_row`, :func:`row`, :func:`with_row`, :func:`end_row_bwd`). Every ``*_bwd`` function is the exact
vector-Jacobian product of its forward twin.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..mlp import LN_EPS
from .bias import bias_psi, bias_psi_bwd

_LN_EPS = tl.constexpr(LN_EPS)
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def mm(a, b, BF16_DOT: tl.constexpr):
    """``a @ b`` accumulated in float32; operands in bfloat16 when ``BF16_DOT``, else exact float32."""
    if BF16_DOT:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def gelu(x):
    """Exact GELU ``φ(x) = x Φ(x)`` (erf form)."""
    return 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))


@triton.jit
def gelu_grad(x):
    """``φ'(x) = Φ(x) + x ϕ(x)``."""
    return 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2)) + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI


@triton.jit
def gelu_grad2(x):
    """``φ''(x) = ϕ(x) (2 − x²)``."""
    return tl.exp(-0.5 * x * x) * _INV_SQRT_2PI * (2.0 - x * x)


@triton.jit
def layer_norm(x, cm, D: tl.constexpr):
    """Affine-free LayerNorm over the ``D`` valid columns (``cm``: column mask): ``ŷ = (x − μ) r``,
    ``r = (var + ε)^{-1/2}``. Returns ``ŷ`` and ``r``."""
    mean = tl.sum(x, 1) / D
    xc = tl.where(cm[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + _LN_EPS)
    return xc * rstd[:, None], rstd


@triton.jit
def layer_norm_bwd(y, rstd, g, cm, D: tl.constexpr):
    """``J g`` for the (symmetric) LayerNorm Jacobian ``J = r (I − 11ᵀ/D − ŷŷᵀ/D)``."""
    g_mean = tl.sum(g, 1) / D
    gy_mean = tl.sum(y * g, 1) / D
    return tl.where(cm[None, :], rstd[:, None] * (g - g_mean[:, None] - y * gy_mean[:, None]), 0.0)


@triton.jit
def layer_norm_bwd2(y, rstd, a, delta, g, cm, D: tl.constexpr):
    """``∇_x ⟨g, J(x) a⟩`` with ``delta = J(x) a``:
    ``−r (mean(g⊙δ) ŷ + mean(ŷ⊙g) δ + mean(ŷ⊙a) J g)``."""
    jg = layer_norm_bwd(y, rstd, g, cm, D)
    gd_mean = tl.sum(g * delta, 1) / D
    yg_mean = tl.sum(y * g, 1) / D
    ya_mean = tl.sum(y * a, 1) / D
    return -rstd[:, None] * (gd_mean[:, None] * y + yg_mean[:, None] * delta + ya_mean[:, None] * jg)


@triton.jit
def key_error(Zk, K, V, delta, valid, cm, D: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr,
              BIAS: tl.constexpr, BIAS_PARAMS: tl.constexpr):
    """The error of the last layer for the keys: ``e = M(k) − v`` with pre-norm output ``Zk``, the
    attentional bias ``ψ(e)`` (:mod:`.triton.bias`; ``delta`` Huber's per-row threshold) and
    ``Δ = Jᵀ ψ(e)`` through the LayerNorm. Returns ``ŷ, r, ψ(e), Δ``."""
    if NORM:
        Y, rstd = layer_norm(Zk, cm, D)
    else:
        Y = Zk
        rstd = tl.zeros([Zk.shape[0]], tl.float32)
    dY = tl.where(valid[:, None], bias_psi(_error(Y, K, V, RESIDUAL), V, delta, BIAS, BIAS_PARAMS), 0.0)
    if NORM:
        Delta = layer_norm_bwd(Y, rstd, dY, cm, D)
    else:
        Delta = dY
    return Y, rstd, dY, Delta


@triton.jit
def _error(Y, K, V, RESIDUAL: tl.constexpr):
    """``e = M(k) − v`` from the normalised output ``ŷ``."""
    E = Y - V
    if RESIDUAL:
        E += K
    return E


@triton.jit
def key_error_bwd(
    Y, rstd, dY, Delta, gDelta, K, V, delta, valid, cm, D: tl.constexpr, RESIDUAL: tl.constexpr,
    NORM: tl.constexpr, BIAS: tl.constexpr, BIAS_PARAMS: tl.constexpr,
):
    """Backward of :func:`key_error` for an adjoint ``gΔ``: returns ``(gZk, gK, gV, gδ)``."""
    if NORM:
        gPsi = layer_norm_bwd(Y, rstd, gDelta, cm, D)
        gZk = layer_norm_bwd2(Y, rstd, dY, Delta, gDelta, cm, D)
    else:
        gPsi = gDelta
        gZk = tl.zeros(gDelta.shape, tl.float32)
    gPsi = tl.where(valid[:, None], gPsi, 0.0)
    gE, gV, gdelta = bias_psi_bwd(_error(Y, K, V, RESIDUAL), V, delta, gPsi, BIAS, BIAS_PARAMS)
    if NORM:
        gZk += layer_norm_bwd(Y, rstd, gE, cm, D)
    else:
        gZk += gE
    if RESIDUAL:
        gK = gE
    else:
        gK = tl.zeros(gE.shape, tl.float32)
    return gZk, gK, gV - gE, gdelta


@triton.jit
def memory_output(Z, Q, cm, D: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr):
    """``M(q) = q + LN(Z)`` from the last layer's pre-norm read ``Z``."""
    if NORM:
        O, _ = layer_norm(Z, cm, D)
    else:
        O = Z
    if RESIDUAL:
        O += Q
    return O


@triton.jit
def memory_output_bwd(Z, gO, cm, D: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr):
    """Backward of :func:`memory_output`: returns ``(gZ, gQ)`` (``gQ`` the residual part)."""
    if NORM:
        Y, rstd = layer_norm(Z, cm, D)
        gZ = layer_norm_bwd(Y, rstd, gO, cm, D)
    else:
        gZ = gO
    if RESIDUAL:
        gQ = gO
    else:
        gQ = tl.zeros(gO.shape, tl.float32)
    return gZ, gQ


@triton.jit
def row(X, last):
    """Row ``last`` of a ``[BT, BC]`` tile, ``[BC]``."""
    o = tl.arange(0, X.shape[0])
    return tl.sum(tl.where((o == last)[:, None], X, 0.0), 0)


@triton.jit
def with_row(X, x, last):
    """``X`` with row ``last`` replaced by ``x: [BC]``."""
    o = tl.arange(0, X.shape[0])
    return tl.where((o == last)[:, None], x[None, :], X)


@triton.jit
def exact_row(last, CHUNK: tl.constexpr):
    """The row of a chunk read through the exact ``R(A_end)``: its last if the chunk is full, else −1 (none:
    a sequence's partial last chunk is read linearised throughout, as in ``naive``)."""
    return tl.where(last == CHUNK - 1, last, -1)


@triton.jit
def end_row_bwd(z, gO, last, cm, D: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr):
    """Backward of the exact read of row ``last`` (:func:`exact_row`), ``o_last = q + LN(z)`` (``z: [BD]``
    read through ``R(A_end)``): returns ``gO`` without that row (the linearised read's share), the residual
    ``gQ`` (that row only) and ``gz`` (all zero for ``last = −1``)."""
    at = (tl.arange(0, gO.shape[0]) == last)[:, None]
    gZ, gQ = memory_output_bwd(with_row(tl.zeros(gO.shape, tl.float32), z, last), tl.where(at, gO, 0.0), cm, D,
                               RESIDUAL, NORM)
    return tl.where(at, 0.0, gO), gQ, row(gZ, last)


@triton.jit
def decayed_read(X, W, S, beta, d, BF16_DOT: tl.constexpr):
    """``β ⊙ (X W_0) + d ⊙ (X S_0)``; also returns ``X W_0`` and ``X S_0`` for the backward."""
    XW = mm(X, W, BF16_DOT)
    XS = mm(X, S, BF16_DOT)
    return beta[:, None] * XW + d[:, None] * XS, XW, XS


@triton.jit
def decayed_read_bwd(X, W, S, XW, XS, gZ, beta, d, BF16_DOT: tl.constexpr):
    """Backward of :func:`decayed_read`: returns ``(gβ, gd, gX, gW_0, gS_0)``."""
    gZb = beta[:, None] * gZ
    gZd = d[:, None] * gZ
    gX = mm(gZb, tl.trans(W), BF16_DOT) + mm(gZd, tl.trans(S), BF16_DOT)
    gW = mm(tl.trans(X), gZb, BF16_DOT)
    gS = mm(tl.trans(X), gZd, BF16_DOT)
    return tl.sum(gZ * XW, 1), tl.sum(gZ * XS, 1), gX, gW, gS


@triton.jit
def dual_correction_bwd(gC, G, XX, Xq, X, BF16_DOT: tl.constexpr):
    """Backward of ``C = G ⊙ (X_q Xᵀ)`` for an adjoint ``gC``: returns ``(gG, gX_q, gX)``."""
    gCG = gC * G
    return gC * XX, mm(gCG, X, BF16_DOT), mm(tl.trans(gCG), Xq, BF16_DOT)


@triton.jit
def chunk_end(W, S, X, Delta, gL, nL, bL, dL, mL, BF16_DOT: tl.constexpr):
    """Chunk-end state of one layer, ``u_i = X_iᵀ Δ_i``:
    ``W_b = β_b W_0 + d_b S_0 − Xᵀ(G_b ⊙ Δ)``, ``S_b = m_b S_0 − Xᵀ(n_b ⊙ Δ)`` (``W`` is the state ``A``
    when a retention map is used)."""
    Xt = tl.trans(X)
    W_end = bL * W + dL * S - mm(Xt, gL[:, None] * Delta, BF16_DOT)
    S_end = mL * S - mm(Xt, nL[:, None] * Delta, BF16_DOT)
    return W_end, S_end


@triton.jit
def chunk_end_bwd(W, S, X, Delta, gW_end, gS_end, gL, nL, bL, dL, mL, BF16_DOT: tl.constexpr):
    """Backward of :func:`chunk_end`: returns ``(gW_0, gS_0, gX, gΔ, gG_b, gn_b, gβ_b, gd_b, gm_b)``."""
    XgS = mm(X, gS_end, BF16_DOT)
    XgW = mm(X, gW_end, BF16_DOT)
    gDelta = -(nL[:, None] * XgS + gL[:, None] * XgW)
    gX = -(
        mm(nL[:, None] * Delta, tl.trans(gS_end), BF16_DOT)
        + mm(gL[:, None] * Delta, tl.trans(gW_end), BF16_DOT)
    )
    gg = -tl.sum(Delta * XgW, 1)
    gn = -tl.sum(Delta * XgS, 1)
    gb = tl.sum(gW_end * W)
    gd = tl.sum(gW_end * S)
    gm = tl.sum(gS_end * S)
    return bL * gW_end, mL * gS_end + dL * gW_end, gX, gDelta, gg, gn, gb, gd, gm


@triton.jit
def sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """``[bos, eos)`` token span of sequence ``i_n`` (a packed document when varlen)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def chunk_rows(bos, eos, c, CHUNK: tl.constexpr, BT: tl.constexpr):
    """Token indices of chunk ``c`` (``BT ≥ CHUNK`` rows), the valid-row mask and the last valid row."""
    o_t = tl.arange(0, BT)
    start = bos + c * CHUNK
    pos = start + o_t
    valid = (o_t < CHUNK) & (pos < eos)
    last = tl.minimum(eos - start, CHUNK) - 1
    return pos, valid, last


@triton.jit
def load_tokens(x, pos, valid, i_h, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """``[BT, BD]`` float32 tile of a ``[B, T, H, D]`` tensor at tokens ``pos``, head ``i_h``."""
    o_d = tl.arange(0, BD)
    ptr = x + (pos[:, None] * H + i_h) * D + o_d[None, :]
    return tl.load(ptr, mask=valid[:, None] & (o_d < D)[None, :], other=0.0).to(tl.float32)


@triton.jit
def store_tokens(x, val, pos, valid, i_h, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """Store a ``[BT, BD]`` tile into a ``[B, T, H, D]`` tensor (cast to its dtype)."""
    o_d = tl.arange(0, BD)
    ptr = x + (pos[:, None] * H + i_h) * D + o_d[None, :]
    tl.store(ptr, val.to(x.dtype.element_ty), mask=valid[:, None] & (o_d < D)[None, :])


@triton.jit
def load_gate(g, pos, valid, i_h, H: tl.constexpr, PRESENT: tl.constexpr):
    """``[BT]`` float32 gate values of a ``[B, T, H]`` tensor (zeros when the gate is absent)."""
    if PRESENT:
        return tl.load(g + pos * H + i_h, mask=valid, other=0.0).to(tl.float32)
    else:
        return tl.zeros([pos.shape[0]], tl.float32)


@triton.jit
def store_gate(g, val, pos, valid, i_h, H: tl.constexpr, PRESENT: tl.constexpr):
    """Store ``[BT]`` gate gradients (no-op when the gate is absent)."""
    if PRESENT:
        tl.store(g + pos * H + i_h, val.to(g.dtype.element_ty), mask=valid)


@triton.jit
def state_ptrs(base, slot, i_h, H: tl.constexpr, d_in: tl.constexpr, d_out: tl.constexpr, o_r, o_c):
    """Pointers and mask of the ``[o_r, o_c]`` block of a ``[slots, H, d_in, d_out]`` state tensor."""
    ptr = base + (slot * H + i_h) * (d_in * d_out) + o_r[:, None] * d_out + o_c[None, :]
    return ptr, (o_r < d_in)[:, None] & (o_c < d_out)[None, :]
