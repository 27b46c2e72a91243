"""Loading flash-linear-attention checkpoints with ``memlm.from_pretrained`` / ``memlm convert``.

Equivalence with the real library: each case builds fla's own model class with a tiny config, saves
it, loads it with memlm and compares logits (relative error ≤ 1e-4 in float32) and memlm's
``generate()`` with greedy decoding of fla's forward. On CPU fla's kernels run only under
``TRITON_INTERPRET=1`` (float32, one autotune config, loop indices as tensors, fla's fused
norm/MLP/loss off), so those cases run in a child process (``test_fla_equivalence_interpreted``); on
CUDA they run directly (``gpu`` marker). fla's attention layer calls the ``flash_attn`` package,
which has no CPU build: on CPU the hybrid and transformer cases substitute ``sdpa_flash_attn``
(``memlm.testing.fla_models``) for ``flash_attn_func`` (same masking: causal aligned bottom-right,
window ``(w−1, 0)``); the GPU run uses flash_attn when installed. The loader tests run in the
default session on checkpoints written by fla's classes (building them needs no kernel).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import memlm
from memlm.cli import main as cli_main
from memlm.models import MemLMForCausalLM
from memlm.models.convert import FORMATS, Format, convert_config, register_format
from memlm.testing.fla_models import CASES, FLA_COMMON, VOCAB, fla_model
from memlm.testing.triton_interpreter import interpret_fla

ROOT = Path(__file__).resolve().parents[1]
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


if INTERPRETING:
    interpret_fla()


@pytest.fixture
def fla_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if INTERPRETING:
        return "cpu"
    pytest.skip("fla's kernels run in the TRITON_INTERPRET=1 child of test_fla_equivalence_interpreted")


@pytest.mark.parametrize("case", CASES)
def test_fla_equivalence(case: str, fla_device: str, tmp_path: Path) -> None:
    """memlm's model from fla's checkpoint computes fla's logits, and generates fla's greedy tokens."""
    reference = fla_model(case, fla_device)
    reference.save_pretrained(tmp_path)
    model = memlm.from_pretrained(tmp_path, device=fla_device)
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1)).to(fla_device)
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    if fla_device == "cuda":  # fla's kernels take tf32 dot products in float32: argmax ties may flip
        assert rel(got, expected) < 2e-3, case
        return
    assert rel(got, expected) < TOL, case
    # fla 0.6's own generate() reads its cache as ``past_key_values``, which transformers >= 5.24 passes
    # as ``cache``: it decodes without state. The reference is greedy decoding of fla's full forward.
    prompt = ids[:, :5]
    expected_tokens = prompt
    with torch.no_grad():
        for _ in range(4):
            next_token = reference(expected_tokens).logits[:, -1].argmax(-1, keepdim=True)
            expected_tokens = torch.cat([expected_tokens, next_token], dim=1)
    # No stopping at EOS: the reference decodes through it (fla's eos_token_id is 2, in the vocabulary).
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                               eos_token_id=None, pad_token_id=reference.config.eos_token_id)
    assert torch.equal(generated, expected_tokens)


def test_fla_equivalence_interpreted() -> None:
    """Runs the equivalence cases in a child pytest under ``TRITON_INTERPRET=1``."""
    if INTERPRETING or torch.cuda.is_available():
        pytest.skip("the equivalence cases run directly in this session")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore",
           "-k", "test_fla_equivalence and not interpreted"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"{len(CASES)} passed" in out and "skipped" not in out, out[-2000:]


# ---- the loader on checkpoints in fla's exact layout (no kernels needed) ---------------------------

@pytest.mark.parametrize("case", CASES)
def test_loader_reads_fla_layout(case: str, tmp_path: Path) -> None:
    """Every tensor fla saved lands in the memlm model (renamed where the layouts differ)."""
    fla_model(case).save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    model = memlm.from_pretrained(tmp_path)
    ours = model.state_dict()
    direct = [k for k in saved if k in ours]
    for name in direct:
        assert torch.equal(ours[name], saved[name]), name
    moved = set(saved) - set(direct)
    model_type = CASES[case]["model_type"]
    if model_type in ("hgrn", "hgrn2"):
        assert moved == {"model.lower_bounds"}
        assert any(k.endswith("lower_bound.logit") for k in ours)
    elif model_type == "mamba2":
        assert all(k.startswith("backbone.") for k in moved) and direct == ["lm_head.weight"]
    elif model_type in ("gla", "retnet") and not CASES[case].get("fuse_norm", FLA_COMMON["fuse_norm"]):
        assert moved and all(k.endswith("attn.g_norm.weight") for k in moved)
    else:
        assert not moved


def _gdn_config(**extra: object) -> dict:
    return {"model_type": "gated_deltanet", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 4,
            "num_heads": 2, "head_dim": 16, "expand_v": 1.0, "hidden_ratio": 2, **extra}


def _write(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, path / "model.safetensors")
    return path


def _fla_tensors(config: dict) -> dict[str, torch.Tensor]:
    """The tensors of a model in ``config``'s layout, with memlm's (= fla's) names."""
    _, _, memlm_config = convert_config(config)
    torch.manual_seed(0)
    model = MemLMForCausalLM(memlm_config)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_map_hybrid_layout_drops_legacy_D(tmp_path: Path) -> None:
    """An m-a-p hybrid: fla format, float32, untied head, attention every 3 GDN layers, and the
    unused ``attn.D`` of old Gated DeltaNet releases (dropped with one warning)."""
    config = _gdn_config(tie_word_embeddings=False, torch_dtype="float32",
                         attn={"layers": [3], "num_heads": 4, "num_kv_heads": 4, "qkv_bias": False,
                               "window_size": None, "rope_theta": 10000.0})
    tensors = _fla_tensors(config)
    tensors.update({f"model.layers.{i}.attn.D": torch.ones(2) for i in range(3)})
    _write(tmp_path, config, tensors)
    with pytest.warns(UserWarning, match=r"dropped 3 legacy tensor\(s\).*attn\.D"):
        model = memlm.from_pretrained(tmp_path)
    assert [s["name"] for s in model.config.layer_specs()] == ["gated_deltanet"] * 3 + ["attention"]
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])
    assert model.lm_head.weight.data_ptr() != model.model.embeddings.weight.data_ptr()


