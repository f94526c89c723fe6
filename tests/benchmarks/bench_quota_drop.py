"""What following a quota that falls under ``--rate N`` mid-run costs: ``run --rate 30
--burst 1 --batch-size 1 --concurrency 8 --max-attempts 2`` against the simulator (quota 30
calls/s, burst 1, 20 ms latency, 400 jobs); after its 150th call the quota falls to 9.
Counted from the simulator: refusals in the 2, 5 and 10 s after the fall and to the end,
seconds to the end, and the outcome (exit 0, every job deleted: 429s never spend the
attempts). The code measured is this tree's; for the rule before, run the same file from a
worktree of that commit.

    uv run pytest -m benchmark tests/benchmarks/bench_quota_drop.py -s -p no:randomly
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.e2e import reaper_env, write_ids
from worker.simulator import SimulatorConfig, run_simulator
from worker.simulator.config import FaultConfig

pytestmark = pytest.mark.benchmark

JOBS, FALL_AT, RATE, QUOTA_AFTER = 400, 150, 30.0, 9.0
MARKS = (2.0, 5.0, 10.0)


async def _one(tmp: Path) -> dict[str, Any]:
    config = SimulatorConfig(
        jobs=JOBS, seed=3, quota=RATE, burst=1, faults=FaultConfig(latency_ms=20)
    )
    async with run_simulator(config) as sim:
        src = write_ids(tmp / "ids.txt", sim.job_ids())
        args = ["run", "-i", str(src), "--yes", "--rate", f"{RATE:g}", "--burst", "1",
                "--batch-size", "1", "--concurrency", "8", "--max-attempts", "2"]  # fmt: skip
        with (tmp / "out.txt").open("wb") as out:
            proc = await anyio.open_process(
                [sys.executable, "-m", "worker", *args],
                env=reaper_env(sim.url), stdout=out, stderr=out,
            )  # fmt: skip
            while sim.stats.calls < FALL_AT and proc.returncode is None:
                await anyio.sleep(0.02)
            fell, refused = anyio.current_time(), sim.stats.throttled
            sim.set_quota(QUOTA_AFTER)
            seen: dict[float, int] = {}
            while proc.returncode is None:
                await anyio.sleep(0.05)
                for mark in MARKS:
                    if anyio.current_time() - fell >= mark:
                        seen.setdefault(mark, sim.stats.throttled - refused)
            code = await proc.wait()
        return {
            "code": code,
            "deleted": len(sim.deleted),
            "refused": [seen.get(m) for m in MARKS] + [sim.stats.throttled - refused],
            "seconds": anyio.current_time() - fell,
        }


@pytest.mark.anyio
async def test_a_quota_falling_to_three_tenths_of_the_rate(tmp_path: Path) -> None:
    runs = [await _one(tmp_path) for _ in range(int(os.environ.get("BENCH_REPEATS", "2")))]
    print(f"\nload average {os.getloadavg()}")
    for run in runs:
        refused, seconds = run["refused"], run["seconds"]
        print(f"exit {run['code']}, {run['deleted']}/{JOBS} deleted; refused after the fall "
              f"(2 s, 5 s, 10 s, to the end): {refused}; {seconds:.1f} s")  # fmt: skip
    print(f"median to the end: {statistics.median(r['seconds'] for r in runs):.1f} s")
    assert all(r["code"] == 0 and r["deleted"] == JOBS for r in runs)
