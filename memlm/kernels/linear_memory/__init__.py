"""``linear_memory``: the matrix-state associative memory shared by linear attention, RetNet,
Mamba2, GLA, HGRN2, DeltaNet and Gated DeltaNet (recurrences in ``naive.py``).

Layout, by path (:func:`select_path` picks one): ``naive.py`` (per-token loop, the reference),
``utils.py`` (dtype and packed-document helpers shared by the paths), ``pytorch/`` (the chunk-parallel
form, ``pytorch/chunk.py``, the CPU path) and ``triton/`` (flash-linear-attention's kernels,
``triton/fla.py``).
"""

from __future__ import annotations

import torch

from .._common import check_cu_seqlens, check_range, check_shape, resolve_backend
from .naive import naive_linear_memory
from .pytorch.chunk import chunk_linear_memory
from .triton.fla import fla_linear_memory

__all__ = ["chunk_linear_memory", "fla_linear_memory", "linear_memory", "naive_linear_memory", "select_path"]

FLA_CHUNK_SIZES = (16, 32, 64)
PATHS = ("naive", "torch", "triton")


def select_path(backend: str, q: torch.Tensor, chunk_size: int) -> str:
    """The implementation that runs the op, one of ``PATHS``: the only place the path is decided. The first
    matching row wins:

    ============  =============================================================  ==========
    backend       inputs                                                         path
    ============  =============================================================  ==========
    not one of    ``auto``, ``naive``, ``torch``, ``triton``                     ValueError
    ``naive``     any                                                            ``naive``
    ``auto``      float64 tensors (fla has no float64 kernels)                   ``torch``
    ``auto``      CUDA tensors                                                   ``triton``
    ``auto``      CPU tensors of one token (``T = 1``: a decoding step, where    ``naive``
                  the recurrence is a few products and the chunked path's setup
                  costs 3× more)
    ``auto``      otherwise (CPU tensors)                                        ``torch``
    ``torch``     any                                                            ``torch``
    ``triton``    CPU tensors without ``TRITON_INTERPRET=1``, or bfloat16 under  ValueError
                  it
    ``triton``    ``chunk_size`` not in ``FLA_CHUNK_SIZES``                      ValueError
    ``triton``    otherwise                                                      ``triton``
    ============  =============================================================  ==========

    The paths: ``naive`` — :func:`.naive.naive_linear_memory`; ``torch`` —
    :func:`.pytorch.chunk.chunk_linear_memory`; ``triton`` — :func:`.triton.fla.fla_linear_memory`, which
    calls the fla op of the recurrence's family (its module docstring has that table).
    """
    if backend == "auto" and q.dtype == torch.float64:
        backend = "torch"
    if backend == "auto" and q.device.type == "cpu" and q.shape[1] == 1:
        return "naive"
    backend = resolve_backend(backend, q)
    if backend == "triton" and chunk_size not in FLA_CHUNK_SIZES:
        raise ValueError(
            f"chunk_size must be one of {FLA_CHUNK_SIZES} for backend='triton', got {chunk_size}"
        )
    return backend


def _check_log_decay(name: str, t: torch.Tensor | None) -> None:
    """A log-decay must be finite and ≤ 0 (a decay factor in (0, 1])."""
    if t is not None and t.numel() and bool(((t > 0) | ~torch.isfinite(t)).any()):
        raise ValueError(
            f"{name} must hold finite log-decays <= 0 (decay factors in (0, 1]), got values in "
            f"[{t.min().item():.4g}, {t.max().item():.4g}]"
        )


def _validate(q, k, v, g, gk, beta, scale, initial_state, cu_seqlens, chunk_size) -> None:
    """Every argument check of :func:`linear_memory`, before any computation."""
    check_shape("q", q, [None] * 4, "[B, T, H, K]")
    B, T, H, K = q.shape
    check_shape("k", k, [B, T, H, K], "[B, T, H, K]")
    check_shape("v", v, [B, T, H, None], "[B, T, H, V]")
    V = v.shape[-1]
    check_shape("g", g, [B, T, H], "[B, T, H]")
    check_shape("gk", gk, [B, T, H, K], "[B, T, H, K]")
    check_shape("beta", beta, [B, T, H], "[B, T, H]")
    if gk is not None and beta is not None:
        raise ValueError("gk (channel-wise decay) together with beta (delta rule) is not supported; "
                         "pass g (scalar decay per head) with beta for Gated DeltaNet")
    named = {"q": q, "k": k, "v": v, "g": g, "gk": gk, "beta": beta, "initial_state": initial_state}
    for name, t in named.items():
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype={t.dtype}")
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs share one device")
    check_cu_seqlens(cu_seqlens, B, T)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check_shape("initial_state", initial_state, [N, H, K, V], "[N, H, K, V] (N = B, or documents)")
    if T == 0:
        raise ValueError("q must have at least one time step (T >= 1)")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None (K**-0.5), got {scale!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_log_decay("g", g)
    _check_log_decay("gk", gk)
    check_range("beta", beta, 0.0, 2.0)


def linear_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear memory ``S_t = D_t S_{t−1} + k_tᵀ v_t`` (or the delta rule with β); ``o_t = scale·q_t S_t``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` scalar log-decay per head (RetNet, Mamba2, simple GLA), ≤ 0.
        gk: ``[B, T, H, K]`` channel-wise log-decay (GLA, HGRN2), ≤ 0. Not together with beta.
        beta: ``[B, T, H]`` delta-rule write strength in [0, 2] (DeltaNet; with g Gated DeltaNet).
        scale: read scale, default ``K**-0.5``.
        initial_state: ``[N, H, K, V]``; N = B, or the number of documents with cu_seqlens.
        output_final_state: also return the state after the last token of every sequence.
        cu_seqlens: ``[N+1]`` FlashAttention-style boundaries of packed documents (B = 1);
            every document starts from its own ``initial_state[i]`` (zeros if None).
        chunk_size: tokens per chunk of the torch and triton paths (triton: 16, 32 or 64).
        backend: ``"auto" | "naive" | "torch" | "triton"``; with the inputs it picks the implementation
            (:func:`select_path`).

    Returns:
        ``(o [B, T, H, V] in q's dtype, final_state [N, H, K, V] in float32 — float64 for
        float64 inputs — or None)``. A decoding step is ``T = 1`` with ``initial_state``.
    """
    _validate(q, k, v, g, gk, beta, scale, initial_state, cu_seqlens, chunk_size)
    path = select_path(backend, q, chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    args = (q, k, v, g, gk, beta, scale, initial_state, output_final_state, cu_seqlens)
    if path == "naive":
        return naive_linear_memory(*args)
    if path == "torch":
        return chunk_linear_memory(*args, chunk_size=chunk_size)
    return fla_linear_memory(*args, chunk_size=chunk_size)
