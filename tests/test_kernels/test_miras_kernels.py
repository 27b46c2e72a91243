"""Miras variants of deep_memory (arXiv 2504.13173): ℓp (Moneta), Huber (Yaad) and dot-product biases,
ℓq normalisation (Moneta) and softmax (Memora) retention. The chunked path against the naive one, the
naive one against per-token online optimisation written here from the stated losses, limits that
reduce to known rules, and bad input."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from memlm.kernels import deep_memory
from memlm.kernels.deep_memory import deep_memory_naive
from memlm.testing.deep_memory_cases import with_spec
from memlm.testing.reference import memory_fn

torch_path = partial(deep_memory, backend="torch")  # the chunked PyTorch path, its loop picked by select_path

F64 = torch.float64
LINEAR = dict(depth=1, expansion=1, residual=False, norm=False)  # L = 1: linear memory
TITANS = dict(depth=2, expansion=2, residual=True, norm=True)  # L = 2: residual + LayerNorm

VARIANTS = {
    "lp": dict(bias="lp", bias_params={"p": 3.0, "nu": 4.0, "eps": 1e-3}),
    "huber": dict(bias="huber"),
    "dot": dict(bias="dot"),
    "lq_norm": dict(retention="lq_norm", retention_params={"q": 4.0}),
    "softmax": dict(retention="softmax", retention_params={"c": 2.0}),
    "lq": dict(retention="lq", retention_params={"q": 4.0, "eps": 1e-3}),
    "softmax_lag": dict(retention="softmax", retention_params={"c": 2.0}, lag_token=True),
    "softmax_fan_in": dict(retention="softmax"),  # c = d_in of each layer
    "lq_lag": dict(retention="lq", lag_token=True),
    "moneta": dict(bias="lp", retention="lq"),  # the paper's p = 3, q = 4 (defaults)
}
# ν and ε so large/small that tanh(νe) = Sign(e) and e² + ε = e² in float64: ψ is the exact ℓp gradient
SHARP = {"nu": 1e8, "eps": 1e-30}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a − b|| / ||b|| (0 when both are exactly zero)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(variant, B=2, T=11, H=2, D=4, *, depth, expansion, n_state=None, grad=True, **_):
    """Random q, k, v, gates θ ∈ [0, .3], η ∈ [0, 1], α ∈ [0, .3], δ ∈ [0, 6] (Huber: both branches
    occur), weights (positive for softmax retention) and momentum state. With softmax retention
    θ ∈ [0, .1]: larger logit steps saturate the softmax and the recurrence amplifies rounding."""
    softmax = VARIANTS[variant].get("retention") == "softmax"
    q, k, v = (torch.randn(B, T, H, D, dtype=F64) for _ in range(3))
    lr = torch.rand(B, T, H, dtype=F64) * (0.1 if softmax else 0.3)
    momentum, forget = torch.rand(B, T, H, dtype=F64), torch.rand(B, T, H, dtype=F64) * 0.3
    dims = [D] + [expansion * D] * (depth - 1) + [D]
    lead = (H,) if n_state is None else (n_state, H)
    weights = [torch.randn(*lead, a, b, dtype=F64) / a**0.5 for a, b in zip(dims, dims[1:])]
    if softmax:
        weights = [w.abs() + 0.1 for w in weights]
    x = dict(q=q, k=k, v=v, lr=lr, momentum=momentum, forget=forget, weights=weights,
             s0=[0.1 * torch.randn_like(w) for w in weights])  # fmt: skip
    if VARIANTS[variant].get("bias") == "huber":
        x["delta"] = torch.rand(B, T, H, dtype=F64) * 6
    if grad:
        for t in leaves(x):
            t.requires_grad_()
    return x


def leaves(x):
    names = ("q", "k", "v", "lr", "momentum", "forget", "delta")
    return [x[n] for n in names if n in x] + x["weights"] + x["s0"]


def run(op, x, variant, **kw):
    """``op`` on the inputs of :func:`make_inputs` with the hooks of ``variant``; (o, state list, S list)."""
    hooks = {**VARIANTS[variant], **kw}
    if "delta" in x:
        hooks["delta"] = x["delta"]
    o, (W, S) = with_spec(
        op, x["q"], x["k"], x["v"], x["lr"], x["momentum"], x["forget"], x["weights"],
        initial_momentum=x["s0"], output_final_state=True, **hooks,
    )  # fmt: skip
    return o, W, S


def assert_same(x, variant, tol, **kw):
    """Chunked and naive outputs, final states and gradients of every input agree within ``tol``."""
    out_a, out_b = run(torch_path, x, variant, **kw), run(deep_memory_naive, x, variant, **kw)
    flat_a, flat_b = [out_a[0], *out_a[1], *out_a[2]], [out_b[0], *out_b[1], *out_b[2]]
    errors = [rel(a, b) for a, b in zip(flat_a, flat_b)]
    cot = [torch.randn_like(t) for t in flat_b]
    ga = torch.autograd.grad(flat_a, leaves(x), cot)
    gb = torch.autograd.grad(flat_b, leaves(x), cot)
    errors += [rel(a, b) for a, b in zip(ga, gb)]
    assert max(errors) < tol, errors


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cfg", [LINEAR, TITANS], ids=["L1", "L2"])
@pytest.mark.parametrize("chunk_size", [4, 5])
def test_chunk_matches_naive(variant, cfg, chunk_size):
    x = make_inputs(variant, **cfg, n_state=2)
    assert_same(x, variant, 1e-10, chunk_size=chunk_size, residual=cfg["residual"], norm=cfg["norm"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunk_matches_naive_varlen(variant):
    x = make_inputs(variant, B=1, T=14, **TITANS, n_state=4)
    assert_same(x, variant, 1e-10, chunk_size=4, cu_seqlens=torch.tensor([0, 3, 9, 10, 14]))


@pytest.mark.parametrize("variant", ["huber", "moneta", "softmax"])
def test_varlen_equals_separate_runs(variant):
    x = make_inputs(variant, B=1, T=13, **TITANS, n_state=3, grad=False)
    bounds = [0, 3, 9, 13]
    o, W, S = run(deep_memory, x, variant, chunk_size=4, cu_seqlens=torch.tensor(bounds))
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        doc = {n: t[:, s:e] for n, t in x.items() if n not in ("weights", "s0")}
        doc["weights"] = [w[i : i + 1] for w in x["weights"]]
        doc["s0"] = [m[i : i + 1] for m in x["s0"]]
        o_i, W_i, S_i = run(deep_memory, doc, variant, chunk_size=4)
        assert rel(o[:, s:e], o_i) < 1e-12
        for a, b in zip(W + S, W_i + S_i):
            assert rel(a[i : i + 1], b) < 1e-12


@pytest.mark.parametrize("variant", ["lq_norm", "softmax", "moneta", "softmax_lag", "lq_lag"])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_prefix_outputs_do_not_depend_on_where_the_input_stops(variant, backend):
    """A sequence that ends inside a chunk reads its last tokens linearised like any mid-chunk token:
    the outputs of a prefix equal the first outputs of the longer input (what makes decoding exact)."""
    x = make_inputs(variant, B=2, T=13, **TITANS, grad=False)
    o, _, _ = run(deep_memory, x, variant, chunk_size=4, backend=backend)
    for stop in (6, 7, 9, 11):
        prefix = {n: (t[:, :stop] if n not in ("weights", "s0") else t) for n, t in x.items()}
        assert rel(run(deep_memory, prefix, variant, chunk_size=4, backend=backend)[0], o[:, :stop]) < 1e-12


@pytest.mark.parametrize("variant", ["lq_norm", "softmax", "moneta", "softmax_lag", "softmax_fan_in", "lq_lag"])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_state_continuation(variant, backend):
    """Running T1 (a multiple of the chunk) then T2 from the returned state equals one run."""
    x = make_inputs(variant, B=2, T=13, **TITANS, grad=False)
    o, W, S = run(deep_memory, x, variant, chunk_size=4, backend=backend)
    first = {n: (t[:, :8] if n not in ("weights", "s0") else t) for n, t in x.items()}
    o1, W1, S1 = run(deep_memory, first, variant, chunk_size=4, backend=backend)
    second = {**{n: t[:, 8:] for n, t in x.items() if n not in ("weights", "s0")}, "weights": W1, "s0": S1}
    o2, W2, S2 = run(deep_memory, second, variant, chunk_size=4, backend=backend)
    assert rel(torch.cat([o1, o2], 1), o) < 1e-12
    for a, b in zip(W2 + S2, W + S):
        assert rel(a, b) < 1e-12


def stated_loss(variant, y, v, delta):
    """The per-token objective of each variant, from the paper's definitions."""
    e = y - v
    if variant == "lp":  # ‖e‖_p^p, p = 3
        return e.abs().pow(3).sum()
    if variant == "huber":  # ℓ2 where ‖e‖ ≤ δ, δ·ℓ1 elsewhere (Yaad)
        return e.pow(2).sum() if e.norm() <= delta else delta * e.abs().sum()
    if variant == "dot":  # −⟨M(k), v⟩
        return -(y * v).sum()
    return e.pow(2).sum()


