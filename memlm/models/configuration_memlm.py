"""``MemLMConfig``: the Hugging Face config of every memlm model.

The stack is a per-layer list of mixer specs (``{"name": ..., **options}``), given as
- ``mixer``: one spec for every layer (default ``{"name": "attention"}``), or
- ``ratio`` ``"a:b"`` with ``mixer`` and ``ratio_mixer``: ``a`` layers of ``mixer`` then ``b``
  of ``ratio_mixer`` (default attention), repeated and cut at ``num_hidden_layers`` — so
  ``"3:1"`` puts attention at layers 3, 7, 11, …, i.e. after every 3 linear layers, or
- ``layers``: the explicit list (one spec per layer), which overrides both.
"""

from __future__ import annotations

import re
from typing import Any

from transformers.configuration_utils import PreTrainedConfig

from memlm.layers.mlp import default_intermediate_size
from memlm.layers.registry import parse_spec

_RATIO = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def ratio_pattern(ratio: str, num_layers: int) -> list[bool]:
    """``True`` where a layer takes the second mixer of ``ratio`` ``"a:b"`` (e.g. attention)."""
    match = _RATIO.match(str(ratio))
    if not match or int(match.group(2)) < 1:
        raise ValueError(f"ratio must look like 'a:b' with integers a >= 0 and b >= 1 (e.g. '3:1': three layers of "
                         f"mixer, then one of ratio_mixer), got {ratio!r}")
    a, b = int(match.group(1)), int(match.group(2))
    return [(i % (a + b)) >= a for i in range(num_layers)]


def _as_spec(spec: Any) -> dict[str, Any]:
    return {"name": spec} if isinstance(spec, str) else dict(spec)


class MemLMConfig(PreTrainedConfig):
    model_type = "memlm"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
        mixer: dict[str, Any] | str | None = None,
        ratio: str | None = None,
        ratio_mixer: dict[str, Any] | str | None = None,
        layers: list[dict[str, Any] | str] | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MemLMConfig.{name} must be a positive integer, got {value!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.intermediate_size = intermediate_size or default_intermediate_size(hidden_size)
        self.mixer = _as_spec(mixer or {"name": "attention"})
        self.ratio = ratio
        self.ratio_mixer = _as_spec(ratio_mixer or {"name": "attention"})
        self.layers = [_as_spec(s) for s in layers] if layers is not None else None
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        if self.layers is not None and len(self.layers) != num_hidden_layers:
            raise ValueError(
                f"MemLMConfig.layers has {len(self.layers)} specs but num_hidden_layers={num_hidden_layers}"
            )
        for i, spec in enumerate(self.layer_specs()):
            parse_spec(spec, where=f"MemLMConfig layers[{i}]")
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def layer_specs(self) -> list[dict[str, Any]]:
        """The resolved per-layer mixer specs (see the module docstring)."""
        if self.layers is not None:
            return [dict(s) for s in self.layers]
        if self.ratio is None:
            return [dict(self.mixer) for _ in range(self.num_hidden_layers)]
        second = ratio_pattern(self.ratio, self.num_hidden_layers)
        return [dict(self.ratio_mixer if b else self.mixer) for b in second]
