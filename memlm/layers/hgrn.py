"""HGRN (Qin, Yang, Zhong 2023, arXiv 2311.04823), fla ``HGRNAttention`` layout.

An element-wise gated linear recurrence with a per-layer lower bound γ on the forget gate:

    f_t = γ + (1 − γ) σ(f_proj(x_t))                                     (eq. 5)
    h_t = f_t ⊙ h_{t−1} + (1 − f_t) ⊙ SiLU(i_proj(x_t))                  (eq. 3)
    y_t = o_proj(RMSNorm(h_t) ⊙ swish(g_proj(x_t)))

fla derives γ of layer l from a model-level softmax over layers (γ_0 = 0); memlm keeps it per
layer as a learned ``lower_bound.logit`` (γ = σ(logit)), which the converter fills from fla's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.kernels import linear_scan
from memlm.layers.linear_common import (
    GateRecurrenceOptions,
    LinearMixer,
    LowerBound,
    MixerCall,
    check_positive,
    integral,
    log_forget,
    make_convs,
)
from memlm.layers.norm import GatedRMSNorm
from memlm.layers.packing import document_positions
from memlm.layers.registry import register_mixer


@register_mixer("hgrn")
class HGRN(LinearMixer):
    @dataclass
    class Options(GateRecurrenceOptions):
        expand_ratio: float = 1.0  # recurrence width = hidden_size · expand_ratio

        def validate(self) -> None:
            super().validate()
            check_positive(expand_ratio=self.expand_ratio)

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__()
        width = integral("hgrn: hidden_size * expand_ratio", hidden_size * opts.expand_ratio)
        self.memory_numel = width
        self.i_proj = nn.Linear(hidden_size, width, bias=False)
        self.f_proj = nn.Linear(hidden_size, width, bias=False)
        self.g_proj = nn.Linear(hidden_size, width, bias=False)
        make_convs(self, {"f": width, "i": width}, opts.use_short_conv, opts.conv_size, opts.conv_bias,
                   {"f": None, "i": None})
        self.lower_bound = None if opts.lower_bound is None else LowerBound(width, opts.lower_bound)
        self.g_norm = GatedRMSNorm(width, eps=opts.norm_eps or config.norm_eps)
        self.o_proj = nn.Linear(width, hidden_size, bias=False)

    def mix(self, x: torch.Tensor, call: MixerCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        i = call.conv("i", self.i_conv1d, self.i_proj(x))
        log_f = log_forget(call.conv("f", self.f_conv1d, self.f_proj(x)), self.lower_bound)
        forget = log_f.exp()
        i = F.silu(i.float()) * (1.0 - forget)
        if call.cu_seqlens is not None:  # h restarts at 0 at every document start: f = 0 there
            starts = document_positions(x.shape[1], call.cu_seqlens, 0, x.device) == 0
            forget = forget.masked_fill(starts[None, :, None], 0.0)
        h = linear_scan(forget, i, initial=call.memory)
        y = self.g_norm(h.to(x.dtype), self.g_proj(x))
        return self.o_proj(y), h[:, -1]
