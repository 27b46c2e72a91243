"""deep_memory's states at segment ends (``output_states_every``, for Memory Caching, arXiv 2602.24281;
docs/design.md §3): each equals the final state of the op run on that prefix, on the naive and the chunked
(autograd) path, for both depths, per-head and channel-wise gates, momentum, the Miras hooks, the lag token,
packed documents and initial states; the chunked path against naive with gradients; dispatch and bad input."""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch

from memlm.kernels import deep_memory
from memlm.kernels.deep_memory import BoundaryStates, MemorySpec, deep_memory_chunk, select_path
from memlm.testing.deep_memory_cases import F64, L1, L2, TOKENS, make_inputs, rel, with_spec

DISPATCH = importlib.import_module("memlm.kernels.deep_memory")  # the package (memlm.kernels.deep_memory is the op)
PATHS = {"naive": partial(deep_memory, backend="naive"), "chunked": partial(deep_memory, backend="torch")}

# cfg: the memory's depth; every: the segment length e (a multiple of chunk_size); the rest: spec fields and
# input options (momentum off, channel-wise gates, a Huber δ, positive weights for the softmax retention)
CASES = {
    "L1": dict(cfg=L1, chunk_size=2, every=4),
    "L2-no-momentum": dict(cfg=L2, chunk_size=3, every=3, momentum=False),
    "L2-channel-wise": dict(cfg=L2, chunk_size=2, every=4, channel_wise=True),
    "huber": dict(cfg=L2, chunk_size=2, every=2, bias="huber", delta=True),
    "lq-lag": dict(cfg=L2, chunk_size=2, every=4, retention="lq", lag_token=True),
    "softmax-lag-channel-wise": dict(
        cfg=L1, chunk_size=3, every=6, retention="softmax", lag_token=True, positive=True, channel_wise=True
    ),
}
# batch: two sequences of 12 tokens (the last segment ends at the end); packed: documents of 3 (shorter than
# every e here), 8 and 9 tokens, each with its own initial state
LAYOUTS = {"batch": None, "packed": [0, 3, 11, 20]}
OPTIONS = ("momentum", "channel_wise", "delta", "positive")


def build(case: dict, layout: str, seed: int = 0) -> tuple[dict, dict, int, torch.Tensor | None]:
    """float64 inputs of a case (make_inputs' q, k, v, gates, weights and initial momentum), its spec fields,
    the segment length and ``cu_seqlens``."""
    case = dict(case)
    cfg, every = case.pop("cfg"), case.pop("every")
    options = {name: case.pop(name) for name in OPTIONS if name in case}
    cu = LAYOUTS[layout]
    B, T, n_state = (2, 12, None) if cu is None else (1, cu[-1], len(cu) - 1)
    x = make_inputs(B, T, 2, 4, **cfg, momentum=options.get("momentum", True), n_state=n_state,
                    delta=options.get("delta", False), seed=seed)  # fmt: skip
    if options.get("positive"):  # the softmax retention's weights lie on a scaled simplex
        x["weights"] = [w.abs() + 0.1 for w in x["weights"]]
    if options.get("channel_wise"):  # θ, η, α per output unit: [B, T, H, C], C = Σ_l d_l
        g = torch.Generator().manual_seed(seed + 1)
        C = sum(w.shape[-1] for w in x["weights"])
        for name, scale in (("lr", 0.5), ("momentum", 1.0), ("forget", 0.2)):
            if x[name] is not None:
                x[name] = scale * torch.rand(B, T, 2, C, generator=g, dtype=F64)
    return x, case, every, None if cu is None else torch.tensor(cu)


def run(op, x: dict, spec: dict, cu_seqlens: torch.Tensor | None = None, **kw):
    """``op`` on the inputs of :func:`build` with the final state."""
    return with_spec(
        op, x["q"], x["k"], x["v"], x["lr"], x["momentum"], x["forget"], x["weights"],
        initial_momentum=x["initial_momentum"], delta=x["delta"], output_final_state=True, cu_seqlens=cu_seqlens,
        **spec, **kw,
    )  # fmt: skip


def prefix(x: dict, n: int, length: int, cu_seqlens: torch.Tensor | None) -> dict:
    """Sequence ``n``'s first ``length`` tokens as a batch of one, from its own initial state."""
    row, start = (n, 0) if cu_seqlens is None else (0, int(cu_seqlens[n]))
    y = {name: None if x[name] is None else x[name][row : row + 1, start : start + length] for name in TOKENS}
    for name in ("weights", "initial_momentum"):
        y[name] = None if x[name] is None else [t if t.dim() == 3 else t[n : n + 1] for t in x[name]]
    return y


def leaves(x: dict) -> list[torch.Tensor]:
    return [t for t in [*(x[n] for n in TOKENS), *x["weights"], *x["initial_momentum"]] if t is not None]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", list(PATHS))
