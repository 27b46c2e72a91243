"""Memory Caching over matrix memories (``memlm/layers/memory_caching.py``): one segment is the base
mixer, the residual read is the explicit sum of segment states, soup is grm and ssc with every cache is
grm, the decoding state grows by one cache per segment, packed documents. The model contract (causality,
decoding, generate across boundaries, save/load) runs on the ``mc-*`` cases of ``memlm.testing.models``;
the readout kernel in tests/test_kernels/test_cached_readout.py."""

from __future__ import annotations

import pytest
import torch

from memlm.kernels import linear_memory
from memlm.layers.memory_caching import CachingCall
from memlm.layers.registry import build_mixer
from memlm.models import MemLMConfig, MemLMForCausalLM
from memlm.testing.models import VOCAB, build


class _Config:
    num_heads = 2
    norm_eps = 1e-6


def _mixer(**spec: object) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_mixer({"name": "memory_caching", **spec}, 32, _Config())
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return m.eval()


MAMBA2 = {"name": "mamba2", "head_dim": 8, "state_size": 8}


@pytest.mark.parametrize("base", ["gated_deltanet", "gla", "retnet", MAMBA2])
@pytest.mark.parametrize("aggregation", ["residual", "grm", "ssc"])
def test_one_segment_is_the_base(base: object, aggregation: str) -> None:
    m = _mixer(base=base, aggregation=aggregation, segment_size=32)
    x = torch.randn(2, 19, 32)
    assert torch.equal(m(x)[0], m.base(x)[0])


def _fenwick(s: int) -> list[tuple[int, int]]:
    """The binary split of segments ``[0, s)``, largest group first (log-linear attention's partition)."""
    groups, start = [], 0
    for bit in reversed(range(s.bit_length())):
        if s >> bit & 1:
            groups.append((start, start + (1 << bit)))
            start += 1 << bit
    return groups


