"""The rate limit shared through Redis: N limiters on one key behave like one bucket."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis
import structlog.testing

from tests.conftest import REDIS_URL
from tests.fakes import FakeClock
from worker.pacing.bucket import RateLimiter
from worker.pacing.fleet import FleetRateController
from worker.pacing.shared import (
    REVISIT_S,
    SPEC_EVERY_S,
    SPEC_TTL_S,
    RedisRateLimiter,
    Reservation,
    interval_us,
)


def most_in_window(starts_us: list[int], window_us: int) -> int:
    """The largest number of start times inside any half-open window of that length."""
    starts = sorted(starts_us)
    best = lo = 0
    for hi, start in enumerate(starts):
        while starts[lo] <= start - window_us:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def test_interval_is_rounded_up_so_rounding_never_speeds_the_fleet() -> None:
    assert interval_us(3) == 333_334
    assert interval_us(20) == 50_000
    assert interval_us(1_000_000_000) == 1
    with pytest.raises(ValueError, match="rate must be"):
        interval_us(0)


@pytest.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    """One connection to the test Redis, closed after the test."""
    connection = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield connection
    finally:
        await connection.aclose()


@pytest.mark.anyio
async def test_the_redis_limiter_is_a_rate_limiter(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    limiter = RedisRateLimiter(client, redis_prefix + "rl", rate=7, burst=2, clock=FakeClock())
    assert isinstance(limiter, RateLimiter)
    assert limiter.rate == 7
    assert "rate=7," in repr(limiter) and "granted=0" in repr(limiter)


@pytest.mark.anyio
async def test_no_start_is_handed_out_more_than_the_horizon_ahead(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """A caller further back is told when to come back, so a new pace reaches every
    process within the horizon (here 250 ms at 10 calls/s: the third start is 200 ms out,
    the fourth would be 300 ms)."""
    limiter = RedisRateLimiter(
        client, redis_prefix + "rl", rate=10, burst=1, clock=FakeClock(), horizon_s=0.25
    )
    got = [await limiter.reserve() for _ in range(4)]
    assert [isinstance(r, Reservation) for r in got] == [True, True, True, False]
    later = got[3]
    assert isinstance(later, float) and 0.0 < later <= 0.05 + 0.01


@pytest.mark.anyio
async def test_a_burst_then_exact_spacing_on_the_server_clock(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """From idle: ``burst`` reservations start at once, then each 1/rate after the last."""
    limiter = RedisRateLimiter(
        client, redis_prefix + "rl", rate=10, burst=3, clock=FakeClock(), horizon_s=60.0
    )
    got = [r for _ in range(8) if isinstance(r := await limiter.reserve(), Reservation)]
    assert len(got) == 8
    first = got[0].now_us
    assert [r.wait_s for r in got[:3]] == [0.0, 0.0, 0.0]
    # After the burst, starts are anchored to the first call: exactly 100 ms apart.
    starts = [r.start_us for r in got[3:]]
    assert [b - a for a, b in itertools.pairwise(starts)] == [100_000] * 4
    assert starts[0] - first == 100_000


@pytest.mark.anyio
async def test_n_replicas_together_never_exceed_rate_times_window_plus_burst(
    redis_prefix: str,
) -> None:
    """Five limiters (five connections, as five replicas) reserve 300 slots concurrently:
    in any window of the server's clock at most rate x window + burst calls may start."""
    rate, burst, replicas, each = 50.0, 4, 5, 60
    clients = [aioredis.Redis.from_url(REDIS_URL) for _ in range(replicas)]
    try:
        limiters = [
            RedisRateLimiter(
                c,
                redis_prefix + "shared",
                rate=rate,
                burst=burst,
                clock=FakeClock(),
                horizon_s=60.0,
            )
            for c in clients
        ]
        reservations: list[Reservation] = []

        async def replica(limiter: RedisRateLimiter) -> None:
            for _ in range(each):
                reservation = await limiter.reserve()
                assert isinstance(reservation, Reservation)
                reservations.append(reservation)

        async with anyio.create_task_group() as group:
            for limiter in limiters:
                group.start_soon(replica, limiter)
        starts = [r.start_us for r in reservations]
        assert len(starts) == replicas * each
        for window_s in (0.02, 0.1, 0.5, 1.0, 3.0):
            window_us = int(window_s * 1_000_000)
            assert most_in_window(starts, window_us) <= rate * window_s + burst, window_s
        # And the fleet is not slower than asked: the last start is where one bucket puts it.
        span = max(starts) - min(r.now_us for r in reservations)
        assert span <= (replicas * each - burst) * interval_us(rate) + 50_000
    finally:
        for c in clients:
            await c.aclose()


