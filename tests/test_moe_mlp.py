"""The mixture-of-experts MLP (``memlm.layers.moe``) against a dense per-token reference, its load-balancing
loss, and its options. (Causality, decoding, generate, padding and save/load: the ``moe-mlp`` and
``deepseek-moe-mlp`` cases of the model contract.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memlm.layers import aux_loss
from memlm.layers.moe import MoEMLP, moe_options
from memlm.models import MemLMConfig, MemLMForCausalLM


def reference(moe: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, one token at a time, weighted by the eq. 9–11 gates."""
    out = []
    for u in x.reshape(-1, x.shape[-1]):
        s = (moe.router.weight @ u).softmax(-1)
        top = s.topk(moe.opts.topk).indices
        g = torch.zeros_like(s)
        g[top] = s[top]
        if moe.opts.norm_topk_prob:
            g = g / g.sum()
        h = sum(g[e] * (moe.down_proj[e] @ (F.silu(moe.gate_proj[e] @ u) * (moe.up_proj[e] @ u)))
                for e in range(moe.opts.num_experts))
        if moe.shared is not None:
            h = h + moe.shared(u[None])[0]
        out.append(h)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("spec", [{"num_experts": 4, "topk": 1},
                                  {"num_experts": 6, "topk": 2},
                                  {"num_experts": 8, "topk": 3, "num_shared": 2, "expert_size": 8,
                                   "norm_topk_prob": False}], ids=["switch", "top2", "deepseek"])
def test_moe_equals_the_dense_per_token_reference(spec: dict) -> None:
    torch.manual_seed(0)
    moe = MoEMLP(16, 24, moe_options({"name": "moe", **spec})).double()
    for w in (moe.gate_proj, moe.up_proj, moe.down_proj):
        torch.nn.init.normal_(w, std=0.3)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), reference(moe, x), rtol=1e-12, atol=1e-12)
    assert moe.gate_proj.shape == (spec["num_experts"], spec.get("expert_size", 24), 16)


def test_load_balance_is_switch_over_all_layers_and_enters_the_objective() -> None:
    """``aux_losses["moe_load_balance"]`` is ``E Σ f_e P_e`` over both layers' router logits together;
    ``aux_loss`` scales it; a uniform router gives its minimum ``k`` (each token's k choices counted)."""
    torch.manual_seed(0)
    config = MemLMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_heads=2,
                         mlp={"name": "moe", "num_experts": 4, "topk": 2, "aux_loss_scale": 0.1})
    model = MemLMForCausalLM(config)
    ids = torch.randint(0, 50, (2, 9))
    logits = []
    hooks = [layer.mlp.router.register_forward_hook(lambda m, i, o: logits.append(o)) for layer in model.model.layers]
    out = model(ids, labels=ids)
    for h in hooks:
        h.remove()
    z = torch.cat(logits).float()
    p = z.softmax(-1)
    f = torch.zeros_like(p).scatter_(-1, p.topk(2, dim=-1).indices, 1.0).mean(0)
    expected = 4 * (f * p.mean(0)).sum()
    torch.testing.assert_close(out.aux_losses["moe_load_balance"], expected)
    torch.testing.assert_close(out.aux_loss, 0.1 * expected)
    (out.loss + out.aux_loss).backward()
    assert all(layer.mlp.router.weight.grad.abs().sum() > 0 for layer in model.model.layers)
    with aux_loss.collect() as terms:
        uniform = aux_loss.LoadBalance("x", 1.0, logits=torch.zeros(12, 4), topk=2)
        terms.append(uniform)
    assert aux_loss.combine(terms)[1]["x"].item() == pytest.approx(2.0)


@pytest.mark.parametrize(("spec", "message"), [
    ({"name": "dense"}, "mlp.name='dense' is not allowed; choose 'moe'"),
    ({"name": "moe", "topk": 9}, "mlp.topk=9 must be <= mlp.num_experts=8"),
    ({"name": "moe", "experts": 4}, r"mlp has no option\(s\) \['experts'\]; allowed options"),
    ({"name": "moe", "num_shared": -1}, "mlp.num_shared must be >= 0"),
])
def test_bad_mlp_specs_are_named(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemLMConfig(mlp=spec)
    with pytest.raises(ValueError, match=r"^model\.mlp"):
        MemLMConfig.check_fields({"mlp": spec}, prefix="model.")
