"""Linear-memory mixers (GDN, DeltaNet, GLA, RetNet, HGRN, HGRN2, Mamba2) and hybrid stacks.

The model contract (causality, decoding == parallel, generate, save/load) runs on every mixer
through ``tests/test_model_contract.py``; equivalence with flash-linear-attention's layers is in
``tests/test_convert.py``. Here: packed documents, per-token references of the HGRN and Mamba2
recurrences, option checks, and the hybrid ratios (layer indices, a few training steps, generation).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memlm.layers.registry import build_mixer
from memlm.models import MemLMConfig, MemLMForCausalLM, ratio_pattern
from memlm.presets import load_preset, preset_names

VOCAB = 53
SPECS = {
    "gated_deltanet": {"name": "gated_deltanet", "num_v_heads": 8},
    "delta_net": {"name": "delta_net", "use_gate": True, "qk_norm": "sum", "qk_activation": "relu"},
    "gla": {"name": "gla", "num_kv_heads": 2, "use_short_conv": True},
    "retnet": {"name": "retnet", "num_kv_heads": 2, "gate_fn": "sigmoid"},
    "hgrn": {"name": "hgrn", "use_short_conv": True, "lower_bound": 0.4},
    "hgrn2": {"name": "hgrn2", "lower_bound": 0.2, "use_short_conv": True},
    "mamba2": {"name": "mamba2", "head_dim": 8, "state_size": 6, "n_groups": 2, "dt_limit": [0.0, 0.5]},
}


def config(**kw: object) -> MemLMConfig:
    defaults = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 4}
    return MemLMConfig(**{**defaults, **kw})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", SPECS)
def test_packed_documents_equal_separate_runs(name: str) -> None:
    """With ``cu_seqlens`` no state, convolution tap or rotary position crosses a document boundary."""
    torch.manual_seed(0)
    mixer = build_mixer(SPECS[name], 32, config())
    x = torch.randn(1, 17, 32)
    bounds = (0, 6, 7, 17)
    packed, _ = mixer(x, cu_seqlens=torch.tensor(bounds, dtype=torch.int32))
    separate = torch.cat([mixer(x[:, a:b])[0] for a, b in zip(bounds, bounds[1:])], dim=1)
    assert rel(packed, separate) < 1e-5


@pytest.mark.parametrize("name", SPECS)
def test_packed_documents_refuse_a_cache(name: str) -> None:
    mixer = build_mixer(SPECS[name], 32, config())
    with pytest.raises(ValueError, match="cu_seqlens"):
        mixer(torch.randn(1, 5, 32), use_cache=True, cu_seqlens=torch.tensor([0, 2, 5]))


def test_hgrn_equals_its_per_token_recurrence() -> None:
    """``f = γ + (1 − γ) σ(f̃)``, ``h_t = f_t h_{t−1} + (1 − f_t) SiLU(i_t)``,
    ``y = o_proj(RMSNorm(h) ⊙ swish(g))``."""
    torch.manual_seed(0)
    m = build_mixer({"name": "hgrn", "lower_bound": 0.3}, 16, config(hidden_size=16))
    with torch.no_grad():
        m.lower_bound.logit.normal_()
    x = torch.randn(2, 9, 16)
    gamma = torch.sigmoid(m.lower_bound.logit)
    h, outs = torch.zeros(2, 16), []
    for t in range(9):
        f = gamma + (1 - gamma) * torch.sigmoid(m.f_proj(x[:, t]))
        h = f * h + (1 - f) * F.silu(m.i_proj(x[:, t]))
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.g_norm.eps) * m.g_norm.weight
        outs.append(m.o_proj(normed * F.silu(m.g_proj(x[:, t]))))
    assert rel(m(x)[0], torch.stack(outs, 1)) < 1e-5


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_mamba2_equals_its_per_token_recurrence(norm_before_gate: bool) -> None:
    """SSD per head: ``h_t = exp(Δ_t A) h_{t−1} + Δ_t x_t ⊗ B_t``, ``y_t = h_t C_t + D x_t``, with B, C
    shared by the heads of a group (head h reads group ⌊h / (H/G)⌋), then the grouped gated RMSNorm."""
    torch.manual_seed(0)
    spec = {"name": "mamba2", "head_dim": 4, "state_size": 3, "n_groups": 2}
    m = build_mixer({**spec, "norm_before_gate": norm_before_gate}, 8, config(hidden_size=8))
    with torch.no_grad():
        m.A_log.uniform_(-1, 1)
        m.D.normal_()
        m.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 8)
    H, P, N, G = 4, 4, 3, 2
    z, xbc, dt = m.in_proj(x).split([16, 16 + 2 * G * N, H], -1)
    xbc = F.conv1d(xbc.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=3, groups=xbc.shape[-1])
    xs, B, C = F.silu(xbc[..., :7]).transpose(1, 2).split([16, G * N, G * N], -1)
    dt = F.softplus(dt + m.dt_bias)
    A = -m.A_log.exp()
    h, ys = torch.zeros(2, H, P, N), []
    for t in range(7):
        xt = xs[:, t].view(2, H, P)
        Bt = B[:, t].view(2, G, N).repeat_interleave(H // G, 1)
        Ct = C[:, t].view(2, G, N).repeat_interleave(H // G, 1)
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        h = decay * h + (dt[:, t, :, None] * xt)[..., None] * Bt[:, :, None]
        ys.append((h @ Ct[..., None]).squeeze(-1) + m.D[:, None] * xt)
    y, gate = torch.stack(ys, 1).flatten(-2), F.silu(z)
    y = y if norm_before_gate else y * gate
    g = y.unflatten(-1, (G, -1))
    y = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + m.norm.eps)).flatten(-2) * m.norm.weight
    ref = m.out_proj(y * gate if norm_before_gate else y)
    assert rel(m(x)[0], ref) < 1e-5


def test_hgrn_lower_bound_bounds_the_forget_gate() -> None:
    m = build_mixer({"name": "hgrn", "lower_bound": 0.6}, 16, config(hidden_size=16))
    f = torch.randn(3, 5, 16) * 20
    from memlm.layers.linear_common import log_forget

    forget = log_forget(f, m.lower_bound).exp()
    assert bool((forget >= 0.6 - 1e-6).all()) and bool((forget <= 1).all())
    assert abs(forget.min().item() - 0.6) < 1e-3  # reached for very negative pre-activations


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "gated_deltanet", "num_v_heads": 6}, "num_v_heads / num_heads"),
        ({"name": "gated_deltanet", "output_gate_activation": "relu"}, "output_gate_activation"),
        ({"name": "delta_net", "qk_norm": "l3"}, "qk_norm"),
        ({"name": "gla", "clamp_min": 0.5}, "clamp_min"),
        ({"name": "gla", "num_kv_heads": 3}, "num_heads / num_kv_heads"),
        ({"name": "gla", "feature_map": "tanh"}, "feature_map"),
        ({"name": "retnet", "expand_k": 0.3}, "hidden_size \\* expand_k"),
        ({"name": "hgrn", "lower_bound": 1.0}, "lower_bound"),
        ({"name": "hgrn2", "expand_ratio": 5, "num_heads": None}, "expand_ratio"),
        ({"name": "mamba2", "dt_limit": [1.0, 0.5]}, "dt_limit"),
        ({"name": "mamba2", "head_dim": 8, "num_heads": 3}, "num_heads=3"),
    ],
)
def test_bad_options_are_named(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemLMForCausalLM(config(mixer=spec))


def test_ratio_layer_indices() -> None:
    """``"a:b"``: a linear layers, then b attention layers, repeated — attention *after every a linear
    layers* as the hybrid-linear-attention paper (arXiv 2507.06457) describes. With 24 layers:"""
    ratios = ("3:1", "6:1", "12:1", "24:1")
    attention = {r: [i for i, b in enumerate(ratio_pattern(r, 24)) if b] for r in ratios}
    assert attention == {"3:1": [3, 7, 11, 15, 19, 23], "6:1": [6, 13, 20], "12:1": [12], "24:1": []}
    assert [i for i, b in enumerate(ratio_pattern("24:1", 25)) if b] == [24]


@pytest.mark.parametrize("ratio", ["3:1", "6:1", "12:1", "24:1", None])
def test_hybrid_ratio_builds_trains_and_generates(ratio: str | None) -> None:
    """GDN:attention hybrids with enough layers for one attention block; ``None`` is pure GDN."""
    torch.manual_seed(0)
    linear = int(ratio.split(":")[0]) if ratio else 3
    cfg = config(hidden_size=16, num_hidden_layers=linear + 1, num_heads=2, ratio=ratio,
                 mixer={"name": "gated_deltanet", "head_dim": 8, "expand_v": 1.0},
                 ratio_mixer={"name": "attention", "window_size": 4})
    kinds = [s["name"] for s in cfg.layer_specs()]
    assert kinds == ["gated_deltanet"] * linear + ["attention" if ratio else "gated_deltanet"]
    model = MemLMForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 12))
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    prompt = ids[:, :3]
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


PRESETS = [n for n in preset_names() if "gated_deltanet" in n or "hgrn2" in n]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build(preset: str) -> None:
    """Every GDN / HGRN2 preset (pure or hybrid) is a valid MemLMConfig; the CPU-sized ones run a forward pass."""
    cfg = load_preset(preset, vocab_size=256)
    kinds = {s["name"] for s in cfg.layer_specs()}
    assert "gated_deltanet" in kinds or "hgrn2" in kinds
    if preset.endswith("_tiny"):
        logits = MemLMForCausalLM(cfg)(torch.randint(0, 256, (1, 9))).logits
        assert logits.shape == (1, 9, 256) and bool(torch.isfinite(logits).all())
