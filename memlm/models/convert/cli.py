"""``memlm convert SRC DST``: write any checkpoint :func:`from_pretrained` reads (a local directory
or Hub id, memlm or a foreign format) as a memlm checkpoint, with its tokenizer files.

DST must be a new or empty directory outside SRC; ``--overwrite`` writes into a non-empty one
(replacing the files of the same name)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memlm.models.configuration_memlm import MemLMConfig
from memlm.models.convert.files import read_config, resolve
from memlm.models.convert.loader import convert_checkpoint
from memlm.models.convert.registry import get_format

PROG = "memlm convert"
DTYPES = ("float32", "bfloat16", "float16", "auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("source", help="checkpoint directory or Hugging Face Hub id (owner/name)")
    parser.add_argument("target", help="output directory (memlm format): new, or empty unless --overwrite")
    parser.add_argument("--dtype", default=None,
                        help="float32 (default), bfloat16, float16, or 'auto' to keep the stored dtype")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing non-empty output directory, replacing its files")
    return parser


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_target(args: argparse.Namespace, source_dir: Path) -> None:
    """Refuse a DST equal to or inside the source checkpoint (``ValueError``)."""
    target, source = Path(args.target).expanduser().resolve(), source_dir.resolve()
    if target == source:
        raise ValueError(f"destination {args.target} is the source checkpoint {args.source} itself; converting "
                         "in place would overwrite it: choose another destination")
    if _inside(target, source):
        raise ValueError(f"destination {args.target} is inside the source checkpoint {args.source}: "
                         "choose a destination outside it")


def check_arguments(args: argparse.Namespace) -> Path:
    """Every check that needs no conversion work; returns the source checkpoint's local directory.

    Raises ``ValueError`` (one line) for a bad ``--dtype``, a DST that is the source or inside it,
    a DST that exists and is not empty (without ``--overwrite``), a source that is neither a
    checkpoint directory nor a Hub id, and a ``config.json`` of an unknown ``model_type``.
    """
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ValueError(f"argument --dtype: invalid choice {args.dtype!r} (choose from {', '.join(DTYPES)})")
    local = Path(args.source).expanduser()
    if local.is_dir():
        _check_target(args, local)
    target = Path(args.target).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"destination {args.target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not args.overwrite:
        raise ValueError(f"destination {args.target} exists and is not empty; choose a new or empty directory, "
                         "or pass --overwrite to replace its files")
    try:
        root = resolve(args.source)  # a Hub id is downloaded here
    except OSError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        raise ValueError(f"cannot fetch {args.source!r} from the Hugging Face Hub: {detail}") from None
    _check_target(args, root)
    try:
        config = read_config(root)
    except json.JSONDecodeError as err:
        raise ValueError(f"{root / 'config.json'} is not valid JSON: {err}") from None
    if config.get("model_type") != MemLMConfig.model_type:
        get_format(config.get("model_type"))  # ValueError naming the supported model types
    return root


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``memlm convert``; returns the process exit status (2 on invalid input)."""
    args = build_parser().parse_args(argv)
    try:
        root = check_arguments(args)
        model = convert_checkpoint(root, args.target, dtype=args.dtype)
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    kinds = sorted({spec["name"] for spec in model.config.layer_specs()})
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.target}: {model.config.num_hidden_layers} layers ({', '.join(kinds)}), "
          f"{params / 1e6:.1f}M parameters, {next(model.parameters()).dtype}")
    return 0
