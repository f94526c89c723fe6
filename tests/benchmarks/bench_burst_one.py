"""A burst of 1: what ``--rate N --burst 1`` really starts on this machine (the limiter
alone, real time), and what ``--rate auto`` uses of a burst-1 quota when calls leave late
(virtual time).

    uv run pytest -m benchmark tests/benchmarks/bench_burst_one.py -s -p no:randomly -n 0

``LocalRateLimiter(N, burst=1)`` on the process's monotonic clock, 64 callers each taking a
slot then holding it 20 ms (a call's answer), for 4 s; the figure is the starts per second
after the first 10 % divided by N, beside the same for a burst of 2 (no even-starts rule:
the bucket's slots alone), measured one after the other in the same run. With a burst of
1 no call starts less than an interval less a tolerance after the last real start, so a
wake later than the one before costs its lateness for good; the tolerance (at least the
event loop's millisecond) is what lets the even starts keep up with the slots. No network,
no server: the pacing's own share of a burst-1 run.

``test_auto_under_send_jitter_over_seeds``: issue 23's burst-1 cells at 5 and 50 calls/s
(5, 50 and 300 ms fixed, 8 and 32 in flight) on virtual time (``tests.fakes.simulate``),
calls leaving late as from a loaded loop (``LOADED``, seeds 1-20). The goal for each run,
from 10 s to 40 s: at least 0.90 of what can be reached (the quota, or what the
concurrency allows at that latency) and at most 2 % of calls throttled. Printed per cell:
the median share used, the least, the median and most refused, and the runs that meet it.
"""

from __future__ import annotations

import itertools
import os
import statistics
from collections.abc import Callable

import anyio
import pytest

from tests.benchmarks.harness import machine, record
from tests.fakes import simulate
from tests.test_rate_matrix import LOADED, _jitter
from worker.clock import MonotonicClock
from worker.pacing.bucket import LocalRateLimiter

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(300)]

SECONDS = 4.0
CALLERS = 64


async def _reached(rate: float, burst: int) -> float:
    """Starts per second over the last 90 % of the run, divided by ``rate``."""
    clock = MonotonicClock()
    limiter = LocalRateLimiter(rate, burst, clock)
    starts: list[float] = []
    end = clock.now() + SECONDS

    async def caller() -> None:
        while clock.now() < end:
            await limiter.acquire()
            starts.append(clock.now())
            await anyio.sleep(0.02)

    async with anyio.create_task_group() as group:
        for _ in range(CALLERS):
            group.start_soon(caller)
    kept = starts[len(starts) // 10 :]
    return (len(kept) - 1) / (kept[-1] - kept[0]) / rate


@pytest.mark.parametrize("rate", [20.0, 100.0, 400.0])
def test_a_burst_of_one_reaches_its_rate(rate: float) -> None:
    one = anyio.run(_reached, rate, 1)
    two = anyio.run(_reached, rate, 2)
    record(
        "burst_one_reach", rate=rate, burst_1=round(one, 3), burst_2=round(two, 3),
        load=round(os.getloadavg()[0], 2), machine=machine(),
    )  # fmt: skip
    assert one > 0 and two > 0


def _steady(quota: float) -> Callable[[float], float]:
    return lambda t: quota


def test_auto_under_send_jitter_over_seeds() -> None:
    cells = itertools.product((5.0, 50.0), (0.005, 0.05, 0.3), (8, 32))
    for quota, latency, concurrency in cells:
        reachable = min(quota, concurrency / latency)
        used, refused = [], []
        for seed in range(1, 21):
            run = simulate(_steady(quota), duration=40.0, burst=1, latency=latency,
                           concurrency=concurrency, jitter=_jitter(seed, *LOADED))  # fmt: skip
            used.append(run.accepted_per_s(10.0, 40.0) / reachable)
            refused.append(run.refused_share(10.0, 40.0))
        met = sum(u >= 0.90 and r <= 0.02 for u, r in zip(used, refused, strict=True))
        record(
            "rate_auto_burst_one_loaded_jitter",
            cell=f"q{quota:g}-b1-{latency * 1000:g}ms-c{concurrency}",
            used_median=round(statistics.median(used), 3), used_least=round(min(used), 3),
            refused_median=round(statistics.median(refused), 4),
            refused_most=round(max(refused), 4), met=met, runs=len(used),
        )  # fmt: skip
