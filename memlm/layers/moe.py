"""Mixture-of-experts feed-forward: the block's MLP as top-k routed SwiGLU experts, plus shared experts.

Plain top-k MoE (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral's renormalised top-k gates) and
DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066, eqs. 9–11): many fine-grained experts (``expert_size`` a
fraction of the dense MLP) and ``num_shared`` always-on experts,

    h_t = Σ_{i ≤ K_s} FFN_i(u_t) + Σ_{i > K_s} g_{i,t} FFN_i(u_t),   s_t = softmax(u_t E),
    g_{i,t} = s_{i,t} if i is among the top ``topk`` of s_t else 0   (``norm_topk_prob``: g / Σ_top g).

The ``num_shared`` shared experts of width ``expert_size`` are one SwiGLU of width ``num_shared · expert_size``
(the same function). Every routed token is computed (no capacity, no dropping), so a token's output depends
on it alone: causal, batch-independent, decodable. Load balance: Switch's ``E · Σ_e f_e P_e`` over all MoE
layers' router logits (``aux_loss.LoadBalance``, ``f_e`` counting every top-k choice) × ``aux_loss_scale``;
DeepSeekMoE's expert-level loss ``α₁ Σ f'_i P_i`` with ``f'_i = N'/(K'T)·count_i`` is the same quantity / K'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.layers.aux_loss import LoadBalance, report
from memlm.layers.mlp import GatedMLP


@dataclass
class MoEOptions:
    """``mlp: {name: moe, ...}`` of a model config (``expert_size`` null: the dense MLP's width)."""

    name: str = "moe"
    num_experts: int = 8
    topk: int = 2
    num_shared: int = 0
    expert_size: int | None = None
    norm_topk_prob: bool = True
    aux_loss_scale: float = 0.01

    def validate(self) -> None:
        if self.name != "moe":
            raise ValueError(f"mlp.name={self.name!r} is not allowed; choose 'moe' (or leave mlp null: dense SwiGLU)")
        for key in ("num_experts", "topk"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"mlp.{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.topk > self.num_experts:
            raise ValueError(f"mlp.topk={self.topk} must be <= mlp.num_experts={self.num_experts}")
        if self.num_shared < 0:
            raise ValueError(f"mlp.num_shared must be >= 0, got {self.num_shared}")
        if self.expert_size is not None and self.expert_size < 1:
            raise ValueError(f"mlp.expert_size must be a positive integer or null, got {self.expert_size}")
        if self.aux_loss_scale < 0:
            raise ValueError(f"mlp.aux_loss_scale must be >= 0, got {self.aux_loss_scale}")


def moe_options(spec: dict[str, Any]) -> MoEOptions:
    """The checked options of an ``mlp`` spec; a ``ValueError`` names the bad key and the allowed ones."""
    allowed = list(MoEOptions.__dataclass_fields__)
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ValueError(f"mlp has no option(s) {unknown}; allowed options: {allowed}")
    opts = MoEOptions(**spec)
    opts.validate()
    return opts


class MoEMLP(nn.Module):
    """Routed SwiGLU experts ``experts.{gate,up,down}_proj`` ``[E, ...]`` and a ``shared`` SwiGLU (module docstring)."""

    def __init__(self, hidden_size: int, intermediate_size: int, opts: MoEOptions) -> None:
        super().__init__()
        self.opts = opts
        width = opts.expert_size or intermediate_size
        self.router = nn.Linear(hidden_size, opts.num_experts, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(opts.num_experts, width, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(opts.num_experts, width, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(opts.num_experts, hidden_size, width))
        self.shared = GatedMLP(hidden_size, opts.num_shared * width) if opts.num_shared else None

    def init_weights(self, init: Any, std: float) -> None:
        for weight in (self.gate_proj, self.up_proj, self.down_proj):
            init.normal_(weight, mean=0.0, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.router(tokens)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
        gates, chosen = probs.topk(self.opts.topk, dim=-1)
        if self.opts.norm_topk_prob:
            gates = gates / gates.sum(-1, keepdim=True)
        report(LoadBalance("moe_load_balance", self.opts.aux_loss_scale, logits=logits, topk=self.opts.topk))
        out = torch.zeros_like(tokens)
        for e in range(self.opts.num_experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            h = tokens[rows]
            y = F.linear(F.silu(F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e]), self.down_proj[e])
            out.index_add_(0, rows, y * gates[rows, slot, None].to(y.dtype))
        if self.shared is not None:
            out = out + self.shared(tokens)
        return out.view_as(x)


def build_mlp(hidden_size: int, intermediate_size: int, spec: dict[str, Any] | None) -> nn.Module:
    """The block's feed-forward: dense SwiGLU, or :class:`MoEMLP` for ``{name: moe, ...}``."""
    if spec is None:
        return GatedMLP(hidden_size, intermediate_size)
    return MoEMLP(hidden_size, intermediate_size, moe_options(spec))
