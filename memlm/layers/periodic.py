"""Exact decoding for mixers whose parallel form works in fixed periods (chunks, segments).

The deep-memory kernels take every gradient of a chunk at the chunk-start weights, and MAC
attends within segments: a token's output depends on where its period starts. Decoding keeps
the state at the start of the current period plus the period's pending inputs, recomputes the
pending period from that state on every call, and commits the state when the period fills.
So step-by-step decoding equals the parallel forward exactly, at O(period) cost per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Run = Callable[[torch.Tensor, Any, bool], tuple[torch.Tensor, Any]]


def periodic_forward(
    run: Run,
    x: torch.Tensor,
    state: dict[str, Any] | None,
    use_cache: bool,
    period: int,
    initial: Callable[[], Any],
) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """``run(x, period_start_state, want_state) -> (y, state_after_x)`` over whole periods.

    ``state`` is ``{"base": state at the start of the pending period, "pending": its inputs
    [B, n, D]}``; ``initial()`` gives the base of a fresh sequence.
    """
    if state is None and not use_cache:
        return run(x, initial(), False)[0], None
    base, pending = (initial(), x[:, :0]) if state is None else (state["base"], state["pending"])
    xx = torch.cat([pending, x], dim=1)
    n_full = xx.shape[1] // period * period
    outputs = []
    if n_full:
        y, base = run(xx[:, :n_full], base, True)
        outputs.append(y)
    if n_full < xx.shape[1]:
        outputs.append(run(xx[:, n_full:], base, False)[0])
    y = torch.cat(outputs, dim=1)[:, pending.shape[1]:]
    return y, ({"base": base, "pending": xx[:, n_full:]} if use_cache else None)
