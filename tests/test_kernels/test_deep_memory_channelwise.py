"""Channel-wise gates of deep_memory (Titans: "α channel-wise"; Miras: channel-wise η, α, δ).

θ, η, α may be ``[B, T, H, C]`` with ``C = Σ_l d_l`` (channel c of layer l gates column c of ``W_l``)
and δ ``[B, T, H, D]`` (Huber switched per coordinate). The chunked path against the naive one, both
against per-token online GD written here from the equations, per-head gates against the same gates
repeated over C, the Miras hooks, and bad input."""

from __future__ import annotations

import sys
from functools import partial

import pytest
import torch

from memlm.kernels import deep_memory
from memlm.kernels.deep_memory import MemorySpec, deep_memory_chunk, deep_memory_naive, select_path
from memlm.kernels.deep_memory.objectives import huber_bias
from memlm.kernels.deep_memory.pytorch.dual_form import implements
from memlm.testing.deep_memory_cases import with_spec
from memlm.testing.reference import online_gd

torch_path = partial(deep_memory, backend="torch")  # the chunked PyTorch path, its loop picked by select_path

F64 = torch.float64
LINEAR = dict(depth=1, expansion=1, residual=False, norm=False)  # L = 1: linear memory, C = D
TITANS = dict(depth=2, expansion=2, residual=True, norm=True)  # L = 2: residual + LayerNorm, C = 2D + D
PLAIN = dict(depth=2, expansion=3, residual=False, norm=False)  # L = 2 without residual and norm
GATES = ("lr", "momentum", "forget")
SCALES = {"lr": 0.5, "momentum": 1.0, "forget": 0.3}  # θ ∈ [0, .5], η ∈ [0, 1], α ∈ [0, .3]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a − b|| / ||b|| (0 when both are exactly zero)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def widths(cfg: dict, D: int) -> list[int]:
    """``[d_1 … d_L]``, the output units of every memory layer."""
    return [cfg["expansion"] * D] * (cfg["depth"] - 1) + [D]


def make_inputs(B=2, T=11, H=2, D=4, *, channel=GATES, n_state=None, lr_scale=1.0, positive=False, **cfg):
    """Random q, k, v, weights, momentum; the gates named in ``channel`` are ``[B, T, H, C]``, the others
    ``[B, T, H]``. Channel-wise η and α include the range ends η = 0 and α = 1 (exact in the chunked form)."""
    dims = [D, *widths(cfg, D)]
    C = sum(dims[1:])
    x = {name: torch.randn(B, T, H, D, dtype=F64) for name in ("q", "k", "v")}
    for name in GATES:
        shape = (B, T, H, C) if name in channel else (B, T, H)
        x[name] = torch.rand(shape, dtype=F64) * SCALES[name] * (lr_scale if name == "lr" else 1.0)
    if "momentum" in channel:
        x["momentum"][:, ::4, :, ::3] = 0.0
    if "forget" in channel:
        x["forget"][:, 1::5, :, 1::4] = 1.0
    lead = (H,) if n_state is None else (n_state, H)
    x["weights"] = [torch.randn(*lead, a, b, dtype=F64) / a**0.5 for a, b in zip(dims, dims[1:])]
    if positive:  # softmax retention keeps the weights on a scaled simplex
        x["weights"] = [w.abs() + 0.1 for w in x["weights"]]
    x["s0"] = [0.1 * torch.randn_like(w) for w in x["weights"]]
    for t in leaves(x):
        t.requires_grad_()
    return x


def leaves(x: dict) -> list[torch.Tensor]:
    return [x["q"], x["k"], x["v"], *(x[n] for n in GATES), *x["weights"], *x["s0"], *x.get("extra", [])]


def run(op, x, **kw):
    """``op`` on the inputs of :func:`make_inputs`; returns ``[o, *W_T, *S_T]``."""
    o, (W, S) = with_spec(
        op, x["q"], x["k"], x["v"], x["lr"], x["momentum"], x["forget"], x["weights"],
        initial_momentum=x["s0"], output_final_state=True, **kw,
    )  # fmt: skip
    return [o, *W, *S]


