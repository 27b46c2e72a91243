"""linear_memory: torch-chunked and fla (Triton) paths against the per-token recurrence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memlm.kernels import linear_memory
from memlm.testing.triton_interpreter import interpret_fla

# family -> which inputs it uses (RetNet: a constant decay per head, expanded over B and T)
FAMILIES = {
    "linear": {},
    "retnet": {"g": "constant"},
    "mamba2": {"g": True},
    "gla": {"gk": True},
    "gla_g": {"g": True, "gk": True},
    "deltanet": {"beta": True},
    "gated_deltanet": {"g": True, "beta": True},
}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make(family: str, B: int, T: int, H: int = 2, K: int = 8, V: int = 6, N: int | None = None,
         dtype: torch.dtype = torch.float64, device: str = "cpu", decay_scale: float = 1.0) -> dict:
    """Random inputs of one family: ℓ2-normalised keys, log-decays ≤ 0, β in (0, 1), an initial state."""
    spec = FAMILIES[family]
    x = {
        "q": torch.randn(B, T, H, K, dtype=dtype),
        "k": F.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1),
        "v": torch.randn(B, T, H, V, dtype=dtype),
        "initial_state": torch.randn(B if N is None else N, H, K, V, dtype=dtype),
    }
    if spec.get("g") == "constant":
        gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=dtype))
        x["g"] = gamma.log().expand(B, T, H).contiguous()
    elif spec.get("g"):
        x["g"] = F.logsigmoid(torch.randn(B, T, H, dtype=dtype) + 2) * decay_scale
    if spec.get("gk"):
        x["gk"] = F.logsigmoid(torch.randn(B, T, H, K, dtype=dtype) + 1) * decay_scale
    if spec.get("beta"):
        x["beta"] = torch.rand(B, T, H, dtype=dtype)
    return {n: t.to(device) for n, t in x.items()}


def loss_weights(o: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random weights for any dtype and device (drawn in float64 on CPU)."""
    gen = torch.Generator().manual_seed(1)
    w_o, w_s = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (o, s))
    return w_o.to(o.device, o.dtype), w_s.to(s.device, s.dtype)


def run(inputs: dict, backend: str, grad: bool = True, **kw):
    """(o, final state, gradients of a fixed random loss wrt every input in sorted-name order)."""
    leaves = {n: t.detach().clone().requires_grad_(grad) for n, t in inputs.items()}
    o, s = linear_memory(**leaves, output_final_state=True, backend=backend, **kw)
    if not grad:
        return o, s, []
    w_o, w_s = loss_weights(o, s)
    names = sorted(leaves)
    grads = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), [leaves[n] for n in names])
    return o, s, list(zip(names, grads))


def assert_close(got, ref, tol: float) -> None:
    (o, s, grads), (o_ref, s_ref, grads_ref) = got, ref
    assert o.shape == o_ref.shape and s.shape == s_ref.shape
    assert rel(o, o_ref) < tol
    assert rel(s, s_ref) < tol
    for (name, g), (_, g_ref) in zip(grads, grads_ref):
        assert rel(g, g_ref) < tol, name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("T, chunk_size", [(1, 64), (150, 64), (50, 16)])
def test_torch_matches_naive(family, T, chunk_size):
    x = make(family, B=2, T=T)
    assert_close(run(x, "torch", chunk_size=chunk_size), run(x, "naive"), 1e-10)


def test_strong_channel_decay_float32():
    """Per-step channel decays down to exp(−9): ratios split per sub-chunk never overflow."""
    x = make("gla", B=1, T=128, decay_scale=20.0)
    assert x["gk"].min() < -8
    ref, _, _ = run(x, "naive", grad=False)
    o, s, grads = run({n: t.float() for n, t in x.items()}, "torch")
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for _, g in grads)
    assert rel(o, ref) < 1e-5


def test_reduced_precision_dtypes():
    x = {n: t.bfloat16() for n, t in make("gated_deltanet", B=1, T=40).items()}
    o, s, _ = run(x, "torch", grad=False)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32


@pytest.mark.parametrize("family", ["gla", "gated_deltanet", "retnet"])
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_varlen_equals_separate_runs(family, backend):
    """Packed documents (each from its own initial state) equal separate runs, gradients included."""
    cu = [0, 7, 40, 41, 90]
    x = make(family, B=1, T=cu[-1], N=len(cu) - 1)
    packed = run(x, backend, cu_seqlens=torch.tensor(cu), chunk_size=16)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    outs, states = [], []
    for i, (bos, eos) in enumerate(zip(cu[:-1], cu[1:])):
        part = {n: (t[i:i + 1] if n == "initial_state" else t[:, bos:eos]) for n, t in leaves.items()}
        o, s = linear_memory(**part, output_final_state=True, backend="naive")
        outs.append(o)
        states.append(s)
    o, s = torch.cat(outs, dim=1), torch.cat(states)
    w_o, w_s = loss_weights(o, s)
    names = sorted(leaves)
    grads = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), [leaves[n] for n in names])
    assert_close(packed, (o, s, list(zip(names, grads))), 1e-10)


