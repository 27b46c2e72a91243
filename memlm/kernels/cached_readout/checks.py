"""Argument checks of the cached readout: every input's shape, dtype, device and range, before any path
runs. A wrong call fails with a ``ValueError`` naming the argument and what it should be (docs/design.md §3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._common import check_cu_seqlens, check_shape
from ..deep_memory.mlp import ACTIVATIONS
from ..deep_memory.objectives import RETENTIONS, check_hook_parameters
from ..deep_memory.spec import MemorySpec
from .layout import cache_slots


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {tuple(allowed)}")


def _check_float(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype={t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs share one device")


def _check_query(q: torch.Tensor, what: str) -> None:
    check_shape("q", q, [None] * 4, what)
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be a floating-point tensor, got dtype={q.dtype}")
    if q.shape[1] < 1:
        raise ValueError(f"q must have at least one token (T >= 1), got shape {list(q.shape)}")


def _check_cache_offsets(
    cache_offsets: torch.Tensor | None, cu_seqlens: torch.Tensor | None, n_caches: int
) -> None:
    """``cache_offsets`` ``[D+1]`` goes with ``cu_seqlens`` ``[D+1]``: starts at 0, non-decreasing (a document
    may have no cache), ends at the number of caches ``N_total``."""
    if (cache_offsets is None) != (cu_seqlens is None):
        raise ValueError(
            "cache_offsets and cu_seqlens go together: packed documents (cu_seqlens [D+1]) need cache_offsets "
            "[D+1], document d owning the caches states[0, cache_offsets[d]:cache_offsets[d+1]]; got "
            f"cu_seqlens={'None' if cu_seqlens is None else 'a tensor'}, "
            f"cache_offsets={'None' if cache_offsets is None else 'a tensor'}"
        )
    if cache_offsets is None:
        return
    if not isinstance(cache_offsets, torch.Tensor) or cache_offsets.dim() != 1:
        raise ValueError("cache_offsets must be a 1-D integer tensor [D+1] of the documents' first caches")
    if cache_offsets.dtype.is_floating_point or cache_offsets.dtype == torch.bool:
        raise ValueError(f"cache_offsets must be an integer tensor, got dtype={cache_offsets.dtype}")
    if cache_offsets.numel() != cu_seqlens.numel():
        raise ValueError(
            f"cache_offsets must have one entry per entry of cu_seqlens ({cu_seqlens.numel()}), "
            f"got {cache_offsets.numel()}"
        )
    c = cache_offsets.tolist()
    if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])) or c[-1] != n_caches:
        raise ValueError(
            f"cache_offsets must start at 0, never decrease and end at the number of caches N_total={n_caches} "
            f"(states.shape[1]), got {c}"
        )


def _check_visible(visible: torch.Tensor, q: torch.Tensor, counts: torch.Tensor, packed: bool) -> None:
    """An integer ``[B, T]`` tensor with ``0 <= visible[b, t] <=`` the caches of the token's sequence."""
    B, T = q.shape[:2]
    check_shape("visible", visible, [B, T], "[B, T]")
    if visible.dtype.is_floating_point or visible.dtype.is_complex or visible.dtype == torch.bool:
        raise ValueError(f"visible must be an integer tensor (a count of caches), got dtype={visible.dtype}")
    if visible.device != q.device:
        raise ValueError(f"visible is on {visible.device} but q is on {q.device}; all inputs share one device")
    if visible.numel() and visible.min().item() < 0:
        raise ValueError(f"visible must be >= 0, got {visible.min().item()}")
    over = visible.long() > counts
    if bool(over.any()):
        t = int(over.reshape(-1).nonzero()[0])
        bound = "its document's caches (cache_offsets[d+1] - cache_offsets[d])" if packed else "N (states.shape[1])"
        raise ValueError(
            f"visible must be at most {bound}: token {t} (flattened) has visible={visible.reshape(-1)[t].item()} "
            f"> {counts.reshape(-1)[t].item()}"
        )


def _check_selection(
    top_k: int | None, renormalize: bool, gamma: torch.Tensor, visible: torch.Tensor
) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None (read every visible cache), got {top_k!r}")
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize must be a bool, got {renormalize!r}")
    if renormalize and top_k is not None and gamma.numel():
        vis = torch.arange(gamma.shape[-1], device=gamma.device) < visible[..., None, None].long()
        low = torch.where(vis, gamma, torch.zeros((), dtype=gamma.dtype, device=gamma.device)).min().item()
        if low < 0:
            raise ValueError(
                f"gamma must be >= 0 at the visible caches with renormalize=True (the kept weights are rescaled "
                f"to the sum of all visible ones), got a minimum of {low:.4g}"
            )


