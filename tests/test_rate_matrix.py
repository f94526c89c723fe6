"""``--rate auto`` across issue 23's matrix of gateways, on virtual time (``simulate``: the
controller's arithmetic against a token-bucket gateway, calls paced evenly).

The goal for every cell: from 10 s on, at least 0.90 of what can be reached (the quota, or
what the concurrency allows at that latency, if less) and at most 2 % of calls throttled.
The cells the controller does not meet yet are marked ``xfail(strict=True)``: each is a
known gap (see docs/rate-auto.md), and one that starts to pass fails the suite until the
mark comes off.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from tests.fakes import Run, simulate

QUOTAS = (5.0, 50.0, 500.0)
BURSTS = (1, 2, 10)
LATENCIES = (0.005, 0.05, 0.3)
CONCURRENCY = (8, 32)

MISSED = {
    # 300 ms answers, 32 in flight, burst 1: refusals come a third of a second late and
    # the quota can seldom be measured between two of them; the rate ends 0.74 of it.
    (50.0, 1, 0.3, 32),
}


def _cells() -> list[Any]:
    cells = []
    for quota, burst, latency, concurrency in itertools.product(
        QUOTAS, BURSTS, LATENCIES, CONCURRENCY
    ):
        missed = (quota, burst, latency, concurrency) in MISSED
        marks = [pytest.mark.xfail(strict=True, reason="a known gap")] if missed else []
        cells.append(
            pytest.param(quota, burst, latency, concurrency, marks=marks,
                         id=f"q{quota:g}-b{burst}-{latency * 1000:g}ms-c{concurrency}")
        )  # fmt: skip
    return cells


@pytest.mark.parametrize(("quota", "burst", "latency", "concurrency"), _cells())
def test_auto_uses_nearly_all_it_can_from_ten_seconds_on(
    quota: float, burst: int, latency: float, concurrency: int
) -> None:
    run = simulate(
        lambda t: quota, duration=40.0, burst=burst, latency=latency, concurrency=concurrency
    )
    reachable = min(quota, concurrency / latency)
    assert run.accepted_per_s(10.0, 40.0) >= 0.90 * reachable
    assert run.refused_share(10.0, 40.0) <= 0.02


def _falls_and_rises(t: float) -> float:
    return 50.0 if t < 30.0 or t >= 60.0 else 20.0


def _within(run: Run, start: float, end: float, quota: float) -> bool:
    """Every rate the controller paced at in [start, end) within 10 % of ``quota``."""
    rates = [rate for t, rate in run.rates if start <= t < end]
    return bool(rates) and all(abs(rate - quota) <= 0.1 * quota for rate in rates)


@pytest.mark.xfail(strict=True, reason="a known gap: neither change is followed within 10 s")
@pytest.mark.parametrize("burst", list(BURSTS))
@pytest.mark.parametrize("latency", [0.005, 0.05])
def test_a_quota_that_falls_and_rises_is_followed_within_ten_seconds_each_way(
    burst: int, latency: float
) -> None:
    """50 calls/s, 20 from 30 s, 50 again from 60 s: within 10 % of the new quota from
    10 s after each change on, and at most 2 % throttled after its first 2 s. Not met
    yet (strict xfail above): at most 0.9 % is throttled after either change, but the
    rate is not within 10 % of 20 over 40-60 s, nor of 50 over 70-90 s."""
    run = simulate(_falls_and_rises, duration=90.0, burst=burst, latency=latency,
                   concurrency=8)  # fmt: skip
    assert run.refused_share(32.0, 60.0) <= 0.02
    assert run.refused_share(62.0, 90.0) <= 0.02
    assert _within(run, 40.0, 60.0, 20.0)
    assert _within(run, 70.0, 90.0, 50.0)
