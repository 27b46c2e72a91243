"""Naive deep-memory recurrence: one token at a time, straight from the Titans/Miras equations.

This is the definition of correctness for the chunked PyTorch and Triton paths. Slow by
design; float64-capable; its outputs are differentiable with respect to every input
(the per-token gradients are taken with ``torch.func.vjp``, which composes with autograd).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._common import segments
from .checks import check_states_every
from .spec import MemorySpec
from .state import BoundaryStates, State, channel_axis
from .step import Carry, advance, exchanged, reader, start, token_gates, vjp_gradient


def deep_memory_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor | None,
    forget: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    spec: MemorySpec,
    *,
    delta: torch.Tensor | None = None,
    initial_momentum: Sequence[torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    output_states_every: int | None = None,
) -> tuple[torch.Tensor, State | None] | tuple[torch.Tensor, State | None, BoundaryStates]:
    """Titans memory update (arXiv 2501.00663) with the Miras hooks (arXiv 2504.13173), one token at a time.

    The memory is ``spec``'s. The state is ``(A, S)`` and the memory computes with weights ``W = R(A)`` (``R``
    the retention map). For each chunk of ``spec.chunk_size`` tokens with start state ``(A_c, S_c)`` and
    ``W_c = R(A_c)``:

    * ``u_t = ∇_W ℓ(W_c; k_t, v_t) = (∂M/∂W)ᵀ ψ(M_{W_c}(k_t) − v_t)``;
    * ``S_t = η_t S_{t−1} − θ_t u_t`` and ``A_t = (1 − α_t) A_{t−1} + S_t`` (exact);
    * inside the chunk the read is linearised, ``W_t = (1 − α_t) W_{t−1} + S_t`` from ``W_c``; at the
      last token of a full chunk the map is applied exactly, ``W_t = R(A_t)``; ``o_t = M_{W_t}(q_t)``.
      A sequence that ends inside a chunk reads its last tokens linearised too, so a prefix's outputs
      never depend on where the input stops (step-by-step decoding equals the parallel pass).

    With ``spec.lag_token`` (Miras §5, Memora's parallel form) the exact step is the chunk's first
    token instead: it takes its gradient at ``W_c = R(A_c)`` and is read through ``W_1 = R(A_1)``; the
    chunk's other tokens take their gradients at ``W_1`` and are read linearised from it, and the next
    chunk starts from ``R(A_end)``. Both agree with the identity map up to where the gradients are taken.

    With ``chunk_size=1`` either is the per-token rule ``W_t = R(A_t)`` with gradients at ``W_{t−1}``:
    Moneta's ``A_t = α A_{t−1} − η ∇ℓ_p``, ``W_t = R_q(A_t)`` and Memora's
    ``W_t = c·Softmax(α log W_{t−1} − η ∇ℓ)``. With ``R`` the identity both reads agree (Titans).

    Shapes: ``q, k, v: [B, T, H, D]``; ``weights[l]``: ``[H, d_{l−1}, d_l]`` or ``[N, H, d_{l−1}, d_l]``;
    ``lr, momentum, forget``: ``[B, T, H]`` (one gate per head) or ``[B, T, H, C]`` with ``C = Σ_l d_l``
    (channel-wise): channel ``c`` of layer ``l`` gates column ``c`` of ``W_l``, ``S_t[:, c] = η_t[c] S_{t−1}[:, c]
    − θ_t[c] u_t[:, c]``, ``A_t[:, c] = (1 − α_t[c]) A_{t−1}[:, c] + S_t[:, c]``; ``delta``: ``[B, T, H]`` or
    ``[B, T, H, D]`` (see ``huber_bias``). Returns ``(o, (state_T, S_T))``; with ``output_states_every=e`` (a
    positive multiple of ``chunk_size``) also the state after every ``e``-th token of each sequence,
    ``(o, final, boundary)`` with ``boundary`` a :class:`.state.BoundaryStates` (docs/design.md §3).
    """
    check_states_every(output_states_every, spec.chunk_size)
    widths = [w.shape[-1] for w in weights]
    layer_gates = token_gates(lr, momentum, forget, widths)  # (θ, η, α) per layer [B, T, H, 1 | d_l]
    M = reader(spec, len(weights))
    gradient = vjp_gradient(spec, M)
    B, T = q.shape[:2]
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    carry_all = start(weights, initial_momentum, spec, n_seq)

    every = output_states_every
    spans = segments(cu_seqlens, T)
    counts = [0 if every is None else (end - start_) // every for start_, end in spans]
    outputs, finals_A, finals_S, bounds_A, bounds_S = [], [], [], [], []
    for i, (start_, end) in enumerate(spans):
        rows = slice(None) if cu_seqlens is None else slice(i, i + 1)
        batch = slice(None) if cu_seqlens is None else slice(0, 1)
        carry = Carry([a[rows] for a in carry_all.A], [s[rows] for s in carry_all.S])
        marks_A, marks_S = [], []  # the states after tokens e, 2e, … of this sequence
        for t in range(start_, end):
            k_t, v_t, q_t = (x[batch, t].unsqueeze(-2) for x in (k, v, q))
            delta_t = None if delta is None else channel_axis(delta)[batch, t, :, None]
            gates_t = [[g[batch, t, :, None] for g in per_layer] for per_layer in layer_gates]
            outputs.append(advance(carry, q_t, k_t, v_t, gates_t, delta_t, spec, M, gradient))
            if every is not None and (t - start_ + 1) % every == 0:
                A, S = exchanged(carry, spec)
                marks_A.append(A)
                marks_S.append(S)
        A, S = exchanged(carry, spec)
        finals_A.append(A)
        finals_S.append(S)
        if every is not None:
            bounds_A.append(_pad_marks(marks_A, carry.A, max(counts)))
            bounds_S.append(_pad_marks(marks_S, carry.S, max(counts)))

    o = torch.stack(outputs, dim=1)
    final = ([torch.cat(a) for a in zip(*finals_A)], [torch.cat(s) for s in zip(*finals_S)])
    final = final if output_final_state else None
    if every is None:
        return o, final
    per_row = counts * B if cu_seqlens is None else counts  # one span of B rows, or one row per document
    stacked = ([torch.cat(x) for x in zip(*bounds)] for bounds in (bounds_A, bounds_S))
    return o, final, BoundaryStates(*stacked, torch.tensor(per_row, dtype=torch.long, device=q.device))


def _pad_marks(marks: list[list[torch.Tensor]], like: list[torch.Tensor], n_max: int) -> list[torch.Tensor]:
    """One sequence's recorded states (``marks[j][l]: [rows, H, d_{l−1}, d_l]``) stacked per layer into
    ``[rows, n_max, H, d_{l−1}, d_l]``, zero rows after its own ``len(marks)``."""
    out = []
    for layer, ref in enumerate(like):
        rows = [m[layer] for m in marks] + [torch.zeros_like(ref)] * (n_max - len(marks))
        out.append(torch.stack(rows, dim=1) if rows else ref.new_zeros(ref.shape[0], 0, *ref.shape[1:]))
    return out
