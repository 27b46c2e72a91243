"""cached_readout / cached_readout_mlp (Memory Caching, docs/design.md §4.4): torch and Triton paths against the
per-token loop, forward and every gradient, on the visibility patterns of real segmentations (constant segments,
a logarithmic split), top-k selection and packed documents; the deep readout against the matrix one and against
the deep memory's own read; argument errors.

On a CPU session the Triton cases run in a ``TRITON_INTERPRET=1`` child (conftest ``interpreted_outcomes``).
"""

from __future__ import annotations

import math

import pytest
import torch

from memlm.kernels import cached_readout, cached_readout_mlp, deep_memory
from memlm.kernels.cached_readout import effective_gamma, select_path, select_path_mlp, select_top_k
from memlm.kernels.cached_readout.pytorch import readout as readout_module
from memlm.kernels.deep_memory import MemorySpec
from memlm.testing.deep_memory_cases import make_inputs

F64 = torch.float64


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ (the plain norm of x when ref is exactly zero)."""
    x, ref = x.detach().to("cpu", F64), ref.detach().to("cpu", F64)
    den = ref.norm()
    return ((x - ref).norm() / (den if den > 0 else 1.0)).item()


# ---- visibility patterns of real segmentations ----------------------------------------------------------------


def constant_visible(T: int, size: int) -> tuple[list[int], int]:
    """Segments of ``size`` tokens: a token of segment s sees the caches of segments 0 … s − 1. Returns the
    visible counts and the number of caches (one per segment, the last never read)."""
    return [t // size for t in range(T)], math.ceil(T / size)


def log_visible(T: int) -> tuple[list[int], int]:
    """Segments ending at the powers of two ([0, 1), [1, 2), [2, 4), [4, 8), …): O(log T) caches per token."""
    vis = [0 if t == 0 else int(math.log2(t)) + 1 for t in range(T)]
    return vis, vis[-1] + 1


def make_case(pattern: str, *, B: int = 2, T: int = 37, H: int = 2, K: int = 8, V: int = 6, seed: int = 0,
              dtype: torch.dtype = F64, layers: list[tuple[int, int]] | None = None) -> dict:
    """Inputs of one call. ``pattern``: ``constant`` (segments of 5), ``log``, ``random`` (any counts, not
    monotone) or ``varlen`` (three packed documents of 5, 17 and 15 tokens, segments of 4 in each).
    ``layers``: the deep memory's ``(d_in, d_out)`` per layer (then ``states`` is a list and K = V = D)."""
    g = torch.Generator().manual_seed(seed)
    cu = offsets = None
    if pattern == "constant":
        vis, N = constant_visible(T, 5)
    elif pattern == "log":
        vis, N = log_visible(T)
    elif pattern == "random":
        N = 4
        vis = torch.randint(0, N + 1, (B * T,), generator=g).tolist()
    elif pattern == "varlen":
        B, lengths, counts, vis = 1, [5, 17, 15], [], []
        T = sum(lengths)
        for n in lengths:
            v, c = constant_visible(n, 4)
            vis, counts = vis + v, counts + [c]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
        N, slots = sum(counts), max(counts)
    else:
        raise AssertionError(pattern)
    slots = N if cu is None else slots
    visible = torch.tensor(vis).reshape(-1, T).expand(B, T).contiguous()
    q = torch.randn(B, T, H, K, generator=g, dtype=F64)
    if layers is None:
        states = torch.randn(B, N, H, K, V, generator=g, dtype=F64) / math.sqrt(K)
    else:
        states = [torch.randn(B, N, H, a, b, generator=g, dtype=F64) / math.sqrt(a) for a, b in layers]
    gamma = torch.rand(B, T, H, slots, generator=g, dtype=F64) + 0.05  # > 0, as a softmax
    states = states.to(dtype) if layers is None else [s.to(dtype) for s in states]
    return dict(q=q.to(dtype), states=states, gamma=gamma.to(dtype), visible=visible, cu_seqlens=cu,
                cache_offsets=offsets)


