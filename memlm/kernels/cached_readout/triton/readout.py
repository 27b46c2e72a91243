"""Triton kernels of the matrix-memory cached readout ``o_t = scale · Σ_i γ'_{t,i} q_t S_i`` (docs/design.md
§4.4), forward and backward, on flattened tokens ``[T_all, H, ·]`` and caches ``[N_all, H, K, V]``.

Work is cut by sequence (a batch row or a packed document), so a block of tokens never straddles two
sequences and shares one cache base:

* forward (``cached_readout_fwd_kernel``), one program per (token block, head, ``BV`` value columns): loops over
  the caches visible to any token of the block (up to the block's largest ``visible``), skips a cache whose
  weights are all zero in the block (a top-k selection), and accumulates ``γ'_{t,i} · q_t S_i`` in float32;
* ``dq`` and ``dγ'`` (``cached_readout_bwd_dq_kernel``), one program per (token block, head): the same loop,
  ``dq_t = scale · Σ_i γ'_{t,i} do_t S_iᵀ`` and ``dγ'_{t,i} = scale · (q_t S_i) · do_t`` for every visible cache
  (a zero weight still has a gradient), value columns walked in tiles;
* ``dS`` (``cached_readout_bwd_ds_kernel``), one program per (cache, head, ``BV`` value columns): walks the
  tokens of the cache's sequence, ``dS_i = scale · Σ_t γ'_{t,i} q_tᵀ do_t``, skipping token blocks whose
  weights for it are all zero.

Products are float32 ("ieee") unless q and the states are both float16 or both bfloat16 (then the operands
are in that dtype, accumulated in float32). Loop indices are used only in arithmetic (they are Python ints
under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..layout import Span

BLOCK_T = 32
MAX_HEAD_DIM = 256  # K: one [BT, BK] query tile per program
HALF = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _mm(a, b, HALF_DOT: tl.constexpr, DOT: tl.constexpr):
    """``a @ b`` accumulated in float32; operands in ``DOT`` (a half type) when ``HALF_DOT``, else exact float32."""
    if HALF_DOT:
        return tl.dot(a.to(DOT), b.to(DOT))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def cached_readout_fwd_kernel(
    q, s, g, vis, o, blk_start, blk_end, blk_base, scale, H, K, V, NW,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HALF_DOT: tl.constexpr, DOT: tl.constexpr,
):
    i_blk, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(blk_start + i_blk).to(tl.int64)
    end = tl.load(blk_end + i_blk).to(tl.int64)
    base = tl.load(blk_base + i_blk).to(tl.int64)
    o_t = start + tl.arange(0, BT)
    m_t = o_t < end
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_q = tl.load(q + (o_t * H + i_h)[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    b_vis = tl.load(vis + o_t, mask=m_t, other=0)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for i in range(0, tl.max(b_vis, axis=0)):
        b_g = tl.load(g + (o_t * H + i_h) * NW + i, mask=m_t & (i < b_vis), other=0.0).to(tl.float32)
        if tl.sum((b_g != 0).to(tl.int32), axis=0) > 0:
            p_s = s + ((base + i) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
            b_s = tl.load(p_s, mask=m_k[:, None] & m_v[None, :], other=0.0)
            acc += b_g[:, None] * _mm(b_q, b_s, HALF_DOT, DOT)
    p_o = o + (o_t * H + i_h)[:, None] * V + o_v[None, :]
    tl.store(p_o, (acc * scale).to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.jit
def cached_readout_bwd_dq_kernel(
    q, s, g, vis, do, dq, dg, blk_start, blk_end, blk_base, scale, H, K, V, NW,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HALF_DOT: tl.constexpr, DOT: tl.constexpr,
):
    i_blk, i_h = tl.program_id(0), tl.program_id(1)
    start = tl.load(blk_start + i_blk).to(tl.int64)
    end = tl.load(blk_end + i_blk).to(tl.int64)
    base = tl.load(blk_base + i_blk).to(tl.int64)
    o_t = start + tl.arange(0, BT)
    m_t = o_t < end
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_q = tl.load(q + (o_t * H + i_h)[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    b_vis = tl.load(vis + o_t, mask=m_t, other=0)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    for i in range(0, tl.max(b_vis, axis=0)):
        m_i = m_t & (i < b_vis)
        b_g = tl.load(g + (o_t * H + i_h) * NW + i, mask=m_i, other=0.0).to(tl.float32)
        b_dg = tl.zeros([BT], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            p_s = s + ((base + i) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
            b_s = tl.load(p_s, mask=m_k[:, None] & m_v[None, :], other=0.0)
            p_do = do + (o_t * H + i_h)[:, None] * V + o_v[None, :]
            b_do = tl.load(p_do, mask=m_i[:, None] & m_v[None, :], other=0.0)
            b_dg += tl.sum(_mm(b_q, b_s, HALF_DOT, DOT) * b_do.to(tl.float32), axis=1)
            b_dq += b_g[:, None] * _mm(b_do, tl.trans(b_s), HALF_DOT, DOT)
        tl.store(dg + (o_t * H + i_h) * NW + i, (b_dg * scale).to(dg.dtype.element_ty), mask=m_i)
    p_dq = dq + (o_t * H + i_h)[:, None] * K + o_k[None, :]
    tl.store(p_dq, (b_dq * scale).to(dq.dtype.element_ty), mask=m_t[:, None] & m_k[None, :])


@triton.jit
def cached_readout_bwd_ds_kernel(
    q, g, vis, do, ds, c_start, c_end, c_local, scale, H, K, V, NW,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HALF_DOT: tl.constexpr, DOT: tl.constexpr,
):
    i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(c_start + i_n).to(tl.int64)
    end = tl.load(c_end + i_n).to(tl.int64)
    local = tl.load(c_local + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for t0 in range(start, end, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < end
        b_vis = tl.load(vis + o_t, mask=m_t, other=0)
        b_g = tl.load(g + (o_t * H + i_h) * NW + local, mask=m_t & (local < b_vis), other=0.0).to(tl.float32)
        if tl.sum((b_g != 0).to(tl.int32), axis=0) > 0:
            p_q = q + (o_t * H + i_h)[:, None] * K + o_k[None, :]
            b_q = tl.load(p_q, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            p_do = do + (o_t * H + i_h)[:, None] * V + o_v[None, :]
            b_do = tl.load(p_do, mask=m_t[:, None] & m_v[None, :], other=0.0)
            acc += _mm(tl.trans(b_q * b_g[:, None]), b_do, HALF_DOT, DOT)
    p_ds = ds + (i_n * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    tl.store(p_ds, (acc * scale).to(ds.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])


def work_tables(spans: list[Span], device: torch.device) -> tuple[torch.Tensor, ...]:
    """int32 tables of the launches: per token block (start, end, cache base) and per cache (its sequence's
    token span and its index in the sequence)."""
    blocks = [(t0, min(t0 + BLOCK_T, s.tok_end), s.cache_start) for s in spans
              for t0 in range(s.tok_start, s.tok_end, BLOCK_T)]
    caches = [(s.tok_start, s.tok_end, n - s.cache_start) for s in spans for n in range(s.cache_start, s.cache_end)]
    tables = []
    for rows, width in ((blocks, 3), (caches, 3)):
        t = torch.tensor(rows, dtype=torch.int32).reshape(-1, width).T.contiguous().to(device)
        tables.extend(t)
    return tuple(tables)


def _config(q: torch.Tensor, states: torch.Tensor) -> dict:
    K, V = q.shape[-1], states.shape[-1]
    half = q.dtype == states.dtype and q.dtype in HALF
    return dict(
        BT=BLOCK_T, BK=max(16, triton.next_power_of_2(K)), BV=min(64, max(16, triton.next_power_of_2(V))),
        HALF_DOT=half, DOT=HALF.get(q.dtype, tl.float32) if half else tl.float32,
    )


class TritonCachedReadout(torch.autograd.Function):
    """``o [T_all, H, V]`` from q ``[T_all, H, K]``, states ``[N_all, H, K, V]``, γ' ``[T_all, H, NW]`` (float32)
    and visible ``[T_all]`` (int32), all contiguous, with the launch ``tables`` of :func:`work_tables`."""

    @staticmethod
    def forward(ctx, q, states, gamma, visible, tables, scale):
        blk_start, blk_end, blk_base = tables[:3]
        T_all, H, K = q.shape
        V, NW = states.shape[-1], gamma.shape[-1]
        cfg = _config(q, states)
        ctx.save_for_backward(q, states, gamma, visible, *tables)
        ctx.scale = scale
        if gamma.shape[-1] == 0:  # no caches at all: nothing to read (and no pointer to hand the kernels)
            return q.new_zeros(T_all, H, V)
        o = q.new_empty(T_all, H, V)
        grid = (blk_start.numel(), H, triton.cdiv(V, cfg["BV"]))
        cached_readout_fwd_kernel[grid](
            q, states, gamma, visible, o, blk_start, blk_end, blk_base, scale, H, K, V, NW, **cfg
        )
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, states, gamma, visible, *tables = ctx.saved_tensors
        blk_start, blk_end, blk_base, c_start, c_end, c_local = tables
        do = do.contiguous()
        T_all, H, K = q.shape
        N_all, V, NW = states.shape[0], states.shape[-1], gamma.shape[-1]
        cfg = _config(q, states)
        if NW == 0:
            return torch.zeros_like(q), torch.zeros_like(states), torch.zeros_like(gamma), None, None, None
        dq, dgamma = torch.empty_like(q), torch.zeros_like(gamma)
        cached_readout_bwd_dq_kernel[(blk_start.numel(), H)](
            q, states, gamma, visible, do, dq, dgamma, blk_start, blk_end, blk_base, ctx.scale, H, K, V, NW, **cfg
        )
        dstates = torch.zeros_like(states)
        cached_readout_bwd_ds_kernel[(N_all, H, triton.cdiv(V, cfg["BV"]))](
            q, gamma, visible, do, dstates, c_start, c_end, c_local, ctx.scale, H, K, V, NW, **cfg
        )
        return dq, dstates, dgamma, None, None, None


def triton_cached_readout(
    q: torch.Tensor,
    states: torch.Tensor,
    gamma: torch.Tensor,
    visible: torch.Tensor,
    spans: list[Span],
    scale: float,
) -> torch.Tensor:
    """The readout of q ``[B, T, H, K]``, states ``[B, N, H, K, V]`` (packed: ``[1, N_total, H, K, V]``), γ'
    ``[B, T, H, NW]`` and visible ``[B, T]`` over the sequences ``spans``; ``o [B, T, H, V]`` in q's dtype."""
    B, T, H, K = q.shape
    V = states.shape[-1]
    o = TritonCachedReadout.apply(
        q.reshape(B * T, H, K).contiguous(),
        states.reshape(-1, H, K, V).contiguous(),
        gamma.float().reshape(B * T, H, gamma.shape[-1]).contiguous(),
        visible.reshape(B * T).to(torch.int32).contiguous(),
        work_tables(spans, q.device),
        scale,
    )
    return o.view(B, T, H, V)
