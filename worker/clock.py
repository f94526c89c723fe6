"""The one source of time: a protocol, so tests advance virtual time instead of sleeping.

Everything that waits or measures (the rate limiter, retry back-off, deadlines, latency, a
check's freshness, a plan's expiry) receives a ``Clock`` in its constructor. Production uses
``MonotonicClock`` (the system's boot-time clock: monotonic, and counting the time the
machine was suspended); tests use ``tests.fakes.FakeClock``. Its ``wall`` reads the
system's (wall) clock, for an instant a plan states in it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Protocol, runtime_checkable

import anyio


@runtime_checkable
class Clock(Protocol):
    """Monotonic seconds and a way to wait for them to pass."""

    def now(self) -> float:
        """Seconds on a monotonic clock with an arbitrary origin; never goes back."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` have passed on this clock (at once for ``seconds <= 0``)."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch on the system's clock, which may be set, stepped or run
        on where ``now`` did not: only to compare with an instant stated in it (a plan's
        ``expires_at``), never to measure a duration."""
        ...


# CLOCK_BOOTTIME (Linux): monotonic as CLOCK_MONOTONIC is, never moved by a change of the
# system's time, but it counts the time the machine (or its VM) was suspended, which
# CLOCK_MONOTONIC does not. Elsewhere, time.monotonic().
_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


class MonotonicClock:
    """``CLOCK_BOOTTIME`` where the system has it (Linux), else ``time.monotonic()``: wall-clock
    jumps (NTP, DST, ``settimeofday``) never make a rate limiter burst or a back-off run
    backwards, and a machine suspended and resumed does not stop it: a check read, or a plan
    found unexpired, before a suspend of hours is hours old after it, not fresh.
    ``time.monotonic()`` (CLOCK_MONOTONIC) stands still while suspended.

    Not the clock the asyncio loop reads (CLOCK_MONOTONIC), and not ``anyio.current_time()``
    (that looks the running async library up on every call, measured at 5 % of a fast run's
    event-loop time): nothing here hands an absolute time of this clock to anyio, only
    durations (``sleep``), so the two clocks never meet. After a suspend a sleep lasts its
    length on the loop's clock and at least that on this one: nothing ends early. Read per
    call on the hot path: no dearer than the method calling ``time.monotonic()`` it replaced
    (``bench_hotpath``'s ``clock_read_ns``; docs/design.md).
    """

    __slots__ = ("now", "wall")

    def __init__(self) -> None:
        # A partial of the C function, not a method calling it: no Python frame per read.
        self.now: Callable[[], float] = (
            time.monotonic if _BOOTTIME is None else partial(time.clock_gettime, _BOOTTIME)
        )
        self.wall: Callable[[], float] = time.time

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "MonotonicClock()"
