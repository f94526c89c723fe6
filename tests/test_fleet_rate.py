"""The fleet's one rate, kept in Redis (``worker.pacing.fleet``): replicas sharing a quota
pace together at one rate, learnt once.

Real Redis holds the shared state; time is virtual (``FakeClock``, passed to the scripts as
their clock), and the gateway is a token bucket on that time (``worker.simulator.quota``),
so the fleets here run 45 s in well under a second of real time and no figure depends on
the machine.
"""

from __future__ import annotations

import itertools
import math
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from anyio.abc import TaskGroup
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes import FakeClock, OneAtATime
from tests.fakes import Gateway as Quota
from worker.pacing.bucket import RateLimiter, Reporting
from worker.pacing.controller import AdaptiveConfig, ControllerState, Phase, RateController
from worker.pacing.fleet import FleetRateController, decode_state, encode_state
from worker.pacing.shared import REVISIT_S, FleetKeys, RedisRateLimiter, interval_us
from worker.pacing.slowdown import Slowdown, SlowdownConfig
from worker.simulator.quota import TokenBucket as Gateway
from worker.simulator.quota import retry_after_seconds


@pytest.fixture
def client(redis_client: aioredis.Redis) -> aioredis.Redis:
    return redis_client


@dataclass
class Fleet:
    """What the gateway saw: send times of accepted and refused calls."""

    ok: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)

    def used(self, quota: float, start: float, end: float) -> float:
        return sum(start <= t < end for t in self.ok) / ((end - start) * quota)

    def throttled(self, start: float, end: float) -> float:
        ok = sum(start <= t < end for t in self.ok)
        refused = sum(start <= t < end for t in self.refused)
        return refused / max(1, ok + refused)


async def run_fleet(
    limiters: list[RateLimiter],
    clock: FakeClock,
    gateway: Quota,
    *,
    until: float,
    workers: int = 8,
    latency: float = 0.005,
    places: int | None = None,
) -> Fleet:
    """Each limiter is a replica with ``workers`` workers: acquire, send to the gateway, and
    report the answer ``latency`` later; a refused worker waits the ``Retry-After`` in the
    limiter's ``rest`` where it has one (``Reporting``, as ``PacedCall`` does).
    ``places``: as the pool runs a replica (``worker.pool``, ``Working.tasks``), at most
    that many calls on the wire and twice as many workers (``workers`` is then ignored),
    one asleep on a ``Retry-After`` holding no place."""
    fleet = Fleet()
    if places is not None:
        workers = 2 * places

    async def call(limiter: RateLimiter) -> float:
        """One call: its ``Retry-After`` (0: accepted)."""
        await limiter.acquire()
        sent = clock.now()
        wait = gateway.try_acquire(sent)
        (fleet.ok if wait <= 0 else fleet.refused).append(sent)
        await clock.sleep(latency)
        if wait <= 0:
            limiter.feedback(throttled=False, latency_s=latency)
            return 0.0
        retry_after = float(retry_after_seconds(wait))
        limiter.feedback(throttled=True, latency_s=latency, retry_after=retry_after)
        return retry_after

    async def worker(limiter: RateLimiter, wire: anyio.CapacityLimiter | None) -> None:
        while clock.now() < until:
            if wire is None:
                retry_after = await call(limiter)
            else:
                async with wire:  # the place is taken before the token, given back with the answer
                    retry_after = await call(limiter)
            if retry_after <= 0:
                continue
            if isinstance(limiter, Reporting):
                await limiter.rest(retry_after)
            else:
                await clock.sleep(retry_after)

    def replica(limiter: RateLimiter, group: TaskGroup) -> None:
        wire = None if places is None else anyio.CapacityLimiter(places)
        for _ in range(workers):
            group.start_soon(worker, limiter, wire)

    async def killable(limiter: RateLimiter, scope: anyio.CancelScope) -> None:
        with scope:  # cancelled, it stops every task of the replica at once, as kill -9
            async with anyio.create_task_group() as group:
                replica(limiter, group)

    async with anyio.create_task_group() as group:
        for limiter in limiters:
            if (scope := getattr(limiter, "scope", None)) is not None:  # ``Killable``
                group.start_soon(killable, limiter, scope)
                continue
            replica(limiter, group)
    return fleet


