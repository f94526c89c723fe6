"""The fleet's take-back of start times (2e42314) where Redis goes away: a call whose start
is more than ``REVISIT_S`` after its reservation looks at the count of take-backs
``REVISIT_S`` before it; when Redis does not answer that look, the start it holds is no
longer known to stand.

Real Redis (a ``redis-server`` of the test's own, killed and started again on its port);
time is virtual (``RedisTime``: it stands still while a call to Redis, or the outage's
kill and restart, is out), so no figure here depends on the machine.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tests.test_fleet_rate import RedisTime
from tests.test_redis_auth import REDIS_SERVER, _free_port, redis_server
from worker.pacing.shared import RedisRateLimiter

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server")

RATE = 30.0


async def _starts_across_an_outage(
    tmp_path: Path, *, down_at: float, up_at: float, until: float
) -> tuple[list[float], list[RedisRateLimiter]]:
    """Three replicas of 8 workers at ``--rate 30 --burst 1`` on one redis-server, which
    is killed at ``down_at`` and started again (empty) at ``up_at``: every start, in order."""
    time = RedisTime()
    clock, port = time.clock, _free_port()
    starts: list[float] = []
    async with contextlib.AsyncExitStack() as server:
        await server.enter_async_context(redis_server(tmp_path, [], port=port))
        # (no retry of its own: an outage is met at once, not after seconds of real time)
        client = aioredis.Redis(port=port, retry=Retry(NoBackoff(), 0))
        replicas = [
            time.watch(
                RedisRateLimiter(
                    client, "rl", rate=RATE, burst=1, clock=clock, redis_now=clock.now,
                    notify=lambda *_, **__: None,
                )
            )
            for _ in range(3)
        ]  # fmt: skip

        async def outage() -> None:
            await clock.sleep(down_at)
            await time.io.call(server.aclose)  # (time stands still while it goes)
            await clock.sleep(up_at - down_at)
            await time.io.call(
                lambda: server.enter_async_context(redis_server(tmp_path, [], port=port))
            )

        async def worker(limiter: Any) -> None:
            while clock.now() < until:
                with anyio.fail_after(30):  # real seconds: a hang fails here
                    await limiter.acquire()
                starts.append(clock.now())
                await clock.sleep(0.005)

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(outage)
                for limiter in replicas:
                    for _ in range(8):
                        group.start_soon(worker, limiter)
        finally:
            await client.aclose()
    return sorted(starts), replicas


@pytest.mark.anyio
async def test_starts_held_across_a_redis_outage_do_not_go_together_when_it_ends(
    tmp_path: Path,
) -> None:
    """Redis is killed at 1 s and back (empty, as after a restart) at 2 s. The starts
    handed out before it went, up to 100 ms ahead, could not be confirmed: their look
    waited out the outage, then each went at once, beside the first calls reserved on the
    new bucket (two starts 0-10 ms apart, at burst 1, to a gateway that allows one per
    33 ms). Before the look (2e42314) they went at their times, during the outage. Now a
    start whose look Redis does not answer is reserved again: no two starts of the run
    closer than one interval."""
    starts, replicas = await _starts_across_an_outage(tmp_path, down_at=1.0, up_at=2.0, until=3.0)
    close = [
        (round(a, 4), round(b - a, 4))
        for a, b in itertools.pairwise(starts)
        if b - a < 1 / RATE - 1e-6
    ]
    assert close == [], (close, replicas)
    assert sum(r.redis_errors for r in replicas) > 0  # the outage was met
    assert len([s for s in starts if s >= 2.0]) >= RATE * 1.0 - 2  # and the pace is back


@pytest.mark.anyio
async def test_a_start_whose_look_is_answered_late_is_reserved_again(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """One replica's look at 1 s is answered a second late (redis-py's own retries through
    a short outage, or the process stopped and continued): the start it confirms is a
    second old, and, sent then, it lands between two of the fleet's starts of the moment.
    It is reserved again: no two starts of the run closer than one interval."""
    time = RedisTime()
    clock = time.clock
    replicas = [
        time.watch(
            RedisRateLimiter(
                redis_client, redis_prefix + "rl", rate=RATE, burst=1, clock=clock,
                redis_now=clock.now, notify=lambda *_, **__: None,
            )
        )
        for _ in range(3)
    ]  # fmt: skip
    slow, looks = replicas[0], replicas[0].revokes
    held: list[float] = []

    async def late_look() -> str:
        if clock.now() >= 1.0 and not held:
            held.append(clock.now())
            await clock.sleep(1.0)
        said: str = await looks()
        return said

    slow.revokes = late_look
    starts: list[float] = []

    async def worker(limiter: Any) -> None:
        while clock.now() < 3.0:
            await limiter.acquire()
            starts.append(clock.now())
            await clock.sleep(0.005)

    async with anyio.create_task_group() as group:
        for limiter in replicas:
            for _ in range(8):
                group.start_soon(worker, limiter)
    starts.sort()
    close = [
        (round(a, 4), round(b - a, 4))
        for a, b in itertools.pairwise(starts)
        if b - a < 1 / RATE - 1e-6
    ]
    assert held and close == [], (held, close, replicas)
    assert slow.taken_back >= 1
