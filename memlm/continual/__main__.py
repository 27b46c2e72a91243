"""``python -m memlm.continual --config configs/continual/<stream>.yaml [key=value ...] [--resume]``
(or under ``accelerate launch -m memlm.continual ...``)."""

from __future__ import annotations

import sys
from typing import Any

from memlm.train.command import main_of


def _start(path: str | None, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    from memlm.continual.config import load_continual_config
    from memlm.continual.runner import run_stream

    cfg = load_continual_config(path, overrides)
    return cfg, run_stream(cfg)


def main(argv: list[str] | None = None) -> int:
    return main_of("memlm continual", __doc__, "YAML stream config (see configs/continual)",
                   "replay.fraction=0 schedule.name=infinite", argv, _start,
                   lambda cfg, r: f"done: {r['steps']} steps over {len(r['tasks'])} tasks; average forgetting "
                                  f"{r['average_forgetting']:+.4f}, results in {cfg.run_dir / 'results.md'}")


if __name__ == "__main__":
    sys.exit(main())