def lq4(a):
    """A / ‖A‖_4² with the entrywise 4-norm of the matrix."""
    return a / ((a.abs() ** 4).sum() ** 0.25) ** 2


def lq_mirror(a, q=4.0, eps=1e-3):
    """∇ of the conjugate G*(A) = (n/2)·(mean |A|^r)^{2/r} of G(W) = (n/2)·(mean |W|^q)^{2/q}, r = q/(q−1) the
    dual exponent, with |a| smoothed as sqrt(a² + ε), by autograd."""
    r = q / (q - 1)
    a = a.detach().requires_grad_() if not a.requires_grad else a
    conjugate = (a.numel() / 2) * (torch.sqrt(a * a + eps) ** r).mean() ** (2 / r)
    return torch.autograd.grad(conjugate, a, create_graph=True)[0]


RETAINED = {"lq_norm": lq4, "lq": lq_mirror}  # retentions whose state A is accumulated, W = R(A)


def online_reference(x, variant, cfg):
    """Per-token online optimisation, one (sequence, head) at a time: u_t = ∇_W ℓ_t at the current
    weights, S_t = η S − θ u_t, then Moneta ``A ← (1 − α) A + S, W = R(A)`` (the printed ``A / ‖A‖_4²`` or
    the ℓq mirror map), Memora ``W ← 2·Softmax_{d_in}((1 − α) log W + S)`` (from ``W_0`` scaled to column
    sums 2), otherwise ``W ← (1 − α) W + S``; o_t = M_W(q_t)."""
    res, norm = cfg["residual"], cfg["norm"]
    retention = VARIANTS[variant].get("retention", "none")
    B, T, H, _ = x["q"].shape
    out, states = torch.zeros_like(x["q"]), []
    for b in range(B):
        for h in range(H):
            A = [t[h] for t in x["weights"]]
            s = [t[h] for t in x["s0"]]
            if retention in RETAINED:
                w = [RETAINED[retention](a) for a in A]
            elif retention == "softmax":  # Memora starts from W_0 scaled onto the simplex
                w = [2.0 * a / a.sum(-2, keepdim=True) for a in A]
            else:
                w = A
            for t in range(T):
                d = x["delta"][b, t, h] if "delta" in x else None
                y = memory_fn(x["k"][b, t, h], w, res, norm)
                u = torch.autograd.grad(stated_loss(variant, y, x["v"][b, t, h], d), w, create_graph=True)
                eta, theta, keep = x["momentum"][b, t, h], x["lr"][b, t, h], 1 - x["forget"][b, t, h]
                s = [eta * s_l - theta * u_l for s_l, u_l in zip(s, u)]
                if retention in RETAINED:
                    A = [keep * a + s_l for a, s_l in zip(A, s)]
                    w = [RETAINED[retention](a) for a in A]
                elif retention == "softmax":
                    w = [2.0 * torch.softmax(keep * w_l.log() + s_l, dim=-2) for w_l, s_l in zip(w, s)]
                else:
                    w = [keep * w_l + s_l for w_l, s_l in zip(w, s)]
                out[b, t, h] = memory_fn(x["q"][b, t, h], w, res, norm)
            states.append((A if retention in RETAINED else w, s))
    return out, states


