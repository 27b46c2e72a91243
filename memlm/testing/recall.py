"""Write-then-read: does a memory mixer store anything, at initialisation?

A memory can pass every equation test against its reference and still store nothing (a gate that
starts at zero, a decay that wipes the state within a few tokens, a write too weak to rise above the
others). This probe writes ``pairs`` key–value pairs into the mixer's own memory recurrence, with the
mixer's own gates at initialisation, and reads them back by key.

The learned q/k/v projections are bypassed (random at init, they map one token to an unrelated query
and key); everything else is the mixer's: its gates, decays and write strengths computed from hidden
inputs ``x ~ N(0, 1)`` exactly as its forward computes them, the same q/k and value normalisation,
and the same kernel op (:func:`memlm.kernels.linear_memory` or ``NeuralMemory.write_read``). One short
adapter per family (``ADAPTERS``) does this; ``EXCLUDED`` lists, with a reason, every registered mixer
that is not a key–value memory of its own.

The sequence (``T = 2·chunk`` tokens, ``trials`` sequences in a batch, per head):

* keys are random unit vectors, values random with unit RMS; positions ``0 … pairs−1`` write the pairs
  ``(k_i, v_i)``, every other position writes a fresh random filler pair;
* queries ``q_t = k_{π(j)}`` (π a random permutation) at positions ``pairs … 2·pairs−1`` ("same_chunk":
  read in the chunk the pairs were written in) or, in a second run on the same data,
  ``chunk+pairs … chunk+2·pairs−1`` ("after_boundary"); other positions get random queries;
* recall is the fraction of reads ``o_t`` (the kernel output, before the output norm/projection) whose
  cosine similarity with the sequence's ``pairs`` values is largest for the right one (chance =
  ``1/pairs``), averaged over heads and trials.

``python -m memlm.testing.recall [names or JSON specs] [--seeds N]`` prints the table (default: every covered
mixer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.kernels import linear_memory
from memlm.layers.delta_net import sum_norm
from memlm.layers.linear_common import ACTIVATIONS, MixerCall, l2norm, log_forget
from memlm.layers.registry import MIXERS, parse_spec
from memlm.layers.retnet import ROPE_THETA, retention_log_decay
from memlm.layers.rotary import rotary
from memlm.layers.routing import Buckets, route, sequence_ids

__all__ = ["ADAPTERS", "EXCLUDED", "write_then_read"]

HIDDEN, HEADS = 64, 2  # the probe's model: hidden 64, 2 heads (head dim 32 unless the mixer says otherwise)

# Registered mixers that are not a key–value memory of their own, one reason each. A newly
# registered mixer must be added to ADAPTERS or here (tests/test_memory_recall.py checks).
EXCLUDED: tuple[tuple[str, str], ...] = (
    ("attention", "softmax attention keeps every token: exact recall by construction, not a memory write"),
    ("hgrn", "element-wise recurrence h_t = f⊙h + (1−f)⊙i: no keys or queries, nothing to address"),
    ("memory_caching", "wraps a registered memory (its `base` spec) and adds reads of its cached segment states"),
    ("titans_mac", "wraps a registered memory (its `memory` spec) with attention over its reads"),
    ("titans_mag", "wraps a registered memory (its `memory` spec) gated with sliding-window attention"),
    ("titans_mal", "wraps a registered memory (its `memory` spec) stacked before attention"),
)

# An adapter: (mixer, x [B,T,D], q, k [B,T,H,K], v [B,T,H,V], write) -> o [B,T,H,V]. It computes the
# gates from x as the mixer's forward does, scales the write strength by `write` and runs the kernel.
Adapter = Callable[[Any, Tensor, Tensor, Tensor, Tensor, float], Tensor]
# (num memory heads, key width, value width) of a built mixer
Dims = Callable[[Any], tuple[int, int, int]]


def _neural_memory(m: Any, x: Tensor, q: Tensor, k: Tensor, v: Tensor, write: float) -> Tensor:
    """Titans/Miras: θ, η, α, δ from ``m.project`` (eqs. 13–14); v RMS-normalised as ``value_norm``."""
    _, _, _, (lr, eta, alpha, delta), _ = m.project(x, (None, None, None))
    if m.opts.value_norm:
        v = F.rms_norm(v, (m.head_dim,), eps=1e-6)
    o, _ = m.write_read(q, k, v, (lr * write, eta, alpha, delta), m.initial_memory(x.shape[0]), want_state=False)
    return o


def _delta_net(m: Any, x: Tensor, q: Tensor, k: Tensor, v: Tensor, write: float) -> Tensor:
    """DeltaNet: ``S_t = S_{t−1} + β_t k_tᵀ(v_t − k_t S_{t−1})``, ``β_t = σ(x W_β)`` (×2 with negative eigenvalues)."""
    if m.qk_activation not in ("silu", "identity"):  # the forward's SiLU is fused into the conv we bypass
        q, k = ACTIVATIONS[m.qk_activation](q), ACTIVATIONS[m.qk_activation](k)
    q, k = (l2norm(t) if m.qk_norm == "l2" else sum_norm(t) for t in (q, k))
    return linear_memory(q, k, v, beta=m.beta(x, q) * write)[0]


def _gated_deltanet(m: Any, x: Tensor, q: Tensor, k: Tensor, v: Tensor, write: float) -> Tensor:
    """Gated DeltaNet (eq. 10): ``g_t = −exp(A_log)·softplus(x W_a + dt_bias)``, ``β_t = σ(x W_β)``."""
    g, beta = m.gates(x)
    return linear_memory(l2norm(q), l2norm(k), v, g=g, beta=beta * write)[0]


def _gla(m: Any, x: Tensor, q: Tensor, k: Tensor, v: Tensor, write: float) -> Tensor:
    """GLA (eq. 5): channel-wise ``log α_t = logσ(x W_1 W_2 + b) / normaliser``."""
    if m.feature_map is not None:
        q, k = ACTIVATIONS[m.feature_map](q), ACTIVATIONS[m.feature_map](k)
    _, _, gates = m.decay(x, q, k, MixerCall(None, False, None))
    return linear_memory(q, k, v * write, **gates)[0]


def _retnet(m: Any, x: Tensor, q: Tensor, k: Tensor, v: Tensor, write: float) -> Tensor:
    """RetNet (eq. 8): fixed ``γ_h = 1 − 2^{−5−h}``, q and k rotated by their positions (as the forward)."""
    if m.feature_map is not None:
        q, k = ACTIVATIONS[m.feature_map](q), ACTIVATIONS[m.feature_map](k)
    pos = torch.arange(x.shape[1], device=x.device)
    g = retention_log_decay(m.num_heads, x.device).expand(*x.shape[:2], -1).contiguous()
    return linear_memory(rotary(q, pos, ROPE_THETA), rotary(k, pos, ROPE_THETA), v * write, g=g)[0]


def _mamba2(m: Any, x: Tensor, q: Tensor, k: Tensor, v: Tensor, write: float) -> Tensor:
    """Mamba2 (SSD): ``q = C``, ``k = B``, ``v = Δ x``, ``g = −exp(A_log) Δ``, ``Δ = softplus(dt + dt_bias)``,
    scale 1; the read is ``C h_t`` without the skip ``D ⊙ x_t``. Keys are drawn per head (the forward shares
    ``B`` among the heads of a group)."""
    dt, g = m.step_sizes(m.in_proj(x)[..., -m.num_heads:])
    return linear_memory(q, k, v * dt[..., None] * write, g=g, scale=1.0)[0]


def _hgrn2(m: Any, x: Tensor, q: Tensor, k: Tensor, v: Tensor, write: float) -> Tensor:
    """HGRN2 (eq. 7): channel-wise ``log f_t`` (lower-bounded) from ``x``; the key, ``1 − f_t`` in the
    forward, is replaced by the explicit key like every other projection."""
    log_f = log_forget(MixerCall(None, False, None).conv("f", m.f_conv1d, m.f_proj(x)), m.lower_bound)
    return linear_memory(q, k, v * write, gk=log_f.unflatten(-1, (-1, m.head_f_dim)))[0]


def _mom(m: Any, x: Tensor, q: Tensor, k: Tensor, v: Tensor, write: float) -> Tensor:
    """Mixture-of-Memories: each token routed by the router at init to its top-k memories (plus the shared
    one), every memory with its own gates (``m.kind``), outputs mixed by the routing weights. A read whose
    query is an earlier key is routed as that key's token was (in a model the same token has the same
    hidden input, so the same memories); every other token by its own ``x``. The values are scaled by
    ``write``."""
    batch, seqlen = x.shape[:2]
    match = torch.einsum("bthd,bshd->bts", q, k) / q.shape[2]  # 1 where q_t equals k_s in every head
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=x.device).tril()
    match = match.masked_fill(~causal, -1.0)
    best, source = match.max(-1)
    source = torch.where(best > 0.999, source, torch.arange(seqlen, device=x.device))
    routing = route(m.gate, torch.gather(x, 1, source[..., None].expand_as(x)), m.topk)
    selected, weights = routing.selected, routing.weights
    if m.shared_mem:
        selected = torch.cat([selected, selected.new_full((batch, seqlen, 1), m.num_memories)], -1)
        weights = torch.cat([weights, weights.new_ones(batch, seqlen, 1)], -1)
    buckets = Buckets(selected, sequence_ids(batch, seqlen, None, x.device), m.num_slots, batch)
    qb, kb, vb = buckets.gather(q), buckets.gather(k), buckets.gather(v * write)
    if m.kind.normalize_qk:
        qb, kb = l2norm(qb), l2norm(kb)
    out, _ = m.kind.run(m, qb, kb, vb, x, buckets, buckets.sequence * m.num_slots + buckets.memory, None, False)
    return buckets.combine(out, weights)


def _linear_dims(m: Any) -> tuple[int, int, int]:
    """(heads, key width, value width) of DeltaNet, GLA and RetNet."""
    return m.num_heads, m.head_k_dim, m.head_v_dim


ADAPTERS: dict[str, tuple[Dims, Adapter]] = {
    **{name: (lambda m: (m.num_heads, m.head_dim, m.head_dim), _neural_memory)
       for name in ("titans_memory", "moneta", "yaad", "memora")},
    "delta_net": (_linear_dims, _delta_net),
    "gated_deltanet": (lambda m: (m.num_v_heads, m.head_k_dim, m.head_v_dim), _gated_deltanet),
    "gla": (_linear_dims, _gla),
    "retnet": (_linear_dims, _retnet),
    "mamba2": (lambda m: (m.num_heads, m.ssm_state_size, m.head_dim), _mamba2),
    "hgrn2": (lambda m: (m.num_heads, m.head_f_dim, m.head_i_dim), _hgrn2),
    "mom": (lambda m: (m.num_heads, m.head_k_dim, m.head_v_dim), _mom),
}


def _build(spec: Mapping[str, Any], chunk: int, seed: int) -> nn.Module:
    """The mixer of ``spec`` in a one-layer model (hidden 64, 2 heads), initialised as the model does
    (``_init_weights``: HF's init, then the mixer's ``init_weights``), in eval mode."""
    from memlm.models import MemLMConfig, MemLMForCausalLM

    cls, _ = parse_spec(spec)
    if "chunk_size" in {f.name for f in dataclasses.fields(cls.Options)}:
        spec = {"chunk_size": chunk, **spec}
    torch.manual_seed(seed)
    cfg = MemLMConfig(vocab_size=8, hidden_size=HIDDEN, num_hidden_layers=1, num_heads=HEADS, mixer=dict(spec))
    return MemLMForCausalLM(cfg).float().eval().model.layers[0].attn


def _unit(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Random unit vectors along the last dim."""
    return F.normalize(torch.randn(shape, generator=gen), dim=-1)


