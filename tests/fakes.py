"""Fakes shared by the tests. ``FakeClock``: virtual time, so no test ever really sleeps;
``paced_sends``: calls through a limiter on that time; ``simulate``: a rate controller
against a server's token bucket, on virtual time (the controller's tests and the sweep of
quotas in ``tests/benchmarks/bench_rate.py``)."""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio

from worker.pacing.bucket import RateLimiter
from worker.pacing.controller import PacedController, RateController, answer
from worker.simulator.quota import TokenBucket as ServerQuota
from worker.simulator.quota import WindowCount, retry_after_seconds

_T = TypeVar("_T")


@dataclass(order=True, slots=True)
class _Sleeper:
    deadline: float
    seq: int
    fired: bool = field(default=False, compare=False)
    wake: anyio.Event = field(default_factory=anyio.Event, compare=False)


class OneAtATime:
    """Real I/O (Redis, loopback HTTP) under a ``FakeClock``: calls go one at a time, first
    come first served, and ``out`` says whether one is (the clock's ``busy``: virtual time
    stands still meanwhile). Which of two calls made at one virtual instant is answered
    first then does not depend on the machine's load: a run is the same every time."""

    def __init__(self) -> None:
        self.out = 0
        self._turn = anyio.Lock()

    async def call(self, make: Callable[[], Awaitable[_T]]) -> _T:
        self.out += 1
        try:
            async with self._turn:
                return await make()
        finally:
            self.out -= 1


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
    ``busy``: while it says so (a test's calls to a real Redis are out), time does not jump.
    """

    def __init__(
        self,
        start: float = 0.0,
        *,
        autojump: bool = True,
        settle: int = 5,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self._now = float(start)
        self._wall_start = time.time() - self._now
        self._busy = busy
        self._autojump = autojump
        self._settle = settle
        self._sleepers: list[_Sleeper] = []
        self._seq = itertools.count()
        self._generation = 0
        self.sleeps: list[float] = []
        """Every ``sleep`` request, in seconds, in the order made: what tests assert on."""

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        """The system's clock, moving with virtual time from the real time it was made."""
        return self._wall_start + self._now

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
                    if (
                        not me.fired
                        and self._generation == seen
                        and self._sleepers[0] is me
                        and not self._busy()
                    ):
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


class StalledClock(FakeClock):
    """A ``FakeClock`` whose loop is descheduled from ``stall_from`` to ``stall_to``: every
    sleep due in between wakes at ``stall_to``, as every timer of a process a loaded machine
    did not run. What a late wake does to pacing, on virtual time."""

    def __init__(self, stall_from: float, stall_to: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stall = (stall_from, stall_to)

    async def sleep(self, seconds: float) -> None:
        due = self.now() + seconds
        if self.stall[0] <= due < self.stall[1]:
            seconds = self.stall[1] - self.now()
        await super().sleep(seconds)


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


class Run:
    """What a simulated run saw: send times of accepted and refused calls, and the rates."""

    def __init__(self) -> None:
        self.ok: list[float] = []
        self.refused: list[float] = []
        self.unavailable: list[float] = []  # accepted by the gateway, answered 503 (``service``)
        self.rates: list[tuple[float, float]] = []

    def accepted_per_s(self, start: float, end: float) -> float:
        return sum(start <= t < end for t in self.ok) / (end - start)

    def refused_share(self, start: float, end: float) -> float:
        ok = sum(start <= t < end for t in self.ok)
        refused = sum(start <= t < end for t in self.refused)
        return refused / max(1, ok + refused)


class SteadyController:
    """A controller that keeps one rate whatever it is told: the pacing alone."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def pause_until(self) -> float:
        return -math.inf

    def rate_at(self, now: float) -> float:
        return self.rate

    def on_sent(self, now: float) -> None:
        pass

    def on_success(self, now: float, latency: float | None = None) -> float:
        return self.rate

    def on_throttle(
        self, now: float, retry_after: float | None = None, latency: float | None = None
    ) -> float:
        return self.rate

    def on_overload(self, now: float, latency: float | None = None) -> float:
        return self.rate


class Gateway(Protocol):
    """What ``simulate`` asks of a gateway: 0.0 for a call it accepts, else the seconds
    until it would accept one (its ``Retry-After``, before rounding)."""

    def try_acquire(self, now: float) -> float: ...


class FixedWindow:
    """A gateway that counts calls per whole second (the count starts again at each): at
    most ``quota`` accepted in a second, and every call past them refused until the next,
    so its refusals come in clumps, not spread as a token bucket's. ``span``: a window of
    that many seconds instead, counting ``quota * span`` calls (a quota stated per second,
    enforced per 10 s or per minute)."""

    def __init__(self, quota: float, now: float, *, span: float = 1.0) -> None:
        self.limit = max(1, round(quota * span))
        self.span = span
        self.second, self.count = math.floor(now / span), 0

    def try_acquire(self, now: float) -> float:
        """0.0 for an accepted call, else the seconds until the next window."""
        if math.floor(now / self.span) != self.second:
            self.second, self.count = math.floor(now / self.span), 0
        if self.count < self.limit:
            self.count += 1
            return 0.0
        return (self.second + 1.0) * self.span - now


class SlidingWindow(WindowCount):
    """A sliding-window log: at most ``quota * span`` calls accepted in any rolling ``span``
    seconds (the log holds the accepted calls' times; a refused call is not logged), so
    an even pace under the quota is never refused, and a burst of the window's whole count
    is let through at once. The simulator's (``simulate --window-kind sliding``)."""

    def __init__(self, quota: float, now: float, *, span: float = 1.0) -> None:
        super().__init__(quota, span, "sliding", now)


class Stacked:
    """Two quotas at once: a call passes ``front`` first (and spends its token there even
    when ``back`` then refuses it), then ``back``."""

    def __init__(self, front: Gateway, back: Gateway) -> None:
        self.front, self.back = front, back

    def try_acquire(self, now: float) -> float:
        wait = self.front.try_acquire(now)
        return wait if wait > 0 else self.back.try_acquire(now)


class Queueing:
    """A service that queues: each call it serves takes ``base / (1 - load / capacity)``
    (drawn exponential around that), its load the calls it served in the last second, and
    answers 503 at once (shedding the call) when that load reaches its capacity. ``span``:
    the load is the calls served over that many seconds, per second."""

    def __init__(
        self, capacity: float, base: float, draws: random.Random, span: float = 1.0
    ) -> None:
        self.capacity, self.base, self.draws, self.span = capacity, base, draws, span
        self.arrivals: deque[float] = deque()

    def __call__(self, now: float) -> tuple[bool, float]:
        arrivals = self.arrivals
        while arrivals and arrivals[0] <= now - self.span:
            arrivals.popleft()
        load = len(arrivals) / self.span
        if load >= self.capacity:
            return True, 0.002
        arrivals.append(now)
        return False, self.draws.expovariate(1.0 - load / self.capacity) * self.base


class Averaged:
    """A service that sheds with 503 ``1 - capacity / arrivals`` of its calls, its arrivals
    averaged over the last 10 s (``span`` s): after a cut its 503s fall over seconds, not
    at once."""

    def __init__(
        self, capacity: float, latency: float, draws: random.Random, span: float = 10.0
    ) -> None:
        self.capacity, self.latency, self.draws, self.span = capacity, latency, draws, span
        self.arrivals: deque[float] = deque()

    def arrived(self, now: float) -> int:
        """A call at ``now``: the calls that came over the last 10 s, this one with them."""
        arrivals = self.arrivals
        while arrivals and arrivals[0] <= now - self.span:
            arrivals.popleft()
        arrivals.append(now)
        return len(arrivals)

    def __call__(self, now: float) -> tuple[bool, float]:
        rate = self.arrived(now) / min(self.span, max(now, 1.0))
        if self.draws.random() < 1.0 - self.capacity / rate:
            return True, 0.002
        return False, self.draws.expovariate(1.0 / self.latency)


def simulate(
    quota: Callable[[float], float],
    *,
    duration: float,
    burst: int = 1,
    latency: float | Callable[[float], float] = 0.002,
    concurrency: int = 8,
    controller: PacedController | None = None,
    jitter: Callable[[], float] | None = None,
    windowed: bool = False,
    refusal_latency: float | None = None,
    retry_wait: Callable[[float], float] | None = None,
    gateway: Callable[[float, float], Gateway] | None = None,
    retry_after: Callable[[float, float], float | None] | None = None,
    service: Callable[[float], tuple[bool, float]] | None = None,
    workers: int | None = None,
) -> Run:
    """Calls paced at the controller's rate against a token-bucket server (as the
    simulator's), answered ``latency`` later (or ``latency(rate)`` later: a draw for a
    call sent at that rate); 429s carry Retry-After in whole seconds. ``jitter``: how
    late each call leaves after its start (a draw: a loaded loop's send jitter), in the
    order they started, so a late one and the next may leave back to back; its latency
    is timed from its start. ``windowed``: a ``FixedWindow`` gateway, not a token bucket.
    ``refusal_latency``: 429s are answered this long after they leave, not ``latency``
    later: as the simulator's (and a real gateway's), which refuses a call before it
    reaches the service, so a refusal overtakes the answers of calls sent before it.
    ``retry_wait``: a refused call's worker sleeps ``retry_wait(retry_after)`` after its 429
    comes back, as the dispatcher's worker sleeps the retry policy's delay before sending
    it again (its retry is the next call: the work never runs out); without it a refusal
    frees its worker at once. ``workers``: the dispatchers sending (``concurrency``, when
    not given): at most ``concurrency`` calls in flight and ``workers`` busy, in flight or
    asleep. With ``workers`` equal to ``concurrency`` (the dispatcher before it bounded
    the calls on the wire) a worker asleep keeps its place among those in flight; with
    twice as many (the pool's now: ``Working.tasks``) it frees the place while it waits.

    Foreign gateways: ``gateway(quota, now)`` makes the gateway (a ``Gateway``; made again
    when the quota changes) in place of the token bucket. ``retry_after(wait, now)``: what
    the client reads of a refusal's ``Retry-After`` header (``None``: none) for a refusal
    ``wait`` s before the gateway would accept, at ``now``; by default whole seconds,
    rounded up. ``service(now)``: the service behind the gateway, for each call it lets
    through at ``now``: whether it answers 503, and how long it takes (in place of
    ``latency``)."""
    ctrl = controller or RateController(0.0)
    tasks = concurrency if workers is None else workers

    def make(rate: float, now: float) -> Gateway:
        if gateway is not None:
            return gateway(rate, now)
        return FixedWindow(rate, now) if windowed else ServerQuota(rate, burst, now)

    def header(wait: float, now: float) -> float:
        if retry_after is None:
            return float(retry_after_seconds(wait))
        said = retry_after(wait, now)
        return -1.0 if said is None else said  # -1: no header (a heap entry must compare)

    server = make(quota(0.0), 0.0)
    current = quota(0.0)
    run = Run()
    now = next_slot = left = 0.0
    in_flight: list[tuple[float, bool, float, float, bool]] = []
    waiting: list[float] = []  # when each refused call's worker sends again (``retry_wait``)
    while now < duration:
        if quota(now) != current:
            current = quota(now)
            server = make(current, now)
        while in_flight and in_flight[0][0] <= now:
            done, ok, said, took, failed = heapq.heappop(in_flight)
            answer(
                ctrl, done, throttled=not ok, latency_s=took,
                retry_after=None if said < 0 else said, overloaded=failed,
            )  # fmt: skip
            if not ok and retry_wait is not None:
                heapq.heappush(waiting, done + retry_wait(max(said, 0.0)))
        while waiting and waiting[0] <= now:
            heapq.heappop(waiting)
        rate = ctrl.rate_at(now)
        if now < ctrl.pause_until():
            now = next_slot = max(next_slot, ctrl.pause_until())
            continue
        busy = len(in_flight) + len(waiting)
        if len(in_flight) >= concurrency or busy >= tasks or now < next_slot:
            candidates = [next_slot] if now < next_slot else []
            if in_flight:
                candidates.append(in_flight[0][0])
            if waiting:
                candidates.append(waiting[0])
            now = max(now, min(candidates))
            continue
        ctrl.on_sent(now)
        left = max(left, now + jitter()) if jitter else now
        wait = server.try_acquire(left)
        failed = False
        if wait > 0 and refusal_latency is not None:
            took = left - now + refusal_latency
        elif wait <= 0 and service is not None:
            failed, served = service(left)
            took = left - now + served
        else:
            took = left - now + (latency(rate) if callable(latency) else latency)
        (run.ok if wait <= 0 and not failed else run.unavailable if failed else run.refused).append(
            now
        )
        entry = (now + took, wait <= 0, header(wait, left) if wait > 0 else 1.0, took, failed)
        heapq.heappush(in_flight, entry)
        run.rates.append((now, rate))
        next_slot = now + 1.0 / rate
    return run


def quota_change(kind: str, offset: float, *, burst: int, latency: float) -> tuple[Run, float]:
    """Issue 23's quota change on virtual time: 50 calls/s, 20 from 30 s, 50 again from
    60 s, the fall (``kind`` "fall") or the rise ``offset`` s later, 8 in flight, each call
    answered ``latency`` after it starts. The run, and when the change came."""
    fall, rise = (30.0 + offset, 60.0) if kind == "fall" else (30.0, 60.0 + offset)
    run = simulate(lambda t: 50.0 if t < fall or t >= rise else 20.0, duration=rise + 30.0,
                   burst=burst, latency=latency, concurrency=8)  # fmt: skip
    return run, fall if kind == "fall" else rise


def followed_after(run: Run, start: float, end: float, quota: float) -> float:
    """Seconds from ``start`` to the last rate paced before ``end`` more than 10 % from
    ``quota`` (0: none): every rate paced later is within 10 % of it."""
    outside = [t for t, rate in run.rates if start <= t < end and abs(rate - quota) > 0.1 * quota]
    return max(outside, default=start) - start
