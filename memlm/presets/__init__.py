"""Model presets: a family at a size, ``load_preset(name, **overrides) -> MemLMConfig``.

The data ships with the package:

- ``sizes.yaml``: each size's shape (``tiny``, ``170m``, ``340m``, ``760m``, ``1.3b``: layers, hidden
  size, heads, vocabulary, context), kept once;
- ``families/<family>.yaml``: a family's mixer spec (and ``ratio`` / ``ratio_mixer`` for a hybrid), the
  sizes it comes in and, per size, its free values (e.g. the MLP width that gives the paper's parameter
  count); ``base: <family>`` starts from that family at the same size (a hybrid's linear layers);
- ``aliases.yaml``: former preset names → preset names.

A preset's fields are its size's, then its base family's (if any), then its family's, then its size's free
values, each merged into the one before (mappings such as a mixer spec key by key).

Names: ``<mixer>_<size>`` for a stack of one mixer (``<mixer>`` its registry name: ``attention_340m``,
``titans_memory_1.3b``, ``gated_deltanet_tiny``) and ``hybrid_<mixer>_<a>to<b>_<size>`` for ``a`` layers of
``<mixer>`` then ``b`` attention layers, repeated (``ratio: "a:b"``: ``hybrid_moneta_1to1_340m``).
"""

from __future__ import annotations

import copy
import difflib
import functools
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from memlm.config_yaml import parse_yaml, read_yaml
from memlm.models.configuration_memlm import MemLMConfig

__all__ = ["aliases", "expand_preset", "load_preset", "preset_fields", "preset_names", "resolve_name", "sizes"]


def _read(relative: str) -> Any:
    return parse_yaml(resources.files(__name__).joinpath(relative).read_text(encoding="utf-8"))


@functools.cache
def _sizes() -> dict[str, dict[str, Any]]:
    return {str(k): v for k, v in _read("sizes.yaml")["sizes"].items()}


@functools.cache
def _families() -> dict[str, dict[str, Any]]:
    folder = resources.files(__name__).joinpath("families")
    names = sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))
    families = {name: _read(f"families/{name}.yaml") for name in names}
    for name, family in families.items():
        family["sizes"] = {str(k): v or {} for k, v in family["sizes"].items()}
        unknown = sorted(set(family["sizes"]) - set(_sizes()))
        if unknown:
            raise ValueError(f"preset family {name!r} lists sizes {unknown} that sizes.yaml lacks")
    return families


@functools.cache
def _aliases() -> dict[str, str]:
    return {str(k): str(v) for k, v in (_read("aliases.yaml") or {}).items()}


def sizes() -> dict[str, dict[str, Any]]:
    """Each size's fields (a copy)."""
    return copy.deepcopy(_sizes())


def preset_names() -> list[str]:
    """Every preset, family by family, sizes in ``sizes.yaml``'s order."""
    order = list(_sizes())
    return [f"{family}_{size}" for family, spec in _families().items()
            for size in sorted(spec["sizes"], key=order.index)]


def aliases() -> dict[str, str]:
    """Former preset names → preset names (a copy)."""
    return dict(_aliases())


def _merge(base: dict[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``other``; mappings present in both are merged key by key."""
    out = copy.deepcopy(base)
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_name(name: str) -> str:
    """The preset ``name`` is, or stands for (a former name); a ``ValueError`` naming close matches."""
    if name in _aliases():
        return _aliases()[name]
    known = preset_names()
    if name in known:
        return name
    close = difflib.get_close_matches(name, known + list(_aliases()), n=5, cutoff=0.5)
    close = [f"{c!r} (now {_aliases()[c]!r})" if c in _aliases() else repr(c) for c in close]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown preset {name!r}{hint}; the presets (<family>_<size>): {', '.join(known)}")


def _family_at(family: str, size: str, preset: str) -> dict[str, Any]:
    spec = _families()[family]
    if size not in spec["sizes"]:
        raise ValueError(f"preset {preset!r}: family {family!r} comes in sizes {list(spec['sizes'])}, not {size!r}")
    fields = _family_at(spec["base"], size, preset) if "base" in spec else dict(_sizes()[size])
    fields = _merge(fields, {k: v for k, v in spec.items() if k not in ("base", "sizes")})
    return _merge(fields, spec["sizes"][size])


def preset_fields(name: str) -> dict[str, Any]:
    """The ``MemLMConfig`` fields of a preset (a copy): a preset name, a former name, or the path of
    a YAML file of fields (which may itself start from a ``preset``)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"preset file {name} must hold a mapping of MemLMConfig fields")
        return expand_preset(data)
    canonical = resolve_name(name)
    family, _, size = canonical.rpartition("_")
    return _family_at(family, size, canonical)


def expand_preset(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` with its ``preset`` key (if any) expanded: the preset's fields, ``fields`` merged
    into them key by key (as a run config's ``model:`` section over its ``model.preset``)."""
    fields = dict(fields)
    preset = fields.pop("preset", None)
    return _merge(preset_fields(str(preset)) if preset else {}, fields)


def load_preset(name: str, **overrides: Any) -> MemLMConfig:
    """The ``MemLMConfig`` of preset ``name`` (see :func:`preset_fields`), ``overrides`` replacing its
    fields (a whole mixer spec, not a key of it), e.g. ``load_preset("attention_tiny", vocab_size=4096)``.
    An unknown name, field or value is a ``ValueError`` that names it."""
    fields = {**preset_fields(name), **overrides}
    checked = MemLMConfig.check_fields(fields, prefix=f"preset {name!r}: ", runtime=True)
    return MemLMConfig(**checked)
