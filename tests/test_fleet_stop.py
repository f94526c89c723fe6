"""A replica that stops takes no more of the fleet's shared rate: real Redis, two replicas'
``RedisRateLimiter`` on one key, the stopping one's batches run by the real pool and
``PacedCall``. Nothing here is timed: the test waits for the live replica's calls."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tests.test_fleet_rate import RedisTime, _auto
from worker.clock import MonotonicClock
from worker.pacing.fleet import FleetRateController, decode_state
from worker.pacing.paced import PacedCall, Stopped, Working
from worker.pacing.retry import RetryPolicy
from worker.pacing.shared import FleetKeys, RedisRateLimiter, text
from worker.pool import DispatchPool
from worker.types import Batch

pytestmark = pytest.mark.anyio

RATE = 20.0
LIVE_STARTS = 12  # the live replica's calls while the stopping one has a call on the wire
LEASE_S = 2.0  # FleetRateController's


async def test_a_stopping_replica_reserves_no_more_of_the_fleets_rate(
    redis_client: Any, redis_prefix: str
) -> None:
    """The stopping replica has one call on the wire, so its pool waits for it (the grace),
    and its three other dispatchers wait for a token. From the stop on, they reserve no
    slot (they reserved one each 1/20 s, as many as the live replica, and sent nothing in
    them); each batch has one outcome: sent, or stopped and left open."""
    clock, key = MonotonicClock(), redis_prefix + "rl"

    def limiter() -> RedisRateLimiter:
        return RedisRateLimiter(
            redis_client, key, rate=RATE, burst=1, clock=clock, notify=lambda *_, **__: None
        )

    stopping_one, live = limiter(), limiter()
    working, stop = Working(places=2), anyio.Event()
    paced = PacedCall(
        limiter=stopping_one, policy=RetryPolicy(max_attempts=3), clock=clock,
        stopping=stop.is_set, working=working,
    )  # fmt: skip
    on_the_wire, release, live_done = anyio.Event(), anyio.Event(), anyio.Event()
    outcome: dict[str, str] = {}
    granted_at_stop: list[int] = []

    async def intake(send: MemoryObjectSendStream[Batch]) -> None:
        async with send:
            for i in range(40):
                await send.send(Batch(f"b{i}", (f"j{i}",)))
            await anyio.sleep_forever()

    async def send_call() -> None:
        if not on_the_wire.is_set():  # the first call hangs on the wire till released
            on_the_wire.set()
            await release.wait()

    async def dispatch(receive: MemoryObjectReceiveStream[Batch]) -> None:
        async with receive:
            async for batch in receive:
                with working.busy():
                    try:
                        await paced(send_call, what=batch.batch_id)
                    except Stopped:
                        outcome[batch.batch_id] = "open"
                    else:
                        outcome[batch.batch_id] = "sent"

    async def the_live_replica() -> None:
        for _ in range(LIVE_STARTS):
            await live.acquire()
        live_done.set()

    async def stop_with_a_call_on_the_wire() -> None:
        await on_the_wire.wait()
        granted_at_stop.append(stopping_one.granted)
        stop.set()
        tg.start_soon(the_live_replica)
        await live_done.wait()
        release.set()

    pool = DispatchPool(concurrency=2, grace=3600, buffer=1, working=working)
    with anyio.fail_after(30):  # (a hang fails here)
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_with_a_call_on_the_wire)
            await pool.run(intake, dispatch, stop=stop)
    assert stopping_one.granted == granted_at_stop[0], (stopping_one, live)
    assert list(outcome.values()).count("sent") >= 1  # the call on the wire was answered
    assert set(outcome.values()) <= {"sent", "open"}


async def test_a_lapsed_leader_retaking_the_lease_does_not_publish_a_stale_state(
    redis_client: Any, redis_prefix: str
) -> None:
    """Leader ``a`` holds a state not yet published (a change under ``RESLOT`` goes with
    its next reservation) and reserves no more for longer than its lease; ``b`` takes the
    lapsed lease and publishes a newer state, then stops. ``a`` takes the lease back: it
    starts from ``b``'s state, and the fleet's stored state stays ``b``'s (it published
    the state made under its old lease over it, and restored its controller from that)."""
    time = RedisTime()
    key = redis_prefix + "rl"
    a = _auto(redis_client, key, time, me="a")
    b = _auto(redis_client, key, time, me="b")

    def change(replica: FleetRateController, rate: float) -> None:
        assert replica._published is not None and replica.controller is not None
        state = replace(replica.controller.state, rate=rate, level=rate)
        replica._pending = replace(replica._published, state=state)

    await a.reserve()
    await a.reserve()
    assert a.leading and a._pending is None
    change(a, 3.0)  # made under a's lease
    await time.clock.sleep(LEASE_S + 0.5)
    await b.reserve()
    assert b.leading
    change(b, 4.0)
    await b.reserve()  # published: b holds the lease
    await time.clock.sleep(LEASE_S + 0.5)
    await a.reserve()
    assert a.leading and a.leads == 2 and a.controller is not None
    stored = decode_state(text(await redis_client.hget(FleetKeys.of(key).pace, "state")))
    assert stored is not None and stored.rate == 4.0, stored
    assert a.controller.rate == 4.0


async def test_a_lapsed_leader_nobody_replaced_still_publishes_its_state(
    redis_client: Any, redis_prefix: str
) -> None:
    """At a rate under one call a lease (0.2 calls/s, a 2 s lease) the leader's lease lapses
    between its own reservations: where no other leader published since, its change goes."""
    time = RedisTime()
    key = redis_prefix + "rl"
    a = _auto(redis_client, key, time, me="a")
    await a.reserve()
    await a.reserve()
    assert a._published is not None and a.controller is not None
    a._pending = replace(a._published, state=replace(a.controller.state, rate=3.0, level=3.0))
    await time.clock.sleep(LEASE_S + 0.5)
    await a.reserve()
    stored = decode_state(text(await redis_client.hget(FleetKeys.of(key).pace, "state")))
    assert stored is not None and stored.rate == 3.0, stored
    assert a.controller.rate == 3.0