def assert_same(x, op_a, op_b, tol, **kw):
    """Outputs, final states and the gradients of every input agree within ``tol`` (relative)."""
    out_a, out_b = run(op_a, x, **kw), run(op_b, x, **kw)
    for a, b in zip(out_a, out_b, strict=True):
        assert rel(a, b) < tol
    cot = [torch.randn_like(t) for t in out_b]
    grads_a = torch.autograd.grad(out_a, leaves(x), cot)
    grads_b = torch.autograd.grad(out_b, leaves(x), cot)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert rel(a, b) < tol


CHANNELS = {"all": GATES, "lr": ("lr",), "momentum": ("momentum",), "forget": ("forget",)}


@pytest.mark.parametrize("cfg", [LINEAR, TITANS, PLAIN], ids=["L1", "L2-res-norm", "L2-plain"])
@pytest.mark.parametrize("channel", list(CHANNELS))
def test_chunk_matches_naive(cfg, channel):
    """T = 11 with chunks of 4 (a partial last chunk), per-sequence initial weights and momentum."""
    x = make_inputs(channel=CHANNELS[channel], n_state=2, **cfg)
    kw = dict(chunk_size=4, residual=cfg["residual"], norm=cfg["norm"])
    assert_same(x, torch_path, deep_memory_naive, 1e-10, **kw)


@pytest.mark.parametrize("cfg", [LINEAR, TITANS], ids=["L1", "L2"])
def test_chunk_matches_naive_varlen(cfg):
    x = make_inputs(B=1, T=14, n_state=4, **cfg)
    kw = dict(chunk_size=4, residual=cfg["residual"], norm=cfg["norm"], cu_seqlens=torch.tensor([0, 3, 9, 10, 14]))
    assert_same(x, torch_path, deep_memory_naive, 1e-10, **kw)


@pytest.mark.parametrize("cfg", [LINEAR, TITANS], ids=["L1", "L2"])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_online_gd_matches_per_token_loop(cfg, backend):
    """chunk_size=1 is online GD with per-unit gates: per token, ``u = ∇_W ‖M(k_t) − v_t‖²`` at the current
    W, then for every layer l and output unit c: ``S[:, c] = η[c] S[:, c] − θ[c] u[:, c]``,
    ``W[:, c] = (1 − α[c]) W[:, c] + S[:, c]``."""
    x = make_inputs(T=6, **cfg)
    res, norm = cfg["residual"], cfg["norm"]
    got = run(deep_memory, x, chunk_size=1, residual=res, norm=norm, backend=backend)
    ref_o, ref_W, ref_S = online_gd(x, res, norm)
    want = [ref_o, *ref_W, *ref_S]
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < 1e-12
    cot = [torch.randn_like(t) for t in want]
    for a, b in zip(torch.autograd.grad(got, leaves(x), cot), torch.autograd.grad(want, leaves(x), cot)):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("channel", ["all", "forget"])  # every gate, and θ, η per head with α channel-wise
@pytest.mark.parametrize("op", [torch_path, deep_memory_naive], ids=["torch", "naive"])
def test_per_head_gate_equals_gate_repeated_over_channels(op, channel):
    """A ``[B, T, H]`` gate is the same gate repeated over C (the chunked path compares its hand-written
    per-head backward with the channel-wise autograd loop)."""
    x = make_inputs(channel=(), n_state=2, **TITANS)
    C = sum(widths(TITANS, 4))
    repeated = {**x, **{n: x[n].unsqueeze(-1).expand(*x[n].shape, C) for n in CHANNELS[channel]}}
    per_head, per_channel = run(op, x, chunk_size=4), run(op, repeated, chunk_size=4)
    for a, b in zip(per_channel, per_head, strict=True):
        assert rel(a, b) < 1e-12
    cot = [torch.randn_like(t) for t in per_head]
    for a, b in zip(torch.autograd.grad(per_channel, leaves(x), cot), torch.autograd.grad(per_head, leaves(x), cot)):
        assert rel(a, b) < 1e-11


