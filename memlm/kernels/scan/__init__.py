"""``linear_scan``: the first-order linear recurrence ``h_t = a_t ⊙ h_{t−1} + x_t`` along dim 1,
used for momentum, decays and segment carries.

Layout, by path (:func:`select_path` picks one): ``naive.py`` (loop, the reference), ``pytorch/``
(vectorised doubling scan, ``pytorch/chunk.py``) and ``triton/`` (our kernels, ``triton/scan.py``).
The torch and triton paths share one autograd function (below) whose backward is the opposite scan
(see ``chunk_linear_scan_backward``).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .._common import check_shape, resolve_backend
from .naive import naive_linear_scan
from .pytorch.chunk import chunk_linear_scan, chunk_linear_scan_backward

__all__ = ["chunk_linear_scan", "linear_scan", "naive_linear_scan", "select_path"]

PATHS = ("naive", "torch", "triton")


def select_path(backend: str, x: torch.Tensor) -> str:
    """The implementation that runs the scan, one of ``PATHS``: the only place the path is decided. The first
    matching row wins:

    ============  ==============================================================  ==========
    backend       inputs                                                          path
    ============  ==============================================================  ==========
    not one of    ``auto``, ``naive``, ``torch``, ``triton``                      ValueError
    ``naive``     any                                                             ``naive``
    ``auto``      CUDA tensors                                                    ``triton``
    ``auto``      otherwise                                                       ``torch``
    ``torch``     any                                                             ``torch``
    ``triton``    CPU tensors without ``TRITON_INTERPRET=1``, or bfloat16 under   ValueError
                  it
    ``triton``    otherwise                                                       ``triton``
    ============  ==============================================================  ==========

    The paths: ``naive`` — :func:`.naive.naive_linear_scan`; ``torch`` — :func:`.pytorch.chunk.chunk_linear_scan`
    and ``triton`` — :func:`.triton.scan.triton_linear_scan`, each inside :class:`LinearScanFunction`.
    """
    return resolve_backend(backend, x)


class LinearScanFunction(torch.autograd.Function):
    """``[B, T, F]`` scan on the torch or triton backend with the analytic backward."""

    @staticmethod
    def forward(ctx, a, x, initial, reverse: bool, backend: str):
        if backend == "triton":
            from .triton.scan import triton_linear_scan

            h = triton_linear_scan(a, x, initial, reverse)
        else:
            acc = torch.promote_types(x.dtype, torch.float32)
            init = None if initial is None else initial.to(acc)
            h = chunk_linear_scan(a.to(acc), x.to(acc), init, reverse).to(x.dtype)
        ctx.save_for_backward(a, h, initial)
        ctx.reverse, ctx.backend = reverse, backend
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        a, h, initial = ctx.saved_tensors
        if ctx.backend == "triton":
            from .triton.scan import triton_linear_scan_backward

            dx, da, dinit = triton_linear_scan_backward(a, h, initial, dh, ctx.reverse)
        else:
            acc = torch.promote_types(h.dtype, torch.float32)
            init = None if initial is None else initial.to(acc)
            dx, da, dinit = chunk_linear_scan_backward(a.to(acc), h.to(acc), init, dh.to(acc), ctx.reverse)
        return (
            da.to(a.dtype),
            dx.to(h.dtype),
            None if initial is None else dinit.to(initial.dtype),
            None,
            None,
        )


def _validate(a: torch.Tensor, x: torch.Tensor, initial: torch.Tensor | None, reverse: bool) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor of shape [B, T, *]")
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty, got shape {list(x.shape)}")
    rest = "".join(f", {d}" for d in x.shape[2:])
    check_shape("a", a, list(x.shape), "[B, T, *] (the shape of x)")
    check_shape("initial", initial, [x.shape[0], *x.shape[2:]], f"[B, *] = [{x.shape[0]}{rest}]")
    for name, t in (("a", a), ("initial", initial)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype={t.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device ({x.device}), got {t.device}")
    if not isinstance(reverse, bool):
        raise ValueError(f"reverse must be a bool, got {reverse!r}")


def linear_scan(
    a: torch.Tensor,
    x: torch.Tensor,
    *,
    initial: torch.Tensor | None = None,
    reverse: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``h_t = a_t ⊙ h_{t−1} + x_t`` for t = 1..T along dim 1, from ``h_0 = initial`` (zeros if None).

    Args:
        a, x: ``[B, T, *]`` of one shape (any trailing dims); any real ``a``, zeros included.
            Mixed floating dtypes are promoted to one; ``initial`` is cast to it.
        initial: ``[B, *]``: h_0, or h_{T+1} when ``reverse``.
        reverse: run ``h_t = a_t ⊙ h_{t+1} + x_t`` from t = T down to 1.
        backend: ``"auto" | "naive" | "torch" | "triton"``; with ``x`` it picks the implementation
            (:func:`select_path`).

    Returns:
        ``h`` ``[B, T, *]``, every step, in the promoted dtype (accumulated in at least float32).
    """
    _validate(a, x, initial, reverse)
    dtype = torch.promote_types(a.dtype, x.dtype)
    a, x = a.to(dtype), x.to(dtype)
    initial = None if initial is None else initial.to(dtype)
    path = select_path(backend, x)
    if path == "naive":
        return naive_linear_scan(a, x, initial, reverse)
    B, T = x.shape[:2]
    F = math.prod(x.shape[2:])
    init = None if initial is None else initial.reshape(B, F).contiguous()
    h = LinearScanFunction.apply(a.reshape(B, T, F).contiguous(), x.reshape(B, T, F).contiguous(), init,
                                 reverse, path)
    return h.view(x.shape)
