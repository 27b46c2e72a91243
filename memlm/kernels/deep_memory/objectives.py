"""Miras hooks of the deep-memory op: the attentional bias ψ and the retention map R.

Miras (Behrouz et al. 2025, arXiv 2504.13173) describes a memory by its inner loss (attentional
bias) and its retention. The op needs two pieces, looked up here by the naive reference and the
PyTorch chunked path (the Triton kernels implement the same functions in ``triton/bias.py`` and
``triton/retention.py``):

* ``BIASES[name](e, *, <per-token tensors>, <parameters>)`` — ψ = ∂ℓ/∂M(k), the derivative of the
  attentional bias with respect to the memory output at the error ``e = M(k) − v`` (``[..., D]``).
  The weight gradient is ``u = (∂M/∂W)ᵀ ψ``, back-propagated through the MLP. A bias may also take
  the per-token tensors named in ``PER_TOKEN`` as keyword arguments (``v`` the target value,
  ``delta`` a threshold ``[..., 1]`` or channel-wise ``[..., D]``); its other keyword arguments are scalar
  parameters with defaults.
* ``RETENTIONS[name](A, *, <parameters>)`` — the mirror map ``W = R(A)`` from the recurrent (dual)
  state ``A`` (``[N, H, d_in, d_out]`` per layer) to the weights the memory computes with. The
  state follows the linear Titans recurrence ``A_t = (1 − α_t) A_{t−1} + S_t``,
  ``S_t = η_t S_{t−1} − θ_t ∇ℓ(R(A_·))``; the map is applied exactly at every chunk end (see
  ``naive``). Moneta's ℓq mirror map and Memora's KL (softmax) retention are such maps.

Parameters are bound once per call by :func:`bias_hook` / :func:`retention_hook`, so every path
evaluates exactly the same function.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence

import torch

Bias = Callable[..., torch.Tensor]
Retention = Callable[..., torch.Tensor]

PER_TOKEN = ("v", "delta")  # keyword arguments of a bias that are per-token tensors, not parameters


def l2_bias(e: torch.Tensor) -> torch.Tensor:
    """ψ(e) = 2e, the derivative of ℓ = ‖M(k) − v‖² (summed over features) w.r.t. M(k)."""
    return 2 * e


def clipped_l2_bias(e: torch.Tensor, *, max_norm: float = 1.0) -> torch.Tensor:
    """ℓ2 bias with its output gradient clamped per token (a Titans stability safeguard, ours):
    ``ψ(e) = 2e · min(1, max_norm / ‖2e‖₂)``, so one token's surprise never exceeds ``max_norm``."""
    grad = 2 * e
    norm = torch.linalg.vector_norm(grad, dim=-1, keepdim=True)
    return grad * (max_norm / norm.clamp_min(max_norm)).clamp(max=1.0)


def lp_bias(e: torch.Tensor, *, p: float = 3.0, nu: float = 10.0, eps: float = 1e-6) -> torch.Tensor:
    """Moneta's ℓp bias ``ℓ = ‖M(k) − v‖_p^p`` (Miras §3): ψ(e) = p·Sign(e) ⊙ |e|^{p−1}, with the
    paper's smooth surrogates ``Sign(e) ≈ tanh(ν e)`` and ``|e| ≈ sqrt(e² + ε)``:
    ``ψ(e) = p · tanh(ν e) ⊙ (e² + ε)^{(p−1)/2}``. ``p = 3`` is the paper's Moneta; the defaults
    ν = 10 and ε = 1e-6 are ours."""
    return p * torch.tanh(nu * e) * (e * e + eps) ** ((p - 1) / 2)


def huber_bias(e: torch.Tensor, *, delta: torch.Tensor) -> torch.Tensor:
    """Yaad's Huber bias (Miras §5, Yaad update rule): the ℓ2 gradient where the error is small, the
    δ-scaled ℓ1 gradient elsewhere. The switch follows δ's rank (the op's ``delta``):

    * ``[B, T, H]`` (here ``delta: [..., 1]``, one δ_t per token and head): on the vector norm of the
      error, ``ψ(e) = 2e`` if ``‖e‖₂ ≤ δ_t`` else ``δ_t · Sign(e)`` (Yaad);
    * ``[B, T, H, D]`` (here ``[..., D]``, channel-wise δ, Miras' channel-wise gates): per coordinate,
      ``ψ_c = 2e_c`` if ``|e_c| ≤ δ_c`` else ``δ_c · Sign(e_c)`` (the coordinate-wise Huber loss).

    For ``D = 1`` the two rules coincide."""
    size = torch.linalg.vector_norm(e, dim=-1, keepdim=True) if delta.shape[-1] == 1 else e.abs()
    return torch.where(size <= delta, 2 * e, delta * torch.sign(e))


