"""Argument checks of the deep-memory op: every input's shape, dtype, device and range, and the memory's
options (:class:`.spec.MemorySpec`), before any path runs. A wrong call fails with a ``ValueError`` naming the
argument and what it should be."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._common import check_cu_seqlens, check_range, check_shape
from .mlp import ACTIVATIONS
from .objectives import BIASES, RETENTIONS, WEIGHT_STATE, check_hook_parameters, per_token_arguments
from .spec import MemorySpec


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


def channel_wise_gates(gates: dict[str, torch.Tensor | None]) -> list[str]:
    """The gates given channel-wise (``[B, T, H, C]`` or ``[B, T, H, D]``, not ``[B, T, H]``)."""
    return [name for name, gate in gates.items() if gate is not None and gate.dim() == 4]


def _check_hooks(spec: MemorySpec, delta: torch.Tensor | None, weights: Sequence[torch.Tensor]) -> None:
    """Known hook names, their parameters, the per-token threshold δ iff the bias takes one, and
    positive weights for retentions whose state is the weights (``softmax`` takes ``log W``)."""
    bias, retention = spec.bias, spec.retention
    _check_choice("bias", bias, list(BIASES))
    _check_choice("retention", retention, list(RETENTIONS))
    check_hook_parameters("bias", bias, spec.bias_params)
    check_hook_parameters("retention", retention, spec.retention_params)
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


def check_states_every(every: object, chunk_size: int) -> None:
    """``output_states_every`` is None or a positive multiple of ``chunk_size``: the chunked paths hold the
    exact state at chunk ends only (docs/design.md §3)."""
    if every is None:
        return
    if isinstance(every, bool) or not isinstance(every, int) or every < 1 or every % chunk_size:
        raise ValueError(
            f"output_states_every must be None or a positive multiple of chunk_size={chunk_size} "
            f"(the state is exact at chunk ends only), got {every!r}"
        )


def validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: dict[str, torch.Tensor | None],
    weights: Sequence[torch.Tensor],
    initial_momentum: Sequence[torch.Tensor] | None,
    cu_seqlens: torch.Tensor | None,
    spec: MemorySpec,
    output_states_every: int | None = None,
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
    chunk_size = spec.chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    check_states_every(output_states_every, chunk_size)
    _check_choice("activation", spec.activation, list(ACTIVATIONS))
    _check_hooks(spec, gates["delta"], weights)
