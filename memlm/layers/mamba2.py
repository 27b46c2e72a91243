"""Mamba2 (SSD; Dao & Gu 2024, arXiv 2405.21060), fla ``Mamba2`` layout.

``in_proj(x) = [z, xBC, dt]``; a depthwise causal conv + SiLU over ``xBC`` gives ``x, B, C``
(B and C shared by the heads of a group). Per head h with scalar ``A_h = −exp(A_log_h)``:

    Δ_t = softplus(dt_t + dt_bias)  (clamped to ``dt_limit``)
    h_t = exp(Δ_t A) h_{t−1} + Δ_t B_tᵀ x_t,   y_t = C_t h_t + D ⊙ x_t                 (eq. 1, SSD)
    out = out_proj(GroupRMSNorm(y ⊙ SiLU(z)))          (``norm_before_gate``: RMSNorm(y) ⊙ SiLU(z))

i.e. the linear memory with ``q = C``, ``k = B``, ``v = Δ x``, ``g = Δ A`` and scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.layers.conv import ShortConvolution
from memlm.layers.linear_common import (
    LinearMixer,
    MixerCall,
    check_choice,
    check_positive,
    divide,
    heads,
    init_decay_rates,
    integral,
    repeat_heads,
)
from memlm.layers.registry import register_mixer


class GroupGatedRMSNorm(nn.Module):
    """Mamba2's gated RMSNorm over ``groups`` equal slices of the channels:
    ``RMSNorm(y ⊙ SiLU(z)) ⊙ w``, or ``RMSNorm(y) ⊙ w ⊙ SiLU(z)`` when ``norm_before_gate``."""

    def __init__(self, width: int, groups: int, eps: float, norm_before_gate: bool) -> None:
        super().__init__()
        self.groups, self.eps, self.norm_before_gate = groups, eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gate = F.silu(z.float())
        x = y.float() if self.norm_before_gate else y.float() * gate
        x = x.unflatten(-1, (self.groups, -1))
        x = (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight.float()
        return (x * gate if self.norm_before_gate else x).to(y.dtype)


@register_mixer("mamba2")
class Mamba2(LinearMixer):
    @dataclass
    class Options:
        num_heads: int | None = None  # default: expand · hidden_size // head_dim
        head_dim: int | None = None  # default: expand · hidden_size // config.num_heads
        state_size: int = 128  # N, the width of B and C
        expand: int = 2
        n_groups: int = 1
        conv_kernel: int = 4
        use_conv_bias: bool = True
        hidden_act: str = "silu"
        D_has_hdim: bool = False  # D per channel instead of per head
        rmsnorm: bool = True  # gated group RMSNorm (else y ⊙ SiLU(z))
        norm_before_gate: bool = False
        dt_limit: list | None = None  # [low, high] clamp of Δ; null: none
        use_bias: bool = False  # bias of in_proj / out_proj
        norm_eps: float | None = None  # default: config.norm_eps

        def validate(self) -> None:
            check_positive(num_heads=self.num_heads, head_dim=self.head_dim, state_size=self.state_size,
                           expand=self.expand, n_groups=self.n_groups, conv_kernel=self.conv_kernel,
                           norm_eps=self.norm_eps)
            check_choice("hidden_act", self.hidden_act, ("silu", "swish"))
            limit = self.dt_limit
            if limit is not None and (len(limit) != 2 or not limit[0] <= limit[1]):
                raise ValueError(f"dt_limit must be [low, high] with low <= high, or null; got {limit}")

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__()
        self.intermediate_size = integral("mamba2: expand * hidden_size", opts.expand * hidden_size)
        if opts.head_dim is None:
            self.num_heads = opts.num_heads or config.num_heads
            self.head_dim = divide("mamba2: expand * hidden_size / num_heads", self.intermediate_size,
                                   self.num_heads)
        else:
            self.head_dim = opts.head_dim
            self.num_heads = divide("mamba2: expand * hidden_size / head_dim", self.intermediate_size,
                                    opts.head_dim)
            if opts.num_heads not in (None, self.num_heads):
                raise ValueError(f"mamba2: num_heads={opts.num_heads} but expand * hidden_size / head_dim = "
                                 f"{self.num_heads}")
        self.n_groups, self.ssm_state_size = opts.n_groups, opts.state_size
        self.heads_per_group = divide("mamba2: num_heads / n_groups", self.num_heads, opts.n_groups)
        self.dt_limit = None if opts.dt_limit is None else (float(opts.dt_limit[0]), float(opts.dt_limit[1]))
        self.memory_numel = self.num_heads * self.ssm_state_size * self.head_dim
        self.conv_dim = self.intermediate_size + 2 * opts.n_groups * opts.state_size

        self.in_proj = nn.Linear(hidden_size, self.intermediate_size + self.conv_dim + self.num_heads,
                                 bias=opts.use_bias)
        self.conv1d = ShortConvolution(self.conv_dim, opts.conv_kernel, bias=opts.use_conv_bias,
                                       activation="silu")
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.intermediate_size if opts.D_has_hdim else self.num_heads))
        self.norm = GroupGatedRMSNorm(self.intermediate_size, opts.n_groups, opts.norm_eps or config.norm_eps,
                                      opts.norm_before_gate) if opts.rmsnorm else None
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=opts.use_bias)

    def init_weights(self, init: Any, std: float) -> None:
        """``A ~ U(1, 16)``, the Mamba2 ``dt`` init and ``D = 1`` (as fla's Mamba2)."""
        init_decay_rates(init, self.A_log, self.dt_bias, 1.0, 16.0)
        init.ones_(self.D)

    def step_sizes(self, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Δ_t = softplus(dt + dt_bias)`` (clamped to ``dt_limit``) and the log decay ``g_t = −exp(A_log) Δ_t``
        from the ``dt`` slice of ``in_proj``, float32 ``[B, T, H]``."""
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_limit is not None:
            dt = dt.clamp(*self.dt_limit)
        return dt, -self.A_log.float().exp() * dt

    def mix(self, x: torch.Tensor, call: MixerCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        z, xbc, dt = self.in_proj(x).split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        width = self.n_groups * self.ssm_state_size
        xs, B, C = call.conv("xBC", self.conv1d, xbc).split([self.intermediate_size, width, width], dim=-1)
        dt, g = self.step_sizes(dt)
        xs = heads(xs, self.head_dim)
        B, C = (repeat_heads(heads(t, self.ssm_state_size), self.heads_per_group) for t in (B, C))
        y, memory = call.linear_memory(C, B, xs * dt[..., None].to(xs.dtype), g=g, scale=1.0)
        D = self.D.view(self.num_heads, -1) if self.D.numel() == self.intermediate_size else self.D[:, None]
        y = (y + xs * D.to(xs.dtype)).flatten(-2)
        y = y * F.silu(z) if self.norm is None else self.norm(y, z)
        return self.out_proj(y), memory
