"""HGRN2 (Qin et al. 2024, arXiv 2404.07904), fla ``HGRN2Attention`` layout.

State expansion by an outer product: the forget gate doubles as the decay and (one minus it)
as the key, per head of width ``expand_ratio``:

    f_t = γ + (1 − γ) σ(f_proj(x_t)),   q_t = SiLU(q_proj(x_t)),   k_t = 1 − f_t,   v_t = i_proj(x_t)
    S_t = diag(f_t) S_{t−1} + k_tᵀ v_t,   o_t = q_t S_t / √d,   y_t = o_proj(RMSNorm(o_t))      (eq. 7)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.layers.linear_common import (
    GateRecurrenceOptions,
    LinearMixer,
    LowerBound,
    MixerCall,
    check_positive,
    divide,
    heads,
    log_forget,
    make_convs,
)
from memlm.layers.registry import register_mixer


@register_mixer("hgrn2")
class HGRN2(LinearMixer):
    @dataclass
    class Options(GateRecurrenceOptions):
        num_heads: int | None = None  # default: hidden_size // expand_ratio, or config.num_heads
        expand_ratio: int | None = None  # head width of q / f; default hidden_size // num_heads

        def validate(self) -> None:
            super().validate()
            check_positive(num_heads=self.num_heads, expand_ratio=self.expand_ratio)

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__()
        if opts.expand_ratio is not None and opts.num_heads is None:
            self.num_heads = divide("hgrn2: hidden_size / expand_ratio", hidden_size, opts.expand_ratio)
        else:
            self.num_heads = opts.num_heads or config.num_heads
        self.head_i_dim = divide("hgrn2: hidden_size / num_heads", hidden_size, self.num_heads)
        self.head_f_dim = opts.expand_ratio or self.head_i_dim
        forget_dim = self.num_heads * self.head_f_dim
        self.memory_numel = forget_dim * self.head_i_dim

        self.q_proj = nn.Linear(hidden_size, forget_dim, bias=False)
        self.f_proj = nn.Linear(hidden_size, forget_dim, bias=False)
        self.i_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        make_convs(self, {"q": forget_dim, "f": forget_dim, "i": hidden_size}, opts.use_short_conv,
                   opts.conv_size, opts.conv_bias, {"q": None, "f": None, "i": None})
        self.lower_bound = None if opts.lower_bound is None else LowerBound(forget_dim, opts.lower_bound)
        self.g_norm = nn.RMSNorm(hidden_size, eps=opts.norm_eps or config.norm_eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def mix(self, x: torch.Tensor, call: MixerCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = F.silu(call.conv("q", self.q_conv1d, self.q_proj(x)))
        log_f = log_forget(call.conv("f", self.f_conv1d, self.f_proj(x)), self.lower_bound)
        v = call.conv("i", self.i_conv1d, self.i_proj(x))
        q, k, gk = (heads(t, self.head_f_dim) for t in (q, (1.0 - log_f.exp()).to(v.dtype), log_f))
        o, memory = call.linear_memory(q, k, heads(v, self.head_i_dim), gk=gk)
        return self.o_proj(self.g_norm(o.flatten(-2))), memory
