"""PNG figures of probe records (matplotlib, headless ``Agg`` backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

_MARKERS = "osD^v<>pP*Xhd"  # with the 10-colour cycle, up to 130 distinguishable series


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_length_depth(accuracy: Sequence[Sequence[float]], lengths: Sequence[int], depths: Sequence[float],
                      title: str, path: str | Path) -> Path:
    """Heatmap of accuracy by context length (rows) × needle depth (columns), values annotated."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(depths), 1.2 + 0.6 * len(lengths)))
    im = ax.imshow(accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    for i, row in enumerate(accuracy):
        for j, v in enumerate(row):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_accuracy_vs_state(points: Sequence[dict[str, Any]], settings: Sequence[str], path: str | Path,
                           title: str = "MQAR") -> Path:
    """Accuracy against recurrent state size (log x), one panel per test setting and one line per
    mixer (the Zoology / Based figure). Each point: ``label``, ``state_size`` and ``accuracy``
    dicts keyed by setting."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(settings), figsize=(3.6 * len(settings), 3.2), squeeze=False)
    labels = sorted({p["label"] for p in points})
    for ax, setting in zip(axes[0], settings):
        for i, label in enumerate(labels):
            pts = sorted((p["state_size"][setting], p["accuracy"][setting])
                         for p in points if p["label"] == label)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=_MARKERS[i % len(_MARKERS)], label=label)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("recurrent state size (elements)")
        ax.set_title(setting, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_loss_by_context(buckets: Sequence[dict[str, float]], title: str, path: str | Path) -> Path:
    """Mean token loss against the number of context tokens the prediction saw."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([(b["start"] + b["end"]) / 2 for b in buckets], [b["nll"] for b in buckets], marker=".")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_loss_curves(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], title: str,
                     path: str | Path) -> Path:
    """Training and validation loss (nats / token) against tokens seen; each series is
    ``(tokens_seen, loss)`` pairs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot([t for t, _ in train], [v for _, v in train], label="train", linewidth=1)
    if val:
        ax.plot([t for t, _ in val], [v for _, v in val], label="validation", marker="o")
    return _save_lines(fig, ax, "tokens seen", "loss (nats / token)", title, path)


def plot_loss_matrix(matrix: Sequence[Sequence[float]], tasks: Sequence[str], title: str, path: str | Path) -> Path:
    """Heatmap of held-out loss after training through task ``i`` (rows) on task ``j`` (columns), annotated."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(tasks), 1.2 + 0.7 * len(matrix)))
    im = ax.imshow(matrix, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(tasks)), list(tasks))
    ax.set_yticks(range(len(matrix)), [f"after {t}" for t in tasks[:len(matrix)]])
    ax.set_xlabel("evaluated on")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="w")
    fig.colorbar(im, ax=ax, label="loss (nats / token)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_task_curves(steps: Sequence[int], losses: Sequence[Sequence[float]], tasks: Sequence[str],
                     boundaries: Sequence[int], title: str, path: str | Path) -> Path:
    """Each task's held-out loss against the stream's steps, task boundaries as vertical lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for j, name in enumerate(tasks):
        ax.plot(steps, [row[j] for row in losses], marker=_MARKERS[j % len(_MARKERS)], markersize=3, label=name)
    for b in boundaries[:-1]:
        ax.axvline(b, color="grey", linewidth=0.8, linestyle="--")
    return _save_lines(fig, ax, "optimizer step", "held-out loss (nats / token)", title, path)


def _save_lines(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: str | Path) -> Path:
    """Labels, grid, legend and title of a line plot, then :func:`_save`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    _pyplot().close(fig)
    return p