class RedisTime:
    """Virtual time that stands still while a script call is out (``FakeClock``'s ``busy``):
    what the scripts are told is now is then what it is when their answer comes. The calls
    go to Redis one at a time (``OneAtATime``), as Redis runs them anyway: the order their
    answers reach the replicas does not hang on the machine's load (at 5 calls/s it moved
    the share refused from 1.3 % to 2.6 %), and a run is the same every time."""

    def __init__(self) -> None:
        self.io = OneAtATime()
        self.clock = FakeClock(busy=lambda: self.io.out > 0)

    def watch(self, limiter: Any) -> Any:
        """``limiter``, its calls to Redis (a reservation, a look at the count of
        take-backs) made one at a time with time standing still."""
        for name in ("reserve", "revokes", "report", "look"):  # (the leader publishes within these)
            if not hasattr(limiter, name):
                continue
            call = getattr(limiter, name)

            async def counted(call: Any = call) -> Any:
                return await self.io.call(call)

            setattr(limiter, name, counted)
        return limiter


def _auto(client: aioredis.Redis, key: str, time: RedisTime, **kw: Any) -> FleetRateController:
    limiter = FleetRateController(client, key, time.clock, redis_now=time.clock.now, **kw)
    return time.watch(limiter)  # type: ignore[no-any-return]


# -- --rate auto: one controller for the fleet ----------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("quota", "until"), [(5.0, 105.0), (30.0, 45.0)])
async def test_three_replicas_on_auto_find_an_unknown_quota_together(
    client: aioredis.Redis, redis_prefix: str, quota: float, until: float
) -> None:
    """Issue 23's fleet on virtual time: a gateway burst of 2, three replicas of 8 workers.
    One leader's controller sees every call: from 15 s on the fleet uses at least 0.90 of
    the quota with at most 2 % throttled. (Three controllers, each on a third of the
    answers and each setting the shared spacing, used 0.58 of 30 calls/s with 14.5 %
    refused, over real HTTP.) At 5 calls/s a probe costs a refusal every 10-20 s, so 30 s
    hold 150 calls and the bound 3 refusals: 90 s (450 calls) say what 2 % means."""
    time = RedisTime()
    clock, key = time.clock, redis_prefix + "rl"
    replicas = [_auto(client, key, time, me=f"r{n}") for n in range(3)]
    leads: list[int] = []

    async def leads_at_the_end() -> None:  # (not those after: a worker still reserving
        await clock.sleep(until)  # once the leader's have stopped takes the lease over)
        leads.append(sum(r.leads for r in replicas))

    async with anyio.create_task_group() as group:
        group.start_soon(leads_at_the_end)
        fleet = await run_fleet(list(replicas), clock, Gateway(quota, 2, 0.0), until=until)
    used, throttled = fleet.used(quota, 15.0, until), fleet.throttled(15.0, until)
    assert used >= 0.90, (used, throttled, replicas)
    assert throttled <= 0.02, (used, throttled, replicas)
    assert leads == [1]  # one leader all along
    leader = next(r for r in replicas if r.leads)
    assert leader.controller is not None and leader.controller.measured > 0
    assert "FleetRateController(" in repr(leader) and "leading=True" in repr(leader)


class _Falling:
    """A burst-1 token bucket of ``before`` calls/s that refills at ``after`` from ``at``."""

    def __init__(self, before: float, after: float, at: float) -> None:
        self.bucket, self.after, self.at = Gateway(before, 1, 0.0), after, at

    def try_acquire(self, now: float) -> float:
        if now >= self.at and self.bucket.rate != self.after:
            self.bucket.try_acquire(self.at)  # refilled at the old rate up to the fall
            self.bucket.rate = self.after
        return self.bucket.try_acquire(now)


