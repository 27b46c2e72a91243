"""Kernel-test fixtures: the device of Triton cases, and child pytest runs under the interpreter.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated (triton 3.9 ``triton.jit``), so in an
ordinary CPU session the tests using ``triton_device`` are skipped here and run in a child
process started with ``TRITON_INTERPRET=1``. Two ways to check them from the CPU session:
``interpreted_outcomes`` (one child shared by every file that uses it: one start-up cost) and
``run_interpreted`` (a child per call, selected by ``-k``). On CUDA, or in an interpreted
session, Triton cases run directly and both fixtures skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
NEEDS_CHILD = not (INTERPRETING or torch.cuda.is_available())


@pytest.fixture
def triton_device() -> str:
    """``cuda``, or ``cpu`` under the interpreter; otherwise the case belongs to the child run."""
    if torch.cuda.is_available():
        return "cuda"
    if INTERPRETING:
        return "cpu"
    pytest.skip("Triton case: runs in a TRITON_INTERPRET=1 child process (see test_triton_interpreted)")


def _pytest_child(root: Path, *args: str) -> tuple[int, str]:
    """``python -m pytest *args`` in ``root`` with TRITON_INTERPRET=1; (exit code, output)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _uses(item: pytest.Item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


@pytest.fixture(scope="session")
def _interpreted_child(request: pytest.FixtureRequest) -> tuple[dict[str, str], str]:
    """One child for the Triton cases of every file that uses ``interpreted_outcomes``."""
    items = request.session.items
    files = {item.nodeid.split("::")[0] for item in items if _uses(item, "interpreted_outcomes")}
    ids = [i.nodeid for i in items if _uses(i, "triton_device") and i.nodeid.split("::")[0] in files]
    if not ids:
        return {}, ""
    _, out = _pytest_child(Path(request.config.rootpath), *ids, "-rA")
    outcomes = {}
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR"):
            outcomes[rest.split(" - ")[0]] = word
    return {i: outcomes.get(i, "NOT RUN") for i in ids}, out


@pytest.fixture
def interpreted_outcomes(_interpreted_child):
    """``interpreted_outcomes(test_file)``: ({node id: outcome} of that file's Triton cases in the
    shared child run, its output)."""
    if not NEEDS_CHILD:
        pytest.skip("Triton cases run directly in this session (CUDA or TRITON_INTERPRET=1)")
    outcomes, out = _interpreted_child

    def of_file(test_file: str) -> tuple[dict[str, str], str]:
        name = Path(test_file).name
        return {i: o for i, o in outcomes.items() if i.split("::")[0].endswith(name)}, out

    return of_file


@pytest.fixture
def run_interpreted(request: pytest.FixtureRequest):
    """``run_interpreted(test_file, keyword)``: pytest ``-x -k keyword`` on the file in its own
    TRITON_INTERPRET=1 child; returns (exit code, output)."""
    if not NEEDS_CHILD:
        pytest.skip("Triton cases run directly in this session (CUDA or TRITON_INTERPRET=1)")
    root = Path(request.config.rootpath)
    return lambda test_file, keyword: _pytest_child(root, test_file, "-x", "-k", keyword)
