"""A fleet on ``--rate auto`` against a count over a long window, over real HTTP: three
``serve`` replicas (and one ``run``) against the simulator counting 30 calls/s over fixed
10 s windows (``simulate --quota 30 --window 10``), its 429s pointing ``Retry-After`` to
the window's end.

    uv run pytest -m benchmark tests/benchmarks/bench_fleet_window_http.py -s -p no:randomly

The real path, as ``bench_fleet.py``'s: a ``redis-server`` of its own, the simulator in
this process, the real ``enqueue`` command, three ``serve`` processes in one group (8 on
the wire each, one id per call); for ``run``, one process reading the ids from a file.
Measured at the simulator (``/_sim/arrivals``, its own clock, which its windows count on):
from the start of the window after the one the first refusal fell in to the end of the last
whole window by ``UNTIL`` s after the first call, the share of the quota accepted and the
share of calls refused; and per window. The goal, as on virtual time
(``bench_fleet_window.py``): at least 0.90 used, at most 2 % refused. Real-HTTP figures
move with the host's load: the load is printed. Figures, not asserted goals: a run that
misses them still passes, its row saying ``met: false``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.benchmarks.bench_serve_soak import redis_url  # noqa: F401  (the fixture)
from tests.benchmarks.harness import clean_env, enqueue, machine, record, stop_replicas
from worker.simulator import Simulator, SimulatorConfig, run_simulator
from worker.simulator.quota import WindowCount

pytestmark = pytest.mark.benchmark

QUOTA = float(os.environ.get("FLEET_WINDOW_QUOTA", "30"))
SPAN = 10.0
UNTIL = float(os.environ.get("FLEET_WINDOW_UNTIL", "70"))
REPLICAS = 3
GOAL_USED, GOAL_REFUSED = 0.90, 0.02


def _figures(checked: list[tuple[float, bool]], start: float) -> dict[str, Any]:
    """From the window after the first refusal's to the end of the last whole window by
    ``UNTIL`` s after the first call: the share of the quota used and the share refused,
    over the whole and per window (``start``: the first window's start, on the simulator's
    clock). Whole windows only: a tail of a window holds up to its whole count (a client
    that spends each count at once read 1.13 of the quota used)."""
    first_call = checked[0][0]
    refused_at = next((t for t, ok in checked if not ok), first_call)
    second = start + (math.floor((refused_at - start) / SPAN) + 1) * SPAN
    end = second + math.floor((first_call + UNTIL - second) / SPAN) * SPAN
    seen = [ok for t, ok in checked if second <= t < end]
    windows = []
    at = second
    while at + SPAN <= end:
        inside = [ok for t, ok in checked if at <= t < at + SPAN]
        windows.append((inside.count(True), inside.count(False)))
        at += SPAN
    return {
        "from": round(second - first_call, 2),
        "used": round(seen.count(True) / ((end - second) * QUOTA), 3),
        "refused": round(seen.count(False) / max(1, len(seen)), 4),
        "windows": windows,  # (accepted, refused) per whole window from the second
    }


async def _watch(sim: Simulator, procs: list[subprocess.Popen[bytes]]) -> list[tuple[float, bool]]:
    """The calls the gateway checked (when, accepted) from the first to ``UNTIL`` s after it."""
    checked: list[tuple[float, bool]] = []
    while sim.stats.calls == 0:
        assert all(p.poll() is None for p in procs), "a process died before its first call"
        await anyio.sleep(0.05)
    began = anyio.current_time()
    while anyio.current_time() - began < UNTIL + 0.5:
        checked += [(c, ok) for _, c, ok in sim.take_arrivals()]
        await anyio.sleep(0.5)
    checked += [(c, ok) for _, c, ok in sim.take_arrivals()]
    return checked


async def _against_the_window(url: str, tmp_path: Path, command: str) -> dict[str, Any]:
    config = SimulatorConfig(jobs=0, quota=QUOTA, window_s=SPAN, window_kind="fixed")
    procs: list[subprocess.Popen[bytes]] = []
    async with run_simulator(config) as sim:
        ids = sim.add_jobs(int(QUOTA * UNTIL * 1.5) + 100)
        gate = sim.bucket
        assert isinstance(gate, WindowCount)
        common = [
            "--endpoint", sim.url, "--project-id", sim.config.project_id, "--ak", sim.config.ak,
            "--log-format", "json", "--rate", "auto", "--burst", "1", "--batch-size", "1",
            "--concurrency", "8",
        ]  # fmt: skip
        env = clean_env() | {"REAPER_SK": sim.config.sk}
        try:
            if command == "serve":
                stream = f"fleet-window:{os.getpid()}:ids"
                await enqueue(tmp_path / "ids.txt", ids, stream=stream, redis_url=url)
                for n in range(REPLICAS):
                    args = [sys.executable, "-m", "worker", "serve", "--consumer", f"r{n}",
                            "--stream", stream, "--group", "fleet", "--redis-url", url,
                            "--http-port", "0", *common]  # fmt: skip
                    with open(tmp_path / f"r{n}.log", "wb") as log:
                        procs.append(subprocess.Popen(args, stdout=log, stderr=log, env=env))
            else:
                (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
                args = [sys.executable, "-m", "worker", "run", "-i", str(tmp_path / "ids.txt"),
                        "--yes", "--ledger", str(tmp_path / "ledger.db"), *common]  # fmt: skip
                with open(tmp_path / "run.log", "wb") as log:
                    procs.append(subprocess.Popen(args, stdout=log, stderr=log, env=env))
            checked = await _watch(sim, procs)
            assert all(p.poll() is None for p in procs), "a process ended before UNTIL"
        finally:
            await stop_replicas(procs)
    leaders = sum(p.read_text().count('"rate.leader"') for p in tmp_path.glob("r*.log"))
    return _figures(checked, gate.start) | {"leaders": leaders}


@pytest.mark.timeout(600)
@pytest.mark.anyio
@pytest.mark.parametrize("command", ["serve", "run"])
async def test_a_long_window_over_real_http(
    redis_url: str,  # noqa: F811  (the fixture)
    tmp_path: Path,
    command: str,
) -> None:
    """Figures, not asserted goals: real HTTP on a shared host moves them."""
    load_before = os.getloadavg()
    row = await _against_the_window(redis_url, tmp_path, command)
    record("fleet_window_http", command=command, replicas=REPLICAS if command == "serve" else 1,
           quota=QUOTA, span=SPAN, until=UNTIL, **row,
           met=row["used"] >= GOAL_USED and row["refused"] <= GOAL_REFUSED,
           load_before=load_before, load_after=os.getloadavg(), machine=machine())  # fmt: skip