@pytest.mark.parametrize("family", ["mamba2", "gla_g", "deltanet", "gated_deltanet"])
def test_state_continuation(family):
    """[0, T) in one call equals [0, T1) then [T1, T) continued from the carried state."""
    x = make(family, B=2, T=100)
    o, s = linear_memory(**x, output_final_state=True, backend="torch")
    first = {n: (t if n == "initial_state" else t[:, :37]) for n, t in x.items()}
    o1, s1 = linear_memory(**first, output_final_state=True, backend="torch")
    second = {n: (s1 if n == "initial_state" else t[:, 37:]) for n, t in x.items()}
    o2, s2 = linear_memory(**second, output_final_state=True, backend="torch")
    assert rel(torch.cat([o1, o2], dim=1), o) < 1e-12
    assert rel(s2, s) < 1e-12


@pytest.mark.parametrize("family", ["gla", "gated_deltanet"])
def test_decoding_steps_match_prefill(family):
    """T = 1 steps with the carried state reproduce the chunked prefill, token by token."""
    x = make(family, B=2, T=20)
    o, s = linear_memory(**x, output_final_state=True, backend="torch")
    state, steps = x["initial_state"], []
    for t in range(20):
        step = {n: v[:, t:t + 1] for n, v in x.items() if n != "initial_state"}
        o_t, state = linear_memory(**step, initial_state=state, output_final_state=True)
        steps.append(o_t)
    assert rel(torch.cat(steps, dim=1), o) < 1e-12
    assert rel(state, s) < 1e-12


@pytest.mark.parametrize("family", ["linear", "mamba2", "gla", "deltanet", "gated_deltanet"])
def test_naive_matches_fla_naive(family):
    """Our reference agrees with flash-linear-attention's own pure-PyTorch references (float32)."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    x = make(family, B=2, T=33, dtype=torch.float32)
    q, k, v, h0 = x["q"], x["k"], x["v"], x["initial_state"]
    o, s = linear_memory(**x, output_final_state=True, backend="naive")
    if family in ("linear", "mamba2"):
        g = x.get("g", torch.zeros(q.shape[:3]))
        o_ref, s_ref = naive_recurrent_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    elif family == "gla":
        o_ref, s_ref = naive_recurrent_gla(q, k, v, x["gk"], initial_state=h0, output_final_state=True)
    elif family == "deltanet":
        o_ref, s_ref = delta_rule_recurrence(*(t.transpose(1, 2) for t in (q, k, v, x["beta"])),
                                             initial_state=h0, output_final_state=True)
        o_ref = o_ref.transpose(1, 2)
    else:
        o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, x["beta"], x["g"], initial_state=h0,
                                                        output_final_state=True)
    assert rel(o, o_ref) < 1e-5
    assert rel(s, s_ref) < 1e-5


@pytest.fixture
def fla_device(triton_device: str) -> str:
    """Where fla's kernels run; on CPU (TRITON_INTERPRET=1) after ``interpret_fla``."""
    if triton_device == "cpu":
        interpret_fla()
    return triton_device


# float32 kernels vs the float64 reference: exact float32 dots in the interpreter, TF32 on CUDA
FLA_TOL = 5e-3 if torch.cuda.is_available() else 1e-5


@pytest.mark.parametrize("family", ["linear", "mamba2", "gla_g", "deltanet", "gated_deltanet"])
def test_triton_chunk_matches_naive(fla_device, family):
    """Chunk kernels (T = 70: two chunks of 64, the last ragged), initial state and all gradients."""
    x = make(family, B=1, T=70, K=16, V=16)
    ref = run(x, "naive")
    got = run({n: t.float().to(fla_device) for n, t in x.items()}, "triton")
    assert_close(got, ref, FLA_TOL)


@pytest.mark.parametrize("family", ["linear", "mamba2", "gla", "deltanet", "gated_deltanet"])
def test_triton_decoding_matches_naive(fla_device, family):
    """Without gradients and T ≤ 64 the fused_recurrent kernels run (T = 1 is a decoding step)."""
    x = make(family, B=2, T=9, K=16, V=16)
    o_ref, s_ref, _ = run(x, "naive", grad=False)
    with torch.no_grad():
        o, s, _ = run({n: t.float().to(fla_device) for n, t in x.items()}, "triton", grad=False)
    assert rel(o, o_ref) < FLA_TOL and rel(s, s_ref) < FLA_TOL


def test_triton_varlen_matches_naive(fla_device):
    x = make("gated_deltanet", B=1, T=50, N=3, K=16, V=16)
    cu = torch.tensor([0, 13, 14, 50])
    ref = run(x, "naive", cu_seqlens=cu)
    got = run({n: t.float().to(fla_device) for n, t in x.items()}, "triton", cu_seqlens=cu.to(fla_device))
    assert_close(got, ref, FLA_TOL)