def test_boundary_states_are_prefix_final_states(path, case, layout):
    x, spec, every, cu = build(CASES[case], layout)
    op = PATHS[path]
    o, final, bounds = run(op, x, spec, cu, output_states_every=every)
    assert isinstance(bounds, BoundaryStates)
    lengths = [x["q"].shape[1]] * 2 if cu is None else (cu[1:] - cu[:-1]).tolist()
    counts = [length // every for length in lengths]
    assert bounds.counts.dtype == torch.long and bounds.counts.tolist() == counts
    for A, ref in zip(bounds.A, x["weights"]):
        assert A.shape == (len(lengths), max(counts), *ref.shape[-3:])
    # the outputs and final state are those of the call without boundary states (on the chunked path the
    # Titans memory then takes the cpu or hand-written loop: equal up to rounding)
    o_plain, final_plain = run(op, x, spec, cu)
    assert rel(o, o_plain) < 1e-12
    for a, b in zip([*final[0], *final[1]], [*final_plain[0], *final_plain[1]]):
        assert rel(a, b) < 1e-12
    for n, count in enumerate(counts):
        for j in range(count):  # the prefix on the same path (``every`` keeps the chunked one on autograd)
            _, (A_ref, S_ref), _ = run(op, prefix(x, n, (j + 1) * every, cu), spec, output_states_every=every)
            for got, want in zip([*bounds.A, *bounds.S], [*A_ref, *S_ref]):
                assert rel(got[n, j], want[0]) < 1e-12, (n, j)
        for got in [*bounds.A, *bounds.S]:  # rows past the sequence's own count
            assert not got[n, count:].any()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_matches_naive_with_gradients(case, layout):
    x, spec, every, cu = build(CASES[case], layout, seed=3)
    for t in leaves(x):
        t.requires_grad_()
    outs = {}
    for path, op in PATHS.items():
        o, (A, S), bounds = run(op, x, spec, cu, output_states_every=every)
        outs[path] = [o, *A, *S, *bounds.A, *bounds.S]
    for a, b in zip(outs["chunked"], outs["naive"], strict=True):
        assert rel(a, b) < 1e-11
    # a random linear function of everything, and of the boundary states alone (which must carry gradient)
    g = torch.Generator().manual_seed(7)
    cot = [torch.randn(t.shape, generator=g, dtype=F64) for t in outs["naive"]]
    first = 1 + 2 * len(x["weights"])  # o, the final A and S, then the boundary states
    for lo in (first, 0):
        grads = {
            path: torch.autograd.grad(out[lo:], leaves(x), cot[lo:], retain_graph=lo > 0, allow_unused=True)
            for path, out in outs.items()
        }
        for a, b in zip(grads["chunked"], grads["naive"], strict=True):
            assert (a is None) == (b is None) and (a is None or rel(a, b) < 1e-10)
        assert grads["chunked"][TOKENS.index("k")].norm() > 0


@pytest.mark.parametrize("path", list(PATHS))
def test_every_past_all_sequences_gives_no_rows(path):
    x, spec, _, cu = build(CASES["L1"], "packed")
    _, _, bounds = run(PATHS[path], x, spec, cu, output_states_every=10)  # documents of 3, 8, 9 tokens
    assert bounds.counts.tolist() == [0, 0, 0]
    assert [a.shape for a in bounds.A] == [(3, 0, 2, 4, 4)] and [s.shape for s in bounds.S] == [(3, 0, 2, 4, 4)]


def test_dispatch(monkeypatch):
    """Boundary states run on naive or autograd: ``auto`` and ``torch`` pick autograd (the Titans memory would
    otherwise take the cpu or hand-written loop), an explicit Triton backend raises."""
    q = torch.zeros(1, 4, 1, 4, dtype=F64)
    spec = MemorySpec(chunk_size=2)
    for backend in ("auto", "torch"):
        assert select_path(backend, q, spec) != "autograd"
        assert select_path(backend, q, spec, boundary_states=True) == "autograd"
    assert select_path("naive", q, spec, boundary_states=True) == "naive"
    with monkeypatch.context() as m:  # ``auto`` as on CUDA tensors: Triton unless the kernels lack something
        m.setattr(DISPATCH, "resolve_backend", lambda backend, ref: "triton" if backend == "auto" else backend)
        assert select_path("auto", q.float(), spec) == "triton"
        assert select_path("auto", q.float(), spec, boundary_states=True) == "autograd"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"backend='triton' does not return the states at segment ends"):
        select_path("triton", q.float(), spec, boundary_states=True)
    x, spec_kw, every, _ = build(CASES["L1"], "batch")
    x = {n: v if not isinstance(v, torch.Tensor) else v.float() for n, v in x.items()}
    x["weights"], x["initial_momentum"] = ([t.float() for t in x[n]] for n in ("weights", "initial_momentum"))
    with pytest.raises(ValueError, match=r"backend='triton' does not return .*output_states_every"):
        run(deep_memory, x, spec_kw, output_states_every=every, backend="triton")


def test_without_every_nothing_changes():
    x, spec, _, _ = build(CASES["L1"], "batch")
    for op in PATHS.values():
        assert len(run(op, x, spec)) == 2


@pytest.mark.parametrize("every", [3, 0, -2, 4.0, True, "4"])
@pytest.mark.parametrize("path", list(PATHS))
def test_bad_every(path, every):
    x, spec, _, _ = build(CASES["L1"], "batch")  # chunk_size=2
    message = r"output_states_every must be None or a positive multiple of chunk_size=2 .*got " + repr(every)
    with pytest.raises(ValueError, match=message):
        run(PATHS[path], x, spec, output_states_every=every)


def test_loops_with_a_hand_written_backward_refuse():
    x, spec, every, _ = build(CASES["L1"], "batch")
    with pytest.raises(ValueError, match=r"output_states_every needs loop='autograd'.*got loop='hand_written'"):
        run(partial(deep_memory_chunk, loop="hand_written"), x, spec, output_states_every=every)
