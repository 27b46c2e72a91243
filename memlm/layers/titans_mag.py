"""Titans MAG, memory as a gate (arXiv 2501.00663 §4.2, eqs. 26–28): sliding-window attention
(with persistent memory) and the neural memory read the same input in parallel;
``o = W_O(y_attn ⊙ σ(norm(y_mem)))``, or the paper's ``W_O(norm(y_attn) ⊙ σ(norm(y_mem)))`` with
``normalize_attention`` (the gate: ``layers/norm.py``).

The paper's memory reads ``x̃ = [p_1 … p_Np] ‖ x`` (eq. 26), the persistent tokens too; by default ours
reads ``x`` only. ``memory_reads_persistent: true`` makes it read ``[p ‖ x]``: the memory writes
``N_p`` learned tokens (``N_p`` = the attention's ``num_persistent``) before each sequence, through
the memory's own ``num_persistent`` mechanism (``NeuralMemory.initial_memory``: the weights and
momentum after ``p`` are the start state of every sequence, packed document and decoding run, so it
stays exact under step-by-step decoding and ``cu_seqlens``). The tokens are the memory's parameters,
not shared with the attention: its persistent memory is ``N_p`` free key/value slots (position-free,
not projected from tokens), which can express any ``W_K p, W_V p`` of shared tokens, so the untied pair
covers the paper's tied one. As for a standalone memory with ``num_persistent``, ``p`` is written as
chunks of its own and the short convolutions start fresh at ``x_1`` (the paper's conv and chunks would
run across the ``p ‖ x`` boundary). The default reads ``x``: on MQAR (64, 4) with the paper's gate and four
persistent tokens, ``[p ‖ x]`` reached 26.0% against 95.3% (BENCHMARKS.md §6).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from memlm.layers.composite import MemoryAttentionMixer, MemoryAttentionOptions
from memlm.layers.norm import NormalizedSigmoidGate
from memlm.layers.registry import parse_spec, register_mixer


@register_mixer("titans_mag")
class MemoryAsGate(MemoryAttentionMixer):
    @dataclass
    class Options(MemoryAttentionOptions):
        normalize_attention: bool = False  # the paper's gate: RMS-normalise the attention branch too
        memory_reads_persistent: bool = False  # the paper's M([p ‖ x]): the memory writes N_p tokens first

        def validate(self) -> None:
            super().validate()
            if self.memory_reads_persistent:
                self.memory_spec()

        def memory_spec(self) -> dict[str, Any]:
            """The memory's spec, with ``num_persistent`` set to the attention's when the memory reads
            the persistent tokens (the memory must have that option; an explicit different count fails)."""
            if not self.memory_reads_persistent:
                return dict(self.memory)
            _, attn = parse_spec(self.attention, where="attention")
            n = getattr(attn, "num_persistent", 0)
            if n < 1:
                raise ValueError("memory_reads_persistent needs persistent tokens: set attention.num_persistent >= 1")
            mem_cls, _ = parse_spec(self.memory, where="memory")
            if "num_persistent" not in {f.name for f in dataclasses.fields(mem_cls.Options)}:
                name = self.memory["name"]
                raise ValueError(f"memory_reads_persistent: memory {name!r} has no num_persistent option")
            own = self.memory.get("num_persistent", 0)
            if own not in (0, n):
                raise ValueError(f"memory_reads_persistent: memory.num_persistent={own} differs from the attention's "
                                 f"{n} (leave it unset: the memory takes the attention's count)")
            return {**self.memory, "num_persistent": n}

    def __init__(self, hidden_size: int, config: Any, opts: Options) -> None:
        super().__init__(hidden_size, config, dataclasses.replace(opts, memory=opts.memory_spec()))
        self.gate = NormalizedSigmoidGate(hidden_size, eps=config.norm_eps, normalize_y=opts.normalize_attention)

    def forward(
        self, x: torch.Tensor, state: Any | None = None, use_cache: bool = False, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any | None]:
        mem_state, attn_state = state if state is not None else (None, None)
        y, attn_state = self.attention(x, attn_state, use_cache, cu_seqlens)
        m, mem_state = self.memory(x, mem_state, use_cache, cu_seqlens)
        return self.gate(y, m), ((mem_state, attn_state) if use_cache else None)
