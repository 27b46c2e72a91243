"""The continual-pretraining config: the run config's sections (model, tokenizer, optimizer, checkpoint,
logging) plus a list of ``tasks`` (each a data source with a token budget), the stream's schedule, replay
and evaluation. Loaded like a run config (``memlm.train.config.load_config``): schema ← YAML ← ``key=value``,
an unknown key or bad value named before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from omegaconf import MISSING

from memlm.train.config import TRACKERS as TRACKER_NAMES
from memlm.train.config import (
    BatchingSection,
    ConfigError,
    DataSection,
    RunBase,
    StepLoggingSection,
    load_config,
)


@dataclass
class TaskSection:
    """One task of the stream: ``data`` (the run config's data section; every task's ``seq_len`` must agree)
    and ``tokens``, its training budget (rounded down to whole optimizer steps)."""

    name: str = MISSING
    data: DataSection = field(default_factory=DataSection)
    tokens: int = MISSING


@dataclass
class ContinualScheduleSection:
    """``cosine`` / ``wsd``: every task re-warms (``warmup_steps`` linear) and re-decays to ``min_lr_ratio``
    (Ibrahim et al. 2024, arXiv 2403.08763). ``infinite`` (ibid. §7; Singh et al. 2025, arXiv 2503.02844):
    one warmup, a cosine cooldown to ``constant_lr_ratio`` ending at ``cooldown_steps`` (null: where the first
    task's anneal begins), the constant rate, and before each task's end an exponential anneal to
    ``min_lr_ratio`` over its last ``anneal_fraction``; the next task continues at the constant rate."""

    name: str = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # 3e-5 / 3e-4 in 2403.08763
    decay_fraction: float = 0.2  # wsd: the last fraction of each task decays linearly
    constant_lr_ratio: float = 0.55  # infinite: η_const / η_max (1.65e-4 / 3e-4)
    cooldown_steps: int | None = None
    anneal_fraction: float = 0.1


@dataclass
class ReplaySection:
    """A reservoir of ``buffer_rows`` packed rows of the finished tasks; ``fraction`` of each global batch's
    rows is drawn from it (0 during the first task). ``controller`` decides the fraction: ``fixed``."""

    fraction: float = 0.05
    buffer_rows: int = 2048
    controller: str = "fixed"


@dataclass
class ContinualEvalSection:
    """Held-out loss of every task (its ``val_documents``, the first ``val_batches`` micro-batches of rows)
    after each task, before the first, and every ``every`` steps (0: only at task ends)."""

    every: int = 0
    val_batches: int = 4


@dataclass
class ContinualConfig(RunBase):
    tasks: list[TaskSection] = field(default_factory=list)
    schedule: ContinualScheduleSection = field(default_factory=ContinualScheduleSection)
    replay: ReplaySection = field(default_factory=ReplaySection)
    training: BatchingSection = field(default_factory=BatchingSection)
    eval: ContinualEvalSection = field(default_factory=ContinualEvalSection)
    logging: StepLoggingSection = field(default_factory=StepLoggingSection)

    ITEM_TYPES: ClassVar[dict[str, type]] = {"tasks": TaskSection}  # list items, for error messages

    @property
    def seq_len(self) -> int:
        return self.tasks[0].data.seq_len


SCHEDULES = ("cosine", "wsd", "infinite")
CONTROLLERS = ("fixed",)


def validate(cfg: ContinualConfig) -> None:
    """Value checks the type system cannot express, each naming its key."""
    if not cfg.tasks:
        raise ConfigError("tasks must list at least one task (name, data, tokens)")
    names = [t.name for t in cfg.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks have repeated names {names}; each task needs its own name")
    for i, task in enumerate(cfg.tasks):
        where = f"tasks[{i}] ({task.name})"
        if task.tokens <= 0:
            raise ConfigError(f"{where}.tokens must be > 0, got {task.tokens}")
        if task.data.source not in ("embedded", "prose", "arithmetic", "files", "hub"):
            raise ConfigError(f"{where}.data.source={task.data.source!r} is not allowed; choose one of "
                              "['embedded', 'prose', 'arithmetic', 'files', 'hub']")
        if task.data.source in ("files", "hub") and not task.data.path:
            raise ConfigError(f"{where}.data.path is required when data.source={task.data.source!r}")
        if task.data.streaming:
            raise ConfigError(f"{where}.data.streaming must be false: a task's rows are packed in memory "
                              "(its budget is a few passes or less; use data.max_documents to bound it)")
        if task.data.seq_len != cfg.seq_len:
            raise ConfigError(f"{where}.data.seq_len={task.data.seq_len} differs from tasks[0]'s {cfg.seq_len}; "
                              "every task of a stream trains at one sequence length")
        if task.data.val_documents < 1:
            raise ConfigError(f"{where}.data.val_documents must be >= 1, got {task.data.val_documents}")
    s = cfg.schedule
    if s.name not in SCHEDULES:
        raise ConfigError(f"schedule.name={s.name!r} is not allowed; choose one of {list(SCHEDULES)}")
    for key in ("min_lr_ratio", "constant_lr_ratio"):
        if not 0.0 < getattr(s, key) <= 1.0:
            raise ConfigError(f"schedule.{key} must lie in (0, 1], got {getattr(s, key)}")
    if s.name == "infinite" and s.min_lr_ratio > s.constant_lr_ratio:
        raise ConfigError(f"schedule.min_lr_ratio={s.min_lr_ratio} must be <= schedule.constant_lr_ratio="
                          f"{s.constant_lr_ratio}: the anneal goes down from the constant rate")
    for key in ("decay_fraction", "anneal_fraction"):
        if not 0.0 < getattr(s, key) <= 1.0:
            raise ConfigError(f"schedule.{key} must lie in (0, 1], got {getattr(s, key)}")
    if s.warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
    if not 0.0 <= cfg.replay.fraction < 1.0:
        raise ConfigError(f"replay.fraction must lie in [0, 1), got {cfg.replay.fraction}")
    if cfg.replay.controller not in CONTROLLERS:
        raise ConfigError(f"replay.controller={cfg.replay.controller!r} is not allowed; choose one of "
                          f"{list(CONTROLLERS)}")
    positive = {"replay.buffer_rows": cfg.replay.buffer_rows, "training.micro_batch_size":
                cfg.training.micro_batch_size, "training.grad_accum": cfg.training.grad_accum,
                "eval.val_batches": cfg.eval.val_batches, "checkpoint.every": cfg.checkpoint.every,
                "checkpoint.keep_last": cfg.checkpoint.keep_last, "logging.every": cfg.logging.every,
                "optimizer.lr": cfg.optimizer.lr, "tokenizer.vocab_size": cfg.tokenizer.vocab_size}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if cfg.eval.every < 0:
        raise ConfigError(f"eval.every must be >= 0 (0: only at task ends), got {cfg.eval.every}")
    if cfg.training.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"training.precision={cfg.training.precision!r} is not allowed; choose one of "
                          "['auto', 'bf16', 'fp32']")
    for tracker in cfg.logging.trackers:
        if tracker not in TRACKER_NAMES:
            raise ConfigError(f"logging.trackers has {tracker!r}; allowed: {list(TRACKER_NAMES)} (JSONL is always on)")


def load_continual_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ContinualConfig:
    """Schema ← ``path`` ← ``overrides``, validated (a ``ConfigError`` names the key)."""
    return load_config(path, overrides, schema=ContinualConfig, check=validate)

