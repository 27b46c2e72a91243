"""Learning-rate multipliers over a stream of tasks (of ``optimizer.lr``; ``task_steps[i]`` optimizer steps
in task ``i``; ``step`` 0-based over the whole stream).

- ``cosine`` / ``wsd`` per task, re-warming and re-decaying (Ibrahim et al. 2024, arXiv 2403.08763 §5):
  each task restarts the run schedule (``memlm.train.optim.lr_multiplier``) over its own steps.
- ``infinite`` (ibid. §7; Singh et al. 2025, arXiv 2503.02844), with ``c`` = ``constant_lr_ratio``,
  ``m`` = ``min_lr_ratio``, ``N_w`` = ``warmup_steps``, ``N_cd`` = ``cooldown_steps``:

      (n + 1) / N_w                                      n < N_w              (warmup)
      c + (1 − c)/2 · (1 + cos(π (n − N_w)/(N_cd − N_w)))  N_w ≤ n < N_cd       (cosine cooldown)
      c                                                   otherwise            (constant)
      c · (m / c)^((k + 1)/A_i)                           the last A_i steps of task i, k = 0 … A_i − 1
                                                          (exponential anneal, reaching m at the task end)

  with ``A_i = max(1, round(anneal_fraction · task_steps[i]))``. The anneal gives the model each task-end
  evaluation measures; the next task continues from those weights at the constant rate (no re-warming).
"""

from __future__ import annotations

import math

from memlm.continual.config import ContinualScheduleSection
from memlm.train.config import ScheduleSection
from memlm.train.optim import lr_multiplier


def locate(step: int, task_steps: list[int]) -> tuple[int, int]:
    """``(task, step inside it)`` of a stream step (past the end: the last task's last step)."""
    for task, steps in enumerate(task_steps):
        if step < steps:
            return task, step
        step -= steps
    return len(task_steps) - 1, task_steps[-1] - 1


def anneal_steps(task_steps: int, cfg: ContinualScheduleSection) -> int:
    return max(1, round(cfg.anneal_fraction * task_steps))


def cooldown_end(task_steps: list[int], cfg: ContinualScheduleSection) -> int:
    """``N_cd``: the configured step, or where the first task's anneal begins."""
    if cfg.cooldown_steps is not None:
        return cfg.cooldown_steps
    return max(task_steps[0] - anneal_steps(task_steps[0], cfg), cfg.warmup_steps)


def stream_multiplier(step: int, task_steps: list[int], cfg: ContinualScheduleSection) -> float:
    """The factor of ``optimizer.lr`` at stream step ``step`` (module docstring)."""
    task, local = locate(step, task_steps)
    if cfg.name in ("cosine", "wsd"):
        per_task = ScheduleSection(name=cfg.name, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio,
                                   decay_fraction=cfg.decay_fraction)
        return lr_multiplier(local, task_steps[task], per_task)
    c, m = cfg.constant_lr_ratio, cfg.min_lr_ratio
    a = anneal_steps(task_steps[task], cfg)
    if local >= task_steps[task] - a:
        return c * (m / c) ** ((local - (task_steps[task] - a) + 1) / a)
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    end = cooldown_end(task_steps, cfg)
    if step < end:
        return c + (1 - c) / 2 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / (end - cfg.warmup_steps)))
    return c
