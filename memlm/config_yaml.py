"""Reading memlm's YAML files (run, model, preset and probe configs) with YAML 1.2's numbers: no
base-60 integers (``ratio: 3:1`` stays the string ``"3:1"``, where YAML 1.1 reads 181) and ``1e-3``
is a float."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class _YAMLLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the int and float resolvers of YAML 1.2."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_YAMLLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAMLLoader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"),
                                  list("-+0123456789"))
_YAMLLoader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """One YAML document or scalar, read as :class:`_YAMLLoader` does."""
    return yaml.load(text, Loader=_YAMLLoader)


def read_yaml(path: str | Path) -> Any:
    """The YAML file at ``path``, read as :func:`parse_yaml` does."""
    return parse_yaml(Path(path).read_text(encoding="utf-8"))
