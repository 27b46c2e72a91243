"""DeltaNet (Schlag et al. 2021; Yang et al. 2024, arXiv 2406.06484), fla ``DeltaNet`` layout.

Per head, with feature-mapped and normalised ``q_t, k_t`` (short conv, ``qk_activation``,
``qk_norm`` ∈ {ℓ2, sum}) and ``v_t`` (short conv + SiLU):

    β_t = σ(b_proj(x_t))  (1 without ``use_beta``; ×2 with ``allow_neg_eigval``)
    S_t = S_{t−1} + β_t k_tᵀ (v_t − k_t S_{t−1}),   o_t = q_t S_t / √d_k          (delta rule, eq. 1)
    y_t = o_proj(RMSNorm(o_t) [⊙ swish(g_proj(x_t))])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.layers.linear_common import (
    ACTIVATIONS,
    LinearMixer,
    MixerCall,
    check_choice,
    check_positive,
    divide,
    heads,
    integral,
    l2norm,
    make_convs,
    normed_output,
)
from memlm.layers.norm import GatedRMSNorm
from memlm.layers.registry import register_mixer


def sum_norm(x: torch.Tensor) -> torch.Tensor:
    """``x / max(‖x‖₁, 1e-6)`` over the last dim (DeltaNet's ``qk_norm='sum'``)."""
    return F.normalize(x, p=1, dim=-1, eps=1e-6)


@register_mixer("delta_net")
class DeltaNet(LinearMixer):
    @dataclass
    class Options:
        num_heads: int | None = None  # default: config.num_heads
        expand_k: float = 1.0  # key width = hidden_size · expand_k
        expand_v: float = 1.0
        use_beta: bool = True
        use_gate: bool = False
        use_short_conv: bool = True
        conv_size: int = 4
        conv_bias: bool = False
        allow_neg_eigval: bool = False
        qk_activation: str = "silu"  # silu | relu | elu (elu + 1) | identity
        qk_norm: str = "l2"  # l2 | sum
        norm_eps: float | None = None  # default: config.norm_eps

        def validate(self) -> None:
            check_positive(num_heads=self.num_heads, expand_k=self.expand_k, expand_v=self.expand_v,
                           conv_size=self.conv_size, norm_eps=self.norm_eps)
            check_choice("qk_activation", self.qk_activation, ("silu", "relu", "elu", "identity"))
            check_choice("qk_norm", self.qk_norm, ("l2", "sum"))

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__()
        self.num_heads = opts.num_heads or config.num_heads
        key_dim = integral("delta_net: hidden_size * expand_k", hidden_size * opts.expand_k)
        value_dim = integral("delta_net: hidden_size * expand_v", hidden_size * opts.expand_v)
        self.head_k_dim = divide("delta_net: key dim / num_heads", key_dim, self.num_heads)
        self.head_v_dim = divide("delta_net: value dim / num_heads", value_dim, self.num_heads)
        self.qk_activation, self.qk_norm = opts.qk_activation, opts.qk_norm
        self.allow_neg_eigval = opts.allow_neg_eigval
        self.memory_numel = self.num_heads * self.head_k_dim * self.head_v_dim

        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.b_proj = nn.Linear(hidden_size, self.num_heads, bias=False) if opts.use_beta else None
        qk_conv_act = "silu" if opts.qk_activation == "silu" else None
        make_convs(self, {"q": key_dim, "k": key_dim, "v": value_dim}, opts.use_short_conv, opts.conv_size,
                   opts.conv_bias, {"q": qk_conv_act, "k": qk_conv_act, "v": "silu"})
        eps = opts.norm_eps or config.norm_eps
        if opts.use_gate:
            self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=eps)
        else:
            self.g_proj = None
            self.o_norm = nn.RMSNorm(self.head_v_dim, eps=eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def _feature(self, t: torch.Tensor) -> torch.Tensor:
        """``qk_activation`` (SiLU is already fused into the convolution) then ``qk_norm``."""
        t = heads(t, self.head_k_dim)
        if self.qk_activation != "silu":
            t = ACTIVATIONS[self.qk_activation](t)
        return l2norm(t) if self.qk_norm == "l2" else sum_norm(t)

    def beta(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The write strength ``β_t = σ(x W_β)`` (1 without ``b_proj``; ×2 with negative eigenvalues), float32
        ``[B, T, H]`` (``q``: the heads' layout)."""
        if self.b_proj is None:
            beta = q.new_ones(q.shape[:3], dtype=torch.float32)
        else:
            beta = torch.sigmoid(self.b_proj(x).float())
        return beta * (2.0 if self.allow_neg_eigval else 1.0)

    def mix(self, x: torch.Tensor, call: MixerCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        qk_fallback = F.silu if self.qk_activation == "silu" else ACTIVATIONS["identity"]
        q = self._feature(call.conv("q", self.q_conv1d, self.q_proj(x), qk_fallback))
        k = self._feature(call.conv("k", self.k_conv1d, self.k_proj(x), qk_fallback))
        v = heads(call.conv("v", self.v_conv1d, self.v_proj(x), F.silu), self.head_v_dim)
        o, memory = call.linear_memory(q, k, v, beta=self.beta(x, q))
        gate = None if self.g_proj is None else heads(self.g_proj(x), self.head_v_dim)
        o = normed_output(self.o_norm, o, gate).flatten(-2)
        return self.o_proj(o), memory
