"""What a cut reaching the start times already handed out costs Redis: each start more
than ``REVISIT_S`` after its reservation is confirmed ``REVISIT_S`` before it (a reply of
its process's as recent, or one ``HMGET``), and a slowdown takes the later ones back.

Three replicas of 8 workers on virtual time (``tests.test_fleet_rate``'s harness: the
fleet's scripts and leader on a ``redis-server`` of the benchmark's own, against a
token-bucket gateway with burst 2), ``--rate N`` at a quota N allows and ``--rate auto``
finding a quota of N, for N = 5, 30 and 500 calls/s; the two sides alternated, 3 rounds,
medians: the limiters as built (``revisit_s=REVISIT_S``) and with the look and the take-back
off (``revisit_s=None``: the Redis traffic before). Per API call: script calls, looks
(``HMGET``), and the Redis server's own CPU (``INFO cpu``, user + system: every command,
its parsing and its reply, which ``commandstats`` leaves out).

    uv run pytest -m benchmark tests/benchmarks/bench_revisit.py -s -p no:randomly
"""

from __future__ import annotations

import os
import statistics
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.benchmarks.bench_serve_soak import redis_url  # noqa: F401  (the fixture)
from tests.test_fleet_rate import RedisTime, _auto, run_fleet
from worker.pacing.shared import REVISIT_S, RedisRateLimiter
from worker.simulator.quota import TokenBucket as Gateway

pytestmark = pytest.mark.benchmark

ROUNDS = int(os.environ.get("BENCH_REPEATS", "3"))
SECONDS = {5.0: 60.0, 30.0: 20.0, 500.0: 6.0}  # virtual seconds per run
SIDES = {"before (no look, no take-back)": None, "now": REVISIT_S}


async def _cpu(client: Any) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _commands(client: Any) -> tuple[int, float, float]:
    """Script calls; Redis's time in scripts, and in ``HMGET`` (the looks', and the one each
    script makes), us."""
    stats = await client.info("commandstats")
    script, hmget = stats.get("cmdstat_evalsha", {}), stats.get("cmdstat_hmget", {})
    return int(script.get("calls", 0)), float(script.get("usec", 0)), float(hmget.get("usec", 0))


async def _side(client: Any, kind: str, rate: float, revisit: float | None) -> dict[str, float]:
    time = RedisTime()
    key = f"bench-revisit:{uuid.uuid4().hex[:12]}"
    limiters: list[Any]
    if kind == "fixed":
        limiters = [
            time.watch(
                RedisRateLimiter(
                    client, key, rate=rate, burst=1, clock=time.clock, redis_now=time.clock.now,
                    revisit_s=revisit,
                )
            )
            for _ in range(3)
        ]  # fmt: skip
    else:
        limiters = [_auto(client, key, time, me=f"r{n}", revisit_s=revisit) for n in range(3)]
    cpu, before = await _cpu(client), await _commands(client)
    until = SECONDS[rate]
    fleet = await run_fleet(limiters, time.clock, Gateway(rate, 2, 0.0), until=until)
    cpu, after = await _cpu(client) - cpu, await _commands(client)
    scripts, script_us, hmget_us = (b - a for a, b in zip(before, after, strict=True))
    calls = len(fleet.ok) + len(fleet.refused)
    return {
        "scripts": scripts / calls,
        "looks": sum(r.revisits for r in limiters) / calls,
        "cpu_us": cpu * 1e6 / calls,
        "script_us": script_us / calls,
        "hmget_us": hmget_us / calls,
        "taken_back": sum(r.taken_back for r in limiters),
        "used": fleet.used(rate, until / 3, until),
        "throttled": fleet.throttled(until / 3, until),
    }


@pytest.mark.timeout(1800)
@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["fixed", "auto"])
@pytest.mark.parametrize("rate", sorted(SECONDS))
async def test_what_the_look_before_each_start_costs_redis(
    redis_url: str,  # noqa: F811  (the fixture)
    kind: str,
    rate: float,
) -> None:
    client: Any = aioredis.Redis.from_url(redis_url)
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    load = [os.getloadavg()[0]]
    try:
        for n in range(ROUNDS):
            for side in list(SIDES)[n % 2 :] + list(SIDES)[: n % 2]:
                runs[side].append(await _side(client, kind, rate, SIDES[side]))
        load.append(os.getloadavg()[0])
    finally:
        await client.aclose()
    print(f"\n{kind} at {rate:g} calls/s, {ROUNDS} rounds, load average {load}")
    for side, figures in runs.items():
        medians = {k: statistics.median(f[k] for f in figures) for k in figures[0]}
        rounds = ", ".join(f"{f['cpu_us']:.1f}" for f in figures)
        print(
            f"  {side}: per API call {medians['scripts']:.2f} script calls, "
            f"{medians['looks']:.2f} looks, {medians['cpu_us']:.1f} us of Redis CPU "
            f"(rounds {rounds}), {medians['script_us']:.1f} us in scripts, "
            f"{medians['hmget_us']:.1f} us in HMGET; "
            f"taken back {medians['taken_back']:g}; used {medians['used']:.3f}, "
            f"throttled {medians['throttled']:.2%}"
        )
    assert all(f["used"] > 0 for figures in runs.values() for f in figures)
