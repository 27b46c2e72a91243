"""The Miras attentional biases ψ (arXiv 2504.13173) as Triton device functions, with their VJPs.

The same maps as :mod:`.objectives` (``BIASES``), on a ``[BT, BD]`` tile of key errors
``e = M(k) − v`` (padded columns zero), ψ = ∂ℓ/∂M(k):

* ``l2``: ``2e``;  ``lp``: ``p · tanh(ν e) ⊙ (e² + ε)^{(p−1)/2}`` (Moneta's smooth ℓp gradient);
* ``huber``: ``2e`` if ``‖e‖₂ ≤ δ`` else ``δ · Sign(e)``, one δ per row (Yaad);
* ``dot``: ``−v``;  ``l2_clip``: ``2e · min(1, c / ‖2e‖₂)``.

``BIAS`` names the bias (a constexpr string) and ``PARAMS`` holds its scalar parameters in the order of
the PyTorch function's signature (a constexpr tuple: ``(p, ν, ε)`` for ``lp``, ``(c,)`` for
``l2_clip``, empty otherwise). The VJPs differentiate what autograd differentiates on the PyTorch path:
nothing through the comparisons of ``huber`` and ``l2_clip``; δ only through its linear use ``δ · Sign(e)``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sign(x):
    """``Sign(x)`` ∈ {−1, 0, 1} (as ``torch.sign``)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def tanh(x):
    """``tanh(x) = Sign(x) (1 − t) / (1 + t)`` with ``t = exp(−2|x|) ≤ 1`` (no overflow; no tanh in ``tl``)."""
    t = tl.exp(-2.0 * tl.abs(x))
    return sign(x) * (1.0 - t) / (1.0 + t)


@triton.jit
def _lp_terms(E, PARAMS: tl.constexpr):
    """``(tanh(ν e), (e² + ε)^{(p−1)/2}, e² + ε)`` of the smooth ℓp gradient."""
    r = E * E + PARAMS[2]
    return tanh(PARAMS[1] * E), tl.exp((0.5 * (PARAMS[0] - 1.0)) * tl.log(r)), r


@triton.jit
def bias_psi(E, V, delta, BIAS: tl.constexpr, PARAMS: tl.constexpr):
    """ψ of every row of ``E`` (``V`` the targets, ``delta: [BT]`` Huber's threshold)."""
    if BIAS == "l2":
        psi = 2.0 * E
    elif BIAS == "lp":
        th, a, _ = _lp_terms(E, PARAMS)
        psi = PARAMS[0] * th * a
    elif BIAS == "huber":
        small = tl.sqrt(tl.sum(E * E, 1)) <= delta
        psi = tl.where(small[:, None], 2.0 * E, delta[:, None] * sign(E))
    elif BIAS == "dot":
        psi = -V
    else:  # l2_clip
        tl.static_assert(BIAS == "l2_clip", "unknown attentional bias")
        norm = 2.0 * tl.sqrt(tl.sum(E * E, 1))
        psi = 2.0 * E * (PARAMS[0] / tl.maximum(norm, PARAMS[0]))[:, None]
    return psi


@triton.jit
def bias_psi_bwd(E, V, delta, g, BIAS: tl.constexpr, PARAMS: tl.constexpr):
    """VJP of :func:`bias_psi` for an adjoint ``g`` of ψ: returns ``(gE, gV, gδ)``."""
    gV = tl.zeros(g.shape, tl.float32)
    gdelta = tl.zeros([g.shape[0]], tl.float32)
    if BIAS == "l2":
        gE = 2.0 * g
    elif BIAS == "lp":
        # ψ' = p (ν (1 − tanh²) (e² + ε)^{(p−1)/2} + tanh (p − 1) e (e² + ε)^{(p−3)/2})
        th, a, r = _lp_terms(E, PARAMS)
        gE = PARAMS[0] * (PARAMS[1] * (1.0 - th * th) * a + th * (PARAMS[0] - 1.0) * E * a / r) * g
    elif BIAS == "huber":
        small = tl.sqrt(tl.sum(E * E, 1)) <= delta
        gE = tl.where(small[:, None], 2.0 * g, 0.0)
        gdelta = tl.where(small, 0.0, tl.sum(g * sign(E), 1))
    elif BIAS == "dot":
        gE = tl.zeros(g.shape, tl.float32)
        gV = -g
    else:  # l2_clip: ψ = x f(‖x‖), x = 2e, f(n) = c / max(n, c); f'(n) = −c / n² where n ≥ c
        norm = 2.0 * tl.sqrt(tl.sum(E * E, 1))
        f = PARAMS[0] / tl.maximum(norm, PARAMS[0])
        n_safe = tl.maximum(norm, PARAMS[0])
        slope = tl.where(norm >= PARAMS[0], -PARAMS[0] / (n_safe * n_safe * n_safe), 0.0)
        gE = 2.0 * (f[:, None] * g + (slope * tl.sum(g * 2.0 * E, 1))[:, None] * 2.0 * E)
    return gE, gV, gdelta
