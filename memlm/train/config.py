"""The one training-config schema (OmegaConf structured configs over dataclasses).

``load_config(path, overrides)`` merges: schema defaults ← YAML file ← dotted ``key=value``
overrides. An unknown key, a wrong type or an invalid value raises ``ConfigError`` naming
the key and what is allowed, before any work starts.

The ``model:`` section holds ``MemLMConfig`` fields, which ``MemLMConfig`` checks
(:meth:`~memlm.models.MemLMConfig.check_fields`); ``model.preset`` names a preset
(:func:`memlm.load_preset`: ``attention_tiny``, ``titans_mag_340m``, … or a YAML file of fields)
whose fields the file's and the command line's ``model.*`` keys then override.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from accelerate.utils import is_tensorboard_available, is_wandb_available
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from memlm.config_yaml import parse_yaml
from memlm.models.configuration_memlm import MemLMConfig
from memlm.presets import preset_fields

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # a checkout's run and probe configs (not installed)


class ConfigError(ValueError):
    """A configuration problem, reported with the offending key."""


@dataclass
class DataSection:
    """``source``: ``embedded`` (the standard library's Python source, no network), ``prose`` (the
    interpreter's English reference prose, ``pydoc_data``), ``arithmetic`` (generated word problems with
    worked answers), ``files`` (``path``: file, dir or glob of txt/json/jsonl/parquet) or ``hub``
    (``path``: dataset id, ``name``: its config)."""

    source: str = "embedded"
    path: str | None = None
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    text_documents: str = "file"  # text files: a document per file | paragraph (blank-line separated) | line
    streaming: bool = False
    max_documents: int | None = None
    val_documents: int = 64
    seq_len: int = 256
    document_masking: bool = False  # pack rows into one cu_seqlens batch so documents don't attend across


@dataclass
class TokenizerSection:
    """``path``: an HF tokenizer dir or hub id; when null, a byte-level BPE of ``vocab_size`` is trained."""

    path: str | None = None
    vocab_size: int = 4096
    train_documents: int | None = 4000


@dataclass
class OptimizerSection:
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ScheduleSection:
    """``cosine`` | ``wsd`` (warmup-stable-decay) | ``constant`` (constant with cooldown)."""

    name: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd / constant: fraction of steps in the final decay


@dataclass
class BatchingSection:
    """What a training loop needs besides its length (shared with the continual stream, whose tasks set it)."""

    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere | bf16 | fp32
    stop_at_step: int | None = None  # end the process after this step (simulates a killed run)


@dataclass
class TrainingSection(BatchingSection):
    steps: int = 1000


@dataclass
class CheckpointSection:
    every: int = 500
    keep_last: int = 3
    resume: bool = False  # resume from the latest checkpoint of this run
    export: bool = True  # write the HF model + tokenizer to <run>/hf at the end


@dataclass
class StepLoggingSection:
    """Logging of training steps (shared with the continual stream, which evaluates in its own section)."""

    every: int = 10
    trackers: list[str] = field(default_factory=list)  # extra Accelerate trackers: tensorboard, wandb
    progress_bar: bool = True
    batch_checksum: bool = False  # log a checksum of each step's batches (tests of exact resume)


@dataclass
class LoggingSection(StepLoggingSection):
    val_every: int = 200
    val_batches: int = 8
    sample_tokens: int = 64
    probes: bool = True  # run the short recall probes into the report at the end


@dataclass
class RunBase:
    """The sections every run has (a pretraining run, a continual stream); ``run_dir`` is ``output_dir/name``."""

    name: str = MISSING
    output_dir: str = "runs"
    model: dict[str, Any] = field(default_factory=dict)  # MemLMConfig fields and ``preset`` (see module docstring)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class RunConfig(RunBase):
    data: DataSection = field(default_factory=DataSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("embedded", "prose", "arithmetic", "files", "hub"),
    "data.text_documents": ("file", "paragraph", "line"),
    "schedule.name": ("cosine", "wsd", "constant"),
    "training.precision": ("auto", "bf16", "fp32"),
}
POSITIVE = ("data.seq_len", "training.steps", "training.micro_batch_size", "training.grad_accum",
            "checkpoint.every", "checkpoint.keep_last", "logging.every", "logging.val_every",
            "tokenizer.vocab_size", "optimizer.lr")
TRACKERS = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}  # name: is it installed?


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Value checks the type system cannot express."""
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not allowed; choose one of {list(allowed)}")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {_get(cfg, key)}")
    if cfg.data.source in ("files", "hub") and not cfg.data.path:
        raise ConfigError(f"data.path is required when data.source={cfg.data.source!r}")
    if not 0.0 <= cfg.schedule.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio must lie in [0, 1], got {cfg.schedule.min_lr_ratio}")
    if not 0.0 < cfg.schedule.decay_fraction <= 1.0:
        raise ConfigError(f"schedule.decay_fraction must lie in (0, 1], got {cfg.schedule.decay_fraction}")
    if cfg.schedule.warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps must be >= 0, got {cfg.schedule.warmup_steps}")
    for tracker in cfg.logging.trackers:
        if tracker not in TRACKERS:
            raise ConfigError(f"logging.trackers has {tracker!r}; allowed: {list(TRACKERS)} (JSONL is always on)")

    if cfg.training.stop_at_step is not None and not 0 < cfg.training.stop_at_step <= cfg.training.steps:
        raise ConfigError(f"training.stop_at_step must lie in [1, training.steps], got {cfg.training.stop_at_step}")
    if cfg.data.val_documents < 1:
        raise ConfigError(f"data.val_documents must be >= 1, got {cfg.data.val_documents}")


