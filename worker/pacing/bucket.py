"""How fast DELETE calls may start: a token bucket that hands out exact, FIFO start times.

Why our own code rather than ``aiolimiter``: its ``AsyncLimiter`` reads
``asyncio.get_running_loop().time()`` directly (no injected clock, so tests must patch the
loop), wakes waiters by polling ``has_capacity`` rather than in strict arrival order at
precomputed times, ties the burst to ``max_rate`` per ``time_period``, and computes its
per-second rate once in ``__init__`` (no supported way to change the rate while running,
which the adaptive controller needs). Our bucket is pure arithmetic over times the caller
passes in, so it is tested with known answers and Hypothesis, and the async wrapper is a
single ``sleep``.

The bucket is the "virtual scheduling" form of GCRA: instead of a token count that refills,
it keeps the time ``tat`` at which the bucket will be full again. Each ``reserve`` takes one
token, going into debt when there is none, and returns how long the caller waits. Waits are
computed from integer counts (``anchor + k / rate``), never by adding ``1 / rate`` over and
over, so N callers that reserve at the same instant start exactly ``1 / rate`` apart after
the burst, with no drift however long the queue. A server that enforces exactly ``rate`` calls
per second (and a burst of ``burst``) therefore never has to refuse one of ours.

Start times are where calls *should* start; a loaded machine wakes a caller late. With a
burst of 1 a late start must push the next ones (``start_apart``): GCRA alone lets the
caller after a late one keep its on-time slot, less than ``1 / rate`` after it, and a
gateway whose burst is 1 refuses that call. So with a burst of 1 no call starts less than
an interval, less a ``tolerance`` (1 %, or the event loop's millisecond), after the real
start of the one before it (and no run of
calls faster than the rate: GCRA again, over the real starts), and the bucket's later
slots move back by what the late caller lost. With any burst the real starts keep to the
burst and the rate: after a stall (a stopped process, a paused machine) the slots held
meanwhile are all past, and the woken callers go at the rate, not together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import anyio
import anyio.lowlevel

from worker.clock import Clock


@runtime_checkable
class RateLimiter(Protocol):
    """What the dispatcher needs: wait for a slot, and report how the call went."""

    async def acquire(self) -> None:
        """Wait until one call may start."""
        ...

    def feedback(
        self,
        *,
        throttled: bool,
        latency_s: float | None = None,
        retry_after: float | None = None,
        overloaded: bool = False,
    ) -> None:
        """Tell the limiter how a call ended. Fixed limiters ignore it; an adaptive one won't."""
        ...

    @property
    def rate(self) -> float:
        """Calls per second currently allowed (``inf`` when unlimited)."""
        ...


@runtime_checkable
class Reporting(Protocol):
    """A limiter that sends its answers elsewhere (a fleet's, to its leader through Redis):
    a refused caller sleeps on its ``Retry-After`` in ``rest``, which sends those kept
    first, and may end the sleep early for a call the fleet asks of this process (a long
    window's check call: ``FleetRateController.rest``)."""

    async def rest(self, seconds: float) -> None: ...


APART_TOLERANCE = 0.01
"""With a burst of 1, how much of an interval two real starts may lack: a caller a hundredth
of an interval late does not push every later call back."""

WAKE_SLACK_S = 0.001
"""With a burst of 1, two real starts may also lack this much (up to ``APART_MAX`` of an
interval): asyncio's timers wake up to a millisecond late on a quiet machine (``epoll_wait``
takes whole milliseconds, rounded up), by a different amount each time. A tolerance under
that made every wake later than the one before cost its lateness for good: ``--rate 100
--burst 1`` sent 91 calls/s, ``--rate 400`` 316."""

APART_MAX = 0.25
"""The most of an interval the tolerance may be: from 250 calls/s on, two starts are
still three quarters of an interval apart."""


def check_rate(rate: float) -> float:
    if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number of calls per second > 0, not {rate!r}")
    return float(rate)


