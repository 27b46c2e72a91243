"""Deep-memory cases shared by the kernel test files: a call with the memory's options as keywords
(:func:`with_spec`), float64 inputs, the comparison of a Triton run with the naive per-token recurrence
(outputs, final states, every input gradient) and its tolerance check."""

from __future__ import annotations

import dataclasses
import math

import torch

from memlm.kernels.deep_memory.naive import deep_memory_naive
from memlm.kernels.deep_memory.spec import MemorySpec

F64 = torch.float64
SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(MemorySpec))


def with_spec(op, *args, **kw):
    """``op(*args, spec, **rest)`` with the :class:`MemorySpec` fields among ``kw`` (``chunk_size``, ``bias``, …)
    gathered into ``spec``: every deep-memory entry (the public op, naive, chunk, Triton) takes the spec after
    the weights."""
    spec = MemorySpec(**{name: kw.pop(name) for name in list(kw) if name in SPEC_FIELDS})
    return op(*args, spec, **kw)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, or ‖a‖ when the reference is exactly zero."""
    a, b = a.detach().to("cpu", F64), b.detach().to("cpu", F64)
    den = b.norm()
    return ((a - b).norm() / den).item() if den > 0 else a.norm().item()


def make_inputs(B, T, H, D, depth, expansion, *, momentum=True, forget=True, init_momentum=True, n_state=None,
                delta=False, seed=0):
    """float64 CPU inputs: unit-norm q, k (as Titans' ℓ2-normalised projections), θ ∈ [0, .5], η ∈ [0, 1],
    α ∈ [0, .2], weights ``[H, ·, ·]`` (or ``[n_state, H, ·, ·]``), momentum state and (``delta``) a
    Huber threshold δ ∈ [0, 8]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=F64)

    q, k, v = randn(B, T, H, D), randn(B, T, H, D), randn(B, T, H, D)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    dims = [D] + [expansion * D] * (depth - 1) + [D]
    lead = (H,) if n_state is None else (n_state, H)
    weights = [randn(*lead, a, b) / math.sqrt(a) for a, b in zip(dims, dims[1:])]
    return dict(
        q=q, k=k, v=v, lr=0.5 * rand(B, T, H),
        momentum=rand(B, T, H) if momentum else None,
        forget=0.2 * rand(B, T, H) if forget else None,
        weights=weights,
        initial_momentum=[0.1 * randn(*w.shape) for w in weights] if init_momentum else None,
        delta=8 * rand(B, T, H) if delta else None,
    )


TOKENS = ("q", "k", "v", "lr", "momentum", "forget", "delta")  # per-token inputs


def _flat(x):
    return [x[n] for n in TOKENS] + x["weights"] + (x["initial_momentum"] or [])


def _prepare(x, device, dtype):
    """Detached copies of the inputs on ``device`` in ``dtype`` that require grad."""

    def cp(t):
        return None if t is None else t.detach().to(device, dtype).requires_grad_()

    y = {n: cp(x[n]) for n in TOKENS}
    y["weights"] = [cp(w) for w in x["weights"]]
    y["initial_momentum"] = None if x["initial_momentum"] is None else [cp(s) for s in x["initial_momentum"]]
    return y


def _run(op, x, cu_seqlens, **kw):
    o, (W, S) = with_spec(
        op, x["q"], x["k"], x["v"], x["lr"], x["momentum"], x["forget"], x["weights"],
        initial_momentum=x["initial_momentum"], delta=x["delta"], output_final_state=True, cu_seqlens=cu_seqlens,
        **kw,
    )  # fmt: skip
    return [o, *W, *S]


def compare(x, device, *, dtype=torch.float32, chunk_size=16, residual=True, norm=True, cu_seqlens=None,
            block_hidden=None, seed=1, **hooks) -> dict[str, float]:
    """Relative errors of the Triton path (``dtype`` on ``device``) against naive in float64 on
    the same (dtype-rounded) inputs: outputs, final states and all input gradients. ``hooks``: the
    Miras ``bias``, ``retention`` and their parameters, passed to both."""
    from memlm.kernels.deep_memory.triton.chunk import deep_memory_triton

    kw = dict(chunk_size=chunk_size, residual=residual, norm=norm, activation="gelu", **hooks)
    tri = _prepare(x, device, dtype)
    ref = _prepare(tri, "cpu", F64)  # the same (rounded) values as the kernel's inputs
    cu_dev = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=device)
    cu_cpu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    out = _run(deep_memory_triton, tri, cu_dev, block_hidden=block_hidden, **kw)
    out_ref = _run(deep_memory_naive, ref, cu_cpu, **kw)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(t.shape, generator=g, dtype=F64) for t in out_ref]
    names = ["o"] + [f"W{i}" for i in range(len(x["weights"]))] + [f"S{i}" for i in range(len(x["weights"]))]
    errs = {n: rel(a, b) for n, a, b in zip(names, out, out_ref)}
    wrt, wrt_ref = [t for t in _flat(tri) if t is not None], [t for t in _flat(ref) if t is not None]
    grads = torch.autograd.grad(out, wrt, [c.to(device, dtype) for c in cot])
    grads_ref = torch.autograd.grad(out_ref, wrt_ref, cot)
    gnames = [n for n in TOKENS if x[n] is not None]
    gnames += [f"dW{i}" for i in range(len(x["weights"]))]
    gnames += [f"dS{i}" for i in range(len(x["initial_momentum"] or []))]
    errs.update({f"grad_{n}": rel(a, b) for n, a, b in zip(gnames, grads, grads_ref)})
    return errs


def assert_close(errs: dict[str, float], tol: float) -> None:
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


L1 = dict(depth=1, expansion=1)
L2 = dict(depth=2, expansion=2)
TOL32 = 2e-5  # float32 kernels vs float64 reference (measured ≤ ~1e-5 in the interpreter)