def test_fla_hub_layout_bf16_tied_head(tmp_path: Path) -> None:
    config = _gdn_config(tie_word_embeddings=True, torch_dtype="bfloat16")
    tensors = {k: v.bfloat16() for k, v in _fla_tensors(config).items() if k != "lm_head.weight"}
    _write(tmp_path, config, tensors)
    model = memlm.from_pretrained(tmp_path)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()
    assert torch.equal(model.model.embeddings.weight, tensors["model.embeddings.weight"].float())
    assert memlm.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16


def test_mismatches_are_listed_together(tmp_path: Path) -> None:
    config = _gdn_config()
    tensors = _fla_tensors(config)
    del tensors["model.layers.1.attn.b_proj.weight"]
    tensors["model.layers.0.attn.surprise"] = torch.zeros(3)
    tensors["model.norm.weight"] = torch.ones(31)
    _write(tmp_path, config, tensors)
    with pytest.raises(ValueError) as err:
        memlm.from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing tensors (1): model.layers.1.attn.b_proj.weight" in message
    assert "unexpected tensors (1): model.layers.0.attn.surprise" in message
    assert "shape mismatches (1): model.norm.weight [31] (model: [32])" in message


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "rwkv7"}, r"unknown checkpoint model_type 'rwkv7'.*'gated_deltanet'"),
        (_gdn_config(hidden_act="powlu"), "hidden_act='powlu'"),
        (_gdn_config(attnres_block_size=2), "attnres_block_size=2"),
        (_gdn_config(attn={"layers": [4], "num_heads": 2}), "attn layer index 4"),
        (_gdn_config(attn={"layers": [1]}), "'layers' and 'num_heads'"),
        (_gdn_config(norm_first=True), "norm_first=True"),
        ({**_gdn_config(), "model_type": "mom", "mom_backend": "gla"}, "mom_backend='gla'"),
        ({**_gdn_config(), "model_type": "mom_gated_deltanet", "norm_first": True}, "norm_first=True"),
    ],
)
def test_unsupported_configs_are_refused(config: dict, message: str, tmp_path: Path) -> None:
    _write(tmp_path, config, {})
    with pytest.raises(ValueError, match=message):
        memlm.from_pretrained(tmp_path)


