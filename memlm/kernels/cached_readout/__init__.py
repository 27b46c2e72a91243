"""Cached-memory readout of Memory Caching (Behrouz et al. 2026, arXiv 2602.24281; docs/design.md §4.4).

A recurrent memory's state is cached at each segment end; a token reads the caches visible to it (those of
the segments before its own), each weighted by ``γ``:

    matrix memory (``cached_readout``):     o_t = scale · Σ_{i ∈ J_t} γ'_{t,i} · q_t S_i
    deep memory (``cached_readout_mlp``):   o_t = Σ_{i ∈ J_t} γ'_{t,i} · M_{W_i}(q_t)

with ``J_t ⊆ {0, …, v_t − 1}`` the caches read (all visible ones, or the ``top_k`` with the largest weights) and
``γ'`` the weights applied (``selection.py`` states the rule). The online memory's own read is the caller's.

Layout, by path (``select_path`` / ``select_path_mlp`` pick one): ``naive.py`` (per-token loop, the reference),
``selection.py`` (visibility, top-k and renormalisation, vectorised), ``layout.py`` (sequences, packed
documents), ``retention.py`` (the weights a deep cache is read with), ``checks.py`` (argument checks),
``pytorch/readout.py`` (vectorised, the CPU path; the deep memory's only fast path) and ``triton/readout.py``
(matrix memory: forward and backward kernels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .._common import resolve_backend
from ..deep_memory.spec import MemorySpec
from .checks import validate, validate_mlp
from .layout import pad_rows, sequences, unpad_rows
from .naive import naive_cached_readout, naive_cached_readout_mlp
from .pytorch.readout import matrix_readout, mlp_readout
from .retention import read_weights
from .selection import effective_gamma, select_top_k

__all__ = [
    "PATHS", "PATHS_MLP", "cached_readout", "cached_readout_mlp", "effective_gamma", "naive_cached_readout",
    "naive_cached_readout_mlp", "select_path", "select_path_mlp", "select_top_k",
]  # fmt: skip

PATHS = ("naive", "torch", "triton")
PATHS_MLP = ("naive", "torch")
MAX_TRITON_HEAD_DIM = 256  # triton/readout.py: MAX_HEAD_DIM (not imported here: that module imports triton)


def _triton_gap(q: torch.Tensor) -> str | None:
    """What the matrix readout's Triton kernels lack for ``q``, as a phrase for the error; None if nothing."""
    if q.dtype == torch.float64:
        return "computes in float32 and takes float32/float16/bfloat16 inputs; got dtype=torch.float64"
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        return f"takes a key dim K <= {MAX_TRITON_HEAD_DIM}; got K={q.shape[-1]}"
    return None


def select_path(backend: str, q: torch.Tensor) -> str:
    """The implementation of :func:`cached_readout`, one of ``PATHS``: the only place the path is decided. The
    first matching row wins:

    ============  =============================================================  ==========
    backend       inputs                                                         path
    ============  =============================================================  ==========
    not one of    ``auto``, ``naive``, ``torch``, ``triton``                     ValueError
    ``naive``     any                                                            ``naive``
    ``triton``    CPU tensors without ``TRITON_INTERPRET=1``, or bfloat16 under  ValueError
                  it
    ``triton``    what the kernels lack (:func:`_triton_gap`): float64, K > 256  ValueError
    ``triton``    otherwise                                                      ``triton``
    ``auto``      CUDA tensors and nothing the kernels lack                      ``triton``
    ``auto``      otherwise                                                      ``torch``
    ``torch``     any                                                            ``torch``
    ============  =============================================================  ==========

    The paths: ``naive`` — :func:`.naive.naive_cached_readout`; ``torch`` — :func:`.pytorch.readout.matrix_readout`;
    ``triton`` — :func:`.triton.readout.triton_cached_readout` (forward and backward kernels).
    """
    resolved = resolve_backend(backend, q)
    if resolved == "triton":
        gap = _triton_gap(q)
        if gap is None:
            return "triton"
        if backend == "triton":
            raise ValueError(f"backend='triton' {gap} (backend='torch' or 'auto' runs it)")
        return "torch"
    return resolved


def _triton_gap_mlp() -> str:
    """What Triton lacks for the deep-memory readout: everything (no kernel yet)."""
    return "has no kernel for the deep-memory readout (cached_readout_mlp)"


