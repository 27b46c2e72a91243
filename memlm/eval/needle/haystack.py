"""Haystack text for the needle probes.

- ``NOISE``: the repeated filler of the passkey test (Mohtashami & Jaggi 2023) and of RULER's
  S-NIAH-1 (Hsieh et al. 2024).
- Prose (S-NIAH-2/3): sentences of a local text file or folder, of a Hugging Face dataset
  column, or, offline by default, of the docstrings of the running interpreter's standard
  library (a corpus present on every machine).
"""

from __future__ import annotations

import ast
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_TEXT_SUFFIXES = (".txt", ".md", ".rst")


def split_sentences(text: str) -> list[str]:
    """Whitespace-normalised sentences of ``text`` (split after ``.``, ``!``, ``?`` before a capital)."""
    flat = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(flat) if s]


def _is_prose(sentence: str) -> bool:
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return 20 <= len(sentence) <= 400 and sentence[-1] in ".!?" and letters >= 0.85 * len(sentence)


def _docstring_text(source: str) -> str:
    """The docstrings of a module's source (module, classes, functions), doctest lines removed."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    defs = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, defs)]
    docs = (ast.get_docstring(n) or "" for n in nodes)
    return "\n".join(
        line for doc in docs for line in doc.splitlines() if not line.lstrip().startswith((">>>", "..."))
    )


@lru_cache(maxsize=4)
def stdlib_prose(min_chars: int = 400_000) -> tuple[str, ...]:
    """Prose sentences from the standard library's docstrings, files in sorted order, until
    ``min_chars`` characters are collected (deterministic for one Python build)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    size = 0
    for path in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "site-packages") for part in path.relative_to(root).parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for sentence in split_sentences(_docstring_text(source)):
            if _is_prose(sentence):
                out.append(sentence)
                size += len(sentence) + 1
        if size >= min_chars:
            break
    if not out:
        raise ValueError(f"no prose found in the standard library at {root}; pass a haystack file instead")
    return tuple(out)


def read_texts(path: str | Path) -> list[str]:
    """The text of a file, or of every ``.txt``/``.md``/``.rst`` file under a folder (sorted)."""
    p = Path(path)
    if p.is_file():
        return [p.read_text(encoding="utf-8", errors="replace")]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"haystack folder {p} holds no {list(_TEXT_SUFFIXES)} files")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    raise ValueError(f"haystack path {p} is neither a file nor a folder")


def dataset_texts(name: str, split: str = "train", field: str = "text", config: str | None = None,
                  limit: int | None = None) -> list[str]:
    """Column ``field`` of a Hugging Face dataset split (first ``limit`` rows)."""
    import datasets

    ds = datasets.load_dataset(name, config, split=split)
    if field not in ds.column_names:
        raise ValueError(f"dataset {name!r} split {split!r} has no column {field!r}; "
                         f"columns: {ds.column_names}")
    rows = ds if limit is None else ds.select(range(min(limit, len(ds))))
    return [t for t in rows[field] if t]


def prose_sentences(texts: list[str] | None = None) -> list[str]:
    """Haystack sentences of ``texts``, or of the standard-library default when None."""
    if texts is None:
        return list(stdlib_prose())
    sentences = [s for t in texts for s in split_sentences(t)]
    if not sentences:
        raise ValueError("the haystack texts hold no sentences")
    return sentences
