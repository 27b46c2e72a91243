"""The run-config schema: YAML + overrides, and every error names the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memlm import load_preset
from memlm.models import MemLMConfig, ratio_pattern
from memlm.train.config import CONFIG_DIR, ConfigError, load_config


def test_tiny_yaml_loads_with_overrides() -> None:
    cfg = load_config(CONFIG_DIR / "runs" / "tiny.yaml", ["training.steps=7", "model.hidden_size=64"])
    assert cfg.name == "tiny" and cfg.training.steps == 7 and cfg.model["hidden_size"] == 64
    assert cfg.model["num_hidden_layers"] == 8  # from the preset (hybrid_gated_deltanet_3to1_tiny)
    assert cfg.data.source == "embedded"


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "runs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_run_config_is_valid(path: Path) -> None:
    cfg = load_config(path)
    from memlm.train.config import model_kwargs

    MemLMConfig(**{"vocab_size": 32000, **model_kwargs(cfg.model)})


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["name=x", "training.stepz=5"], "training.stepz"),
        (["name=x", "training.steps=abc"], "training.steps"),
        (["name=x", "schedule.name=linear"], "['cosine', 'wsd', 'constant']"),
        (["name=x", "training.precision=fp8"], "training.precision"),
        (["name=x", "data.source=files"], "data.path is required"),
        (["name=x", "training.steps=0"], "training.steps must be > 0"),
        (["name=x", "logging.trackers=[mlflow]"], "tensorboard"),
        (["name=x", "model.preset=nope"], "attention_tiny"),
        (["name=x", "model.preset=titans_lmm_34m"], "titans_lmm_340m"),
        (["name=x", "model.hiden_size=3"], "did you mean 'hidden_size'"),
        (["name=x", "model.hidden_size=abc"], "model.hidden_size='abc' has the wrong type"),
        (["name=x", "model.hidden_size=0"], "model.hidden_size must be a positive integer"),
        (["name=x", "model.mixer={name: attn}"], "model.mixer: unknown mixer name 'attn'"),
        (["name=x", "model.use_cache=false"], "model.use_cache is not a MemLMConfig model field"),
        (["name=x", "nonsense"], "key=value"),
        (["training.steps=3"], "name is required"),
    ],
)
def test_bad_config_names_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_unknown_key_lists_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["name=x", "optimizer.learning_rate=1"])
    assert "optimizer.learning_rate" in str(err.value) and "'lr'" in str(err.value)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/run.yaml")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"mixer": {"name": "attn"}}, "registered mixers"),
        ({"mixer": {"name": "attention", "window": 4}}, "allowed options"),
        ({"mixer": {"name": "attention", "window_size": "big"}}, "wrong type"),
        ({"mixer": {"name": "attention", "window_size": 0}}, "window_size"),
        ({"ratio": "3-1"}, "ratio must look like"),
        ({"ratio": "3:0"}, "b >= 1"),
        ({"layers": [{"name": "attention"}]}, "num_hidden_layers"),
        ({"hidden_size": 0}, "hidden_size"),
    ],
)
def test_bad_model_config(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        MemLMConfig(**{"vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 2, "num_heads": 2, **kwargs})
    assert needle in str(err.value)


def test_ratio_places_second_mixer_after_every_a_layers() -> None:
    assert [i for i, b in enumerate(ratio_pattern("3:1", 12)) if b] == [3, 7, 11]
    assert [i for i, b in enumerate(ratio_pattern("6:1", 14)) if b] == [6, 13]
    assert all(ratio_pattern("0:1", 4))
    cfg = MemLMConfig(vocab_size=10, hidden_size=16, num_hidden_layers=4, num_heads=2, ratio="1:1",
                      mixer={"name": "attention", "window_size": 8}, ratio_mixer="attention")
    assert [s.get("window_size") for s in cfg.layer_specs()] == [8, None, 8, None]
    explicit = MemLMConfig(vocab_size=10, hidden_size=16, num_hidden_layers=2, num_heads=2, ratio="1:1",
                           layers=["attention", {"name": "attention", "num_persistent": 2}])
    assert explicit.layer_specs()[1] == {"name": "attention", "num_persistent": 2}


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "probes").glob("mqar_*.yaml")), ids=lambda p: p.stem)
def test_every_mqar_probe_config_builds_its_models(path: Path) -> None:
    """Each mixer entry of each shipped MQAR sweep builds (on the meta device: no weights allocated)."""
    from memlm.eval.mqar.sweep import build_mqar_model, load_sweep_config

    cfg = load_sweep_config(path)
    with torch.device("meta"):
        for entry in cfg.mixers:
            assert sum(p.numel() for p in build_mqar_model(cfg, entry, cfg.d_models[0]).parameters()) > 0


def test_ratio_as_the_readme_writes_it(tmp_path: Path) -> None:
    """``model.ratio=3:1`` on the command line and ``ratio: 3:1`` unquoted in YAML stay ``"3:1"``
    (YAML 1.1 would read the base-60 number 181); YAML numbers still parse (``1e-3`` is a float)."""
    assert load_config(None, ["name=x", "model.ratio=3:1"]).model["ratio"] == "3:1"
    assert load_config(None, ["name=x", 'model.ratio="3:1"']).model["ratio"] == "3:1"
    run_file = tmp_path / "run.yaml"
    run_file.write_text("name: x\nmodel:\n  ratio: 3:1\n  mixer: gated_deltanet\noptimizer:\n  lr: 1e-3\n")
    cfg = load_config(run_file)
    assert cfg.model["ratio"] == "3:1" and cfg.optimizer.lr == 1e-3
    assert cfg.model["mixer"] == {"name": "gated_deltanet"}
    assert load_config(None, ["name=x", "model.mixer=attention"]).model["mixer"] == {"name": "attention"}
    model_file = tmp_path / "model.yaml"
    model_file.write_text("preset: attention_tiny\nratio: 3:1\nmixer: {name: gated_deltanet}\nvocab_size: 64\n")
    assert load_preset(str(model_file)).ratio == "3:1"  # a preset file reads as the run config does
    from memlm.eval.io.loading import read_config_file

    assert read_config_file(model_file)["ratio"] == "3:1"  # and so does a probe's model config
