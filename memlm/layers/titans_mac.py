"""Titans MAC, memory as context (arXiv 2501.00663 §4.1, eqs. 21–25), in the paper's order
retrieve → attend → store, segment by segment:

1. ``h_t = M*_{s−1}(q_t)``: read the memory as it was at the end of the previous segment (eq. 21);
2. ``y = Attn([p ‖ h ‖ S^{(s)}])``: causal attention over persistent memory, the retrieved
   context and the segment (eq. 22);
3. write ``y`` into the memory, ``M_s = M_{s−1}(y)`` (eq. 23), and read it back:
   ``o_t = y_t ⊗ M*_t(y_t)`` (eqs. 24–25; ⊗ = normalised sigmoid gate).

The memory reads the attention output through an RMSNorm (the memory sub-layer's pre-norm, as the
block input is for LMM): the attention output starts near zero, and the ℓ2-normalised keys of a
near-zero input amplify the gradients by orders of magnitude (the tiny MAC diverged without it:
docs/log/2026-11-23-titans-stability-fixes.md).

Causality inside a segment: the attention sees ``h_j`` and ``x_j`` only for ``j ≤ t`` (``h_j`` is
computed from token ``j``'s query), done by interleaving ``(h_1, x_1, h_2, x_2, …)`` under a
plain causal mask; the memory reads ``M_t`` after token ``t``'s write, never the segment's end state.

``normalize_attention`` selects the paper's gate ``W_O(norm(y) ⊙ σ(norm(M*(y))))`` (``layers/norm.py``). On
MQAR MAC learns the task only after a long plateau: it needs more steps than attention or the LMM, whatever
the gate (BENCHMARKS.md §8, claim 13).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memlm.layers.attention import Attention
from memlm.layers.mixer import Mixer
from memlm.layers.neural_memory import NeuralMemory
from memlm.layers.norm import NormalizedSigmoidGate
from memlm.layers.periodic import periodic_forward
from memlm.layers.registry import MIXERS, build_mixer, parse_spec, register_mixer


@register_mixer("titans_mac")
class MemoryAsContext(Mixer):
    packs_documents = False
    @dataclass
    class Options:
        segment_size: int = 512
        memory: dict[str, Any] = field(default_factory=lambda: {"name": "titans_memory"})
        attention: dict[str, Any] = field(default_factory=lambda: {"name": "attention"})
        normalize_attention: bool = False  # the paper's gate: RMS-normalise the attention output y too

        def validate(self) -> None:
            if self.segment_size < 1:
                raise ValueError(f"segment_size must be >= 1, got {self.segment_size}")
            for role, base in (("memory", NeuralMemory), ("attention", Attention)):
                cls, _ = parse_spec(getattr(self, role), where=role)
                if not issubclass(cls, base):
                    allowed = sorted(name for name, c in MIXERS.items() if issubclass(c, base))
                    raise ValueError(f"{role} must be one of the mixers {allowed}, got {cls.mixer_name!r}")

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__()
        self.segment_size = opts.segment_size
        self.memory = build_mixer(opts.memory, hidden_size, config, where="titans_mac.memory")
        self.attention = build_mixer(opts.attention, hidden_size, config, where="titans_mac.attention")
        self.memory_norm = nn.RMSNorm(hidden_size, eps=config.norm_eps)
        self.gate = NormalizedSigmoidGate(hidden_size, eps=config.norm_eps, normalize_y=opts.normalize_attention)

    def state_size(self, seq_len: int) -> int:
        kept = min(seq_len, self.segment_size)
        return self.memory.memory_state_size() + self.attention.state_size(2 * kept)

    def _initial_base(self, batch: int) -> dict[str, Any]:
        weights, momentum = self.memory.initial_memory(batch)
        return {"conv_x": None, "conv_y": (None, None, None), "weights": weights, "momentum": momentum}

    def _run(self, x: torch.Tensor, base: dict[str, Any], want_state: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        mem, outputs = self.memory, []
        for start in range(0, x.shape[1], self.segment_size):
            seg = x[:, start: start + self.segment_size]
            q, conv_x = mem.project_queries(seg, base["conv_x"])
            h = mem.output(mem.read(q, base["weights"]), seg)  # retrieve (eq. 21)
            context = torch.stack([h, seg], dim=2).flatten(1, 2)  # h_1, x_1, h_2, x_2, …
            y = self.attention(context)[0][:, 1::2]  # attend (eq. 22)
            y_in = self.memory_norm(y)
            qy, ky, vy, gates, conv_y = mem.project(y_in, base["conv_y"])
            o, (weights, momentum) = mem.write_read(qy, ky, vy, gates, (base["weights"], base["momentum"]), True)
            outputs.append(self.gate(y, mem.output(o, y_in)))  # store and read back (eqs. 23–25)
            base = {"conv_x": conv_x, "conv_y": conv_y, "weights": weights, "momentum": momentum}
        return torch.cat(outputs, dim=1), base

    def forward(
        self, x: torch.Tensor, state: Any | None = None, use_cache: bool = False, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any | None]:
        if cu_seqlens is not None:
            raise ValueError("titans_mac does not support cu_seqlens (packed documents); train with "
                             "data.document_masking=false")
        return periodic_forward(self._run, x, state, use_cache, self.segment_size,
                                lambda: self._initial_base(x.shape[0]))
