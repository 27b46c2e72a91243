"""The pre-norm decoder block: ``h = x + mixer(RMSNorm(x)); y = h + MLP(RMSNorm(h))`` (MLP: SwiGLU or a
mixture of SwiGLU experts, ``memlm.layers.moe``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memlm.layers.moe import build_mlp
from memlm.layers.registry import build_mixer


class Block(nn.Module):
    def __init__(self, config: Any, layer_idx: int, spec: dict[str, Any]) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = build_mixer(spec, config.hidden_size, config, where=f"layers[{layer_idx}]")
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = build_mlp(config.hidden_size, config.intermediate_size, getattr(config, "mlp", None))

    def forward(
        self,
        x: torch.Tensor,
        state: Any | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any | None]:
        mixed, new_state = self.attn(self.attn_norm(x), state=state, use_cache=use_cache, cu_seqlens=cu_seqlens)
        h = x + mixed
        return h + self.mlp(self.mlp_norm(h)), new_state