@torch.no_grad()
def write_then_read(
    mixer: str | Mapping[str, Any],
    *,
    pairs: int = 8,
    chunk: int = 16,
    trials: int = 64,
    seed: int = 0,
    write: float = 1.0,
) -> dict[str, float]:
    """Recall of ``pairs`` key–value pairs read back in the chunk they were written in (``same_chunk``)
    and after a chunk boundary (``after_boundary``), for the mixer named (or spec'd) ``mixer`` at
    initialisation. ``write`` scales the write strength (θ, β or the written value; 0: a memory that
    stores nothing, the negative control). Chance is ``1/pairs``."""
    spec = {"name": mixer} if isinstance(mixer, str) else dict(mixer)
    name = spec["name"]
    if name not in ADAPTERS:
        why = dict(EXCLUDED).get(name, "registered without an adapter: add one to ADAPTERS or a reason to EXCLUDED")
        raise ValueError(f"write_then_read: mixer {name!r} is not covered ({why})")
    if chunk < 2 * pairs:
        raise ValueError(f"write_then_read: chunk={chunk} must hold the pairs and their reads (>= 2·pairs={2 * pairs})")
    m = _build(spec, chunk, seed)
    dims, adapter = ADAPTERS[name]
    H, K, V = dims(m)
    B, T = trials, 2 * chunk
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, HIDDEN, generator=gen)
    k = _unit((B, T, H, K), gen)
    v = F.rms_norm(torch.randn(B, T, H, V, generator=gen), (V,))
    q_random = _unit((B, T, H, K), gen)
    perm = torch.rand(B, pairs, generator=gen).argsort(dim=-1)  # read j asks for pair perm[b, j]
    asked = torch.gather(k[:, :pairs], 1, perm[:, :, None, None].expand(-1, -1, H, K))
    values = v[:, :pairs]  # [B, pairs, H, V]
    recall = {}
    for label, start in (("same_chunk", pairs), ("after_boundary", chunk + pairs)):
        q = q_random.clone()
        q[:, start:start + pairs] = asked
        o = adapter(m, x, q, k, v, write)[:, start:start + pairs].float()  # [B, pairs(reads), H, V]
        cos = F.cosine_similarity(o[:, :, :, None], values.transpose(1, 2)[:, None], dim=-1)  # [B, reads, H, pairs]
        hit = cos.argmax(-1) == perm[:, :, None]
        recall[label] = hit.float().mean().item()
    return recall