@pytest.mark.parametrize("segments", ["constant", "log"])
@pytest.mark.parametrize("init", ["checkpoint", "independent"])
def test_residual_read_is_the_explicit_sum_of_segment_states(init: str, segments: str) -> None:
    """``o_t = q_t S_t + Σ_i q_t S^{(i)}`` over the caches of t's segment s (constant: each segment i < s; log:
    the groups of the binary split of [0, s)), ``S^{(i)}`` a cache's end state, computed here by running the
    delta rule on each prefix (checkpoint) or on the cache's own tokens (independent)."""
    size, T = (4, 14) if segments == "constant" else (2, 23)
    m = _mixer(base="delta_net", aggregation="residual", segment_size=size, segment_init=init, segments=segments)
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.nn.functional.normalize(torch.randn(2, T, 2, 16, generator=gen, dtype=torch.float64), dim=-1)
            for _ in range(2))
    v = torch.randn(2, T, 2, 16, generator=gen, dtype=torch.float64)
    beta = torch.rand(2, T, 2, generator=gen, dtype=torch.float64)
    call = CachingCall(m, torch.zeros(2, T, 32), None, False, None)
    got, _ = m.read(q, k, v, {"beta": beta}, call)
    expected = torch.zeros_like(got)
    for t in range(T):
        s = t // size
        lo = s * size if init == "independent" else 0
        expected[:, t] = linear_memory(q[:, lo:t + 1], k[:, lo:t + 1], v[:, lo:t + 1], beta=beta[:, lo:t + 1],
                                       backend="naive")[0][:, -1]
        groups = [(i, i + 1) for i in range(s)] if segments == "constant" else _fenwick(s)
        for a, b in groups:
            lo_i, hi_i = (a * size if init == "independent" else 0), b * size
            _, state = linear_memory(q[:, lo_i:hi_i], k[:, lo_i:hi_i], v[:, lo_i:hi_i], beta=beta[:, lo_i:hi_i],
                                     output_final_state=True, backend="naive")
            expected[:, t] += torch.einsum("bhk,bhkv->bhv", q[:, t], state) * 16 ** -0.5
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_log_grm_gates_over_the_binary_split_with_group_means() -> None:
    """grm with log segments: γ is a softmax over the online summary and one summary per group of the binary
    split, the mean of the group's keys (u_t = q_t here)."""
    size, T = 2, 21
    m = _mixer(base="delta_net", segment_size=size, segments="log", gate_input="query")
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.nn.functional.normalize(torch.randn(1, T, 2, 16, generator=gen, dtype=torch.float64), dim=-1)
            for _ in range(2))
    v = torch.randn(1, T, 2, 16, generator=gen, dtype=torch.float64)
    beta = torch.rand(1, T, 2, generator=gen, dtype=torch.float64)
    got, _ = m.read(q, k, v, {"beta": beta}, CachingCall(m, torch.zeros(1, T, 32), None, False, None))
    for t in range(T):
        s = t // size
        online = linear_memory(q[:, :t + 1], k[:, :t + 1], v[:, :t + 1], beta=beta[:, :t + 1],
                               backend="naive")[0][0, -1]
        reads, scores = [online], [(q[0, t] * k[0, s * size:t + 1].mean(0)).sum(-1)]
        for a, b in _fenwick(s):
            _, state = linear_memory(q[:, :b * size], k[:, :b * size], v[:, :b * size], beta=beta[:, :b * size],
                                     output_final_state=True, backend="naive")
            reads.append(torch.einsum("hk,hkv->hv", q[0, t], state[0]) * 16 ** -0.5)
            scores.append((q[0, t] * k[0, a * size:b * size].mean(0)).sum(-1))
        gamma = torch.stack(scores).softmax(0)  # [n, H]
        torch.testing.assert_close(got[0, t], (gamma[..., None] * torch.stack(reads)).sum(0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("base", ["gated_deltanet", {"name": "titans_memory", "chunk_size": 2}])
def test_the_gate_projection_gets_a_gradient_before_any_cache(base: object) -> None:
    """A step whose sequences close no segment still takes W_u into its graph (a zero gradient), as
    DistributedDataParallel needs, and its output is the base's exactly."""
    m = _mixer(base=base, segment_size=32).train()
    x = torch.randn(2, 19, 32)
    y = m(x)[0]
    assert torch.equal(y, m.base(x)[0])
    y.sum().backward()
    assert m.u_proj.weight.grad is not None and not m.u_proj.weight.grad.any()


def test_soup_is_grm_and_ssc_with_every_cache_is_grm_for_a_matrix_memory() -> None:
    x = torch.randn(2, 23, 32)
    grm = _mixer(aggregation="grm", segment_size=3)(x)[0]
    assert torch.equal(_mixer(aggregation="soup", segment_size=3)(x)[0], grm)
    assert torch.equal(_mixer(aggregation="ssc", segment_size=3, top_k=8)(x)[0], grm)
    sparse = _mixer(aggregation="ssc", segment_size=3, top_k=1)(x)[0]
    assert torch.equal(sparse[:, :6], grm[:, :6])  # at most one cache visible: the same read
    assert not torch.allclose(sparse[:, 9:], grm[:, 9:])  # three or more: top-1 reads less


def test_the_decoding_state_grows_by_one_cache_per_segment() -> None:
    size = 4
    m = _mixer(segment_size=size)
    x = torch.randn(1, 13, 32)
    state = None
    for t in range(13):
        _, state = m(x[:, t:t + 1], state, use_cache=True)
        assert state["caches"].shape[1] == (t + 1) // size and state["count"] == (t + 1) % size
    grown = m.state_size(64) - m.state_size(32)
    assert grown == (64 // size - 32 // size) * (m.base.memory_numel + m.num_heads * m.key_dim)


@pytest.mark.parametrize("init", ["checkpoint", "independent"])
def test_log_decoding_keeps_one_cache_per_set_bit(init: str) -> None:
    """With log segments the state holds the groups of the binary split of the closed segments: popcount of
    their number, never more."""
    size = 2
    m = _mixer(segment_size=size, segments="log", segment_init=init)
    x = torch.randn(1, 35, 32)
    state = None
    for t in range(35):
        _, state = m(x[:, t:t + 1], state, use_cache=True)
        units = (t + 1) // size
        assert state["units"] == units and state["caches"].shape[1] == units.bit_count()
        assert list(state["ids"]) == [b - 1 for _, b in _fenwick(units)]
    assert m.state_size(2 * 1024) == m.state_size(2 * 512)  # one group each
    assert m.state_size(2 * 1023) - m.state_size(2 * 1024) == 9 * (m.state_size(2 * 3) - m.state_size(2 * 2))


BASES_BY_KIND = {"matrix": "gated_deltanet", "deep": {"name": "titans_memory", "chunk_size": 2}}


@pytest.mark.parametrize("segments", ["constant", "log"])
@pytest.mark.parametrize("kind", ["matrix", "deep"])
@pytest.mark.parametrize("aggregation", ["residual", "grm", "soup", "ssc"])
def test_decoding_equals_the_parallel_pass(aggregation: str, kind: str, segments: str) -> None:
    """Every aggregation over a matrix and a deep memory, constant and log segments: a prefill then one token
    at a time gives the parallel outputs, across eleven segment ends (float64: the random deep memory's float32
    round-off grows to 1e-4 over 23 tokens; Gated DeltaNet computes its gates in float32, as fla does)."""
    m = _mixer(base=BASES_BY_KIND[kind], aggregation=aggregation, segments=segments, segment_size=2, top_k=1).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    full = m(x)[0]
    out, state = m(x[:, :3], None, use_cache=True)
    steps = [out]
    for t in range(3, 23):
        out, state = m(x[:, t:t + 1], state, use_cache=True)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["mc-gdn-grm", "mc-mamba2-independent", "mc-titans-grm", "mc-moneta-ssc-independent",
                                  "mc-gdn-log-grm", "mc-deltanet-log-independent-ssc", "mc-titans-log-soup"])
def test_packed_documents_equal_separate_runs(case: str) -> None:
    model = build(case)
    docs = [torch.randint(0, VOCAB, (1, n)) for n in (7, 13, 5)]
    logits = model(torch.cat(docs, 1), cu_seqlens=torch.tensor([0, 7, 20, 25], dtype=torch.int32)).logits
    separate = torch.cat([model(d).logits for d in docs], dim=1)
    torch.testing.assert_close(logits, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("spec", "message"), [
    ({"aggregation": "mean"}, "aggregation must be one of"),
    ({"segments": "fenwick"}, "segments must be one of"),
    ({"segment_init": "random"}, "segment_init must be one of"),
    ({"segment_size": 0}, "segment_size must be >= 1"),
    ({"base": "attention"}, "memory_caching.base must be one of"),
    ({"base": "nope"}, "unknown mixer name 'nope'"),
])
def test_bad_options_are_named(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match="layers\\[0\\]") as err:
        MemLMForCausalLM(MemLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_heads=2,
                                     mixer={"name": "memory_caching", **spec}))
    assert message in str(err.value)


def _cached_and_plain_recall(m: torch.nn.Module, write: int, read: int, T: int) -> tuple[float, float]:
    """8 pairs written at tokens ``write …`` and queried at ``read …`` through ``m``'s cached read of a memory that
    decays by 0.8 per token (retnet's recurrence), against the plain memory: the fraction of queries whose
    output is nearest to their own value (chance 12.5%)."""
    pairs, K = 8, 16
    gen = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(64, T, 1, K, generator=gen), dim=-1)
    v = torch.randn(64, T, 1, K, generator=gen)
    q = torch.nn.functional.normalize(torch.randn(64, T, 1, K, generator=gen), dim=-1)
    perm = torch.rand(64, pairs, generator=gen).argsort(-1)
    q[:, read:read + pairs] = torch.gather(k[:, write:write + pairs], 1, perm[:, :, None, None].expand(-1, -1, 1, K))
    g = torch.full((64, T, 1), -0.223)  # log 0.8
    call = CachingCall(m, torch.zeros(64, T, 32), None, False, None)
    cached = m.read(q, k, v, {"g": g}, call)[0][:, read:read + pairs, 0]
    plain = linear_memory(q, k, v, g=g)[0][:, read:read + pairs, 0]

    def recall(o: torch.Tensor) -> float:
        cos = torch.nn.functional.cosine_similarity(o[:, :, None], v[:, None, write:write + pairs, 0], dim=-1)
        return (cos.argmax(-1) == perm).float().mean().item()

    return recall(cached), recall(plain)


