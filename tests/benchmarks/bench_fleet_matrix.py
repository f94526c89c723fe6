"""Issue 23's fleet goal across gateways, with and without a leader killed: three replicas
of 8 workers on ``--rate auto`` sharing one estimate in Redis, from 15 s on at least 0.90 of
the quota with at most 2 % of calls throttled.

Virtual time with real Redis (``tests.test_fleet_rate``'s harness: the fleet's scripts and
leader against a token-bucket gateway; the scripts' calls one at a time, so a run gives the
same figures every time and on any machine). Each cell runs with no kill, then with the
leader killed as with kill -9 (``tests.test_fleet_rate_faults.Killable``: every task of it
stops, nothing refunded, nothing more reported) at each of ``KILLS``. Printed per run: the
share of the quota accepted and the share throttled from 15 s to ``UNTIL``, and for a kill
the share accepted over the 34 s after it; then per cell the medians and the runs that meet
the goal.

    uv run pytest -m benchmark tests/benchmarks/bench_fleet_matrix.py -s -p no:randomly

``FLEET_CELLS`` (e.g. ``q20-b1-300ms``) keeps to some cells, ``FLEET_KILLS=0`` to the runs
with no kill.
"""

from __future__ import annotations

import math
import os
import statistics
import uuid
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from tests.benchmarks.harness import record
from tests.conftest import REDIS_URL
from tests.test_fleet_rate import RedisTime
from tests.test_fleet_rate_faults import _killable_replicas, run_killing_the_leader
from worker.pacing.shared import FleetKeys
from worker.simulator.quota import TokenBucket as Gateway

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(7200)]

CELLS = [  # quota (calls/s), gateway burst, latency (s)
    (5.0, 1, 0.3), (5.0, 2, 0.3), (5.0, 1, 0.05), (20.0, 1, 0.3), (50.0, 1, 0.3),
    (30.0, 2, 0.005), (50.0, 2, 0.05),
]  # fmt: skip
KILLS = tuple(0.5 + k * 0.25 for k in range(15))  # 0.5-4.0 s: start-up and just after
FROM, UNTIL = 15.0, 75.0
AFTER_KILL = 34.0


def _name(quota: float, burst: int, latency: float) -> str:
    return f"q{quota:g}-b{burst}-{latency * 1000:g}ms"


async def _run(
    client: aioredis.Redis, quota: float, burst: int, latency: float, kill_at: float | None
) -> dict[str, Any]:
    time = RedisTime()
    clock, key = time.clock, f"bench-fleet-matrix:{uuid.uuid4().hex[:12]}:rl"
    replicas = _killable_replicas(client, key, time)
    try:
        gateway = Gateway(quota, burst, 0.0)
        fleet = await run_killing_the_leader(
            replicas, clock, gateway, kill_at=kill_at, until=UNTIL, latency=latency
        )
    finally:
        await client.delete(*FleetKeys.of(key).all())
    used, throttled = fleet.used(quota, FROM, UNTIL), fleet.throttled(FROM, UNTIL)
    row: dict[str, Any] = {"used": round(used, 3), "throttled": round(throttled, 4)}
    if kill_at is not None:
        row["after_kill"] = round(fleet.used(quota, kill_at, kill_at + AFTER_KILL), 3)
        successor = next(
            (r.limiter for r in replicas if r.dead_at == math.inf and r.limiter.leading), None
        )
        ctrl = None if successor is None else successor.controller
        row["successor_quota"] = None if ctrl is None else round(ctrl.state.quota, 2)
    row["met"] = used >= 0.90 and throttled <= 0.02
    return row


def _cells() -> list[tuple[float, int, float]]:
    wanted = os.environ.get("FLEET_CELLS")
    if not wanted:
        return CELLS
    names = set(wanted.split(","))
    return [cell for cell in CELLS if _name(*cell) in names]


def test_the_fleet_matrix_with_and_without_a_leader_killed() -> None:
    kills: tuple[float | None, ...] = (None,)
    if os.environ.get("FLEET_KILLS", "1") != "0":
        kills += KILLS

    async def main() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            for cell in _cells():
                rows = []
                for kill_at in kills:
                    row = await _run(client, *cell, kill_at)
                    rows.append(row)
                    said = "no kill" if kill_at is None else f"killed at {kill_at:4.2f} s"
                    print(f"{_name(*cell)} {said}: {row}")
                killed = rows[1:]
                summary: dict[str, Any] = {
                    "no_kill": rows[0],
                    "killed_met": sum(r["met"] for r in killed),
                    "killed_runs": len(killed),
                }
                if killed:
                    summary["killed_used_median"] = statistics.median(r["used"] for r in killed)
                    summary["killed_throttled_median"] = statistics.median(
                        r["throttled"] for r in killed
                    )
                    summary["after_kill_median"] = statistics.median(
                        r["after_kill"] for r in killed
                    )
                record(f"fleet_matrix {_name(*cell)}", **summary)
        finally:
            await client.aclose()

    anyio.run(main)
