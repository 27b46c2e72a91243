"""Loading the model and tokenizer a probe runs on."""

from __future__ import annotations

import pytest
import torch

from memlm.eval.io.loading import load_model, resolve_dtype
from memlm.models import MemLMForCausalLM
from memlm.models.convert.tokenizer import load_tokenizer


def test_checkpoint_folder_and_config_json(checkpoint_dir, memlm_model):
    for spec in (checkpoint_dir, checkpoint_dir / "config.json"):
        model = load_model(spec, device="cpu")
        assert isinstance(model, MemLMForCausalLM) and not model.training
        for (name, a), (_, b) in zip(model.state_dict().items(), memlm_model.state_dict().items()):
            assert torch.equal(a, b), name


def test_model_config_file_builds_random_model(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model:\n  vocab_size: 50\n  hidden_size: 32\n  num_hidden_layers: 3\n  num_heads: 2\n"
                   "  mixer: {name: attention, window_size: 8}\n")
    model = load_model(cfg, device="cpu", dtype="bfloat16")
    assert model.config.num_hidden_layers == 3 and model.config.layer_specs()[0]["window_size"] == 8
    assert next(model.parameters()).dtype == torch.bfloat16
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_model(bad, device="cpu")


def test_tokenizer_from_folder_or_json(checkpoint_dir, tokenizer):
    text = "The pass key is 31415. Remember it."
    for spec in (checkpoint_dir, checkpoint_dir / "tokenizer.json"):
        assert load_tokenizer(spec)(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8")


def test_plain_transformers_checkpoint(tmp_path, llama_model):
    llama_model.save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    assert type(model) is type(llama_model)
    x = torch.randint(0, llama_model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, llama_model(x).logits)


def test_missing_model_path_is_a_clear_error(tmp_path) -> None:
    import pytest

    from memlm.eval.io.loading import load_model

    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "runs" / "nope" / "hf"), device="cpu")


def test_probe_cli_reports_a_missing_model_path(tmp_path, capsys) -> None:
    from memlm.eval.cli import main

    assert main(["passkey", "--model", str(tmp_path / "nope"), "--lengths", "128"]) == 2
    assert "does not exist" in capsys.readouterr().err
