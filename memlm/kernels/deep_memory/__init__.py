"""Deep (MLP) memory trained online by chunked gradient descent with momentum and decay.

Titans (Behrouz, Zhong, Mirrokni 2025, arXiv 2501.00663) and the Miras variants (Behrouz et al.
2025, arXiv 2504.13173): the memory is an MLP ``M_W``; every token writes ``(k_t, v_t)`` by one
gradient step on an attentional bias ``ℓ_t(W)`` (default ``‖M_W(k_t) − v_t‖²``) and reads
``o_t = M_{W_t}(q_t)``. Three implementations agree: ``naive`` (per token), ``torch`` (chunked
dual form) and ``triton`` (CUDA kernels; every bias and retention map, per-head gates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import product

import torch

from .._common import check_cu_seqlens, check_range, check_shape, resolve_backend
from .chunk import deep_memory_chunk
from .mlp import ACTIVATIONS
from .naive import deep_memory_naive
from .objectives import BIASES, RETENTIONS, WEIGHT_STATE, check_hook_parameters, per_token_arguments

__all__ = ["deep_memory", "deep_memory_naive", "deep_memory_chunk", "ACTIVATIONS", "BIASES", "RETENTIONS"]

State = tuple[list[torch.Tensor], list[torch.Tensor]]
# the (bias, retention) pairs the Triton kernels implement (triton_bias.py, triton_retention.py): all of them
TRITON_HOOKS = tuple(product(("l2", "lp", "huber", "dot", "l2_clip"), ("none", "lq_norm", "softmax", "max_norm")))


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {tuple(allowed)}")


def _check_like(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(
            f"{name} must have q's dtype and device ({ref.dtype}, {ref.device}), got ({t.dtype}, {t.device})"
        )


GATE_RANGES = {"lr": math.inf, "momentum": 1.0, "forget": 1.0, "delta": math.inf}  # upper bounds; all >= 0


def _check_gates(gates: dict[str, torch.Tensor | None], q: torch.Tensor, widths: Sequence[int]) -> None:
    """θ ∈ [0, ∞), η ∈ [0, 1], α ∈ [0, 1], δ ∈ [0, ∞), each a float tensor on q's device, per head
    ``[B, T, H]`` or channel-wise: θ, η, α ``[B, T, H, C]`` with ``C = Σ_l d_l`` (``widths = [d_1 … d_L]``),
    δ ``[B, T, H, D]``."""
    B, T, H, D = q.shape
    if gates["lr"] is None:
        raise ValueError("lr (the learning-rate gate θ) is required, shape [B, T, H] or [B, T, H, C]")
    C, parts = sum(widths), " + ".join(str(w) for w in widths)
    for name, gate in gates.items():
        if gate is None:
            continue
        size, channels = (D, "D") if name == "delta" else (C, "C")
        if not isinstance(gate, torch.Tensor) or list(gate.shape) not in ([B, T, H], [B, T, H, size]):
            got = list(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
            sums = "" if name == "delta" else f" (C = Σ_l d_l = {parts})"
            raise ValueError(
                f"{name} must be [B, T, H] = [{B}, {T}, {H}] or [B, T, H, {channels}] = [{B}, {T}, {H}, {size}]"
                f"{sums}, got {got}"
            )
        if not gate.dtype.is_floating_point or gate.device != q.device:
            raise ValueError(
                f"{name} must be a floating-point tensor on {q.device}, got {gate.dtype} on {gate.device}"
            )
        check_range(name, gate, 0.0, GATE_RANGES[name])


def _channel_wise(gates: dict[str, torch.Tensor | None]) -> list[str]:
    """The gates given channel-wise (``[B, T, H, C]`` or ``[B, T, H, D]``, not ``[B, T, H]``)."""
    return [name for name, gate in gates.items() if gate is not None and gate.dim() == 4]


def _check_hooks(
    options: dict[str, object], delta: torch.Tensor | None, weights: Sequence[torch.Tensor]
) -> None:
    """Known hook names, their parameters, the per-token threshold δ iff the bias takes one, and
    positive weights for retentions whose state is the weights (``softmax`` takes ``log W``)."""
    bias, retention = options["bias"], options["retention"]
    _check_choice("bias", bias, list(BIASES))
    _check_choice("retention", retention, list(RETENTIONS))
    check_hook_parameters("bias", bias, options["bias_params"])
    check_hook_parameters("retention", retention, options["retention_params"])
    takes_delta = "delta" in per_token_arguments(BIASES[bias])
    if takes_delta and delta is None:
        raise ValueError(
            f"delta (the per-token threshold δ_t, [B, T, H] or channel-wise [B, T, H, D]) is required for bias={bias!r}"
        )
    if delta is not None and not takes_delta:
        users = tuple(n for n, fn in BIASES.items() if "delta" in per_token_arguments(fn))
        raise ValueError(f"delta is used only by the biases {users}; got bias={bias!r}")
    if retention in WEIGHT_STATE:
        for layer, w in enumerate(weights):
            if w.numel() and w.min().item() < 0:
                raise ValueError(
                    f"retention={retention!r} keeps the weights on a scaled simplex and needs them >= 0: "
                    f"weights[{layer}] has min {w.min().item():.4g}"
                )


def _check_state(
    name: str, tensors: Sequence[torch.Tensor], dims: list[int], q: torch.Tensor, N: int
) -> None:
    """Each ``tensors[l]`` is ``[H, d_{l−1}, d_l]`` or ``[N, H, d_{l−1}, d_l]`` with ``d = dims``."""
    if not isinstance(tensors, (list, tuple)) or len(tensors) != len(dims) - 1:
        raise ValueError(f"{name} must be a list of {len(dims) - 1} per-layer tensors [H, d_in, d_out]")
    H = q.shape[2]
    for layer, t in enumerate(tensors):
        shared = isinstance(t, torch.Tensor) and t.dim() == 3
        lead, what = ([H], "[H, d_in, d_out]") if shared else ([N, H], "[N, H, d_in, d_out]")
        check_shape(f"{name}[{layer}]", t, [*lead, dims[layer], dims[layer + 1]], what)
        _check_like(f"{name}[{layer}]", t, q)


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: dict[str, torch.Tensor | None],
    weights: Sequence[torch.Tensor],
    initial_momentum: Sequence[torch.Tensor] | None,
    cu_seqlens: torch.Tensor | None,
    options: dict[str, object],
) -> None:
    """Raise ``ValueError`` naming the argument and its expected shape, range or values."""
    check_shape("q", q, [None] * 4, "[B, T, H, D]")
    B, T, H, D = q.shape
    if T < 1:
        raise ValueError(f"q must have at least one token (T >= 1), got shape {list(q.shape)}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be a floating-point tensor, got dtype={q.dtype}")
    for name, t in (("k", k), ("v", v)):
        check_shape(name, t, [B, T, H, D], "[B, T, H, D]")
        _check_like(name, t, q)
    check_cu_seqlens(cu_seqlens, B, T)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError("weights must be a non-empty list of per-layer tensors [H, d_in, d_out]")
    # d_0 = D, d_l = weights[l-1].shape[-1], d_L = D (the memory maps keys to values)
    dims = [D, *[w.shape[-1] if isinstance(w, torch.Tensor) else -1 for w in weights[:-1]], D]
    _check_state("weights", weights, dims, q, N)
    _check_gates(gates, q, dims[1:])
    if initial_momentum is not None:
        _check_state("initial_momentum", initial_momentum, dims, q, N)
    chunk_size = options["chunk_size"]
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    _check_choice("activation", options["activation"], list(ACTIVATIONS))
    _check_hooks(options, gates["delta"], weights)


def deep_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor | None,
    forget: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    *,
    chunk_size: int = 16,
    residual: bool = True,
    norm: bool = True,
    activation: str = "gelu",
    bias: str = "l2",
    retention: str = "none",
    bias_params: Mapping[str, float] | None = None,
    retention_params: Mapping[str, float] | None = None,
    delta: torch.Tensor | None = None,
    initial_momentum: Sequence[torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, State | None]:
    """Titans neural memory (arXiv 2501.00663): momentum, forgetting, retrieval on ``[B, T, H, D]``.

    Memory ``M(x) = x + LN(h_L)`` (``residual``, ``norm``) with ``h_l = φ(h_{l−1} W_l)`` and no
    activation after ``W_L``; per-token gates ``lr`` θ ≥ 0, ``momentum`` η ∈ [0, 1] (None: η = 0),
    ``forget`` α ∈ [0, 1] (None: α = 0), each ``[B, T, H]``. For each chunk of ``chunk_size``
    tokens, ``u_t = ∇_W ℓ_t`` at the previous chunk's end weights, ``S_t = η_t S_{t−1} − θ_t u_t``,
    ``W_t = (1 − α_t) W_{t−1} + S_t``, ``o_t = M_{W_t}(q_t)``; ``chunk_size=1`` is online GD.

    Channel-wise gates (Titans: "α channel-wise"; Miras: channel-wise η, α, δ): each of ``lr``,
    ``momentum``, ``forget`` may instead be ``[B, T, H, C]`` with ``C = Σ_l d_l`` (the output units of
    every layer, concatenated; depth 2, expansion 4: ``C = 4D + D``). Channel ``c`` of layer ``l`` gates
    column ``c`` of ``W_l`` (the incoming weights of one output unit): ``S_t[:, c] = η_t[c] S_{t−1}[:, c]
    − θ_t[c] u_t[:, c]``, ``A_t[:, c] = (1 − α_t[c]) A_{t−1}[:, c] + S_t[:, c]``. A ``[B, T, H]`` gate
    equals that gate repeated over ``C``; the forms may be mixed. The Triton backend takes per-head
    gates only (``auto`` falls back to ``torch``).

    ``weights[l]``: ``[H, d_{l−1}, d_l]`` (shared) or ``[N, H, d_{l−1}, d_l]`` (a state), with
    ``d_0 = d_L = D``; ``initial_momentum`` likewise (None: zeros). ``cu_seqlens``: packed
    documents (batch 1), each starting from its own row of the state. Returns ``(o, final_state)``
    with ``final_state = (W_T list, S_T list)``, each ``[N, H, d_{l−1}, d_l]``, if
    ``output_final_state``.

    Miras hooks (``objectives``; the exact chunked semantics are in ``deep_memory_naive``):
    ``bias`` ∈ ``BIASES`` — ``"l2"`` ‖e‖², ``"lp"`` (Moneta; ``bias_params`` ``p`` ≥ 1 default 3,
    ``nu`` > 0, ``eps`` > 0), ``"huber"`` (Yaad; needs ``delta`` δ ≥ 0: ``[B, T, H]`` switches on ‖e‖,
    channel-wise ``[B, T, H, D]`` per coordinate), ``"dot"``
    −⟨M(k), v⟩. ``retention`` ∈ ``RETENTIONS`` — the map ``W = R(A)`` from the state ``A`` to the
    weights, exact at chunk ends: ``"none"``, ``"lq_norm"`` (Moneta, ``A / ‖A‖_q^{q−2}``;
    ``retention_params`` ``q`` ≥ 2 default 4; the state is the accumulator ``A``), ``"softmax"``
    (Memora, ``c·Softmax`` over each output unit's inputs; ``c`` > 0 default 1; ``weights`` and the
    final state are the positive weights ``W``).
    """
    gates = {"lr": lr, "momentum": momentum, "forget": forget, "delta": delta}
    options = {
        "chunk_size": chunk_size, "activation": activation, "bias": bias, "retention": retention,
        "bias_params": bias_params, "retention_params": retention_params,
    }  # fmt: skip
    _validate(q, k, v, gates, weights, initial_momentum, cu_seqlens, options)
    resolved = resolve_backend(backend, q)
    channel_wise = _channel_wise(gates)
    if resolved == "triton" and ((bias, retention) not in TRITON_HOOKS or channel_wise):
        if backend == "triton" and channel_wise:
            raise ValueError(
                f"backend='triton' takes per-head gates [B, T, H] only; got channel-wise {channel_wise} "
                "(backend='torch' or 'auto' runs them)"
            )
        if backend == "triton":
            supported = "; ".join(
                f"bias={b!r} with retention in {tuple(r for c, r in TRITON_HOOKS if c == b)}"
                for b in dict.fromkeys(c for c, _ in TRITON_HOOKS)
            )
            raise ValueError(f"backend='triton' implements {supported}; got bias={bias!r}, retention={retention!r}")
        resolved = "torch"
    kwargs = dict(
        chunk_size=chunk_size,
        residual=residual,
        norm=norm,
        activation=activation,
        initial_momentum=initial_momentum,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    if resolved == "triton":
        from .triton_chunk import deep_memory_triton as op
    else:
        op = deep_memory_naive if resolved == "naive" else deep_memory_chunk
    hooks = dict(bias=bias, retention=retention, bias_params=bias_params, retention_params=retention_params)
    return op(q, k, v, lr, momentum, forget, weights, delta=delta, **hooks, **kwargs)
