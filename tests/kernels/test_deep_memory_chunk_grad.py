"""The hand-written backward of the chunked deep-memory op (``chunk_function.DualFormChunks``) against
the same chunk loop differentiated by autograd, against the naive per-token recurrence, and by
finite differences; plus the dispatch between the two chunked loops."""

from __future__ import annotations

import importlib

import pytest
import torch

from memlm.kernels.deep_memory import deep_memory_chunk, deep_memory_naive

chunk_module = importlib.import_module("memlm.kernels.deep_memory.chunk")
function_module = importlib.import_module("memlm.kernels.deep_memory.chunk_function")

F64 = torch.float64
CONFIGS = {
    "titans": dict(depth=2, expansion=2, residual=True, norm=True),
    "linear": dict(depth=1, expansion=1, residual=False, norm=False),
    "deep-norm": dict(depth=3, expansion=2, residual=False, norm=True),
    "residual-only": dict(depth=2, expansion=3, residual=True, norm=False),
    "norm-only": dict(depth=1, expansion=1, residual=False, norm=True),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(B, T, H, D, *, depth, expansion, n_state=None, momentum=True, dtype=F64, **_):
    """q, k, v ``[B, T, H, D]``, gates θ ∈ [0, .5], η ∈ [0, 1], α ∈ [0, .3], weights and momentum
    (``[H, …]`` shared, or ``[n_state, H, …]``), all leaves requiring grad."""
    q, k, v = (torch.randn(B, T, H, D, dtype=dtype) for _ in range(3))
    gates = [torch.rand(B, T, H, dtype=dtype) * s for s in (0.5, 1.0, 0.3)]
    dims = [D] + [expansion * D] * (depth - 1) + [D]
    lead = (H,) if n_state is None else (n_state, H)
    weights = [torch.randn(*lead, a, b, dtype=dtype) / a**0.5 for a, b in zip(dims, dims[1:])]
    s0 = [0.1 * torch.randn_like(w) for w in weights] if momentum else None
    leaves = [q, k, v, *gates, *weights, *(s0 or [])]
    for t in leaves:
        t.requires_grad_()
    return dict(args=(q, k, v, *gates, weights), s0=s0, leaves=leaves)


def outputs_and_grads(op, x, seed=1, **kw):
    """Output, final states and the gradients of every leaf for one random cotangent."""
    o, (W, S) = op(*x["args"], initial_momentum=x["s0"], output_final_state=True, **kw)
    flat = [o, *W, *S]
    gen = torch.Generator().manual_seed(seed)
    cot = [torch.randn(t.shape, dtype=F64, generator=gen).to(t.dtype) for t in flat]
    return flat, torch.autograd.grad(flat, x["leaves"], cot)


def autograd_path(monkeypatch):
    """Route deep_memory_chunk through the autograd chunk loop for the rest of the test."""
    monkeypatch.setattr(chunk_module, "hand_written_backward", lambda *args: False)


def assert_close(a, b, tol):
    (fa, ga), (fb, gb) = a, b
    assert len(ga) == len(gb)
    for u, w in zip([*fa, *ga], [*fb, *gb]):
        assert rel(u, w) < tol


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T,chunk_size", [(11, 4), (8, 8), (7, 1)])
def test_matches_autograd_loop(monkeypatch, name, T, chunk_size):
    cfg = CONFIGS[name]
    x = make_inputs(2, T, 2, 4, **cfg)
    kw = dict(chunk_size=chunk_size, residual=cfg["residual"], norm=cfg["norm"])
    manual = outputs_and_grads(deep_memory_chunk, x, **kw)
    autograd_path(monkeypatch)
    assert_close(manual, outputs_and_grads(deep_memory_chunk, x, **kw), 1e-10)


@pytest.mark.parametrize("momentum", [True, False], ids=["S0", "no-S0"])
def test_varlen_per_sequence_state_matches_autograd_loop(monkeypatch, momentum):
    cfg = CONFIGS["titans"]
    x = make_inputs(1, 14, 2, 4, **cfg, n_state=4, momentum=momentum)
    kw = dict(chunk_size=4, cu_seqlens=torch.tensor([0, 3, 9, 10, 14]))
    manual = outputs_and_grads(deep_memory_chunk, x, **kw)
    autograd_path(monkeypatch)
    assert_close(manual, outputs_and_grads(deep_memory_chunk, x, **kw), 1e-10)


@pytest.mark.parametrize("name", ["titans", "linear"])
def test_matches_naive(name):
    """Outputs, final states and all input gradients against the per-token recurrence (the definition)."""
    cfg = CONFIGS[name]
    x = make_inputs(1, 13, 2, 4, **cfg, n_state=3)
    kw = dict(
        chunk_size=3, residual=cfg["residual"], norm=cfg["norm"], cu_seqlens=torch.tensor([0, 2, 7, 13])
    )
    assert_close(
        outputs_and_grads(deep_memory_chunk, x, **kw), outputs_and_grads(deep_memory_naive, x, **kw), 1e-10
    )


def test_float32_matches_float64_naive():
    cfg = CONFIGS["titans"]
    x64 = make_inputs(2, 37, 2, 16, **cfg)
    x32 = {
        "args": (*[t.detach().float().requires_grad_() for t in x64["args"][:6]],
                 [w.detach().float().requires_grad_() for w in x64["args"][6]]),
        "s0": [s.detach().float().requires_grad_() for s in x64["s0"]],
    }  # fmt: skip
    x32["leaves"] = [*x32["args"][:6], *x32["args"][6], *x32["s0"]]
    (f32, g32), (f64, g64) = (
        outputs_and_grads(deep_memory_chunk, x32, chunk_size=8),
        outputs_and_grads(deep_memory_naive, x64, chunk_size=8),
    )
    for u, w in zip([*f32, *g32], [*f64, *g64]):
        assert u.dtype == torch.float32
        assert rel(u.double(), w) < 1e-4


@pytest.mark.parametrize("name", ["titans", "deep-norm"])
def test_gradcheck(name):
    """Finite differences of every input through the hand-written backward (tiny, float64)."""
    cfg = CONFIGS[name]
    x = make_inputs(1, 5, 1, 2, **cfg)
    n_w = cfg["depth"]

    def fn(q, k, v, lr, eta, alpha, *state):
        o, (W, S) = deep_memory_chunk(
            q, k, v, lr, eta, alpha, list(state[:n_w]), initial_momentum=list(state[n_w:]), chunk_size=2,
            residual=cfg["residual"], norm=cfg["norm"], output_final_state=True,
        )  # fmt: skip
        return o, *W, *S

    assert torch.autograd.gradcheck(fn, tuple(x["leaves"]), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_dispatch():
    """The hand-written backward serves ℓ2 / identity retention with an activation it differentiates
    twice; every other hook goes through the autograd loop."""
    assert chunk_module.hand_written_backward("l2", "none", "gelu")
    for bias, retention in [
        ("lp", "none"),
        ("huber", "none"),
        ("dot", "none"),
        ("l2", "lq_norm"),
        ("l2", "softmax"),
    ]:
        assert not chunk_module.hand_written_backward(bias, retention, "gelu")
    assert not chunk_module.hand_written_backward("l2", "none", "relu")


def test_gelu_second_derivative():
    z = torch.linspace(-4, 4, 101, dtype=F64, requires_grad=True)
    (first,) = torch.autograd.grad(torch.nn.functional.gelu(z).sum(), z, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), z)
    assert rel(function_module.gelu_second(z.detach()), second) < 1e-12