def test_channel_gates_act_on_their_own_units():
    """Forgetting only the hidden layer's units (α = 1, θ = η = 0 on channels [0, d_1)) erases W_1 and
    leaves W_2 on its own update: the channel axis is laid out layer by layer."""
    x = make_inputs(channel=GATES, **TITANS)
    d1 = widths(TITANS, 4)[0]
    with torch.no_grad():
        x["forget"][..., :d1] = 1.0
        x["lr"][..., :d1] = 0.0
        x["momentum"][..., :d1] = 0.0
        x["forget"][..., d1:] = 0.0
    for op in (torch_path, deep_memory_naive):
        _, W1, W2, S1, _ = run(op, x, chunk_size=4)
        assert not W1.any() and not S1.any()
        assert rel(W2, x["weights"][1].expand_as(W2)) > 1e-3


def test_huber_switch_norm_or_coordinate():
    """δ ``[..., 1]`` switches on ‖e‖, δ ``[..., D]`` on each |e_c| (the same rule for D = 1)."""
    e = torch.tensor([0.3, -2.0], dtype=F64)
    delta = torch.tensor([1.0], dtype=F64)
    torch.testing.assert_close(huber_bias(e, delta=delta), torch.tensor([1.0, -1.0], dtype=F64))  # ‖e‖ > 1
    torch.testing.assert_close(huber_bias(e, delta=delta.expand(2)), torch.tensor([0.6, -1.0], dtype=F64))
    small = torch.tensor([0.5], dtype=F64)
    assert torch.equal(huber_bias(small, delta=delta), huber_bias(small, delta=delta.expand(1)))


@pytest.mark.parametrize("gates", ["head", "channel"])
def test_channel_delta_huber_chunk_matches_naive(gates):
    """Channel-wise δ ``[B, T, H, D]`` through both paths (with per-head or channel-wise θ, η, α)."""
    x = make_inputs(channel=GATES if gates == "channel" else (), **TITANS)
    delta = (torch.rand(*x["q"].shape, dtype=F64) * 3).requires_grad_()
    x["extra"] = [delta]
    assert_same(x, torch_path, deep_memory_naive, 1e-10, chunk_size=4, bias="huber", delta=delta)


def test_channel_delta_switches_per_coordinate():
    """δ_t repeated over D differs from per-token δ_t where some |e_c| ≤ δ_t < ‖e‖: both paths agree
    on each rule, and the rules give different outputs."""
    x = make_inputs(channel=(), **TITANS)
    delta = torch.full(x["q"].shape[:3], 1.5, dtype=F64)
    outs = {}
    for name, d in (("norm", delta), ("coordinate", delta.unsqueeze(-1).expand_as(x["q"]))):
        chunk, naive = (
            run(torch_path, x, chunk_size=4, bias="huber", delta=d),
            run(deep_memory_naive, x, chunk_size=4, bias="huber", delta=d),
        )
        assert all(rel(a, b) < 1e-10 for a, b in zip(chunk, naive))
        outs[name] = chunk[0]
    assert rel(outs["coordinate"], outs["norm"]) > 1e-2


HOOKS = {
    "lp": (dict(bias="lp", bias_params={"p": 3.0, "nu": 4.0, "eps": 1e-3}), {}),
    "lq_norm": (dict(retention="lq_norm", retention_params={"q": 4.0}), {}),
    "softmax": (dict(retention="softmax", retention_params={"c": 2.0}), dict(positive=True, lr_scale=0.2)),
}


@pytest.mark.parametrize("hook", list(HOOKS))
def test_miras_hooks_with_channel_gates(hook):
    options, inputs = HOOKS[hook]
    x = make_inputs(channel=GATES, n_state=2, **TITANS, **inputs)
    assert_same(x, torch_path, deep_memory_naive, 1e-10, chunk_size=4, **options)


