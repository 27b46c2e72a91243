"""Composed model presets: a family at a size, one naming rule, former names as aliases.

``tests/data/legacy_presets.json`` holds the model fields of every former ``configs/models/<name>.yaml``
(as those files read when the presets were composed); each former name must still build that model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import memlm
from memlm import load_preset
from memlm.layers.registry import MIXERS
from memlm.models import MemLMConfig, MemLMForCausalLM
from memlm.presets import aliases, preset_fields, preset_names, resolve_name, sizes
from memlm.train.config import ConfigError, load_config, model_kwargs

LEGACY = json.loads((Path(__file__).parent / "data" / "legacy_presets.json").read_text())


def _config_dict(config: MemLMConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "transformers_version"}


def test_the_legacy_fixture_is_complete() -> None:
    assert len(LEGACY) == 55 and set(aliases()) <= set(LEGACY)


@pytest.mark.parametrize("old", sorted(LEGACY))
def test_every_former_name_builds_the_model_its_yaml_built(old: str) -> None:
    """Directly (``MemLMConfig(**yaml)``) and as a run builds it (the tokenizer's vocabulary
    where the preset sets none), the former name and its new name alike."""
    fields = LEGACY[old]
    new = aliases().get(old, old)
    assert new in preset_names()
    assert _config_dict(load_preset(old)) == _config_dict(load_preset(new)) == _config_dict(MemLMConfig(**fields))
    for name in (old, new):
        run_fields = {"vocab_size": 4096, **preset_fields(name)}
        assert _config_dict(MemLMConfig(**run_fields)) == _config_dict(MemLMConfig(**{"vocab_size": 4096, **fields}))


# A wrapper's base memory in its name: a short name, else the registry name with ``_memory`` dropped.
_BASE_SHORT = {"gated_deltanet": "gdn"}
# Wrappers whose name leaves this base out (fla's MoM is over Gated DeltaNet).
_BASE_IMPLIED = {"mom": "gated_deltanet"}


def _mixer_stem(mixer: dict) -> str:
    """The mixer's registry name; a wrapper of another memory (a mixer with a ``base``: ``mom``,
    ``memory_caching``) adds its base's (``mom_titans`` for ``base: titans_memory``, ``memory_caching_gdn``
    for ``base: gated_deltanet``), except where its name implies the base (``mom`` over Gated DeltaNet); Memory
    Caching adds a read other than grm and ``_loglinear`` for log segments with grm (Log-Linear++)."""
    name = mixer["name"]
    default = {f.name: f.default for f in dataclasses.fields(MIXERS[name].Options)}.get("base")
    base = mixer.get("base", default)
    if base is None:
        return name
    base = base if isinstance(base, str) else base["name"]
    stem = name if base == _BASE_IMPLIED.get(name) else f"{name}_{_BASE_SHORT.get(base, base.removesuffix('_memory'))}"
    if name == "memory_caching" and mixer.get("aggregation", "grm") != "grm":  # grm is the family's default read
        stem += f"_{mixer['aggregation']}"
    if name == "memory_caching" and mixer.get("segments") == "log":  # log + grm: the paper's Log-Linear++
        stem += "_loglinear" if mixer.get("aggregation", "grm") == "grm" else "_log"
    return stem


@pytest.mark.parametrize("name", preset_names())
def test_names_follow_the_rule(name: str) -> None:
    """``<mixer>_<size>`` for one mixer throughout (``<mixer>_moe_<size>`` with a top-k MoE MLP,
    ``<mixer>_deepseek_moe_<size>`` with shared experts), ``hybrid_<mixer>_<a>to<b>_<size>`` for ``ratio: "a:b"``
    (``<mixer>`` the registry name of the first mixer, then attention; a wrapper's with its base memory's,
    :func:`_mixer_stem`), ``size`` one of sizes.yaml."""
    config = load_preset(name)
    specs = config.layer_specs()
    size = next(s for s in sizes() if name.endswith(f"_{s}"))
    mlp = "" if config.mlp is None else "_deepseek_moe" if config.mlp.get("num_shared") else "_moe"
    if config.ratio is None:
        assert {s["name"] for s in specs} == {config.mixer["name"]}
        assert name == f"{_mixer_stem(config.mixer)}{mlp}_{size}"
    else:
        a, b = config.ratio.split(":")
        assert config.ratio_mixer["name"] == "attention"
        assert name == f"hybrid_{_mixer_stem(config.mixer)}_{a}to{b}_{size}"


def test_sizes_are_kept_once() -> None:
    """A preset takes its size's shape unless its family names the exception."""
    expected = {"tiny": (128, 4, 4), "170m": (768, 12, 16), "340m": (1024, 24, 16), "760m": (1536, 24, 16),
                "1.3b": (2048, 18, 8)}
    assert {k: (v["hidden_size"], v["num_hidden_layers"], v["num_heads"]) for k, v in sizes().items()} == expected
    for size, spec in sizes().items():
        assert ("vocab_size" in spec) == (size != "tiny")
    exceptions = {name for name in preset_names()
                  if any(preset_fields(name)[k] != v for k, v in sizes()[name.rpartition("_")[2]].items())}
    assert exceptions == {"gated_deltanet_1.3b", "hybrid_gated_deltanet_3to1_tiny", "mom_1.3b"}


