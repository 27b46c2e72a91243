"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, arXiv 2412.06464), fla ``GatedDeltaNet`` layout.

Per head, with ℓ2-normalised ``q_t, k_t`` (short conv + SiLU), ``v_t`` (short conv + SiLU):

    α_t = exp(g_t),  g_t = −exp(A_log) · softplus(a_proj(x_t) + dt_bias)      (Mamba2-style decay)
    β_t = σ(b_proj(x_t))                                  (×2 with ``allow_neg_eigval``)
    S_t = α_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t,   o_t = q_t S_t / √d_k      (eq. 10)
    y_t = o_proj(RMSNorm(o_t) ⊙ swish(g_proj(x_t)))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.layers.linear_common import (
    LinearMixer,
    MixerCall,
    check_choice,
    check_positive,
    divide,
    heads,
    init_decay_rates,
    integral,
    l2norm,
    make_convs,
    normed_output,
    repeat_heads,
)
from memlm.layers.norm import GatedRMSNorm
from memlm.layers.registry import register_mixer


@register_mixer("gated_deltanet")
class GatedDeltaNet(LinearMixer):
    @dataclass
    class Options:
        num_heads: int | None = None  # default: config.num_heads
        head_dim: int | None = None  # key head size; default hidden_size // num_heads
        expand_v: float = 2.0  # value head size = head_dim · expand_v
        num_v_heads: int | None = None  # grouped value heads (GVA); default num_heads
        use_gate: bool = True  # gated output norm with g_proj
        use_short_conv: bool = True
        conv_size: int = 4
        conv_bias: bool = False
        allow_neg_eigval: bool = False  # β ∈ (0, 2)
        norm_eps: float | None = None  # default: config.norm_eps
        output_gate_activation: str = "swish"

        def validate(self) -> None:
            check_positive(num_heads=self.num_heads, head_dim=self.head_dim, expand_v=self.expand_v,
                           num_v_heads=self.num_v_heads, conv_size=self.conv_size, norm_eps=self.norm_eps)
            check_choice("output_gate_activation", self.output_gate_activation, ("swish", "silu", "sigmoid"))

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__()
        self.num_heads = opts.num_heads or config.num_heads
        self.head_k_dim = opts.head_dim or divide("gated_deltanet: hidden_size / num_heads", hidden_size,
                                                  self.num_heads)
        self.head_v_dim = integral("gated_deltanet: head_dim * expand_v", self.head_k_dim * opts.expand_v)
        self.num_v_heads = opts.num_v_heads or self.num_heads
        self.groups = divide("gated_deltanet: num_v_heads / num_heads", self.num_v_heads, self.num_heads)
        self.allow_neg_eigval = opts.allow_neg_eigval
        key_dim, value_dim = self.num_heads * self.head_k_dim, self.num_v_heads * self.head_v_dim
        self.memory_numel = self.num_v_heads * self.head_k_dim * self.head_v_dim

        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.num_v_heads))
        make_convs(self, {"q": key_dim, "k": key_dim, "v": value_dim}, opts.use_short_conv, opts.conv_size,
                   opts.conv_bias, {"q": "silu", "k": "silu", "v": "silu"})
        eps = opts.norm_eps or config.norm_eps
        if opts.use_gate:
            self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=eps, activation=opts.output_gate_activation)
        else:
            self.g_proj = None
            self.o_norm = nn.RMSNorm(self.head_v_dim, eps=eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def init_weights(self, init: Any, std: float) -> None:
        """Decay rates ``A ~ U(0, 16)`` and the Mamba2 ``dt`` init (as fla's GDN)."""
        init_decay_rates(init, self.A_log, self.dt_bias, 0.0, 16.0)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``g_t = −exp(A_log)·softplus(x W_a + dt_bias)`` (log decay) and ``β_t = σ(x W_β)`` (×2 with negative
        eigenvalues), float32 ``[B, T, H]``."""
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        return g, torch.sigmoid(self.b_proj(x).float()) * (2.0 if self.allow_neg_eigval else 1.0)

    def mix(self, x: torch.Tensor, call: MixerCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = call.conv("q", self.q_conv1d, self.q_proj(x), F.silu)
        k = call.conv("k", self.k_conv1d, self.k_proj(x), F.silu)
        v = call.conv("v", self.v_conv1d, self.v_proj(x), F.silu)
        q, k = (repeat_heads(l2norm(heads(t, self.head_k_dim)), self.groups) for t in (q, k))
        g, beta = self.gates(x)
        o, memory = call.linear_memory(q, k, heads(v, self.head_v_dim), g=g, beta=beta)
        gate = None if self.g_proj is None else heads(self.g_proj(x), self.head_v_dim)
        o = normed_output(self.o_norm, o, gate).flatten(-2)
        return self.o_proj(o), memory