def select_path_mlp(backend: str, q: torch.Tensor) -> str:
    """The implementation of :func:`cached_readout_mlp`, one of ``PATHS_MLP``. The first matching row wins:

    ============  =============================================================  ==========
    backend       inputs                                                         path
    ============  =============================================================  ==========
    not one of    ``auto``, ``naive``, ``torch``, ``triton``                     ValueError
    ``naive``     any                                                            ``naive``
    ``triton``    CPU tensors without ``TRITON_INTERPRET=1``, or bfloat16 under  ValueError
                  it
    ``triton``    any (:func:`_triton_gap_mlp`: no kernel)                       ValueError
    ``auto``      any (CUDA tensors included)                                    ``torch``
    ``torch``     any                                                            ``torch``
    ============  =============================================================  ==========

    The paths: ``naive`` — :func:`.naive.naive_cached_readout_mlp`; ``torch`` — :func:`.pytorch.readout.mlp_readout`.
    """
    resolved = resolve_backend(backend, q)
    if resolved == "triton":
        if backend == "triton":
            raise ValueError(f"backend='triton' {_triton_gap_mlp()} (backend='torch' or 'auto' runs it)")
        return "torch"
    return resolved


def _at_least_float32(gamma: torch.Tensor) -> torch.Tensor:
    """The weights in float32 or wider: the selection and renormalisation are not done in half precision."""
    return gamma.to(torch.promote_types(gamma.dtype, torch.float32))


