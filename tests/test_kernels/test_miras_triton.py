"""Miras hooks in the Triton deep-memory kernels (arXiv 2504.13173): every attentional bias ψ and retention
map against the naive per-token recurrence (float64 reference on the float32-rounded inputs).

Each case compares outputs, final states and the gradients of q, k, v, θ, η, α, δ, the initial weights
and the initial momentum by ``‖x − ref‖ / ‖ref‖`` (helpers of ``test_deep_memory_triton``). L = 1: three
packed documents of lengths 5, 8, 10 with chunk 4 (sequences ending in a partial and in a full chunk: only
a full chunk's last row reads through the exact ``R(A_end)``) and a state per document; L = 2: a batch of
two sharing the initial state, T = 21 with chunk 8, two hidden tiles; for lq also D = 12 (padded tiles, a partial
hidden tile) and its device functions against autograd of ``lq_retention``. On a CPU session the Triton cases run in a
``TRITON_INTERPRET=1`` child process (``test_miras_triton_interpreted``); on CUDA they run directly.
"""

from __future__ import annotations

import sys

import pytest
import torch
import triton
import triton.language as tl

from memlm.kernels import deep_memory
from memlm.kernels.deep_memory import MemorySpec, deep_memory_chunk, deep_memory_naive, select_path
from memlm.kernels.deep_memory.objectives import lq_retention
from memlm.kernels.deep_memory.triton.chunk import deep_memory_triton
from memlm.kernels.deep_memory.triton.retention import (
    fresh_columns,
    inner_partial,
    norm_partial,
    retention_apply,
    retention_map,
    retention_map_vjp,
    retention_vjp,
)
from memlm.testing.deep_memory_cases import L1, L2, assert_close, compare, make_inputs, rel, with_spec

VARIANTS = {
    # name: hooks, with parameters away from their defaults where the value matters
    "lp": dict(bias="lp", bias_params={"p": 3.0, "nu": 4.0, "eps": 1e-3}),
    "huber": dict(bias="huber"),  # δ ∈ [0, 8]; ‖e‖ at the initial weights ~ 4.5–7: both branches
    "dot": dict(bias="dot"),
    "l2_clip": dict(bias="l2_clip", bias_params={"max_norm": 11.0}),  # about half the keys clipped
    "lq": dict(retention="lq", retention_params={"q": 3.0, "eps": 1e-4}),
    "lq_norm": dict(retention="lq_norm", retention_params={"q": 3.0}),
    "softmax": dict(retention="softmax", retention_params={"c": 2.0}),
    "max_norm": dict(retention="max_norm", retention_params={"c": 14.0}),  # chunk-end ‖A‖_F 9–37: both branches
    "moneta": dict(bias="lp", retention="lq_norm"),  # the paper's p = 3, q = 4 (defaults)
    "moneta_lq": dict(bias="lp", retention="lq"),  # Moneta's preset: ℓq mirror map, q = 4, ε = 1e-6 (defaults)
    "clip_capped": dict(bias="l2_clip", retention="max_norm"),  # both Titans safeguards (defaults)
}
OPTIONS = {1: dict(chunk_size=4, cu_seqlens=[0, 5, 13, 23]), 2: dict(chunk_size=8, block_hidden=16)}
# float32 kernels vs the float64 reference: measured ≤ 2.1e-5 (softmax, L = 2, ∂k), ≤ 5e-6 for the others
TOL = 5e-5
# lq at q = 4, ε = 1e-6 (slope ~ s^{-1/3}, up to 100 near zero entries) with the ℓp bias: the recurrence's gradients
# amplify float32 rounding. Measured ≤ 7.7e-5 (L = 1) and ≤ 2.1e-4 (L = 2, ∂W_1), the torch chunked path in float32
# 5.3e-4 and 7.7e-4 on the same cases; the outputs and final states ≤ 2e-6
TOLS = {"moneta_lq": 5e-4}


def inputs(variant: str, cfg: dict, **shape) -> dict:
    """The inputs of one case (default shapes: those of ``OPTIONS``); softmax retention takes positive
    weights and smaller steps θ ∈ [0, .1] (larger logit steps saturate the softmax and the recurrence
    amplifies rounding)."""
    shape = shape or (dict(B=1, T=23, H=2, D=16, n_state=3) if cfg is L1 else dict(B=2, T=21, H=1, D=16))
    x = make_inputs(**shape, **cfg, delta=VARIANTS[variant].get("bias") == "huber")
    if VARIANTS[variant].get("retention") == "softmax":
        x["weights"] = [w.abs() + 0.1 for w in x["weights"]]
        x["lr"] = 0.2 * x["lr"]
    return x


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cfg", [L1, L2], ids=["L1", "L2"])
def test_miras_triton_matches_naive(triton_device, variant, cfg):
    errors = compare(inputs(variant, cfg), triton_device, **OPTIONS[cfg["depth"]], **VARIANTS[variant])
    assert_close(errors, TOLS.get(variant, TOL))


