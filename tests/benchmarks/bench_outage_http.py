"""``--rate auto`` through an outage, over real HTTP: one ``run`` (8 on the wire, one id per
call) against the simulator's token bucket of ``QUOTA`` calls/s, healthy for ``BEFORE`` s
after the first call, then every call answered 503 for ``OUTAGE`` s (``Simulator.
set_faults``: unavailable 1.0), then healthy again.

    uv run pytest -m benchmark tests/benchmarks/bench_outage_http.py -s -p no:randomly -n 0

The real product meets an outage with its circuit breaker first (``worker.pacing.breaker``:
open after 8 failures in a row, probes one call at a time), then the rate controller;
``simulate`` (virtual time, ``test_long_windows.py``) has no breaker. Measured at the
simulator: the ids deleted per second from 5 s to ``BEFORE`` s (before) and from 10 s to
40 s after the outage ends (after), their ratio, and the seconds from the outage's end to
the first second that deletes 0.9 of what a second before it deleted. ``OUTAGE_CODE``: a
directory whose ``worker`` package the ``run`` imports in place of this tree's (the code
of another commit, from ``git archive``). Real-HTTP figures move with the host's load: the
load is printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.benchmarks.harness import clean_env, machine, record, stop_replicas
from worker.simulator import SimulatorConfig, run_simulator
from worker.simulator.config import FaultConfig

pytestmark = pytest.mark.benchmark

QUOTA = float(os.environ.get("OUTAGE_QUOTA", "30"))
BEFORE = 20.0
AFTER = 40.0


def _per_second(deleted: list[tuple[float, int]], start: float, end: float) -> float:
    """Ids deleted per second from ``start`` to ``end`` (samples of (when, deleted so far))."""
    inside = [n for t, n in deleted if start <= t <= end]
    return (inside[-1] - inside[0]) / (end - start) if len(inside) > 1 else 0.0


def _back_in(deleted: list[tuple[float, int]], back: float, pace: float) -> float:
    """Seconds from ``back`` to the first whole second deleting 0.9 of ``pace`` ids."""
    at = back
    while at + 1.0 <= deleted[-1][0]:
        if _per_second(deleted, at, at + 1.0) >= 0.9 * pace:
            return round(at - back, 1)
        at += 0.5
    return float("inf")


async def _through_an_outage(tmp_path: Path, outage: float) -> dict[str, Any]:
    config = SimulatorConfig(jobs=0, quota=QUOTA, burst=2)
    async with run_simulator(config) as sim:
        ids = sim.add_jobs(int(QUOTA * (BEFORE + outage + AFTER) * 1.5) + 100)
        (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
        args = [sys.executable, "-m", "worker", "run", "-i", str(tmp_path / "ids.txt"), "--yes",
                "--ledger", str(tmp_path / "ledger.db"), "--endpoint", sim.url,
                "--project-id", sim.config.project_id, "--ak", sim.config.ak,
                "--log-format", "json", "--rate", "auto", "--burst", "1", "--batch-size", "1",
                "--concurrency", "8", "--max-attempts", "50"]  # fmt: skip
        env = clean_env() | {"REAPER_SK": sim.config.sk}
        code = os.environ.get("OUTAGE_CODE") or None  # its directory first on sys.path
        with open(tmp_path / "run.log", "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=log, env=env, cwd=code)
        deleted: list[tuple[float, int]] = []
        try:
            while sim.stats.calls == 0:
                assert proc.poll() is None, "the run died before its first call"
                await anyio.sleep(0.05)
            began = anyio.current_time()
            out = back = None
            while (now := anyio.current_time() - began) < BEFORE + outage + AFTER:
                if out is None and now >= BEFORE:
                    sim.set_faults(FaultConfig(unavailable=1.0))
                    out = now
                if back is None and now >= BEFORE + outage:
                    sim.set_faults(FaultConfig())
                    back = now
                deleted.append((now, sim.stats.deletions))
                await anyio.sleep(0.1)
            assert proc.poll() is None, "the run ended before the measure did"
        finally:
            await stop_replicas([proc])
    assert out is not None and back is not None
    before = _per_second(deleted, 5.0, out)
    after = _per_second(deleted, back + 10.0, back + AFTER)
    return {
        "before": round(before, 2),
        "after": round(after, 2),
        "ratio": round(after / before, 3) if before else 0.0,
        "back_in": _back_in(deleted, back, before),
    }


@pytest.mark.timeout(600)
@pytest.mark.anyio
@pytest.mark.parametrize("outage", [20.0, 60.0], ids=["20s", "60s"])
async def test_a_run_through_an_outage_over_real_http(tmp_path: Path, outage: float) -> None:
    """Figures, not asserted goals: real HTTP on a shared host moves them."""
    load_before = os.getloadavg()
    row = await _through_an_outage(tmp_path, outage)
    record("outage_http", quota=QUOTA, outage=outage, code=os.environ.get("OUTAGE_CODE", "."),
           **row, load_before=load_before, load_after=os.getloadavg(),
           machine=machine())  # fmt: skip
