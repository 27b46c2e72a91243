"""The auxiliary-loss channel: any mixer can add a term to the training objective.

A mixer calls :func:`report` with an :class:`AuxTerm` during its forward; the model's forward
collects every term of that pass (:func:`collect`), combines the terms of each kind over all
layers and returns the sum ``aux_loss`` (scaled) with the unscaled value of each kind
(``aux_losses``, logged by the trainer as its own metrics). Outside a collecting forward (a mixer
called on its own) reports are dropped. A kind's terms combine over layers by its ``combine``, so a
loss defined on all layers together (the Switch load balance over concatenated router logits)
is exact, not a sum of per-layer losses.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

_ACTIVE: contextvars.ContextVar[list[AuxTerm] | None] = contextvars.ContextVar("memlm_aux_terms", default=None)


@dataclass
class AuxTerm:
    """One layer's contribution to an auxiliary loss ``name`` (unscaled), weighted by ``scale``.

    Subclasses whose loss is not a sum over layers override :meth:`combine`; ``group`` holds the
    values that must agree for terms to be combined (e.g. the number of experts)."""

    name: str
    scale: float
    value: torch.Tensor = field(default_factory=lambda: torch.zeros(()))

    def group(self) -> tuple:
        return (type(self), self.name, self.scale)

    @staticmethod
    def combine(terms: list[AuxTerm]) -> torch.Tensor:
        return torch.stack([t.value.float() for t in terms]).sum()


@dataclass
class LoadBalance(AuxTerm):
    """Switch Transformer's load-balancing loss (Fedus et al. 2021, eqs. 4–6) with top-k routing:
    ``E · Σ_e f_e · P_e`` over the router logits of all layers together, ``f_e`` the fraction of
    (token, slot) choices that pick memory e (Σ_e f_e = k) and ``P_e`` the mean router probability."""

    logits: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1))  # [N, E]
    topk: int = 1

    def group(self) -> tuple:
        return (*super().group(), self.logits.shape[-1], self.topk)

    @staticmethod
    def combine(terms: list[AuxTerm]) -> torch.Tensor:
        logits = torch.cat([t.logits.float() for t in terms])  # type: ignore[attr-defined]
        num, topk = logits.shape[-1], terms[0].topk  # type: ignore[attr-defined]
        probs = logits.softmax(-1)
        chosen = probs.topk(topk, dim=-1).indices
        frac = torch.zeros_like(probs).scatter_(-1, chosen, 1.0).mean(0)
        return num * (frac * probs.mean(0)).sum()


def report(term: AuxTerm) -> None:
    """Add ``term`` to the auxiliary loss of the forward pass being collected (if any)."""
    terms = _ACTIVE.get()
    if terms is not None:
        terms.append(term)


@contextlib.contextmanager
def collect() -> Iterator[list[AuxTerm]]:
    """Collect the terms reported inside the block (nested collections see only their own)."""
    terms: list[AuxTerm] = []
    token = _ACTIVE.set(terms)
    try:
        yield terms
    finally:
        _ACTIVE.reset(token)


def combine(terms: list[AuxTerm]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """``(Σ scale · combined value, {name: combined value})``; ``(None, {})`` without terms."""
    groups: dict[tuple, list[AuxTerm]] = {}
    for term in terms:
        groups.setdefault(term.group(), []).append(term)
    total, values = None, {}
    for group in groups.values():
        value = group[0].combine(group)
        name = group[0].name
        values[name] = values[name] + value if name in values else value
        scaled = group[0].scale * value
        total = scaled if total is None else total + scaled
    return total, values
