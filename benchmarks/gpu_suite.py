"""The prepared GPU check (run it through ``benchmarks/gpu_suite.sh``): every step in its own process with its
own time box, a failed or timed-out step recorded and the next one run, one report at the end.

Steps on a GPU (boxes sum to 7.5 minutes; the report is written whatever happens):
1. ``env``: GPU, driver, versions of torch, triton, transformers, fla (20 s);
2. ``gpu-tests``: ``pytest -m gpu`` — Triton against the naive references in float32 and bf16, fla
   equivalence, ``generate()`` on CUDA (120 s);
3. ``kernels``: ``benchmarks/kernel_bench.py --gpu-only`` — deep memory L=1, L=2 (expansion 4) forward and
   forward+backward against fla's ``chunk_gated_delta_rule`` and SDPA flash attention at B=8, H=16, D=64,
   T ∈ {2048, 4096, 8192}, bf16, TFLOP/s and HBM fraction, and titans-pytorch's ``NeuralMemory`` (120 s);
4. ``models``: ``benchmarks/train_throughput.py`` — training tokens/s, peak memory and MFU at 340M, T=4096,
   bf16: Transformer++, our GDN, fla's ``GatedDeltaNetForCausalLM``, Titans LMM/MAC/MAG/MAL, Moneta (150 s);
5. ``decode``: ``benchmarks/decode.py --device cuda`` — tokens/s against context for attention, GDN and the
   Titans LMM (60 s).

``--dry-run`` (CI, no GPU): every step at its smallest on the CPU — the GPU tests collected, the kernel and
model tables at tiny shapes with Triton (memlm's and fla's kernels) in the interpreter, decoding at one short
context. Output in ``--out``: ``gpu_suite.json`` (each step's status, seconds and rows), ``gpu_suite.md`` (the
tables) and ``gpu_suite.log`` (every step's output).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def steps(out: Path, dry: bool) -> list[tuple[str, int, list[str], Path | None]]:
    """(name, time box in seconds, command, the JSON the command writes or None)."""
    env_probe = ("import json, platform, torch, triton, transformers; "
                 "fla = __import__('importlib').util.find_spec('fla'); "
                 "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
                 "'cuda': torch.version.cuda, 'triton': triton.__version__, 'transformers': transformers.__version__, "
                 "'fla': __import__('fla').__version__ if fla else None, "
                 "'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))")
    kernels, models, decode = out / "kernels.json", out / "models.json", out / "decode.json"
    if dry:
        return [
            ("env", 60, [PY, "-c", env_probe], None),
            ("gpu-tests", 120, [PY, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider"],
             None),
            ("kernels", 180, [PY, "benchmarks/kernel_bench.py", "--dry-run", "--json", str(kernels)], kernels),
            ("models", 180, [PY, "benchmarks/train_throughput.py", "--dry-run", "--models", "attention",
                             "fla_gated_deltanet", "titans_memory", "--json", str(models)], models),
            ("decode", 120, [PY, "benchmarks/decode.py", "--device", "cpu", "--models", "attention", "titans_memory",
                             "--contexts", "16", "--steps", "2", "--repeats", "1", "--json", str(decode)], decode),
        ]
    return [
        ("env", 20, [PY, "-c", env_probe], None),
        ("gpu-tests", 120, [PY, "-m", "pytest", "-m", "gpu", "-q", "-rf", "-p", "no:cacheprovider"], None),
        ("kernels", 120, [PY, "benchmarks/kernel_bench.py", "--gpu-only", "--json", str(kernels)], kernels),
        ("models", 150, [PY, "benchmarks/train_throughput.py", "--json", str(models)], models),
        ("decode", 60, [PY, "benchmarks/decode.py", "--device", "cuda", "--models", "attention", "gated_deltanet",
                        "titans_memory", "--contexts", "1024", "4096", "16384", "--steps", "32", "--repeats", "1",
                        "--json", str(decode)], decode),
    ]


def run_step(name: str, box: int, cmd: list[str], env: dict[str, str], log: Path) -> dict:
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n===== {name} (box {box} s): {' '.join(cmd)}\n")
        f.flush()
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=box)
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {box} s"
    return {"step": name, "status": status, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="every step at its smallest on the CPU")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    log = a.out / "gpu_suite.log"
    log.write_text(f"memlm GPU suite, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if a.dry_run:
        env["TRITON_INTERPRET"] = "1"
    results = []
    for name, box, cmd, produced in steps(a.out, a.dry_run):
        result = run_step(name, box, cmd, env, log)
        if produced is not None and produced.exists():
            result["output"] = json.loads(produced.read_text())
            produced.unlink()  # folded into gpu_suite.json (the device returns at most 8 files)
        results.append(result)
        print(f"{name}: {result['status']} in {result['seconds']} s", flush=True)
    report = {"dry_run": a.dry_run, "steps": results}
    (a.out / "gpu_suite.json").write_text(json.dumps(report, indent=2))
    lines = ["# memlm GPU suite" + (" (CPU dry run)" if a.dry_run else ""), "",
             "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} |" for r in results]
    for r in results:
        if (r.get("output") or {}).get("table"):
            lines += ["", f"## {r['step']}", "", r["output"]["table"]]
    (a.out / "gpu_suite.md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
