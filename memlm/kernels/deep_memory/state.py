"""The deep-memory recurrent state: per-layer weights ``W_l`` and momentum ``S_l``."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
    """``(θ, η, α)`` with ``momentum=None`` read as η = 0 and ``forget=None`` as α = 0."""
    eta = torch.zeros_like(lr) if momentum is None else momentum
    alpha = torch.zeros_like(lr) if forget is None else forget
    return lr, eta, alpha