def test_caches_keep_pairs_the_decayed_memory_forgot() -> None:
    """The point of the paper: a memory decaying by 0.8 per token has forgotten 8 pairs 24 tokens later (chance
    12.5%, 0.8^24 ≈ 0.005); read with its cache of the segment they were written in, they come back."""
    m = _mixer(base="retnet", aggregation="residual", segment_size=8)
    cached, plain = _cached_and_plain_recall(m, write=0, read=32, T=40)
    assert plain < 0.25 and cached > 0.45, (cached, plain)  # 0.604 and 0.150


@pytest.mark.parametrize("init", ["checkpoint", "independent"])
def test_log_caches_keep_pairs_the_decayed_memory_forgot(init: str) -> None:
    """With log segments the pairs of segment 3 come back at segment 6 through the group of segments [0, 4),
    a cache that closed right after them, after the memory itself forgot them."""
    m = _mixer(base="retnet", aggregation="residual", segment_size=8, segments="log", segment_init=init)
    cached, plain = _cached_and_plain_recall(m, write=24, read=48, T=56)
    assert plain < 0.25 and cached > 0.45, (cached, plain)  # 0.129; checkpoint 0.662, independent 0.705


TITANS = {"name": "titans_memory", "chunk_size": 2}


@pytest.mark.parametrize("base", [TITANS, {"name": "moneta", "chunk_size": 2, "gate_rank": 4}])
@pytest.mark.parametrize("aggregation", ["residual", "grm", "ssc"])
def test_one_segment_is_the_deep_base(base: dict, aggregation: str) -> None:
    m = _mixer(base=base, aggregation=aggregation, segment_size=32)
    x = torch.randn(2, 19, 32)
    assert torch.equal(m(x)[0], m.base(x)[0])


