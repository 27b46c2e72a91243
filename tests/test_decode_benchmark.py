"""``benchmarks/decode.py --quick``: every model decodes in its child process, the Llama twin agrees with memlm's
attention on the same weights (the child exits otherwise), and the table has a positive speed and a memory
figure for every model and context (slow: about a minute and a half on 2 cores); ``benchmarks/padded_generate.py
--quick``: a padded batch against its prompts alone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_decode_benchmark_quick_run() -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("decode_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [line.split("|")[1:-1] for line in bench.main(["--quick"]).splitlines() if line.startswith("| ")][1:]
    assert [r[0].strip() for r in rows] == list(bench.MODELS)
    for row in rows:
        speeds, memory = row[1:3], row[3:5]
        assert all(float(s.split()[0]) > 0 for s in speeds) and all(float(m) > -50 for m in memory)


@pytest.mark.slow
def test_padded_generate_benchmark_quick_run() -> None:
    """``benchmarks/padded_generate.py --quick`` (slow: about 25 s on 2 cores): the padded batch generates what
    each prompt does alone (the script exits otherwise) and every model decodes its rows stacked."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "padded_generate.py"
    spec = importlib.util.spec_from_file_location("padded_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {r[0].strip(): r for r in (line.split("|")[1:-1] for line in bench.main(["--quick"]).splitlines()
                                      if line.startswith("| ") and not line.startswith("| model"))}
    assert set(rows) == set(bench.MODELS)
    assert all(r[-1].strip() == "stacked" for r in rows.values())
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows.values())
