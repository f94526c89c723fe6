"""The one source of time: a protocol, so tests advance virtual time instead of sleeping.

Everything that waits or measures (the rate limiter, retry back-off, deadlines, latency)
receives a ``Clock`` in its constructor. Production uses ``MonotonicClock`` (the process's
monotonic clock, which is also what the asyncio loop reads); tests use
``tests.fakes.FakeClock``. ``wall_passed`` reads the system's (wall) clock, for an instant a
plan states in it.
"""

from __future__ import annotations

import time
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


class MonotonicClock:
    """``time.monotonic()``: wall-clock jumps (NTP, DST) never make a rate limiter burst or a
    back-off run backwards.

    Not ``anyio.current_time()``: that looks the running async library up on every call
    (measured at 5 % of a fast run's event-loop time), and nothing here hands an absolute
    time to anyio, only durations.
    """

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "MonotonicClock()"


def wall_passed(instant: float | None) -> bool:
    """Has the system's clock reached ``instant`` (epoch seconds; None: never)?"""
    return instant is not None and time.time() >= instant