class TokenBucket:
    """Pure token-bucket arithmetic: ``rate`` tokens per second, at most ``burst`` stored.

    No clock and no I/O: every method takes ``now``. Times passed in must not go backwards.
    State is ``anchor`` (a time) and ``count`` (tokens owed since then), so the bucket is
    full again at ``tat = anchor + count / rate``.
    """

    __slots__ = ("_anchor", "_burst", "_count", "_due", "_rate", "_version")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, not {burst!r}")
        self._rate = check_rate(rate)
        self._burst = burst
        self._anchor = float(now)
        self._count = 0.0
        self._version = 0
        self._due = float(now)  # with a burst of 1: when the next call may really start

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    @property
    def version(self) -> int:
        """Changes with every ``reserve`` and ``set_rate``: names the latest reservation."""
        return self._version

    def _tat(self) -> float:
        return self._anchor + self._count / self._rate

    def tokens(self, now: float) -> float:
        """Tokens available at ``now``; negative when callers are queued (the debt)."""
        return self._burst - max(0.0, self._tat() - now) * self._rate

    def reserve(self, now: float) -> float:
        """Take one token and return the seconds to wait before starting (0 if one was there).

        Reservations are FIFO: a later call never gets an earlier start than an earlier one.
        """
        if self._tat() <= now:
            # Idle long enough to be full: refill only up to the burst, never beyond.
            self._anchor = float(now)
            self._count = 0.0
        self._count += 1.0
        self._version += 1
        start = self._anchor + (self._count - self._burst) / self._rate
        return max(0.0, start - now)

    def refund(self, version: int) -> bool:
        """Give back the token of the reservation that left the bucket at ``version``.

        Only the latest reservation can be refunded (nothing was reserved or changed after
        it): refunding one in the middle of the queue would let a new caller start in the
        same slot as a later waiter, and the server would see more than ``rate`` calls in a
        window. An unrefunded slot is not leaked forever; it costs one ``1 / rate`` of
        throughput once, as time repays all debt. Returns whether the token came back.
        """
        if version != self._version or self._count < 1.0:
            return False
        self._count -= 1.0
        self._version += 1
        return True

    def started(self, at: float) -> None:
        """A call really started at ``at``. The real starts follow GCRA too, with the
        bucket's burst: the next may start one interval after the later of ``at`` and when
        this one was due, less the burst's other intervals (``start_due``). Slots handed out
        before a stall are all past when it ends, and a woken process would start every
        held one at once: a larger burst takes in a late call, not the whole queue.

        With a burst of 1 no slot handed out from now on is earlier either (a late start
        moves the later slots back by what it lost; slots already handed out keep their
        times, ``start_apart`` holds them)."""
        self._due = max(self._due, at) + 1.0 / self._rate
        if self._burst != 1:
            return
        tat = self._tat()
        if tat < self._due:
            self._anchor += self._due - tat

    def tolerance(self) -> float:
        """How much of an interval two real starts may lack with a burst of 1: 1 % of it
        (``APART_TOLERANCE``) or the loop's wake slack (``WAKE_SLACK_S``), whichever is
        more, and at most ``APART_MAX`` of it."""
        return min(max(APART_TOLERANCE, WAKE_SLACK_S * self._rate), APART_MAX) / self._rate

    def start_due(self) -> float:
        """The earliest the next call may really start: never more than the burst and the
        rate allow over any run of real starts, less the ``tolerance`` once (with a burst
        of 1, one interval after the last real start)."""
        return self._due - (self._burst - 1) / self._rate - self.tolerance()

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate from ``now`` on, keeping every start time already handed out.

        Unused tokens are kept as tokens. When callers are queued, the next reservation
        starts ``1 / rate`` (the new rate) after the last one handed out, so a rate increase
        never lets a newcomer overtake a waiter and a decrease takes effect at once.
        """
        new = check_rate(rate)
        old = self._rate
        tat = self._tat()
        last_start = self._anchor + (self._count - self._burst) / old
        if tat <= now:
            self._anchor, self._count = float(now), 0.0
        elif last_start <= now:
            self._anchor, self._count = float(now), (tat - now) * old
        else:
            self._anchor, self._count = last_start, float(self._burst)
        self._rate = new
        self._version += 1

    def __repr__(self) -> str:
        return (
            f"TokenBucket(rate={self._rate:g}, burst={self._burst}, "
            f"anchor={self._anchor:g}, count={self._count:g})"
        )


async def start_apart(
    clock: Clock, bucket: Callable[[], TokenBucket], last: Callable[[], float]
) -> float:
    """Wait until the bucket says the next call may really start (``TokenBucket.start_due``:
    after a stall, the calls whose slots went by meanwhile start at the burst and the rate,
    not together) and, with a burst of 1, at least an interval less the bucket's
    ``tolerance`` has passed since ``last()`` (the real start of the call before, read
    again after every wait: two callers waiting on the same start must not both go, and a
    limiter that took a new bucket keeps its last start); tell the bucket, and return the
    time this call starts, which the caller stores as ``last()`` before anything else
    runs. A caller woken late is thus never followed by one on its own slot less than an
    interval later.

    ``bucket`` gives the limiter's bucket of the moment, read again after every wait: a
    limiter whose rate was cut while this caller waited (``--rate auto`` takes a new bucket
    at the new rate) spaces it at the new rate, not at the one its wait was computed at."""
    while True:
        now_bucket = bucket()
        due = now_bucket.start_due()
        if now_bucket.burst == 1:
            due = max(due, last() + 1.0 / now_bucket.rate - now_bucket.tolerance())
        if (wait := due - clock.now()) <= 0.0:
            break
        await clock.sleep(wait)
    now = clock.now()
    now_bucket.started(now)
    return now


class FixedRate:
    """For limiters with nothing to learn: answers do not change their rate."""

    __slots__ = ()

    def feedback(
        self,
        *,
        throttled: bool,
        latency_s: float | None = None,
        retry_after: float | None = None,
        overloaded: bool = False,
    ) -> None:
        """A fixed rate: nothing to learn."""


class LocalRateLimiter(FixedRate):
    """A ``TokenBucket`` in one process, waited on with an injected ``Clock``.

    ``acquire`` raises at once if already cancelled (taking no token). With a token free it
    returns without a trip round the event loop: the caller's call is what it is for, and
    it yields there; a trip here put each slot behind the others' work before every call
    (0.4-1.2 ms a call at 20 ms latency, ``bench_sdk``'s ``slot_waits``). A waiter
    cancelled while sleeping gives its token back when it holds the latest reservation;
    otherwise its slot goes unused once (see ``TokenBucket.refund``), which keeps the
    no-more-than-``rate`` promise to the server.
    """

    __slots__ = ("_bucket", "_clock", "_last")

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        self._clock = clock
        self._bucket = TokenBucket(rate, burst, clock.now())
        self._last = -math.inf  # the real start of the last call

    @property
    def rate(self) -> float:
        return self._bucket.rate

    @property
    def burst(self) -> int:
        return self._bucket.burst

    def tokens(self) -> float:
        """Tokens available now; negative when callers are queued."""
        return self._bucket.tokens(self._clock.now())

    def set_rate(self, rate: float) -> None:
        """Change the rate from now on (the adaptive controller's lever)."""
        self._bucket.set_rate(rate, self._clock.now())

    async def acquire(self) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        wait = self._bucket.reserve(self._clock.now())
        if wait > 0.0:
            version = self._bucket.version
            try:
                await self._clock.sleep(wait)
            except BaseException:
                self._bucket.refund(version)
                raise
        self._last = await start_apart(self._clock, lambda: self._bucket, lambda: self._last)

    def __repr__(self) -> str:
        return (
            f"LocalRateLimiter(rate={self.rate:g}, burst={self.burst}, tokens={self.tokens():.3f})"
        )


class UnlimitedRateLimiter(FixedRate):
    """Never waits: for dry runs and tests that are not about pacing. Counts its grants."""

    __slots__ = ("acquired",)

    def __init__(self) -> None:
        self.acquired = 0

    @property
    def rate(self) -> float:
        return math.inf

    async def acquire(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.acquired += 1

    def __repr__(self) -> str:
        return f"UnlimitedRateLimiter(acquired={self.acquired})"
