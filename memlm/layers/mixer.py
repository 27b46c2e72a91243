"""The token-mixer protocol every layer type implements.

``forward(x, state=None, use_cache=False, cu_seqlens=None) -> (y, new_state)``:
- ``x`` is ``[B, T, D]``; ``y`` has the same shape;
- ``state`` is what the previous call returned (``None`` = start of the sequence): the
  KV cache for attention, the recurrent state for memories; ``new_state`` is returned
  when ``use_cache`` is set (else ``None``);
- ``cu_seqlens`` marks packed documents (batch 1) that must not see each other.
Running a sequence in one call or token by token through ``state`` gives the same output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Mixer(nn.Module, ABC):
    """Base class of token mixers; subclasses register with :func:`register_mixer`."""

    mixer_name: str = ""
    packs_documents: bool = True  # accepts cu_seqlens

    @abstractmethod
    def forward(
        self,
        x: torch.Tensor,
        state: Any | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any | None]:
        """Mix tokens of ``x`` ``[B, T, D]``; see the module docstring for the state contract."""

    @abstractmethod
    def state_size(self, seq_len: int) -> int:
        """Number of state elements one sequence carries after ``seq_len`` tokens."""

    def stack_states(self, states: list[Any]) -> Any | None:
        """One batched state from the single-row states of sequences decoded so far alone (a padded
        batch's rows, each at its own position), or None when this mixer cannot decode such rows together
        (the model then runs them row by row)."""
        return None


class RowStates(list):
    """A layer's decoding state kept per batch row (rows at different positions that its mixer cannot
    decode together): the model runs that layer row by row (``memlm.models.padding``)."""


def cat_rows(states: list[Any]) -> Any:
    """Single-row states concatenated along the batch dim (tensors nested in tuples/lists/dicts; other
    leaves must agree)."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(states)
    if isinstance(first, (list, tuple)):
        return type(first)(cat_rows(list(parts)) for parts in zip(*states, strict=True))
    if isinstance(first, dict):
        return {k: cat_rows([s[k] for s in states]) for k in first}
    if any(s != first for s in states[1:]):
        raise ValueError(f"cannot stack states that differ in {first!r}")
    return first


def select_rows(state: Any, index: torch.Tensor) -> Any:
    """Select batch rows of a mixer state (tensors nested in tuples/lists/dicts; batch dim first)."""
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index.to(state.device))
    if isinstance(state, RowStates):
        first = torch.zeros(1, dtype=torch.long)  # a copy per selected row: beams never share tensors
        return RowStates(select_rows(state[i], first) for i in index.tolist())
    if isinstance(state, (list, tuple)):
        return type(state)(select_rows(s, index) for s in state)
    if isinstance(state, dict):
        return {k: select_rows(v, index) for k, v in state.items()}
    return state
