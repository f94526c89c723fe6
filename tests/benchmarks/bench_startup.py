"""Start-up: each command's wall time and CPU from exec to exit (issue 7's goal: ``--help``
in <= 0.5 s, median of 10), and the modules ``python -X importtime`` blames, to know what to
import lazily. The commands import from compiled bytecode, as the image's do
(``UV_COMPILE_BYTECODE``; here the suite's cache, ``tests/conftest.py``, warmed by one run of
each before anything is timed); the runs of the commands are interleaved.

    uv run pytest -m benchmark tests/benchmarks/bench_startup.py -s -p no:randomly

``BENCH_STARTUP_TREE=DIR`` times the ``worker`` package found in DIR instead of this one
(``git archive main | tar -x -C DIR``: the same commands on another version of the code);
``BENCH_STARTUP_BEFORE=DIR`` times DIR's beside it, each command's runs on the two
interleaved (the same minutes, the same load). ``BENCH_STARTUP_RUNS``: runs of each command
(default 10).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from tests.benchmarks.harness import AK, PROJECT, SK, machine, median, record, simulator
from tests.conftest import REDIS_URL
from tests.test_plan import write as write_plan
from tests.test_report import fill

pytestmark = pytest.mark.benchmark

RUNS = int(os.environ.get("BENCH_STARTUP_RUNS", "10"))
TREE = os.environ.get("BENCH_STARTUP_TREE")
BEFORE = os.environ.get("BENCH_STARTUP_BEFORE")


def _console_script() -> list[str]:
    script = shutil.which("devserver-reaper", path=os.path.dirname(sys.executable))
    return [script] if script and not TREE else [sys.executable, "-m", "worker"]


def _child(
    args: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = TREE
) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + system) of the child ``args`` run in ``cwd`` (whose
    ``worker`` it imports), which must exit as it is meant to: 0, or 64 for a bad flag.
    ``simulate`` runs until it listens, then is stopped (SIGTERM)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    if "simulate" in args:
        served = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  env=env, cwd=cwd, text=True)  # fmt: skip
        assert served.stdout is not None
        assert "listening on" in served.stdout.readline()
        served.send_signal(signal.SIGTERM)
        served.communicate(timeout=60)
    else:
        done = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env, cwd=cwd, check=False)  # fmt: skip
        assert done.returncode == (64 if "--inptu" in args else 0), (args, done.returncode)
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


@contextmanager
def _deleted_after(key: str) -> Iterator[None]:
    """The block, then ``key`` deleted from the Redis at ``REDIS_URL``, however it ended."""
    try:
        yield
    finally:
        with redis.Redis.from_url(REDIS_URL) as client:
            client.delete(key)


@pytest.mark.timeout(3600)  # 20 runs of 14 commands on two trees, under load
def test_each_command_from_exec_to_exit(tmp_path: Path) -> None:
    """Wall and CPU of each command doing a small job to its end: help, a mistyped flag, the
    completion script, a dry run of one id, a real run of 5 ids, ``check`` and ``discover``
    against the simulator (its own process: its CPU is not the command's), ``plan show``,
    ``report``, ``enqueue`` of one id (with a Redis at REDIS_URL), and ``simulate`` from exec
    to listening."""
    stream = f"bench-startup:{os.getpid()}:ids"
    with simulator(tmp_path, jobs=20) as sim, _deleted_after(stream):
        ids = tmp_path / "ids.txt"
        ids.write_text("\n".join(sim.ids[:5]) + "\n")
        one = tmp_path / "one.txt"
        one.write_text(sim.ids[5] + "\n")
        plan, ledger = tmp_path / "plan", tmp_path / "ledger.sqlite"
        write_plan(plan, 3, now=datetime.now(UTC))
        fill(ledger).close()
        env = {key: value for key, value in os.environ.items() if not key.startswith("REAPER_")}
        env |= {"REAPER_ENDPOINT": sim.url, "REAPER_PROJECT_ID": PROJECT, "REAPER_AK": AK,
                "REAPER_SK": SK, "REAPER_LOG_FORMAT": "json"}  # fmt: skip
        worker = [sys.executable, "-m", "worker"]
        events = ["--events", str(tmp_path / "events.jsonl")]
        commands: dict[str, list[str]] = {
            "bare python": [sys.executable, "-c", "pass"],
            "--help": [*worker, "--help"],
            "run --help": [*worker, "run", "--help"],
            "serve --help": [*worker, "serve", "--help"],
            "run --inptu (a mistyped flag)": [*worker, "run", "--inptu", "ids.txt"],
            "completion bash": [*worker, "completion", "bash"],
            "run --dry-run (1 id)": [*worker, "run", "--dry-run", "--input", str(one), *events],
            "run (5 ids)": [*worker, "run", "--yes", "--input", str(ids), *events],
            "check": [*worker, "check"],
            "discover (20 jobs)": [*worker, "discover", "--all", "-o", "ids"],
            "plan show": [*worker, "plan", "show", str(plan)],
            "report": [*worker, "report", str(ledger)],
            "enqueue (1 id)": [*worker, "enqueue", "--input", str(one), "--redis-url",
                               REDIS_URL, "--stream", stream],
            "simulate (to listening)": [*worker, "simulate", "--port", "0", "--jobs", "1000"],
        }  # fmt: skip
        trees = {"this": TREE} | ({"before": BEFORE} if BEFORE else {})
        for args in commands.values():  # warm the file cache and the bytecode
            for tree in trees.values():
                _child(args, env, tree)
        walls: dict[tuple[str, str], list[float]] = {(n, t): [] for n in commands for t in trees}
        cpus: dict[tuple[str, str], list[float]] = {key: [] for key in walls}
        for _ in range(RUNS):
            for name, args in commands.items():
                for t, tree in trees.items():
                    wall, cpu = _child(args, env, tree)
                    walls[name, t].append(wall)
                    cpus[name, t].append(cpu)
        imports = heaviest_imports(commands["run (5 ids)"][1:], env=env)
    record(
        "startup_commands",
        tree=TREE or "this one",
        before=BEFORE,
        runs=RUNS,
        wall_median_s={f"{n} [{t}]": round(median(v), 3) for (n, t), v in walls.items()},
        cpu_median_s={f"{n} [{t}]": round(median(v), 3) for (n, t), v in cpus.items()},
        run_heaviest_imports=[(name, round(seconds, 3)) for name, seconds in imports],
        load_average=os.getloadavg(),
        machine=machine(),
    )
