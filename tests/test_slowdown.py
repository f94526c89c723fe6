"""A fixed ``--rate`` above the server's quota slows itself down, says so, and finishes.

The arithmetic on scripted times; the limiter on virtual time; and a real run against the
simulator in another process: quota 5 calls/s with burst 1, ``--rate 50 --burst 5``.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import reaper, reaper_env, write_ids
from tests.fakes import FakeClock
from worker.pacing.bucket import FixedRate, LocalRateLimiter, RateLimiter
from worker.pacing.shared import RedisRateLimiter
from worker.pacing.slowdown import Slowdown, SlowdownConfig, SlowingLimiter
from worker.simulator import SimulatorConfig, run_simulator


def test_refusals_in_a_row_cut_the_pace_and_refusals_of_calls_sent_before_it_do_not() -> None:
    s = Slowdown(50.0)
    # A few refusals may be late calls in clumps: the sixth in a row is a share.
    for n in range(5):
        assert not s.refused(1.0 + n / 100, sent=0.99)
    assert s.pace == 50.0
    assert s.refused(1.05, sent=1.0)
    assert s.pace == pytest.approx(42.5)
    # Calls in flight then were sent before it: nothing new, however many.
    for n in range(10):
        assert not s.refused(1.1 + n / 100, sent=1.01)
    assert s.evidence == 0.0
    for sent in (1.06, 1.07, 1.08, 1.09, 1.1):
        assert not s.refused(1.3, sent=sent)
    assert s.refused(1.3, sent=1.11)  # again
    assert s.pace == pytest.approx(36.125)


def test_a_pace_found_over_the_quota_twice_climbs_back_a_step_short_until_a_probe() -> None:
    s = Slowdown(10.0, SlowdownConfig(evidence=1.0, cut=0.5, hold=10.0, growth=1.2, probe=100))
    s.refused(0.0, sent=0.0)
    assert s.pace_at(9.9) == 5.0
    assert s.pace_at(10.0) == pytest.approx(6.0)
    assert s.pace_at(40.0) == 10.0  # once may be a false alarm: all the way back
    s.refused(41.0, sent=41.0)  # the rate asked refused again within ``probe``
    assert s.pace_at(71.0) == pytest.approx(10.0 / 1.2)  # a step short of 10
    assert s.pace_at(140.9) == pytest.approx(10.0 / 1.2)
    assert s.pace_at(141.0) == 10.0  # the probe: 8.33 x 1.2, capped at 10
    assert not s.slowed


def test_the_pace_never_falls_below_the_floor() -> None:
    s = Slowdown(1.0, SlowdownConfig(min_rate=0.2))
    for n in range(200):
        s.refused(n / 10, sent=n / 10)
    assert s.pace == 0.2


@pytest.mark.parametrize(
    "bad",
    [{"cut": 1.0}, {"cut": 0.0}, {"jitter": 0.0}, {"jitter": 0.2, "quota": 0.1},
     {"quota": 1.0}, {"evidence": 0.0}, {"growth": 1.0}, {"min_rate": 0.0}, {"hold": 0},
     {"hold": 30.0, "probe": 20.0}, {"least": 0}, {"least": 2000}, {"warn_every": 0.0}],
)  # fmt: skip
def test_nonsense_configs_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="need"):
        SlowdownConfig(**bad)


class Gateway:
    """A quota with a burst of 1 (GCRA on arrival times, as the simulator's), reached
    ``delay`` s after each start: what a fixed rate meets, on virtual time."""

    def __init__(self, quota: float) -> None:
        self.interval = 1 / quota
        self.tat = 0.0
        self.answers: list[tuple[float, bool]] = []  # (sent, refused)

    def call(self, arrival: float) -> bool:
        if arrival < self.tat:
            return False
        self.tat = max(self.tat, arrival) + self.interval
        return True


async def _paced(limiter: SlowingLimiter, clock: FakeClock, seconds: float, refuse: Any) -> None:
    """Calls through ``limiter`` for ``seconds``; ``refuse(sent)`` says whether each call
    sent at ``sent`` is refused, answered 5 ms later."""
    while clock.now() < seconds:
        await limiter.acquire()
        sent = clock.now()
        if refuse(sent):
            limiter.feedback(throttled=True, latency_s=0.005)


def _limiter(rate: float, clock: FakeClock, said: list[Any]) -> SlowingLimiter:
    return SlowingLimiter(
        LocalRateLimiter(rate, 1, clock), clock, notify=lambda e, **f: said.append((e, f))
    )


@pytest.mark.anyio
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("share", [0.01, 0.02])
async def test_isolated_refusals_at_a_rate_the_gateway_mostly_accepts_do_not_slow_it(
    seed: int, share: float
) -> None:
    """1-2 % of the calls of a steady 30 calls/s refused at random (a burst-1 gateway and a
    loaded machine's timing: three replicas lost 1.8 %): they are retried, not a reason to
    slow down. On the old arithmetic two within a second cut by 0.85, and the fleet used
    0.68 of its quota."""
    rnd = random.Random(seed)
    clock = FakeClock()
    said: list[Any] = []
    limiter = _limiter(30.0, clock, said)
    await _paced(limiter, clock, 300.0, lambda _: rnd.random() < share)
    assert limiter.throttles > 30 * 300 * share * 0.8
    assert said == [] and limiter.rate == 30.0


@pytest.mark.anyio
@pytest.mark.parametrize("seed", range(3))
async def test_a_quota_under_the_rate_is_followed_within_seconds_with_few_refusals(
    seed: int,
) -> None:
    """``--rate 30`` against a gateway whose quota is 21 calls/s, burst 1, each call
    reaching it a little late now and then: the pace is under the quota within 2 s, and
    from 5 s to 120 s the gateway accepts at least 0.9 of its quota and refuses at most
    3 % of the calls (the probes past the pace cut, every ``probe`` s, and lateness)."""
    rnd = random.Random(seed)
    clock = FakeClock()
    said: list[Any] = []
    limiter = _limiter(30.0, clock, said)
    gateway = Gateway(21.0)
    answers: list[tuple[float, bool]] = []

    def refuse(sent: float) -> bool:
        late = rnd.expovariate(1 / 0.004) if rnd.random() < 0.02 else 0.0
        ok = gateway.call(sent + late)
        answers.append((sent, ok))
        return not ok

    await _paced(limiter, clock, 2.0, refuse)
    assert limiter.rate < 21.0
    await _paced(limiter, clock, 120.0, refuse)
    window = [ok for sent, ok in answers if sent >= 5.0]
    accepted = sum(window)
    assert accepted / ((120.0 - 5.0) * 21.0) >= 0.9
    assert (len(window) - accepted) / len(window) <= 0.03
    assert said[0][0] == "rate.slowed"


@pytest.mark.anyio
async def test_the_limiter_paces_at_the_slowed_rate_and_says_so() -> None:
    clock = FakeClock()
    said: list[tuple[str, dict[str, Any]]] = []
    limiter = SlowingLimiter(
        LocalRateLimiter(20.0, 1, clock), clock, notify=lambda e, **f: said.append((e, f)),
        config=SlowdownConfig(evidence=1.0, cut=0.5, hold=5.0, growth=2.0, probe=5.0),
    )  # fmt: skip
    await limiter.acquire()
    limiter.feedback(throttled=True, latency_s=0.0, retry_after=1.0)
    assert limiter.rate == 10.0
    assert said == [("rate.slowed", {"rate": 10.0, "asked": 20.0, "reason": "throttled"})]
    starts = []
    for _ in range(5):
        await limiter.acquire()
        starts.append(clock.now())
    assert [round(b - a, 6) for a, b in itertools.pairwise(starts)] == [0.1] * 4
    await clock.sleep(5.0)
    await limiter.acquire()
    assert limiter.rate == 20.0
    assert said[-1] == ("rate.restored", {"rate": 20.0})
    assert "SlowingLimiter(Slowdown(asked=20, pace=20)" in repr(limiter)


@pytest.mark.anyio
async def test_a_fixed_rate_ten_times_the_quota_slows_down_and_finishes(tmp_path: Path) -> None:
    """It used to exit 69 ("unavailable") within seconds in half the runs, while the API
    answered every call: batches spent their 429 budget, and the throttled workers woke
    together on the same whole-second Retry-After."""
    async with run_simulator(SimulatorConfig(jobs=20, seed=8, quota=10.0, burst=1)) as sim:
        ids = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", ids)
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--rate", "100", "--burst", "5",
             "--batch-size", "1", "--concurrency", "8", "--max-attempts", "2"],
            reaper_env(sim.url),
        )  # fmt: skip
    assert done.code == 0, done.stdout[-3000:] + done.stderr
    assert done.summary()["deleted"] == 20
    assert sim.deleted == set(ids)
    slowed = done.events("rate.slowed")
    assert slowed and all(e["asked"] == 100.0 and e["rate"] < 100.0 for e in slowed)
    waits = [e["delay_s"] for e in done.events("batch.retry") if e["reason"] == "throttled"]
    assert waits and all(w >= 1.0 for w in waits)  # never shorter than the Retry-After ...
    assert len(set(waits)) > len(waits) // 2  # ... and spread, not all the same second


def test_the_limiters_that_slow_while_refused_are_not_fixed_rates() -> None:
    """``FixedRate`` is for limiters with nothing to learn; one that moves its pace on a
    refusal, alone or shared through Redis, is a ``RateLimiter`` of its own."""
    import redis.asyncio as aioredis

    clock = FakeClock()
    alone = SlowingLimiter(LocalRateLimiter(rate=5.0, burst=1, clock=clock), clock, notify=print)
    shared = RedisRateLimiter(aioredis.Redis(), "rl", rate=5.0, burst=1, clock=clock)
    for limiter in (alone, shared):
        assert isinstance(limiter, RateLimiter) and not isinstance(limiter, FixedRate)


class ShareGateway:
    """A quota with a burst (GCRA on arrival times): a pace a little over the quota loses
    its excess, (pace - quota) / pace of the calls, evenly."""

    def __init__(self, quota: float, burst: int) -> None:
        self.interval, self.burst, self.tat = 1 / quota, burst, 0.0

    def call(self, arrival: float) -> bool:
        tat = max(self.tat, arrival)
        if tat - arrival > (self.burst - 1) * self.interval:
            return False
        self.tat = tat + self.interval
        return True


async def _answered(limiter: Any, clock: FakeClock, seconds: float, gateway: Any) -> None:
    """Calls through ``limiter`` for ``seconds``, each answered 5 ms later, as it went."""
    while clock.now() < seconds:
        await limiter.acquire()
        ok = gateway.call(clock.now())
        limiter.feedback(throttled=not ok, latency_s=0.005)


@pytest.mark.anyio
async def test_a_rate_five_percent_over_the_quota_is_said_without_slowing_down() -> None:
    """``--rate 30`` against a quota of 28.5 with a burst of 2: one call in twenty refused,
    evenly. The CUSUM never cuts for that (the jitter of a loaded machine looks the same),
    and the operator used to learn nothing but throttled retries. Now a warning says it once
    a minute, naming the share refused and the rate the server accepted; the pace stays."""
    clock = FakeClock()
    said: list[tuple[str, dict[str, Any]]] = []
    limiter = SlowingLimiter(
        LocalRateLimiter(30.0, 1, clock), clock, notify=lambda e, **f: said.append((e, f))
    )
    await _answered(limiter, clock, 150.0, ShareGateway(28.5, 2))
    over = [f for e, f in said if e == "rate.over_quota"]
    # once 500 answers are in (17 s), then a minute and two later, over the last 1000
    assert [e for e, _ in said] == ["rate.over_quota"] * 3, said
    assert [f["calls"] for f in over] == [500, 1000, 1000]
    for fields in over:
        assert fields["asked"] == 30.0 and fields["rate"] == 30.0
        assert 0.04 <= fields["refused"] <= 0.06
        assert fields["accepted"] == pytest.approx(28.5, rel=0.02)
    assert limiter.rate == 30.0