@pytest.mark.parametrize("cfg", [L1, L2], ids=["L1", "L2"])
def test_miras_triton_matches_naive_padded(triton_device, cfg):
    """lq with D = 12: every tile is padded to 16 (the mean runs over the ``n = d_in·d_out`` entries of the layer,
    not the tile; a padded entry would add ε^{r/2} ≈ 1e-3); L = 2: hidden width 24 in a full and a partial tile
    of 16."""
    shape = dict(B=1, T=23, H=2, D=12, n_state=3) if cfg is L1 else dict(B=2, T=21, H=1, D=12)
    errors = compare(inputs("lq", cfg, **shape), triton_device, **OPTIONS[cfg["depth"]], **VARIANTS["lq"])
    assert_close(errors, TOL)


@triton.jit
def _lq_kernel(A_ptr, G_ptr, W_ptr, GA_ptr, R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
               TILED: tl.constexpr, PARAMS: tl.constexpr):
    """``W = R(A)`` and ``J_R(A)ᵀ g`` of ``lq`` on an ``[R, C]`` matrix: one padded tile, or (``TILED``) column
    tiles of ``BC`` whose statistics are summed first (as the L = 2 kernels do)."""
    o_r = tl.arange(0, BR)
    if TILED:
        total = tl.zeros([], tl.float32)
        inner = tl.zeros([], tl.float32)
        for j in range(tl.cdiv(C, BC)):
            o_c = j * BC + tl.arange(0, BC)
            mask = (o_r < R)[:, None] & (o_c < C)[None, :]
            A = tl.load(A_ptr + o_r[:, None] * C + o_c[None, :], mask=mask, other=0.0)
            total += norm_partial(A, "lq", PARAMS)
            inner += inner_partial(A, tl.load(G_ptr + o_r[:, None] * C + o_c[None, :], mask=mask, other=0.0), "lq",
                                   PARAMS)
    for j in range(tl.cdiv(C, BC)):
        o_c = j * BC + tl.arange(0, BC)
        mask = (o_r < R)[:, None] & (o_c < C)[None, :]
        off = o_r[:, None] * C + o_c[None, :]
        A = tl.load(A_ptr + off, mask=mask, other=0.0)
        g = tl.load(G_ptr + off, mask=mask, other=0.0)
        if TILED:
            m, s = fresh_columns(BC)
            W = retention_apply(A, mask, total, m, s, "lq", PARAMS)
            gA = retention_vjp(A, W, g, total, inner, m, "lq", PARAMS)
        else:
            W = retention_map(A, mask, "lq", PARAMS)
            gA = retention_map_vjp(A, W, g, "lq", PARAMS)
        tl.store(W_ptr + off, W, mask=mask)
        tl.store(GA_ptr + off, gA, mask=mask)


@pytest.mark.parametrize("q, eps, scale", [(4.0, 1e-6, 1.0), (3.0, 1e-3, 0.01), (1.5, 1e-6, 3.0), (6.0, 1e-6, 2e-3)])
def test_miras_triton_matches_lq_map(triton_device, q, eps, scale):
    """The lq device functions against torch autograd of ``lq_retention`` (float64): a padded ``[12, 12]`` tile and a
    ``[5, 40]`` matrix in column tiles of 16 (the last one partial), with zero rows and columns."""
    g = torch.Generator().manual_seed(0)
    for R, C, BR, BC, tiled in [(12, 12, 16, 16, False), (5, 40, 8, 16, True)]:
        A = scale * torch.randn(R, C, generator=g, dtype=torch.float64)
        A[0], A[:, 1] = 0.0, 0.0
        A, G = A.float(), torch.randn(R, C, generator=g).float()
        W, gA = torch.empty_like(A), torch.empty_like(A)
        _lq_kernel[(1,)](*(t.to(triton_device) for t in (A, G, W, gA)), R, C, BR, BC, tiled, (q, eps, float(R * C)))
        a = A.double().requires_grad_()
        W_ref = lq_retention(a, q=q, eps=eps)
        (gA_ref,) = torch.autograd.grad(W_ref, a, G.double())
        assert_close({"W": rel(W, W_ref), "gA": rel(gA, gA_ref)}, 2e-6)


