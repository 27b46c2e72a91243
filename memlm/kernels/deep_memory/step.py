"""The deep-memory recurrence one token at a time from a carried state: the definition (``naive.py`` runs its
sequences through it) and exact O(1)-per-token decoding (docs/design.md §3).

Inside a chunk every gradient is taken at the chunk-start weights ``W_c``, so a token's step needs only the
carry ``(A, S, W, W_c, position)``: the dual state and momentum, the linearised weights the last token read
with, the weights this chunk's gradients are taken at, and the token's place in its chunk. One gradient, one
update, one read per token, whatever the position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .mlp import memory_apply, memory_backward, weight_linear
from .objectives import dual_state, exchanged_state
from .spec import MemorySpec
from .state import channel_axis, gates_or_defaults, initial_state, layer_slices

Read = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]
Gradient = Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Tensor], torch.Tensor | None], list[torch.Tensor]]


@dataclass
class Carry:
    """``A``, ``S``, ``W``, ``W_c``: per layer ``[N, H, d_{l−1}, d_l]`` (``W``, ``W_c`` None at a chunk start,
    where they are set from ``A``); ``position``: tokens already in the current chunk, or per row ``[N]`` for
    rows at their own places (a padded batch: :func:`stack`)."""

    A: list[torch.Tensor]
    S: list[torch.Tensor]
    W: list[torch.Tensor] | None = None
    W_c: list[torch.Tensor] | None = None
    position: int | torch.Tensor = 0


def _where(at: bool | torch.Tensor, new: Callable[[], list[torch.Tensor]], old: list[torch.Tensor] | None
           ) -> list[torch.Tensor] | None:
    """``new()`` where ``at`` holds, else ``old``: one flag, or one per row ``[N]``."""
    if not isinstance(at, torch.Tensor):
        return new() if at else old
    rows = at.view(-1, 1, 1, 1)
    return [torch.where(rows, n, o) for n, o in zip(new(), old, strict=True)]


def stack(carries: Sequence[Carry], spec: MemorySpec) -> Carry:
    """One carry of the rows of single-row carries, each keeping its own place in its chunk."""
    places = [int(c.position) for c in carries]
    mirror = spec.mirror()
    filled = [c if c.W is not None else Carry(c.A, c.S, [mirror(a) for a in c.A], [mirror(a) for a in c.A],
                                               c.position) for c in carries]  # advance would set them first
    A, S, W, W_c = ([torch.cat(rows) for rows in zip(*(getattr(c, name) for c in filled), strict=True)]
                    for name in ("A", "S", "W", "W_c"))
    position = places[0] if len(set(places)) == 1 else torch.tensor(places, device=A[0].device)
    return Carry(A, S, W, W_c, position)


def reader(spec: MemorySpec, depth: int) -> Read:
    """``M_W(x)``: the memory's read with weights ``W``."""

    def M(x: torch.Tensor, W: Sequence[torch.Tensor]) -> torch.Tensor:
        return memory_apply(x, weight_linear(W), depth, spec)[0]

    return M


def vjp_gradient(spec: MemorySpec, M: Read) -> Gradient:
    """``u_t = (∂M/∂W)ᵀ ψ(M_{W_c}(k_t) − v_t)`` by ``torch.func.vjp`` of the read (the definition)."""

    psi = spec.psi()

    def gradient(k_t: torch.Tensor, v_t: torch.Tensor, W_c: Sequence[torch.Tensor], delta_t: torch.Tensor | None
                 ) -> list[torch.Tensor]:
        m_t, vjp = torch.func.vjp(lambda *ws: M(k_t, ws), *W_c)
        return list(vjp(psi(m_t - v_t, v=v_t, delta=delta_t)))

    return gradient


def traced_gradient(spec: MemorySpec, depth: int) -> Gradient:
    """The same ``u_t`` from the read's trace, ``u_l = h_{l−1}ᵀ Δ_l`` (``mlp.memory_backward``, the chunked paths'
    chain rule): what decoding uses, without the functional transform's overhead."""

    psi = spec.psi()

    def gradient(k_t: torch.Tensor, v_t: torch.Tensor, W_c: Sequence[torch.Tensor], delta_t: torch.Tensor | None
                 ) -> list[torch.Tensor]:
        m_t, trace = memory_apply(k_t, weight_linear(W_c), depth, spec)
        deltas = memory_backward(psi(m_t - v_t, v=v_t, delta=delta_t), W_c, trace, spec)
        return [h.mT @ d for h, d in zip(trace.inputs, deltas)]

    return gradient


