"""The prepared GPU check's CPU dry run (``benchmarks/gpu_suite.sh --dry-run``): every step imports and runs
its smallest shape on the CPU (Triton in the interpreter), so the suite cannot rot between lent GPUs
(about a minute on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    log = (tmp_path / "gpu_suite.log").read_text() if (tmp_path / "gpu_suite.log").exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + log[-4000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["dry_run"] and [s["step"] for s in report["steps"]] == ["env", "gpu-tests", "kernels", "models",
                                                                           "decode"]
    assert all(s["status"] == "ok" for s in report["steps"])
    steps = {s["step"]: s for s in report["steps"]}
    kernels = {r["op"]: r for r in steps["kernels"]["output"]["rows"]}
    assert all(kernels[op]["fwd_bwd_ms"] > 0 for op in ("deep memory L=1", "deep memory L=2 (exp. 4)",
                                                        "GDN chunk_gated_delta_rule", "attention (SDPA flash)"))
    models = {r["model"]: r for r in steps["models"]["output"]["rows"]}
    assert set(models) == {"attention", "fla_gated_deltanet", "titans_memory"}
    assert all(r["tokens_per_s"] > 0 for r in models.values()), models
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert "## kernels" in markdown and "## models" in markdown and "| titans_memory |" in markdown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_suite.json", "gpu_suite.log", "gpu_suite.md"]
