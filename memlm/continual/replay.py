"""Replay of earlier tasks: a reservoir of packed rows and the controller deciding how much of each batch
it fills.

- :class:`ReplayBuffer`: Vitter's reservoir sampling (algorithm R): after ``n`` rows were offered, each is
  held with probability ``capacity / n``. A task's rows are offered when the task ends, in the order its
  loader read them (the global order: every process builds the same buffer). Saved with the checkpoint.
- :class:`ReplayMixer`: the global batch of ``G`` rows (micro-batch × processes) gets ``r_k`` replayed
  rows at batch ``k``, ``r_k = ⌊credit_k + f_k·G⌋`` carrying the remainder (so over many batches exactly
  the fraction ``f``); they replace the batch's last ``r_k`` global slots, drawn from the buffer by a
  generator seeded with ``(seed, task, k)``: the same batches for 1 or N processes and after a resume.
- A controller gives ``f_k``: :class:`FixedFraction` (``replay.fraction``). The interface
  (:class:`ReplayController`) also sees every evaluation, so a controller reacting to measured forgetting
  (TRC²'s) plugs in as another entry of :data:`CONTROLLERS`.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from memlm.train.data import Batch


class ReplayBuffer:
    def __init__(self, capacity: int, seq_len: int, seed: int) -> None:
        self.capacity = capacity
        self.rows = torch.zeros(0, seq_len, dtype=torch.long)
        self.starts = torch.zeros(0, seq_len, dtype=torch.bool)
        self.offered = 0
        self.generator = torch.Generator().manual_seed(seed * 7919 + 17)

    def __len__(self) -> int:
        return len(self.rows)

    def offer(self, batch: Batch) -> None:
        """Offer each row of ``batch`` (in order) to the reservoir."""
        keep_rows, keep_starts = list(self.rows), list(self.starts)
        for ids, starts in zip(batch.input_ids, batch.starts, strict=True):
            if len(keep_rows) < self.capacity:
                keep_rows.append(ids.clone())
                keep_starts.append(starts.clone())
            else:
                j = int(torch.randint(0, self.offered + 1, (1,), generator=self.generator))
                if j < self.capacity:
                    keep_rows[j], keep_starts[j] = ids.clone(), starts.clone()
            self.offered += 1
        if keep_rows:
            self.rows, self.starts = torch.stack(keep_rows), torch.stack(keep_starts)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "starts": self.starts, "offered": self.offered,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self.starts, self.offered = state["rows"], state["starts"], int(state["offered"])
        self.generator.set_state(state["generator"])


class ReplayController(Protocol):
    """Decides the replayed fraction of each batch; sees every evaluation of every task."""

    def fraction(self, task: int, step: int) -> float: ...

    def observe(self, step: int, losses: list[float]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedFraction:
    """``replay.fraction`` of every batch from the second task on."""

    def __init__(self, fraction: float) -> None:
        self.value = fraction

    def fraction(self, task: int, step: int) -> float:
        return self.value if task > 0 else 0.0

    def observe(self, step: int, losses: list[float]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


CONTROLLERS = {"fixed": FixedFraction}


class ReplayMixer:
    """Replaces rows of each micro-batch with replayed ones (module docstring); ``credit`` is its state."""

    def __init__(self, buffer: ReplayBuffer, controller: ReplayController, micro_batch_size: int, rank: int,
                 world: int, seed: int) -> None:
        self.buffer, self.controller = buffer, controller
        self.mb, self.rank, self.world, self.seed = micro_batch_size, rank, world, seed
        self.credit = 0.0
        self.replayed = 0  # global rows replayed so far (logged)

    def mix(self, batch: Batch, task: int, step: int, index: int) -> Batch:
        """``batch`` (this process's rows of global micro-batch ``index`` of ``task``) with its replayed rows."""
        fraction = self.controller.fraction(task, step) if len(self.buffer) else 0.0
        g = self.mb * self.world
        self.credit += fraction * g
        count = min(math.floor(self.credit + 1e-9), g)
        self.credit -= count
        if count == 0:
            return batch
        self.replayed += count
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + task * 10_007 + index)
        picks = torch.randint(0, len(self.buffer), (count,), generator=gen)
        ids, starts = batch.input_ids.clone(), batch.starts.clone()
        for slot, pick in zip(range(g - count, g), picks.tolist(), strict=True):
            if slot // self.mb == self.rank:
                ids[slot % self.mb], starts[slot % self.mb] = self.buffer.rows[pick], self.buffer.starts[pick]
        return Batch(ids, starts)

    def state_dict(self) -> dict[str, Any]:
        return {"credit": self.credit, "replayed": self.replayed, "controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.credit, self.replayed = float(state["credit"]), int(state["replayed"])
        self.controller.load_state_dict(state["controller"])
