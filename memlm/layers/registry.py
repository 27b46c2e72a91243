"""The mixer registry: a model is a list of per-layer mixer specs ``{"name": ..., **options}``.

A mixer registers itself with :func:`register_mixer`; its options are a dataclass, so a
misspelt or ill-typed option fails when the model is built, naming the layer, the mixer
and the allowed options. Later architectures add mixers here without touching the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

MIXERS: dict[str, type] = {}

M = TypeVar("M", bound=type)


def register_mixer(name: str) -> Callable[[M], M]:
    """Class decorator: make a mixer buildable from a spec ``{"name": name, ...}``."""

    def wrap(cls: M) -> M:
        if name in MIXERS and MIXERS[name] is not cls:
            raise ValueError(f"mixer name {name!r} is already registered by {MIXERS[name].__qualname__}")
        if not dataclasses.is_dataclass(getattr(cls, "Options", None)):
            raise TypeError(f"mixer {cls.__qualname__} must define a dataclass `Options`")
        MIXERS[name] = cls
        cls.mixer_name = name
        return cls

    return wrap


def _type_ok(value: Any, annotation: str) -> bool:
    """Loose runtime check of an option value against its (string) annotation."""
    ann = annotation.replace(" ", "")
    if value is None:
        return "None" in ann or "Optional" in ann or ann == "Any"
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (Mapping,),
             "list": (list, tuple), "Any": (object,)}
    allowed = [t for key, types in kinds.items() if key in ann for t in types]
    if not allowed:
        return True
    if isinstance(value, bool) and "bool" not in ann:
        return False
    return isinstance(value, tuple(allowed))


def parse_spec(spec: Mapping[str, Any] | str, where: str = "mixer") -> tuple[type, Any]:
    """Validate one mixer spec and return ``(mixer_class, options)``.

    Raises ``ValueError`` naming ``where`` (e.g. ``"layers[3]"``), the bad key and the allowed values.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"{where}: a mixer spec is a mapping with a 'name' key, got {spec!r}")
    name = spec["name"]
    if name not in MIXERS:
        raise ValueError(f"{where}: unknown mixer name {name!r}; registered mixers: {sorted(MIXERS)}")
    cls = MIXERS[name]
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    options = {k: v for k, v in spec.items() if k != "name"}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"{where}: mixer {name!r} has no option(s) {unknown}; allowed options: {sorted(fields)}")
    for key, value in options.items():
        ann = fields[key].type if isinstance(fields[key].type, str) else getattr(fields[key].type, "__name__", "")
        if not _type_ok(value, str(ann)):
            raise ValueError(f"{where}: option {name}.{key}={value!r} has the wrong type; expected {ann}")
    opts = cls.Options(**options)
    check = getattr(opts, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as err:
            raise ValueError(f"{where}: mixer {name!r}: {err}") from None
    return cls, opts


def build_mixer(spec: Mapping[str, Any] | str, hidden_size: int, config: Any, where: str = "mixer") -> Any:
    """Validate ``spec`` and construct the mixer module for a model of ``hidden_size``."""
    cls, opts = parse_spec(spec, where)
    return cls(hidden_size, config, opts)
