"""``make test-compat``: memlm against the lowest and the newest releases that pyproject allows of
transformers, accelerate and datasets.

For each set, a throwaway venv (``.venv-compat-<set>``) gets the lock's pins (torch's CPU build
included), then the three packages at their pyproject lower bounds, or upgraded to the newest
release within their ranges, with whatever their own dependencies need; then memlm itself, and
the model-contract, generation, loading and training tests run in it. Prints the versions of each
set and exits non-zero if a set fails to install or a test fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("transformers", "accelerate", "datasets")
REPORTED = (*PACKAGES, "torch", "huggingface-hub", "tokenizers", "safetensors", "flash-linear-attention")
TESTS = ["tests/test_model_contract.py", "tests/test_generation.py", "tests/test_convert.py",
         "tests/test_train.py", "tests/test_eval/test_loading.py"]


def ranges() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = {r.name: r for r in map(Requirement, deps)}
    return {name: reqs[name] for name in PACKAGES}


def lower_bound(req: Requirement) -> str:
    bounds = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
    if len(bounds) != 1:
        raise SystemExit(f"pyproject: {req} needs exactly one lower bound (>=) for test-compat")
    return f"{req.name}=={bounds[0]}"


def run(*cmd: str | Path) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def build(name: str, requirements: list[str]) -> Path:
    venv = ROOT / f".venv-compat-{name}"
    py = venv / "bin" / "python"
    if not py.exists():
        run(sys.executable, "-m", "venv", venv)
    run(py, "-m", "pip", "install", "-q", "--require-hashes", "--no-deps", "-r", ROOT / ".venv" / "requirements.txt")
    # torch stays the lock's CPU build; the three packages move, and their own dependencies with them
    torch_pin = venv / "torch-pin.txt"
    torch_pin.write_text(subprocess.check_output([py, "-c", "import torch; print('torch==' + torch.__version__)"],
                                                 text=True))
    run(py, "-m", "pip", "install", "-q", "--upgrade", "-c", torch_pin, *requirements)
    run(py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", ".")
    run(py, "-m", "pip", "check")
    return py


def versions(py: Path) -> str:
    code = ("import importlib.metadata as m, sys; "
            "print(', '.join(f'{n} {m.version(n)}' for n in sys.argv[1:]))")
    return subprocess.check_output([py, "-c", code, *REPORTED], text=True).strip()


def main() -> int:
    reqs = ranges()
    sets = {"lowest": [lower_bound(r) for r in reqs.values()], "newest": [str(r) for r in reqs.values()]}
    results = {}
    for name, requirements in sets.items():
        print(f"\n=== {name}: {' '.join(requirements)}", flush=True)
        try:
            py = build(name, requirements)
        except subprocess.CalledProcessError as err:
            results[name] = (f"install failed: {err}", "")
            continue
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        proc = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
        summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        results[name] = (("passed: " if proc.returncode == 0 else "FAILED: ") + summary, versions(py))
    print("\n=== test-compat")
    for name, (outcome, found) in results.items():
        print(f"{name}: {outcome}\n    {found}")
    return 0 if all(o.startswith("passed") for o, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
