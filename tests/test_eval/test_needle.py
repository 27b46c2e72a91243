"""S-NIAH-1/2/3 and passkey: prompt construction, the grid runner, the CLI."""

from __future__ import annotations

import json
import random
import re

import pytest

from memlm.eval import cli
from memlm.eval.needle import probe as probe_mod
from memlm.eval.needle.haystack import NOISE, stdlib_prose
from memlm.eval.needle.probe import needle_table, run_needle_probe
from memlm.eval.needle.task import TASKS, build_sample, token_counter

PROSE = list(stdlib_prose(min_chars=20_000))
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _needle_text(sample) -> str:
    if sample.task == "passkey":
        return f"The pass key is {sample.answer}. Remember it. {sample.answer} is the pass key."
    kind = "uuids" if sample.task == "s-niah-3" else "numbers"
    return f"One of the special magic {kind} for "


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [160, 400])
@pytest.mark.parametrize("depth", [0, 40, 100])
def test_sample_fits_budget_and_places_needle(tokenizer, task, length, depth):
    count = token_counter(tokenizer)
    s = build_sample(task, count, length, depth, random.Random(1), PROSE, max_new_tokens=16)
    budget = length - 16
    assert s.num_prompt_tokens == count(s.prompt) <= budget
    units = [NOISE] if task in ("passkey", "s-niah-1") else PROSE[:s.haystack_units + 1]
    unit_tokens = max(count(u) for u in units)
    assert budget - s.num_prompt_tokens <= unit_tokens + 2  # as many haystack units as fit
    assert s.prompt.count(s.answer) == (2 if task == "passkey" else 1)
    head, _, _ = s.prompt.partition(_needle_text(s))
    before = round(depth / 100 * s.haystack_units)
    if task in ("passkey", "s-niah-1"):
        assert head.count(NOISE) == before and s.prompt.count(NOISE) == s.haystack_units
    else:
        context_before = head.split("\n", 1)[1]  # after the instruction line
        assert context_before == "".join(PROSE[i % len(PROSE)] + " " for i in range(before))


def test_prompt_wording_and_values(tokenizer):
    count = token_counter(tokenizer)
    s1 = build_sample("s-niah-1", count, 300, 50, random.Random(0), max_new_tokens=16)
    assert s1.prompt.startswith("A special magic number is hidden within the following text. Make sure to "
                                "memorize it. I will quiz you about the number afterwards.\n")
    key = re.search(r"for (\w+-\w+) is: (\d+)\.", s1.prompt)
    assert key and key.group(2) == s1.answer and re.fullmatch(r"\d{7}", s1.answer)
    k = key.group(1)
    assert s1.prompt.endswith(f"\nWhat is the special magic number for {k} mentioned in the provided text? "
                              f"The special magic number for {k} mentioned in the provided text is")
    s3 = build_sample("s-niah-3", count, 300, 50, random.Random(0), PROSE, max_new_tokens=16)
    assert UUID.match(s3.answer) and "special magic uuid for" in s3.prompt
    sp = build_sample("passkey", count, 300, 50, random.Random(0), max_new_tokens=16)
    assert 1 <= int(sp.answer) <= 50_000 and sp.prompt.endswith("\nWhat is the pass key? The pass key is")
    assert build_sample("passkey", count, 300, 50, random.Random(0), max_new_tokens=16) == sp  # deterministic


def test_bad_arguments(tokenizer):
    count = token_counter(tokenizer)
    with pytest.raises(ValueError, match="task must be one of"):
        build_sample("niah", count, 300, 50, random.Random(0))
    with pytest.raises(ValueError, match="depth must be a percentage"):
        build_sample("passkey", count, 300, 120, random.Random(0))
    with pytest.raises(ValueError, match="context_length=40"):
        build_sample("passkey", count, 40, 50, random.Random(0))
    with pytest.raises(ValueError, match="needs prose"):
        build_sample("s-niah-2", count, 300, 50, random.Random(0), None)


