"""The stream's results: ``<run>/results.json`` (the loss matrix, the metrics of ``continual.metrics``, the
per-step curves), ``results.md`` (the matrix with perplexities, the metrics), ``loss_matrix.png`` (heatmap)
and ``task_curves.png`` (each task's held-out loss over the stream; PNGs need matplotlib)."""

from __future__ import annotations

import importlib.util
import json
import math
from typing import Any

from memlm.continual import metrics
from memlm.train.config import to_yaml


def markdown(tasks: list[str], matrix: list[list[float]], initial: list[float], summary: dict[str, Any]) -> str:
    head = "| after \\ on | " + " | ".join(tasks) + " |"
    rule = "|---|" + "---:|" * len(tasks)
    rows = ["| (start) | " + " | ".join(f"{v:.3f}" for v in initial) + " |"]
    rows += [f"| {tasks[i]} | " + " | ".join(f"{v:.3f} ({math.exp(min(v, 50)):.1f})" for v in row) + " |"
             for i, row in enumerate(matrix)]
    lines = ["Held-out loss, nats/token (perplexity), after training through each task:", "", head, rule, *rows, ""]
    lines += [f"- {key.replace('_', ' ')}: " + ("n/a" if value is None else f"{value:+.4f}")
              for key, value in summary.items()]
    return "\n".join(lines) + "\n"


def write_results(cfg: Any, tasks: list[str], task_steps: list[int], state: Any, results: dict[str, Any]
                  ) -> dict[str, Any]:
    run_dir = cfg.run_dir
    summary = metrics.summary(state.matrix, state.initial, state.curve_steps, state.curve_losses, state.finished_at)
    results = {**results, "tasks": tasks, "task_steps": task_steps, "loss_matrix": state.matrix,
               "perplexity_matrix": [[math.exp(min(v, 50.0)) for v in row] for row in state.matrix],
               "initial_losses": state.initial, **summary,
               "curves": {"steps": state.curve_steps, "losses": state.curve_losses},
               "finished_at": state.finished_at, "config": to_yaml(cfg)}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    (run_dir / "results.md").write_text(f"# {cfg.name}\n\n" + markdown(tasks, state.matrix, state.initial, summary))
    if importlib.util.find_spec("matplotlib") is not None:
        from memlm.eval.io.plots import plot_loss_matrix, plot_task_curves

        plot_loss_matrix(state.matrix, tasks, f"{cfg.name}: loss after each task", run_dir / "loss_matrix.png")
        plot_task_curves(state.curve_steps, state.curve_losses, tasks, state.finished_at,
                         f"{cfg.name}: held-out loss over the stream", run_dir / "task_curves.png")
    return results