def test_triton_delta_rule_float16(fla_device):
    """Plain DeltaNet in half precision goes to chunk_delta_rule (which refuses float32)."""
    x = make("deltanet", B=1, T=40, K=16, V=16)
    o_ref, s_ref, _ = run(x, "naive", grad=False)
    o, s, _ = run({n: t.half().to(fla_device) for n, t in x.items()}, "triton", grad=False, chunk_size=16)
    assert o.dtype == torch.float16
    assert rel(o, o_ref) < 5e-3 and rel(s, s_ref) < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["linear", "mamba2", "gla", "deltanet", "gated_deltanet"])
def test_triton_bfloat16_cuda(family):
    """The training dtype on GPU: fla's chunk kernels in bfloat16 against the float64 reference."""
    x = make(family, B=2, T=300, K=64, V=64)
    ref = run(x, "naive")
    got = run({n: t.to("cuda", torch.bfloat16 if n != "initial_state" else torch.float32)
               for n, t in x.items()}, "triton")
    assert_close(got, ref, 3e-2)


def test_triton_interpreted(interpreted_outcomes):
    """The Triton cases of this file, run on CPU in the TRITON_INTERPRET=1 child (conftest)."""
    outcomes, out = interpreted_outcomes(__file__)
    assert outcomes, "no Triton case collected"
    failed = [i for i, o in outcomes.items() if o != "PASSED"]
    assert not failed, f"{failed}\n{out[-4000:]}"


def _bad(**over):
    x = make("gated_deltanet", B=1, T=6, dtype=torch.float32)
    x.update(over)
    return x


BAD_INPUTS = [
    (_bad(q=torch.randn(1, 6, 2)), r"q must have shape \[B, T, H, K\]"),
    (_bad(k=torch.randn(1, 6, 2, 7)), r"k must have shape \[B, T, H, K\]"),
    (_bad(v=torch.randn(1, 5, 2, 6)), r"v must have shape \[B, T, H, V\]"),
    (_bad(g=torch.zeros(1, 6, 3)), r"g must have shape \[B, T, H\]"),
    (_bad(beta=torch.rand(1, 6)), r"beta must have shape \[B, T, H\]"),
    (_bad(beta=None, gk=torch.zeros(1, 6, 2, 4)), r"gk must have shape \[B, T, H, K\]"),
    (_bad(gk=torch.zeros(1, 6, 2, 8)), "gk .* together with beta"),
    (_bad(initial_state=torch.zeros(2, 2, 8, 6)), r"initial_state must have shape \[N, H, K, V\]"),
    (_bad(q=torch.ones(1, 6, 2, 8, dtype=torch.long)), "q must be a floating-point tensor"),
    (_bad(g=torch.full((1, 6, 2), 0.1)), "g must hold finite log-decays <= 0"),
    (_bad(g=torch.full((1, 6, 2), -math.inf)), "g must hold finite log-decays <= 0"),
    (_bad(beta=None, g=None, gk=torch.full((1, 6, 2, 8), math.nan)), "gk must hold finite log-decays"),
    (_bad(beta=torch.full((1, 6, 2), 2.5)), r"beta must lie in \[0.0, 2.0\]"),
    (_bad(scale=-1.0), "scale must be a positive number"),
    (_bad(chunk_size=0), "chunk_size must be a positive int"),
    (_bad(backend="cuda"), "backend='cuda' is not one of"),
    (_bad(backend="triton"), "needs CUDA tensors"),
    (_bad(cu_seqlens=torch.tensor([0, 3, 6]), initial_state=None, q=torch.randn(2, 6, 2, 8)), "shape"),
    (_bad(cu_seqlens=torch.tensor([1, 6])), "cu_seqlens must start at 0"),
    (_bad(cu_seqlens=torch.tensor([0, 4, 4, 6])), "strictly increasing"),
    (_bad(cu_seqlens=torch.tensor([0, 5])), "cu_seqlens must end at T=6"),
    (_bad(cu_seqlens=torch.tensor([0.0, 6.0])), "integer tensor"),
    (_bad(cu_seqlens=torch.tensor([0, 2, 6])), r"initial_state must .* = \[2, 2, 8, 6\], got \[1,"),
]


@pytest.mark.parametrize("kwargs, match", BAD_INPUTS)
def test_bad_inputs(kwargs, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=match):
        linear_memory(**kwargs)


def test_triton_chunk_size_checked_before_launch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"chunk_size must be one of \(16, 32, 64\)"):
        linear_memory(**_bad(chunk_size=48, backend="triton"))


def test_cu_seqlens_needs_batch_one():
    x = make("mamba2", B=2, T=6, dtype=torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens requires batch size 1"):
        linear_memory(**x, cu_seqlens=torch.tensor([0, 6]))
