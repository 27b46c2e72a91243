"""``python -m memlm.continual --config configs/continual/<stream>.yaml [key=value ...] [--resume]``
(or under ``accelerate launch -m memlm.continual ...``)."""

from __future__ import annotations

import argparse
import sys

from accelerate import PartialState

from memlm.train.checkpoint import CheckpointError
from memlm.train.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memlm continual", description=__doc__)
    parser.add_argument("--config", help="YAML stream config (see configs/continual)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. replay.fraction=0 schedule.name=infinite")
    args = parser.parse_intermixed_args(argv)
    overrides = [*args.overrides, *(["checkpoint.resume=true"] if args.resume else [])]
    try:
        from memlm.continual.config import load_continual_config

        cfg = load_continual_config(args.config, overrides)
        from memlm.continual.runner import run_stream

        results = run_stream(cfg)
    except (ConfigError, CheckpointError) as err:
        print(f"memlm continual: error: {err}", file=sys.stderr)
        return 2
    if not PartialState().is_main_process:
        return 0
    if results["finished"]:
        print(f"done: {results['steps']} steps over {len(results['tasks'])} tasks; average forgetting "
              f"{results['average_forgetting']}, results in {cfg.run_dir / 'results.md'}")
    else:
        print(f"stopped at step {results['steps']} (training.stop_at_step); resume with --resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
