"""What ``--rate N --burst 1`` really starts on this machine: the limiter alone, real time.

    uv run pytest -m benchmark tests/benchmarks/bench_burst_one.py -s -p no:randomly

``LocalRateLimiter(N, burst=1)`` on the process's monotonic clock, 64 callers each taking a
slot then holding it 20 ms (a call's answer), for 4 s; the figure is the starts per second
after the first 10 % divided by N, beside the same for a burst of 2 (no even-starts rule:
the bucket's slots alone), measured one after the other in the same run. With a burst of
1 no call starts less than an interval less a tolerance after the last real start, so a
wake later than the one before costs its lateness for good; the tolerance (at least the
event loop's millisecond) is what lets the even starts keep up with the slots. No network,
no server: the pacing's own share of a burst-1 run.
"""

from __future__ import annotations

import os

import anyio
import pytest

from tests.benchmarks.harness import machine, record
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