def _table(mixers: list[str | Mapping[str, Any]], seeds: int = 1, **kw: Any) -> str:
    """A markdown table (mixer, same_chunk %, after_boundary % at seed 0, and with ``seeds > 1`` the minimum
    over seeds ``0 … seeds−1``) for BENCHMARKS.md."""
    head = "| mixer | same_chunk | after_boundary |" + (f" min over seeds 0–{seeds - 1} |" if seeds > 1 else "")
    rows = [head, "|---|---:|---:|" + ("---|" if seeds > 1 else "")]
    for mixer in mixers:
        runs = [write_then_read(mixer, **kw, seed=seed) for seed in range(seeds)]
        label = mixer if isinstance(mixer, str) else json.dumps(dict(mixer))
        row = f"| {label} | {100 * runs[0]['same_chunk']:.1f}% | {100 * runs[0]['after_boundary']:.1f}% |"
        if seeds > 1:
            low = [100 * min(r[key] for r in runs) for key in ("same_chunk", "after_boundary")]
            row += f" {low[0]:.1f}% / {low[1]:.1f}% |"
        rows.append(row)
    return "\n".join(rows)


if __name__ == "__main__":
    import memlm.layers  # noqa: F401  (registers every mixer)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mixers", nargs="*", help="registry names or JSON specs, e.g. "
                        '\'{"name": "moneta", "max_lr": 1.0}\' (default: every covered mixer)')
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=1, help="also report the minimum over seeds 0 … N−1")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, much faster on a busy machine
    mixers = [json.loads(m) if m.lstrip().startswith("{") else m for m in args.mixers]
    mixers = mixers or [n for n in MIXERS if n in ADAPTERS]
    print(_table(mixers, seeds=args.seeds, pairs=args.pairs, chunk=args.chunk, trials=args.trials))
    print(f"\nchance = {100 / args.pairs:.1f}%; not covered: " + "; ".join(f"{n} ({why})" for n, why in EXCLUDED))
