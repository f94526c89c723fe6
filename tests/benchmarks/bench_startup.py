"""Issue 7's start-up figure: ``devserver-reaper --help`` (goal <= 0.5 s, median of 10), and
the modules ``python -X importtime`` blames, to know what to import lazily.

    uv run pytest -m benchmark tests/benchmarks/bench_startup.py -s -p no:randomly
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.benchmarks.harness import machine, median, record

pytestmark = pytest.mark.benchmark

RUNS = 10


def _console_script() -> list[str]:
    script = shutil.which("devserver-reaper", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "worker"]


def _wall(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def heaviest_imports(args: list[str], top: int = 12) -> list[tuple[str, float]]:
    """(module, cumulative seconds) of the slowest top-level imports under ``-X importtime``."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    rows: list[tuple[str, float]] = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or "cumulative" in line:
            continue
        name = parts[2].rstrip()
        if len(name) - len(name.lstrip()) <= 3:  # nested imports are indented further
            rows.append((name.strip(), int(parts[1]) / 1e6))
    rows.sort(key=lambda row: row[1], reverse=True)
    return rows[:top]


def test_help_starts_quickly() -> None:
    command = [*_console_script(), "--help"]
    _wall(command)  # warm the file cache and the bytecode
    times = [_wall(command) for _ in range(RUNS)]
    run_help = [_wall([*_console_script(), "run", "--help"]) for _ in range(RUNS)]
    python_only = [_wall([sys.executable, "-c", "pass"]) for _ in range(RUNS)]
    imports = heaviest_imports(["-m", "worker", "--help"])
    record(
        "startup",
        help_median_s=round(median(times), 3),
        run_help_median_s=round(median(run_help), 3),
        bare_python_median_s=round(median(python_only), 3),
        heaviest_imports=[(name, round(seconds, 3)) for name, seconds in imports],
        machine=machine(),
    )
    assert median(times) <= 0.5
