"""The serve loop: read entries, batch them by size or linger, dispatch, settle, shut down.

One *round* is one task group: an intake task (the only reader of Redis, so reading, the
in-flight map and the batcher need no locks) feeding twice ``concurrency`` dispatcher tasks
(``concurrency`` calls on the wire at once: ``PacedCall``'s places) over a bounded stream. A
round starts by re-reading this consumer's own pending entries without counting a delivery
(neither a restart nor a pause is one; after a pause it reads nothing new until one of their
batches has an answer; and again when a paused region answers, ``worker.service.regions``),
then reads new ones (``>``), and every ``reclaim_interval`` takes over entries idle longer
than ``reclaim_after`` from anyone (``XAUTOCLAIM``, which also retries our own entries kept
pending after a failure). An entry delivered more than ``max_deliveries`` times is
dead-lettered instead of processed.

A round ends on stop (SIGTERM: intake is cancelled at once, even mid ``XREADGROUP``; calls in
flight get ``grace`` seconds; batches not started are left pending) or when the API refuses
the credentials (401/403), the call (a 404 no job explains) or the TLS certificate: then the
round ends as on a stop (the DELETEs on the wire are settled first: the API may have applied
them), the replica turns unready and waits (doubling pauses while refused; after a batch
went through, the next refusal pauses as the first did) before a new round tries again; a
pause on refused keys read from files ends as soon as the files hold other keys (a rotated
Secret). It never exits on its own, so Kubernetes does not restart it in a loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol, TypeVar

import anyio
import redis.exceptions
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from worker.batcher import Batcher
from worker.clock import Clock
from worker.dispatcher import Working
from worker.errors import (
    ApiError,
    ApiUnavailable,
    AuthError,
    NoSuchApi,
    NotAStream,
    TakenOver,
    TlsError,
)
from worker.outcomes.events import EventLog
from worker.pool import DispatchPool
from worker.routing import FairShare
from worker.service.consumer import (
    Entry,
    GroupInfo,
    StreamConsumer,
    error_json,
    handed_back_error,
    settled_ids,
)
from worker.service.health import Health
from worker.service.inflight import HandBack, InFlight
from worker.service.intake import AwaitAnswer, IntakePlan, LingerBatcher, ReadOwn, Reclaim
from worker.service.journal import SETTLE_TIMEOUT_S, ServeJournal
from worker.service.layout import Message, aimed, decode_entry
from worker.service.lookups import Asking, RegionLookups
from worker.service.metrics import ServiceMetrics
from worker.service.outage import REDIS_ERRORS, Outage, wrong_type
from worker.service.regions import Paused
from worker.service.retention import Keeper
from worker.stats import StatsWindow, every
from worker.targets import LookupFailed, Target, Targets
from worker.types import Batch, doubted

_T = TypeVar("_T")


class BatchProcessor(Protocol):
    """The dispatcher as the service sees it (``worker.dispatcher.Dispatcher``)."""

    async def process(self, batch: Batch) -> None: ...


class KeyFiles(Protocol):
    """Keys read from files, as a pause on refused keys watches them
    (``worker.api.credentials.FileCredentials``)."""

    def rotated(self) -> tuple[str, ...]:
        """The key files now holding keys other than those refused (read in), each change
        told once; empty when none. Cheap: a ``stat`` per file when nothing moved."""
        ...


KEY_LOOK_S = 1.0
"""How often a pause on refused keys looks at the key files (a ``stat`` each)."""


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """How the loop behaves. ``linger``/``block``/pauses are seconds."""

    batch_size: int
    concurrency: int
    max_deliveries: int
    reclaim_after: float
    grace: float
    linger: float = 0.2
    block: float = 1.0
    auth_pause: float = 30.0
    auth_pause_max: float = 600.0
    trim_every: float = 1.0
    """How often the retention pass runs (``worker.service.retention``)."""
    stats_interval: float = 60.0
    """How often ``serve.stats`` is said; 0: never."""

    @property
    def reclaim_interval(self) -> float:
        """How often to look for idle entries: often enough to keep ``reclaim_after``, and
        to take within seconds what a draining replica hands over (``_leave``)."""
        return max(0.05, min(self.reclaim_after / 2, 5.0))

    @property
    def stale_after(self) -> float:
        """No heartbeat for this long means the event loop is stuck (``/healthz`` 503)."""
        return max(30.0, 10 * self.block)

    @property
    def heartbeat(self) -> float:
        """How often the heartbeat ticks: a few times per ``stale_after``."""
        return min(self.block, self.stale_after / 4)


QUEUE_LOST = (
    "the group and the position kept for it are both gone: Redis lost the queue's keys "
    "(restarted without persistence, flushed, or failed over to a replica that had not got "
    "them); the ids enqueued and not read before are lost with them: enqueue them again "
    "(the ids this replica holds are finished, their outcomes written to the new outcomes "
    "stream)"
)
"""What ``serve.queue_lost`` says."""


class Service:
    """Consumes one stream until ``stop`` is set. Build it, then ``await run()``."""

    def __init__(
        self,
        *,
        consumer: StreamConsumer,
        inflight: InFlight,
        journal: ServeJournal,
        dispatcher: BatchProcessor,
        metrics: ServiceMetrics,
        health: Health,
        events: EventLog,
        clock: Clock,
        config: ServiceConfig,
        stop: anyio.Event,
        working: Working | None = None,
        outage: Outage,
        stop_now: anyio.Event | None = None,
        keeper: Keeper | None = None,
        rate: Callable[[], float] | None = None,
        targets: Targets | None = None,
        gauges: Callable[[], None] | None = None,
        lookups: RegionLookups | None = None,
        down: Callable[[Target | None], bool] = lambda target: False,
        keys: KeyFiles | None = None,
    ) -> None:
        """``targets``: where an entry naming a project, region or endpoint is sent, and
        which it may name (None: an entry naming one is dead-lettered, as for one project
        only); ``gauges``: sets the per-target gauges before a scrape; ``lookups``: finds the
        project of an entry naming a region without one (None: such an entry is refused);
        ``down(target)``: its endpoint is paused (a batch of it is handed back at once,
        waiting for no share of the dispatchers); ``keys``: the key files a pause on refused
        keys watches, to end when they hold new keys (None: keys not read from files)."""
        self._down = down
        self._keys = keys
        self._targets = targets
        self._lookups = lookups
        self._gauges = gauges
        self._consumer = consumer
        self._inflight = inflight
        self._journal = journal
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._health = health
        self._events = events
        self._clock = clock
        self._config = config
        self._stop = stop
        self._stop_now = stop_now
        self._working = working if working is not None else Working()
        # One batch waiting beside those in the dispatchers' hands: entries read ahead stay
        # few, so a stop leaves little read and not started.
        self._pool = DispatchPool(concurrency=config.concurrency, grace=config.grace, buffer=1,
                                  working=self._working)  # fmt: skip
        self._fair = FairShare(config.concurrency)  # each round's: ``_round``
        self._keeper = keeper
        self._outage = outage
        self._rate = rate
        self._window = StatsWindow(clock.now())
        self._blocked: BaseException | None = None
        self._halt = anyio.Event()  # the round ends: stop, or a refusal that pauses us
        self._answered = anyio.Event()  # a batch of this round got an answer from the API
        self._went_through = False  # a batch went through since the last pause (keys taken)
        self._reread = False  # read our own pending entries again (``reread_own``)
        self.rounds = 0
        self.read = 0
        self.batches = 0
        self.reclaimed = 0

    def __repr__(self) -> str:
        return (
            f"Service(consumer={self._consumer.consumer!r}, rounds={self.rounds}, "
            f"read={self.read}, batches={self.batches}, reclaimed={self.reclaimed}, "
            f"{self._inflight!r}, {self._health!r})"
        )

    # -- the outer loop ------------------------------------------------------------------
    async def run(self) -> None:
        """Until stopped. Liveness is a heartbeat task beside the loop, not ids flowing: a
        Retry-After, a backoff, a rate limit, a full dispatch queue, a Redis outage or a
        pause are bounded waits the service knows about, not a hang, and restarting the
        replica would not end any of them sooner. What the heartbeat catches is an event
        loop that no longer turns (a blocking call, a busy loop)."""
        async with anyio.create_task_group() as group:
            group.start_soon(self._heartbeat)
            if self._keeper is not None:
                group.start_soon(self._retain, self._keeper)
            group.start_soon(every, self._config.stats_interval, self._clock, self.report_stats)
            if self._lookups is not None:  # IAM is asked beside the intake, never in it
                group.start_soon(self._lookups.run)
            await self._run()
            group.cancel_scope.cancel()

    async def _retain(self, keeper: Keeper) -> None:
        """Every ``trim_every``, trim what no group needs any more (``retention``)."""
        while True:
            await self._clock.sleep(self._config.trim_every)
            # Shielded: a call cancelled mid-reply leaves its pooled connection unusable and
            # out of the pool. The pass is one short script; a Redis that does not answer
            # ends it within the client's socket timeout.
            with anyio.CancelScope(shield=True):
                await self._beat("trim", keeper.trim)

    async def _heartbeat(self) -> None:
        self._health.loop_running = True
        self._health.starting = None  # from here on, liveness is the heartbeat's
        while True:
            self._health.progress()
            await self._clock.sleep(self._config.heartbeat)

    async def _run(self) -> None:
        await self._outage.persist(self._consumer.ensure_group, what="group")
        pause = self._config.auth_pause
        while not self._stop.is_set():
            blocked = await self._queue_mended() or await self._round()
            if blocked is None:
                break
            if self._went_through:  # not the last refusal lasting: a new one, a new first pause
                pause, self._went_through = self._config.auth_pause, False
            said: dict[str, object] = {}
            if isinstance(blocked, NotAStream):
                with contextlib.suppress(Exception):  # naming the keys is a courtesy
                    said["keys"] = await self._consumer.not_streams()
            self._events.error(
                "serve.paused",
                reason=type(blocked).__name__,
                error=str(blocked),
                resume_in_s=pause,
                **said,
            )
            await self._pause(pause, blocked)
            pause = min(pause * 2, self._config.auth_pause_max)
        self._health.draining = True
        await self._leave()

    async def _leave(self) -> None:
        """Stopping: the entries left pending under our name are marked idle for longer than
        ``reclaim_after``, so another replica's next reclaim (within ``reclaim_interval``)
        takes them instead of ``reclaim_after`` later (a rolling update held them five
        minutes); with nothing left pending, our consumer name leaves the group."""
        idle_ms = int(self._config.reclaim_after * 1000) + 60_000
        handed, removed = 0, False
        with anyio.CancelScope(shield=True), anyio.move_on_after(SETTLE_TIMEOUT_S):
            try:
                handed = await self._consumer.hand_over(idle_ms)
                removed = await self._consumer.leave()
            except (*REDIS_ERRORS, redis.exceptions.ResponseError) as exc:
                self._events.warn("serve.hand_over_failed", error=type(exc).__name__)
                return
        self._events.note("serve.handed_over", entries=handed, consumer_removed=removed)

    async def _queue_mended(self) -> NotAStream | None:
        """After a key of the queue was found of another type: is every key a stream (or
        absent) again? Until then no round starts and the replica stays unready."""
        if self._health.queue_ok:
            return None
        wrong = await self._outage.persist(self._consumer.not_streams, what="type")
        if wrong:
            return NotAStream(f"keys of the queue hold another type: {', '.join(wrong)}")
        self._health.queue_ok = True
        return None

    async def _pause(self, seconds: float, blocked: BaseException) -> None:
        """Wait, unready (the heartbeat keeps it live), until the pause ends or we stop. A
        pause on refused keys read from files also ends when the files hold other keys (a
        rotated Secret): the next round signs with those; if they are refused too, the next
        pause is twice as long, as it would have been."""
        async with anyio.create_task_group() as group:

            async def ends(wait: Callable[[], Awaitable[object]]) -> None:
                await wait()
                group.cancel_scope.cancel()

            group.start_soon(ends, self._stop.wait)
            group.start_soon(ends, partial(self._clock.sleep, seconds))
            if self._keys is not None and isinstance(blocked, AuthError):
                group.start_soon(ends, partial(self._new_keys, self._keys, seconds))

    async def _new_keys(self, keys: KeyFiles, pause: float) -> None:
        """Until the key files hold keys other than those refused, looking every
        ``KEY_LOOK_S``; then ``serve.credentials_changed`` (the files, never a key)."""
        started = self._clock.now()
        while not (files := keys.rotated()):
            await self._clock.sleep(KEY_LOOK_S)
        waited = round(self._clock.now() - started, 3)
        self._events.note("serve.credentials_changed", files=list(files), waited_s=waited,
                          pause_s=pause)  # fmt: skip

    async def report_stats(self) -> None:
        """``serve.stats``: ids by outcome in the interval and since start, ids/s, the
        group's lag and pending entries (``None`` while Redis does not say), entries
        dead-lettered, ids in flight, and the rate the limiter allows now."""
        fields = self._window.close(self._clock.now(), self._metrics.by_outcome)
        info: GroupInfo | None = None
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            info = await self._consumer.group_info()  # a figure of a log line: best effort
        self._events.note(
            "serve.stats", **fields,
            lag=None if info is None else info.lag,
            pending=None if info is None else info.pending,
            dead_lettered_total=self._consumer.dead_lettered,
            in_flight=self._inflight.open_ids,
            rate=None if self._rate is None else round(self._rate(), 3),
        )  # fmt: skip

    async def refresh_gauges(self) -> None:
        """Readiness as last found, then lag and pending count from ``XINFO GROUPS`` (called
        before each scrape)."""
        health = self._health
        self._metrics.credentials_refused.set(int(health.auth_refused))
        ready = not (health.auth_refused or health.draining or self._outage.down)
        self._metrics.ready.set(int(ready and health.queue_ok))
        if self._gauges is not None:
            self._gauges()
        info = await self._consumer.group_info()
        if info is not None:
            self._metrics.pending.set(info.pending)
            if info.lag is not None:
                self._metrics.consumer_lag.set(info.lag)

    # -- one round -----------------------------------------------------------------------
    async def _round(self) -> BaseException | None:
        """Consume until stop (returns None) or a refusal that pauses us (returns it). The
        pool and its graceful stop are ``run``'s too (``worker.pool``); a refusal ends the
        round as a stop does (``_halt``), without the drain."""
        self.rounds += 1
        self._blocked = None
        self._halt = anyio.Event()
        self._answered = anyio.Event()
        self._inflight.clear()
        self._fair = FairShare(self._config.concurrency, stopping=lambda: self.halting,
                               working=self._working,
                               down=lambda batch: self._down(batch.target))  # fmt: skip
        await self._pool.run(self._intake, self._dispatch, stop=self._halt, on_stop=self._ending,
                             stop_now=self._stop_now,
                             beside=(self._keep_alive, self._halt_on_stop))  # fmt: skip
        left = self._fair.left()  # waited for their endpoint's share: not started
        if left:
            with anyio.CancelScope(shield=True), anyio.move_on_after(SETTLE_TIMEOUT_S):
                for batch in left:
                    await self._hand_back(batch, HandBack.not_sent(batch.unsure))
        return self._blocked

    async def _halt_on_stop(self) -> None:
        await self._stop.wait()
        self._halt.set()

    def _ending(self) -> None:
        """The round ends: on a stop, the replica turns unready and its drain starts."""
        if self._stop.is_set():
            self._health.draining = True
            self._journal.drain(self._config.grace)
            self._events.note(
                "serve.draining",
                grace_s=self._config.grace,
                in_flight=len(self._inflight),
                read=self.read,
            )

    async def _keep_alive(self) -> None:
        """Every ``reclaim_interval``, refresh the entries in progress here: a batch slower
        than ``reclaim_after`` (retries, a long Retry-After) must not have its entries
        taken over and sent again by another replica, nor count deliveries that did not
        happen when this one's own reclaim meets them."""
        while True:
            await self._clock.sleep(self._config.reclaim_interval)
            held = self._inflight.entry_ids()
            await self._beat("keep-alive", partial(self._consumer.keep_alive, held))

    async def _beat(self, what: str, call: Callable[[], Awaitable[object]]) -> None:
        """One call of a periodic task: Redis away is counted (the next beat tries again), a
        key of the queue holding another type ends the round (``_block``)."""
        try:
            await call()
        except REDIS_ERRORS as exc:
            self._outage.failed(what, exc)
        except redis.exceptions.ResponseError as exc:
            if not wrong_type(exc):
                raise
            self._block(NotAStream(f"{what}: a key of the queue holds another type"))

    async def _dispatch(self, receive: MemoryObjectReceiveStream[Batch]) -> None:
        """Each batch through the dispatcher, the places on the wire shared fairly between the
        endpoints (``worker.routing.FairShare``, as ``run``'s): the batches of a region
        whose calls hang until its breaker and their attempts say it is down hold only its
        share, and the other regions' are served meanwhile."""
        async with receive:
            while True:
                await self._working.take_hand()  # the extra dispatchers: for those asleep
                try:
                    # One held back for its endpoint's share first, if its endpoint has room
                    # now (a batch of it fell asleep on a Retry-After): then the next read.
                    batch = self._fair.ready()
                    try:
                        batch = batch or await receive.receive()
                    except anyio.EndOfStream:
                        return
                    if await self._dispatch_taken(batch):
                        return
                finally:
                    self._working.free_hand()

    async def _dispatch_taken(self, batch: Batch) -> bool:
        """One batch taken off the stream; True: this dispatcher ends (a refusal)."""
        ended = False

        async def one(batch: Batch) -> None:
            nonlocal ended
            ended = await self._dispatch_one(batch) or ended

        if batch.target is not None:
            self._fair.several = True
        if self._down(batch.target):
            await one(batch)  # handed back at once: the region is paused
        else:
            await self._fair.take(self._endpoint(batch), batch, one)
        return ended

    def _endpoint(self, batch: Batch) -> str:
        target = batch.target or (self._targets.default if self._targets else None)
        return "" if target is None else target.endpoint

    async def _dispatch_one(self, batch: Batch) -> bool:
        """One batch, its errors settled here; True: this dispatcher ends (a refusal)."""
        if self.halting:
            await self._hand_back(batch, HandBack.not_sent(batch.unsure))  # not started
            return False
        try:
            with self._working.busy():
                await self._dispatcher.process(batch)
            self._answered.set()
            self._went_through = True
            if batch.look and not self.halting:
                # Found there for an entry that may delete them, which joined the look
                # (``InFlight.not_theirs``): their DELETE, its answer theirs all.
                asked = self._inflight.asked(batch.ids, batch.target)
                if asked:
                    deletes = Batch(f"{batch.batch_id.removesuffix('.look')}.asked", asked,
                                    target=batch.target)  # fmt: skip
                    return await self._dispatch_one(
                        doubted(deletes, self._inflight.doubts(asked, batch.target))
                    )
        except TakenOver as exc:
            # Stalled past reclaim_after: the taker sends those entries' ids and records
            # them; of this batch only the ids of entries still ours are handed back.
            why = HandBack(exc.cause, str(exc), frozenset(exc.unsure | batch.unsure),
                           give_back=True)  # fmt: skip
            await self._hand_back(batch, why, taken=exc.entries)
            self._answered.set()  # settled here: an intake awaiting an answer reads on
            self._events.note("serve.taken_over", batch_id=batch.batch_id,
                              entries=len(exc.entries), ids=len(batch.ids))  # fmt: skip
        except ApiUnavailable as exc:
            if not isinstance(exc, Paused):  # a handed-back batch met no API
                self._answered.set()
            # Kept with each entry, naming its ids handed back: if it is never delivered
            # with the API up, its dead letter and job.failed say why. An entry with other
            # ids in flight stays held until they settle (``InFlight.release``).
            why = HandBack(exc.cause, str(exc), frozenset(exc.unsure | batch.unsure),
                           give_back=isinstance(exc, Paused))  # fmt: skip
            dropped = await self._hand_back(batch, why)
            if isinstance(exc, Paused):
                return False
            self._events.error(
                "serve.api_unavailable", batch_id=batch.batch_id, error=str(exc),
                entries_left_pending=len(dropped),
            )  # fmt: skip
        except (AuthError, NoSuchApi, TlsError, NotAStream) as exc:
            self._block(exc)
            return True
        except redis.exceptions.ResponseError as exc:
            if not wrong_type(exc):
                raise
            # The shared rate limit's key replaced by another type: its entries
            # stay pending, read again when the pause ends.
            self._block(NotAStream("rate limit: a key of the queue holds another type"))
            return True
        return False

    async def _hand_back(
        self, batch: Batch, why: HandBack, taken: frozenset[str] = frozenset()
    ) -> list[str]:
        """``batch``'s ids handed back without an outcome: each entry holding some keeps, as
        its last error, why and its ids done so far (its next delivery sends only the
        others), and when nothing was tried, its first hand-back gives its delivery back.
        Entries ``taken`` over by another replica are let go with nothing written: their
        last error and note of ids sent are the taker's now. Returns the entries."""
        released = self._inflight.release(batch.ids, batch.target, why)
        dropped = {entry: held for entry, held in released.items() if entry not in taken}
        errors = {entry: handed_back_error(held) for entry, held in dropped.items()
                  if not why.stopped or held.done or held.waiting}  # fmt: skip
        # Those of the batch with answers that say not applied (or never sent): off the note
        # of ids sent; those sent without a readable answer stay on it, and so do those an
        # earlier delivery of the entry sent (its ``why.unsure``): this call's answer is
        # not about that DELETE (an entry that joined the call brought them on its note).
        ours = set(batch.ids) - why.unsure
        sure = {entry: [i for i in held.ids
                        if i in ours and not (held.why and i in held.why.unsure)]
                for entry, held in dropped.items()}  # fmt: skip
        await self._journal.noted()  # a note of ids joined on its way lands before the strike
        await self._outage.persist(partial(self._consumer.keep_errors, errors, sure),
                                   what="last error")  # fmt: skip
        if why.give_back:  # nothing was tried: not a delivery
            spent = [entry for entry, held in dropped.items() if held.first]
            await self._outage.persist(partial(self._consumer.give_back, spent), what="give back")
        return list(dropped)

    def _block(self, exc: BaseException) -> None:
        """End the round for a refusal a pause may outlast (credentials, the TLS certificate,
        a key of the queue replaced by another type); the first one is the one said. The
        round ends as on a stop: nothing more is sent, what is on the wire settles."""
        if self._blocked is None:
            self._blocked = exc
        if isinstance(exc, NotAStream):
            self._health.queue_ok = False
        self._halt.set()

    def reread_own(self) -> None:
        """A paused region answers again: the entries handed back for it, pending under our
        name, are read again now (no delivery counted) instead of ``reclaim_after`` later."""
        self._reread = True

    @property
    def halting(self) -> bool:
        """Nothing more may be sent: the service stops, or a refusal ends the round. What
        the dispatcher asks before each call (``stopping``)."""
        return self._stop.is_set() or self._halt.is_set()

    # -- intake --------------------------------------------------------------------------
    async def _intake(self, send: MemoryObjectSendStream[Batch]) -> None:
        try:
            await self._take_in(send)
        except NotAStream as exc:
            self._block(exc)

    async def _take_in(self, send: MemoryObjectSendStream[Batch]) -> None:
        """Carry out what the plan decides (``worker.service.intake``): read, admit, batch."""
        config, clock = self._config, self._clock
        prefix = f"{self._consumer.consumer}-r{self.rounds}"
        batcher = LingerBatcher(Batcher(config.batch_size, prefix=prefix), config.linger)
        plan = IntakePlan(clock.now(), resumed=self.rounds > 1, reclaim_after=config.reclaim_after,
                          reclaim_interval=config.reclaim_interval, block=config.block)  # fmt: skip
        count = config.batch_size
        async with send:
            # Checked before each read too: a cancelled scope reaches this task only at
            # its next wait, and by then redis-py has already sent the next XREADGROUP,
            # which Redis would answer into our pending list after the stop.
            while not self._stop.is_set():
                if self._reread or (self._lookups is not None and self._lookups.due(clock.now())):
                    self._reread = False
                    plan.reread()
                now = clock.now()
                action = plan.next(now, answered=self._answered.is_set(),
                                   linger_until=batcher.due_at)  # fmt: skip
                if isinstance(action, ReadOwn):
                    entries, counts = await self._redis(
                        self._consumer.read_own, action.after, count
                    )
                    ids = await self._admit(entries, redelivered=True, counts=counts)
                    plan.read_own(entries[-1][0] if entries else None, took_ids=bool(ids))
                elif isinstance(action, AwaitAnswer):
                    await self._send(send, *batcher.flush())
                    await self._answered.wait()
                    continue
                elif isinstance(action, Reclaim):
                    cursor, entries = await self._redis(
                        self._consumer.reclaim, action.min_idle_ms, action.cursor, count
                    )
                    plan.reclaimed(now, cursor, found=bool(entries))
                    ids = await self._admit(entries, redelivered=True, claimed=True)
                else:
                    entries = await self._redis(self._consumer.read_new, count, action.block_ms)
                    ids = await self._admit(entries, redelivered=False)
                for job_id, target in ids:
                    await self._send(send, batcher.add(job_id, clock.now(), target))
                await self._send(send, *batcher.settle(clock.now(), idle=not entries))

    async def _send(self, send: MemoryObjectSendStream[Batch], *batches: Batch | None) -> None:
        for batch in batches:
            if batch is None:
                continue
            # Ids an earlier delivery of an entry waiting on them sent unheard: asked of the
            # entries held now, not of a set kept apart, which held the doubt of an entry
            # that joined another's call (no batch of its own to take it) for the round,
            # and pinned it on a later fresh entry's batch of the id.
            batch = doubted(batch, self._inflight.doubts(batch.ids, batch.target))
            looks = [] if batch.look else self._inflight.looks(batch.ids, batch.target)
            if looks:  # of entries given up: read, not deleted (``Batch.look``)
                ids = tuple(i for i in batch.ids if i not in looks)
                self._inflight.looking(looks, batch.target)
                await self._send(send, Batch(f"{batch.batch_id}.look", tuple(looks),
                                             target=batch.target, look=True))  # fmt: skip
                if not ids:
                    continue
                batch = replace(batch, ids=ids, unsure=batch.unsure.intersection(ids))
            self.batches += 1
            self._metrics.batch_size.observe(len(batch))
            await send.send(batch)

    async def _redis(self, operation: Callable[..., Awaitable[_T]], *args: object) -> _T:
        """A read, retried while Redis is away (then our own pending entries are read again:
        the lost answer may have delivered some); a group deleted under us is created again,
        and so is the stream: a blocked ``XREADGROUP`` whose stream key was deleted answers
        ``UNBLOCKED``, any later call ``NOGROUP``. Calls already on the wire go on and
        settle (acking an entry of a deleted stream is a no-op)."""

        async def attempt() -> _T:
            # Until the read is answered: the key may be deleted again (or replaced, which
            # deletes it first) between making the group and reading, and each time Redis
            # says so. Every turn is a round trip; a key of another type ends it (NotAStream).
            while True:
                try:
                    return await operation(*args)
                except REDIS_ERRORS:
                    # Redis may have applied the read and only its answer be lost (a stall
                    # past the timeout, a connection cut): entries delivered to us, pending
                    # under our name, that nothing here holds. Read our own again once it
                    # answers (no delivery counted), not ``reclaim_after`` later.
                    self._reread = True
                    raise
                except redis.exceptions.ResponseError as exc:
                    if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                        raise
                    made = await self._consumer.ensure_group()
                    layout, position = self._consumer.layout, made.position
                    if not made.kept:  # the group had read: retention had kept its position
                        self._events.error("serve.queue_lost", stream=layout.stream,
                                           group=layout.group, error=QUEUE_LOST)  # fmt: skip
                    self._events.warn(
                        "serve.group_recreated", group=layout.group,
                        reason=str(exc).split(" ", 1)[0], position=position or "0",
                        replays="pending and unread entries" if position else "the whole stream",
                    )  # fmt: skip

        return await self._outage.persist(attempt, what="read")

    async def _admit(
        self,
        entries: list[Entry],
        *,
        redelivered: bool,
        claimed: bool = False,
        counts: dict[str, int] | None = None,
    ) -> list[tuple[str, Target | None]]:
        """Hold the entries read; dead-letter the over-delivered; return the ids to send.

        Entries whose read returned after the stop signal (the read was already answered
        when the intake was cancelled) are not taken in: they stay pending in Redis, for
        this consumer's next start or another replica's reclaim."""
        if not entries or self._stop.is_set():
            return []
        self.read += len(entries)
        # Not those still ours: in flight, or settled and being acked. New ones too: a group
        # whose delivery state went back (``XGROUP SETID``, a Redis restored or failed over
        # to a replica behind) hands out again entries it had handed out.
        entries = [
            (e, f) for e, f in entries if e not in self._inflight and not self._journal.acking(e)
        ]
        if claimed:
            self.reclaimed += len(entries)
        gone = [entry_id for entry_id, fields in entries if fields is None]
        if gone:
            await self._outage.persist(lambda: self._consumer.ack(gone), what="ack")
        live = [(entry_id, fields) for entry_id, fields in entries if fields is not None]
        if counts is None:  # unless the read said already
            counts = {entry_id: 1 for entry_id, _ in live}
            if redelivered and live:
                ids = [entry_id for entry_id, _ in live]
                counts = await self._outage.persist(
                    lambda: self._consumer.deliveries(ids), what="xpending"
                )
        # A redelivered entry kept pending for some failed ids names, in its last error, the
        # ids that have their outcome already: only the others are sent (and failed) again.
        # Its note of ids sent names those a DELETE carried whose answer was never recorded
        # (its holder died, or was stopped, with the call on the wire).
        errors: dict[str, str] = {}
        sent: dict[str, frozenset[str]] = {}
        written: dict[str, frozenset[str]] = {}
        if redelivered and live:
            held = [entry_id for entry_id, _ in live]
            errors, sent, written = await self._outage.persist(
                lambda: self._consumer.redelivery(held), what="last error"
            )
        send: list[tuple[str, Target | None]] = []
        joined: dict[str, tuple[Target | None, tuple[str, ...]]] = {}
        waiting: list[tuple[Message, LookupFailed]] = []
        for entry_id, fields in live:
            assert fields is not None
            # The delivery is counted (by the read) and known before anything is decoded, and
            # decoding refuses an entry too large to parse: an entry that killed the process
            # while it was parsed could not otherwise ever reach its dead letter.
            deliveries = counts.get(entry_id, 1)
            message = decode_entry(entry_id, fields)
            done = settled_ids(errors.get(entry_id, "")) | written.get(entry_id, frozenset())
            unsure = settled_ids(errors.get(entry_id, ""), "unsure") | sent.get(entry_id, set())
            unsure = unsure.intersection(message.ids) - done  # its target is known once aimed
            if done:
                remaining = tuple(i for i in message.ids if i not in done)
                settled = tuple(i for i in message.ids if i in done)
                message = replace(message, ids=remaining, settled=settled)
            found = await self._place(message)
            if isinstance(found, LookupFailed):
                # IAM being asked (``Asking``) is no answer, whatever the deliveries.
                if found.later and (isinstance(found.error, Asking)
                                    or deliveries <= self._config.max_deliveries):  # fmt: skip
                    waiting.append((message, found))  # pending, as for a region down
                    continue
                found = found.reason
            message = aimed(message, self._targets, found)
            # A refused entry's ids are its rejections, each an outcome: giving it up would
            # write ``failed`` for its ids, of which a refusal leaves none.
            if deliveries > self._config.max_deliveries and not message.refused:
                # Ids its last holder sent unheard get one last call, on the delivery just
                # past the limit: that call may have deleted them (``failed`` says not); the
                # others one last look (another entry's call may have deleted them).
                # Not where the API is paused: a look handed back would give its delivery back.
                last = deliveries == self._config.max_deliveries + 1
                look = last and not self._down(message.target)
                kept = await self._journal.give_up(message, deliveries, errors.get(entry_id, ""),
                                                   unsure, last=last, look=look)  # fmt: skip
                if kept is None:
                    continue
                message = kept
            # Written at its first admission: a row leaves its ``=id`` on the entry's note
            # (made for it when none was), so ``done`` names a rejection written before.
            if message.rejections and not done:
                await self._journal.rejected(message)
            admission = self._inflight.add(message, deliveries, frozenset(unsure))
            if admission.joined:  # on the wire for another entry: noted under this one too
                joined[entry_id] = (message.target, admission.joined)
            if admission.finished is not None:
                await self._journal.settle(admission.finished)
            send.extend((job_id, message.target) for job_id in admission.send)
        if not redelivered and live:
            await self._doubt_fresh([entry_id for entry_id, _ in live])
        if joined:
            await self._journal.joined(joined)
        if waiting:
            await self._wait_for_iam(waiting)
        return send

    async def _doubt_fresh(self, entry_ids: list[str]) -> None:
        """New entries' notes of ids sent: a group whose delivery state went back hands out
        again entries another replica may have on the wire, whose call deletes the job a 404
        here would call ``absent`` (and its rows are kept out, the entries now ours). Read
        once they are admitted, before their batches are cut (the doubt rides on the
        batch): an answer arriving meanwhile finds them waiting, as before this read."""
        _, sent, _ = await self._outage.persist(
            lambda: self._consumer.redelivery(entry_ids), what="last error"
        )
        for entry_id, ids in sent.items():
            self._inflight.doubt(entry_id, ids)

    async def _place(self, message: Message) -> Target | str | LookupFailed | None:
        """Where an entry naming a place goes, its region's project looked up in IAM when
        it names none (``lookups``); None: ``aimed`` resolves it without a look-up."""
        if self._lookups is None or message.problem is not None or message.address is None:
            return None
        return await self._lookups.find(message.address)

    async def _wait_for_iam(self, waiting: list[tuple[Message, LookupFailed]]) -> None:
        """Entries whose region's project IAM could not give for now: left pending with
        the error (their dead letter says it if it lasts) and their delivery given back,
        as a paused region's are; read again when the region's hold is over."""
        errors: dict[str, str] = {}
        for message, failed in waiting:
            cause = failed.error if isinstance(failed.error, ApiError) else ApiError(failed.reason)
            errors[message.entry_id] = error_json(message.ids, cause, failed.reason,
                                                  message.settled)  # fmt: skip
        await self._outage.persist(partial(self._consumer.keep_errors, errors), what="last error")
        await self._outage.persist(partial(self._consumer.give_back, list(errors)),
                                   what="give back")  # fmt: skip
