"""Deep (MLP) memory trained online by chunked gradient descent with momentum and decay.

Titans (Behrouz, Zhong, Mirrokni 2025, arXiv 2501.00663) and the Miras variants (Behrouz et al.
2025, arXiv 2504.13173): the memory is an MLP ``M_W``; every token writes ``(k_t, v_t)`` by one
gradient step on an attentional bias ``ℓ_t(W)`` (default ``‖M_W(k_t) − v_t‖²``) and reads
``o_t = M_{W_t}(q_t)``. The memory is described by one :class:`MemorySpec`; every path agrees with
the per-token reference ``naive.py``. Layout, by path (:func:`select_path` picks one):

* ``naive.py`` — the per-token reference; ``spec.py``, ``checks.py`` (the op's argument checks) and the
  math every path shares: ``objectives.py`` (biases ψ, retention maps R), ``coefficients.py`` (the b×b
  chunk coefficients), ``mlp.py`` (the memory function and its backward), ``state.py``;
* ``pytorch/`` — the chunked dual form in plain PyTorch (``chunk.py``) and its loop with a hand-written
  backward (``dual_form.py``);
* ``cpu/`` — that loop compiled for CPU (``dual_form.cpp``, its loader and autograd function);
* ``triton/`` — the Triton kernels (CUDA; on CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from itertools import product

import torch

from .._common import resolve_backend
from .checks import channel_wise_gates, validate
from .cpu import loader as cpu_loader
from .mlp import ACTIVATIONS
from .naive import deep_memory_naive
from .objectives import BIASES, RETENTIONS
from .pytorch.chunk import deep_memory_chunk
from .pytorch.dual_form import implements
from .spec import MemorySpec
from .state import BoundaryStates, State

__all__ = [
    "ACTIVATIONS", "BIASES", "PATHS", "RETENTIONS", "BoundaryStates", "MemorySpec", "deep_memory", "deep_memory_chunk",
    "deep_memory_naive", "select_path",
]  # fmt: skip

# the (bias, retention) pairs the Triton kernels implement (triton/bias.py, triton/retention.py): all of them
TRITON_HOOKS = tuple(product(("l2", "lp", "huber", "dot", "l2_clip"), ("none", "lq", "lq_norm", "softmax", "max_norm")))
PATHS = ("naive", "autograd", "hand_written", "cpu", "triton")


def _triton_gap(spec: MemorySpec, channel_wise: Sequence[str], boundary_states: bool = False) -> str | None:
    """What the Triton kernels lack to run ``spec`` with these gates (and, with ``boundary_states``, to return
    the states at segment ends), as a phrase for the error; None if nothing."""
    if boundary_states:
        return "does not return the states at segment ends (output_states_every)"
    if channel_wise:
        return f"takes per-head gates [B, T, H] only; got channel-wise {list(channel_wise)}"
    if (spec.bias, spec.retention) not in TRITON_HOOKS:
        supported = "; ".join(
            f"bias={b!r} with retention in {tuple(r for c, r in TRITON_HOOKS if c == b)}"
            for b in dict.fromkeys(c for c, _ in TRITON_HOOKS)
        )
        return f"implements {supported}; got bias={spec.bias!r}, retention={spec.retention!r}"
    if spec.lag_token:
        return "does not implement lag_token=True (the exact step at a chunk's first token)"
    if spec.retention == "softmax" and (spec.retention_params or {}).get("c") is None:
        return "takes retention='softmax' with an explicit retention_params c only, not the fan-in default"
    return None


def select_path(
    backend: str, q: torch.Tensor, spec: MemorySpec, channel_wise: Sequence[str] = (), boundary_states: bool = False
) -> str:
    """The implementation that runs the op, one of ``PATHS``: the only place the path is decided.

    Inputs: ``backend``, ``q`` (its device and dtype), ``spec`` (hooks, activation), ``channel_wise`` (the
    names of the gates given channel-wise), ``boundary_states`` (``output_states_every`` is set: only ``naive``
    and ``autograd`` record the states at segment ends), ``TRITON_INTERPRET`` and ``MEMLM_CPU_KERNEL``. The
    first matching row wins:

    ==================  ========================================================================  ================
    backend             inputs                                                                    path
    ==================  ========================================================================  ================
    not one of          ``auto``, ``naive``, ``torch``, ``triton``                                ValueError
    ``naive``           any                                                                       ``naive``
    ``triton``          CPU tensors without ``TRITON_INTERPRET=1``, or bfloat16 under it           ValueError
    ``triton``          what the kernels lack (:func:`_triton_gap`): the states at segment ends,  ValueError
                        channel-wise gates, (bias, retention) not in ``TRITON_HOOKS``, the lag
                        token, softmax without ``c``
    ``triton``          otherwise                                                                 ``triton``
    ``auto``            CUDA tensors and nothing the kernels lack                                 ``triton``
    ``auto``/``torch``  the states at segment ends (``boundary_states``)                          ``autograd``
    ``auto``/``torch``  not the Titans memory: bias ≠ ``l2``, retention ≠ ``none``, φ without a    ``autograd``
                        hand-written φ'', or channel-wise gates (:func:`.dual_form.implements`)
    ``auto``/``torch``  CPU float32/float64 tensors, GELU, ``MEMLM_CPU_KERNEL`` unset or ``1``      ``cpu``
                        (another value: ValueError) and the extension builds
    ``auto``/``torch``  otherwise: CUDA tensors or other dtypes, ``MEMLM_CPU_KERNEL=0``, or the     ``hand_written``
                        build failed (a warning, once)
    ==================  ========================================================================  ================

    The paths: ``naive`` — :func:`.naive.deep_memory_naive`, one token at a time; ``autograd`` —
    :func:`.pytorch.chunk.deep_memory_chunk` with its chunk loop differentiated by autograd;
    ``hand_written`` — the same with :class:`.pytorch.dual_form.DualFormChunks` (hand-written backward);
    ``cpu`` — the same with that loop compiled (:class:`.cpu.function.CompiledDualFormChunks`); ``triton``
    — :func:`.triton.chunk.deep_memory_triton`, which rejects what its kernels lack (more than 2 layers,
    ``D > 128``, ``chunk_size > 64``) with a ValueError rather than falling back.
    """
    resolved = resolve_backend(backend, q)
    if resolved == "naive":
        return "naive"
    if resolved == "triton":
        gap = _triton_gap(spec, channel_wise, boundary_states)
        if gap is None:
            return "triton"
        if backend == "triton":
            raise ValueError(f"backend='triton' {gap} (backend='torch' or 'auto' runs it)")
    if boundary_states or not implements(spec, bool(channel_wise)):
        return "autograd"
    compiled = (
        q.device.type == "cpu"
        and q.dtype in cpu_loader.DTYPES
        and spec.activation in cpu_loader.ACTIVATIONS
        and cpu_loader.enabled()
        and cpu_loader.load() is not None
    )
    return "cpu" if compiled else "hand_written"


def deep_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor | None,
    forget: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    spec: MemorySpec | None = None,
    *,
    delta: torch.Tensor | None = None,
    initial_momentum: Sequence[torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    output_states_every: int | None = None,
    backend: str = "auto",
    **spec_fields: object,
) -> tuple[torch.Tensor, State | None] | tuple[torch.Tensor, State | None, BoundaryStates]:
    """Titans neural memory (arXiv 2501.00663): momentum, forgetting, retrieval on ``[B, T, H, D]``.

    The memory is ``spec`` (:class:`MemorySpec`; its fields may also be given as keywords, ``chunk_size=4,
    bias="huber"``, which override ``spec``'s). Memory ``M(x) = x + LN(h_L)`` (``residual``, ``norm``) with
    ``h_l = φ(h_{l−1} W_l)`` and no activation after ``W_L``; per-token gates ``lr`` θ ≥ 0, ``momentum``
    η ∈ [0, 1] (None: η = 0), ``forget`` α ∈ [0, 1] (None: α = 0), each ``[B, T, H]``. For each chunk of
    ``chunk_size`` tokens, ``u_t = ∇_W ℓ_t`` at the previous chunk's end weights, ``S_t = η_t S_{t−1} − θ_t u_t``,
    ``W_t = (1 − α_t) W_{t−1} + S_t``, ``o_t = M_{W_t}(q_t)``; ``chunk_size=1`` is online GD.

    Channel-wise gates (Titans: "α channel-wise"; Miras: channel-wise η, α, δ): each of ``lr``,
    ``momentum``, ``forget`` may instead be ``[B, T, H, C]`` with ``C = Σ_l d_l`` (the output units of
    every layer, concatenated; depth 2, expansion 4: ``C = 4D + D``). Channel ``c`` of layer ``l`` gates
    column ``c`` of ``W_l`` (the incoming weights of one output unit): ``S_t[:, c] = η_t[c] S_{t−1}[:, c]
    − θ_t[c] u_t[:, c]``, ``A_t[:, c] = (1 − α_t[c]) A_{t−1}[:, c] + S_t[:, c]``. A ``[B, T, H]`` gate
    equals that gate repeated over ``C``; the forms may be mixed. The Triton backend takes per-head
    gates only (``auto`` falls back to ``torch``).

    ``weights[l]``: ``[H, d_{l−1}, d_l]`` (shared) or ``[N, H, d_{l−1}, d_l]`` (a state), with
    ``d_0 = d_L = D``; ``initial_momentum`` likewise (None: zeros). ``cu_seqlens``: packed
    documents (batch 1), each starting from its own row of the state. Returns ``(o, final_state)``
    with ``final_state = (W_T list, S_T list)``, each ``[N, H, d_{l−1}, d_l]``, if
    ``output_final_state``.

    ``output_states_every`` (Memory Caching, arXiv 2602.24281; docs/design.md §3): None, or ``e`` a positive
    multiple of ``chunk_size``: returns ``(o, final_state, boundary_states)``, the states after tokens ``e, 2e,
    …`` of each sequence (``j·e ≤`` its length), each exactly the ``final_state`` of the op run on that prefix,
    differentiable like ``o``: a :class:`BoundaryStates` ``(A, S, counts)`` with ``A[l], S[l]: [N, n_max, H,
    d_{l−1}, d_l]``, ``counts: [N]`` long (``⌊T_n / e⌋``), ``n_max = max counts`` and zero rows past a
    sequence's count. Runs on ``naive`` or ``autograd`` (``backend='triton'`` raises; ``auto`` falls back).

    Miras hooks (``objectives``; the exact chunked semantics are in ``deep_memory_naive``):
    ``bias`` ∈ ``BIASES`` — ``"l2"`` ‖e‖², ``"lp"`` (Moneta; ``bias_params`` ``p`` ≥ 1 default 3,
    ``nu`` > 0, ``eps`` > 0), ``"huber"`` (Yaad; needs ``delta`` δ ≥ 0: ``[B, T, H]`` switches on ‖e‖,
    channel-wise ``[B, T, H, D]`` per coordinate), ``"dot"``
    −⟨M(k), v⟩. ``retention`` ∈ ``RETENTIONS`` — the map ``W = R(A)`` from the state ``A`` to the
    weights, exact at chunk ends (or, with ``lag_token``, at chunk starts): ``"none"``, ``"lq"`` (Moneta, the
    mirror map of the ℓq objective ``sign(A)|A|^{r−1}·(mean|A|^r)^{(2−r)/r}``, r = q/(q − 1); ``retention_params``
    ``q`` > 1 default 4, ``eps`` > 0; the state is the accumulator ``A``), ``"lq_norm"`` (the printed
    ``A / ‖A‖_q^{q−2}``, ``q`` ≥ 2), ``"softmax"`` (Memora, ``c·Softmax`` over each output unit's inputs;
    ``c`` > 0, default the fan-in ``d_in``; ``weights`` and the final state are the positive weights ``W``).

    ``backend`` (``"auto" | "naive" | "torch" | "triton"``) with the inputs picks the implementation:
    :func:`select_path`.
    """
    spec = MemorySpec(**spec_fields) if spec is None else replace(spec, **spec_fields)
    gates = {"lr": lr, "momentum": momentum, "forget": forget, "delta": delta}
    validate(q, k, v, gates, weights, initial_momentum, cu_seqlens, spec, output_states_every)
    path = select_path(backend, q, spec, channel_wise_gates(gates), output_states_every is not None)
    args = (q, k, v, lr, momentum, forget, weights, spec)
    call = dict(delta=delta, initial_momentum=initial_momentum, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens)
    if output_states_every is not None:  # only the paths that record them take the argument
        call["output_states_every"] = output_states_every
    if path == "naive":
        return deep_memory_naive(*args, **call)
    if path == "triton":
        from .triton.chunk import deep_memory_triton

        return deep_memory_triton(*args, **call)
    return deep_memory_chunk(*args, **call, loop=path)
