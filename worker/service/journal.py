"""serve's outcome sink: the dispatcher's ``Journal``, ending in the outcomes stream and acks.

For every outcome, in this order: the documented event (the same ``EventLog`` as ``run``, so the
two commands log identically), the metrics, the outcomes stream; only then are the entries
this completes acknowledged. An entry is therefore never acked before its ids' outcomes are
written (at-least-once: a crash in between means a redelivery, and DELETE is idempotent).

Before each DELETE, :meth:`ServeJournal.sent` notes in Redis which ids of which entries it
carries, and does not return (so the call does not go out) until Redis has taken the note:
a replica killed with that call on the wire leaves it behind, and the entries' next
delivery ends the jobs it finds gone ``deleted`` (unconfirmed, ``answer_lost``), not
``absent``. An answer that finds an id not gone by us (``absent``, ``failed``, ``skipped``)
strikes it off the note in the round trip that writes the outcomes. A batch whose entries
another replica took over while this one stalled is not noted nor sent (``TakenOver``).
An entry admitted while an id it names is on the wire for another entry has that id noted
under it too (:meth:`ServeJournal.joined`), before any answer strikes it off.

Redis being away does not lose an outcome: writes are retried until Redis answers, however
long that takes, and a shutdown does not cut them short either, for a while: once the
service drains (:meth:`ServeJournal.drain`), a write still waiting for Redis is given up
``SETTLE_TIMEOUT_S`` after the grace period, leaving its entries pending for a later
delivery.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

import anyio
import orjson

from worker.clock import Clock
from worker.errors import TakenOver
from worker.outcomes.events import EventLog
from worker.routing import Stamped
from worker.service.consumer import (
    Settled,
    StreamConsumer,
    handed_back_error,
    last_error,
    outcome_fields,
)
from worker.service.inflight import Finished, InFlight
from worker.service.layout import Message
from worker.service.metrics import ServiceMetrics
from worker.service.outage import Outage
from worker.targets import Target
from worker.types import ANSWER_LOST, Outcome, Result

_T = TypeVar("_T")


def _gave_up(
    job_id: str,
    message: Message,
    deliveries: int,
    reason: str,
    said: Mapping[str, Any],
    *,
    unheard: bool = False,
) -> Result:
    """``failed``, for an id of an entry given up (``reason``), with the last error it met
    (``said``): read and found still there, or not read (its API paused, or it gave out).
    ``unheard``: an earlier delivery sent it without a readable answer and it gets no last
    call (past the delivery just over the limit): that DELETE may have removed the job,
    which ``failed`` alone would say is there (``answer_lost``, as ``run`` says it)."""
    last = said.get("error_msg") or f"no outcome after {reason}"
    return Result(
        job_id=job_id,
        outcome=Outcome.FAILED,
        attempts=deliveries,
        http_status=said.get("http_status"),
        error_code=said.get("error_code"),
        error_msg=f"{ANSWER_LOST}: a DELETE of it went unanswered and it was not sent again, "
        f"so it may be gone by that DELETE: {last}"
        if unheard
        else last,
        request_id=said.get("request_id"),
        target=message.target,
        reason=ANSWER_LOST if unheard else None,
    )


def _error_of(error: str) -> dict[str, Any]:
    """The last error kept for an entry (``{stream}:lasterror``), as a dict; ``{}`` when
    none was kept or it does not parse."""
    try:
        said = orjson.loads(error) if error else {}
    except orjson.JSONDecodeError:
        return {}
    return said if isinstance(said, dict) else {}


UNWRITTEN = (
    "Redis did not take their outcome rows before the stop's deadline: the entries stay "
    "pending for their next delivery, which says deleted, unconfirmed (answer_lost), of "
    "the jobs a call of this replica deleted"
)
"""What ``serve.outcomes_unwritten`` says."""

SETTLE_TIMEOUT_S = 5.0
"""How long past the grace period a shutdown waits for Redis to take the last outcomes."""


class ServeJournal:
    """Implements ``worker.dispatcher.Journal`` for serve."""

    def __init__(
        self,
        *,
        events: EventLog,
        metrics: ServiceMetrics,
        inflight: InFlight,
        consumer: StreamConsumer,
        clock: Clock,
        outage: Outage,
        max_deliveries: int,
        on_finished: Callable[[Finished, bool], None] | None = None,
    ) -> None:
        self._max_deliveries = max_deliveries
        self._events = events
        self._metrics = metrics
        self._inflight = inflight
        self._consumer = consumer
        self._clock = clock
        self._outage = outage
        self._on_finished = on_finished
        self.outcomes = 0
        self.kept = 0
        self.unwritten: set[str] = set()  # entries settled here whose outcomes Redis never took
        self._settle_deadline = math.inf
        self._settling: set[anyio.CancelScope] = set()
        self._acking: set[str] = set()
        self._joining = anyio.Event()  # no note of ``joined`` on its way to Redis
        self._joining.set()
        self._writing: dict[str, int] = {}  # entry -> writes naming it on their way to Redis
        self._wrote = anyio.Event()  # set (and replaced) as each such write ends

    def acking(self, entry_id: str) -> bool:
        """Is the entry settled here, its ack or dead-lettering not yet through to Redis?
        It has left the in-flight map but is still pending in Redis, and a reclaim that met
        it (after an outage longer than ``reclaim_after``) would send its ids again."""
        return entry_id in self._acking

    def lane(self, target: Target | None) -> ServeJournal | _Lane:
        """The journal of the dispatcher of ``target``'s batches (None: the default's)."""
        return self if target is None else _Lane(self, target)

    async def sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        await self.sending(ids, None)

    async def sending(self, ids: Sequence[str], target: Target | None) -> None:
        """A DELETE of ``ids`` (of ``target``) is about to go out: note them by entry
        first, waiting for Redis as long as it takes (a stop cancels the wait, and then
        nothing is sent: the entries stay pending). An id no entry holds any more (let go
        when the API gave out for another batch of its entry) has nothing to note.
        Raises ``TakenOver`` (nothing noted, nothing to send) when an entry is no longer
        pending under this consumer."""
        marks: dict[str, list[str]] = {}
        for job_id in ids:
            for entry_id in self._inflight.entries_of(job_id, target):
                marks.setdefault(entry_id, []).append(job_id)
        if not marks:
            return
        self._inflight.on_wire(ids, target)  # an entry admitted from now on is noted too
        lost = await self._outage.persist(
            lambda: self._consumer.mark_sending(marks), what="sending"
        )
        if lost:  # taken over while this replica stalled: the taker sends them
            raise TakenOver(lost)

    async def unsent(self, batch_id: str, ids: Sequence[str]) -> None:
        await self.unsending(ids, None)

    async def unsending(self, ids: Sequence[str], target: Target | None) -> None:
        """An answer heard says the DELETEs of ``ids`` (of ``target``) applied none of
        them (a 429; a 200 that left them out): struck off their entries' notes of ids sent
        (:meth:`sending`), so a replica killed while it checks them one show call at a time,
        or sleeps out a ``Retry-After``, leaves the next delivery nothing to take for a
        deletion of ours. An entry taken over meanwhile is the taker's: its note stays; so
        does that of an entry whose earlier delivery sent an id unheard (it joined the call)."""
        unmark: dict[str, list[str]] = {}
        for job_id in ids:
            for entry_id in self._inflight.entries_heard(job_id, target):
                unmark.setdefault(entry_id, []).append(job_id)
        if unmark:
            await self.noted()  # a note of ids joined on its way lands before the strike
            await self._outage.persist(
                lambda: self._consumer.keep_errors({}, unmark), what="sending"
            )

    async def joined(self, marks: Mapping[str, tuple[Target | None, Sequence[str]]]) -> None:
        """Entries just admitted naming ids already on the wire for another entry
        (``Admission.joined``), by entry: its target and those ids. Noted under each as
        :meth:`sending` notes, so its own redelivery after a crash knows them sent. Only
        those still on the wire when the note is taken (an answer may have come meanwhile);
        an answer arriving while it is on its way waits for it (:meth:`noted`), so its
        strike comes after. An entry taken over already is the taker's: nothing noted."""
        still = {entry: [i for i in ids if self._inflight.wired(entry, i, target)]
                 for entry, (target, ids) in marks.items()}  # fmt: skip
        still = {entry: ids for entry, ids in still.items() if ids}
        if not still:
            return
        self._joining = anyio.Event()
        try:
            while still:  # the script notes all or none: again without those taken over
                lost = await self._outage.persist(partial(self._consumer.mark_sending, still),
                                                  what="sending")  # fmt: skip
                still = {entry: ids for entry, ids in still.items() if lost and entry not in lost}
        finally:
            self._joining.set()

    async def noted(self) -> None:
        """Until no note of :meth:`joined` is on its way: what writes an answer's strike
        (or a hand-back's) waits for it, so the strike lands after the note."""
        await self._joining.wait()

    async def retrying(self, batch_id: str, attempt: int, delay_s: float, reason: str) -> None:
        self._metrics.retry(reason)
        self._events.retry(batch_id, attempt, delay_s, reason)

    async def finished(self, results: Sequence[Result]) -> None:
        # A joining entry's doubt (``answered``); a job a look found there (``_looked``), but
        # for an entry that may delete it, which joined the look: it is sent (``not_theirs``).
        results = [self._looked(self._inflight.answered(r)) for r in results
                   if not self._inflight.not_theirs(r)]  # fmt: skip
        # A failure is terminal only on the last delivery its entries are allowed: before
        # that they are kept pending and the id is tried again, so its job.failed ("will not
        # be retried") and its outcome row wait for that last delivery. Its row names the
        # entries on their last (an entry dead-lettered beside one that may try again had
        # no row for the id at all); the others get theirs on their own last delivery.
        named = [(r, self._named(r)) for r in results]
        final = [(r, entries) for r, entries in named if entries is not None]
        for result, _ in final:
            self._events.result(result)
            self._metrics.outcome(result.outcome, target=result.target)
        rows = [outcome_fields(r, entries) for r, entries in final]
        # Not gone by our hand, as the answer says: struck off the notes of ids sent, so a
        # later delivery does not take a 404 for them as a deletion of ours. A deletion stays
        # noted until its entry is acked: sent again meanwhile, it is still ours.
        unmark: dict[str, list[str]] = {}
        for r in results:
            if r.outcome is not Outcome.DELETED:
                for entry_id in self._inflight.entries_of(r.job_id, r.target):
                    unmark.setdefault(entry_id, []).append(r.job_id)
        # Shielded: an outcome reached on the API is recorded and acked even when a shutdown
        # is cancelling the dispatchers, instead of being redone by another replica. Only a
        # drain puts a deadline on it; before that, an outcome waits for Redis as long as it
        # takes (giving up would leave its entries held in memory, never settled or sent).
        with anyio.CancelScope(shield=True, deadline=self._settle_deadline) as scope:
            self._settling.add(scope)
            finished = self._inflight.settle(results)
            # All of them ours until their outcomes are written and they are acked: a read
            # of our own entries meanwhile must not send their ids again.
            self._acking.update(done.entry_id for done in finished)
            try:
                # An entry handed back has its ids done written in the same transaction as
                # these outcomes: never one without the other, whenever a crash comes.
                handed = {done.entry_id: self._handed_back_error(done)
                          for done in finished if done.released is not None}  # fmt: skip
                naming = [e for row in rows for e in row["entry"].split(",") if e]
                with self._writes([*naming, *handed]):
                    await self.noted()
                    await self._outage.persist(
                        lambda: self._consumer.write_outcomes(rows, unmark, handed),
                        what="outcomes",
                    )
                self.outcomes += len(rows)
                for done in finished:
                    if done.released is None:
                        await self._written(done.entry_id)
                        await self.settle(done)
            finally:
                self._acking.difference_update(done.entry_id for done in finished)
                self._settling.discard(scope)
        if scope.cancelled_caught:  # the drain's deadline: Redis did not take them in time
            entries = [d.entry_id for d in finished if d.entry_id not in self.unwritten]
            self.unwritten.update(entries)
            self._events.warn("serve.outcomes_unwritten", entries=len(entries), ids=len(rows),
                              why=UNWRITTEN)  # fmt: skip

    @contextlib.contextmanager
    def _writes(self, entries: Sequence[str]) -> Iterator[None]:
        """A write of outcome rows naming ``entries`` is on its way to Redis."""
        for entry in entries:
            self._writing[entry] = self._writing.get(entry, 0) + 1
        try:
            yield
        finally:
            for entry in entries:
                left = self._writing.pop(entry) - 1
                if left:
                    self._writing[entry] = left
            self._wrote.set()
            self._wrote = anyio.Event()

    async def _written(self, entry_id: str) -> None:
        """Until no write naming the entry is on its way: its ack must come after them.
        Two of its ids answered at once, the second's write and the ack could reach Redis
        before the first's write, which then found the entry no longer pending (taken
        over, by the owner check) and dropped its row: an id acked with no outcome."""
        while self._writing.get(entry_id):
            await self._wrote.wait()

    def _looked(self, result: Result) -> Result:
        """A job a look found still there (``Message.look``), failed as its entry's give-up
        says it, with the last error the entry met: why it was not deleted."""
        if result.outcome is not Outcome.FAILED:
            return result
        held = self._inflight.looked_by(result.job_id, result.target)
        if held is None or held[0].given_up is None:
            return result
        message, deliveries = held
        reason, error = held[0].given_up
        failed = _gave_up(result.job_id, message, deliveries, reason, _error_of(error))
        return replace(failed, batch_id=result.batch_id)

    def _named(self, result: Result) -> tuple[str, ...] | None:
        """The entries ``result``'s row names; None: no row yet (a failure none of whose
        entries is on its last delivery)."""
        entries = self._inflight.entries_of(result.job_id, result.target)
        if result.outcome is not Outcome.FAILED or not entries:
            return entries
        last = self._inflight.on_last_delivery(result.job_id, self._max_deliveries,
                                               result.target)  # fmt: skip
        return last or None

    def _handed_back_error(self, done: Finished) -> str:
        """The last error of an entry handed back (``done.released``): its failed ids are
        done too when this was its last delivery (their ``failed`` outcomes are written)."""
        assert done.released is not None
        failed = [f.job_id for f in done.failures]
        if done.deliveries >= self._max_deliveries:
            return handed_back_error(done.released, done=failed)
        return handed_back_error(done.released, failed=failed)

    async def give_up(
        self,
        message: Message,
        deliveries: int,
        error: str,
        unheard: Collection[str] = (),
        *,
        last: bool = False,
        look: bool = False,
    ) -> Message | None:
        """An entry read after more than ``max_deliveries`` deliveries with no outcome (its
        holders died, or the API was unavailable every time): its ids end ``failed`` with
        the last error it met, and it goes to the dead-letter stream. Not those another
        entry is on right now: the entry waits on that call, whose row names it (it had no
        row at all). ``unheard``: ids an earlier delivery sent without a readable answer,
        whose call may have deleted the job, which ``failed`` would say is there: on the
        ``last`` delivery (the one just past the limit) they get one last call; past it,
        none, and they end ``failed`` saying they may be gone by that call. With ``look``
        (the last delivery, its API not paused) the others get one last look, a read that
        deletes nothing (``Message.look``): another entry's call may have deleted the job
        meanwhile, so found gone they end ``absent``, still there ``failed``. Returns the
        entry with those ids only, to be sent (or read) and dead-lettered once they settle
        (``Message.given_up``); None when nothing is left."""
        doubted = unheard if last else ()
        said = _error_of(error)
        reason = f"delivered {deliveries} times (max_deliveries {self._max_deliveries})"
        target = message.target
        waited = {i for i in message.ids if self._inflight.entries_of(i, target)}
        kept = tuple(i for i in message.ids if look or i in doubted or i in waited)
        # Waited on by entries that only look at it too: looked at, not deleted, for all.
        read = tuple(i for i in kept if i not in doubted
                     and (i not in waited or self._inflight.looks([i], target)))  # fmt: skip
        failed = [_gave_up(job_id, message, deliveries, reason, said, unheard=job_id in unheard)
                  for job_id in message.ids if job_id not in kept]  # fmt: skip
        for result in failed:
            self._events.result(result)
            self._metrics.outcome(result.outcome, target=result.target)
        rows = [outcome_fields(r, (message.entry_id,)) for r in failed]
        await self._outage.persist(lambda: self._consumer.write_outcomes(rows), what="outcomes")
        self.outcomes += len(rows)
        if kept:
            settled = (*message.settled, *(r.job_id for r in failed))
            return replace(message, ids=kept, settled=settled, given_up=(reason, error),
                           look=read)  # fmt: skip
        await self._dead_letter(message, deliveries, reason, error)
        return None

    async def _dead_letter(
        self, message: Message, deliveries: int, reason: str, error: str
    ) -> Settled:
        settled = await self._outage.persist(
            lambda: self._consumer.dead_letter(
                message.entry_id, message.payload, reason, deliveries, error
            ),
            what="dead-letter",
        )
        if settled is Settled.TAKEN:
            self._taken(message.entry_id, deliveries)
            return settled
        self._metrics.dead("max_deliveries")
        self._events.warn(
            "serve.dead_lettered", entry=message.entry_id, reason=reason, deliveries=deliveries
        )
        return settled

    def _taken(self, entry_id: str, deliveries: int) -> None:
        """An entry settled here that another replica took over meanwhile (this one stalled
        past ``reclaim_after``): not acknowledged nor dead-lettered, the taker settles it."""
        self._events.warn("serve.entry_taken_over", entry=entry_id, deliveries=deliveries)

    def drain(self, grace: float) -> None:
        """The service is stopping: outcomes still waiting for Redis ``grace`` +
        ``SETTLE_TIMEOUT_S`` from now are given up (their entries stay pending)."""
        self._settle_deadline = anyio.current_time() + grace + SETTLE_TIMEOUT_S
        for scope in self._settling:
            scope.deadline = self._settle_deadline

    async def rejected(self, message: Message) -> None:
        """Invalid ids of an entry: events, metrics and outcomes now; dead-lettered on ack."""
        results = [
            Result(job_id=r.raw, outcome=Outcome.REJECTED, reason=r.reason, line=r.line)
            for r in message.rejections
        ]
        for rejection in message.rejections:
            self._events.rejected(rejection)
        self._metrics.rejected(len(results))
        rows = [outcome_fields(r, (message.entry_id,)) for r in results]
        await self._outage.persist(lambda: self._consumer.write_outcomes(rows), what="outcomes")
        self.outcomes += len(rows)

    async def settle(self, done: Finished) -> None:
        """Ack a finished entry; when some of its ids failed, keep it pending for another
        delivery, or dead-letter it if this was its last."""
        self._acking.add(done.entry_id)
        try:
            await self._settle(done)
        finally:
            self._acking.discard(done.entry_id)

    async def _settle(self, done: Finished) -> None:
        given_up = done.message.given_up  # its last ids sent past max_deliveries: settled
        if given_up is not None or (done.failures and done.deliveries >= self._max_deliveries):
            limit = self._max_deliveries
            reason = f"failed on its last delivery ({done.deliveries}, max_deliveries {limit})"
            error = last_error(done.failures) if done.failures else ""
            if given_up is not None:
                reason, error = given_up[0], error or given_up[1]
            settled = await self._dead_letter(done.message, done.deliveries, reason, error)
            if self._on_finished is not None:
                self._on_finished(done, settled is Settled.ACKED)
            return
        settled = await self._outage.persist(lambda: self._consumer.finish(done), what="ack")
        if settled is Settled.KEPT:
            self.kept += 1
            self._events.warn(
                "serve.entry_kept",
                entry=done.entry_id,
                failed=len(done.failures),
                deliveries=done.deliveries,
            )
        elif settled is Settled.TAKEN:
            self._taken(done.entry_id, done.deliveries)
        elif done.message.rejections or done.message.problem:
            reason = "unreadable" if done.message.problem else "invalid"
            if done.message.refused:
                reason = "target"
            self._metrics.dead(reason)
            self._events.warn(
                "serve.dead_lettered",
                entry=done.entry_id,
                reason=done.message.problem or "invalid ids",
                deliveries=done.deliveries,
            )
        if self._on_finished is not None:
            self._on_finished(done, settled is Settled.ACKED)

    def __repr__(self) -> str:
        return f"ServeJournal(outcomes={self.outcomes}, kept={self.kept}, {self._inflight!r})"


class _Lane(Stamped):
    """The journal of the lane of one named target: its outcomes stamped with it, and the
    ids it sends noted under that target's entries."""

    __slots__ = ("_journal",)

    def __init__(self, journal: ServeJournal, target: Target) -> None:
        super().__init__(journal, target)
        self._journal = journal

    async def sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        await self._journal.sending(ids, self.target)

    async def unsent(self, batch_id: str, ids: Sequence[str]) -> None:
        await self._journal.unsending(ids, self.target)
