"""A fixed ``--rate`` above the server's quota slows itself down, says so, and finishes.

The arithmetic on scripted times; the limiter on virtual time; and a real run against the
simulator in another process: quota 5 calls/s with burst 1, ``--rate 50 --burst 5``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import reaper, reaper_env, write_ids
from tests.fakes import FakeClock
from worker.pacing.bucket import FixedRate, LocalRateLimiter, RateLimiter
from worker.pacing.shared import RedisRateLimiter
from worker.pacing.slowdown import Slowdown, SlowdownConfig, SlowingLimiter
from worker.simulator import SimulatorConfig, run_simulator


def test_a_refusal_cuts_the_pace_and_refusals_of_calls_sent_before_it_do_not() -> None:
    s = Slowdown(50.0)
    # The first for a while is a clump a loaded machine sent, as likely as a rate too
    # high: it only marks the time.
    assert not s.refused(1.0, sent=0.99)
    assert s.pace == 50.0
    # Calls in flight then were sent before it: nothing new.
    assert not s.refused(1.01, sent=0.995)
    assert not s.refused(1.2, sent=0.999)
    assert s.refused(1.3, sent=1.25)  # sent since, and refused within a second: cut
    assert s.pace == pytest.approx(42.5)
    assert not s.refused(1.35, sent=1.29)
    assert s.refused(2.0, sent=1.5)  # again
    assert s.pace == pytest.approx(36.125)
    assert not s.refused(9.0, sent=8.9)  # a while later: a mark, after the climb back
    assert s.pace == pytest.approx(36.125 * 1.1**3)


def test_the_pace_climbs_back_to_the_rate_asked_after_refusals_stop() -> None:
    s = Slowdown(10.0, SlowdownConfig(cut=0.5, first_cut=0.5, hold=10.0, growth=1.5))
    s.refused(0.0, sent=0.0)
    assert s.pace_at(9.9) == 5.0
    assert s.pace_at(10.0) == pytest.approx(7.5)
    assert s.pace_at(25.0) == pytest.approx(10.0)  # two holds: 7.5 x 1.5, capped at 10
    assert not s.slowed


def test_the_pace_never_falls_below_the_floor() -> None:
    s = Slowdown(1.0, SlowdownConfig(min_rate=0.2))
    for n in range(20):
        s.refused(float(n), sent=float(n))
    assert s.pace == 0.2


@pytest.mark.parametrize(
    "bad",
    [{"cut": 1.0}, {"first_cut": 1.1}, {"cut": 0.9, "first_cut": 0.8}, {"growth": 1.0},
     {"min_rate": 0.0}, {"hold": 0}, {"window": -1.0}],
)  # fmt: skip
def test_nonsense_configs_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="need"):
        SlowdownConfig(**bad)


@pytest.mark.anyio
async def test_the_limiter_paces_at_the_slowed_rate_and_says_so() -> None:
    clock = FakeClock()
    said: list[tuple[str, dict[str, Any]]] = []
    limiter = SlowingLimiter(
        LocalRateLimiter(20.0, 1, clock), clock, notify=lambda e, **f: said.append((e, f)),
        config=SlowdownConfig(cut=0.5, first_cut=0.5, hold=5.0, growth=2.0),
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
    async with run_simulator(SimulatorConfig(jobs=40, seed=8, quota=5.0, burst=1)) as sim:
        ids = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", ids)
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--rate", "50", "--burst", "5",
             "--batch-size", "1", "--concurrency", "8", "--max-attempts", "2"],
            reaper_env(sim.url),
        )  # fmt: skip
    assert done.code == 0, done.stdout[-3000:] + done.stderr
    assert done.summary()["deleted"] == 40
    assert sim.deleted == set(ids)
    slowed = done.events("rate.slowed")
    assert slowed and all(e["asked"] == 50.0 and e["rate"] < 50.0 for e in slowed)
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