def test_unknown_config_keys_warn(tmp_path: Path) -> None:
    _write(tmp_path, _gdn_config(use_magic=True), _fla_tensors(_gdn_config()))
    with pytest.warns(UserWarning, match=r"ignored keys \['use_magic'\]"):
        memlm.from_pretrained(tmp_path)


def test_sharded_checkpoint(tmp_path: Path) -> None:
    config = _gdn_config()
    tensors = _fla_tensors(config)
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = memlm.from_pretrained(tmp_path)
    assert torch.equal(model.model.layers[2].attn.A_log, tensors["model.layers.2.attn.A_log"])


def test_hub_id_goes_through_snapshot_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    config = _gdn_config()
    _write(tmp_path / "snap", config, _fla_tensors(config))
    calls = []

    def fake_download(repo_id: str, revision: str | None = None, allow_patterns: list | None = None) -> str:
        calls.append((repo_id, revision))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = memlm.from_pretrained("m-a-p/hybrid-gdn-test", revision="main")
    assert calls == [("m-a-p/hybrid-gdn-test", "main")]
    assert isinstance(model, MemLMForCausalLM)
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a Hub id"):
        memlm.from_pretrained(tmp_path / "missing" / "dir" / "x")


def test_convert_command_round_trip(tmp_path: Path) -> None:
    """``memlm convert`` writes a memlm checkpoint (with the tokenizer files) that reloads bit-exactly."""
    fla_model("hybrid-hgrn2-list").save_pretrained(tmp_path / "fla")
    (tmp_path / "fla" / "tokenizer_config.json").write_text("{}")
    assert cli_main(["convert", str(tmp_path / "fla"), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "memlm"
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    direct, reloaded = memlm.from_pretrained(tmp_path / "fla"), memlm.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, VOCAB, (1, 11))
    assert torch.equal(direct(ids).logits, reloaded(ids).logits)


def test_mistral_v1_tokenizer_offline(tmp_path: Path) -> None:
    """Without tokenizer files the Mistral v1 SentencePiece tokenizer from mistral_common is used,
    encoding exactly as SentencePiece does (BOS first, 32k vocabulary)."""
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

    tok = memlm.load_tokenizer(tmp_path)
    text = "The pass key is 71432.  Remember it.\nOne of the special magic numbers for x-y is: 5."
    source = Path(importlib.util.find_spec("mistral_common").origin).parent / "data" / "tokenizer.model.v1"
    assert tok(text).input_ids == SentencePieceTokenizer(str(source)).encode(text, bos=True, eos=False)
    assert len(tok) == 32000 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_tokenizer_in_checkpoint_is_preferred(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    assert memlm.load_tokenizer(tmp_path)("hello world").input_ids == [1, 2]


def test_registered_format_is_the_extension_point(tmp_path: Path) -> None:
    """A later layout (e.g. MoM) joins with one ``register_format``: here a toy one whose fused
    ``mlp.gate_up`` tensor is split into memlm's ``gate_proj`` / ``up_proj``."""
    gdn = FORMATS["gated_deltanet"]

    def split_gate_up(config: dict, tensors: dict, specs: list) -> dict:
        for i in range(len(specs)):
            gate, up = tensors.pop(f"model.layers.{i}.mlp.gate_up").chunk(2)
            prefix = f"model.layers.{i}.mlp"
            tensors.update({f"{prefix}.gate_proj.weight": gate, f"{prefix}.up_proj.weight": up})
        return tensors

    register_format(Format("toy_fused_mlp", gdn.defaults, gdn.layer_spec, gdn.model_config, split_gate_up))
    try:
        config = _gdn_config(model_type="toy_fused_mlp")
        tensors = _fla_tensors(_gdn_config())
        for i in range(4):
            gate, up = (tensors.pop(f"model.layers.{i}.mlp.{n}.weight") for n in ("gate_proj", "up_proj"))
            tensors[f"model.layers.{i}.mlp.gate_up"] = torch.cat([gate, up])
        _write(tmp_path, config, tensors)
        model = memlm.from_pretrained(tmp_path)
        up = tensors["model.layers.3.mlp.gate_up"][256:]
        assert torch.equal(model.model.layers[3].mlp.up_proj.weight, up)
    finally:
        del FORMATS["toy_fused_mlp"]


# ---- Mixture-of-Memories configs and the linear-moe-hub layouts (docs/design.md §4.3) -------------

def test_mom_config_mapping() -> None:
    """fla's ``mom``: any ``capacity`` is memlm's no-drop 1.0 (fla ignores it), hybrid ``attn`` layers map
    as in the other families; ``mom_gated_deltanet`` takes the MoM repo's defaults and ``use_gate``."""
    _, _, config = convert_config({**_gdn_config(), "model_type": "mom", "capacity": 0.5, "use_output_gate": False,
                                   "attn": {"layers": [1], "num_heads": 4}})
    mom, attention = config.layer_specs()[:2]
    assert attention["name"] == "attention" and mom["name"] == "mom"
    assert mom["capacity"] == 1.0 and mom["base"] == "gated_deltanet" and mom["use_output_gate"] is False
    assert (mom["num_memories"], mom["topk"], mom["shared_mem"], mom["aux_loss_scale"]) == (4, 2, True, 0.01)
    _, _, config = convert_config({"model_type": "mom_gated_deltanet", "vocab_size": VOCAB, "hidden_size": 32,
                                   "num_hidden_layers": 1, "head_dim": 8, "use_gate": False})
    (mom,) = config.layer_specs()
    assert (mom["num_memories"], mom["shared_mem"], mom["num_heads"], mom["expand_v"]) == (8, False, 6, 2.0)
    assert mom["use_output_gate"] is False


HUB_COMMON = {"attn_mode": "chunk", "bos_token_id": 1, "eos_token_id": 2, "fuse_cross_entropy": True,
              "hidden_act": "swish", "hidden_ratio": 4, "hidden_size": 32, "initializer_range": 0.02,
              "intermediate_size": None, "norm_eps": 1e-6, "norm_first": False, "num_hidden_layers": 2,
              "tie_word_embeddings": True, "use_cache": True, "vocab_size": VOCAB, "use_short_conv": True,
              "conv_size": 4, "torch_dtype": "float32", "architectures": ["XForCausalLM"]}
HUB_MOM = {"model_type": "mom_gated_deltanet", "num_heads": 2, "head_dim": 16, "expand_v": 1, "use_gate": True,
           "num_memories": 4, "topk": 2, "capacity": 1.0, "use_layer_wise_balance": True, "aux_loss_scale": 0.01,
           "shared_mem": True, "single_kv_proj": False}
HUB_GDN = {"model_type": "gated_deltanet", "num_heads": 2, "head_dim": 16, "expand_v": 2, "use_gate": True}


def _hub_source(hub: dict) -> MemLMForCausalLM:
    """The memlm model a linear-moe-hub config describes (``use_gate`` is memlm's MoM ``use_output_gate``;
    MLP width ``2/3 · hidden_ratio · d`` rounded up to 256)."""
    keys = ("num_heads", "head_dim", "expand_v", "use_short_conv", "conv_size")
    if hub["model_type"] == "gated_deltanet":
        spec = {"name": "gated_deltanet", "use_gate": hub["use_gate"], **{k: hub[k] for k in keys}}
    else:
        spec = {"name": "mom", "use_output_gate": hub["use_gate"], **{k: hub[k] for k in keys},
                **{k: hub[k] for k in ("num_memories", "topk", "shared_mem", "single_kv_proj", "aux_loss_scale")}}
    torch.manual_seed(0)
    config = memlm.MemLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=2,
                               intermediate_size=256, norm_eps=1e-6, tie_word_embeddings=True, mixer=spec)
    return MemLMForCausalLM(config).eval()


def _hub_tensors(model: MemLMForCausalLM) -> dict[str, torch.Tensor]:
    """``model``'s tensors in the linear-moe-hub layout: one fused ``mlp.gate_proj`` [gate; up], an unused
    ``attn.D`` per layer, no ``lm_head`` (tied)."""
    tensors = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(model.config.num_hidden_layers):
        mlp = f"model.layers.{i}.mlp."
        tensors[mlp + "gate_proj.weight"] = torch.cat([tensors[mlp + "gate_proj.weight"],
                                                      tensors.pop(mlp + "up_proj.weight")])
        tensors[f"model.layers.{i}.attn.D"] = torch.ones(2)
    return tensors


@pytest.mark.parametrize("hub", [HUB_MOM, HUB_GDN], ids=["mom_gated_deltanet", "gated_deltanet-baseline"])
def test_linear_moe_hub_layout(hub: dict, tmp_path: Path) -> None:
    """A linear-moe-hub checkpoint (MoM, or its pre-0.2 fla Gated DeltaNet baseline) reproduces the model it
    was written from exactly; its ``attn.D`` tensors are dropped with one warning and no key is ignored."""
    config = {**HUB_COMMON, **hub}
    source = _hub_source(config)
    tensors = _hub_tensors(source)
    _write(tmp_path, config, tensors)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = memlm.from_pretrained(tmp_path)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert [m for m in messages if "legacy" in m or "ignored keys" in m] == [
        "dropped 2 legacy tensor(s) that no computation uses: model.layers.0.attn.D, model.layers.1.attn.D"]
    assert [s["name"] for s in model.config.layer_specs()] == [source.config.layer_specs()[0]["name"]] * 2
    up = model.model.layers[1].mlp.up_proj.weight
    assert torch.equal(up, tensors["model.layers.1.mlp.gate_proj.weight"][256:])
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)