def advance(carry: Carry, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, gates_t: Sequence[list],
            delta_t: torch.Tensor | None, spec: MemorySpec, M: Read, gradient: Gradient) -> torch.Tensor:
    """One token (``q_t, k_t, v_t``: ``[N, H, 1, D]``; ``gates_t``: ``(θ, η, α)`` per layer ``[N, H, 1, 1 | d_l]``):
    updates ``carry`` in place and returns ``o_t = M_{W_t}(q_t)`` ``[N, H, D]`` (naive.py states the rule)."""
    mirror, lag = spec.mirror(), spec.lag_token
    position = carry.position
    mirrored = lambda: [mirror(a) for a in carry.A]  # noqa: E731
    # the weights this chunk's gradients are taken at: R(A_c), or after the lag token
    carry.W = _where(position == 0, mirrored, carry.W)
    carry.W_c = _where(position == 0, lambda: carry.W, _where(lag and position == 1, lambda: carry.W, carry.W_c))
    u = gradient(k_t, v_t, carry.W_c, delta_t)
    theta_t, eta_t, alpha_t = gates_t
    keep = [1 - alpha_l for alpha_l in alpha_t]
    # S_t = η_t S_{t−1} − θ_t u_t;  A_t = (1 − α_t) A_{t−1} + S_t;  W_t = (1 − α_t) W_{t−1} + S_t
    carry.S = [torch.addcmul(eta_l * s, theta_l, u_l, value=-1)
               for eta_l, theta_l, s, u_l in zip(eta_t, theta_t, carry.S, u)]
    carry.A = [torch.addcmul(s, keep_l, a) for keep_l, a, s in zip(keep, carry.A, carry.S)]
    if spec.retention == "none":  # R is the identity: W_c = A_c, so W follows A exactly
        carry.W = carry.A
    else:
        carry.W = [torch.addcmul(s, keep_l, w) for keep_l, w, s in zip(keep, carry.W, carry.S)]
    carry.W = _where(position == 0 if lag else position == spec.chunk_size - 1, mirrored, carry.W)  # exact step
    carry.position = (position + 1) % spec.chunk_size
    return M(q_t, carry.W).squeeze(-2)


def token_gates(lr: torch.Tensor, momentum: torch.Tensor | None, forget: torch.Tensor | None,
                widths: Sequence[int]) -> list[list[torch.Tensor]]:
    """``(θ, η, α)``, each per layer ``[B, T, H, 1 | d_l]`` (one gate per column of ``W_l``)."""
    return [layer_slices(channel_axis(g), widths) for g in gates_or_defaults(lr, momentum, forget)]


def start(weights: Sequence[torch.Tensor], momentum: Sequence[torch.Tensor] | None, spec: MemorySpec, n: int
          ) -> Carry:
    """The carry at a chunk start from an exchanged state (the op's ``final_state``; ``momentum`` None: zeros)."""
    A, S = initial_state(weights, momentum, n)
    return Carry(dual_state(spec.retention, A), S)


def exchanged(carry: Carry, spec: MemorySpec) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The exchanged state ``(W or A, S)`` of the carry (the op's ``final_state`` after the same tokens)."""
    return exchanged_state(spec.retention, spec.mirror(), carry.A), carry.S


def deep_memory_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                     momentum: torch.Tensor | None, forget: torch.Tensor | None, carry: Carry, spec: MemorySpec,
                     *, delta: torch.Tensor | None = None) -> torch.Tensor:
    """``T`` tokens of every row (``[B, T, H, D]``, gates as ``deep_memory``'s) from ``carry``, advanced in place:
    ``o [B, T, H, D]``, the outputs :func:`..deep_memory` gives at those positions."""
    widths = [a.shape[-1] for a in carry.A]
    gates = token_gates(lr, momentum, forget, widths)
    M, gradient = reader(spec, len(widths)), traced_gradient(spec, len(widths))
    outputs = []
    for t in range(q.shape[1]):
        q_t, k_t, v_t = (x[:, t].unsqueeze(-2) for x in (q, k, v))
        delta_t = None if delta is None else channel_axis(delta)[:, t, :, None]
        gates_t = [[g[:, t, :, None] for g in per_layer] for per_layer in gates]
        outputs.append(advance(carry, q_t, k_t, v_t, gates_t, delta_t, spec, M, gradient))
    return torch.stack(outputs, dim=1)
