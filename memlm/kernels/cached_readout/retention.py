"""The weights a deep-memory cache is read with.

A cache holds the state :func:`memlm.kernels.deep_memory.deep_memory` hands back (``final_state[0]``): the
weights ``W`` for the identity map and ``softmax`` (its exchanged state is ``W``), the accumulator ``A``
for the other retention maps, which the memory reads through ``W = R(A)`` (docs/design.md §3, Miras
hooks). Reading a cache therefore applies ``R`` exactly as the deep memory's exact step does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..deep_memory.objectives import WEIGHT_STATE
from ..deep_memory.spec import MemorySpec


def read_weights(spec: MemorySpec, states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``W_l`` of every cached layer state ``[..., d_{l−1}, d_l]``: ``R(A_l)``, or the state itself where it
    is already the weights (``retention`` ``none`` or one in ``WEIGHT_STATE``)."""
    if spec.retention == "none" or spec.retention in WEIGHT_STATE:
        return list(states)
    mirror = spec.mirror()
    return [mirror(a) for a in states]
