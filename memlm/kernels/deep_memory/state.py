"""The deep-memory recurrent state (per-layer weights ``W_l`` and momentum ``S_l``) and the layout of its gates
(per head, or per channel: one value per output unit of every layer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

State = tuple[list[torch.Tensor], list[torch.Tensor]]  # (W_l or A_l per layer, S_l per layer): [N, H, d_{l−1}, d_l]


class BoundaryStates(NamedTuple):
    """The states at segment ends (``output_states_every=e``, a multiple of ``chunk_size``; Memory Caching,
    arXiv 2602.24281; docs/design.md §3): after tokens ``e, 2e, …`` of each sequence, each exactly the final
    state of the op run on that prefix (the same exchanged representation: ``W`` for the retentions in
    ``WEIGHT_STATE``, else ``A``). ``A[l]``, ``S[l]``: ``[N, n_max, H, d_{l−1}, d_l]``; row ``j`` of sequence
    ``n`` is the state after its token ``(j + 1)·e`` for ``j < counts[n] = ⌊T_n / e⌋`` and zeros beyond;
    ``counts``: ``[N]`` long; ``n_max = max_n counts[n]`` (0: every sequence is shorter than ``e``)."""

    A: list[torch.Tensor]
    S: list[torch.Tensor]
    counts: torch.Tensor


def initial_state(
    weights: Sequence[torch.Tensor], initial_momentum: Sequence[torch.Tensor] | None, n: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Broadcast the initial state to one copy per sequence: ``[N, H, d_{l−1}, d_l]`` each.

    ``weights[l]`` (and ``initial_momentum[l]``) are shared ``[H, d_{l−1}, d_l]`` or per
    sequence ``[N, H, d_{l−1}, d_l]``; missing momentum is ``S_0 = 0``.
    """
    W = [w.expand(n, *w.shape[-3:]) for w in weights]
    if initial_momentum is None:
        S = [torch.zeros_like(w) for w in W]
    else:
        S = [s.expand(n, *s.shape[-3:]) for s in initial_momentum]
    return W, S


def gates_or_defaults(
    lr: torch.Tensor, momentum: torch.Tensor | None, forget: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(θ, η, α)`` with ``momentum=None`` read as η = 0 and ``forget=None`` as α = 0 (shaped like ``lr``)."""
    eta = torch.zeros_like(lr) if momentum is None else momentum
    alpha = torch.zeros_like(lr) if forget is None else forget
    return lr, eta, alpha


def channel_axis(gate: torch.Tensor) -> torch.Tensor:
    """A gate with a trailing channel axis: per head ``[B, T, H] → [B, T, H, 1]`` (one value shared by
    every channel), channel-wise ``[B, T, H, C]`` unchanged."""
    return gate.unsqueeze(-1) if gate.dim() == 3 else gate


def layer_slices(x: torch.Tensor, widths: Sequence[int], dim: int = -1) -> list[torch.Tensor]:
    """``x``'s channel axis ``dim`` cut into each layer's output units (``C = Σ_l d_l``, ``widths = [d_1 … d_L]``):
    channel ``c`` of layer ``l`` gates column ``c`` of ``W_l``. A size-1 axis (a per-head gate) serves every layer."""
    if x.shape[dim] == 1:
        return [x] * len(widths)
    return list(x.split(list(widths), dim))