def run(op, x: dict, device: str = "cpu", dtype: torch.dtype | None = None, **kw):
    """o and the gradients of ⟨o, w⟩ (w fixed by a seed) with respect to q, every state tensor and gamma."""
    def cp(t):
        return t.detach().to(device, dtype or t.dtype).requires_grad_()

    q, gamma = cp(x["q"]), cp(x["gamma"])
    states = [cp(s) for s in x["states"]] if isinstance(x["states"], list) else cp(x["states"])
    packed = {k: None if x[k] is None else x[k].to(device) for k in ("cu_seqlens", "cache_offsets")}
    o = op(q, states, gamma, x["visible"].to(device), **packed, **kw)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(device, o.dtype)
    leaves = [q, *(states if isinstance(states, list) else [states]), gamma]
    return o.detach(), torch.autograd.grad((o * w).sum(), leaves)


def assert_matches(got, ref, tol: float, names=("q", "states", "gamma")) -> None:
    (o, grads), (o_ref, grads_ref) = got, ref
    assert o.shape == o_ref.shape
    errors = {"o": rel(o, o_ref), **{f"d{n}": rel(a, b) for n, a, b in zip(names, grads, grads_ref)}}
    assert max(errors.values()) < tol, errors


SELECTIONS = [  # (top_k, renormalize)
    (None, False),
    (2, False),
    (2, True),
    (100, True),  # top_k >= N: every visible cache
]
PATTERNS = ["constant", "log", "random", "varlen"]


# ---- matrix memory: torch vs naive ----------------------------------------------------------------------------


