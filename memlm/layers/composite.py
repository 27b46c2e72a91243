"""Mixers built from two sub-mixers (a memory and an attention), validated at config time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memlm.layers.mixer import Mixer
from memlm.layers.registry import build_mixer, parse_spec


@dataclass
class MemoryAttentionOptions:
    memory: dict[str, Any] = field(default_factory=lambda: {"name": "titans_memory"})
    attention: dict[str, Any] = field(default_factory=lambda: {"name": "attention", "window_size": 2048})

    def validate(self) -> None:
        parse_spec(self.memory, where="memory")
        parse_spec(self.attention, where="attention")


class MemoryAttentionMixer(Mixer):
    """Owns ``self.memory`` and ``self.attention`` built from the options; state = (memory, attention)."""

    Options = MemoryAttentionOptions

    def __init__(self, hidden_size: int, config: Any, opts: MemoryAttentionOptions) -> None:
        super().__init__()
        self.memory = build_mixer(opts.memory, hidden_size, config, where=f"{self.mixer_name}.memory")
        self.attention = build_mixer(opts.attention, hidden_size, config, where=f"{self.mixer_name}.attention")

    def state_size(self, seq_len: int) -> int:
        return self.memory.state_size(seq_len) + self.attention.state_size(seq_len)

    def stack_states(self, states: list[tuple[Any, Any]]) -> tuple[Any, Any] | None:
        """Both parts stacked, or None when either cannot be."""
        memory = self.memory.stack_states([s[0] for s in states])
        attention = self.attention.stack_states([s[1] for s in states])
        return None if memory is None or attention is None else (memory, attention)
