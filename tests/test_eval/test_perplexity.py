"""Sliding-window perplexity against direct per-token computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from memlm.eval.needle.haystack import stdlib_prose
from memlm.eval.perplexity import perplexity, token_stream, window_plan
from memlm.models.convert.tokenizer import load_tokenizer

TEXTS = [" ".join(stdlib_prose(min_chars=20_000)[i:i + 6]) for i in range(0, 60, 6)]


@pytest.mark.parametrize("n, ctx, stride", [(2, 2, 1), (100, 16, 15), (101, 16, 5), (17, 16, 3), (10, 32, 8)])
def test_window_plan_scores_every_token_once(n, ctx, stride):
    plan = window_plan(n, ctx, stride)
    scored = [t for _, end, first in plan for t in range(first, end)]
    assert scored == list(range(1, n))
    assert all(end - begin <= ctx and first >= begin + 1 for begin, end, first in plan)
    # once the stream allows it, every scored token sees >= ctx - stride tokens of context
    assert all(first - begin >= min(ctx - stride, first) for begin, _, first in plan[1:])


@pytest.mark.parametrize("ctx, stride", [(1, 1), (8, 0), (8, 8)])
def test_window_plan_rejects_bad_arguments(ctx, stride):
    with pytest.raises(ValueError, match="context_length"):
        window_plan(100, ctx, stride)


def _reference_nll(model, ids: list[int], ctx: int, stride: int) -> tuple[float, int]:
    """Per-token loop: token t (t >= 1) is predicted from the window that first reaches it."""
    total, count, begin, scored_to = 0.0, 0, 0, 1
    while scored_to < len(ids):
        end = min(begin + ctx, len(ids))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[begin:end]])).logits[0].double()
        for t in range(max(scored_to, begin + 1), end):
            total -= F.log_softmax(logits[t - begin - 1], dim=-1)[ids[t]].item()
            count += 1
        scored_to, begin = end, begin + stride
    return total, count


@pytest.mark.parametrize("ctx, stride, batch", [(32, None, 1), (32, 12, 3), (64, 16, 2)])
def test_perplexity_matches_reference(memlm_model, tokenizer, ctx, stride, batch):
    ids = token_stream(tokenizer, TEXTS)[:300]
    out = perplexity(memlm_model, tokenizer, TEXTS, ctx, stride, batch_size=batch, max_tokens=300,
                     progress=False)
    nll, count = _reference_nll(memlm_model, ids, ctx, stride or ctx - 1)
    assert out["num_tokens_scored"] == count == 299
    assert out["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    buckets = out["nll_by_context"]  # they tile the scored positions and average to the total
    assert buckets[0]["start"] == 1 and buckets[-1]["end"] <= ctx
    assert all(a["end"] == b["start"] for a, b in zip(buckets, buckets[1:]))
    assert sum(b["count"] for b in buckets) == count
    assert sum(b["nll"] * b["count"] for b in buckets) == pytest.approx(nll, rel=1e-6)


def test_one_window_equals_model_loss(llama_model, tokenizer):
    """A stream shorter than the context is one window: the HF loss of the whole stream."""
    ids = token_stream(tokenizer, TEXTS[:1])
    out = perplexity(llama_model, tokenizer, TEXTS[:1], context_length=len(ids) + 5, progress=False)
    with torch.no_grad():
        loss = llama_model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert out["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_documents_joined_by_eos(tokenizer):
    stream = token_stream(tokenizer, ["alpha beta", "", "gamma"])
    first = tokenizer("alpha beta", add_special_tokens=False)["input_ids"]
    assert stream[len(first)] == tokenizer.eos_token_id and stream.count(tokenizer.eos_token_id) == 1


def test_dataset_split_source(tmp_path, monkeypatch, checkpoint_dir):
    """``--dataset`` goes through ``datasets.load_dataset``: here a local folder, offline."""
    from memlm.eval import cli

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "validation.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out"
    source = ["--model", str(checkpoint_dir), "--dataset", str(data), "--split", "validation"]
    assert cli.main(["perplexity", *source, "--text-field", "body", "--context-length", "48",
                     "--out", str(out), "--name", "ds", "--no-progress"]) == 0
    record = json.loads((out / "ds.json").read_text())
    assert record["source"] == str(data) and record["split"] == "validation"
    assert record["num_tokens_scored"] == len(token_stream(load_tokenizer(checkpoint_dir), TEXTS)) - 1
    assert cli.main(["perplexity", *source, "--text-field", "nope", "--out", str(out), "--no-progress"]) == 2
