"""The Miras retention maps ``W = R(A)`` (arXiv 2504.13173) as Triton device functions, with their VJPs.

The same maps as :mod:`.objectives` (``RETENTIONS``), per layer and head on the state ``A``
``[d_in, d_out]``, held whole (one tile) or split in tiles (masked entries zero):

* ``lq``: ``W = A ⊙ s^{(r−2)/2} · μ^{(2−r)/r}`` with ``s = A² + ε``, ``r = q/(q − 1)`` and ``μ`` the mean of
  ``s^{r/2}`` over the ``n = d_in·d_out`` entries (Moneta's mirror map, smoothed ``|A|``);
* ``lq_norm``: ``W = A / max(‖A‖_q, ε)^{q−2}`` (the printed formula; ``‖·‖_q`` entrywise, ε float32's epsilon);
* ``max_norm``: ``W = A · c / max(‖A‖_F, c)``;
* ``softmax``: ``W = c · Softmax(A)`` over ``d_in`` (axis 0) for every column (Memora).

``RETENTION`` names the map (constexpr string), ``PARAMS`` its parameter tuple (``(q,)`` or ``(c,)``;
``(q, ε, n)`` for ``lq``, ``n`` the number of entries of a layer's matrix, appended by ``chunk.py``: the
kernels see only zero-padded tiles).
The norm maps and ``lq`` reduce over the whole matrix: every tile adds :func:`norm_partial` to a running
total (``lq``: ``Σ (s^{r/2} − ε^{r/2})``, zero on zero entries, so the padding adds nothing and
``μ = total/n + ε^{r/2}``).
The softmax reduces over axis 0: :func:`softmax_columns` folds a tile's rows into per-column running
maxima and sums of exponentials. Both need the whole matrix's statistics before :func:`retention_apply`.
The VJP ``gA = J_R(A)ᵀ gW`` needs ``⟨gW, A⟩`` (norm maps), ``⟨gW, A ⊙ s^{(r−2)/2}⟩`` (``lq``) or the
column sums of ``W ⊙ gW`` (softmax).
"""

from __future__ import annotations

import triton
import triton.language as tl

_FLOOR = tl.constexpr(1.1920928955078125e-07)  # lq_norm's norm floor: torch.finfo(torch.float32).eps


@triton.jit
def _abs_pow(x, r):
    """``|x|^r`` for ``r ≥ 0``, taken as 0 at ``x = 0``."""
    ax = tl.abs(x)
    return tl.where(ax > 0, tl.exp(r * tl.log(tl.where(ax > 0, ax, 1.0))), 0.0)


@triton.jit
def _pow(x, r):
    """``x^r`` for ``x > 0``."""
    return tl.exp(r * tl.log(x))


@triton.jit
def _lq_floor(PARAMS: tl.constexpr):
    """``ε^{r/2}``: the ``s^{r/2}`` of a zero entry (``PARAMS = (q, ε, n)``, ``r = q/(q − 1)``)."""
    return _pow(tl.full([], PARAMS[1], tl.float32), 0.5 * (PARAMS[0] / (PARAMS[0] - 1.0)))


@triton.jit
def _lq_mean(total, PARAMS: tl.constexpr):
    """``(μ^κ, κ r μ^{κ−1} / n)`` of ``lq`` from ``total = Σ (s^{r/2} − ε^{r/2})``, ``κ = (2 − r)/r``."""
    r = PARAMS[0] / (PARAMS[0] - 1.0)
    kappa = (2.0 - r) / r
    mean = total / PARAMS[2] + _lq_floor(PARAMS)
    scale = _pow(mean, kappa)
    return scale, kappa * r / PARAMS[2] * scale / mean


@triton.jit
def _lq_slope(A, PARAMS: tl.constexpr):
    """``(s^{(r−2)/2}, s)`` of ``lq`` on a tile, ``s = a² + ε``."""
    s = A * A + PARAMS[1]
    return _pow(s, 0.5 * (PARAMS[0] / (PARAMS[0] - 1.0) - 2.0)), s


@triton.jit
def norm_partial(A, RETENTION: tl.constexpr, PARAMS: tl.constexpr):
    """A tile's part of the norm statistic: ``Σ |a|^q`` (lq_norm), ``Σ a²`` (max_norm),
    ``Σ_{a≠0} (s^{r/2} − ε^{r/2})`` (lq: padding and zeros add 0), else 0."""
    if RETENTION == "lq":
        r = PARAMS[0] / (PARAMS[0] - 1.0)
        total = tl.sum(tl.where(A != 0, _pow(A * A + PARAMS[1], 0.5 * r) - _lq_floor(PARAMS), 0.0))
    elif RETENTION == "lq_norm":
        total = tl.sum(_abs_pow(A, PARAMS[0]))
    elif RETENTION == "max_norm":
        total = tl.sum(A * A)
    else:
        total = tl.zeros([], tl.float32)
    return total


@triton.jit
def inner_partial(A, g, RETENTION: tl.constexpr, PARAMS: tl.constexpr):
    """A tile's part of ``⟨gW, A⟩`` for the norm maps' VJP, ``⟨gW, A ⊙ s^{(r−2)/2}⟩`` for lq's, 0 otherwise."""
    if RETENTION == "lq":
        slope, _ = _lq_slope(A, PARAMS)
        inner = tl.sum(g * A * slope)
    elif RETENTION == "lq_norm" or RETENTION == "max_norm":
        inner = tl.sum(g * A)
    else:
        inner = tl.zeros([], tl.float32)
    return inner


