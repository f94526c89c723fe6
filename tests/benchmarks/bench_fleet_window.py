"""A fleet on ``--rate auto`` against a count over a long window: three replicas of 8
workers sharing one estimate in Redis, against a fixed 10 s count (and a sliding one) at 5
and 30 calls/s. The goal, as one process meets it (``bench_foreign_gateways.py``): from the
second window on (the one after the window start-up spent), at least 0.90 of the quota
used and at most 2 % of calls refused.

Virtual time with real Redis (``tests.test_fleet_rate``'s harness: the scripts' calls one
at a time, so a run gives the same figures every time and on any machine). Each cell runs
with the window's boundaries at four phases of the fleet's start (0, 2.5, 5 and 7.5 s into
a window; a sliding window has none), at 5 and 50 ms, and with the leader killed (as with
kill -9) 2 s after the first window's end. Printed per run: the share of the quota used
and the share refused from the second window to ``UNTIL``, the windows the leader read, and
the leaders.

    uv run pytest -m benchmark tests/benchmarks/bench_fleet_window.py -s -p no:randomly
    FLEET_WINDOW_PLACES=8 uv run pytest -m benchmark ...   # replicas as the pool runs them
"""

from __future__ import annotations

import math
import os
import statistics
import uuid
from typing import Any, cast

import anyio
import pytest
import redis.asyncio as aioredis

from tests.benchmarks.harness import record
from tests.conftest import REDIS_URL
from tests.fakes import FixedWindow, SlidingWindow
from tests.test_fleet_rate import RedisTime, run_fleet
from tests.test_fleet_rate_faults import _killable_replicas, run_killing_the_leader
from worker.pacing.bucket import RateLimiter
from worker.pacing.shared import FleetKeys

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(3600)]

SPAN, UNTIL = 10.0, 70.0
PHASES = (0.0, 2.5, 5.0, 7.5)
GOAL_USED, GOAL_REFUSED = 0.90, 0.02
PLACES = int(os.environ["FLEET_WINDOW_PLACES"]) if "FLEET_WINDOW_PLACES" in os.environ else None
"""``FLEET_WINDOW_PLACES=8``: each replica as the pool runs it (8 on the wire, 16 workers, one
asleep on a ``Retry-After`` holding no place); unset, 8 workers that each hold theirs."""


class Shifted:
    """A count over ``SPAN`` s whose windows begin ``phase`` s before the fleet's start;
    notes every call and whether it was refused."""

    def __init__(self, kind: str, quota: float, phase: float) -> None:
        self.phase = phase
        gateway = FixedWindow if kind == "fixed" else SlidingWindow
        self.gateway = gateway(quota, phase, span=SPAN)
        self.calls: list[tuple[float, bool]] = []

    def try_acquire(self, now: float) -> float:
        wait = self.gateway.try_acquire(now + self.phase)
        self.calls.append((now, wait > 0))
        return wait

    def second_window(self) -> float:
        """When the window after the first one to refuse a call begins (a sliding window's:
        ``SPAN`` after the first refusal)."""
        first = next((t for t, refused in self.calls if refused), 0.0)
        if isinstance(self.gateway, SlidingWindow):
            return first + SPAN
        return (math.floor((first + self.phase) / SPAN) + 1) * SPAN - self.phase


def _share(calls: list[tuple[float, bool]], quota: float, start: float) -> tuple[float, float]:
    seen = [refused for t, refused in calls if start <= t < UNTIL]
    accepted = seen.count(False)
    return accepted / ((UNTIL - start) * quota), seen.count(True) / max(1, len(seen))


async def _run(
    client: aioredis.Redis, kind: str, quota: float, latency: float, phase: float, kill: bool
) -> dict[str, Any]:
    time = RedisTime()
    key = f"bench-fleet-window:{uuid.uuid4().hex[:12]}:rl"
    gateway = Shifted(kind, quota, phase)
    replicas = _killable_replicas(client, key, time)
    try:
        if kill:
            kill_at = SPAN - phase + 2.0 if phase else SPAN + 2.0
            await run_killing_the_leader(replicas, time.clock, gateway, kill_at=kill_at,
                                         until=UNTIL, latency=latency, places=PLACES)  # fmt: skip
        else:
            await run_fleet(cast(list[RateLimiter], replicas), time.clock, gateway,
                            until=UNTIL, latency=latency, places=PLACES)  # fmt: skip
    finally:
        await client.delete(*FleetKeys.of(key).all())
    start = gateway.second_window()
    used, refused = _share(gateway.calls, quota, start)
    leaders = [r.limiter for r in replicas if r.limiter.leading]
    ctrl = leaders[0].controller if leaders else None
    return {
        "from": round(start, 2), "used": round(used, 3), "refused": round(refused, 4),
        "windows": None if ctrl is None else ctrl.windows,
        "leads": sum(r.limiter.leads for r in replicas),
        "met": used >= GOAL_USED and refused <= GOAL_REFUSED,
    }  # fmt: skip


CELLS = [(kind, q, lat) for kind in ("fixed", "sliding") for q in (5.0, 30.0)
         for lat in (0.005, 0.05)]  # fmt: skip


def test_a_fleet_against_a_long_window() -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            for kind, quota, latency in CELLS:
                name = f"{kind} 10 s q{quota:g} {latency * 1000:g} ms"
                rows = []
                for kill in (False, True):
                    for phase in PHASES if kind == "fixed" else PHASES[:1]:
                        row = await _run(client, kind, quota, latency, phase, kill)
                        rows.append(row)
                        said = "leader killed" if kill else "no kill"
                        print(f"{name}, phase {phase:3.1f} s, {said}: {row}")
                record(
                    f"fleet_window {name}",
                    used_median=statistics.median(r["used"] for r in rows),
                    used_worst=min(r["used"] for r in rows),
                    refused_median=statistics.median(r["refused"] for r in rows),
                    refused_worst=max(r["refused"] for r in rows),
                    met=sum(r["met"] for r in rows), runs=len(rows),
                )  # fmt: skip
        finally:
            await client.aclose()

    anyio.run(main)