def dot_bias(e: torch.Tensor, *, v: torch.Tensor) -> torch.Tensor:
    """Dot-product bias ``ℓ = −⟨M(k), v⟩`` (Miras §3; linear attention, GLA, Mamba2): ψ = −v,
    independent of the error ``e``. With a linear memory the update is ``W += θ kᵀv``."""
    return -v


def no_retention(a: torch.Tensor) -> torch.Tensor:
    """Identity map ``W = A``: the weights are the state (Titans)."""
    return a


def lq_retention(a: torch.Tensor, *, q: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """Moneta's ℓq retention (Miras §5; derivation: docs/design.md §4.2) as the mirror map of its objective:
    follow-the-regularised-leader with the retention ``G(W) = ‖W‖_q² / (2(q − 1))`` on the accumulated
    gradients ``A`` gives ``W = ∇G*(A)``, ``G*`` the convex conjugate. With ``r = q / (q − 1)`` the dual
    exponent and the norms taken as means over the ``d_in × d_out`` entries (``G`` scaled by
    ``(q − 1)·n^{1 − 2/q}``, a constant the inner learning rate θ absorbs):

        ``W = sign(A) ⊙ |A|^{r−1} · (mean |A|^r)^{(2−r)/r}``,

    homogeneous of degree 1, the identity for q = 2 and on matrices whose entries share one magnitude.
    ``|a|`` is smoothed as ``sqrt(a² + ε)`` (the paper's surrogate for ℓp), so the map is the gradient
    of a smooth convex function and finite at ``A = 0`` (``W = 0``). The printed formula
    ``A / ‖A‖_q^{q−2}`` drops the elementwise power and is homogeneous of degree 3 − q: ``lq_norm``."""
    r = q / (q - 1)
    smooth = a * a + eps
    mean = smooth.pow(r / 2).mean(dim=(-2, -1), keepdim=True)
    return a * smooth.pow((r - 2) / 2) * mean.pow((2 - r) / r)


def lq_inverse(w: torch.Tensor, *, q: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """The state ``A`` whose :func:`lq_retention` is ``w`` (``ε`` → 0): ``A = ∇G(W) = sign(W) ⊙ |W|^{q−1} ·
    (mean |W|^q)^{(2−q)/q}`` (the mirror map of the conjugate exponent); used to start the memory at
    given weights. It takes ``lq_retention``'s parameters; ``eps`` (the smoothing) is left out of the inverse."""
    mean = w.abs().pow(q).mean(dim=(-2, -1), keepdim=True)
    return torch.sign(w) * w.abs().pow(q - 1) * mean.pow((2 - q) / q)


def lq_norm_retention(a: torch.Tensor, *, q: float = 4.0) -> torch.Tensor:
    """Moneta's ℓq retention as printed (Miras §5, Eq. 24): ``W = A / ‖A‖_q^{q−2}`` per layer and head,
    ``‖·‖_q`` the entrywise q-norm of the ``d_in × d_out`` matrix (q = 2 is the identity). Homogeneous
    of degree 3 − q: for q = 4 ``‖W‖₄ = 1/‖A‖₄``, so a memory that writes much shrinks to nothing (kept
    to reproduce the printed equation; Moneta's preset uses :func:`lq_retention`). The norm is floored at
    machine epsilon so that ``A = 0`` maps to ``W = 0``."""
    norm = torch.linalg.vector_norm(a, ord=q, dim=(-2, -1), keepdim=True)
    return a / norm.clamp_min(torch.finfo(a.dtype).eps) ** (q - 2)


def max_norm_retention(a: torch.Tensor, *, c: float = 10.0) -> torch.Tensor:
    """Weights capped in Frobenius norm per layer and head (a Titans stability safeguard, ours):
    ``W = A · min(1, c / ‖A‖_F)``; the identity while the memory stays inside the ball."""
    norm = torch.linalg.vector_norm(a, dim=(-2, -1), keepdim=True)
    return a * (c / norm.clamp_min(c))


def softmax_retention(a: torch.Tensor, *, c: float | None = None) -> torch.Tensor:
    """Memora's KL retention on a scaled simplex (Miras §3–5): ``W = c · Softmax(A)`` per slice, the
    slice being each output unit's incoming weights (the ``d_in`` axis of ``[d_in, d_out]``). With
    ``A = log W`` up to a per-slice constant, one token of the linear state recurrence is the paper's
    ``W_t = c · Softmax((1 − α_t) log W_{t−1} − θ_t ∇ℓ)`` (Softmax is shift invariant). The paper leaves
    ``c`` open; the default is the fan-in ``d_in`` (mean weight 1): with ``c = 1`` every weight is about
    ``1/d_in`` and the memory's output is about its input, it stores nothing (docs/design.md §4.2)."""
    scale = a.shape[-2] if c is None else c
    return scale * torch.softmax(a, dim=-2)


BIASES: dict[str, Bias] = {"l2": l2_bias, "lp": lp_bias, "huber": huber_bias, "dot": dot_bias,
                           "l2_clip": clipped_l2_bias}
RETENTIONS: dict[str, Retention] = {
    "none": no_retention,
    "lq": lq_retention,
    "lq_norm": lq_norm_retention,
    "softmax": softmax_retention,
    "max_norm": max_norm_retention,
}

# Retentions whose state is exchanged with the caller as the weights ``W = R(A)`` (initial
# ``weights`` and final state), with the map back to a state ``A``; the others exchange ``A``.
# A weight that underflowed to 0 in the softmax (a state handed back and passed in again) maps to the
# log of the smallest normal number, which the softmax maps back to 0.
WEIGHT_STATE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda w: torch.log(w.clamp_min(torch.finfo(w.dtype).tiny))
}

# Retentions whose state is not the weights, with the map from weights to a state (``R⁻¹``): a memory that
# starts at given weights starts from that state.
INVERSES: dict[str, Callable[..., torch.Tensor]] = {"lq": lq_inverse}

# Lower bounds of hook parameters: name -> {parameter: (bound, bound allowed)}.
LOWER_BOUNDS: dict[str, dict[str, tuple[float, bool]]] = {
    "lp": {"p": (1.0, True), "nu": (0.0, False), "eps": (0.0, False)},
    "lq": {"q": (1.0, False), "eps": (0.0, False)},
    "lq_norm": {"q": (2.0, True)},
    "softmax": {"c": (0.0, False)},
    "l2_clip": {"max_norm": (0.0, False)},
    "max_norm": {"c": (0.0, False)},
}


def hook_parameters(fn: Callable[..., torch.Tensor]) -> dict[str, object]:
    """The scalar parameters of a hook and their defaults (keyword arguments not in ``PER_TOKEN``)."""
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(inspect.signature(fn).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind in kinds and p.name not in PER_TOKEN}


def per_token_arguments(fn: Callable[..., torch.Tensor]) -> tuple[str, ...]:
    """The per-token tensors (names from ``PER_TOKEN``) a bias takes."""
    return tuple(name for name in inspect.signature(fn).parameters if name in PER_TOKEN)


def bias_hook(name: str, params: Mapping[str, float] | None) -> Bias:
    """ψ of bias ``name`` with its parameters bound: ``psi(e, v=…, delta=…)`` forwards only the
    per-token tensors that bias takes."""
    fn, bound = BIASES[name], dict(params or {})
    takes = per_token_arguments(fn)

    def psi(e: torch.Tensor, **per_token: torch.Tensor | None) -> torch.Tensor:
        return fn(e, **bound, **{k: t for k, t in per_token.items() if k in takes})

    return psi


def retention_hook(name: str, params: Mapping[str, float] | None) -> Retention:
    """The map ``W = R(A)`` of retention ``name`` with its parameters bound."""
    fn, bound = RETENTIONS[name], dict(params or {})
    return lambda a: fn(a, **bound)


def dual_state(name: str, state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The recurrent state ``A`` from the caller's state (``log W`` for ``softmax``, else itself)."""
    to_state = WEIGHT_STATE.get(name)
    return list(state) if to_state is None else [to_state(w) for w in state]


def exchanged_state(name: str, mirror: Retention, state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The state handed back to the caller: ``R(A)`` for retentions in ``WEIGHT_STATE``, else ``A``."""
    return [mirror(a) for a in state] if name in WEIGHT_STATE else list(state)


def check_hook_parameters(kind: str, name: str, params: Mapping[str, float] | None) -> None:
    """Raise ``ValueError`` unless ``params`` (``bias_params`` / ``retention_params``, ``kind`` being
    ``"bias"`` or ``"retention"``) names scalar parameters of hook ``name`` within ``LOWER_BOUNDS``."""
    if params is None:
        return
    arg = f"{kind}_params"
    if not isinstance(params, Mapping):
        raise ValueError(f"{arg} must be a dict of scalar parameters or None, got {type(params).__name__}")
    fn = (BIASES if kind == "bias" else RETENTIONS)[name]
    allowed = tuple(hook_parameters(fn))
    bounds = LOWER_BOUNDS.get(name, {})
    for key, value in params.items():
        if key not in allowed:
            raise ValueError(f"{arg} key {key!r} is not a parameter of {kind}={name!r}; allowed: {allowed}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{arg}[{key!r}] must be a finite real number, got {value!r}")
        low, closed = bounds.get(key, (-math.inf, True))
        if value < low or (value == low and not closed):
            relation = ">=" if closed else ">"
            raise ValueError(f"{arg}[{key!r}] must be {relation} {low} for {kind}={name!r}, got {value!r}")
