"""Mixture-of-Memories (``memlm/layers/mom.py``): routing into time-ordered buckets, per-bucket
convolutions, untouched unselected memories, the load-balancing loss through the auxiliary-loss
channel, bad options. The model contract (causality, decoding, generate, save/load) runs on the
``mom*`` cases of ``memlm.testing.models``; fla equivalence and checkpoint loading in test_convert.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memlm.layers.aux_loss import LoadBalance, collect, combine
from memlm.layers.conv import ShortConvolution
from memlm.layers.registry import build_mixer
from memlm.layers.routing import Buckets, route, segment_conv, sequence_ids
from memlm.models import MemLMConfig, MemLMForCausalLM
from memlm.testing.models import VOCAB, build
from memlm.testing.recall import write_then_read
from memlm.train.config import load_config
from memlm.train.metrics import read_jsonl
from memlm.train.trainer import train


class _Config:
    num_heads = 2
    norm_eps = 1e-6


def _mixer(**spec: object) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_mixer({"name": "mom", **spec}, 32, _Config())
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return m.eval()


def _routes(batch: int, seqlen: int, memories: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random top-k choices ``[B, T, k]``, distinct per token."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, seqlen, memories, generator=gen).argsort(-1)[..., :k]


@pytest.mark.parametrize("packed", [False, True])
def test_buckets_hold_each_memory_s_tokens_in_time_order(packed: bool) -> None:
    batch, seqlen, memories, k = (1, 23, 4, 2) if packed else (3, 17, 4, 2)
    cu = torch.tensor([0, 6, 15, 23]) if packed else None
    selected = _routes(batch, seqlen, memories, k)
    sequences = 3 if packed else batch
    seq = sequence_ids(batch, seqlen, cu, selected.device)
    b = Buckets(selected, seq, memories, sequences)
    seen = set()
    for i in range(b.cu_seqlens.numel() - 1):
        tokens = b.token[b.cu_seqlens[i]:b.cu_seqlens[i + 1]]
        assert bool((tokens[1:] > tokens[:-1]).all()), "a bucket left time order"
        assert bool((seq[tokens] == b.sequence[i]).all()), "a bucket spans two sequences"
        picked = selected.flatten(0, 1)[tokens]
        assert bool((picked == b.memory[i]).any(-1).all()), "a token in a memory it did not pick"
        seen |= {(int(t), int(b.memory[i])) for t in tokens}
    assert seen == {(t, int(e)) for t in range(batch * seqlen) for e in selected.flatten(0, 1)[t]}
    # combine is the inverse of gather: weights 1 on slot 0 give back the tokens themselves
    x = torch.randn(batch, seqlen, 5)
    weights = torch.zeros(batch, seqlen, k)
    weights[..., 0] = 1.0
    assert torch.equal(b.combine(b.gather(x), weights), x)


def test_router_weights_are_renormalised_softmax_top_k() -> None:
    gate = torch.nn.Linear(8, 5, bias=False)
    x = torch.randn(2, 7, 8)
    r = route(gate, x, 3)
    probs = (x @ gate.weight.T).softmax(-1)
    top = probs.topk(3, -1)
    torch.testing.assert_close(r.weights, top.values / top.values.sum(-1, keepdim=True))
    assert torch.equal(r.selected, top.indices)


def test_segment_conv_equals_each_segment_from_its_history() -> None:
    conv = ShortConvolution(6, 4)
    torch.nn.init.normal_(conv.weight)
    lengths = [5, 1, 0, 7, 2]
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0))
    x, history = torch.randn(1, sum(lengths), 6), torch.randn(len(lengths), 3, 6)
    y, last = segment_conv(conv, x, cu, history)
    for i in range(len(lengths)):
        ref, state = conv(x[:, cu[i]:cu[i + 1]], history[i:i + 1], True)
        torch.testing.assert_close(y[:, cu[i]:cu[i + 1]], ref)
        torch.testing.assert_close(last[i], state[0])


@pytest.mark.parametrize("base", ["gated_deltanet", {"name": "titans_memory", "chunk_size": 3}])
def test_an_unselected_memory_is_not_touched(base: object) -> None:
    m = _mixer(base=base)
    x = torch.randn(2, 11, 32)
    _, state = m(x[:, :10], use_cache=True)
    routing = route(m.gate, x[:, 10:], m.topk)
    _, after = m(x[:, 10:], state, use_cache=True)

    def leaves(s: object) -> list[torch.Tensor]:
        if isinstance(s, torch.Tensor):
            return [s]
        if isinstance(s, dict):
            return [t for v in s.values() for t in leaves(v)]
        if isinstance(s, (list, tuple)):
            return [t for v in s for t in leaves(v)]
        return []

    changed = 0
    for old, new in zip(leaves(state), leaves(after)):
        for row in range(2):
            for e in range(m.num_memories):
                if e in routing.selected[row, 0].tolist():
                    changed += not torch.equal(old[row, e], new[row, e])
                else:
                    assert torch.equal(old[row, e], new[row, e]), f"memory {e} of row {row} changed unselected"
    assert changed, "no selected memory changed"


def test_one_memory_is_gated_deltanet() -> None:
    """One memory, top-1, no shared memory: the layer is Gated DeltaNet with the same weights."""
    mom = _mixer(num_memories=1, topk=1, shared_mem=False, head_dim=16, expand_v=2.0)
    gdn = build_mixer({"name": "gated_deltanet", "head_dim": 16, "expand_v": 2.0}, 32, _Config()).eval()
    with torch.no_grad():
        for name, p in gdn.named_parameters():
            source = name.replace("k_proj", "k_proj.0").replace("v_proj", "v_proj.0").replace("a_proj", "a_proj.0")
            source = source.replace("b_proj", "b_proj.0")
            p.copy_(mom.get_parameter(source))
    x = torch.randn(2, 19, 32)
    torch.testing.assert_close(mom(x)[0], gdn(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["mom", "mom-titans"])
def test_train_mode_equals_eval_mode(case: str) -> None:
    """fla's MoM convolves across buckets in training mode only; here both modes compute the same."""
    model = build(case)
    ids = torch.randint(0, VOCAB, (2, 15))
    assert torch.equal(model.train()(ids).logits, model.eval()(ids).logits)