@pytest.mark.parametrize("variant", ["lp", "huber", "dot", "lq_norm", "softmax", "lq", "softmax_lag"])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_online_matches_stated_objective(variant, backend):
    """chunk_size=1 is exact online optimisation of the stated loss with the stated retention."""
    x = make_inputs(variant, T=6, **TITANS)
    params = {"bias_params": {"p": 3.0, **SHARP}} if variant == "lp" else {}
    o, W, S = run(deep_memory, x, variant, chunk_size=1, backend=backend, **params)
    ref, states = online_reference(x, variant, TITANS)
    H = x["q"].shape[2]
    for i, (w_ref, s_ref) in enumerate(states):
        for got, want in zip(W + S, w_ref + s_ref):
            assert rel(got[i // H, i % H], want) < 1e-12
    assert rel(o, ref) < 1e-12
    cot = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, leaves(x), cot), torch.autograd.grad(ref, leaves(x), cot)):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_choice_changes_the_output(variant):
    x = make_inputs(variant, **TITANS, grad=False)
    o = run(deep_memory, x, variant, chunk_size=4)[0]
    base = run(deep_memory, {n: t for n, t in x.items() if n != "delta"}, "dot", chunk_size=4, bias="l2")[0]
    assert rel(o, base) > 1e-2


def test_huber_limits():
    """The random δ switches some tokens to each branch (δ gets a gradient only from ℓ1-branch tokens);
    δ ≥ every error norm is the ℓ2 bias exactly; δ = 0 never writes (ψ = 0·Sign(e))."""
    x = make_inputs("huber", **TITANS, grad=False)
    delta = x["delta"].clone().requires_grad_()
    o = run(deep_memory, {**x, "delta": delta}, "huber", chunk_size=4)[0]
    (g,) = torch.autograd.grad(o.square().sum(), delta)
    assert (g != 0).any() and (g == 0).any()
    l2 = run(deep_memory, {n: t for n, t in x.items() if n != "delta"}, "dot", chunk_size=4, bias="l2")
    x["delta"] = torch.full_like(x["delta"], 1e6)
    wide = run(deep_memory, x, "huber", chunk_size=4)
    # huber runs the autograd loop, l2 the hand-written backward: equal up to float64 rounding
    for a, b in zip([wide[0], *wide[1], *wide[2]], [l2[0], *l2[1], *l2[2]]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    zero = torch.zeros_like(x["delta"])
    o, (W, _) = deep_memory(x["q"], x["k"], x["v"], x["lr"], None, None, x["weights"], bias="huber",
                            delta=zero, chunk_size=4, output_final_state=True)  # fmt: skip
    assert rel(o, memory_fn(x["q"].unsqueeze(-2), x["weights"], True, True).squeeze(-2)) < 1e-12
    assert all(torch.equal(a, b.expand_as(a)) for a, b in zip(W, x["weights"]))


def test_lp_and_lq_limits():
    """ℓp with p = 2 (sharp Sign, |e|) is the ℓ2 bias; ℓq normalisation with q = 2 is no retention
    (this also checks the exact chunk-end read against the linear one)."""
    x = make_inputs("moneta", **TITANS, grad=False)
    l2 = run(deep_memory, x, "dot", chunk_size=4, bias="l2")
    lp2 = run(deep_memory, x, "lp", chunk_size=4, bias_params={"p": 2.0, **SHARP})
    lq2 = run(deep_memory, x, "lq_norm", chunk_size=4, retention_params={"q": 2.0})
    mirror2 = run(deep_memory, x, "lq", chunk_size=4, retention_params={"q": 2.0})
    for got in (lp2, lq2, mirror2):
        for a, b in zip([got[0], *got[1], *got[2]], [l2[0], *l2[1], *l2[2]]):
            assert rel(a, b) < 1e-12


def test_dot_bias_is_linear_attention():
    """ℓ = −⟨M(k), v⟩ on a linear memory: W_t = (1 − α_t) W_{t−1} + θ_t k_tᵀ v_t, o_t = q_t W_t. The
    gradient does not depend on W, so any chunk size is exact."""
    x = make_inputs("dot", T=13, **LINEAR, grad=False)
    o, (W, _) = deep_memory(x["q"], x["k"], x["v"], x["lr"], None, x["forget"], x["weights"], bias="dot",
                            chunk_size=4, residual=False, norm=False, output_final_state=True)  # fmt: skip
    state = x["weights"][0].expand(2, -1, -1, -1)
    ref = []
    for t in range(x["q"].shape[1]):
        kv = x["k"][:, t, :, :, None] * x["v"][:, t, :, None, :]
        state = (1 - x["forget"][:, t, :, None, None]) * state + x["lr"][:, t, :, None, None] * kv
        ref.append((x["q"][:, t, :, None, :] @ state).squeeze(-2))
    assert rel(o, torch.stack(ref, 1)) < 1e-12
    assert rel(W[0], state) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_softmax_state_stays_on_the_scaled_simplex(backend):
    x = make_inputs("softmax", T=13, **TITANS, grad=False)
    _, W, _ = run(deep_memory, x, "softmax", chunk_size=4, backend=backend)
    for w in W:
        assert w.min() > 0
        torch.testing.assert_close(w.sum(-2), torch.full_like(w.sum(-2), 2.0), rtol=1e-13, atol=0)


@pytest.mark.parametrize("variant", ["moneta", "softmax", "huber"])
def test_gradcheck_naive(variant):
    x = make_inputs(variant, B=1, T=4, H=1, D=2, depth=2, expansion=1)
    params = {"bias_params": {"p": 3.0, "nu": 2.0, "eps": 0.1}} if variant == "moneta" else {}
    names = [n for n in ("q", "k", "v", "lr", "momentum", "forget", "delta") if n in x]

    def fn(*tensors):
        y = dict(zip(names, tensors))
        y["weights"], y["s0"] = list(tensors[len(names) : len(names) + 2]), list(tensors[len(names) + 2 :])
        o, W, S = run(deep_memory_naive, y, variant, chunk_size=2, **params)
        return o, *W, *S

    assert torch.autograd.gradcheck(fn, tuple(leaves(x)))


def _without_delta(x):
    x.pop("delta")


def _negative_weights(x):
    x["weights"] = [w - 1 for w in x["weights"]]


ONES = torch.ones(2, 11, 2, dtype=F64)
BAD = {
    "unknown bias": ("lp", dict(bias="l3"), None, r"bias='l3' is not one of \('l2', 'lp', 'huber', 'dot', 'l2_clip'\)"),
    "unknown retention": ("lp", dict(retention="l2"), None,
                          r"retention='l2' is not one of \('none', 'lq', 'lq_norm', 'softmax', 'max_norm'\)"),
    "unknown bias parameter": ("lp", dict(bias_params={"q": 3.0}), None,
                               r"bias_params key 'q' is not a parameter of bias='lp'; allowed: \('p', 'nu'"),
    "parameter of a bias without any": ("dot", dict(bias_params={"p": 3.0}), None,
                                        r"key 'p' is not a parameter of bias='dot'; allowed: \(\)"),
    "bias_params not a dict": ("lp", dict(bias_params=[3.0]), None, r"bias_params must be a dict"),
    "p < 1": ("lp", dict(bias_params={"p": 0.5}), None, r"bias_params\['p'\] must be >= 1.0 for bias='lp'"),
    "nu = 0": ("lp", dict(bias_params={"nu": 0.0}), None, r"bias_params\['nu'\] must be > 0.0"),
    "eps < 0": ("lp", dict(bias_params={"eps": -1e-6}), None, r"bias_params\['eps'\] must be > 0.0"),
    "p not a number": ("lp", dict(bias_params={"p": "3"}), None, r"bias_params\['p'\] must be a finite real"),
    "p infinite": ("lp", dict(bias_params={"p": float("inf")}), None, r"bias_params\['p'\] must be a finite"),
    "q < 2": ("lq_norm", dict(retention_params={"q": 1.5}), None,
              r"retention_params\['q'\] must be >= 2.0 for retention='lq_norm'"),
    "c = 0": ("softmax", dict(retention_params={"c": 0.0}), None, r"retention_params\['c'\] must be > 0.0"),
    "retention parameter unknown": ("lq_norm", dict(retention_params={"c": 1.0}), None,
                                    r"retention_params key 'c' is not a parameter of retention='lq_norm'"),
    "delta missing": ("huber", {}, _without_delta,
                      r"delta \(the per-token threshold δ_t, \[B, T, H\] or channel-wise \[B, T, H, D\]\) "
                      r"is required for bias='huber'"),
    "delta unused": ("lp", dict(delta=ONES), None,
                     r"delta is used only by the biases \('huber',\); got bias='lp'"),
    "delta shape": ("huber", dict(delta=ONES[..., 0]), None,
                    r"delta must be \[B, T, H\] = \[2, 11, 2\] or \[B, T, H, D\] = \[2, 11, 2, 4\], got \[2, 11\]"),
    "delta negative": ("huber", dict(delta=-ONES), None, r"delta must lie in \[0.0, inf\]"),
    "delta integer": ("huber", dict(delta=ONES.long()), None, r"delta must be a floating-point tensor"),
    "softmax weights negative": ("softmax", {}, _negative_weights,
                                     r"retention='softmax' .* needs them >= 0: weights\[0\] has min"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    variant, kw, edit, message = BAD[case]
    x = make_inputs(variant, **TITANS, grad=False)
    if edit is not None:
        edit(x)
    if "delta" in kw:
        x.pop("delta", None)
    with pytest.raises(ValueError, match=message):
        run(deep_memory, x, variant, **kw)


@pytest.mark.parametrize("q", [4.0, 3.0, 1.5])
def test_lq_retention_is_the_mirror_map_of_the_lq_objective(q):
    """W = R(A) solves the FTRL step argmin_W G(W) − ⟨A, W⟩ with G(W) = (n/2)(mean |W|^q)^{2/q}: ∇G(R(A)) = A
    (ε → 0); R is homogeneous of degree 1 (no shrinking with the amount written, unlike the printed
    ``A / ‖A‖_q^{q−2}``), and the inverse map used to start the memory at given weights round-trips."""
    from memlm.kernels.deep_memory.objectives import lq_inverse, lq_norm_retention, lq_retention

    A = torch.randn(3, 5, 7, dtype=F64)
    W = lq_retention(A, q=q, eps=1e-30).requires_grad_()
    G = (W[0].numel() / 2) * (W.abs().pow(q).mean(dim=(-2, -1)) ** (2 / q))
    (grad,) = torch.autograd.grad(G.sum(), W)
    assert rel(grad, A) < 1e-10
    assert rel(lq_retention(100 * A, q=q, eps=1e-30), 100 * lq_retention(A, q=q, eps=1e-30)) < 1e-12
    assert rel(lq_inverse(W.detach(), q=q), A) < 1e-10
    printed = lq_norm_retention(100 * A, q=4.0).norm() / lq_norm_retention(A, q=4.0).norm()
    assert printed < 0.02  # degree 3 − q = −1: a hundred times the writes, a hundredth of the weights


def test_softmax_fan_in_default():
    """Memora's default scale c is the fan-in: every output unit's incoming weights sum to d_in."""
    from memlm.kernels.deep_memory.objectives import softmax_retention

    A = torch.randn(2, 6, 10, dtype=F64)
    torch.testing.assert_close(softmax_retention(A).sum(-2), torch.full((2, 10), 6.0, dtype=F64))


@pytest.mark.parametrize("variant", ["softmax_lag", "lq_lag"])
def test_lag_token_reads_the_first_token_exactly(variant):
    """With the lag token, a chunk's first token is the exact online step (its output equals the
    chunk_size=1 run's), and the rest differ from the chunk-end-exact form."""
    x = make_inputs(variant, B=2, T=9, **TITANS, grad=False)
    lag = run(deep_memory, x, variant, chunk_size=4)[0]
    online = run(deep_memory, x, variant, chunk_size=1)[0]
    end_exact = run(deep_memory, x, variant, chunk_size=4, lag_token=False)[0]
    assert rel(lag[:, :1], online[:, :1]) < 1e-12
    assert rel(lag, end_exact) > 1e-3


@pytest.mark.parametrize("hooks", [dict(retention="softmax", lag_token=True, retention_params={"c": 2.0}),
                                   dict(retention="softmax")])
def test_triton_names_what_it_lacks(hooks, monkeypatch):
    from memlm.kernels.deep_memory import MemorySpec, select_path

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError, match="backend='triton'"):
        select_path("triton", q, MemorySpec(**hooks))