@pytest.mark.parametrize("top_k, renormalize", SELECTIONS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_torch_matches_naive(pattern, top_k, renormalize):
    x = make_case(pattern, seed=10 * PATTERNS.index(pattern) + SELECTIONS.index((top_k, renormalize)))
    kw = dict(top_k=top_k, renormalize=renormalize)
    assert_matches(run(cached_readout, x, backend="torch", **kw), run(cached_readout, x, backend="naive", **kw), 1e-12)


def test_torch_bounded_chunks_match(monkeypatch):
    """Many token chunks (forward and the recomputing backward) give the one-chunk result."""
    x = make_case("log", T=37)
    ref = run(cached_readout, x, backend="torch", top_k=3)
    monkeypatch.setattr(readout_module, "CHUNK_ELEMENTS", 1)
    assert_matches(run(cached_readout, x, backend="torch", top_k=3), ref, 1e-14)


@pytest.mark.parametrize("renormalize", [False, True])
def test_top_k_at_least_n_is_every_cache(renormalize):
    """top_k = N or more reads every visible cache with the weights as given, exactly."""
    x = make_case("constant")
    N = x["states"].shape[1]
    ref = cached_readout(x["q"], x["states"], x["gamma"], x["visible"], backend="torch")
    for top_k in (N, N + 3):
        for backend in ("torch", "naive"):
            o = cached_readout(x["q"], x["states"], x["gamma"], x["visible"], top_k=top_k, renormalize=renormalize,
                               backend=backend)
            assert rel(o, ref) < 1e-15


def test_scale_and_visible_zero():
    """The default scale is K^{-1/2}; a token with no visible cache reads zero; weights past visible are ignored."""
    x = make_case("constant", B=1, T=12, K=16)
    q, S, gamma, vis = x["q"], x["states"], x["gamma"], x["visible"]
    o = cached_readout(q, S, gamma, vis, backend="torch")
    assert torch.equal(o[:, :5], torch.zeros_like(o[:, :5]))
    assert rel(cached_readout(q, S, gamma, vis, scale=1.0, backend="torch") / 4, o) < 1e-15
    noisy = gamma.clone()
    noisy[..., 2:] = 1e6  # no token of T = 12 sees cache 2
    assert torch.equal(cached_readout(q, S, noisy, vis, backend="torch"), o)


def test_selection_rule():
    """Top-k among the visible caches, ties to the lower index, renormalised to the visible sum."""
    gamma = torch.tensor([[[[0.1, 0.3, 0.3, 0.2, 0.9]]]], dtype=F64)  # [1, 1, 1, 5]
    visible = torch.tensor([[4]])  # cache 4 (the largest) is not visible
    keep = select_top_k(gamma, visible, 2)
    assert keep.tolist() == [[[[False, True, True, False, False]]]]
    assert select_top_k(gamma, visible, None).tolist() == [[[[True, True, True, True, False]]]]
    tied = select_top_k(gamma, visible, 1)
    assert tied.tolist() == [[[[False, True, False, False, False]]]]
    kept = effective_gamma(gamma, visible, 2, False)
    assert torch.allclose(kept, torch.tensor([[[[0.0, 0.3, 0.3, 0.0, 0.0]]]], dtype=F64))
    renorm = effective_gamma(gamma, visible, 2, True)
    assert torch.allclose(renorm, torch.tensor([[[[0.0, 0.45, 0.45, 0.0, 0.0]]]], dtype=F64))  # 0.6 · 0.9 / 0.6
    # the per-token reference applies the same rule: S_i = i + 1 (scalar memories), q = 1, scale 1
    q, S = torch.ones(1, 1, 1, 1, dtype=F64), torch.arange(1.0, 6.0, dtype=F64).view(1, 5, 1, 1, 1)
    for top_k, renormalize, expected in ((2, False, 0.3 * 2 + 0.3 * 3), (2, True, 0.45 * 2 + 0.45 * 3),
                                         (1, True, 0.9 * 2)):
        for backend in ("naive", "torch"):
            o = cached_readout(q, S, gamma, visible, top_k=top_k, renormalize=renormalize, scale=1.0, backend=backend)
            assert abs(o.item() - expected) < 1e-12, (backend, top_k, renormalize)


def test_reduced_precision_accumulates_in_float32():
    x = make_case("log")
    half = {k: x[k].bfloat16() for k in ("q", "states", "gamma")}
    ref = cached_readout(*(half[k].double() for k in ("q", "states", "gamma")), x["visible"], top_k=2, backend="naive")
    o = cached_readout(half["q"], half["states"], half["gamma"], x["visible"], top_k=2, backend="torch")
    assert o.dtype == torch.bfloat16
    assert rel(o, ref) < 2e-2


# ---- matrix memory: Triton vs naive ---------------------------------------------------------------------------

TRITON_CASES = {
    # name: (make_case kwargs, op kwargs, dtype, tolerance)
    "constant": (dict(pattern="constant"), dict(), torch.float32, 1e-5),
    "log_top_k": (dict(pattern="log"), dict(top_k=2), torch.float32, 1e-5),
    "random_top_k_renormalize": (dict(pattern="random"), dict(top_k=2, renormalize=True), torch.float32, 1e-5),
    "varlen": (dict(pattern="varlen"), dict(top_k=1), torch.float32, 1e-5),
    "odd_dims_value_tiles": (dict(pattern="constant", T=40, K=24, V=70, H=1, B=1), dict(), torch.float32, 1e-5),
    "half_io": (dict(pattern="log", B=1), dict(), torch.float16, 2e-3),
}


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_matches_naive(triton_device, name):
    case, kw, dtype, tol = TRITON_CASES[name]
    x = make_case(**case)
    # the reference reads the inputs as the kernels get them (rounded to dtype), in float64
    x = {k: v.to(dtype).to(F64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in x.items()}
    got = run(cached_readout, x, triton_device, dtype, backend="triton", **kw)
    assert got[0].dtype == dtype
    assert_matches(got, run(cached_readout, x, backend="naive", **kw), tol)


def test_triton_no_caches(triton_device):
    """N = 0: zeros out, zero gradients, no cache kernel launched."""
    x = make_case("constant", B=1, T=9)
    x["states"], x["gamma"] = x["states"][:, :0], x["gamma"][..., :0]
    x["visible"] = torch.zeros_like(x["visible"])
    o, grads = run(cached_readout, x, triton_device, torch.float32, backend="triton")
    assert o.abs().max().item() == 0 and grads[0].abs().max().item() == 0


def test_triton_interpreted(interpreted_outcomes):
    """The Triton cases of this file, run on CPU in the TRITON_INTERPRET=1 child (conftest)."""
    outcomes, out = interpreted_outcomes(__file__)
    assert outcomes, "no Triton case collected"
    failed = [i for i, o in outcomes.items() if o != "PASSED"]
    assert not failed, f"{failed}\n{out[-4000:]}"


# ---- deep memory ----------------------------------------------------------------------------------------------

D = 8
L2_LAYERS = [(D, 2 * D), (2 * D, D)]


@pytest.mark.parametrize("top_k, renormalize", [(None, False), (2, True)])
@pytest.mark.parametrize("pattern", ["constant", "varlen"])
def test_mlp_torch_matches_naive(pattern, top_k, renormalize):
    """Depth 2 (GELU), residual and LayerNorm: outputs and the gradients of q, both layers' caches and gamma."""
    x = make_case(pattern, T=23 if pattern == "constant" else 37, K=D, V=D, layers=L2_LAYERS)
    kw = dict(top_k=top_k, renormalize=renormalize)
    names = ("q", "W1", "W2", "gamma")
    assert_matches(run(cached_readout_mlp, x, backend="torch", **kw),
                   run(cached_readout_mlp, x, backend="naive", **kw), 1e-12, names)


def test_mlp_depth1_is_matrix_readout():
    """One linear layer without residual and norm is the matrix readout with scale 1 (values and gradients)."""
    x = make_case("log", K=D, V=D, layers=[(D, D)])
    kw = dict(top_k=2, renormalize=True)
    deep = run(cached_readout_mlp, x, backend="torch", residual=False, norm=False, **kw)
    matrix = run(cached_readout, {**x, "states": x["states"][0]}, backend="torch", scale=1.0, **kw)
    assert_matches(deep, matrix, 1e-13, ("q", "W", "gamma"))


@pytest.mark.parametrize("retention", ["none", "lq"])
def test_mlp_reads_like_the_deep_memory(retention):
    """A cache of the deep memory's final state, read with weight 1, is the deep memory's own read at the last
    token of a full chunk (the exact step; with ``lq`` through ``W = R(A)``)."""
    x = make_inputs(B=2, T=8, H=2, D=D, depth=2, expansion=2)
    spec = MemorySpec(chunk_size=4, retention=retention)
    o, (W, _) = deep_memory(x["q"], x["k"], x["v"], x["lr"], x["momentum"], x["forget"], x["weights"], spec,
                            initial_momentum=x["initial_momentum"], output_final_state=True, backend="naive")
    q_last = x["q"][:, -1:]
    caches = [w[:, None] for w in W]  # [B, 1, H, d_in, d_out]: one cache per row
    ones, visible = torch.ones(2, 1, 2, 1, dtype=F64), torch.ones(2, 1, dtype=torch.long)
    for backend in ("naive", "torch"):
        read = cached_readout_mlp(q_last, caches, ones, visible, spec, backend=backend)
        assert rel(read, o[:, -1:]) < 1e-12, backend


# ---- dispatch and argument errors -----------------------------------------------------------------------------


def test_select_path(monkeypatch):
    q = torch.zeros(1, 2, 1, 4)
    assert select_path("auto", q) == "torch" and select_path_mlp("auto", q) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_path("triton", q) == "triton"
    with pytest.raises(ValueError, match="float64"):
        select_path("triton", q.double())
    with pytest.raises(ValueError, match="K <= 256"):
        select_path("triton", torch.zeros(1, 2, 1, 512))
    with pytest.raises(ValueError, match="no kernel for the deep-memory readout"):
        select_path_mlp("triton", q)


def _matrix_args():
    x = make_case("constant", B=1, T=12, dtype=torch.float32)
    return dict(q=x["q"], states=x["states"], gamma=x["gamma"], visible=x["visible"])


def _packed_args():
    x = make_case("varlen", dtype=torch.float32)
    return {k: x[k] for k in ("q", "states", "gamma", "visible", "cu_seqlens", "cache_offsets")}


MATRIX_ERRORS = [
    (dict(q=torch.zeros(12, 2, 8)), r"q must have shape \[B, T, H, K\]"),
    (dict(q=torch.zeros(1, 12, 2, 8, dtype=torch.long)), "q must be a floating-point"),
    (dict(states=torch.zeros(1, 3, 2, 7, 6)), r"states must have shape \[B, N, H, K, V\]"),
    (dict(states=torch.zeros(1, 3, 2, 8, 6, dtype=torch.long)), "states must be a floating-point"),
    (dict(gamma=torch.zeros(1, 12, 2, 2)), r"gamma must have shape \[B, T, H, N\] = \[1, 12, 2, 3\]"),
    (dict(visible=torch.zeros(1, 11, dtype=torch.long)), r"visible must have shape \[B, T\]"),
    (dict(visible=torch.zeros(1, 12)), "visible must be an integer tensor"),
    (dict(visible=torch.full((1, 12), -1)), "visible must be >= 0"),
    (dict(visible=torch.full((1, 12), 4)), r"visible must be at most N \(states.shape\[1\]\)"),
    (dict(top_k=0), "top_k must be a positive int or None"),
    (dict(top_k=True), "top_k must be a positive int or None"),
    (dict(renormalize=1), "renormalize must be a bool"),
    (dict(top_k=1, renormalize=True, gamma=-torch.ones(1, 12, 2, 3)), "gamma must be >= 0 at the visible caches"),
    (dict(scale=0.0), "scale must be a positive number"),
    (dict(backend="cuda"), "backend='cuda' is not one of"),
    (dict(backend="triton"), "needs CUDA tensors"),
    (dict(cu_seqlens=torch.tensor([0, 12])), "cache_offsets and cu_seqlens go together"),
]
PACKED_ERRORS = [
    (dict(cache_offsets=None), "cache_offsets and cu_seqlens go together"),
    (dict(cache_offsets=torch.tensor([0, 2, 7])), "one entry per entry of cu_seqlens"),
    (dict(cache_offsets=torch.tensor([0, 2, 1, 11])), "never decrease"),
    (dict(cache_offsets=torch.tensor([0, 2, 7, 9])), r"end at the number of caches N_total=11"),
    (dict(cache_offsets=torch.tensor([0.0, 2, 7, 11])), "cache_offsets must be an integer tensor"),
    (dict(gamma=torch.zeros(1, 37, 2, 4)), r"gamma must have shape \[1, T, H, max_d"),
    (dict(visible=torch.full((1, 37), 3)), "at most its document's caches"),
    (dict(cu_seqlens=torch.tensor([0, 5, 22, 36])), "cu_seqlens must end at T=37"),
]


@pytest.mark.parametrize("change, match", MATRIX_ERRORS)
def test_bad_inputs(change, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = {**_matrix_args(), **change}
    with pytest.raises(ValueError, match=match):
        cached_readout(args.pop("q"), args.pop("states"), args.pop("gamma"), args.pop("visible"), **args)


@pytest.mark.parametrize("change, match", PACKED_ERRORS)
def test_bad_packed_inputs(change, match):
    args = {**_packed_args(), **change}
    with pytest.raises(ValueError, match=match):
        cached_readout(args.pop("q"), args.pop("states"), args.pop("gamma"), args.pop("visible"), **args)


MLP_ERRORS = [
    (dict(states=[]), "states must be a non-empty list"),
    (dict(states=[torch.zeros(1, 3, 2, 8, 16), torch.zeros(1, 3, 2, 8, 8)]), r"states\[1\] must have shape"),
    (dict(states=[torch.zeros(1, 3, 2, 8, 16), torch.zeros(1, 4, 2, 16, 8)]), r"states\[1\] must have shape"),
    (dict(activation="relu"), "activation='relu' is not one of"),
    (dict(retention="l3"), "retention='l3' is not one of"),
    (dict(backend="naive", top_k=-1), "top_k must be a positive int"),
]


@pytest.mark.parametrize("change, match", MLP_ERRORS)
def test_bad_mlp_inputs(change, match):
    x = make_case("constant", B=1, T=12, K=D, V=D, layers=L2_LAYERS)
    args = {**dict(q=x["q"], states=x["states"], gamma=x["gamma"], visible=x["visible"]), **change}
    with pytest.raises(ValueError, match=match):
        cached_readout_mlp(args.pop("q"), args.pop("states"), args.pop("gamma"), args.pop("visible"), **args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_triton_cuda(dtype, tol, top_k):
    """Compiled kernels, K = V = 64, segments of 128 over 1000 tokens, against the float64 PyTorch path."""
    x = make_case("constant", B=2, T=1000, H=4, K=64, V=64)
    vis, N = constant_visible(1000, 128)
    g = torch.Generator().manual_seed(3)
    x["visible"] = torch.tensor(vis).expand(2, 1000).contiguous()
    x["states"] = torch.randn(2, N, 4, 64, 64, generator=g, dtype=F64) / 8
    x["gamma"] = torch.rand(2, 1000, 4, N, generator=g, dtype=F64)
    x = {k: v.to(dtype).to(F64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in x.items()}
    got = run(cached_readout, x, "cuda", dtype, backend="triton", top_k=top_k)
    assert_matches(got, run(cached_readout, x, backend="torch", top_k=top_k), tol)
