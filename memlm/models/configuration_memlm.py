"""``MemLMConfig``: the Hugging Face config of every memlm model.

The stack is a per-layer list of mixer specs (``{"name": ..., **options}``), given as
- ``mixer``: one spec for every layer (default ``{"name": "attention"}``), or
- ``ratio`` ``"a:b"`` with ``mixer`` and ``ratio_mixer``: ``a`` layers of ``mixer`` then ``b``
  of ``ratio_mixer`` (default attention), repeated and cut at ``num_hidden_layers`` — so
  ``"3:1"`` puts attention at layers 3, 7, 11, …, i.e. after every 3 linear layers, or
- ``layers``: the explicit list (one spec per layer), which overrides both.

``mlp`` null is the dense SwiGLU MLP; ``{name: moe, ...}`` makes every block's MLP a mixture of experts
(``memlm.layers.moe``: plain top-k or DeepSeekMoE with shared experts).

The *model fields* are ``__init__``'s named parameters but :attr:`MemLMConfig.RUNTIME_FIELDS`:
what a preset (:func:`memlm.load_preset`) or a run config's ``model:`` section sets.
:meth:`MemLMConfig.check_fields` checks such a mapping key by key, naming the key.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping
from typing import Any

from transformers.configuration_utils import PreTrainedConfig

from memlm.layers.mlp import default_intermediate_size
from memlm.layers.moe import moe_options
from memlm.layers.registry import _type_ok, parse_spec

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


_POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads")


def _check_positive(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")


class MemLMConfig(PreTrainedConfig):
    model_type = "memlm"
    keys_to_ignore_at_inference = ["cache"]
    #: named ``__init__`` parameters that are not model fields: set from the tokenizer or at inference
    RUNTIME_FIELDS = ("use_cache", "bos_token_id", "eos_token_id", "pad_token_id")

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
        mlp: dict[str, Any] | None = None,
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
            _check_positive(f"MemLMConfig.{name}", value)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.intermediate_size = intermediate_size or default_intermediate_size(hidden_size)
        if mlp is not None:
            moe_options(dict(mlp))
        self.mlp = dict(mlp) if mlp is not None else None
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

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """The model fields and their defaults (a mixer spec as a mapping: ``None`` means attention)."""
        params = inspect.signature(cls.__init__).parameters
        defaults = {name: p.default for name, p in params.items()
                    if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD and name not in cls.RUNTIME_FIELDS}
        defaults["mixer"] = {"name": "attention"}
        return defaults

    @classmethod
    def check_fields(cls, fields: Mapping[str, Any], prefix: str = "MemLMConfig.",
                     runtime: bool = False) -> dict[str, Any]:
        """``fields`` checked key by key: each a model field (or one of :attr:`RUNTIME_FIELDS` when
        ``runtime``), each value of its type, each mixer spec valid. Returns a copy with mixer names
        as specs (``attention`` → ``{"name": "attention"}``) and integers as floats where a float is
        expected. A ``ValueError`` names the key as ``prefix + key`` (e.g. ``model.hidden_size``)."""
        params = inspect.signature(cls.__init__).parameters
        allowed = [n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
                   and (runtime or n not in cls.RUNTIME_FIELDS)]
        out: dict[str, Any] = {}
        for key, value in fields.items():
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=3)
                hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
                raise ValueError(f"{prefix}{key} is not a MemLMConfig model field; {hint}the model fields: {allowed}")
            ann = str(params[key].annotation)
            if not _type_ok(value, ann):
                raise ValueError(f"{prefix}{key}={value!r} has the wrong type; expected {ann}")
            if key in _POSITIVE:
                _check_positive(f"{prefix}{key}", value)
            if ann == "float" and isinstance(value, int):
                value = float(value)
            if key in ("mixer", "ratio_mixer") and value is not None:
                parse_spec(value, where=f"{prefix}{key}")
                value = _as_spec(value)
            if key == "layers" and value is not None:
                if not isinstance(value, (list, tuple)):
                    raise ValueError(f"{prefix}layers must be a list of mixer specs, got {value!r}")
                for i, spec in enumerate(value):
                    parse_spec(spec, where=f"{prefix}layers[{i}]")
                value = [_as_spec(s) for s in value]
            if key == "mlp" and value is not None:
                try:
                    moe_options(dict(value))
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{prefix}{err}") from None
            if key == "ratio" and value is not None:
                try:
                    ratio_pattern(value, 1)
                except ValueError as err:
                    raise ValueError(f"{prefix}ratio: {err}") from None
            out[key] = value
        return out
