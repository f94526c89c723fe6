"""One paced call: ask the breaker, take a rate token, send, tell the limiter and the breaker
how it went, and on a transient failure wait and send again.

Every API call of a run goes through :class:`PacedCall`: the DELETEs and show calls of the
dispatcher, the show and list calls of the guard and of ``discover`` (:class:`PacedReader`).
So they all share one order of things, which is what keeps a strict gateway content:

1. the breaker first (``BreakerGate.admit``): while the API is down a call waits here,
   holding no rate token, so that when the API comes back the waiting calls take tokens in
   turn and go out paced, not in one burst behind the probe;
2. a place on the wire (``Working.take_place``: ``--concurrency`` calls out at most), held
   until the answer is in;
3. a rate token (``RateLimiter.acquire``), after the place: the call leaves at its token's
   time, so the calls stay paced however the places free;
4. the call, and only the call, timed: the limiter is fed its latency, not the time spent
   waiting for the breaker, a place or a token;
5. the answer fed to the limiter (throttled, overloaded: a 503, latency, ``Retry-After``)
   and to the breaker, whatever kind of call it was;
6. a transient failure: the retry policy decides, and the wait is the longer of its delay
   and what is left of the breaker's cool-down, so a ``retrying`` hook reports the wait
   really sat out. A throttle never spends the budget that ends a run: the server is up.
   The wait holds no place on the wire: the other tasks' calls use it meanwhile.

Waiting for the breaker, a place, a token or a back-off is *waiting*, not working (``Working``): a
stopping run cancels it at once and the ids stay open. Once the run is stopping, nothing
more is sent: the call raises :class:`Stopped`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import anyio

from worker.clock import Clock
from worker.errors import (
    ApiError,
    ApiUnavailable,
    NotFound,
    ReaperError,
    ServerError,
    ThrottledError,
    TransientError,
)
from worker.pacing.breaker import FAILURES
from worker.pacing.bucket import RateLimiter, Reporting
from worker.pacing.retry import RetryPolicy

if TYPE_CHECKING:
    from worker.api.client import JobPage
    from worker.pacing.breaker import BreakerGate
    from worker.types import JobRecord

T = TypeVar("T")


class Stopped(ReaperError):
    """The run is stopping: nothing more was sent, and the work stays open."""


class LaneWatch(Protocol):
    """What ``worker.routing`` learns of an endpoint's batches from their calls."""

    def sleeping(self, change: int) -> None:
        """A task of the lane fell asleep (``+1``) on a Retry-After or a back-off, or woke
        (``-1``)."""

    def heard(self, answered: bool) -> None:
        """A call of the lane was answered, or not: a 5xx, a timeout, a reset, a body cut
        short (what the breaker counts as the API failing)."""


_LANE: ContextVar[LaneWatch | None] = ContextVar("devserver_reaper_lane", default=None)
"""The lane the current task sends for (``Working.lane``): its sleeps and answers are told
to it."""


