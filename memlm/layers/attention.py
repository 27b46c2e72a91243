"""Causal softmax attention: SDPA, RoPE, grouped-query heads, optional sliding window and
learned persistent memory (Titans §3.3: ``N_p`` position-free key/value slots every query sees).

Decoding state: ``(k, v, seen, growth, offsets)`` — the cached keys/values and the number of slots filled so
far: for global attention a growing buffer (``layers/kv_cache.py``, valid rows ``[:seen]``), for a sliding
window exactly its last ``window_size`` slots (``growth`` None). ``offsets`` ``[B]`` (None: all zero) are the
empty leading slots of each row when rows of different lengths share the buffer (a padded batch): row ``i``'s
token at slot ``s`` has position ``s − offsets[i]`` and its earlier slots are masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.layers.kv_cache import Growth, append, right_aligned
from memlm.layers.mixer import Mixer
from memlm.layers.packing import document_ids
from memlm.layers.registry import register_mixer
from memlm.layers.rotary import apply_rotary, rotation, rotation_at

AttentionState = tuple[torch.Tensor, torch.Tensor, int, Growth | None, torch.Tensor | None]


@register_mixer("attention")
class Attention(Mixer):
    @dataclass
    class Options:
        num_heads: int | None = None  # default: config.num_heads
        num_kv_heads: int | None = None  # default: config.num_kv_heads (or num_heads)
        head_dim: int | None = None  # default: hidden_size // num_heads
        window_size: int | None = None  # None: global causal attention
        rope_theta: float | None = None  # default: config.rope_theta
        num_persistent: int = 0  # learned persistent key/value slots
        qkv_bias: bool = False
        qk_norm: bool = False  # RMSNorm (eps 1e-5) over each q and k head before RoPE (fla `qk_norm`)

        def validate(self) -> None:
            for name in ("num_heads", "num_kv_heads", "head_dim", "window_size"):
                value = getattr(self, name)
                if value is not None and value < 1:
                    raise ValueError(f"{name} must be a positive integer or null, got {value}")
            if self.num_persistent < 0:
                raise ValueError(f"num_persistent must be >= 0, got {self.num_persistent}")

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__()
        self.num_heads = opts.num_heads or config.num_heads
        self.num_kv_heads = opts.num_kv_heads or getattr(config, "num_kv_heads", None) or self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"attention: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if opts.head_dim is None and hidden_size % self.num_heads:
            raise ValueError(f"attention: hidden_size={hidden_size} is not divisible by num_heads={self.num_heads}")
        self.head_dim = opts.head_dim or hidden_size // self.num_heads
        if self.head_dim % 2:
            raise ValueError(f"attention: head_dim={self.head_dim} must be even for rotary embeddings")
        self.window_size = opts.window_size
        self.rope_theta = opts.rope_theta or config.rope_theta
        self.num_persistent = opts.num_persistent
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, self.num_heads * self.head_dim, bias=opts.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, kv_dim, bias=opts.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, kv_dim, bias=opts.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if opts.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if opts.qk_norm else None
        if self.num_persistent:
            shape = (self.num_persistent, self.num_kv_heads, self.head_dim)
            self.persistent_k = nn.Parameter(torch.zeros(shape))
            self.persistent_v = nn.Parameter(torch.zeros(shape))

    def init_weights(self, init: Any, std: float) -> None:
        """Initialise the parameters the generic HF init does not know (persistent slots)."""
        if self.num_persistent:
            init.normal_(self.persistent_k, mean=0.0, std=std)
            init.normal_(self.persistent_v, mean=0.0, std=std)

    def state_size(self, seq_len: int) -> int:
        kept = seq_len if self.window_size is None else min(seq_len, self.window_size)
        return 2 * self.num_kv_heads * self.head_dim * kept

    def stack_states(self, states: list[AttentionState]) -> AttentionState:
        """Rows of different lengths in one buffer, each right-aligned after its own empty slots."""
        lengths = [s[2] for s in states]
        frame = max(lengths)
        offsets = torch.tensor([frame - n for n in lengths], device=states[0][0].device)
        if self.window_size is None:
            k, v, growth = right_aligned([(s[0], s[1], s[2]) for s in states])
            return k, v, frame, growth, offsets
        kept = max(s[0].shape[1] for s in states)
        k, v = (states[0][part].new_zeros(len(states), kept, *states[0][part].shape[2:]) for part in (0, 1))
        for i, s in enumerate(states):
            k[i, kept - s[0].shape[1]:], v[i, kept - s[1].shape[1]:] = s[0][0], s[1][0]
        return k, v, frame, None, offsets

    def _mask(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, cu_seqlens: torch.Tensor | None
    ) -> torch.Tensor:
        """Boolean ``[Tq, Tk]`` mask: causal, inside the window, inside the same document."""
        allowed = k_pos[None, :] <= q_pos[:, None]
        if self.window_size is not None:
            allowed &= (q_pos[:, None] - k_pos[None, :]) < self.window_size
        if cu_seqlens is not None:
            doc = document_ids(q_pos.numel(), cu_seqlens, q_pos.device)
            allowed &= doc[:, None] == doc[None, :]
        return allowed

    def forward(
        self,
        x: torch.Tensor,
        state: AttentionState | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AttentionState | None]:
        batch, seqlen, _ = x.shape
        if cu_seqlens is not None and (state is not None or use_cache):
            raise ValueError("attention: cu_seqlens (packed documents) cannot be combined with a decoding cache")
        past_k, past_v, seen, growth, offsets = state if state is not None else (None, None, 0, None, None)
        q = self.q_proj(x).view(batch, seqlen, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if offsets is None:
            cos_sin = rotation(seqlen, cu_seqlens, seen, self.head_dim, self.rope_theta, x.device)
        else:
            slots = torch.arange(seen, seen + seqlen, device=x.device)
            cos_sin = rotation_at(slots[None, :] - offsets[:, None], self.head_dim, self.rope_theta)
        q, k = apply_rotary(q, cos_sin), apply_rotary(k, cos_sin)
        new_state = None
        if self.window_size is None and (use_cache or past_k is not None):
            k, v, buffer = append(None if past_k is None else (past_k, past_v, growth), seen, k, v)
            new_state = (buffer[0], buffer[1], seen + seqlen, buffer[2], offsets)
        elif past_k is not None or use_cache:
            if past_k is not None:
                k, v = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
            keep = min(k.shape[1], self.window_size)
            new_state = (k[:, -keep:], v[:, -keep:], seen + seqlen, None, offsets)
        if not use_cache:
            new_state = None

        single = seqlen == 1 and cu_seqlens is None and offsets is None  # one query sees every key given: no mask
        if single and self.window_size is not None:
            k, v = k[:, -self.window_size:], v[:, -self.window_size:]
        plain_causal = past_k is None and self.window_size is None and cu_seqlens is None
        mask = None
        if not (plain_causal or single):
            if cu_seqlens is not None:
                mask = self._mask(torch.arange(seqlen, device=x.device), torch.arange(seqlen, device=x.device),
                                  cu_seqlens)
            else:
                q_pos = torch.arange(seen, seen + seqlen, device=x.device)
                k_pos = torch.arange(seen + seqlen - k.shape[1], seen + seqlen, device=x.device)
                mask = self._mask(q_pos, k_pos, None)
                if offsets is not None:  # [B, 1, Tq, Tk]: a row's empty leading slots are no keys
                    mask = mask & (k_pos[None, :] >= offsets[:, None])[:, None, None, :]
        if self.num_persistent:
            pk = self.persistent_k.to(k.dtype).expand(batch, -1, -1, -1)
            pv = self.persistent_v.to(v.dtype).expand(batch, -1, -1, -1)
            k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
            if mask is None and not single:
                pos = torch.arange(seqlen, device=x.device)
                mask = self._mask(pos, pos, None)
            if mask is not None:
                mask = torch.cat([mask.new_ones(*mask.shape[:-1], self.num_persistent), mask], dim=-1)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None and not single, enable_gqa=self.num_kv_heads != self.num_heads,
        )
        o = o.transpose(1, 2).reshape(batch, seqlen, self.num_heads * self.head_dim)
        return self.o_proj(o), new_state
