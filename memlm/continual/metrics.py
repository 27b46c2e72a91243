"""Continual-learning metrics of a loss matrix ``L[i][j]``: held-out loss on task ``j`` after training
through task ``i`` (``T`` tasks), with ``L0[j]`` the loss before any training. Lower loss is better, so
every metric is stated so that a positive value means what its name says.

- average forgetting (Chaudhry et al. 2018, arXiv 1801.10112, eq. 3, on loss):
  ``F = 1/(T−1) Σ_{j<T−1} (L[T−1][j] − min_{i<T−1} L[i][j])``: how far each earlier task's loss rose from
  its best value before the last task;
- backward transfer (Lopez-Paz & Ranzato 2017, GEM, arXiv 1706.08840, eq. 2, loss sign flipped):
  ``BWT = 1/(T−1) Σ_{j<T−1} (L[j][j] − L[T−1][j])``: negative when later tasks raised earlier tasks' losses;
- forward transfer (ibid., eq. 3): ``FWT = 1/(T−1) Σ_{j≥1} (L0[j] − L[j−1][j])``: how much training on
  the earlier tasks lowered task ``j``'s loss before it was trained;
- final average loss ``1/T Σ_j L[T−1][j]``;
- area under the forgetting curve: at each evaluated step ``s`` the mean, over the tasks finished by ``s``, of
  ``loss_j(s) − min_{s' ≤ s} loss_j(s')`` (0 while a task is at its best), integrated over the stream by
  the trapezoid rule and divided by its length: the mean forgetting along the way, not only at the end.
"""

from __future__ import annotations

from collections.abc import Sequence


def average_forgetting(L: Sequence[Sequence[float]]) -> float | None:
    T = len(L)
    if T < 2:
        return None
    return sum(L[T - 1][j] - min(L[i][j] for i in range(T - 1)) for j in range(T - 1)) / (T - 1)


def backward_transfer(L: Sequence[Sequence[float]]) -> float | None:
    T = len(L)
    if T < 2:
        return None
    return sum(L[j][j] - L[T - 1][j] for j in range(T - 1)) / (T - 1)


def forward_transfer(L: Sequence[Sequence[float]], initial: Sequence[float]) -> float | None:
    T = len(L)
    if T < 2:
        return None
    return sum(initial[j] - L[j - 1][j] for j in range(1, T)) / (T - 1)


def final_average(L: Sequence[Sequence[float]]) -> float:
    return sum(L[-1]) / len(L[-1])


def forgetting_curve_area(steps: Sequence[int], losses: Sequence[Sequence[float]], finished_at: Sequence[int]
                          ) -> float:
    """``steps[k]``: an evaluated step; ``losses[k][j]``: task ``j``'s loss there; ``finished_at[j]``: the
    step task ``j``'s training ended (module docstring). 0 for fewer than two evaluations."""
    if len(steps) < 2:
        return 0.0
    best = [float("inf")] * len(finished_at)
    curve = []
    for s, row in zip(steps, losses, strict=True):
        best = [min(b, x) for b, x in zip(best, row, strict=True)]
        done = [j for j, end in enumerate(finished_at) if end <= s]
        curve.append(sum(row[j] - best[j] for j in done) / len(done) if done else 0.0)
    area = sum((steps[k + 1] - steps[k]) * (curve[k] + curve[k + 1]) / 2 for k in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def summary(L: Sequence[Sequence[float]], initial: Sequence[float], steps: Sequence[int],
            losses: Sequence[Sequence[float]], finished_at: Sequence[int]) -> dict[str, float | None]:
    return {"average_forgetting": average_forgetting(L), "backward_transfer": backward_transfer(L),
            "forward_transfer": forward_transfer(L, initial), "final_average_loss": final_average(L),
            "forgetting_area": forgetting_curve_area(steps, losses, finished_at)}
