"""The command line shared by ``memlm train`` and ``memlm continual``: ``--config FILE [key=value ...]
[--resume]``, and configuration or checkpoint problems reported in one line with exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from accelerate import PartialState

from memlm.train.checkpoint import CheckpointError
from memlm.train.config import ConfigError


def config_and_overrides(prog: str, doc: str | None, config_help: str, example: str,
                         argv: list[str] | None) -> tuple[str | None, list[str]]:
    """The config file and the overrides (``--resume`` as ``checkpoint.resume=true``)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before or after the flags
    return args.config, [*args.overrides, *(["checkpoint.resume=true"] if args.resume else [])]


def guarded(prog: str, work: Callable[[], Any]) -> tuple[bool, Any]:
    """``(True, work())``, or ``(False, None)`` after printing a configuration or checkpoint error."""
    try:
        return True, work()
    except (ConfigError, CheckpointError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return False, None


def main_of(prog: str, doc: str | None, config_help: str, example: str, argv: list[str] | None,
            start: Callable[[str | None, list[str]], tuple[Any, dict[str, Any]]],
            done: Callable[[Any, dict[str, Any]], str]) -> int:
    """A run command: parse, ``start(path, overrides) -> (cfg, results)``, and on the main process print
    ``done(cfg, results)`` for a finished run or how to resume a stopped one. Returns the exit status."""
    path, overrides = config_and_overrides(prog, doc, config_help, example, argv)
    ok, result = guarded(prog, lambda: start(path, overrides))
    if not ok:
        return 2
    cfg, results = result
    if not PartialState().is_main_process:
        return 0
    print(done(cfg, results) if results["finished"] else
          f"stopped at step {results['steps']} (training.stop_at_step); resume with --resume")
    return 0
