"""Training and scoring a causal LM on MQAR (Zoology's protocol, Arora et al. 2023, App. E).

AdamW, cosine learning-rate decay (after an optional linear warm-up), cross-entropy on the
query positions only, accuracy on held-out test sets after every evaluation interval, and
early stopping once the accuracy over all test queries reaches ``early_stop`` (Zoology: 0.99).
Batches are drawn from one ``(seq_len, num_kv_pairs)`` setting at a time, so no padding is
ever needed (recurrent mixers do not skip padding).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from memlm.eval.mqar.task import IGNORE_INDEX, MQARData, recall_counts
from memlm.train.config import ScheduleSection
from memlm.train.optim import build_scheduler


@dataclass
class MQARTrainResult:
    """Accuracy per test setting ``"T{seq_len}-kv{num_kv_pairs}"`` and over all test queries."""

    accuracy: float
    per_setting: dict[str, float]
    steps: int
    stopped_early: bool
    train_time_s: float
    history: list[dict[str, float]] = field(default_factory=list)


def setting_name(data: MQARData) -> str:
    return f"T{data.seq_len}-kv{data.num_kv_pairs}"


def _forward(model: torch.nn.Module, inputs: torch.Tensor, autocast: torch.dtype | None) -> Any:
    with torch.autocast(inputs.device.type, dtype=autocast, enabled=autocast is not None):
        return model(input_ids=inputs)


def _logits(model: torch.nn.Module, inputs: torch.Tensor, autocast: torch.dtype | None) -> torch.Tensor:
    return _forward(model, inputs, autocast).logits.float()


@torch.no_grad()
def evaluate_mqar(
    model: torch.nn.Module,
    test_sets: Sequence[MQARData],
    batch_size: int = 256,
    autocast: torch.dtype | None = None,
) -> tuple[float, dict[str, float]]:
    """Recall accuracy over all test query positions, and per test setting."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per: dict[str, float] = {}
    correct_all = total_all = 0
    for data in test_sets:
        correct = total = 0
        for start in range(0, len(data), batch_size):
            x = data.inputs[start:start + batch_size].to(device)
            y = data.targets[start:start + batch_size].to(device)
            c, t = recall_counts(_logits(model, x, autocast), y)
            correct, total = correct + c, total + t
        per[setting_name(data)] = correct / max(total, 1)
        correct_all, total_all = correct_all + correct, total_all + total
    model.train(was_training)
    return correct_all / max(total_all, 1), per


def _batch_plan(train_sets: Sequence[MQARData], batch_size: int,
                gen: torch.Generator) -> list[tuple[int, torch.Tensor]]:
    """One epoch: every training row once, batches within one setting, batch order shuffled."""
    plan = []
    for i, data in enumerate(train_sets):
        perm = torch.randperm(len(data), generator=gen)
        plan += [(i, perm[s:s + batch_size]) for s in range(0, len(data), batch_size)]
    order = torch.randperm(len(plan), generator=gen).tolist()
    return [plan[j] for j in order]


def mqar_schedule(total: int, warmup_frac: float = 0.0) -> ScheduleSection:
    """Zoology's schedule as the trainer's: linear warm-up over ``warmup_frac`` of the ``total``
    steps, then cosine decay to 0 (:func:`memlm.train.optim.lr_multiplier`)."""
    return ScheduleSection(name="cosine", warmup_steps=int(warmup_frac * total), min_lr_ratio=0.0)


def train_mqar(
    model: torch.nn.Module,
    train_sets: Sequence[MQARData],
    test_sets: Sequence[MQARData],
    lr: float,
    epochs: int = 1,
    batch_size: int = 64,
    weight_decay: float = 0.1,
    warmup_frac: float = 0.0,
    eval_every: int = 0,
    early_stop: float | None = 0.99,
    test_batch_size: int = 256,
    autocast: torch.dtype | None = None,
    seed: int = 0,
    progress: Any = None,
) -> MQARTrainResult:
    """Train ``model`` (any causal LM returning ``.logits``) on ``train_sets``; see module docstring.

    ``eval_every`` (steps; 0 = once per epoch) sets the evaluation interval; ``progress`` is an
    optional tqdm bar advanced once per step.
    """
    if not train_sets or not test_sets:
        raise ValueError("train_sets and test_sets must each hold at least one MQARData")
    if lr <= 0 or epochs < 1 or batch_size < 1 or not 0.0 <= warmup_frac < 1.0:
        raise ValueError(
            f"need lr > 0, epochs >= 1, batch_size >= 1 and 0 <= warmup_frac < 1; got lr={lr}, "
            f"epochs={epochs}, batch_size={batch_size}, warmup_frac={warmup_frac}"
        )
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = sum(math.ceil(len(d) / batch_size) for d in train_sets)
    total = epochs * steps_per_epoch
    interval = eval_every or steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = build_scheduler(opt, mqar_schedule(total, warmup_frac), total)
    history: list[dict[str, float]] = []
    acc, per, step, stopped = 0.0, {}, 0, False
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for i, rows in _batch_plan(train_sets, batch_size, gen):
            x = train_sets[i].inputs[rows].to(device)
            y = train_sets[i].targets[rows].to(device)
            out = _forward(model, x, autocast)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            # the mixers' auxiliary losses (MoM's load balance) join the objective, not the logged loss
            aux = getattr(out, "aux_loss", None)
            (loss if aux is None else loss + aux).backward()
            opt.step()
            sched.step()
            step += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
            if step % interval == 0 or step == total:
                acc, per = evaluate_mqar(model, test_sets, test_batch_size, autocast)
                history.append({"step": step, "loss": float(loss.item()), "accuracy": acc})
                if early_stop is not None and acc >= early_stop:
                    stopped = True
                    break
        if stopped:
            break
    return MQARTrainResult(acc, per, step, stopped, time.perf_counter() - start, history)
