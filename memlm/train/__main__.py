"""``python -m memlm.train --config configs/runs/<run>.yaml [key=value ...] [--resume]``
(or under ``accelerate launch -m memlm.train ...``)."""

from __future__ import annotations

import argparse
import sys

from accelerate import PartialState

from memlm.train.checkpoint import CheckpointError
from memlm.train.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memlm train", description=__doc__)
    parser.add_argument("--config", help="YAML run config (see configs/runs)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.steps=200 model.hidden_size=128")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before or after the flags
    overrides = [*args.overrides, *(["checkpoint.resume=true"] if args.resume else [])]
    try:
        cfg = load_config(args.config, overrides)
        from memlm.train.trainer import train

        summary = train(cfg)
    except (ConfigError, CheckpointError) as err:
        print(f"memlm train: error: {err}", file=sys.stderr)
        return 2
    if not PartialState().is_main_process:
        return 0
    if summary["finished"]:
        print(f"done: {summary['steps']} steps, report in {cfg.run_dir / 'report.md'}")
    else:
        print(f"stopped at step {summary['steps']} (training.stop_at_step); resume with --resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