class Working:
    """How many tasks are working right now: a call on the wire, an answer or a skip being
    settled, a protection lookup. A stopping run waits for those, and for nothing else: a
    task waiting for the breaker, a place on the wire, a token or a back-off (``waiting``,
    inside the caller's ``busy``) can be cancelled at once, its batch left open.

    And the places on the wire (``places``: ``--concurrency``): at most that many calls
    are out at once, whatever number of tasks send them. A call holds its place from just
    before it waits for its token until its answer is in (``take_place``,
    ``free_place``); a task asleep on a refusal's ``Retry-After`` or a back-off holds none,
    so the others keep ``places`` calls on the wire meanwhile. Places go first come, first
    served. ``None``: no bound here (each task sends one call at a time: as many calls as
    tasks).

    And the batches in hand (``take_hand``): at most ``places`` besides those whose task is
    asleep on a ``Retry-After`` or a back-off (``sleeping``), so the dispatchers beyond
    ``places`` (``tasks``) only stand in for those asleep; and ``spare`` more (one once the
    endpoints share the places, ``worker.routing.FairShare``: a hand free to bring in
    another endpoint's batch while one endpoint's calls take every place)."""

    __slots__ = ("_hands", "_idle", "_queue", "_token_waits", "asleep", "count", "in_hand",
                 "most_on_wire", "on_wire", "places", "spare", "stopped")  # fmt: skip

    def __init__(self, places: int | None = None) -> None:
        if places is not None and places < 1:
            raise ValueError("places must be at least 1")
        self.count = 0
        self._idle: anyio.Event | None = None
        self.places = places
        self.on_wire = 0
        self.most_on_wire = 0  # the most calls on the wire at once: what tests assert on
        self._queue: deque[anyio.Event] = deque()
        self.in_hand = 0  # batches in dispatchers' hands (``take_hand``)
        self.asleep = 0  # tasks asleep on a Retry-After or a back-off (``sleeping``)
        self.spare = 0  # hands beyond ``places`` (``take_hand``)
        self._hands: anyio.Event | None = None
        self.stopped = False  # the round stops: no token is waited for (``stop``)
        self._token_waits: set[anyio.CancelScope] = set()

    def stop(self) -> None:
        """The round stops: every wait for a rate token ends now, and none starts
        (``token_wait``). Those waits are not work, and a stopping process that went on
        reserving while a call of its own was on the wire took a fleet's slots (seven at 5
        calls/s, 1.4 s of a rolling update's quota) to send nothing in them."""
        self.stopped = True
        for scope in self._token_waits:
            scope.cancel()

    def start(self) -> None:
        """A round of work begins (``serve`` runs one again after a pause)."""
        self.stopped = False

    @contextmanager
    def token_wait(self) -> Iterator[None]:
        """A wait for a rate token that ``stop`` ends (at once if stopped already): it
        returns then as if done, with no token; the caller sends nothing (``stopped``).
        A limiter cancelled in its wait gives its slot back where it can."""
        with anyio.CancelScope() as scope:
            if self.stopped:
                scope.cancel()
            self._token_waits.add(scope)
            try:
                yield
            finally:
                self._token_waits.discard(scope)

    async def take_hand(self) -> None:
        """Before a dispatcher takes a batch: wait while ``places`` batches are in hand and
        awake, then count one more. So the extra dispatchers (``tasks``) stand in for those
        asleep only: batches are not read, checked or held further ahead than before."""
        while self.places is not None and self.in_hand - self.asleep >= self.places + self.spare:
            if self._hands is None:
                self._hands = anyio.Event()
            await self._hands.wait()
        self.in_hand += 1

    def free_hand(self) -> None:
        """The dispatcher is done with its batch (or took none)."""
        self.in_hand -= 1
        self._more_hands()

    @contextmanager
    def sleeping(self) -> Iterator[None]:
        """Asleep on a Retry-After or a back-off: another dispatcher may take a batch, and
        the task's lane (``lane``) is told."""
        lane = _LANE.get()
        self.asleep += 1
        if lane is not None:
            lane.sleeping(1)
        self._more_hands()
        try:
            yield
        finally:
            self.asleep -= 1
            if lane is not None:
                lane.sleeping(-1)

    @contextmanager
    def lane(self, watch: LaneWatch) -> Iterator[None]:
        """The current task sends for ``watch``'s lane meanwhile: its sleeps and its calls'
        answers (``heard``) are told."""
        token = _LANE.set(watch)
        try:
            yield
        finally:
            _LANE.reset(token)

    @staticmethod
    def heard(answered: bool) -> None:
        """A call of the current task's lane was answered, or not (``LaneWatch.heard``)."""
        lane = _LANE.get()
        if lane is not None:
            lane.heard(answered)

    def _more_hands(self) -> None:
        if self._hands is not None:
            self._hands.set()
            self._hands = None

    def tasks(self, concurrency: int) -> int:
        """How many dispatcher tasks keep ``concurrency`` calls on the wire: twice as many
        when the places bound the calls, so that as many as ``concurrency`` tasks may sit
        out a ``Retry-After`` or a back-off while the others fill every place; else one a
        place, as a task that waits holds its place."""
        return concurrency if self.places is None else 2 * concurrency

    @contextmanager
    def busy(self) -> Iterator[None]:
        self.count += 1
        try:
            yield
        finally:
            self._less()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Inside ``busy``: not working for a while (the breaker, a token, a back-off)."""
        self._less()
        try:
            yield
        finally:
            self.count += 1

    async def take_place(self) -> None:
        """Wait for a place on the wire (at once while one is free and nobody waits)."""
        if self.places is None or (self.on_wire < self.places and not self._queue):
            self._on()  # no trip round the loop: the call yields soon enough
            return
        turn = anyio.Event()
        self._queue.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # handed a place as it was cancelled: the next one's now
                self.free_place()
            else:
                self._queue.remove(turn)
            raise

    def free_place(self) -> None:
        """A call's answer is in (or it never went): its place goes to the first waiting."""
        if self._queue:
            self._queue.popleft().set()  # handed on: as many on the wire as before
            return
        self.on_wire -= 1

    def _on(self) -> None:
        self.on_wire += 1
        self.most_on_wire = max(self.most_on_wire, self.on_wire)

    async def idle(self) -> None:
        """Return once nobody is working."""
        while self.count > 0:
            self._idle = anyio.Event()
            await self._idle.wait()

    def _less(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    def __repr__(self) -> str:
        if self.places is None:
            return f"Working(count={self.count})"
        return f"Working(count={self.count}, on_wire={self.on_wire}/{self.places})"


@dataclass(slots=True)
class Tries:
    """The attempts spent on one piece of work, across its calls: the retry budget.

    A batch whose 200 left ids behind is sent again on the same ``Tries``, so its budget is
    the batch's, not the call's."""

    attempt: int = 0
    throttled: int = 0
    sent: int = 0  # attempts that went out (one stopped or failed at the breaker did not)


Sending = Callable[[int], Awaitable[None]]
"""Attempt number ``n`` is about to be sent (the ledger marks its ids sent)."""

Retrying = Callable[[TransientError, int, float, str], Awaitable[None]]
"""``(error, n, delay_s, reason)``: an attempt failed with ``error``; attempt ``n`` follows
after ``delay_s``, the wait really sat out; ``reason`` as the retry policy names it."""


class PacedCall:
    """Calls through the breaker and the rate limiter, retried on transient failures.

    One per run, shared by every caller: the dispatchers and the guard's reads take tokens
    from the same limiter, so together they keep to the quota.
    """

    __slots__ = ("_clock", "_gate", "_limiter", "_policy", "_stopping", "_working", "calls",
                 "retries")  # fmt: skip

    def __init__(
        self,
        *,
        limiter: RateLimiter,
        policy: RetryPolicy,
        clock: Clock,
        gate: BreakerGate | None = None,
        stopping: Callable[[], bool] = lambda: False,
        working: Working | None = None,
    ) -> None:
        self._limiter = limiter
        self._policy = policy
        self._clock = clock
        self._gate = gate
        self._stopping = stopping
        self._working = working
        self.calls = 0
        self.retries = 0

    def __repr__(self) -> str:
        return (
            f"PacedCall(calls={self.calls}, retries={self.retries}, limiter={self._limiter!r}, "
            f"gate={self._gate!r})"
        )

    @property
    def working(self) -> Working | None:
        return self._working

    def _waiting(self) -> AbstractContextManager[None]:
        return self._working.waiting() if self._working is not None else nullcontext()

    def waiting(self) -> AbstractContextManager[None]:
        """A caller's wait that is not work (``Working.waiting``): a stop cancels it at once."""
        return self._waiting()

    def _sleeping(self) -> AbstractContextManager[None]:
        return self._working.sleeping() if self._working is not None else nullcontext()

    async def __call__(
        self,
        send: Callable[[], Awaitable[T]],
        *,
        what: str,
        open_ids: int = 1,
        tries: Tries | None = None,
        sending: Sending | None = None,
        retrying: Retrying | None = None,
    ) -> T:
        """``send()`` until it answers; its answer, or the ``PermanentError`` it raised.

        Raises ``Stopped`` when the run is stopping (nothing more is sent), and
        ``ApiUnavailable`` (naming ``what`` and its ``open_ids``) when the budget is spent.
        """
        tries = tries if tries is not None else Tries()
        while True:
            try:
                return await self._attempt(send, tries, sending)
            except TransientError as exc:
                tries.throttled += isinstance(exc, ThrottledError)
                if self._stopping():
                    raise Stopped("stopping") from None
                decision = self._policy.decide(exc, tries.attempt, throttled=tries.throttled)
                if not decision.retry:
                    raise ApiUnavailable(exc, batch_id=what, open_ids=open_ids) from None
                wait = decision.delay_s
                if self._gate is not None:
                    wait = max(wait, self._gate.closed_for())
                self.retries += 1
                if retrying is not None:
                    await retrying(exc, tries.attempt + 1, wait, decision.reason)
                with self._waiting(), self._sleeping():
                    if isinstance(exc, ThrottledError) and isinstance(self._limiter, Reporting):
                        await self._limiter.rest(wait)  # (a fleet's leader hears it now)
                    else:
                        await self._clock.sleep(wait)
                if self._stopping():
                    raise Stopped("stopping") from None

    async def _attempt(
        self, send: Callable[[], Awaitable[T]], tries: Tries, sending: Sending | None
    ) -> T:
        """One attempt: the breaker, a place on the wire, a token, the call. A failed probe
        the attempt waited on is the attempt's failure: it raises that probe's error
        without sending. The place is taken before the token, so a call leaves when its
        token says (paced), not when some place frees; it is given back with the answer."""
        tries.attempt += 1
        gate = self._gate
        with self._waiting():
            probe = False if gate is None else await gate.admit(self._stopping)
        placed = False
        working = self._working
        try:
            with self._waiting():
                if working is None:
                    await self._limiter.acquire()
                else:
                    await working.take_place()
                    placed = True
                    # A stopping process reserves no more of the rate (a fleet's slots).
                    if not self._stop_asked():
                        with working.token_wait():
                            await self._limiter.acquire()
            # Asked again, not twice for nothing: a stop may come during the waits above.
            stopping = self._stop_asked()  # then nothing more is sent
            if not stopping and sending is not None:
                await sending(tries.attempt)
        except BaseException:
            self._unplace(placed)
            if gate is not None:
                gate.release(probe)
            raise
        if stopping:
            self._unplace(placed)
            if gate is not None:
                gate.release(probe)
            raise Stopped("stopping")
        started = self._clock.now()
        self.calls += 1
        tries.sent += 1
        try:
            result = await send()
        except BaseException as exc:
            self._unplace(placed)
            if gate is not None:
                gate.record(exc, probe=probe)
            if isinstance(exc, ApiError):
                self._feedback(exc, self._clock.now() - started)
            if isinstance(exc, Exception):  # a cancellation says nothing of the endpoint
                Working.heard(isinstance(exc, ApiError) and not isinstance(exc, FAILURES))
            raise
        self._unplace(placed)
        Working.heard(True)
        if gate is not None:
            gate.record(None, probe=probe)
        self._feedback(None, self._clock.now() - started)
        return result

    def _stop_asked(self) -> bool:
        """The run or service is stopping (``stopping``), or the pool (``Working.stop``)."""
        return self._stopping() or (self._working is not None and self._working.stopped)

    def _unplace(self, placed: bool) -> None:
        if placed and self._working is not None:
            self._working.free_place()

    def _feedback(self, error: ApiError | None, latency_s: float) -> None:
        throttled = isinstance(error, ThrottledError)
        self._limiter.feedback(
            throttled=throttled,
            latency_s=latency_s,
            retry_after=error.retry_after if isinstance(error, ThrottledError) else None,
            # A 503 is the server saying it is overloaded: an adaptive limiter weighs it.
            overloaded=isinstance(error, ServerError) and error.http_status == 503,
        )


class ReadApi(Protocol):
    """The read calls (``worker.api.client.ApiClient`` is one)."""

    async def get_job(self, job_id: str) -> JobRecord: ...

    async def list_jobs(self, **filters: str | int | bool) -> JobPage: ...


class PacedReader:
    """Show and list calls through a ``PacedCall``: the same breaker, limiter and retry
    policy as the DELETEs, so reads and deletes together stay within the quota, and a 429
    or a 5xx on a read is handled like one on a DELETE. When the budget runs out the API is
    unavailable (``ApiUnavailable``, exit 69); when the run stops, ``Stopped``.
    """

    __slots__ = ("_api", "_paced", "calls", "retries")

    def __init__(
        self,
        *,
        api: ReadApi,
        limiter: RateLimiter | None = None,
        policy: RetryPolicy | None = None,
        clock: Clock | None = None,
        stopping: Callable[[], bool] = lambda: False,
        paced: PacedCall | None = None,
    ) -> None:
        """Either ``paced`` (shared with the dispatcher), or the parts to build one."""
        if paced is None:
            if limiter is None or policy is None or clock is None:
                raise TypeError("PacedReader needs paced=, or limiter=, policy= and clock=")
            paced = PacedCall(limiter=limiter, policy=policy, clock=clock, stopping=stopping)
        self._api = api
        self._paced = paced
        self.calls = 0
        self.retries = 0

    def __repr__(self) -> str:
        return f"PacedReader(calls={self.calls}, retries={self.retries})"

    async def show(self, job_id: str) -> JobRecord | None:
        """The job, or ``None`` when it does not exist (404)."""
        try:
            return await self._read(lambda: self._api.get_job(job_id), job_id)
        except NotFound:
            return None

    def waiting(self) -> AbstractContextManager[None]:
        """A wait of the reader's caller that is not work (``PacedCall.waiting``)."""
        return self._paced.waiting()

    async def list_page(self, **query: str | int | bool) -> JobPage:
        return await self._read(lambda: self._api.list_jobs(**query), "list")

    async def _read(self, send: Callable[[], Awaitable[T]], what: str) -> T:
        tries = Tries()
        try:
            return await self._paced(send, what=what, tries=tries)
        finally:
            self.calls += tries.sent
            self.retries += max(0, tries.attempt - 1)
