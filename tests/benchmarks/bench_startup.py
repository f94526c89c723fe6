"""Start-up: each command's wall time and CPU from exec to exit (issue 7's goal: ``--help``
in <= 0.5 s, median of 10), and the modules ``python -X importtime`` blames, to know what to
import lazily. The commands import from compiled bytecode, as the image's do
(``UV_COMPILE_BYTECODE``; here the suite's cache, ``tests/conftest.py``, warmed by one run of
each before anything is timed); the runs of the commands are interleaved.

    uv run pytest -m benchmark tests/benchmarks/bench_startup.py -s -p no:randomly

``BENCH_STARTUP_TREE=DIR`` times the ``worker`` package found in DIR instead of this one
(``git archive main | tar -x -C DIR``: the same commands on another version of the code).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.benchmarks.harness import AK, PROJECT, SK, machine, median, record, simulator

pytestmark = pytest.mark.benchmark

RUNS = 10
TREE = os.environ.get("BENCH_STARTUP_TREE")


def _console_script() -> list[str]:
    script = shutil.which("devserver-reaper", path=os.path.dirname(sys.executable))
    return [script] if script and not TREE else [sys.executable, "-m", "worker"]


def _child(args: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + system) of the child ``args``, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   env=env, cwd=TREE)  # fmt: skip
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _wall(args: list[str]) -> float:
    return _child(args)[0]


def heaviest_imports(
    args: list[str], top: int = 12, env: dict[str, str] | None = None
) -> list[tuple[str, float]]:
    """(module, cumulative seconds) of the slowest top-level imports under ``-X importtime``."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=TREE,
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


@pytest.mark.timeout(1200)  # 80 children, each a second or more on a loaded host
def test_each_command_from_exec_to_exit(tmp_path: Path) -> None:
    """Wall and CPU of each command doing a small job to its end: help, the completion
    script, a dry run of one id, a real run of 5 ids and ``check`` against the simulator
    (its own process: its CPU is not the command's)."""
    with simulator(tmp_path, jobs=20) as sim:
        ids = tmp_path / "ids.txt"
        ids.write_text("\n".join(sim.ids[:5]) + "\n")
        env = {key: value for key, value in os.environ.items() if not key.startswith("REAPER_")}
        env |= {"REAPER_ENDPOINT": sim.url, "REAPER_PROJECT_ID": PROJECT, "REAPER_AK": AK,
                "REAPER_SK": SK, "REAPER_LOG_FORMAT": "json"}  # fmt: skip
        worker = [sys.executable, "-m", "worker"]
        events = ["--events", str(tmp_path / "events.jsonl")]
        commands: dict[str, list[str]] = {
            "bare python": [sys.executable, "-c", "pass"],
            "--help": [*worker, "--help"],
            "run --help": [*worker, "run", "--help"],
            "completion bash": [*worker, "completion", "bash"],
            "run --dry-run (1 id)": [*worker, "run", "--dry-run", "--input", str(ids), *events],
            "run (5 ids)": [*worker, "run", "--yes", "--input", str(ids), *events],
            "check": [*worker, "check"],
        }
        for args in commands.values():  # warm the file cache and the bytecode
            _child(args, env)
        walls: dict[str, list[float]] = {name: [] for name in commands}
        cpus: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(RUNS):
            for name, args in commands.items():
                wall, cpu = _child(args, env)
                walls[name].append(wall)
                cpus[name].append(cpu)
        imports = heaviest_imports(commands["run (5 ids)"][1:], env=env)
    record(
        "startup_commands",
        tree=TREE or "this one",
        wall_median_s={name: round(median(times), 3) for name, times in walls.items()},
        cpu_median_s={name: round(median(times), 3) for name, times in cpus.items()},
        run_heaviest_imports=[(name, round(seconds, 3)) for name, seconds in imports],
        load_average=os.getloadavg(),
        machine=machine(),
    )
