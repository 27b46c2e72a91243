"""Tiny flash-linear-attention 0.6 models, one per checkpoint family memlm converts: the cases of
tests/test_convert.py (loading and equivalence) and of the generation contract on converted models
(tests/test_generation.py). Building and saving them needs no Triton kernel; running fla's own
forward on CPU needs ``TRITON_INTERPRET=1`` (``memlm.testing.triton_interpreter``).

fla's attention layer calls the ``flash_attn`` package, which has no CPU build: on CPU
``sdpa_flash_attn`` stands in for ``flash_attn_func`` (same masking: causal aligned bottom-right,
window ``(w−1, 0)``).

fla's MoM groups token copies by (sequence, memory) with an unstable ``argsort``: on CPU a memory's
tokens may leave time order (docs/design.md §4.3). ``fla_model`` runs fla's routing sort stable
(``stable_mom_routing``), which is fla's intended order and memlm's; nothing else in fla changes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

VOCAB = 64

FLA_COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "hidden_ratio": 2,
              "fuse_norm": False, "fuse_swiglu": False, "fuse_cross_entropy": False}
GDN = {"model_type": "gated_deltanet", "num_heads": 2, "head_dim": 16, "expand_v": 1.0}
MOM = {"model_type": "mom", "num_heads": 2, "head_dim": 16, "num_memories": 4, "topk": 2, "shared_mem": True}
CASES: dict[str, dict] = {
    "gated_deltanet": GDN,
    "gated_deltanet-gva": {**GDN, "num_v_heads": 4, "expand_v": 0.5, "allow_neg_eigval": True,
                           "use_gate": False},
    "delta_net": {"model_type": "delta_net", "num_heads": 2},
    "delta_net-gate-sum-relu": {"model_type": "delta_net", "num_heads": 2, "use_gate": True, "qk_norm": "sum",
                                "qk_activation": "relu"},
    "gla-fused-names": {"model_type": "gla", "num_heads": 2, "fuse_norm": True},
    "gla-gqa-conv": {"model_type": "gla", "num_heads": 2, "num_kv_heads": 1, "use_short_conv": True},
    "retnet-gqa": {"model_type": "retnet", "num_heads": 2, "num_kv_heads": 1},
    "hgrn": {"model_type": "hgrn", "use_short_conv": True, "num_hidden_layers": 3},
    "hgrn2": {"model_type": "hgrn2", "expand_ratio": 16, "num_hidden_layers": 3},
    "mamba2": {"model_type": "mamba2", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
               "head_dim": 16, "state_size": 8},
    "transformer": {"model_type": "transformer", "num_heads": 4, "num_kv_heads": 2, "qk_norm": True,
                    "qkv_bias": True, "window_size": 5},
    "hybrid-gdn-swa": {**GDN, "num_hidden_layers": 3,
                       "attn": {"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": 4}},
    "hybrid-hgrn2-list": {"model_type": "hgrn2", "expand_ratio": 16, "num_hidden_layers": 3,
                          "attn": [{"layers": [0], "num_heads": 2},
                                   {"layers": [2], "num_heads": 4, "qkv_bias": True, "rope_theta": 500.0}]},
    "mom": MOM,
    "mom-noshared-expand_v2-top1": {**MOM, "shared_mem": False, "expand_v": 2.0, "topk": 1},
    "mom-single_kv": {**MOM, "single_kv_proj": True, "use_output_gate": False},
}


def sdpa_flash_attn(q, k, v, causal=True, window_size=(-1, -1), **_):
    """``flash_attn_func`` semantics with SDPA: q ``[B, Tq, H, D]``, k/v ``[B, Tk, Hkv, D]``, causal mask
    aligned to the last query (decoding), keys within ``window_size[0]`` positions back."""
    Tq, Tk = q.shape[1], k.shape[1]
    qi = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    kj = torch.arange(Tk, device=q.device)[None, :]
    mask = kj <= qi
    if window_size[0] >= 0:
        mask &= (qi - kj) <= window_size[0]
    k, v = (t.repeat_interleave(q.shape[2] // t.shape[2], 2).transpose(1, 2) for t in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask).transpose(1, 2)


def _stable_argsort(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every ``Tensor.argsort`` it calls made stable (ties keep their index order)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        unstable = torch.Tensor.argsort
        torch.Tensor.argsort = lambda t, dim=-1, descending=False, **_: unstable(t, dim=dim, descending=descending,
                                                                                   stable=True)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.argsort = unstable

    wrapper.stable_argsort = True
    return wrapper


def stable_mom_routing() -> None:
    """Make fla's MoM routing sort (``fla.layers.mom.transform``) stable, so that each memory sees its
    tokens in time order as fla intends (docs/design.md §4.3); idempotent."""
    import fla.layers.mom

    if not getattr(fla.layers.mom.transform, "stable_argsort", False):
        fla.layers.mom.transform = _stable_argsort(fla.layers.mom.transform)


def fla_model(case: str, device: str = "cpu") -> torch.nn.Module:
    """fla's own model of ``case``, with every weight drawn so that no path is trivially zero."""
    import fla.layers.attn
    from transformers import AutoConfig, AutoModelForCausalLM

    if fla.layers.attn.flash_attn_func is None or device == "cpu":
        fla.layers.attn.flash_attn_func = sdpa_flash_attn
    stable_mom_routing()
    kwargs = dict(CASES[case])
    model_type = kwargs.pop("model_type")
    common = {} if model_type == "mamba2" else FLA_COMMON
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**common, **kwargs}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                continue
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            elif name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:  # biases, D, lower_bounds
                p.normal_(0.0, 0.5)
    return model.to(device).eval()