@pytest.mark.anyio
async def test_acquire_sleeps_the_wait_it_was_handed(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    clock = FakeClock()
    # A horizon past the waits: the Redis clock does not move with the fake one.
    limiter = RedisRateLimiter(
        client, redis_prefix + "rl", rate=4, burst=1, clock=clock, horizon_s=60.0
    )
    for _ in range(3):
        await limiter.acquire()
    assert limiter.granted == 3
    # The first is free; the next two wait about 250 ms each (less the real time that
    # passed on the Redis clock between the calls), each in two sleeps: to ``REVISIT_S``
    # before its start, where it looks whether a slowdown took its start back, then on.
    assert len(clock.sleeps) == 4 and clock.sleeps[1::2] == [pytest.approx(REVISIT_S)] * 2
    waits = [a + b for a, b in zip(clock.sleeps[::2], clock.sleeps[1::2], strict=True)]
    assert all(0.2 < s <= 0.5 for s in waits), clock.sleeps
    assert limiter.revisits == 2 and limiter.taken_back == 0


@pytest.mark.anyio
@pytest.mark.parametrize("on", ["server", "test"])
async def test_a_cancelled_waiter_with_the_latest_slot_gives_it_back(
    client: aioredis.Redis, redis_prefix: str, on: str
) -> None:
    """On the Redis server's clock, and on a test's (``redis_now``): the refund reads the
    time the reservation was made on (it read the server's, so on a test's clock it took
    every reservation for past and deleted the bucket)."""
    clock = FakeClock(autojump=False)
    key = redis_prefix + "rl"
    now = clock.now if on == "test" else None
    limiter = RedisRateLimiter(
        client, key, rate=1, burst=1, clock=clock, horizon_s=60.0, redis_now=now
    )
    await limiter.acquire()  # the burst token
    before = int(await client.get(key) or 0)
    with anyio.move_on_after(0.2):
        await limiter.acquire()  # reserves the next slot, sleeps on the fake clock
    assert int(await client.get(key) or 0) == before  # the slot came back
    nxt = await limiter.reserve()
    assert (
        isinstance(nxt, Reservation) and nxt.start_us == before
    )  # the next caller gets that very slot


@pytest.mark.anyio
@pytest.mark.parametrize("rate", ["fixed", "auto"])
async def test_acquire_waits_out_a_redis_outage_instead_of_failing(
    redis_prefix: str, rate: str
) -> None:
    """A limiter pointed at a port with no Redis keeps asking (a call not made is safe),
    and so does ``--rate auto``'s, its answers kept for when Redis is back."""
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    clock = FakeClock()
    try:
        limiter: RedisRateLimiter | FleetRateController
        if rate == "fixed":
            limiter = RedisRateLimiter(client, redis_prefix + "rl", rate=1, burst=1, clock=clock)
        else:
            limiter = FleetRateController(client, redis_prefix + "rl", clock)
            limiter.feedback(throttled=True, latency_s=0.01, retry_after=1.0)
        with anyio.fail_after(10):  # real seconds: a limiter that stops asking fails here
            async with anyio.create_task_group() as group:
                group.start_soon(limiter.acquire)
                while limiter.redis_errors < 2:
                    await anyio.sleep(0.01)
                group.cancel_scope.cancel()
        assert limiter.granted == 0
        assert limiter.redis_errors >= 2
        if isinstance(limiter, FleetRateController):
            assert limiter.reported == 0 and "throttles=1" in repr(limiter)
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_processes_given_different_rates_on_one_bucket_say_so_once(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """``--rate 10`` beside ``--rate 20`` or ``auto`` on one key: each spaces its own calls
    by its own rate, and nothing said so (fleet.md: not detected). Each process writes its
    rate beside the keys and says, once, the live ones that differ (``rate.mismatch``);
    processes given the same rate say nothing, and a rate written by a process gone for
    longer than ``SPEC_TTL_S`` is not live."""
    clock = FakeClock(start=1000.0)
    key = redis_prefix + "rl"

    def fixed(rate: float) -> RedisRateLimiter:
        return RedisRateLimiter(client, key, rate=rate, burst=1, clock=clock, redis_now=clock.now)

    one, same = fixed(10), fixed(10)
    with structlog.testing.capture_logs() as logs:
        await one.reserve()
        await same.reserve()
        clock.advance(SPEC_TTL_S + 1.0)  # the two at 10 are gone: a process at 20 sees none
        await fixed(20).reserve()
        assert logs == []
        twenty, auto = fixed(20), FleetRateController(client, key, clock, redis_now=clock.now)
        await auto.reserve()
        await twenty.reserve()
        clock.advance(SPEC_EVERY_S)
        for _ in range(3):  # said once, however often it is seen again
            await auto.reserve()
            await twenty.reserve()
            clock.advance(SPEC_EVERY_S)
    said = [(log["rate"], log["others"]) for log in logs if log["event"] == "rate.mismatch"]
    assert said == [("auto", ["20"]), ("20", ["auto"])]
    assert all(log["log_level"] == "warning" for log in logs if log["event"] == "rate.mismatch")