def check_trackers_installed(cfg: RunConfig) -> None:
    """Every requested tracker's package is importable here (checked when a run starts, not when a
    config is read: a config may be valid on another machine)."""
    for tracker in cfg.logging.trackers:
        if not TRACKERS[tracker]():
            raise ConfigError(f"logging.trackers has {tracker!r} but {tracker} is not installed: "
                              f"pip install 'memlm[{tracker}]', or drop it from logging.trackers")


def _merge(base: Any, other: Any, what: str, schema: type = RunConfig) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(err).splitlines()[0]
        if "not in" in msg:
            msg += f"; allowed keys here: {_allowed_keys(key.rpartition('.')[0], schema)}"
        raise ConfigError(f"{what}: bad key {key!r}: {msg}") from None
    except TypeError as err:  # a mapping merged into a list (``tasks.0=...``) or the reverse
        raise ConfigError(f"{what}: {err}: a list (e.g. tasks) is set whole, as tasks=[{{...}}, ...]") from None


def _allowed_keys(section: str, schema: type = RunConfig) -> list[str]:
    """Field names of the top level (``section == ""``) or of one section (list items: ``tasks[0]``)."""
    fields = dataclasses.fields(schema)
    for part in [p for p in section.split(".") if p]:
        f = next((f for f in fields if f.name == part.partition("[")[0]), None)
        if f is None or f.default_factory is dataclasses.MISSING:
            return []
        value = f.default_factory()
        if isinstance(value, list):
            item = getattr(schema, "ITEM_TYPES", {}).get(f.name)
            value = item() if item else None
        if not dataclasses.is_dataclass(value):
            return []
        fields = dataclasses.fields(value)
    return [f.name for f in fields]


def _model_section(section: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model:`` section checked by ``MemLMConfig``, with its defaults for the fields it leaves
    out (``vocab_size`` null: the tokenizer's)."""
    if not isinstance(section.get("preset"), (str, type(None))):
        raise ConfigError(f"model.preset must be a preset name or a YAML file, got {section['preset']!r}")
    fields = {k: v for k, v in section.items() if k != "preset" and not (k == "vocab_size" and v is None)}
    try:
        checked = MemLMConfig.check_fields(fields, prefix="model.")
        MemLMConfig(**{k: v for k, v in checked.items() if v is not None})
    except ValueError as err:
        raise ConfigError(str(err) if str(err).startswith("model.") else f"model: {err}") from None
    return {"preset": section.get("preset"), **MemLMConfig.field_defaults(), "vocab_size": None, **checked}


def _mixer_names(raw: Any) -> Any:
    """``model.mixer: attention`` means ``model.mixer: {name: attention}`` (also ``ratio_mixer``)."""
    model = raw.get("model") if isinstance(raw, dict) else None
    if isinstance(model, dict):
        for key in ("mixer", "ratio_mixer"):
            if isinstance(model.get(key), str):
                model[key] = {"name": model[key]}
    return raw


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), schema: type = RunConfig,
                check: Callable[[Any], None] | None = None) -> Any:
    """Schema ← ``path`` (YAML) ← ``overrides`` (``key=value``); validated (``check``, default :func:`validate`).
    Returns a ``RunConfig`` (or an instance of ``schema``, e.g. the continual stream's)."""
    cfg = OmegaConf.structured(schema)
    file_cfg = OmegaConf.create()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            file_cfg = OmegaConf.create(_mixer_names(parse_yaml(path.read_text()) or {}))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    cli: dict[str, Any] = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. training.steps=100)")
        node = cli
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        try:
            node[leaf] = parse_yaml(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
    cli_cfg = OmegaConf.create(_mixer_names(cli))
    preset = OmegaConf.select(cli_cfg, "model.preset") or OmegaConf.select(file_cfg, "model.preset")
    if preset:
        try:
            fields = preset_fields(str(preset))
        except ValueError as err:
            raise ConfigError(f"model.preset: {err}") from None
        cfg = _merge(cfg, {"model": fields}, f"model.preset {preset!r}", schema)
    cfg = _merge(cfg, file_cfg, f"config file {str(path)!r}", schema)
    cfg = _merge(cfg, cli_cfg, "command-line override", schema)
    if OmegaConf.is_missing(cfg, "name"):
        raise ConfigError("name is required (set it in the YAML or pass name=<run name>)")
    try:
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # a required key (``???``) left unset, e.g. a task's tokens
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{key} is required: {str(err).splitlines()[0]}") from None
    run.model = _model_section(run.model)
    (check or validate)(run)
    return run


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def model_kwargs(section: Mapping[str, Any]) -> dict[str, Any]:
    """The ``MemLMConfig`` keyword arguments of a (loaded) model section (``preset`` dropped, nulls dropped)."""
    return {k: v for k, v in section.items() if k != "preset" and v is not None}
