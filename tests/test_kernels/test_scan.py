"""linear_scan: torch and Triton paths against the per-step loop, forward and every gradient."""

from __future__ import annotations

import pytest
import torch

from memlm.kernels import linear_scan


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x − ref|| / ||ref|| (the plain norm of x when ref is exactly zero)."""
    den = ref.norm()
    return ((x - ref).norm() / (den if den > 0 else 1.0)).item()


def _inputs(B: int, T: int, rest: tuple[int, ...], dtype: torch.dtype, device: str = "cpu"):
    """Coefficients with exact zeros (resets) and negative values, as the scan must allow."""
    a = torch.randn(B, T, *rest, dtype=dtype)
    a[:, 2::5] = 0.0
    x = torch.randn(B, T, *rest, dtype=dtype)
    h0 = torch.randn(B, *rest, dtype=dtype)
    return [t.to(device) for t in (a, x, h0)]


def _run(backend: str, a, x, h0, reverse: bool, weight: torch.Tensor):
    """h and the gradients of <h, weight> with respect to a, x and h0 (when given)."""
    leaves = [t.detach().clone().requires_grad_() for t in (a, x, h0) if t is not None]
    init = leaves[2] if h0 is not None else None
    h = linear_scan(leaves[0], leaves[1], initial=init, reverse=reverse, backend=backend)
    grads = torch.autograd.grad((h * weight).sum(), leaves)
    return h.detach(), grads


def _check(backend: str, B: int, T: int, rest, reverse: bool, with_init: bool, dtype, device, tol: float):
    a, x, h0 = _inputs(B, T, rest, dtype, device)
    h0 = h0 if with_init else None
    w = torch.randn_like(x)
    h, grads = _run(backend, a, x, h0, reverse, w)
    h_ref, grads_ref = _run("naive", a, x, h0, reverse, w)
    assert h.dtype == x.dtype and h.shape == x.shape
    assert rel(h, h_ref) < tol
    for name, g, g_ref in zip(("a", "x", "initial"), grads, grads_ref):
        assert rel(g, g_ref) < tol, name


@pytest.mark.parametrize("T", [1, 37, 130])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("rest", [(), (3, 2)])
@pytest.mark.parametrize("with_init", [False, True])
def test_torch_matches_naive(T, reverse, rest, with_init):
    _check("torch", 2, T, rest, reverse, with_init, torch.float64, "cpu", 1e-12)


@pytest.mark.parametrize("T", [1, 45, 70])
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_matches_naive(triton_device, T, reverse):
    """Several time tiles (BLOCK_T = 32), the last one ragged."""
    _check("triton", 2, T, (5,), reverse, True, torch.float32, triton_device, 1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_triton_feature_blocks(triton_device, reverse):
    """F = 70 features span two feature blocks (BF = 64)."""
    _check("triton", 1, 5, (7, 10), reverse, True, torch.float32, triton_device, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_cuda_long(dtype, tol):
    """Compiled kernels over many tiles and feature blocks, against the float64 reference."""
    a, x, h0 = _inputs(3, 4099, (8, 96), torch.float64)
    a = a.clamp(-1.0, 1.0)
    w = torch.randn_like(x)
    h, grads = _run("triton", *(t.to("cuda", dtype) for t in (a, x, h0)), False, w.to("cuda", dtype))
    h_ref, grads_ref = _run("torch", a, x, h0, False, w)
    assert rel(h.double().cpu(), h_ref) < tol
    for g, g_ref in zip(grads, grads_ref):
        assert rel(g.double().cpu(), g_ref) < tol


def test_triton_without_initial(triton_device):
    _check("triton", 1, 33, (3,), False, False, torch.float32, triton_device, 1e-5)


def test_zero_coefficient_resets_exactly():
    """a_t = 0 makes h_t = x_t exactly, whatever came before (no log-space or division tricks)."""
    a = torch.full((1, 200, 4), -1.5, dtype=torch.float64)
    a[:, 100] = 0.0
    x = torch.randn(1, 200, 4, dtype=torch.float64)
    h0 = torch.full((1, 4), 1e3, dtype=torch.float64)
    h = linear_scan(a, x, initial=h0, backend="torch")
    assert torch.equal(h[:, 100], x[:, 100])
    assert rel(h, linear_scan(a, x, initial=h0, backend="naive")) < 1e-12


def test_mixed_dtypes_are_promoted():
    a, x, h0 = _inputs(2, 30, (4,), torch.float64)
    h = linear_scan(a.float(), x.bfloat16(), initial=h0, backend="torch")
    assert h.dtype == torch.float32
    ref = linear_scan(a.float().double(), x.bfloat16().double(), initial=h0.float().double(), backend="naive")
    assert rel(h, ref) < 1e-6


def test_reduced_precision_accumulates_in_float32():
    a, x, h0 = _inputs(2, 50, (8,), torch.float64)
    ref = linear_scan(a, x, initial=h0, backend="naive")
    h = linear_scan(a.bfloat16(), x.bfloat16(), initial=h0.bfloat16(), backend="torch")
    assert h.dtype == torch.bfloat16
    assert rel(h.double(), ref) < 2e-2


A, X = torch.ones(2, 5, 3), torch.ones(2, 5, 3)
BAD_INPUTS = [
    ({"a": A, "x": torch.ones(5)}, "x must be a floating-point tensor"),
    ({"a": A, "x": X.long()}, "x must be a floating-point"),
    ({"a": torch.ones(2, 0, 3), "x": torch.ones(2, 0, 3)}, "x must be non-empty"),
    ({"a": torch.ones(2, 5, 4), "x": X}, r"a must have shape \[B, T, \*\]"),
    ({"a": A, "x": X, "initial": torch.ones(2, 4)}, r"initial must have shape \[B, \*\] = \[2, 3\]"),
    ({"a": A.long(), "x": X}, "a must be a floating-point tensor"),
    ({"a": A, "x": X, "reverse": 1}, "reverse must be a bool"),
    ({"a": A, "x": X, "backend": "cuda"}, "backend='cuda' is not one of"),
    ({"a": A, "x": X, "backend": "triton"}, "needs CUDA tensors"),
]


@pytest.mark.parametrize("kwargs, match", BAD_INPUTS)
def test_bad_inputs(kwargs, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a, x = kwargs.pop("a"), kwargs.pop("x")
    with pytest.raises(ValueError, match=match):
        linear_scan(a, x, **kwargs)


def test_triton_interpreted(interpreted_outcomes):
    """The Triton cases of this file, run on CPU in the TRITON_INTERPRET=1 child (conftest)."""
    outcomes, out = interpreted_outcomes(__file__)
    assert outcomes, "no Triton case collected"
    failed = [i for i, o in outcomes.items() if o != "PASSED"]
    assert not failed, f"{failed}\n{out[-4000:]}"
