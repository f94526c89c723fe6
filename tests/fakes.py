"""Fakes shared by the tests. ``FakeClock``: virtual time, so no test ever really sleeps;
``paced_sends``: calls through a limiter on that time."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import anyio

from worker.ratelimit import RateLimiter


@dataclass(order=True, slots=True)
class _Sleeper:
    deadline: float
    seq: int
    fired: bool = field(default=False, compare=False)
    wake: anyio.Event = field(default_factory=anyio.Event, compare=False)


class FakeClock:
    """A ``worker.clock.Clock`` on virtual time that jumps ahead when the loop goes quiet.

    ``sleep(s)`` registers a wake-up at ``now() + s``. The sleeper due first (earliest
    deadline, then first to sleep) yields to the loop ``settle`` times; if no other task
    started or ended a sleep meanwhile, every task that was ready has had its turn, so it
    moves virtual time to its deadline and wakes, together with every sleeper due at that
    same instant, in the order they went to sleep. Sleepers therefore wake exactly at their
    deadlines, in deadline order, and runs are deterministic. Only the first sleeper polls;
    the others wait on an event. ``sleep(0)`` just yields.

    Time also jumps while a task waits on real I/O (a loopback HTTP call), as with trio's
    autojump clock: virtual time only promises an order, not a relation to real time.
    ``advance(s)`` moves time by hand and wakes whoever is due; with ``autojump=False`` it
    is the only thing that moves time, for tests that act on a task while it sleeps.
    """

    def __init__(self, start: float = 0.0, *, autojump: bool = True, settle: int = 5) -> None:
        self._now = float(start)
        self._autojump = autojump
        self._settle = settle
        self._sleepers: list[_Sleeper] = []
        self._seq = itertools.count()
        self._generation = 0
        self.sleeps: list[float] = []
        """Every ``sleep`` request, in seconds, in the order made: what tests assert on."""

    def now(self) -> float:
        return self._now

    @property
    def pending(self) -> int:
        """Sleepers not yet woken."""
        return len(self._sleepers)

    def advance(self, seconds: float) -> None:
        """Move virtual time forward by hand, waking every sleeper due by then."""
        if seconds < 0:
            raise ValueError("virtual time never goes back")
        self._fire_until(self._now + seconds)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if seconds <= 0:
            await anyio.sleep(0)
            return
        me = _Sleeper(self._now + seconds, next(self._seq))
        heapq.heappush(self._sleepers, me)
        self._generation += 1
        try:
            while not me.fired:
                if self._autojump and self._sleepers[0] is me:
                    seen = self._generation
                    for _ in range(self._settle):
                        await anyio.sleep(0)
                    if not me.fired and self._generation == seen and self._sleepers[0] is me:
                        self._fire_until(me.deadline)
                else:
                    me.wake = anyio.Event()
                    await me.wake.wait()
        finally:
            if not me.fired:  # cancelled: leave the queue, and hand the lead on if we had it
                self._sleepers.remove(me)
                heapq.heapify(self._sleepers)
                self._generation += 1
                self._wake_leader()

    def _fire_until(self, when: float) -> None:
        self._now = max(self._now, when)
        while self._sleepers and self._sleepers[0].deadline <= self._now:
            due = heapq.heappop(self._sleepers)
            due.fired = True
            due.wake.set()
        self._generation += 1
        self._wake_leader()

    def _wake_leader(self) -> None:
        if self._sleepers:
            self._sleepers[0].wake.set()

    def __repr__(self) -> str:
        mode = "" if self._autojump else ", autojump=False"
        return f"FakeClock(now={self._now:g}, pending={len(self._sleepers)}{mode})"


async def paced_sends(
    limiter: RateLimiter, clock: FakeClock, *, until: float, workers: int, latency: float
) -> list[float]:
    """When each call started: ``workers`` tasks send through ``limiter`` on virtual time
    until ``until``, each call answered with a success ``latency`` after it starts."""
    sends: list[float] = []

    async def worker() -> None:
        while clock.now() < until:
            await limiter.acquire()
            sends.append(clock.now())
            await clock.sleep(latency)
            limiter.feedback(throttled=False, latency_s=latency)

    async with anyio.create_task_group() as group:
        for _ in range(workers):
            group.start_soon(worker)
    return sends