def test_memlm_checkpoints_load_as_saved(tmp_path: Path) -> None:
    config = memlm.MemLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4,
                               ratio="1:1", mixer={"name": "hgrn2", "lower_bound": 0.5})
    model = MemLMForCausalLM(config)
    model.save_pretrained(tmp_path)
    loaded = memlm.from_pretrained(tmp_path, dtype="float32")
    ids = torch.randint(0, VOCAB, (2, 7))
    assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("loader", ["memlm.from_pretrained", "AutoModelForCausalLM"])
def test_memlm_checkpoint_that_does_not_fit_stops_the_load(loader: str, tmp_path: Path) -> None:
    """A deleted, an extra and a reshaped tensor are listed together; nothing is initialised afresh."""
    from transformers import AutoModelForCausalLM

    from memlm.models import MemLMConfig

    MemLMForCausalLM(MemLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4)).save_pretrained(
        tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.attn.q_proj.weight"]
    tensors["model.extra.weight"] = torch.zeros(2)
    tensors["model.norm.weight"] = torch.ones(5)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    load = memlm.from_pretrained if loader == "memlm.from_pretrained" else AutoModelForCausalLM.from_pretrained
    with pytest.raises(ValueError) as err:
        load(tmp_path)
    message = str(err.value)
    assert "missing tensors (1): model.layers.0.attn.q_proj.weight" in message
    assert "unexpected tensors (1): model.extra.weight" in message
    assert "shape mismatches (1): model.norm.weight [5] (model: [32])" in message
