"""``memlm <command> ...``: one entry point for training, probes and evaluation."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("memlm.train.__main__", "pretrain a model (see configs/runs)"),
    "continual": ("memlm.continual.__main__", "continual pretraining over a stream of tasks (configs/continual)"),
    "probe": ("memlm.eval.cli", "recall probes: mqar, niah, passkey, perplexity"),
    "eval-harness": ("memlm.eval.harness", "lm-evaluation-harness tasks on a checkpoint"),
    "convert": ("memlm.models.convert.cli", "write a checkpoint (fla, m-a-p, Hub id) in memlm's format"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<14}{help_}" for name, (_, help_) in COMMANDS.items())
        usage = f"usage: memlm <command> [args]\n\ncommands:\n{lines}"
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            return 0
        problem = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(f"{usage}\n\nmemlm: error: {problem} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