@pytest.mark.parametrize("variant", ["softmax", "moneta", "max_norm", "moneta_lq"])
def test_miras_triton_inference_in_place(triton_device, variant):
    """Without autograd the state is updated in one slot per sequence (the L = 2 kernel keeps the weights
    ``R(A)`` in a slot of their own); the public op dispatches to the kernels with backend='triton'."""
    for cfg in (L1, L2):
        x = inputs(variant, cfg)
        opts = dict(OPTIONS[cfg["depth"]])
        opts.pop("block_hidden", None)
        cu = opts.pop("cu_seqlens", None)
        args = [x[n] for n in ("q", "k", "v", "lr", "momentum", "forget")]
        kw = dict(output_final_state=True, **opts, **VARIANTS[variant])
        with torch.no_grad():
            o, (W, S) = deep_memory(
                *(t.float().to(triton_device) for t in args), [w.float().to(triton_device) for w in x["weights"]],
                initial_momentum=[s.float().to(triton_device) for s in x["initial_momentum"]],
                cu_seqlens=None if cu is None else torch.tensor(cu, device=triton_device), backend="triton", **kw,
            )  # fmt: skip
        o_ref, (W_ref, S_ref) = with_spec(
            deep_memory_naive, *args, x["weights"], initial_momentum=x["initial_momentum"],
            cu_seqlens=None if cu is None else torch.tensor(cu), **kw,
        )  # fmt: skip
        errors = {"o": rel(o, o_ref)}
        errors.update({f"W{i}": rel(a, b) for i, (a, b) in enumerate(zip(W, W_ref))})
        errors.update({f"S{i}": rel(a, b) for i, (a, b) in enumerate(zip(S, S_ref))})
        assert_close(errors, TOLS.get(variant, TOL))


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [1, 32])
@pytest.mark.parametrize("variant", ["moneta", "softmax", "huber", "clip_capped"])
def test_miras_triton_larger(triton_device, variant, chunk_size):
    """Online GD (chunk_size=1: every row closes a chunk) and longer chunks; two heads, D = 32, L = 2."""
    x = inputs(variant, L2, B=2, T=9 if chunk_size == 1 else 100, H=2, D=32)
    assert_close(compare(x, triton_device, chunk_size=chunk_size, block_hidden=32, **VARIANTS[variant]), 2e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cfg", [L1, dict(depth=2, expansion=4)], ids=["L1", "L2x4"])
def test_miras_triton_cuda(variant, cfg):
    """D = 64, expansion 4 on CUDA in float32 (reference: naive float64 on the rounded inputs)."""
    x = inputs(variant, cfg, B=2, T=100, H=2, D=64)
    assert_close(compare(x, "cuda", chunk_size=16, **VARIANTS[variant]), max(1e-4, 2 * TOLS.get(variant, 0.0)))


def test_miras_triton_interpreted(run_interpreted):
    """CPU session: run the Triton cases above under TRITON_INTERPRET=1 in a child process."""
    code, out = run_interpreted(__file__, "miras_triton_matches or miras_triton_inference")
    assert code == 0, out[-4000:]
    assert " passed" in out and "skipped" not in out and "failed" not in out, out[-2000:]


def _only_titans_on_triton(monkeypatch):
    """Make ``auto`` resolve to Triton here (as on CUDA) and the kernels implement ℓ2/none only."""
    module = sys.modules["memlm.kernels.deep_memory"]
    monkeypatch.setattr(module, "resolve_backend", lambda backend, ref: "triton")
    monkeypatch.setattr(module, "TRITON_HOOKS", (("l2", "none"),))


def test_auto_falls_back_for_pairs_triton_lacks(monkeypatch):
    """A (bias, retention) pair outside ``TRITON_HOOKS`` runs on the torch chunked path under ``auto``."""
    _only_titans_on_triton(monkeypatch)
    x = inputs("moneta", L2)
    args = [x[n] for n in ("q", "k", "v", "lr", "momentum", "forget")] + [x["weights"]]
    kw = dict(chunk_size=8, output_final_state=True, **VARIANTS["moneta"])
    o, (W, S) = deep_memory(*args, **kw)
    o_ref, (W_ref, S_ref) = with_spec(deep_memory_chunk, *args, loop="autograd", **kw)
    for a, b in zip([o, *W, *S], [o_ref, *W_ref, *S_ref]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_triton_rejects_pairs_it_lacks(monkeypatch):
    """backend='triton' with a pair outside ``TRITON_HOOKS`` raises, listing the supported pairs."""
    _only_titans_on_triton(monkeypatch)
    x = inputs("softmax", L2)
    args = [x[n].float() for n in ("q", "k", "v", "lr", "momentum", "forget")]
    with pytest.raises(ValueError, match=r"backend='triton' implements bias='l2' with retention in \('none',\); "
                                         r"got bias='l2', retention='softmax'"):
        deep_memory(*args, [w.float() for w in x["weights"]], backend="triton", **VARIANTS["softmax"])


def test_triton_takes_lq(monkeypatch):
    """backend='triton' runs retention='lq' (with any bias) instead of rejecting it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.zeros(1, 2, 1, 4)
    for bias in ("l2", "lp"):
        assert select_path("triton", q, MemorySpec(bias=bias, retention="lq")) == "triton"


@pytest.mark.parametrize("gate", ["forget", "delta"])
def test_triton_path_rejects_channel_wise_gates(gate):
    """Called directly, the Triton path rejects channel-wise gates (the public op routes them to torch)
    before any launch."""
    x = inputs("huber", L2)
    x[gate] = x[gate][..., None].expand(*x[gate].shape, 16)
    args = [x[n] for n in ("q", "k", "v", "lr", "momentum", "forget")]
    message = rf"{gate}: the Triton path takes per-head gates \[B, T, H\], got \[2, 21, 1, 16\]"
    with pytest.raises(ValueError, match=message):
        with_spec(deep_memory_triton, *args, x["weights"], chunk_size=8, delta=x["delta"], **VARIANTS["huber"])