def test_load_preset_is_the_public_entry_point() -> None:
    assert memlm.load_preset is load_preset and "load_preset" in memlm.__all__
    config = load_preset("titans_mag_tiny", vocab_size=64, num_hidden_layers=2)
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (64, 2, 128)
    assert config.mixer["attention"]["window_size"] == 64
    assert load_preset("attention_tiny", mixer="titans_memory").mixer == {"name": "titans_memory"}
    model = MemLMForCausalLM(load_preset("hybrid_gated_deltanet_3to1_tiny", vocab_size=50))
    assert model(torch.randint(0, 50, (1, 7))).logits.shape == (1, 7, 50)


@pytest.mark.parametrize(("call", "needle"), [
    (lambda: load_preset("titans_lmm_34m"), "'titans_lmm_340m' (now 'titans_memory_340m')"),
    (lambda: load_preset("atention_tiny"), "did you mean 'attention_tiny'"),
    (lambda: load_preset("nope"), "attention_tiny, attention_170m"),
    (lambda: load_preset("gated_deltanet_170m"), "gated_deltanet_340m"),
    (lambda: load_preset("attention_tiny", hiden_size=3), "did you mean 'hidden_size'"),
    (lambda: load_preset("attention_tiny", hidden_size=0), "hidden_size must be a positive integer"),
    (lambda: load_preset("attention_tiny", mixer={"name": "attn"}), "registered mixers"),
])
def test_unknown_names_and_bad_overrides_are_value_errors(call, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        call()
    assert needle in str(err.value)


def test_run_configs_take_presets_by_any_name(tmp_path: Path) -> None:
    """``model.preset`` (new or former name, or a YAML file of fields) under the file's and the command
    line's ``model.*`` keys (mappings merged key by key); the run keeps the tokenizer's vocabulary
    where the preset sets none, and ``model_kwargs`` gives the ``MemLMConfig`` of the run."""
    window = "model.ratio_mixer.window_size=32"
    new = load_config(None, ["name=x", "model.preset=hybrid_gated_deltanet_3to1_tiny", window])
    old = load_config(None, ["name=x", "model.preset=hybrid_gdn_tiny", window])
    assert new.model["vocab_size"] is None and "vocab_size" not in model_kwargs(new.model)
    assert new.model["ratio_mixer"] == {"name": "attention", "window_size": 32}
    assert model_kwargs(new.model) == model_kwargs(old.model)
    mag = load_config(None, ["name=x", "model.preset=titans_mag_tiny", "model.mixer.attention.window_size=32"])
    assert mag.model["mixer"]["attention"] == {"name": "attention", "window_size": 32, "num_persistent": 4}
    assert MemLMConfig(**{"vocab_size": 4096, **model_kwargs(mag.model)}).mixer == mag.model["mixer"]
    paper = load_config(None, ["name=x", "model.preset=transformer_pp_340m"])
    assert model_kwargs(paper.model)["vocab_size"] == 32000 and paper.model["intermediate_size"] is None
    fields = tmp_path / "mine.yaml"
    fields.write_text("preset: attention_tiny\nnum_hidden_layers: 2\n")
    mine = load_config(None, ["name=x", f"model.preset={fields}"])
    assert (mine.model["num_hidden_layers"], mine.model["hidden_size"]) == (2, 128)
    with pytest.raises(ConfigError, match=r"model.preset: unknown preset 'titans_lmm'"):
        load_config(None, ["name=x", "model.preset=titans_lmm"])


def test_a_model_section_without_a_preset_gets_memlm_config_defaults() -> None:
    """The run config repeats none of ``MemLMConfig``'s defaults: its ``model:`` section is filled from them."""
    cfg = load_config(None, ["name=x", "model.rope_theta=500000"])
    defaults = MemLMConfig.field_defaults()
    assert cfg.model == {"preset": None, **defaults, "vocab_size": None, "rope_theta": 500000.0}
    assert model_kwargs(cfg.model) == {k: v for k, v in {**defaults, "rope_theta": 500000.0}.items()
                                       if v is not None and k != "vocab_size"}


def test_probe_model_config_files_and_names_take_presets(tmp_path: Path) -> None:
    from memlm.eval.io.loading import is_model_config, load_model, read_config_file

    spec = tmp_path / "m.yaml"
    spec.write_text("model:\n  preset: transformer_pp_tiny\n  num_hidden_layers: 1\n")
    model = load_model(spec, device="cpu", config_defaults={"vocab_size": 40})
    assert (model.config.vocab_size, model.config.num_hidden_layers, model.config.hidden_size) == (40, 1, 128)
    spec.write_text("model:\n  preset: titans_mag_tiny\n  mixer: {attention: {window_size: 8}}\n")
    assert read_config_file(spec)["mixer"]["attention"] == {"name": "attention", "window_size": 8, "num_persistent": 4}
    model = load_model("titans_memory_tiny", device="cpu", config_defaults={"vocab_size": 40})
    assert model.config.vocab_size == 40 and model.config.mixer["name"] == "titans_memory"
    assert is_model_config("attention_tiny") and is_model_config(spec) and not is_model_config("gpt2")


def test_every_preset_resolves_to_itself_and_builds_on_meta() -> None:
    for name in preset_names():
        assert resolve_name(name) == name
        with torch.device("meta"):
            assert sum(p.numel() for p in MemLMForCausalLM(load_preset(name)).parameters()) > 0