@pytest.mark.anyio
async def test_three_replicas_on_auto_follow_a_small_fall_at_a_burst_of_one(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """Three replicas of 8 workers, a burst of 1 whose quota falls from 55 to 49.5 calls/s
    at 20 s: from 2 s after the fall at most 2 % throttled, at least 0.90 of the quota used
    from 15 s. A probe refused under the quota the leader measured is the probe's news, not
    send jitter: read as jitter (``_jitter_lately`` in a probe), each probe's clump of
    refusals ran a call longer, 2.39 % throttled (2.23 % with the last 10 s's share weighed;
    1.77 % before the jitter reading, and now)."""
    quota = 55.0
    time = RedisTime()
    replicas = [_auto(client, redis_prefix + "rl", time, me=f"r{n}") for n in range(3)]
    gateway = _Falling(quota, 0.9 * quota, 20.0)
    fleet = await run_fleet(list(replicas), time.clock, gateway, until=60.0)
    used = sum(15.0 <= t < 60.0 for t in fleet.ok) / (5.0 * quota + 40.0 * 0.9 * quota)
    assert fleet.throttled(22.0, 60.0) <= 0.02
    assert used >= 0.90


@pytest.mark.anyio
async def test_every_replica_paces_at_the_leaders_rate(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """The leader publishes its rate; a replica that only reports reserves at it."""
    time = RedisTime()
    clock, key = time.clock, redis_prefix + "rl"
    leader, other = _auto(client, key, time, me="a"), _auto(client, key, time, me="b")
    await leader.acquire()
    assert leader.leading and not other.leading
    assert leader.controller is not None
    leader.controller.restore(
        ControllerState(rate=40.0, level=40.0, phase=Phase.CRUISE, since=0.0, cut_at=0.0,
                        quota=41.0, refused=42.0, refused_at=0.0)
    )  # fmt: skip
    leader.feedback(throttled=False, latency_s=0.001)
    await leader.acquire()  # the leader takes up its controller's rate, publishes it ...
    assert leader.rate == pytest.approx(40.0, rel=1e-3)
    await other.acquire()  # ... and the other reserves at it
    assert other.rate == pytest.approx(40.0, rel=1e-3) and not other.leading
    starts = []
    for _ in range(4):
        await other.acquire()
        starts.append(clock.now())
    assert starts[-1] - starts[0] == pytest.approx(3 / 40.0, abs=1e-3)


AT_20 = ControllerState(
    rate=20.0, level=20.0, phase=Phase.CRUISE, since=0.0, cut_at=0.0, quota=31.0,
    refused=math.inf, refused_at=-math.inf,
)  # fmt: skip
"""A leader cruising at 20 calls/s, no refusal remembered."""


async def _leading_at_20(client: aioredis.Redis, key: str, time: RedisTime) -> Any:
    """A leader (``a``) whose controller cruises at 20 calls/s, published, and a follower."""
    leader, other = _auto(client, key, time, me="a"), _auto(client, key, time, me="b")
    await leader.acquire()
    assert leader.controller is not None
    leader.controller.restore(AT_20)
    leader.feedback(throttled=False, latency_s=0.001)
    await leader.acquire()  # publishes 20 calls/s
    await other.acquire()
    assert other.rate == pytest.approx(20.0, rel=1e-3) and not other.leading
    return leader, other


@pytest.mark.anyio
@pytest.mark.parametrize("rate", [19.4, 20.6])
async def test_a_small_change_of_the_pace_spaces_the_next_start_at_the_new_pace(
    client: aioredis.Redis, redis_prefix: str, rate: float
) -> None:
    """A change under 5 % takes no start back, but the next start handed out is one interval
    of the new pace after the last, as one process's bucket does (``set_rate``): the bucket
    in Redis kept the old interval past the last start, so the call after a cut of a burst
    of 1's pace (3 %: 19.4 of 20) went 50 ms after the one before, at the pace just refused,
    and was refused too (a second cut, and 3 refusals a probe where one process has 2)."""
    time = RedisTime()
    clock = time.clock
    leader, other = await _leading_at_20(client, redis_prefix + "rl", time)
    await other.acquire()
    last = clock.now()
    new = interval_us(rate)
    await leader.publish(new, 0, encode_state(replace(AT_20, rate=rate, level=rate)), None)
    await other.acquire()
    assert clock.now() - last == pytest.approx(new / 1e6, abs=2e-6), (clock.now() - last, new)


@pytest.mark.anyio
async def test_the_leader_reads_an_answer_when_it_reaches_it_not_when_it_came(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """A follower's refusal reaches the leader's controller with the leader's next
    reservation after the follower's: 0.4 s late here (over 0.35 s in a fleet at 20 calls/s,
    a burst of 1, 300 ms answers, whose workers waited out Retry-Afters). The fleet paces at
    the old rate until then. Dated when it came, the cut made a call sent meanwhile at the
    old pace look sent at the new one: its refusal was news, cut again and measured the
    quota at half (11.2 of 20 after a leader was killed: 0.56 of it for 34 s). Read when it
    reaches the leader (dated back to its call's start all the same), it is old news."""
    time = RedisTime()
    clock = time.clock
    leader, other = await _leading_at_20(client, redis_prefix + "rl", time)
    ctrl = leader.controller
    came = clock.now()
    other.feedback(throttled=True, latency_s=0.3)  # sent 0.3 s before, at 20 calls/s
    await other.acquire()  # reports it
    clock.advance(0.4 - (clock.now() - came))
    await leader.acquire()  # reads it: the cut
    assert ctrl.cuts == 1 and ctrl.state.cut_at >= came + 0.4 - 1e-6, ctrl.state
    cut = leader.rate
    assert cut < 20.0
    clock.advance(0.1)
    other.feedback(throttled=True, latency_s=0.3)  # sent at came + 0.2: before the cut went out
    await other.acquire()
    await leader.acquire()
    assert ctrl.cuts == 1 and leader.rate == pytest.approx(cut, rel=0.01), ctrl


@pytest.mark.anyio
async def test_a_new_leader_starts_from_the_stored_estimate_not_from_scratch(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """When the leader's lease lapses (here: its key removed, as its expiry would), the next
    replica to reserve leads, from the state the last leader stored."""
    time = RedisTime()
    clock, key = time.clock, redis_prefix + "rl"
    replicas = [_auto(client, key, time, me=f"r{n}") for n in range(3)]
    await run_fleet(list(replicas), clock, Gateway(30.0, 2, 0.0), until=20.0)
    first = next(r for r in replicas if r.leading)
    keys = FleetKeys.of(key)
    raw: Any = await client.hget(keys.pace, "state")
    stored = decode_state(raw.decode() if raw else "")
    assert stored is not None and stored.phase is not Phase.STARTUP, (stored, first)
    assert stored.rate > 15.0, stored  # learnt: far from the 2 calls/s it starts from
    await client.delete(keys.lead)
    successor = next(r for r in replicas if r is not first)
    await successor.acquire()
    assert successor.leading and successor.controller is not None
    # from the rate stored, or, stored mid-probe, from the probe's start (its level)
    low, high = min(stored.rate, stored.level), max(stored.rate, stored.level)
    assert low * 0.95 <= successor.controller.rate <= high * 1.05, (stored, successor)
    assert successor.controller.state.phase is not Phase.STARTUP
    await first.acquire()
    assert not first.leading  # the lease is the successor's now


@pytest.mark.anyio
async def test_a_refusal_at_start_up_pauses_the_whole_fleet(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """The first refusal is news: the leader's controller pauses every call for its
    ``Retry-After``, and the other replica, which did not see it, waits too."""
    time = RedisTime()
    clock, key = time.clock, redis_prefix + "rl"
    config = AdaptiveConfig(max_pause=3.0)
    leader = _auto(client, key, time, me="a", config=config)
    other = _auto(client, key, time, me="b", config=config)
    await leader.acquire()
    await other.acquire()
    came = clock.now()
    other.feedback(throttled=True, latency_s=0.0, retry_after=30.0)
    await other.acquire()  # reports the refusal
    await leader.acquire()  # drains it: the pause, capped at 3 s, from when it came
    assert clock.now() == pytest.approx(came + 3.0, abs=0.01)
    await other.acquire()
    assert clock.now() >= came + 3.0


def test_the_state_survives_its_round_trip_through_redis() -> None:
    controller = RateController(5.0)
    controller.on_throttle(6.0, retry_after=1.0, latency=0.01)
    state = controller.state
    assert decode_state(encode_state(state)) == state
    assert decode_state("") is None
    assert decode_state("{not json") is None
    assert decode_state('{"phase": "no-such-phase"}') is None


# -- --rate N: one slowdown for the fleet ---------------------------------------------------


def _fixed(
    client: aioredis.Redis, key: str, time: RedisTime, rate: float, said: list[Any], **kw: Any
) -> RedisRateLimiter:
    limiter = RedisRateLimiter(
        client, key, rate=rate, burst=1, clock=time.clock, redis_now=time.clock.now,
        notify=lambda event, **fields: said.append((event, fields)), **kw,
    )  # fmt: skip
    return time.watch(limiter)  # type: ignore[no-any-return]


@pytest.mark.anyio
async def test_a_fixed_rate_is_cut_once_for_the_fleet_and_said_once(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """Two replicas refused for calls sent before the same cut: the fleet's pace is cut
    once (the second refusal is old news), both replicas pace at it, one event says so."""
    time = RedisTime()
    clock, key = time.clock, redis_prefix + "rl"
    said: list[Any] = []
    # One refusal is evidence enough here, and a probe past the pace cut is due at once.
    config = SlowdownConfig(evidence=1.0, cut=0.5, hold=5.0, growth=2.0, probe=5.0)
    a, b = (_fixed(client, key, time, 20.0, said, config=config) for _ in range(2))
    await a.acquire()
    await b.acquire()
    a.feedback(throttled=True, latency_s=0.01)
    b.feedback(throttled=True, latency_s=0.01)
    await a.acquire()
    await b.acquire()
    assert a.rate == b.rate == pytest.approx(10.0)
    assert said == [("rate.slowed", {"rate": 10.0, "asked": 20.0, "reason": "throttled"})]
    starts = []
    for limiter in (a, b, a, b):
        await limiter.acquire()
        starts.append(clock.now())
    assert starts[-1] - starts[0] == pytest.approx(3 / 10.0, abs=1e-3)
    b.feedback(throttled=True, latency_s=0.01)  # sent after the cut
    await b.acquire()
    assert b.rate == pytest.approx(5.0)
    await clock.sleep(5.0)  # a hold with no refusal: one reservation restores the fleet
    await a.acquire()
    await b.acquire()
    assert a.rate == b.rate == 10.0
    await clock.sleep(5.0)
    await b.acquire()
    assert b.rate == 20.0
    assert [e for e, _ in said] == ["rate.slowed", "rate.slowed", "rate.restored"]


@pytest.mark.anyio
async def test_a_fixed_rate_the_gateway_accepts_writes_no_pace_per_call(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """The pace is written when it moves (a cut, a climb, evidence for or against a cut),
    not by every reservation: at a pace the quota allows a fleet's calls cost Redis the
    bucket's write alone. 0668e0c wrote the hash and its expiry with every call (1.0 HSET
    per reservation in INFO commandstats; the script's time 1.16 of the one before)."""
    time = RedisTime()
    key = redis_prefix + "rl"
    pace = FleetKeys.of(key).pace
    a, b = (_fixed(client, key, time, 20.0, []) for _ in range(2))
    for _ in range(100):
        await a.acquire()
        await b.acquire()
    assert not await client.exists(pace)  # nothing learnt: nothing kept
    a.feedback(throttled=True, latency_s=0.01)  # some evidence, not enough to cut
    await a.acquire()  # told with a's next reservation
    assert float(await client.hget(pace, "evidence") or 0) > 0
    while True:
        await b.acquire()
        evidence = float(await client.hget(pace, "evidence") or 0)
        if evidence == 0:  # taken back by the calls accepted since
            break
    assert await client.persist(pace)  # so a write would show as an expiry set again
    for _ in range(100):
        await a.acquire()
        await b.acquire()
    assert await client.pttl(pace) == -1
    assert a.rate == b.rate == 20.0


@pytest.mark.anyio
async def test_a_cut_by_a_replica_on_the_rule_before_is_not_capped_by_an_old_cap(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """A rolling upgrade: a replica still on the rule before 0668e0c cuts the fleet's pace
    by writing ``factor``, ``since`` and ``cut_at`` (its script's whole write). The cap
    left in the hash by this rule's last cut, minutes before, is not that cut's: the
    pace climbs back to the rate asked in two holds. On the old code the stale cap (a step
    short of a pace cut twice, 0.77) held the fleet at 0.85 of its rate for the whole
    probe (20 s) after that cut."""
    time = RedisTime()
    clock, key = time.clock, redis_prefix + "rl"
    pace = FleetKeys.of(key).pace
    limiter = _fixed(client, key, time, 20.0, [])

    async def refused(times: int) -> None:
        for _ in range(times):
            limiter.feedback(throttled=True, latency_s=0.01)
        await limiter.acquire()

    await limiter.acquire()
    await refused(6)
    clock.advance(0.5)
    await refused(6)  # cut twice: the climb is capped a step short until probe
    assert limiter.rate == pytest.approx(20.0 * 0.85**2)
    while limiter.rate < 20.0:
        clock.advance(1.0)
        await limiter.acquire()
    clock.advance(60.0)
    await limiter.acquire()
    now = f"{clock.now() * 1e6:.0f}"
    await client.hset(pace, mapping={"factor": "0.85", "since": now, "cut_at": now})
    await limiter.acquire()
    assert limiter.rate == pytest.approx(17.0)
    clock.advance(2 * SlowdownConfig().hold)
    await limiter.acquire()
    assert limiter.rate == 20.0


@pytest.mark.anyio
@pytest.mark.parametrize(
    "script",
    [
        # (when, ago): at ``when`` (or as soon after as the last call let it), a refusal
        # of a call sent ``ago`` seconds before; None: a reservation with nothing to say.
        [(1.0, 0.01), (1.01, 0.015), (1.3, 0.05), (3.0, 0.1), (9.0, None), (30.0, None)],
        [(0.5, 0.1), (4.0, 0.1), (6.0, 0.05), (6.5, 0.1), (6.6, 0.05), (40.0, None)],
        [(n / 2, 0.01) for n in range(1, 25)] + [(200.0, None)],
    ],
)
async def test_the_fleets_slowdown_is_the_pure_arithmetic(
    client: aioredis.Redis, redis_prefix: str, script: list[tuple[float, float | None]]
) -> None:
    """The script in Redis moves the pace as ``Slowdown`` does, step for step."""
    time = RedisTime()
    clock = time.clock
    limiter = _fixed(client, redis_prefix + "rl", time, 50.0, [])
    pure = Slowdown(50.0)
    for at, ago in script:
        clock.advance(max(0.0, at - clock.now()))
        await _reserves_as_pure(limiter, pure, clock.now(), ago)


# Times on a millisecond grid: the scripts keep whole microseconds, and a refusal sent
# within a microsecond of the last cut is old news or not by rounding alone.
steps = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=6000).map(lambda ms: ms / 1000),  # since the last
        st.one_of(st.none(), st.integers(min_value=0, max_value=500).map(lambda ms: ms / 1000)),
    ),
    min_size=1,
    max_size=25,
)


async def _reserves_as_pure(
    limiter: RedisRateLimiter, pure: Slowdown, when: float, ago: float | None
) -> None:
    """At ``when``, a refusal of a call sent ``ago`` seconds before (None: none), then a
    reservation: the pace in Redis is ``pure``'s, told what the script is told (in whole
    microseconds)."""
    now_us = round(when * 1e6)
    if ago is not None:
        limiter.feedback(throttled=True, latency_s=ago)
        pure.refused(now_us / 1e6, (now_us - round(ago * 1e6)) / 1e6)
    pace = pure.pace_at(now_us / 1e6)
    granted = limiter.granted
    await limiter.acquire()
    assert limiter.rate == pytest.approx(pace, rel=1e-9)
    for _ in range(limiter.granted - granted):  # the call the reservation let go
        pure.sent()


@pytest.mark.anyio
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(script=steps)
async def test_the_fleets_slowdown_is_the_pure_arithmetic_whatever_the_refusals(
    client: aioredis.Redis, redis_prefix: str, script: list[tuple[float, float | None]]
) -> None:
    """Any refusals, at any times: the pace in Redis is ``Slowdown``'s, and never outside
    [min_rate, the rate asked]."""
    time = RedisTime()
    clock = time.clock
    limiter = _fixed(client, f"{redis_prefix}{uuid.uuid4().hex[:8]}", time, 50.0, [])
    pure = Slowdown(50.0)
    for gap, ago in script:
        clock.advance(gap)
        await _reserves_as_pure(limiter, pure, clock.now(), ago)
        assert 0.2 - 1e-9 <= limiter.rate <= 50.0


# -- a cut reaches the start times already handed out --------------------------------------


async def _starts_around_a_cut(
    limiters: list[Any], clock: FakeClock, cut: Any, *, until: float
) -> list[float]:
    """Each limiter a replica of 8 workers taking starts until ``until``; ``cut()`` is
    awaited once at 2 s by the first replica's first worker (it makes the fleet's pace
    drop). Every start, in order."""
    starts: list[float] = []

    async def worker(limiter: Any, first: bool) -> None:
        while clock.now() < until:
            await limiter.acquire()
            starts.append(clock.now())
            if first and clock.now() >= 2.0:
                first = False
                await cut()
            await clock.sleep(0.005)

    async with anyio.create_task_group() as group:
        for n, limiter in enumerate(limiters):
            for w in range(8):
                group.start_soon(worker, limiter, n == 0 and w == 0)
    return sorted(starts)


def _closer_after(starts: list[float], at: float, interval: float) -> list[float]:
    """The gaps between consecutive starts, the later one after ``at``, shorter than
    ``interval`` (less a microsecond of rounding)."""
    return [
        round(b - a, 6) for a, b in itertools.pairwise(starts) if b > at and b - a < interval - 1e-6
    ]


@pytest.mark.anyio
async def test_a_cut_of_a_fixed_rate_reaches_the_starts_already_handed_out(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """Three replicas at ``--rate 30 --burst 1``; a refusal cuts the fleet's pace to 15.
    Start times are handed out up to 100 ms ahead: on the old code the ones held when the
    cut came went at the old spacing (33 ms apart, to a gateway that had just refused that
    pace). As in one process, no call starts closer than the new interval after the cut
    (but those due within ``REVISIT_S`` of it, too late to be told)."""
    time = RedisTime()
    clock, key = time.clock, redis_prefix + "rl"
    said: list[tuple[str, float]] = []
    config = SlowdownConfig(evidence=1.0, cut=0.5, hold=60.0, probe=60.0)
    replicas = [
        time.watch(
            RedisRateLimiter(
                client, key, rate=30.0, burst=1, clock=clock, redis_now=clock.now,
                config=config, notify=lambda event, **_: said.append((event, clock.now())),
            )
        )
        for _ in range(3)
    ]  # fmt: skip

    async def cut() -> None:
        replicas[0].feedback(throttled=True, latency_s=0.001)
        await replicas[0].acquire()  # reports it: the cut, in this script call

    starts = await _starts_around_a_cut(replicas, clock, cut, until=4.0)
    assert [e for e, _ in said] == ["rate.slowed"] and all(r.rate == 15.0 for r in replicas)
    ((_, at),) = said
    assert _closer_after(starts, at + REVISIT_S, 1 / 15) == []
    assert len([s for s in starts if s > at]) >= 15 * (4.0 - at) - 2  # and no slower


@pytest.mark.anyio
async def test_a_pause_of_auto_reaches_the_starts_already_handed_out(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """Three replicas on ``auto`` at 30 calls/s; a follower's call is refused with a
    ``Retry-After``, and the leader pauses the fleet and cuts its rate. On the old code the
    start times already handed out (up to 100 ms ahead) went in the pause, to a gateway
    that had just said wait. As in one process, none starts in it (but those due within
    ``REVISIT_S`` of its publication, too late to be told), nor closer than the new
    interval after it."""
    time = RedisTime()
    clock, key = time.clock, redis_prefix + "rl"
    replicas = [_auto(client, key, time, me=f"r{n}") for n in range(3)]
    leader = replicas[0]
    await leader.acquire()
    assert leader.controller is not None
    leader.controller.restore(
        ControllerState(
            rate=30.0,
            level=30.0,
            phase=Phase.CRUISE,
            since=0.0,
            cut_at=0.0,
            quota=31.0,
            refused=math.inf,
            refused_at=-math.inf,
        )
    )  # fmt: skip  (no refusal lately: the next is news, and its Retry-After pauses)
    published: list[tuple[float, list[Any]]] = []
    publish = leader._publish_script

    async def noted(*, keys: list[str], args: list[Any]) -> Any:
        published.append((clock.now(), args))
        return await publish(keys=keys, args=args)

    leader._publish_script = noted

    async def refused() -> None:
        replicas[1].feedback(throttled=True, latency_s=0.005, retry_after=1.0)

    starts = await _starts_around_a_cut([*replicas[1:], leader], clock, refused, until=4.0)
    # what the leader published: (when, interval us, pause until us)
    said = [(at, int(args[2]), int(args[3])) for at, args in published]
    at, interval, until = next(one for one in said if one[2] > 0)
    assert until / 1e6 > at + 0.5
    assert [s for s in starts if at + REVISIT_S < s < until / 1e6] == []
    assert _closer_after(starts, at + REVISIT_S, interval / 1e6) == []


@pytest.mark.anyio
async def test_a_fleet_five_percent_over_the_quota_says_so_without_slowing_down(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """Three replicas at ``--rate 30`` against a quota of 28.5 with a burst of 2: one call
    in twenty refused. The fleet's CUSUM never cuts for that, and nothing said so. Now each
    replica says ``rate.over_quota`` of its own calls (a sample of the fleet's), at most
    once a minute (here, to be short: of its last 300 answers, from 150 on, each 20 s):
    the share refused, and the rate accepted of its calls (a third of the fleet's); the
    pace stays at 30."""
    time = RedisTime()
    key = redis_prefix + "rl"
    said: list[tuple[str, dict[str, Any]]] = []
    config = SlowdownConfig(window=300, least=150, warn_every=20.0)
    replicas = [_fixed(client, key, time, 30.0, said, config=config) for _ in range(3)]
    await run_fleet(list(replicas), time.clock, Gateway(28.5, 2, 0.0), until=60.0)
    assert {e for e, _ in said} == {"rate.over_quota"}, said
    assert len(said) == 9, said  # each replica at 150 answers (~16 s), then 20 and 40 s on
    for _, fields in said:
        assert fields["asked"] == 30.0 and fields["rate"] == 30.0
        assert 0.03 < fields["refused"] <= 0.07, fields
        assert fields["accepted"] == pytest.approx(28.5 / 3, rel=0.1), fields
    assert all(r.rate == 30.0 for r in replicas)


# -- the answers kept for the next report -----------------------------------------------------


@pytest.mark.anyio
async def test_the_newest_answers_are_reported_in_order_and_those_come_meanwhile_kept(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """``max_answers`` bounds what waits for the next reservation: past it the oldest goes.
    A reservation reports what was kept when it started; the answers that come while its
    script call is out wait for the next one. When the bound dropped some meanwhile (the
    reported ones, oldest), the reservation removed as many again after its call: the
    newest answers, never reported (a refusal among them never reached the leader)."""
    time = RedisTime()
    leader = _auto(client, redis_prefix + "rl", time, me="a", max_answers=3)
    script = leader._script
    reported: list[list[str]] = []
    meanwhile: list[float] = []

    async def noted(*, keys: Any, args: Any) -> Any:
        # after the 15 fixed arguments, the answers in fours: how long ago, latency, flag, ...
        fours = [str(a) for a in args[15:]]
        reported.append([fours[n + 1] for n in range(0, len(fours), 4) if fours[n + 2] != "s"])
        for latency in meanwhile:  # answers that come while the call is out
            leader.feedback(throttled=True, latency_s=latency)
        meanwhile.clear()
        return await script(keys=keys, args=args)

    leader._script = noted
    for ms in range(1, 6):
        leader.feedback(throttled=False, latency_s=ms / 1000)
    meanwhile += [0.008, 0.009]  # the bound drops two reported ones for them
    await leader.acquire()
    assert reported[0] == ["3000", "4000", "5000"]  # the newest three, oldest first
    await leader.acquire()
    assert reported[1] == ["8000", "9000"]  # the two that came meanwhile, each once
    assert leader.reported == 3 + 2 + 1  # (and the start of the first call)


def test_keeping_an_answer_costs_the_same_however_many_are_kept() -> None:
    """``_keep`` dropped the oldest with a list's ``del [0]``, which moves every answer
    kept: past 100,000 kept, each answer cost 100,000 moves. Ratios in one run, of CPU
    time: 20,000 answers past a full 100,000 against past a full 100."""
    import time as clock_time

    from tests.fakes import FakeClock

    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0")  # never called: nothing is sent

    def cost(kept: int) -> float:
        limiter = FleetRateController(client, "rl", FakeClock(), max_answers=kept)
        for _ in range(kept):
            limiter.feedback(throttled=False, latency_s=0.001)
        best = math.inf
        for _ in range(3):
            began = clock_time.process_time()
            for _ in range(20_000):
                limiter.feedback(throttled=False, latency_s=0.001)
            best = min(best, clock_time.process_time() - began)
        return best

    few, many = cost(100), cost(100_000)
    assert many < 4 * few + 0.01, (few, many)