def test_grid_writes_json_and_png(tmp_path, memlm_model, tokenizer):
    record = run_needle_probe(memlm_model, tokenizer, "passkey", [96, 160], [0, 100], num_samples=2,
                              max_new_tokens=8, out_dir=tmp_path, name="pk", progress=False)
    saved = json.loads((tmp_path / "pk.json").read_text())
    assert (tmp_path / "pk.png").read_bytes()[:4] == b"\x89PNG"
    assert saved["task"] == "passkey" and len(saved["samples"]) == 8
    assert len(saved["accuracy"]) == 2 and all(len(r) == 2 for r in saved["accuracy"])
    for s in saved["samples"]:
        assert s["prompt_tokens"] + 8 <= s["context_length"]
        assert s["correct"] == (re.search(r"\d+", s["output"]) is not None
                                and int(re.search(r"\d+", s["output"]).group()) == int(s["answer"]))
    assert needle_table(record).count("\n") == 3  # header, rule, two lengths
    batched = run_needle_probe(memlm_model, tokenizer, "passkey", [96, 160], [0, 100], num_samples=2,
                               max_new_tokens=8, progress=False, batch_size=3)  # prompts of different lengths
    assert [s["output"] for s in batched["samples"]] == [s["output"] for s in saved["samples"]]
    assert len({s["prompt_tokens"] for s in batched["samples"][3:6]}) > 1  # the second batch


def test_grid_any_hf_causal_lm_and_prose(tmp_path, llama_model, tokenizer):
    text = " ".join(PROSE[:200])
    record = run_needle_probe(llama_model, tokenizer, "s-niah-2", [128], [50], num_samples=1,
                              haystack_texts=[text], max_new_tokens=4, out_dir=tmp_path, progress=False)
    assert record["haystack"] == "texts" and (tmp_path / "s-niah-2.png").exists()


def test_grid_scores_an_oracle_and_a_liar(monkeypatch, memlm_model, tokenizer):
    """The pipeline end to end with outputs that are known right / wrong."""

    def oracle(model, tok, prompts, max_new_tokens):
        return [" " + re.search(r"is: ([0-9a-f-]+)\.", p).group(1) + "." for p in prompts]

    monkeypatch.setattr(probe_mod, "greedy_generate", oracle)
    good = run_needle_probe(memlm_model, tokenizer, "s-niah-3", [300], [0, 50, 100], 2, max_new_tokens=8,
                            progress=False)
    assert good["mean_accuracy"] == 1.0
    monkeypatch.setattr(probe_mod, "greedy_generate", lambda model, tok, prompts, n: [" 1234567"] * len(prompts))
    bad = run_needle_probe(memlm_model, tokenizer, "s-niah-1", [300], [0, 50, 100], 2, max_new_tokens=8,
                           progress=False)
    assert bad["mean_accuracy"] == 0.0


def test_cli_passkey_and_perplexity(tmp_path, checkpoint_dir, capsys):
    out = tmp_path / "out"
    common = ["--model", str(checkpoint_dir), "--device", "auto", "--out", str(out), "--no-progress"]
    assert cli.main(["passkey", *common, "--lengths", "96", "--depths", "50", "--samples", "1",
                     "--max-new-tokens", "4"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 and files[0].startswith("passkey-") and files[1].endswith(".png")
    assert json.loads((out / files[0]).read_text())["model"] == str(checkpoint_dir)
    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(PROSE[:60]))
    assert cli.main(["perplexity", *common, "--files", str(text), "--context-length", "64", "--stride", "32",
                     "--name", "ppl"]) == 0
    ppl = json.loads((out / "ppl.json").read_text())
    assert ppl["perplexity"] > 1.0 and ppl["stride"] == 32 and "perplexity" in capsys.readouterr().out
    assert (out / "ppl.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_config_model_takes_the_tokenizer_vocabulary(tmp_path, checkpoint_dir, tokenizer):
    out = tmp_path / "out"
    assert cli.main(["s-niah-1", "--model", "attention_tiny", "--tokenizer", str(checkpoint_dir), "--lengths",
                     "256", "--depths", "0", "--samples", "1", "--max-new-tokens", "2", "--out", str(out),
                     "--name", "r", "--no-progress"]) == 0
    assert json.loads((out / "r.json").read_text())["samples"][0]["prompt_tokens"] <= 254


def test_cli_rejects_bad_input(tmp_path, capsys):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  vocab_size: 64\n  hidden_size: 32\n  num_hidden_layers: 1\n  num_heads: 2\n")
    assert cli.main(["passkey", "--model", str(cfg), "--device", "cpu"]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    assert cli.main(["mqar", "--out", str(tmp_path), "epochs=0.5"]) == 2
    assert "invalid MQAR sweep config" in capsys.readouterr().err