def _check_reads(
    q: torch.Tensor,
    n_caches: int,
    gamma: torch.Tensor,
    visible: torch.Tensor,
    top_k: int | None,
    renormalize: bool,
    cu_seqlens: torch.Tensor | None,
    cache_offsets: torch.Tensor | None,
) -> None:
    """The checks both ops share: packed documents, the weights γ, the visible counts and the selection."""
    B, T, H = q.shape[:3]
    check_cu_seqlens(cu_seqlens, B, T)
    _check_cache_offsets(cache_offsets, cu_seqlens, n_caches)
    slots = cache_slots(n_caches, cache_offsets)
    what = "[B, T, H, N]" if cu_seqlens is None else "[1, T, H, max_d (cache_offsets[d+1] - cache_offsets[d])]"
    check_shape("gamma", gamma, [B, T, H, slots], what)
    _check_float("gamma", gamma, q)
    if cu_seqlens is None:
        counts = torch.full((B, T), n_caches, device=q.device)
    else:
        per_doc = torch.diff(cache_offsets.to(q.device).long())
        counts = per_doc.repeat_interleave(torch.diff(cu_seqlens.to(q.device).long()))[None]
    _check_visible(visible, q, counts, cu_seqlens is not None)
    _check_selection(top_k, renormalize, gamma, visible)


def validate(
    q: torch.Tensor,
    states: torch.Tensor,
    gamma: torch.Tensor,
    visible: torch.Tensor,
    top_k: int | None,
    renormalize: bool,
    scale: float | None,
    cu_seqlens: torch.Tensor | None,
    cache_offsets: torch.Tensor | None,
) -> None:
    """Every check of :func:`..cached_readout`, before any computation."""
    _check_query(q, "[B, T, H, K]")
    B, T, H, K = q.shape
    check_shape("states", states, [B, None, H, K, None], "[B, N, H, K, V] (packed: [1, N_total, H, K, V])")
    _check_float("states", states, q)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"scale must be a positive number or None (K**-0.5), got {scale!r}")
    _check_reads(q, states.shape[1], gamma, visible, top_k, renormalize, cu_seqlens, cache_offsets)


def validate_mlp(
    q: torch.Tensor,
    states: Sequence[torch.Tensor],
    gamma: torch.Tensor,
    visible: torch.Tensor,
    spec: MemorySpec,
    top_k: int | None,
    renormalize: bool,
    cu_seqlens: torch.Tensor | None,
    cache_offsets: torch.Tensor | None,
) -> None:
    """Every check of :func:`..cached_readout_mlp`, before any computation."""
    _check_query(q, "[B, T, H, D]")
    B, T, H, D = q.shape
    if not isinstance(states, (list, tuple)) or not states:
        raise ValueError("states must be a non-empty list of per-layer cached weights [B, N, H, d_in, d_out]")
    first = states[0]
    n_caches = first.shape[1] if isinstance(first, torch.Tensor) and first.dim() == 5 else None
    # d_0 = D, d_l = states[l-1].shape[-1], d_L = D (the memory maps queries to values of the same width)
    dims = [D, *[s.shape[-1] if isinstance(s, torch.Tensor) else -1 for s in states[:-1]], D]
    for layer, s in enumerate(states):
        check_shape(f"states[{layer}]", s, [B, n_caches, H, dims[layer], dims[layer + 1]],
                    "[B, N, H, d_in, d_out] (packed: [1, N_total, H, d_in, d_out])")
        _check_float(f"states[{layer}]", s, q)
    _check_choice("activation", spec.activation, list(ACTIVATIONS))
    _check_choice("retention", spec.retention, list(RETENTIONS))
    check_hook_parameters("retention", spec.retention, spec.retention_params)
    for name in ("residual", "norm"):
        if not isinstance(getattr(spec, name), bool):
            raise ValueError(f"{name} must be a bool, got {getattr(spec, name)!r}")
    _check_reads(q, first.shape[1], gamma, visible, top_k, renormalize, cu_seqlens, cache_offsets)
