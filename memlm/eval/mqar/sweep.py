"""The MQAR sweep (Zoology Fig. 2 / Based Fig. 2): for every mixer × ``d_model`` × learning rate,
train a small memlm model (2 layers by default) on the training settings, keep the best
learning rate per (mixer, ``d_model``), and report accuracy per test ``(seq_len, num_kv_pairs)``
against the recurrent state size at that test length.

Configs are YAML (``configs/probes/mqar_*.yaml``) read into :class:`MQARSweepConfig` with
OmegaConf, so dotted ``key=value`` overrides work from the command line.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm

from memlm.config_yaml import read_yaml
from memlm.eval.io.plots import plot_accuracy_vs_state
from memlm.eval.io.records import environment, markdown_table, pct, write_json
from memlm.eval.mqar.state_size import recurrent_state_size
from memlm.eval.mqar.task import MQARData, drop_overlap, generate_mqar
from memlm.eval.mqar.train import setting_name, train_mqar


@dataclass
class MQARSetting:
    seq_len: int = 64
    num_kv_pairs: int = 4
    num_examples: int = 1000


@dataclass
class MixerEntry:
    """``mixer``: the memlm mixer spec; ``model``: extra ``MemLMConfig`` fields (e.g. ``num_heads``)."""

    label: str = "attention"
    mixer: dict[str, Any] = field(default_factory=lambda: {"name": "attention"})
    model: dict[str, Any] = field(default_factory=dict)


@dataclass
class MQARSweepConfig:
    """One sweep: data (``vocab_size``, ``power_a``, ``train``/``test`` settings), models (``mixers``
    × ``d_models``, ``num_layers``, ``num_heads``) and training (``lrs``, ``epochs``, batches, AdamW
    ``weight_decay``, cosine schedule with ``warmup_frac``, evaluation every ``eval_every`` steps or
    epoch, stop at ``early_stop`` test accuracy). Defaults follow Zoology; see configs/probes."""

    name: str = "mqar"
    vocab_size: int = 8192
    power_a: float = 0.01
    seed: int = 0
    train: list[MQARSetting] = field(default_factory=lambda: [MQARSetting(64, 4, 100_000)])
    test: list[MQARSetting] = field(default_factory=lambda: [MQARSetting(64, 4, 1000)])
    mixers: list[MixerEntry] = field(default_factory=lambda: [MixerEntry()])
    d_models: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    num_layers: int = 2
    num_heads: int = 1
    epochs: int = 32
    batch_size: int = 256
    test_batch_size: int = 256
    weight_decay: float = 0.1
    warmup_frac: float = 0.0
    eval_every: int = 0
    early_stop: float = 0.99
    device: str = "auto"
    autocast: str | None = None  # "bfloat16" / "float16" on GPU, null for float32


def load_sweep_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MQARSweepConfig:
    """Defaults < YAML file < dotted ``key=value`` overrides; a wrong key or type is a ValueError."""
    try:
        cfg = OmegaConf.structured(MQARSweepConfig)
        if path is not None:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(read_yaml(path)))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        obj = cast(MQARSweepConfig, OmegaConf.to_object(cfg))
    except OmegaConfBaseException as err:
        raise ValueError(f"invalid MQAR sweep config ({path or 'defaults'}): {err}") from None
    if obj.autocast not in (None, "bfloat16", "float16"):
        raise ValueError(f"autocast must be null, 'bfloat16' or 'float16', got {obj.autocast!r}")
    if not obj.train or not obj.test or not obj.mixers or not obj.d_models or not obj.lrs:
        raise ValueError("train, test, mixers, d_models and lrs must each list at least one entry")
    return obj


def build_mqar_model(cfg: MQARSweepConfig, entry: MixerEntry, d_model: int) -> torch.nn.Module:
    """A ``num_layers``-layer memlm model for the sweep's vocabulary and longest sequence."""
    from memlm.models import MemLMConfig, MemLMForCausalLM

    max_len = max(s.seq_len for s in cfg.train + cfg.test)
    kwargs: dict[str, Any] = {"vocab_size": cfg.vocab_size, "hidden_size": d_model,
                              "num_hidden_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                              "max_position_embeddings": max_len, "mixer": dict(entry.mixer)}
    kwargs.update(entry.model)
    return MemLMForCausalLM(MemLMConfig(**kwargs))


def _datasets(cfg: MQARSweepConfig) -> tuple[list[MQARData], list[MQARData]]:
    """Training sets, and test sets with every sequence that occurs in a training set removed."""

    def draw(s: MQARSetting, split: str) -> MQARData:
        return generate_mqar(cfg.vocab_size, s.seq_len, s.num_kv_pairs, s.num_examples, cfg.power_a,
                             cfg.seed, split)

    train = [draw(s, "train") for s in cfg.train]
    test = []
    for s in cfg.test:
        data = draw(s, "test")
        for tr in train:
            data = drop_overlap(data, tr)
        test.append(data)
    return train, test


def _completed_runs(path: Path | None) -> dict[tuple[str, int, float], dict[str, Any]]:
    """Runs already logged in ``{name}.runs.jsonl`` (one JSON object per line)."""
    if path is None or not path.exists():
        return {}
    runs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {(r["label"], r["d_model"], r["lr"]): r for r in runs}


def run_mqar_sweep(cfg: MQARSweepConfig, out_dir: str | Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Run the sweep; returns the record (every run, the best lr per (mixer, d_model), the table)
    and, with ``out_dir``, writes ``{name}.json``, ``{name}.png`` and ``{name}.md`` there.

    Every finished run is appended to ``{name}.runs.jsonl`` in ``out_dir``; a sweep restarted with
    the same ``out_dir`` skips the runs logged there.
    """
    from memlm.eval.io.loading import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    autocast = resolve_dtype(cfg.autocast) if cfg.autocast else None
    train_sets, test_sets = _datasets(cfg)
    settings = [setting_name(d) for d in test_sets]
    log = Path(out_dir) / f"{cfg.name}.runs.jsonl" if out_dir is not None else None
    done = _completed_runs(log)
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    for entry in cfg.mixers:
        for d_model in cfg.d_models:
            for lr in cfg.lrs:
                if (entry.label, d_model, lr) in done:
                    runs.append(done[(entry.label, d_model, lr)])
                    continue
                runs.append(_one_run(cfg, entry, d_model, lr, train_sets, test_sets, device, autocast,
                                     progress))
                if log is not None:
                    log.parent.mkdir(parents=True, exist_ok=True)
                    with log.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(runs[-1]) + "\n")
    best = _best_per_model(runs)
    record = {
        "name": cfg.name, "config": OmegaConf.to_container(OmegaConf.structured(cfg)), "settings": settings,
        "runs": runs, "best": best, "table": mqar_table(best, settings),
        "time_s": time.perf_counter() - start, "env": environment(device),
    }
    if out_dir is not None:
        stem = Path(out_dir) / cfg.name
        record["files"] = {"json": f"{stem}.json", "png": f"{stem}.png", "md": f"{stem}.md"}
        plot_accuracy_vs_state(best, settings, record["files"]["png"], title=f"MQAR: {cfg.name}")
        Path(record["files"]["md"]).write_text(record["table"] + "\n", encoding="utf-8")
        write_json(record["files"]["json"], record)
    return record


def _one_run(cfg: MQARSweepConfig, entry: MixerEntry, d_model: int, lr: float, train_sets: list[MQARData],
             test_sets: list[MQARData], device: torch.device, autocast: torch.dtype | None,
             progress: bool) -> dict[str, Any]:
    """Train one (mixer, d_model, lr) model from seed ``cfg.seed`` and summarise it."""
    torch.manual_seed(cfg.seed)
    model = build_mqar_model(cfg, entry, d_model).to(device)
    steps = cfg.epochs * sum(-(-len(d) // cfg.batch_size) for d in train_sets)
    bar = tqdm(total=steps, desc=f"{entry.label} d={d_model} lr={lr:.3g}", disable=not progress)
    res = train_mqar(model, train_sets, test_sets, lr, cfg.epochs, cfg.batch_size, cfg.weight_decay,
                     cfg.warmup_frac, cfg.eval_every, cfg.early_stop, cfg.test_batch_size, autocast,
                     cfg.seed, bar)
    bar.close()
    return {
        "label": entry.label, "mixer": dict(entry.mixer), "model": dict(entry.model), "d_model": d_model,
        "lr": lr, "accuracy": res.per_setting, "mean_accuracy": res.accuracy, "steps": res.steps,
        "stopped_early": res.stopped_early, "train_time_s": res.train_time_s,
        "num_params": sum(p.numel() for p in model.parameters()),
        "state_size": {setting_name(d): recurrent_state_size(model, d.seq_len) for d in test_sets},
        "history": res.history,
    }


def _best_per_model(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run with the highest mean test accuracy for every (label, d_model) (Zoology's lr sweep)."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for run in runs:
        key = (run["label"], run["d_model"])
        if key not in best or run["mean_accuracy"] > best[key]["mean_accuracy"]:
            best[key] = run
    return list(best.values())


def mqar_table(best: list[dict[str, Any]], settings: list[str]) -> str:
    """Markdown: accuracy (%) per test setting, state size at the longest test length, time."""
    longest = max(settings, key=lambda s: int(s[1:].split("-")[0]))
    header = ["mixer", "d_model", "best lr", f"state ({longest})", *settings, "steps", "train s"]
    rows = [[r["label"], r["d_model"], f"{r['lr']:.3g}", r["state_size"][longest],
             *[pct(r["accuracy"][s]) for s in settings], r["steps"], f"{r['train_time_s']:.0f}"]
            for r in best]
    return markdown_table(header, rows)
