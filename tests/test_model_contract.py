"""The contract every model obeys, for every mixer spec in ``memlm.testing.models.CASES``:
causality, step-by-step decoding == parallel forward, save → load bit-exact. A new mixer joins by
adding its spec there, and every registered mixer must have one (a mixer without a case fails
:func:`test_every_registered_mixer_has_a_case`). (Generation through transformers' ``generate``:
test_generation.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from memlm.layers import MIXERS
from memlm.models import MemLMForCausalLM
from memlm.testing.models import CASES, VOCAB, build

SPEC_KEYS = ("mixer", "ratio_mixer", "layers", "memory", "attention")  # keys whose values are mixer specs


def mixer_names(spec: object) -> set[str]:
    """Every mixer name in a case or spec, nested ones included (a composite's ``memory`` and
    ``attention``, the ``layers`` list): a spec is a name, or a mapping with a ``name`` key."""
    if isinstance(spec, str):
        return {spec}
    names: set[str] = set()
    if isinstance(spec, dict):
        if isinstance(spec.get("name"), str):
            names.add(spec["name"])
        for key, value in spec.items():
            if key == "mlp":  # the feed-forward spec (``{name: moe}``), not a mixer
                continue
            if isinstance(value, (dict, list)) or (key in SPEC_KEYS and isinstance(value, str)):
                names |= mixer_names(value)
    elif isinstance(spec, list):
        for item in spec:
            names |= mixer_names(item)
    return names


def test_every_registered_mixer_has_a_case() -> None:
    """A registered mixer without a contract case fails here: add its spec to ``CASES``
    (``memlm/testing/models.py``)."""
    covered = set().union(*(mixer_names(case) for case in CASES.values()))
    assert covered <= set(MIXERS), f"CASES name unregistered mixers: {sorted(covered - set(MIXERS))}"
    missing = sorted(set(MIXERS) - covered)
    assert not missing, f"registered mixers with no case in memlm.testing.models.CASES: {missing}"


def test_mixer_names_reads_nested_specs() -> None:
    case = {"ratio": "1:1", "ratio_mixer": "attention",
            "mixer": {"name": "titans_mac", "gates": "channel", "memory": {"name": "yaad"}},
            "layers": ["hgrn", {"name": "gla"}]}
    assert mixer_names(case) == {"attention", "titans_mac", "yaad", "hgrn", "gla"}


@pytest.mark.parametrize("case", CASES)
def test_forward_backward(case: str) -> None:
    model = build(case).train()
    ids = torch.randint(0, VOCAB, (2, 13))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 13, VOCAB)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert abs(out.loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5


@pytest.mark.parametrize("case", CASES)
def test_causality(case: str) -> None:
    """Changing tokens after position t never changes logits at positions ≤ t: bit for bit, except that a
    mixture-of-experts MLP multiplies each expert's tokens as one matrix, whose row count (and so the
    BLAS blocking, to float rounding) depends on which later tokens chose that expert."""
    model = build(case)
    ids = torch.randint(0, VOCAB, (2, 17))
    base = model(ids).logits
    tol = {"rtol": 0.0, "atol": 0.0} if "mlp" not in CASES[case] else {"rtol": 1e-5, "atol": 1e-6}
    for t in (0, 4, 9, 15):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, VOCAB, changed[:, t + 1:].shape)
        torch.testing.assert_close(model(changed).logits[:, : t + 1], base[:, : t + 1], **tol,
                                   msg=f"future leaked into t={t}")


@pytest.mark.parametrize("case", CASES)
def test_recurrent_decoding_equals_parallel(case: str) -> None:
    """Prefill a prefix, then feed one token at a time through the cache: same logits as one pass."""
    model = build(case)
    ids = torch.randint(0, VOCAB, (2, 14))
    full = model(ids).logits
    out = model(ids[:, :3], use_cache=True)
    steps, cache = [out.logits], out.cache
    for t in range(3, 14):
        out = model(ids[:, t: t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.cache
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 14


@pytest.mark.parametrize("case", CASES)
def test_save_load_bit_exact(case: str, tmp_path: Path) -> None:
    model = build(case)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    import memlm  # noqa: F401  (registers the Auto classes)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MemLMForCausalLM)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = torch.randint(0, VOCAB, (1, 9))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_packed_documents_equal_separate_runs() -> None:
    """With ``cu_seqlens``, documents packed in one row behave as separate sequences."""
    model = build("window")
    docs = [torch.randint(0, VOCAB, (1, n)) for n in (5, 9, 3)]
    packed = torch.cat(docs, dim=1)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    logits = model(packed, cu_seqlens=cu).logits
    separate = torch.cat([model(d).logits for d in docs], dim=1)
    torch.testing.assert_close(logits, separate, rtol=1e-5, atol=1e-5)


def test_tied_and_untied_heads() -> None:
    tied = build("attention")
    assert tied.lm_head.weight.data_ptr() == tied.model.embeddings.weight.data_ptr()
    untied = build("attention", tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embeddings.weight.data_ptr()


def test_bad_inputs_are_named() -> None:
    model = build("attention")
    with pytest.raises(ValueError, match="vocab_size is 61"):
        model(torch.tensor([[1, 2, 61]]))
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match=r"attention_mask has shape \[2, 2\]; allowed: \[batch, seq_len\]"):
        model(ids, attention_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        model(ids, attention_mask=torch.tensor([[0, 2, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match=r"rows \[1\] have no tokens"):
        model(ids, attention_mask=torch.tensor([[0, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"rows \[0\] end with padding.*padding_side = 'left'"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), use_cache=True)
    with pytest.raises(ValueError, match="attention_mask with padding or cu_seqlens"):
        model(ids[:1], attention_mask=torch.tensor([[0, 1, 1]]), cu_seqlens=torch.tensor([0, 3]))
    cache = model(ids, use_cache=True).cache
    with pytest.raises(ValueError, match="after the decoding cache was filled"):
        model(ids[:, :1], cache=cache, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="exactly one"):
        model.model()


def test_recurrent_state_size() -> None:
    full = build("attention")
    window = build("window")
    # 2 layers × K and V × 4 heads × head_dim 8 × kept tokens
    assert full.recurrent_state_size(100) == 2 * 2 * 32 * 100
    assert window.recurrent_state_size(100) == 2 * 2 * 32 * 5


def test_decoding_cache_under_either_name() -> None:
    """``cache`` and its earlier name ``past_key_values`` give the same decoding, with no warning."""
    import warnings

    model = build("titans-lmm")
    ids = torch.randint(0, VOCAB, (2, 9))
    logits = {}
    for name in ("cache", "past_key_values"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = model(ids[:, :5], use_cache=True)
            steps = [out.logits]
            state = out.cache
            for t in range(5, 9):
                out = model(ids[:, t: t + 1], use_cache=True, **{name: state})
                steps.append(out.logits)
                state = out.cache
        logits[name] = torch.cat(steps, dim=1)
    assert torch.equal(logits["cache"], logits["past_key_values"])
    torch.testing.assert_close(logits["cache"], model(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass the decoding cache once"):
        model(ids[:, :1], cache=state, past_key_values=model(ids[:, :1], use_cache=True).cache)
