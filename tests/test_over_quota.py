"""``rate.over_quota`` (``worker.pacing.slowdown.RefusedShare``): what the warning says is
what the server did while the rate was being refused, not an average over a queue's idle
hours. Pure: scripted times."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.fakes import FakeClock
from tests.test_slowdown import ShareGateway
from worker.pacing.bucket import LocalRateLimiter
from worker.pacing.slowdown import RefusedShare, SlowingLimiter


def _spell(share: RefusedShare, start: float, calls: int, rate: float) -> list[dict[str, float]]:
    """``calls`` answers at ``rate`` calls/s from ``start``, one in twenty refused (a quota
    5 % under the rate): the warnings said."""
    said = []
    for n in range(calls):
        now = start + n / rate
        if (fields := share.answered(now, now - 0.01, n % 20 == 19)) is not None:
            said.append(fields)
    return said


def test_the_rate_accepted_is_the_servers_while_it_answered_not_over_an_idle_queue() -> None:
    """``serve`` at 30 calls/s, a quota of 28.5: 600 answers, warned of (28.5 accepted);
    the queue then idle for an hour; 100 more answers, and the minute since the warning is
    long over. The window's first answers are an hour old: it said 0.16 calls/s accepted,
    of a server that accepted 28.5 the whole time it was asked. Its answers since the pause
    are too few to judge (fewer than 500): nothing is said until they are, and then the
    rate accepted is the server's of the moment."""
    share = RefusedShare()
    first = _spell(share, 0.0, 600, 30.0)
    assert len(first) == 1 and first[0]["accepted"] == pytest.approx(28.5, rel=0.02), first
    assert _spell(share, 3600.0, 100, 30.0) == []
    later = _spell(share, 3700.0, 1000, 30.0)
    assert later and all(f["accepted"] == pytest.approx(28.5, rel=0.02) for f in later), later


@pytest.mark.anyio
async def test_a_rate_of_exactly_the_quota_refused_by_jitter_is_not_said_to_be_over_it() -> None:
    """``--rate 30 --burst 1`` against a gateway of exactly 30 calls/s, burst 1, each call
    reaching it 0-10 ms after its start (a loaded machine's jitter; seeded): 3-4 % refused,
    and the slowdown cuts for it (about every 15 s) and climbs back. The warning is for a
    rate refused by *less* than a cut needs: it said, once a minute, that 30 was over the
    quota (at a pace already cut to 21-25, ``rate.slowed`` said twenty times), of a gateway
    that accepts 30. Answers count toward it only while the pace is the rate asked: a cut
    starts the count again, and ``rate.slowed`` speaks for it."""
    clock = FakeClock()
    said: list[tuple[str, dict[str, Any]]] = []
    limiter = SlowingLimiter(
        LocalRateLimiter(30.0, 1, clock), clock, notify=lambda e, **f: said.append((e, f))
    )
    jitter = random.Random(1)
    gateway = ShareGateway(30.0, 1)
    answers: list[bool] = []
    while clock.now() < 300.0:
        await limiter.acquire()
        answers.append(ok := gateway.call(clock.now() + jitter.uniform(0.0, 0.01)))
        limiter.feedback(throttled=not ok, latency_s=0.005)
    assert 0.02 < answers.count(False) / len(answers) < 0.05  # refused, cut, ...
    assert sum(e == "rate.slowed" for e, _ in said) >= 10
    assert [f for e, f in said if e == "rate.over_quota"] == []  # ... and not said over it
