"""The contract every model obeys, for every mixer spec in ``CASES``:
causality, step-by-step decoding == parallel forward, generate == greedy argmax, save → load
bit-exact. A new mixer joins by adding its spec here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from memlm.models import MemLMConfig, MemLMForCausalLM

VOCAB = 61
CASES: dict[str, dict] = {
    "attention": {"mixer": {"name": "attention"}},
    "gqa": {"mixer": {"name": "attention", "num_heads": 4, "num_kv_heads": 2}},
    "window": {"mixer": {"name": "attention", "window_size": 5}},
    "persistent": {"mixer": {"name": "attention", "num_persistent": 3}},
    "window+persistent": {"mixer": {"name": "attention", "window_size": 4, "num_persistent": 2}},
    "hybrid-1:1": {"ratio": "1:1", "mixer": {"name": "attention", "window_size": 3}, "ratio_mixer": "attention"},
    "gated_deltanet": {"mixer": {"name": "gated_deltanet"}},
    "gdn-gva-plain": {"mixer": {"name": "gated_deltanet", "num_v_heads": 8, "use_short_conv": False,
                                "use_gate": False}},
    "delta_net": {"mixer": {"name": "delta_net", "use_gate": True}},
    "gla": {"mixer": {"name": "gla", "num_kv_heads": 2, "use_short_conv": True}},
    "retnet": {"mixer": {"name": "retnet"}},
    "hgrn": {"mixer": {"name": "hgrn", "lower_bound": 0.3, "use_short_conv": True}},
    "hgrn2": {"mixer": {"name": "hgrn2", "lower_bound": 0.3}},
    "mamba2": {"mixer": {"name": "mamba2", "head_dim": 8, "state_size": 8, "n_groups": 2}},
    "hybrid-gdn+swa": {"ratio": "1:1", "mixer": {"name": "gated_deltanet"},
                       "ratio_mixer": {"name": "attention", "window_size": 4, "num_kv_heads": 2}},
    "hybrid-attn+hgrn2": {"layers": [{"name": "attention"}, {"name": "hgrn2", "lower_bound": 0.5}]},
    "titans-lmm": {"mixer": {"name": "titans_memory", "chunk_size": 4, "num_persistent": 2}},
    "titans-mac": {"mixer": {"name": "titans_mac", "segment_size": 6,
                             "memory": {"name": "titans_memory", "chunk_size": 4},
                             "attention": {"name": "attention", "num_persistent": 2}}},
    "titans-mag": {"mixer": {"name": "titans_mag", "memory": {"name": "titans_memory", "chunk_size": 4},
                             "attention": {"name": "attention", "window_size": 5, "num_persistent": 2}}},
    "titans-mal": {"mixer": {"name": "titans_mal", "memory": {"name": "titans_memory", "chunk_size": 3},
                             "attention": {"name": "attention", "window_size": 4}}},
    "titans-lmm-channel": {"mixer": {"name": "titans_memory", "chunk_size": 4, "gates": "channel", "gate_rank": 4}},
    "moneta": {"mixer": {"name": "moneta", "chunk_size": 4, "gate_rank": 4}},
    "yaad": {"mixer": {"name": "yaad", "chunk_size": 3, "gate_rank": 4}},
    "memora": {"mixer": {"name": "memora", "chunk_size": 4, "gate_rank": 4, "num_persistent": 2}},
    "moneta-h": {"ratio": "1:1", "mixer": {"name": "moneta", "chunk_size": 4, "gate_rank": 4},
                 "ratio_mixer": {"name": "attention", "window_size": 4}},
    "mac-yaad": {"mixer": {"name": "titans_mac", "segment_size": 6, "memory": {"name": "yaad", "chunk_size": 4},
                           "attention": {"name": "attention", "num_persistent": 2}, "normalize_attention": True}},
}


def build(case: str, **kw: object) -> MemLMForCausalLM:
    torch.manual_seed(0)
    cfg = MemLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=4,
                      **{**CASES[case], **kw})
    return MemLMForCausalLM(cfg).eval()


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
    """Changing tokens after position t never changes logits at positions ≤ t."""
    model = build(case)
    ids = torch.randint(0, VOCAB, (2, 17))
    base = model(ids).logits
    for t in (0, 4, 9, 15):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, VOCAB, changed[:, t + 1:].shape)
        assert torch.equal(model(changed).logits[:, : t + 1], base[:, : t + 1]), f"future leaked into t={t}"


@pytest.mark.parametrize("case", CASES)
def test_recurrent_decoding_equals_parallel(case: str) -> None:
    """Prefill a prefix, then feed one token at a time through the cache: same logits as one pass."""
    model = build(case)
    ids = torch.randint(0, VOCAB, (2, 14))
    full = model(ids).logits
    out = model(ids[:, :3], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(3, 14):
        out = model(ids[:, t: t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 14


@pytest.mark.parametrize("case", CASES)
def test_generate_equals_greedy_argmax(case: str) -> None:
    """``generate`` with the cache picks the argmax of a full forward at every step
    (for sliding windows, well past the window size)."""
    model = build(case)
    prompt = torch.randint(0, VOCAB, (2, 4))
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                               do_sample=False, pad_token_id=0)
    seq = prompt
    for _ in range(12):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)


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
    with pytest.raises(ValueError, match="padded"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="exactly one"):
        model.model()


def test_recurrent_state_size() -> None:
    full = build("attention")
    window = build("window")
    # 2 layers × K and V × 4 heads × head_dim 8 × kept tokens
    assert full.recurrent_state_size(100) == 2 * 2 * 32 * 100
    assert window.recurrent_state_size(100) == 2 * 2 * 32 * 5
