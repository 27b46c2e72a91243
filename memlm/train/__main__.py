"""``python -m memlm.train --config configs/runs/<run>.yaml [key=value ...] [--resume]``
(or under ``accelerate launch -m memlm.train ...``)."""

from __future__ import annotations

import sys
from typing import Any

from memlm.train.command import main_of
from memlm.train.config import load_config


def _start(path: str | None, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    cfg = load_config(path, overrides)
    from memlm.train.trainer import train

    return cfg, train(cfg)


def main(argv: list[str] | None = None) -> int:
    return main_of("memlm train", __doc__, "YAML run config (see configs/runs)",
                   "training.steps=200 model.hidden_size=128", argv, _start,
                   lambda cfg, s: f"done: {s['steps']} steps, report in {cfg.run_dir / 'report.md'}")


if __name__ == "__main__":
    sys.exit(main())
