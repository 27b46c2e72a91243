"""Argument checks and backend dispatch shared by every kernel op.

Every op validates its inputs here *before* any kernel launch, so a wrong call fails
with a ``ValueError`` naming the argument and the expected shape or range instead of a
stack trace from deep inside Triton.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

BACKENDS = ("auto", "naive", "torch", "triton")


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, ref: torch.Tensor) -> str:
    """Map ``backend`` to a concrete one: ``auto`` is Triton on CUDA tensors, else torch.

    ``triton`` on CPU tensors is allowed only under the interpreter, and never in
    bfloat16 there (the interpreter computes bf16 ``tl.dot`` wrongly, triton #11584).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if ref.is_cuda else "torch"
    if backend == "triton" and not ref.is_cuda:
        if not triton_interpreting():
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the "
                f"kernels in the CPU interpreter (got tensors on {ref.device})"
            )
        if ref.dtype == torch.bfloat16:
            raise ValueError(
                "backend='triton' under TRITON_INTERPRET=1 supports float32/float16 only "
                "(the interpreter computes bfloat16 tl.dot wrongly); got dtype=torch.bfloat16"
            )
    return backend


def check_shape(name: str, t: torch.Tensor | None, expected: Sequence[int | None], what: str) -> None:
    """Raise unless ``t`` has ``len(expected)`` dims matching ``expected`` (None = any size).

    ``what`` spells the expected layout for the message, e.g. ``"[B, T, H, K]"``.
    """
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {what}, got {type(t).__name__}")
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} must have shape {what} = [{want}], got {list(t.shape)}")


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, seqlen: int) -> None:
    """Validate FlashAttention-style packed boundaries: batch 1, starts at 0, strictly
    increasing, ends at T."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N+1] of document boundaries")
    if cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be an integer tensor, got dtype={cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"cu_seqlens requires batch size 1 (packed documents), got B={batch}")
    c = cu_seqlens.tolist()
    if c[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {c[0]}")
    if any(b <= a for a, b in zip(c, c[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {c}")
    if c[-1] != seqlen:
        raise ValueError(f"cu_seqlens must end at T={seqlen}, got {c[-1]}")


def check_range(name: str, t: torch.Tensor | None, lo: float, hi: float) -> None:
    """Raise unless every entry of ``t`` lies in ``[lo, hi]`` (checked on the values)."""
    if t is None:
        return
    if t.numel() and (t.min().item() < lo or t.max().item() > hi):
        raise ValueError(
            f"{name} must lie in [{lo}, {hi}], got values in [{t.min().item():.4g}, {t.max().item():.4g}]"
        )


def segments(cu_seqlens: torch.Tensor | None, seqlen: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` spans of the packed documents (one span when unpacked)."""
    if cu_seqlens is None:
        return [(0, seqlen)]
    c = cu_seqlens.tolist()
    return list(zip(c[:-1], c[1:]))