def test_deep_ssc_with_every_cache_is_grm_and_caches_grow() -> None:
    x = torch.randn(2, 17, 32)
    grm = _mixer(base=TITANS, segment_size=4)
    torch.testing.assert_close(_mixer(base=TITANS, segment_size=4, aggregation="ssc", top_k=8)(x)[0], grm(x)[0],
                               rtol=0, atol=0)
    assert not torch.allclose(_mixer(base=TITANS, segment_size=4, aggregation="ssc", top_k=1)(x)[0][:, 12:],
                              grm(x)[0][:, 12:])
    state = None
    for t in range(9):
        _, state = grm(x[:1, t:t + 1], state, use_cache=True)
    base = state["base"]  # the state at the current segment's start: two segments closed after 9 tokens
    assert base["caches"][0].shape[1] == 2 and state["pending"].shape[1] == 1


def test_deep_soup_differs_from_grm_and_is_grm_with_one_cache_of_a_linear_memory() -> None:
    """An MLP memory read at the mean of its caches' weights is not the mean of its reads; with a linear
    memory (depth 1, no residual or norm) the two agree."""
    x = torch.randn(2, 17, 32)
    for base, same in ((TITANS, False), ({**TITANS, "depth": 1, "residual": False, "memory_norm": False}, True)):
        soup = _mixer(base=base, segment_size=4, aggregation="soup")(x)[0]
        grm = _mixer(base=base, segment_size=4)(x)[0]
        torch.testing.assert_close(soup[:, :4], grm[:, :4], rtol=0, atol=0)  # no cache yet
        assert torch.allclose(soup, grm, rtol=1e-5, atol=1e-6) == same


@pytest.mark.parametrize(("spec", "message"), [
    ({"segment_size": 5}, "must be a multiple of the deep memory's chunk_size=2"),
])
def test_deep_memory_options_are_checked(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match="layers\\[0\\]") as err:
        MemLMForCausalLM(MemLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_heads=2,
                                     mixer={"name": "memory_caching", "base": TITANS, **spec}))
    assert message in str(err.value)


def test_cost_benchmark_runs_every_read_against_its_base() -> None:
    """``benchmarks/memory_caching_cost.py --quick``: one row per base and read, each with a positive time and
    its ratio to the base measured in the same run (the base's own ratio is 1)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_caching_cost.py"
    spec = importlib.util.spec_from_file_location("memory_caching_cost", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [line.split("|")[1:-1] for line in bench.main(["--quick"]).splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 2 * (1 + len(bench.READS))
    for _base, read, seconds, _, ratio in rows:
        assert float(seconds) > 0 and (float(ratio) == 1.0 if read.strip() == "base" else float(ratio) > 0)
