"""The one source of time: a protocol, so tests advance virtual time instead of sleeping.

Everything that waits or measures (the rate limiter, retry back-off, deadlines, latency)
receives a ``Clock`` in its constructor. Production uses ``MonotonicClock``, which is the
event loop's own monotonic clock; tests use ``tests.fakes.FakeClock``.
"""

from __future__ import annotations

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
    """The running event loop's clock, so ``now()`` agrees with anyio's own timeouts.

    ``anyio.current_time()`` is the loop's monotonic time: wall-clock jumps (NTP, DST) never
    make a rate limiter burst or a back-off run backwards.
    """

    __slots__ = ()

    def now(self) -> float:
        return anyio.current_time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "MonotonicClock()"
