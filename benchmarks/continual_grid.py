"""The offline continual stream (``configs/continual/offline.yaml``) for several models × replay × schedule,
one ``memlm continual`` process per run (one thread each, ``--jobs`` at a time), and the table of their
results: the loss matrix's diagonal and last row, average forgetting, backward and forward transfer, the
area under the forgetting curve.

Usage: ``python benchmarks/continual_grid.py --out runs/continual-grid`` (``--quick``: the smoke stream,
two models, seconds; ``--models``, ``--replay 0 0.05``, ``--schedules cosine infinite``, ``--set key=value``).
A run whose ``results.json`` exists is read, not run again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("attention_tiny", "mamba2_tiny", "attention_moe_tiny", "titans_memory_tiny")


def run(config: Path, out: Path, model: str, replay: float, schedule: str, extra: list[str]) -> dict:
    name = f"{model}-replay{replay:g}-{schedule}"
    results = out / name / "results.json"
    if not results.exists():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "memlm.continual", "--config", str(config), f"name={name}", f"output_dir={out}",
               f"model.preset={model}", f"replay.fraction={replay}", f"schedule.name={schedule}",
               "logging.progress_bar=false", *extra]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    return {"model": model, "replay": replay, "schedule": schedule, **json.loads(results.read_text())}


def table(rows: list[dict]) -> str:
    tasks = rows[0]["tasks"]
    head = ("| model | params | replay | schedule | " + " | ".join(f"{t} (own)" for t in tasks) + " | "
            + " | ".join(f"{t} (end)" for t in tasks) + " | final avg | forgetting | BWT | FWT | area | min |")
    lines = [head, "|" + "---|" * (4 + 2 * len(tasks) + 6)]
    for r in rows:
        L = r["loss_matrix"]
        own = " | ".join(f"{L[j][j]:.3f}" for j in range(len(tasks)))
        end = " | ".join(f"{v:.3f}" for v in L[-1])
        lines.append(f"| {r['model']} | {r['num_params'] / 1e6:.2f}M | {100 * r['replay']:g}% | {r['schedule']} | "
                     f"{own} | {end} | {r['final_average_loss']:.3f} | {r['average_forgetting']:+.3f} | "
                     f"{r['backward_transfer']:+.3f} | {r['forward_transfer']:+.3f} | {r['forgetting_area']:.3f} | "
                     f"{r['wall_time_s'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "continual" / "offline.yaml")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--replay", type=float, nargs="+", default=[0.0, 0.05])
    p.add_argument("--schedules", nargs="+", default=["cosine", "infinite"])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="the smoke stream, attention and Mamba2, cosine")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (repeatable), e.g. --set optimizer.lr=1e-3")
    a = p.parse_args(argv)
    if a.quick:
        a.config, a.models, a.schedules = ROOT / "configs" / "continual" / "smoke.yaml", MODELS[:2], ["cosine"]
    grid = list(itertools.product(a.models, a.replay, a.schedules))
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda g: run(a.config, a.out, *g, a.overrides), grid))
    text = table(rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
