"""Many targets in one run: each batch goes to the processor of its target.

A batch holds the ids of one target (``worker.batcher``), so a DELETE goes to one project
at one endpoint. :class:`Router` is the ``BatchProcessor`` the pipeline sees; behind it, a
lane per target (a dispatcher, wrapped in the guard when jobs are protected), made when the
target's first batch comes. The lanes of one place (project and endpoint) share one rate
limiter, since the quota is the project's; the lanes of one endpoint share one circuit
breaker, since an outage is the endpoint's (``Lanes``, made by ``worker.wiring``).

An endpoint whose API gives out (``ApiUnavailable``: its breaker's probes and the batch's
attempts spent; or a refused certificate) stops only its own lanes while another place the
run has met still answers: that batch's ids and every later batch's for that endpoint stay
open, never sent, and the others go on. So does a project the gateway does not know
(``NoSuchApi``, a wrong project id on some lines), for that project alone. When every place
the run has met is out, the error goes up and the run stops as a one-project run always
has. Either way the run ends as that error says (78 for an unknown project, else 69).

The outcome of an id whose line named its target carries it (``Result.target``):
:class:`Stamped` sets it as the outcome is settled, so the dispatcher and the guard need not
know about targets at all.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import anyio

from worker.dispatcher import Journal, Working
from worker.errors import ApiUnavailable, AuthError, NoSuchApi, ReaperError, TlsError
from worker.pipeline import BatchProcessor
from worker.targets import Target
from worker.types import Batch, Result


class Stamped:
    """A journal for the lane of one named target: each outcome settled through it carries
    ``target``. Everything else passes through."""

    __slots__ = ("_inner", "target")

    def __init__(self, inner: Journal, target: Target) -> None:
        self._inner = inner
        self.target = target

    async def sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        await self._inner.sent(batch_id, ids, attempt)

    async def unsent(self, batch_id: str, ids: Sequence[str]) -> None:
        await self._inner.unsent(batch_id, ids)

    async def retrying(self, batch_id: str, attempt: int, delay_s: float, reason: str) -> None:
        await self._inner.retrying(batch_id, attempt, delay_s, reason)

    async def finished(self, results: Sequence[Result]) -> None:
        target = self.target
        for result in results:
            result.target = target
        await self._inner.finished(results)

    def __repr__(self) -> str:
        return f"Stamped({self.target}, {self._inner!r})"


Lane = Callable[[Target | None], BatchProcessor]
"""Makes the processor of the batches of a target (None: the settings' default)."""

ENDPOINT_OUT = (ApiUnavailable, TlsError)
"""What takes a whole endpoint out: its API gave out, or its certificate was refused."""
TARGET_OUT = (NoSuchApi, AuthError)
"""What takes one project at an endpoint out: the gateway does not know its path (a wrong
project id), or a 403 (the keys' permissions may be granted project by project); other
projects at that endpoint may still be right. A 401 is the key's own refusal, which no
project escapes: it still stops the run."""


DEFER_IDS = 20_000
"""Ids of one endpoint's batches the router holds back, waiting for a dispatcher of their
endpoint's share, before a dispatcher that brings it another waits for room (back-pressure):
about 2 MB, and at 500 ids/s for the others what a detection window of 40 s needs."""


class _Endpoint:
    """One endpoint's batches at work (``in_lane``, ``asleep`` of them on a Retry-After or
    a back-off) and the batches waiting for its share; whether its last call was answered
    (``answering``), or met a 5xx, a timeout or a reset."""

    __slots__ = ("answering", "asleep", "deferred", "ids", "in_lane", "moved", "room")

    def __init__(self, moved: Callable[[], None]) -> None:
        self.in_lane = 0
        self.asleep = 0
        self.answering = False
        self.deferred: deque[Batch] = deque()
        self.ids = 0  # in ``deferred``
        self.room = anyio.Event()
        self.moved = moved  # what may give a waiting batch its turn changed

    @property
    def awake(self) -> int:
        """Its batches at work and not asleep: each has at most one call on the wire."""
        return self.in_lane - self.asleep

    def sleeping(self, change: int) -> None:
        """A batch of it fell asleep (``+1``) or woke (``-1``): ``Working.lane``."""
        self.asleep += change
        self._room()

    def heard(self, answered: bool) -> None:
        """A call of it was answered, or not (``Working.lane``)."""
        if answered != self.answering:
            self.answering = answered
            self._room()

    def defer(self, batch: Batch) -> None:
        self.deferred.append(batch)
        self.ids += len(batch)
        self.moved()

    def next(self) -> Batch | None:
        if not self.deferred:
            return None
        batch = self.deferred.popleft()
        self.ids -= len(batch)
        self._room()
        return batch

    def _room(self) -> None:
        self.room.set()
        self.room = anyio.Event()
        self.moved()

    @property
    def busy(self) -> bool:
        return self.in_lane > 0 or bool(self.deferred)


class FairShare:
    """The places on the wire shared fairly between the endpoints that have work.

    Once :attr:`several` is set (a batch of a named target has come), an endpoint's batches
    awake (at work and not asleep on a ``Retry-After`` or a back-off: each has at most one
    call on the wire; every one at work while its calls fail, see :meth:`_at_work`) are at
    most its share of the ``concurrency`` places: all of them
    while no other endpoint has batches at work or waiting and its last call was answered
    (all but one before: see :meth:`share`), else ``concurrency`` over the endpoints that
    have, rounded up. A batch beyond its share waits here (up to
    ``defer_ids`` ids an endpoint), not in a dispatcher, and the dispatchers' hands go one
    beyond the places (``Working.spare``), so one is always free to bring in another
    endpoint's batch. So a region whose calls hang holds only its share while its breaker
    and the retries decide it is down, and the others go on at their pace. A batch waiting
    is sent when its endpoint has room: by a dispatcher that finishes a batch of that
    endpoint, or by one that takes a hand (:meth:`ready`, :meth:`until_ready`), as when a
    batch of it falls asleep; until ``stopping()``: what still waits then is :meth:`left`'s.

    A batch waiting for a share whose endpoint is down meanwhile (``down``: serve's paused
    endpoints, whose one batch in a dispatcher is the probe, kept there until the endpoint
    answers) is not left waiting behind that probe: the next dispatcher to finish a batch
    sends it on (serve hands it back at once, nothing sent).

    Used by ``run`` (:class:`Router`) and ``serve`` (``worker.service.service``); ``send``
    is what a dispatcher does with one batch, and must settle that batch's own errors when
    another dispatcher's batch may be sent by it."""

    def __init__(
        self,
        concurrency: int,
        *,
        stopping: Callable[[], bool] = lambda: False,
        working: Working | None = None,
        defer_ids: int = DEFER_IDS,
        down: Callable[[Batch], bool] = lambda batch: False,
    ) -> None:
        self._concurrency = concurrency
        self._down = down
        self._stopping = stopping
        self._working = working if working is not None else Working()
        self._defer_ids = defer_ids
        self._endpoints: dict[str, _Endpoint] = {}
        self._several = False
        self._moved = anyio.Event()
        self.deferred = 0  # batches that waited for their endpoint's share

    @property
    def several(self) -> bool:
        """A batch of a named target has come: the endpoints share the places."""
        return self._several

    @several.setter
    def several(self, value: bool) -> None:
        self._several = value
        self._working.spare = 1 if value else 0

    def share(self, endpoint: str) -> int:
        """The batches of ``endpoint`` that may be at work now (:meth:`_at_work`): all the
        dispatchers while no batch has named a target (one project's, as it always was:
        ``Working.tasks``); else a fair share of the ``concurrency`` places (so an endpoint
        whose calls hang holds no more of them than its share). Every one to an endpoint
        alone whose last call was answered, when the places bound the calls (a spare hand
        brings in the others' batches); else never the last, which stays free for another
        endpoint's batch: a region whose calls hang from its first would keep it waiting
        for their timeouts."""
        if not self._several:
            return self._working.tasks(self._concurrency)
        busy = sum(state.busy for name, state in self._endpoints.items() if name != endpoint)
        share = -(-self._concurrency // (busy + 1))
        state = self._endpoints.get(endpoint)
        whole = state is not None and self._answering(state)
        return max(1, min(share, self._concurrency - (not whole)))

    def _answering(self, state: _Endpoint) -> bool:
        """The places bound the calls, and the endpoint's last call was answered (not a 5xx,
        a timeout or a reset)."""
        return self._working.places is not None and state.answering

    def _at_work(self, state: _Endpoint) -> int:
        """An endpoint's batches that count in its share: those awake while it answers (a
        batch asleep on a ``Retry-After`` or a back-off holds no place, and a dispatcher
        stands in for it); else every one in a dispatcher's hands: another batch of an
        endpoint that fails would meet the same failure, or wait behind its breaker's
        probe (serve's paused endpoint has one batch in a dispatcher)."""
        return state.awake if self._answering(state) else state.in_lane

    def _state(self, endpoint: str) -> _Endpoint:
        state = self._endpoints.get(endpoint)
        if state is None:
            state = self._endpoints[endpoint] = _Endpoint(self._move)
        return state

    def _move(self) -> None:
        self._moved.set()
        self._moved = anyio.Event()

    async def take(
        self, endpoint: str, batch: Batch, send: Callable[[Batch], Awaitable[None]]
    ) -> None:
        """``send(batch)`` now if ``endpoint`` is within its share, else keep it for a
        dispatcher of its share; then send that endpoint's waiting batches while it has
        room."""
        state = self._state(endpoint)
        while self._at_work(state) >= self.share(endpoint) and not self._stopping():
            if state.ids + len(batch) <= self._defer_ids or not state.deferred:
                self.deferred += 1
                state.defer(batch)  # a dispatcher of its share takes it: this one is free
                return
            with self._working.waiting():  # not working: a stop need not wait for this
                await state.room.wait()  # back-pressure: as many ids wait as may
        await self._send(endpoint, state, batch, send)

    async def _send(
        self, endpoint: str, state: _Endpoint, batch: Batch,
        send: Callable[[Batch], Awaitable[None]],
    ) -> None:  # fmt: skip
        state.in_lane += 1
        try:
            with self._working.lane(state):  # its sleeps leave its share to the others
                next_batch: Batch | None = batch
                while next_batch is not None:
                    await send(next_batch)
                    ours = self._at_work(state) <= self.share(endpoint)  # this one counted
                    next_batch = None if self._stopping() or not ours else state.next()
        finally:
            state.in_lane -= 1
            self._move()
        await self._send_down(send)

    def ready(self) -> Batch | None:
        """A waiting batch whose endpoint has room now, taken out, for a dispatcher with a
        free hand to ``take`` (nothing awaited between: it goes); None when none has."""
        if self._stopping():
            return None
        for endpoint, state in self._endpoints.items():
            if state.deferred and self._at_work(state) < self.share(endpoint):
                return state.next()
        return None

    async def until_ready(self) -> bool:
        """Return True once a waiting batch's endpoint has room, False once none waits (or
        the run stops): for a dispatcher with no more batches to take."""
        while self.waiting and not self._stopping():
            if any(state.deferred and self._at_work(state) < self.share(name)
                   for name, state in self._endpoints.items()):  # fmt: skip
                return True
            await self._moved.wait()
        return False

    async def _send_down(self, send: Callable[[Batch], Awaitable[None]]) -> None:
        """``send`` the waiting batches of endpoints down now (``down``), first come first."""
        for state in self._endpoints.values():
            while state.deferred and not self._stopping() and self._down(state.deferred[0]):
                batch = state.next()
                assert batch is not None
                state.in_lane += 1  # within its share's count, should it be sent after all
                try:
                    with self._working.lane(state):
                        await send(batch)
                finally:
                    state.in_lane -= 1
                    self._move()

    def left(self) -> list[Batch]:
        """The batches still waiting (none sent), taken out: after a stop."""
        batches: list[Batch] = []
        for state in self._endpoints.values():
            while (batch := state.next()) is not None:
                batches.append(batch)
        return batches

    @property
    def waiting(self) -> int:
        return sum(len(state.deferred) for state in self._endpoints.values())

    def __repr__(self) -> str:
        return f"FairShare(concurrency={self._concurrency}, waiting={self.waiting})"


class Router:
    """Sends each batch to its target's lane; keeps an endpoint's outage, or a project the
    API does not know, to its own ids.

    Once a batch of a named target has come, the ``concurrency`` places on the wire are
    shared fairly between the endpoints that have work (:class:`FairShare`): a region whose
    calls hang holds only its share while its breaker and the retries decide it is down.

    ``down``: the endpoints taken out, with the error; ``refused``: the places (project and
    endpoint) taken out; ``left_open``: the ids of their later batches, not sent because
    of it. ``on_out(place, error)`` is called once per endpoint or place taken out while
    another still answers (the run's warning event)."""

    def __init__(
        self,
        *,
        default: Target | None,
        lane: Lane,
        concurrency: int = 1,
        stopping: Callable[[], bool] = lambda: False,
        working: Working | None = None,
        on_out: Callable[[Target, ReaperError], None] = lambda place, error: None,
        defer_ids: int = DEFER_IDS,
    ) -> None:
        self._default = default
        self._make = lane
        self._fair = FairShare(concurrency, stopping=stopping, working=working,
                               defer_ids=defer_ids)  # fmt: skip
        self._lanes: dict[Target | None, BatchProcessor] = {}
        self._met: dict[tuple[str, str], None] = {}
        self._on_out = on_out
        self.down: dict[str, ReaperError] = {}
        self.refused: dict[tuple[str, str], ReaperError] = {}
        self.left_open = 0

    def lane(self, target: Target | None) -> BatchProcessor:
        """The processor of ``target``'s batches, made on first use."""
        found = self._lanes.get(target)
        if found is None:
            found = self._lanes[target] = self._make(target)
        return found

    @property
    def lanes(self) -> dict[Target | None, BatchProcessor]:
        return dict(self._lanes)

    @property
    def failure(self) -> ReaperError | None:
        """The error to end the run with when something was taken out, the most serious
        first as the exit codes go: a project refused (403: 77), a project the API does
        not know (78), an endpoint that gave out (69)."""
        refused = sorted(self.refused.values(), key=lambda exc: not isinstance(exc, AuthError))
        return next(iter(refused), None) or next(iter(self.down.values()), None)

    def _target(self, batch: Batch) -> Target:
        target = batch.target if batch.target is not None else self._default
        if target is None:  # the pipeline sends no such batch: every line resolved
            raise ValueError(f"batch {batch.batch_id} has no target and no default is set")
        return target

    def _out(self, target: Target) -> bool:
        return (target.project_id, target.endpoint) in self.refused or target.endpoint in self.down

    @property
    def deferred(self) -> int:
        """Batches that waited for their endpoint's share."""
        return self._fair.deferred

    def ready(self) -> Batch | None:
        """A batch that waited for its endpoint's share and may go now (``FairShare``)."""
        return self._fair.ready()

    async def until_ready(self) -> bool:
        """Once such a batch may go: True; once none waits: False (``FairShare``)."""
        return await self._fair.until_ready()

    async def process(self, batch: Batch) -> None:
        if batch.target is not None:
            self._fair.several = True
        await self._fair.take(self._target(batch).endpoint, batch, self._send)

    async def _send(self, batch: Batch) -> None:
        target = self._target(batch)
        if self._out(target):
            self.left_open += len(batch)
            return
        place = (target.project_id, target.endpoint)
        self._met[place] = None
        try:
            await self.lane(batch.target).process(batch)
        except (*ENDPOINT_OUT, *TARGET_OUT) as exc:
            if isinstance(exc, AuthError) and exc.http_status != 403:
                raise  # the key itself refused (401): it signs for every project
            first = not self._out(target)
            if isinstance(exc, TARGET_OUT):
                self.refused.setdefault(place, exc)
            else:
                self.down.setdefault(target.endpoint, exc)
            if all(self._out(Target(*met)) for met in self._met):
                raise  # nothing the run has met answers: it stops, as one project's does
            if first:
                self._on_out(target, exc)

    def __repr__(self) -> str:
        down = ", ".join(self.down) or "none"
        waiting = self._fair.waiting
        return (
            f"Router(lanes={len(self._lanes)}, places={len(self._met)}, down=[{down}], "
            f"refused={len(self.refused)}, left_open={self.left_open}, waiting={waiting})"
        )
