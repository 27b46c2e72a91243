"""The hand-written backward of the chunked deep-memory op (``pytorch/dual_form.py``: ``DualFormChunks``) against
the same chunk loop differentiated by autograd, against the naive per-token recurrence, and by
finite differences; plus the choice between the chunked loops (``select_path``). The hand-written loop runs in two
implementations, compiled (``cpu/dual_form.cpp``, path ``cpu``) and PyTorch (path ``hand_written``): the ``loop``
fixture runs a test with each."""

from __future__ import annotations

import math
import shutil
from functools import partial

import pytest
import torch
import torch.utils.cpp_extension

from memlm.kernels import deep_memory
from memlm.kernels.deep_memory import MemorySpec, deep_memory_chunk, deep_memory_naive, select_path
from memlm.kernels.deep_memory.cpu import loader
from memlm.kernels.deep_memory.pytorch.dual_form import gelu_second, implements
from memlm.testing.deep_memory_cases import with_spec

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
    o, (W, S) = with_spec(op, *x["args"], initial_momentum=x["s0"], output_final_state=True, **kw)
    flat = [o, *W, *S]
    gen = torch.Generator().manual_seed(seed)
    cot = [torch.randn(t.shape, dtype=F64, generator=gen).to(t.dtype) for t in flat]
    return flat, torch.autograd.grad(flat, x["leaves"], cot)


@pytest.fixture(params=["cpu", "hand_written"])
def loop(request):
    """The chunked op with the compiled CPU loop (where a C++ compiler exists: then it must build) and with the
    PyTorch loop, both with the hand-written backward."""
    if request.param == "cpu":
        require_kernel()
    return partial(deep_memory_chunk, loop=request.param)