def test_dispatch_keeps_channel_gates_off_triton(monkeypatch):
    """``auto`` where it would pick Triton runs channel-wise gates on the torch chunked path, and the
    hand-written per-head backward never serves them."""
    module = sys.modules["memlm.kernels.deep_memory"]
    monkeypatch.setattr(module, "resolve_backend", lambda backend, ref: "triton")
    x = make_inputs(channel=("forget",), **TITANS)
    assert select_path("auto", x["q"], MemorySpec(), ["forget"]) == "autograd"
    autograd_loop = partial(deep_memory_chunk, loop="autograd")
    for a, b in zip(run(deep_memory, x, chunk_size=4), run(autograd_loop, x, chunk_size=4), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert implements(MemorySpec(), channel_wise=False)
    assert not implements(MemorySpec(), channel_wise=True)


def test_triton_rejects_channel_gates(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = make_inputs(channel=("momentum",), **TITANS)
    x = {n: [t.detach().float() for t in v] if isinstance(v, list) else v.detach().float() for n, v in x.items()}
    with pytest.raises(ValueError, match=r"backend='triton' takes per-head gates \[B, T, H\] only; got channel-wise"):
        run(deep_memory, x, backend="triton")


def _set(name, value):
    def edit(x):
        x[name] = value(x)

    return edit


BAD = {  # TITANS with B=2, T=11, H=2, D=4: C = 8 + 4 = 12
    "lr C": (_set("lr", lambda x: x["lr"][..., :11]),
             r"lr must be \[B, T, H\] = \[2, 11, 2\] or \[B, T, H, C\] = \[2, 11, 2, 12\] "
             r"\(C = Σ_l d_l = 8 \+ 4\), got \[2, 11, 2, 11\]"),
    "momentum rank 5": (_set("momentum", lambda x: x["momentum"][..., None]),
                        r"momentum must be \[B, T, H\] = \[2, 11, 2\] or \[B, T, H, C\] = \[2, 11, 2, 12\]"),
    "forget as D": (_set("forget", lambda x: x["forget"][..., :4]), r"forget must be .* got \[2, 11, 2, 4\]"),
    "forget > 1": (_set("forget", lambda x: x["forget"] + 1), r"forget must lie in \[0.0, 1.0\]"),
    "lr negative": (_set("lr", lambda x: x["lr"] - 1), r"lr must lie in \[0.0, inf\]"),
    "lr list": (_set("lr", lambda x: x["lr"].tolist()), r"lr must be \[B, T, H\] .* got list"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_channel_gates(case):
    edit, message = BAD[case]
    x = make_inputs(channel=GATES, **TITANS)
    edit(x)
    with pytest.raises(ValueError, match=message):
        run(deep_memory, x)


def test_bad_channel_delta():
    """δ is ``[B, T, H]`` or ``[B, T, H, D]``, never ``[B, T, H, C]``."""
    x = make_inputs(channel=GATES, **TITANS)
    bad = torch.ones(2, 11, 2, 12, dtype=F64)
    message = r"delta must be \[B, T, H\] = \[2, 11, 2\] or \[B, T, H, D\] = \[2, 11, 2, 4\], got \[2, 11, 2, 12\]"
    with pytest.raises(ValueError, match=message):
        run(deep_memory, x, bias="huber", delta=bad)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunk_matches_naive_long(chunk_size):
    """Titans shape (D = 32, expansion 4, C = 160) over 150 tokens, unit-norm keys and queries."""
    x = make_inputs(B=2, T=150, H=2, D=32, depth=2, expansion=4, residual=True, norm=True, lr_scale=0.2)
    with torch.no_grad():
        x["q"].copy_(torch.nn.functional.normalize(x["q"], dim=-1))
        x["k"].copy_(torch.nn.functional.normalize(x["k"], dim=-1))
    assert_same(x, torch_path, deep_memory_naive, 1e-10, chunk_size=chunk_size)