def _as_rows(
    q: torch.Tensor,
    gamma: torch.Tensor,
    caches: Sequence[torch.Tensor],
    cu_seqlens: torch.Tensor | None,
    cache_offsets: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """Packed documents as padded rows for the PyTorch path: q, γ' ``[D, L, H, ·]``, each cache tensor
    ``[D, NW, H, ·, ·]`` (NW = the most caches of one document), and the document lengths (None unpacked)."""
    if cu_seqlens is None:
        return q, gamma, list(caches), None
    device = q.device
    starts, lengths = cu_seqlens[:-1].to(device).long(), torch.diff(cu_seqlens.to(device).long())
    c_starts, c_counts = cache_offsets[:-1].to(device).long(), torch.diff(cache_offsets.to(device).long())
    L, slots = int(lengths.max()), gamma.shape[-1]
    q_rows, g_rows = (pad_rows(x[0], starts, lengths, L) for x in (q, gamma))
    c_rows = [pad_rows(c[0], c_starts, c_counts, slots) for c in caches]
    return q_rows, g_rows, c_rows, lengths


def cached_readout(
    q: torch.Tensor,
    states: torch.Tensor,
    gamma: torch.Tensor,
    visible: torch.Tensor,
    *,
    top_k: int | None = None,
    renormalize: bool = False,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cache_offsets: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Read cached matrix memories: ``o_t = scale · Σ_{i ∈ J_t} γ'_{t,i} · q_t S_i`` (docs/design.md §4.4).

    Args:
        q: ``[B, T, H, K]`` queries.
        states: ``[B, N, H, K, V]``: cache ``i`` of row ``b`` is ``S_i = states[b, i]`` (e.g. the memory's state at
            the end of segment ``i``). Packed: ``[1, N_total, H, K, V]``, see ``cache_offsets``.
        gamma: ``[B, T, H, N]`` weights ``γ_{t,i}`` (packed: ``[1, T, H, max_d n_d]``); entries ``i >= visible`` are
            ignored (never read, no gradient), so a caller need not mask them.
        visible: ``[B, T]`` integers: token ``t`` can read the caches ``0 … visible[t] − 1`` of its own sequence
            (``0 <= visible <= N``, packed: ``<= n_d`` of its document).
        top_k: None (read every visible cache) or a positive int: read only the ``top_k`` visible caches with the
            largest ``γ`` (per token and head; ties go to the lower index). ``top_k >= N`` is the same as None.
            The selection is exposed as :func:`select_top_k`.
        renormalize: with ``top_k``, rescale the kept weights so their sum is the sum of all visible weights
            (``γ'_i = γ_i · Σ_visible γ / Σ_kept γ``; factor 1 where the kept sum is 0; needs ``γ >= 0`` at
            visible caches). False: the kept weights are used as given, which with a ``γ`` already computed
            over the selection (a softmax over the online memory and the kept caches: sparse selective
            caching) is exact.
        scale: read scale, default ``K**-0.5`` (1 gives the plain ``Σ γ q S``).
        cu_seqlens: ``[D+1]`` FlashAttention-style boundaries of packed documents (B = 1), with
        cache_offsets: ``[D+1]`` (required with ``cu_seqlens``): document ``d`` owns the caches
            ``states[0, cache_offsets[d] : cache_offsets[d+1]]`` (``n_d`` of them, possibly 0), which its tokens
            address by their index ``i`` in the document (``gamma[..., i]``, ``visible``); a document never reads
            another's caches.
        backend: ``"auto" | "naive" | "torch" | "triton"``; with the inputs it picks the implementation
            (:func:`select_path`).

    Returns:
        ``o [B, T, H, V]`` in q's dtype (no recurrent state: the caches are inputs). Every path accumulates in
        float32 (float64 for float64 inputs, naive and torch); gradients flow to q, states and gamma (through
        the kept weights, not through the choice of ``top_k``).
    """
    validate(q, states, gamma, visible, top_k, renormalize, scale, cu_seqlens, cache_offsets)
    path = select_path(backend, q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if path == "naive":
        return naive_cached_readout(q, states, gamma, visible, top_k, renormalize, scale, cu_seqlens, cache_offsets)
    weights = effective_gamma(_at_least_float32(gamma), visible, top_k, renormalize)
    if path == "triton":
        from .triton.readout import triton_cached_readout

        spans = sequences(q.shape[0], q.shape[1], states.shape[1], cu_seqlens, cache_offsets)
        return triton_cached_readout(q, states, weights, visible, spans, scale)
    q_rows, g_rows, (s_rows,), lengths = _as_rows(q, weights, [states], cu_seqlens, cache_offsets)
    o = matrix_readout(q_rows, s_rows, g_rows, scale)
    return (o if lengths is None else unpad_rows(o, lengths)[None]).to(q.dtype)


def cached_readout_mlp(
    q: torch.Tensor,
    states: Sequence[torch.Tensor],
    gamma: torch.Tensor,
    visible: torch.Tensor,
    spec: MemorySpec | None = None,
    *,
    top_k: int | None = None,
    renormalize: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cache_offsets: torch.Tensor | None = None,
    backend: str = "auto",
    **spec_fields: object,
) -> torch.Tensor:
    """Read cached deep memories: ``o_t = Σ_{i ∈ J_t} γ'_{t,i} · M_{W_i}(q_t)`` (docs/design.md §3, §4.4).

    ``M`` is the deep memory of ``spec`` (:class:`..deep_memory.MemorySpec`; its fields may also be given as
    keywords, which override ``spec``'s): ``h_l = φ(h_{l−1} W_l)``, no φ after ``W_L``, ``M(x) = x + LN(h_L)``
    with ``residual`` and ``norm`` optional, computed by the deep memory's own
    :func:`..deep_memory.mlp.memory_apply`, so each term is exactly the read the deep memory makes with those
    weights. Only ``activation``, ``residual``, ``norm`` and ``retention`` (with its parameters) matter here.

    Args:
        q: ``[B, T, H, D]``.
        states: per-layer caches, ``states[l]`` ``[B, N, H, d_{l−1}, d_l]`` with ``d_0 = d_L = D`` (packed:
            ``[1, N_total, ...]``): cache ``i`` holds the state the deep memory hands back (``final_state[0]``),
            read with ``W = R(A)`` where the retention map's state is not the weights (``retention.py``).
        gamma, visible, top_k, renormalize, cu_seqlens, cache_offsets: as in :func:`cached_readout`.
        backend: ``"auto" | "naive" | "torch" | "triton"`` (:func:`select_path_mlp`: no Triton kernel, ``auto``
            runs the PyTorch path on every device, ``triton`` raises).

    Returns:
        ``o [B, T, H, D]`` in q's dtype. With one layer, no residual and no norm this is
        :func:`cached_readout` with ``scale=1``.
    """
    spec = MemorySpec(**spec_fields) if spec is None else replace(spec, **spec_fields)
    validate_mlp(q, states, gamma, visible, spec, top_k, renormalize, cu_seqlens, cache_offsets)
    path = select_path_mlp(backend, q)
    if path == "naive":
        return naive_cached_readout_mlp(q, states, gamma, visible, spec, top_k, renormalize, cu_seqlens, cache_offsets)
    weights = effective_gamma(_at_least_float32(gamma), visible, top_k, renormalize)
    q_rows, g_rows, layers, lengths = _as_rows(q, weights, read_weights(spec, states), cu_seqlens, cache_offsets)
    o = mlp_readout(q_rows, layers, g_rows, spec)
    return (o if lengths is None else unpad_rows(o, lengths)[None]).to(q.dtype)
