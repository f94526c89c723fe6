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

from tests.fakes import simulate

QUOTAS = (5.0, 50.0, 500.0)
BURSTS = (1, 2, 10)
LATENCIES = (0.005, 0.05, 0.3)
CONCURRENCY = (8, 32)

MISSED = {
    # At 5 calls/s start-up's refusals in a row land 13-16 % under the quota, and probes
    # of 3 % after 5 s cruises climb back too slowly to average 0.90 over 10-40 s.
    (5.0, 1, 0.005, 8), (5.0, 1, 0.005, 32), (5.0, 1, 0.05, 8), (5.0, 1, 0.05, 32),
    (5.0, 1, 0.3, 8), (5.0, 1, 0.3, 32), (5.0, 2, 0.005, 8), (5.0, 2, 0.005, 32),
    (5.0, 2, 0.05, 8), (5.0, 2, 0.05, 32),
    # A refusal at the level cuts 15 % (in a row) and pauses every call for Retry-After;
    # the climb back takes 20 s.
    (50.0, 1, 0.3, 32), (500.0, 1, 0.05, 32), (500.0, 10, 0.05, 32),
}  # fmt: skip


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
