"""The b×b coefficients of one chunk (docs/design.md §3) as Triton device functions, with their VJP.

``m_t = ∏_{j≤t} η_j``, ``n_{t,i} = θ_i ∏_{j=i+1..t} η_j``, ``β_t = ∏_{j≤t} (1 − α_j)``,
``R_{t,j} = ∏_{l=j+1..t} (1 − α_l)``, ``G = R n``, ``d = R m``.

A segment product ``P_{t,i} = ∏_{j=i+1..t} a_j`` is ``exp(c_t − c_i)`` with ``c`` the cumulative
sum of ``log a_j`` over the non-zero ``a_j``, and exactly 0 when a zero ``a_j`` lies in the
segment (counted by a cumulative sum of zeros), so η = 0 and α = 1 are exact. Its gradient
uses ``∂P_{t,i}/∂a_l = P_{t,l} P_{l−1,i}`` (``i < l ≤ t``): no division by ``a_l``, exact at 0.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _cumulative_log(a):
    """``(c, z, log a, [a = 0])``: cumulative log over non-zero entries and cumulative zero count."""
    nonzero = a > 0
    lg = tl.where(nonzero, tl.log(tl.where(nonzero, a, 1.0)), 0.0)
    zero = tl.where(nonzero, 0.0, 1.0)
    return tl.cumsum(lg, 0), tl.cumsum(zero, 0), lg, zero


@triton.jit
def _segment_products(c_end, z_end, c_start, z_start, mask):
    """``P[t, i] = exp(c_end_t − c_start_i)`` where ``mask`` holds and no zero lies between, else 0."""
    ok = mask & (z_end[:, None] == z_start[None, :])
    return tl.where(ok, tl.exp(tl.where(ok, c_end[:, None] - c_start[None, :], 0.0)), 0.0)


@triton.jit
def _products(a, BT: tl.constexpr):
    """``P_{t,i} = ∏_{j=i+1..t} a_j`` (lower-triangular) and ``p_t = ∏_{j≤t} a_j``."""
    o = tl.arange(0, BT)
    c, z, _, _ = _cumulative_log(a)
    P = _segment_products(c, z, c, z, o[:, None] >= o[None, :])
    return P, tl.where(z == 0, tl.exp(c), 0.0)


@triton.jit
def _products_bwd(a, gP, gp, BT: tl.constexpr):
    """VJP of :func:`_products`: ``g a_l = Σ_{t,i} gP_{t,i} P_{t,l} P_{l−1,i} + p_{l−1} Σ_t gp_t P_{t,l}``."""
    o = tl.arange(0, BT)
    c, z, lg, zero = _cumulative_log(a)
    P = _segment_products(c, z, c, z, o[:, None] >= o[None, :])
    c_prev = c - lg
    z_prev = z - zero
    P_prev = _segment_products(c_prev, z_prev, c, z, o[:, None] > o[None, :])
    p_prev = tl.where(z_prev == 0, tl.exp(c_prev), 0.0)
    PtgP = tl.dot(tl.trans(P), gP, input_precision="ieee")
    return tl.sum(PtgP * P_prev, 1) + p_prev * tl.sum(P * gp[:, None], 0)


@triton.jit
def chunk_coefficients(theta, eta, alpha, BT: tl.constexpr):
    """``(G, n, β, d, m)`` of one chunk from its gates ``θ, η, α: [BT]``."""
    P, m = _products(eta, BT)
    R, beta = _products(1.0 - alpha, BT)
    N = P * theta[None, :]
    G = tl.dot(R, N, input_precision="ieee")
    d = tl.sum(R * m[None, :], 1)
    return G, N, beta, d, m


@triton.jit
def chunk_end_coefficients(G, N, beta, d, m, last, BT: tl.constexpr):
    """Row ``last`` (the chunk's last valid token): ``(G_b, n_b, β_b, d_b, m_b)``."""
    o = tl.arange(0, BT)
    row = (o == last)[:, None]
    at = o == last
    return (tl.sum(tl.where(row, G, 0.0), 0), tl.sum(tl.where(row, N, 0.0), 0),
            tl.sum(tl.where(at, beta, 0.0)), tl.sum(tl.where(at, d, 0.0)), tl.sum(tl.where(at, m, 0.0)))


@triton.jit
def chunk_coefficients_bwd(theta, eta, alpha, gG, gbeta, gd, gG_end, gn_end, gbeta_end, gd_end, gm_end, last,
                           BT: tl.constexpr):
    """VJP of :func:`chunk_coefficients` and :func:`chunk_end_coefficients` together:
    returns ``(gθ, gη, gα)``. ``gG`` may hold anything above the diagonal (ignored)."""
    o = tl.arange(0, BT)
    lower = o[:, None] >= o[None, :]
    row = (o == last)[:, None]
    at = o == last
    P, m = _products(eta, BT)
    R, _ = _products(1.0 - alpha, BT)
    N = P * theta[None, :]
    gG = tl.where(lower, gG, 0.0) + tl.where(row, gG_end[None, :], 0.0)
    gbeta += tl.where(at, gbeta_end, 0.0)
    gd += tl.where(at, gd_end, 0.0)
    gR = tl.where(lower, tl.dot(gG, tl.trans(N), input_precision="ieee") + gd[:, None] * m[None, :], 0.0)
    gN = tl.dot(tl.trans(R), gG, input_precision="ieee") + tl.where(row, gn_end[None, :], 0.0)
    gm = tl.sum(R * gd[:, None], 0) + tl.where(at, gm_end, 0.0)
    gtheta = tl.sum(gN * P, 0)
    geta = _products_bwd(eta, gN * theta[None, :], gm, BT)
    galpha = -_products_bwd(1.0 - alpha, gR, gbeta, BT)
    return gtheta, geta, galpha
