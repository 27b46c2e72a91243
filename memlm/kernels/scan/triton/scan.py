"""Triton kernels of the linear scan ``h_t = a_t ⊙ h_{t−1} + x_t`` over ``[B, T, F]`` tensors.

One program owns ``BF`` features of one batch row and walks the sequence in tiles of ``BT``
steps: inside a tile ``tl.associative_scan`` composes ``(a, x)`` pairs as
``(a₂a₁, a₂x₁ + x₂)`` (no division, exact for any ``a``), and the carried state enters as
``h = A ⊙ h_carry + X``. The backward kernel is the same walk in the opposite order:
``γ_t = dh_t + a_{t+1} γ_{t+1}``, ``dx_t = γ_t``, ``da_t = γ_t h_{t−1}``.

"Processing order" ``p`` maps to the memory row ``T−1−p`` when ``FLIP`` (a reversed scan, or the
backward of a forward one) and to ``p`` otherwise. Loop indices are used only in arithmetic
(they are Python ints under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 32


@triton.jit
def _compose(a1, x1, a2, x2):
    """Apply step 1 then step 2: ``h ↦ a2 (a1 h + x1) + x2``."""
    return a2 * a1, a2 * x1 + x2


@triton.jit
def _scan_tile(b_a, b_x, b_carry, BT: tl.constexpr):
    """Scan one ``[BT, BF]`` tile from ``b_carry``; returns the tile's states and its last row."""
    b_A, b_X = tl.associative_scan((b_a, b_x), axis=0, combine_fn=_compose)
    b_h = b_A * b_carry[None, :] + b_X
    is_last = tl.arange(0, BT)[:, None] == BT - 1
    return b_h, tl.sum(tl.where(is_last, b_h, 0.0), axis=0)


@triton.jit
def _rows(p, T, FLIP: tl.constexpr):
    """Memory row of processing position ``p``."""
    if FLIP:
        row = T - 1 - p
    else:
        row = p
    return row


@triton.jit
def linear_scan_fwd_kernel(
    a, x, h0, h, T, F,
    HAS_H0: tl.constexpr, FLIP: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, ACC: tl.constexpr,
):
    n_f = tl.cdiv(F, BF)
    i_b, i_f = tl.program_id(0) // n_f, tl.program_id(0) % n_f
    o_f = i_f * BF + tl.arange(0, BF)
    m_f = o_f < F
    base = i_b.to(tl.int64) * T * F
    b_carry = tl.zeros([BF], dtype=ACC)
    if HAS_H0:
        b_carry = tl.load(h0 + i_b.to(tl.int64) * F + o_f, mask=m_f, other=0.0).to(ACC)
    for i_t in range(0, tl.cdiv(T, BT)):
        o_p = i_t * BT + tl.arange(0, BT)
        offs = base + _rows(o_p, T, FLIP)[:, None].to(tl.int64) * F + o_f[None, :]
        mask = (o_p < T)[:, None] & m_f[None, :]
        b_a = tl.load(a + offs, mask=mask, other=0.0).to(ACC)
        b_x = tl.load(x + offs, mask=mask, other=0.0).to(ACC)
        b_h, b_carry = _scan_tile(b_a, b_x, b_carry, BT)
        tl.store(h + offs, b_h.to(h.dtype.element_ty), mask=mask)


@triton.jit
def linear_scan_bwd_kernel(
    a, h, h0, dh, dx, da, T, F,
    HAS_H0: tl.constexpr, FLIP: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, ACC: tl.constexpr,
):
    n_f = tl.cdiv(F, BF)
    i_b, i_f = tl.program_id(0) // n_f, tl.program_id(0) % n_f
    o_f = i_f * BF + tl.arange(0, BF)
    m_f = o_f < F
    base = i_b.to(tl.int64) * T * F
    b_h0 = tl.zeros([BF], dtype=ACC)
    if HAS_H0:
        b_h0 = tl.load(h0 + i_b.to(tl.int64) * F + o_f, mask=m_f, other=0.0).to(ACC)
    b_carry = tl.zeros([BF], dtype=ACC)
    for i_t in range(0, tl.cdiv(T, BT)):
        o_p = i_t * BT + tl.arange(0, BT)
        offs = base + _rows(o_p, T, FLIP)[:, None].to(tl.int64) * F + o_f[None, :]
        mask = (o_p < T)[:, None] & m_f[None, :]
        # coefficient of γ_p is a at the step processed just before p (none for the first)
        offs_prev = base + _rows(o_p - 1, T, FLIP)[:, None].to(tl.int64) * F + o_f[None, :]
        b_a = tl.load(a + offs_prev, mask=(o_p >= 1)[:, None] & mask, other=0.0).to(ACC)
        b_dh = tl.load(dh + offs, mask=mask, other=0.0).to(ACC)
        b_g, b_carry = _scan_tile(b_a, b_dh, b_carry, BT)
        tl.store(dx + offs, b_g.to(dx.dtype.element_ty), mask=mask)
        # h_{t−1} of the forward scan is the step processed just after p here (h0 for the last)
        offs_next = base + _rows(o_p + 1, T, FLIP)[:, None].to(tl.int64) * F + o_f[None, :]
        b_hn = tl.load(h + offs_next, mask=((o_p + 1) < T)[:, None] & m_f[None, :], other=0.0).to(ACC)
        b_hn = tl.where(((o_p + 1) == T)[:, None], b_h0[None, :], b_hn)
        tl.store(da + offs, (b_g * b_hn).to(da.dtype.element_ty), mask=mask)


def _launch_config(x: torch.Tensor) -> tuple[int, int, object]:
    """Feature block, grid size and accumulation dtype for a ``[B, T, F]`` tensor."""
    B, _, F = x.shape
    BF = min(triton.next_power_of_2(F), 64)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    return BF, B * triton.cdiv(F, BF), acc


def triton_linear_scan(
    a: torch.Tensor, x: torch.Tensor, initial: torch.Tensor | None, reverse: bool
) -> torch.Tensor:
    """Forward scan of contiguous ``[B, T, F]`` tensors (``initial`` ``[B, F]`` or None)."""
    h = torch.empty_like(x)
    BF, grid, acc = _launch_config(x)
    linear_scan_fwd_kernel[(grid,)](
        a, x, initial, h, x.shape[1], x.shape[2],
        HAS_H0=initial is not None, FLIP=reverse, BT=BLOCK_T, BF=BF, ACC=acc,
    )
    return h


def triton_linear_scan_backward(
    a: torch.Tensor, h: torch.Tensor, initial: torch.Tensor | None, dh: torch.Tensor, reverse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, da, d initial)`` of :func:`triton_linear_scan` given ``dh`` (see module docstring)."""
    dh = dh.contiguous()
    dx, da = torch.empty_like(dh), torch.empty_like(a)
    BF, grid, acc = _launch_config(dh)
    linear_scan_bwd_kernel[(grid,)](
        a, h, initial, dh, dx, da, h.shape[1], h.shape[2],
        HAS_H0=initial is not None, FLIP=not reverse, BT=BLOCK_T, BF=BF, ACC=acc,
    )
    first = -1 if reverse else 0
    return dx, da, a[:, first] * dx[:, first]
