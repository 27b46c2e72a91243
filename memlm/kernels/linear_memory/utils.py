"""Dtype and packed-document helpers of the linear-memory paths."""

from __future__ import annotations

import torch


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (the reference precision); every other dtype accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pad_documents(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Packed ``[1, T, ...]`` → ``[N, L, ...]``: one zero-padded row per document, L the longest."""
    starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    steps = torch.arange(int(lengths.max()), device=x.device)
    valid = steps[None, :] < lengths[:, None].to(x.device)
    index = (starts[:, None].to(x.device) + steps[None, :]).clamp(max=x.shape[1] - 1)
    rows = x[0][index]
    return torch.where(valid.view(*valid.shape, *[1] * (x.dim() - 2)), rows, rows.new_zeros(()))


def unpad_documents(y: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pad_documents`: ``[N, L, ...]`` → packed ``[1, T, ...]``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(y.device)
    valid = torch.arange(y.shape[1], device=y.device)[None, :] < lengths[:, None]
    return y[valid][None]