def require_kernel() -> None:
    """Skip without a C++ compiler; with one, the compiled CPU kernel must build (and serve the op)."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler to build the CPU kernel")
    assert select_path("torch", torch.zeros(1, dtype=F64), MemorySpec()) == "cpu"


autograd_loop = partial(deep_memory_chunk, loop="autograd")  # the same chunks differentiated by autograd


def assert_close(a, b, tol):
    (fa, ga), (fb, gb) = a, b
    assert len(ga) == len(gb)
    for u, w in zip([*fa, *ga], [*fb, *gb]):
        assert rel(u, w) < tol


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T,chunk_size", [(11, 4), (8, 8), (7, 1)])
def test_matches_autograd_loop(loop, name, T, chunk_size):
    cfg = CONFIGS[name]
    x = make_inputs(2, T, 2, 4, **cfg)
    kw = dict(chunk_size=chunk_size, residual=cfg["residual"], norm=cfg["norm"])
    assert_close(outputs_and_grads(loop, x, **kw), outputs_and_grads(autograd_loop, x, **kw), 1e-10)


@pytest.mark.parametrize("momentum", [True, False], ids=["S0", "no-S0"])
def test_varlen_per_sequence_state_matches_autograd_loop(loop, momentum):
    cfg = CONFIGS["titans"]
    x = make_inputs(1, 14, 2, 4, **cfg, n_state=4, momentum=momentum)
    kw = dict(chunk_size=4, cu_seqlens=torch.tensor([0, 3, 9, 10, 14]))
    assert_close(outputs_and_grads(loop, x, **kw), outputs_and_grads(autograd_loop, x, **kw), 1e-10)


@pytest.mark.parametrize("name", ["titans", "linear"])
def test_matches_naive(loop, name):
    """Outputs, final states and all input gradients against the per-token recurrence (the definition)."""
    cfg = CONFIGS[name]
    x = make_inputs(1, 13, 2, 4, **cfg, n_state=3)
    kw = dict(
        chunk_size=3, residual=cfg["residual"], norm=cfg["norm"], cu_seqlens=torch.tensor([0, 2, 7, 13])
    )
    assert_close(
        outputs_and_grads(loop, x, **kw), outputs_and_grads(deep_memory_naive, x, **kw), 1e-10
    )


@pytest.mark.parametrize("T", [13, 3])
def test_without_a_backward_no_tape_and_the_same_outputs(loop, T):
    """Under ``no_grad`` the loop keeps no tape (the compiled one a two-chunk workspace, the PyTorch one nothing)
    and returns the outputs and final states of a differentiable call, bit for bit."""
    x = make_inputs(1, T, 2, 4, **CONFIGS["titans"], n_state=2)
    kw = dict(chunk_size=3, output_final_state=True, cu_seqlens=torch.tensor([0, T // 2, T]))
    o, (W, S) = with_spec(loop, *x["args"], initial_momentum=x["s0"], **kw)
    assert o.grad_fn is not None
    with torch.no_grad():
        o_ng, (W_ng, S_ng) = with_spec(loop, *x["args"], initial_momentum=x["s0"], **kw)
    assert o_ng.grad_fn is None
    for a, b in zip([o, *W, *S], [o_ng, *W_ng, *S_ng]):
        assert torch.equal(a.detach(), b)


def test_the_compiled_loop_keeps_a_tape_only_when_a_backward_can_follow(monkeypatch):
    """The compiled kernel is asked for its tape (pooled, kept until the backward) only with grad mode on and an
    input requiring grad; otherwise it runs in a workspace freed on return."""
    require_kernel()
    from memlm.kernels.deep_memory.cpu import function

    kernel, asked = loader.load(), []

    class Recording:
        def forward(self, *args):
            asked.append(args[-1])
            return kernel.forward(*args)

        def __getattr__(self, name):
            return getattr(kernel, name)

    monkeypatch.setattr(function, "load", lambda: Recording())
    x = make_inputs(1, 7, 2, 4, **CONFIGS["titans"])
    kw = dict(chunk_size=3, output_final_state=True, loop="cpu")
    with_spec(deep_memory_chunk, *x["args"], initial_momentum=x["s0"], **kw)
    with torch.no_grad():
        with_spec(deep_memory_chunk, *x["args"], initial_momentum=x["s0"], **kw)
    detached = [a.detach() if isinstance(a, torch.Tensor) else [w.detach() for w in a] for a in x["args"]]
    with_spec(deep_memory_chunk, *detached, **kw)
    assert asked == [True, False, False]


def as_float32(x: dict) -> dict:
    """The inputs of :func:`make_inputs` in float32, fresh leaves."""
    cast = [t.detach().float().requires_grad_() for t in x["leaves"]]
    n_w = len(x["args"][6])
    s0 = cast[6 + n_w :] if x["s0"] is not None else None
    return dict(args=(*cast[:6], cast[6 : 6 + n_w]), s0=s0, leaves=cast)


def test_float32_matches_float64_naive(loop):
    cfg = CONFIGS["titans"]
    x64 = make_inputs(2, 37, 2, 16, **cfg)
    x32 = as_float32(x64)
    (f32, g32), (f64, g64) = (
        outputs_and_grads(loop, x32, chunk_size=8),
        outputs_and_grads(deep_memory_naive, x64, chunk_size=8),
    )
    for u, w in zip([*f32, *g32], [*f64, *g64]):
        assert u.dtype == torch.float32
        assert rel(u.double(), w) < 1e-4


@pytest.mark.parametrize("name", ["titans", "deep-norm"])
def test_gradcheck(loop, name):
    """Finite differences of every input through the hand-written backward (tiny, float64). The step is 1e-5:
    the LayerNorm over D = 2 features makes the outputs ill-conditioned, and at 1e-6 round-off (about 1e-13 in
    outputs of size 8) already costs 1e-7 in the difference quotient, the test's tolerance."""
    cfg = CONFIGS[name]
    x = make_inputs(1, 5, 1, 2, **cfg)
    n_w = cfg["depth"]

    def fn(q, k, v, lr, eta, alpha, *state):
        o, (W, S) = with_spec(
            loop, q, k, v, lr, eta, alpha, list(state[:n_w]), initial_momentum=list(state[n_w:]), chunk_size=2,
            residual=cfg["residual"], norm=cfg["norm"], output_final_state=True,
        )  # fmt: skip
        return o, *W, *S

    assert torch.autograd.gradcheck(fn, tuple(x["leaves"]), eps=1e-5, atol=1e-7, rtol=1e-5)


