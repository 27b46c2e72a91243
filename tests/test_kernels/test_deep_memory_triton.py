"""deep_memory Triton kernels against the naive per-token recurrence (float64 reference).

Every case compares outputs, final states ``(W_T, S_T)`` and the gradient of every input
(q, k, v, θ, η, α, initial weights, initial momentum) by ``‖x − ref‖ / ‖ref‖``. On a CPU
session the Triton cases run in a ``TRITON_INTERPRET=1`` child process
(``test_triton_interpreted``, conftest ``run_interpreted``); on CUDA they run directly.
"""

from __future__ import annotations

import pytest
import torch

from memlm.kernels import deep_memory
from memlm.kernels.deep_memory.naive import deep_memory_naive
from memlm.kernels.deep_memory.triton.chunk import deep_memory_triton
from memlm.testing.deep_memory_cases import L1, L2, TOL32, assert_close, compare, make_inputs, rel, with_spec

CASES = {
    # name: (input kwargs, compare kwargs)
    "l1_titans_odd_T": (dict(B=2, T=37, H=2, D=16, **L1), dict()),
    "l1_linear_no_gates": (dict(B=1, T=37, H=2, D=16, momentum=False, forget=False, **L1),
                           dict(residual=False, norm=False)),
    "l1_varlen_state_per_doc": (dict(B=1, T=37, H=2, D=16, n_state=3, **L1), dict(cu_seqlens=[0, 5, 22, 37])),
    "l1_odd_chunk_odd_dim": (dict(B=1, T=23, H=1, D=24, init_momentum=False, **L1), dict(chunk_size=5)),
    "l2_titans_two_tiles": (dict(B=2, T=37, H=2, D=16, **L2), dict(block_hidden=16)),
    "l2_no_gates_no_norm": (dict(B=1, T=37, H=2, D=16, momentum=False, forget=False, **L2),
                            dict(residual=False, norm=False)),
    "l2_varlen_state_per_doc": (dict(B=1, T=37, H=1, D=16, n_state=3, **L2),
                                dict(cu_seqlens=[0, 5, 22, 37], block_hidden=16)),
    "l2_D32_T50": (dict(B=1, T=50, H=1, D=32, forget=False, **L2), dict(block_hidden=32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_naive(triton_device, name):
    inputs, options = CASES[name]
    assert_close(compare(make_inputs(**inputs), triton_device, **options), TOL32)


@pytest.mark.parametrize("cfg", [L1, L2], ids=["L1", "L2"])
def test_triton_exact_zero_gates(triton_device, cfg):
    """η = 0 and α = 1 at some tokens (products through zero): values and gradients stay exact."""
    x = make_inputs(B=1, T=37, H=1, D=16, **cfg)
    x["momentum"][0, [3, 20, 21], 0] = 0.0
    x["forget"][0, [7, 30], 0] = 1.0
    # α = 1 makes the forget-gate gradient ill-conditioned: the torch chunked path in float32
    # measures 4e-5 on this case, the Triton kernels 1.6e-5
    assert_close(compare(x, triton_device), 5e-5)


def test_triton_half_io(triton_device):
    """float16 tensors in and out (float32 inside): errors at the level of float16 rounding (~2e-4)."""
    assert_close(compare(make_inputs(B=1, T=37, H=1, D=16, **L2), triton_device, dtype=torch.float16), 1e-3)


def test_triton_inference_in_place(triton_device):
    """Without autograd the state is updated in place (no stored chunk states); the public op
    dispatches to the same kernels with backend='triton'."""
    for cfg in (L1, L2):
        x = make_inputs(B=2, T=37, H=2, D=16, **cfg)
        q, k, v, lr, mom, fg = (x[n].float().to(triton_device) for n in ("q", "k", "v", "lr", "momentum", "forget"))
        W = [w.float().to(triton_device) for w in x["weights"]]
        S = [s.float().to(triton_device) for s in x["initial_momentum"]]
        with torch.no_grad():
            o, (W_T, S_T) = deep_memory(q, k, v, lr, mom, fg, W, initial_momentum=S, output_final_state=True,
                                        backend="triton")
        ref = with_spec(deep_memory_naive, x["q"], x["k"], x["v"], x["lr"], x["momentum"], x["forget"], x["weights"],
                        initial_momentum=x["initial_momentum"], output_final_state=True)
        o_ref, (W_ref, S_ref) = ref
        assert_close({"o": rel(o, o_ref), **{f"W{i}": rel(a, b) for i, (a, b) in enumerate(zip(W_T, W_ref))},
                      **{f"S{i}": rel(a, b) for i, (a, b) in enumerate(zip(S_T, S_ref))}}, TOL32)


def test_triton_interpreted(run_interpreted):
    """CPU session: run the Triton cases above under TRITON_INTERPRET=1 in a child process."""
    code, out = run_interpreted(__file__, "triton_matches or triton_exact or triton_half or triton_inference")
    assert code == 0, out[-4000:]
    assert " passed" in out and "skipped" not in out and "failed" not in out, out[-2000:]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(activation="relu"), "activation='relu'"),
        (dict(chunk_size=65), "chunk_size must be in"),
        (dict(block_hidden=24), "block_hidden must be a power of two"),
        (dict(depth=3), "1 or 2 layers"),
        (dict(D=160), "head dim D must be in"),
    ],
)
def test_triton_rejects_unsupported(change, message):
    """What the Triton path does not implement fails before any launch (no interpreter needed)."""
    D, depth = change.pop("D", 16), change.pop("depth", 1)
    x = make_inputs(B=1, T=4, H=1, D=D, depth=depth, expansion=1)
    kw = {**dict(chunk_size=16, residual=True, norm=True, activation="gelu"), **change}
    with pytest.raises(ValueError, match=message):
        with_spec(deep_memory_triton, x["q"], x["k"], x["v"], x["lr"], x["momentum"], x["forget"], x["weights"], **kw)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [1, 32, 64])
@pytest.mark.parametrize("cfg", [L1, L2], ids=["L1", "L2"])
def test_triton_matches_naive_larger(triton_device, cfg, chunk_size):
    """More chunks, larger chunks and online GD (chunk_size=1), two heads, a batch of two."""
    T = 21 if chunk_size == 1 else 150
    x = make_inputs(B=2, T=T, H=2, D=32, **cfg)
    assert_close(compare(x, triton_device, chunk_size=chunk_size, block_hidden=32), 2e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("cfg", [L1, dict(depth=2, expansion=4)], ids=["L1", "L2x4"])
def test_triton_cuda(cfg, chunk_size, dtype, tol):
    """D = 64, expansion 4 on CUDA, float32 and bfloat16 (reference: naive float64 on the rounded inputs)."""
    x = make_inputs(B=2, T=100, H=2, D=64, **cfg)
    assert_close(compare(x, "cuda", dtype=dtype, chunk_size=chunk_size), tol)
