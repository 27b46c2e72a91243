"""Depthwise causal short convolution (H3 / Mamba / fla ``ShortConvolution``), with decoding state.

``y_t = act(Σ_{j<K} w[K−1−j] · x_{t−j})`` per channel; the parameter is an ``nn.Conv1d`` weight
``[D, 1, K]`` (names and shapes as fla's, so its checkpoints load). The state is the last
``K−1`` inputs ``[B, K−1, D]``; with ``cu_seqlens`` no tap reaches into the previous document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memlm.layers.packing import document_positions


class ShortConvolution(nn.Conv1d):
    def __init__(self, hidden_size: int, kernel_size: int = 4, bias: bool = False, activation: str | None = "silu"):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=bias,
                         padding=kernel_size - 1)
        if activation not in (None, "silu", "swish"):
            raise ValueError(f"ShortConvolution activation must be None, 'silu' or 'swish', got {activation!r}")
        self.activation = activation

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seqlen, dim = x.shape
        k = self.kernel_size[0]
        history = state if state is not None else x.new_zeros(batch, k - 1, dim)
        xx = torch.cat([history.to(x.dtype), x], dim=1)  # [B, K-1+T, D]
        weight = self.weight[:, 0, :].to(x.dtype)  # [D, K]
        pos = document_positions(seqlen, cu_seqlens, 0, x.device) if cu_seqlens is not None else None
        y = x * weight[:, k - 1]
        for j in range(1, k):
            term = xx[:, k - 1 - j: k - 1 - j + seqlen] * weight[:, k - 1 - j]
            if pos is not None:
                term = term * (pos >= j).to(x.dtype)[None, :, None]
            y = y + term
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        if self.activation is not None:
            y = F.silu(y)
        return y, (xx[:, -(k - 1):] if use_cache else None)