def test_dispatch():
    """The hand-written backward serves ℓ2 / identity retention with an activation it differentiates
    twice; every other hook goes through the autograd loop."""
    assert implements(MemorySpec(), channel_wise=False)
    q = torch.zeros(1, dtype=F64)
    for bias, retention in [
        ("lp", "none"),
        ("huber", "none"),
        ("dot", "none"),
        ("l2", "lq_norm"),
        ("l2", "softmax"),
    ]:
        spec = MemorySpec(bias=bias, retention=retention)
        assert not implements(spec, channel_wise=False)
        assert select_path("torch", q, spec) == select_path("auto", q, spec) == "autograd"
    assert not implements(MemorySpec(activation="relu"), channel_wise=False)
    assert select_path("naive", q, MemorySpec()) == "naive"


def test_gelu_second_derivative():
    z = torch.linspace(-4, 4, 101, dtype=F64, requires_grad=True)
    (first,) = torch.autograd.grad(torch.nn.functional.gelu(z).sum(), z, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), z)
    assert rel(gelu_second(z.detach()), second) < 1e-12


@pytest.mark.parametrize("name", ["titans", "deep-norm", "linear"])
def test_compiled_loop_matches_torch_loop(name):
    """The compiled loop against the PyTorch loop at the mixers' chunk size (16), odd length, two heads: in float64
    to round-off; in float32 its errors against the float64 result are no larger than the PyTorch loop's. One
    rounding early in the recurrence sets a whole run's errors, so the ratio is a geometric mean over 6 inputs and
    all outputs and gradients: ≤ 1.5, none above 10× (the measured ratios: BENCHMARKS.md §3, "Titans LMM mixer vs
    titans-pytorch", Accuracy)."""
    require_kernel()
    cfg = CONFIGS[name]
    kw = dict(chunk_size=16, residual=cfg["residual"], norm=cfg["norm"])
    log_ratios = []
    for _ in range(6):
        x = make_inputs(2, 53, 2, 8, **cfg)
        run = lambda inputs, loop: outputs_and_grads(deep_memory_chunk, inputs, loop=loop, **kw)  # noqa: E731
        compiled, compiled32 = run(x, "cpu"), run(as_float32(x), "cpu")
        reference, reference32 = run(x, "hand_written"), run(as_float32(x), "hand_written")
        assert_close(compiled, reference, 1e-11)
        for ours, theirs, exact in zip(*([*r[0], *r[1]] for r in (compiled32, reference32, reference))):
            assert ours.dtype == torch.float32
            error, reference_error = rel(ours.double(), exact), rel(theirs.double(), exact)
            assert error <= 10 * reference_error + 1e-6
            log_ratios.append(math.log(error / reference_error))
    assert math.exp(sum(log_ratios) / len(log_ratios)) <= 1.5


def test_compiled_loop_fallback(monkeypatch):
    """Where the kernel cannot be built the op warns and runs the PyTorch loop; a wrong MEMLM_CPU_KERNEL names
    the variable and the allowed values."""

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    loader.load.cache_clear()
    x = make_inputs(1, 9, 2, 4, **CONFIGS["titans"])
    try:
        with pytest.warns(UserWarning, match=r"kernel is unavailable \(RuntimeError: no C\+\+ compiler\); using"):
            fallback = outputs_and_grads(partial(deep_memory, backend="torch"), x, chunk_size=4)
        assert select_path("torch", x["leaves"][0], MemorySpec()) == "hand_written"
    finally:
        loader.load.cache_clear()  # later tests load the real kernel again
    hand_written = partial(deep_memory_chunk, loop="hand_written")
    assert_close(fallback, outputs_and_grads(hand_written, x, chunk_size=4), 1e-14)
    monkeypatch.setenv("MEMLM_CPU_KERNEL", "yes")
    with pytest.raises(ValueError, match=r"MEMLM_CPU_KERNEL='yes' is not one of \('0', '1'\)"):
        select_path("torch", torch.zeros(1), MemorySpec())
    monkeypatch.setenv("MEMLM_CPU_KERNEL", "0")
    assert select_path("torch", torch.zeros(1), MemorySpec()) == "hand_written"
