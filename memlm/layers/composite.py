"""Options of mixers built from two sub-mixers (a memory and an attention), validated at config time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memlm.layers.registry import parse_spec


@dataclass
class MemoryAttentionOptions:
    memory: dict[str, Any] = field(default_factory=lambda: {"name": "titans_memory"})
    attention: dict[str, Any] = field(default_factory=lambda: {"name": "attention", "window_size": 2048})

    def validate(self) -> None:
        parse_spec(self.memory, where="memory")
        parse_spec(self.attention, where="attention")
