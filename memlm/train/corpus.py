"""Where the training text comes from: the embedded stdlib corpus, the interpreter's English prose,
generated arithmetic word problems (``memlm.train.synthetic``), local files, or the HF hub.

Every source yields plain strings (one per document). Held-out validation documents are the
first ``val_documents`` of a seeded shuffle (or of the stream when streaming).
"""

from __future__ import annotations

import glob
import os
import random
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from memlm.train.config import ConfigError, DataSection
from memlm.train.synthetic import arithmetic_documents, prose_documents

ARITHMETIC_DOCUMENTS = 4000  # generated when data.max_documents is null

FILE_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".py": "text", ".json": "json",
                ".jsonl": "json", ".parquet": "parquet"}
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "turtledemo", "lib2to3"}


def embedded_corpus() -> list[str]:
    """The running interpreter's standard-library sources: text on every machine, no network."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS)
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(files)]
    return [d for d in docs if d.strip()]


def _resolve_files(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in FILE_FORMATS)
    else:
        files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else ([path] if p.exists() else [])
    if not files:
        raise ConfigError(f"data.path={path!r} matches no data files (looked for {sorted(FILE_FORMATS)})")
    kinds = {FILE_FORMATS.get(Path(f).suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise ConfigError(
            f"data.path={path!r} must name files of one format among {sorted(FILE_FORMATS)}; got suffixes "
            f"{sorted({Path(f).suffix for f in files})}"
        )
    return files


def _text_documents(files: list[str], split: str) -> Iterator[str]:
    """Documents of UTF-8 text files: each whole file (``file``), or each blank-line separated
    ``paragraph``, or each ``line``."""
    for name in files:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"data.path: {name} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                              f"{err.start}); convert it or remove it from data.path") from None
        if split == "file":
            yield text
        elif split == "paragraph":
            yield from re.split(r"\n\s*\n", text)
        else:
            yield from text.splitlines()


def _hf_documents(cfg: DataSection) -> Iterable[str]:
    import datasets

    if cfg.source == "files":
        files = _resolve_files(str(cfg.path))
        kind = FILE_FORMATS[Path(files[0]).suffix]
        if kind == "text":
            return _text_documents(files, cfg.text_documents)
        ds = datasets.load_dataset(kind, data_files=files, split="train", streaming=cfg.streaming)
    else:
        ds = datasets.load_dataset(str(cfg.path), cfg.name, split=cfg.split, streaming=cfg.streaming)
    columns = ds.column_names or []
    if columns and cfg.text_field not in columns:
        raise ConfigError(f"data.text_field={cfg.text_field!r} is not a column of the data; columns: {columns}")
    return (row[cfg.text_field] for row in ds)


def _nonempty(docs: Iterable[str], limit: int | None) -> Iterator[str]:
    n = 0
    for doc in docs:
        if limit is not None and n >= limit:
            return
        if isinstance(doc, str) and doc.strip():
            n += 1
            yield doc


def load_documents(cfg: DataSection, seed: int) -> tuple[Iterable[str], list[str]]:
    """``(train_documents, val_documents)``; a list when not streaming, a one-pass iterator when streaming."""
    if cfg.source == "embedded":
        docs: Iterable[str] = embedded_corpus()
    elif cfg.source == "prose":
        docs = prose_documents()
    elif cfg.source == "arithmetic":
        docs = arithmetic_documents(cfg.max_documents or ARITHMETIC_DOCUMENTS, seed)
    else:
        docs = _hf_documents(cfg)
    stream = _nonempty(docs, cfg.max_documents)
    if cfg.streaming and cfg.source in ("files", "hub"):
        val = [doc for _, doc in zip(range(cfg.val_documents), stream)]
        if len(val) < cfg.val_documents:
            raise ConfigError(f"the corpus has only {len(val)} documents, fewer than data.val_documents")
        return stream, val
    everything = list(stream)
    if not everything:
        raise ConfigError(f"the corpus (data.source={cfg.source!r}, data.path={cfg.path!r}) has no text")
    if len(everything) <= cfg.val_documents:
        hint = (" (each text file is one document: data.text_documents=paragraph or =line splits them)"
                if cfg.source == "files" and cfg.text_documents == "file" else "")
        raise ConfigError(
            f"the corpus has {len(everything)} documents; data.val_documents={cfg.val_documents} leaves none "
            f"to train on{hint}"
        )
    random.Random(seed).shuffle(everything)
    return everything[cfg.val_documents:], everything[: cfg.val_documents]