@pytest.mark.parametrize("case", ["mom", "mom-titans"])
def test_packed_documents_equal_separate_runs(case: str) -> None:
    model = build(case)
    docs = [torch.randint(0, VOCAB, (1, n)) for n in (5, 9, 3)]
    logits = model(torch.cat(docs, 1), cu_seqlens=torch.tensor([0, 5, 14, 17], dtype=torch.int32)).logits
    separate = torch.cat([model(d).logits for d in docs], dim=1)
    torch.testing.assert_close(logits, separate, rtol=1e-5, atol=1e-5)


def _switch_loss(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """Switch Transformer's ``E · Σ_e f_e P_e`` written out per token (a second implementation)."""
    probs = logits.float().softmax(-1)
    num = probs.shape[-1]
    counts = torch.zeros(num)
    for row in probs.topk(topk, -1).indices:
        counts[row] += 1
    return num * (counts / probs.shape[0] * probs.mean(0)).sum()


def test_load_balance_is_switch_loss_over_all_layers_and_trains_the_router() -> None:
    model = build("mom").train()
    logits = []
    hooks = [layer.attn.gate.register_forward_hook(lambda mod, inp, out: logits.append(out.flatten(0, 1)))
             for layer in model.model.layers]
    ids = torch.randint(0, VOCAB, (2, 13))
    out = model(ids, labels=ids)
    for h in hooks:
        h.remove()
    expected = _switch_loss(torch.cat(logits), model.model.layers[0].attn.topk)
    torch.testing.assert_close(out.aux_losses["load_balance"], expected)
    torch.testing.assert_close(out.aux_loss, 0.01 * expected)
    out.aux_loss.backward()
    for layer in model.model.layers:
        assert layer.attn.gate.weight.grad is not None and layer.attn.gate.weight.grad.abs().sum() > 0
    assert model.model.layers[-1].attn.o_proj.weight.grad is None  # nothing after the last router
    # a plain model has no auxiliary loss
    assert build("gated_deltanet")(ids, labels=ids).aux_loss is None


def test_aux_terms_combine_by_kind_and_outside_a_forward_are_dropped() -> None:
    a, b = torch.randn(6, 4), torch.randn(5, 4)
    with collect() as terms:
        from memlm.layers.aux_loss import report

        report(LoadBalance("load_balance", 0.5, logits=a, topk=2))
        report(LoadBalance("load_balance", 0.5, logits=b, topk=2))
    report(LoadBalance("load_balance", 0.5, logits=a, topk=2))  # no collector: dropped
    total, values = combine(terms)
    torch.testing.assert_close(values["load_balance"], _switch_loss(torch.cat([a, b]), 2))
    torch.testing.assert_close(total, 0.5 * values["load_balance"])
    assert combine([]) == (None, {})


def test_trainer_adds_and_logs_the_aux_loss(tmp_path: Path, tiny_overrides) -> None:
    overrides = tiny_overrides(tmp_path, **{"training.steps": 4, "logging.val_every": 4, "checkpoint.every": 4})
    overrides += ["model.mixer={name: mom, num_heads: 2, aux_loss_scale: 0.1}"]
    train(load_config(None, overrides))
    rows = [r for r in read_jsonl(tmp_path / "t" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 4
    for r in rows:
        assert r["load_balance"] >= 1.0 and r["aux_loss"] == pytest.approx(0.1 * r["load_balance"], rel=1e-5)


@pytest.mark.parametrize("base", ["titans_memory", "moneta"])
def test_mom_over_deep_memories_reads_back_pairs(base: str) -> None:
    """Each routed deep memory stores its tokens' pairs (chance 12.5%; at seed 0: titans 78 / 64 %,
    moneta 88 / 80 %)."""
    recall = write_then_read({"name": "mom", "base": base})
    assert recall["same_chunk"] > 0.5 and recall["after_boundary"] > 0.4, recall


@pytest.mark.parametrize(("spec", "message"), [
    ({"capacity": 0.5}, "capacity must be 1.0"),
    ({"topk": 5}, "topk=5 must be <= num_memories=4"),
    ({"base": "attention"}, "mom.base must be one of"),
    ({"base": "no_such"}, "unknown mixer name 'no_such'"),
    ({"base": {"name": "titans_memory", "num_heads": 2}}, "are set on the mom layer"),
    ({"base": {"name": "gated_deltanet", "head_dim": 8}}, "takes only the options ['allow_neg_eigval']"),
    ({"base": "moneta", "expand_v": 2.0}, "expand_v must be 1.0 with a deep-memory base"),
])
def test_bad_options_are_named(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match="layers\\[0\\]") as err:
        MemLMForCausalLM(MemLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_heads=2,
                                     mixer={"name": "mom", **spec}))
    assert message in str(err.value)