@triton.jit
def column_inner(W, g, RETENTION: tl.constexpr):
    """A tile's column sums ``Σ_rows W ⊙ g`` for the softmax's VJP (0 otherwise)."""
    if RETENTION == "softmax":
        colsum = tl.sum(W * g, 0)
    else:
        colsum = tl.zeros([g.shape[1]], tl.float32)
    return colsum


@triton.jit
def fresh_columns(BC: tl.constexpr):
    """Empty softmax statistics of ``BC`` columns: running maxima −∞ and sums 0."""
    return tl.full([BC], float("-inf"), tl.float32), tl.zeros([BC], tl.float32)


@triton.jit
def _finite(m):
    return tl.where(m > float("-inf"), m, 0.0)


@triton.jit
def softmax_columns(A, mask, m, s, RETENTION: tl.constexpr):
    """Fold the rows of a tile into the softmax's per-column max ``m`` and ``s = Σ exp(a − m)``."""
    if RETENTION == "softmax":
        x = tl.where(mask, A, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = _finite(m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[None, :]), 0)
        m = m_new
    return m, s


@triton.jit
def _norm_scale(total, RETENTION: tl.constexpr, PARAMS: tl.constexpr):
    """``(s, κ)`` of the norm maps: ``W = s A`` and ``∂s/∂A = κ |A|^{q−2} A`` (lq_norm) or ``κ A`` (max_norm)."""
    if RETENTION == "lq_norm":
        q = PARAMS[0]
        log_n = tl.log(tl.maximum(total, 1e-38)) / q
        n = tl.where(total > 0, tl.exp(log_n), 0.0)
        floored = tl.maximum(n, _FLOOR)
        s = tl.exp(-(q - 2.0) * tl.log(floored))
        kappa = tl.where(n >= _FLOOR, -(q - 2.0) * s / floored * tl.exp(-(q - 1.0) * log_n), 0.0)
    else:
        tl.static_assert(RETENTION == "max_norm", "unknown retention map")
        c = PARAMS[0]
        n = tl.sqrt(total)
        capped = tl.maximum(n, c)
        s = c / capped
        kappa = tl.where(n >= c, -c / (capped * capped * capped), 0.0)
    return s, kappa


@triton.jit
def retention_apply(A, mask, total, m, s, RETENTION: tl.constexpr, PARAMS: tl.constexpr):
    """``W = R(A)`` of a tile from the whole matrix's statistics (``total`` of the norm maps;
    softmax column statistics ``m, s`` of this tile's columns)."""
    if RETENTION == "softmax":
        W = PARAMS[0] * tl.exp(A - _finite(m)[None, :]) / tl.where(s > 0, s, 1.0)[None, :]
    elif RETENTION == "lq":
        scale, _ = _lq_mean(total, PARAMS)
        slope, _ = _lq_slope(A, PARAMS)
        W = (scale * A) * slope
    else:
        scale, _ = _norm_scale(total, RETENTION, PARAMS)
        W = scale * A
    return tl.where(mask, W, 0.0)


@triton.jit
def retention_map(A, mask, RETENTION: tl.constexpr, PARAMS: tl.constexpr):
    """``W = R(A)`` of a matrix held whole in one tile."""
    m, s = fresh_columns(A.shape[1])
    m, s = softmax_columns(A, mask, m, s, RETENTION)
    return retention_apply(A, mask, norm_partial(A, RETENTION, PARAMS), m, s, RETENTION, PARAMS)


@triton.jit
def retention_vjp(A, W, g, total, inner, colsum, RETENTION: tl.constexpr, PARAMS: tl.constexpr):
    """``J_R(A)ᵀ g`` on a tile, from the whole matrix's ``total`` and ``inner = ⟨g, A⟩`` (norm maps),
    ``inner = ⟨g, A ⊙ m⟩`` (lq) or this tile's column sums ``colsum = Σ_rows W ⊙ g`` (softmax):
    ``gA = s g + κ ⟨g, A⟩ ∂n``, ``W ⊙ (g − colsum / c)`` or, for lq with ``m = s^{(r−2)/2}``,
    ``gA = μ^κ g ⊙ m ⊙ (1 + (r − 2) a²/s) + κ r μ^{κ−1} / n · ⟨g, A ⊙ m⟩ A ⊙ m``."""
    if RETENTION == "softmax":
        gA = W * (g - colsum[None, :] / PARAMS[0])
    elif RETENTION == "lq":
        scale, coupling = _lq_mean(total, PARAMS)
        slope, s = _lq_slope(A, PARAMS)
        r = PARAMS[0] / (PARAMS[0] - 1.0)
        gA = (scale * g) * slope * (1.0 + (r - 2.0) * (A * A) / s) + (coupling * inner) * (A * slope)
    else:
        scale, kappa = _norm_scale(total, RETENTION, PARAMS)
        if RETENTION == "lq_norm":
            slope = _abs_pow(A, PARAMS[0] - 2.0) * A
        else:
            slope = A
        gA = scale * g + (kappa * inner) * slope
    return gA


@triton.jit
def retention_map_vjp(A, W, g, RETENTION: tl.constexpr, PARAMS: tl.constexpr):
    """``J_R(A)ᵀ g`` of a matrix held whole in one tile (``W = R(A)``)."""
    total, inner = norm_partial(A, RETENTION, PARAMS), inner_partial(A, g, RETENTION, PARAMS)
    return retention_vjp(A, W, g, total, inner, column_inner(W, g, RETENTION), RETENTION, PARAMS)
