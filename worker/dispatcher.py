"""Send one batch to the API until every id in it has an outcome, or the run must stop.

The policy, by error class:

- 200: each returned record is ``deleted``; an id asked for but not returned is checked
  with the show call: a job still there is sent again; a 404 makes it ``absent`` when the
  200 can be taken at its word (the API documents ``data`` as the jobs it deleted, and does
  not say whether it refuses or leaves out an id that is already gone, so a job left out
  and gone was most likely gone before). It ends ``deleted``, ``confirmed`` false, reason
  ``not_listed``, when the 200 cannot: the run read the job just before this DELETE (a
  protection or plan check: ``Batch.known``), so it existed when the call that left it out
  went; or the answer's envelope says it lists only part of what it deleted (``total``
  above its records, more than one page). Then that call is the likeliest hand that
  removed it, and ``absent`` would report a deletion as somebody else's. But where its
  ``total`` counts fewer deletions it did not list than there are ids it left out found
  gone (a job gone long before beside them), which of them it removed is not known: none
  of those is ``deleted`` on its word (``absent``, ``error_msg`` saying so).
- An id that went out in an attempt without a readable answer (a 5xx, a reset, a cut-off
  body, here or in a run that died with it in flight) and is then found gone ends
  ``deleted`` with ``confirmed`` false (``answer_lost``): that attempt is the likeliest hand
  that removed it.
- A show call answered with the record of another job says nothing of the one asked about:
  that id ends ``failed`` (``answer_lost`` when an attempt sent it unanswered), and nothing
  more is sent for it.
- throttled, 5xx, network errors, timeouts, cut-short bodies: sent again after the retry
  policy's delay, with a fresh signature. When the budget runs out the API is unavailable:
  the run stops (``ApiUnavailable``) and the ids stay open for the next run.
- any other 4xx on more than one id: split in halves until the offending ids stand alone;
  they end ``failed``, the rest proceed. A single id answered 404 is ``absent``. When both
  halves of a refused batch are then accepted whole, the refusal was the batch's size (the
  API documents no limit): later batches go out in pieces no larger than the halves were,
  but for a larger piece now and then, to learn whether the limit rose (a probe: refused,
  it is split as any call). While that is being found out, another batch as large waits for
  it rather than be refused as well (``worker.batchsize``).
- 401/403 and TLS refusals: raised at once; nothing more is sent by anyone.

A batch that only looks (``Batch.look``: ids of serve's entries given up unsent) is read
with the show call, one id at a time, and nothing of it is deleted: gone, ``absent``; still
there, ``failed``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import TYPE_CHECKING, Protocol

from anyio.lowlevel import checkpoint

from worker.batcher import DeletionBudget
from worker.batchsize import BatchSize, Learnt
from worker.clock import Clock
from worker.errors import (
    AMBIGUOUS,
    ApiError,
    ApiUnavailable,
    ClientError,
    NotFound,
    PermanentError,
    TransientError,
    another_job,
)
from worker.pacing.bucket import RateLimiter
from worker.pacing.paced import PacedCall, Stopped, Tries, Working
from worker.pacing.retry import RetryPolicy
from worker.types import (
    Batch,
    DeleteResult,
    JobRecord,
    Outcome,
    Result,
    gone,
    refused,
    skipped,
    unverified,
)

if TYPE_CHECKING:
    from worker.pacing.breaker import BreakerGate

__all__ = ["Dispatcher", "Doubt", "Journal", "Transport", "Working"]


class Transport(Protocol):
    """The two API calls the dispatcher needs (``worker.api.client.ApiClient`` is one)."""

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult: ...

    async def get_job(self, job_id: str) -> JobRecord: ...


class Journal(Protocol):
    """Where the dispatcher reports progress: the ledger, events and results behind it."""

    async def sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None: ...

    async def unsent(self, batch_id: str, ids: Sequence[str]) -> None:
        """A readable answer says the DELETEs of ``batch_id`` applied none of ``ids`` (a
        429; a 200 that left them out, taken at its word): they are no longer in doubt."""

    async def retrying(self, batch_id: str, attempt: int, delay_s: float, reason: str) -> None: ...

    async def finished(self, results: Sequence[Result]) -> None: ...


def _failed(job_id: str, batch_id: str, attempts: int, error: ApiError) -> Result:
    """An id the API refused: the job is still there."""
    return refused(job_id, batch_id=batch_id, attempts=attempts, error=error)


def _unread(job_id: str, batch_id: str, attempts: int, error: ApiError, doubt: Doubt) -> Result:
    """``failed``: the show call could not say whether the job is there; ``answer_lost``
    when an unanswered DELETE of it may have removed it."""
    if job_id in doubt.unsure:
        return unverified(job_id, batch_id=batch_id, attempts=attempts, error=error, ours=True)
    return _failed(job_id, batch_id, attempts, error)


def _left_out(answer: DeleteResult, doubt: Doubt, job_id: str) -> bool | None:
    """Is ``job_id``, which the 200 ``answer`` left out, ours if found gone (``not_listed``)?
    Yes when the run read it just before that DELETE, or an unanswered attempt sent it; no
    when the answer is whole, taken at its word; yes when its envelope says it lists part
    without counting the rest (more than one page, no ``total``). ``None`` when it counts
    them: that depends on how many of the ids it left out are gone (:func:`_counted`)."""
    if job_id in doubt.known or job_id in doubt.unsure:
        return True
    if answer.whole:
        return False
    return None if answer.untold is not None else True


def _counted(
    answer: DeleteResult,
    doubt: Doubt,
    gone: Mapping[str, NotFound],
    ours: int,
    batch_id: str,
    attempt: int,
) -> list[Result]:
    """The outcomes of ``gone``: ids a 200 that counts the deletions it did not list
    (``answer.untold``) left out, neither read before nor sent unanswered. Ours
    (``not_listed``) when that count holds them all, besides ``ours`` (the ids it left out
    that the run read just before, found gone); else some of them it did not delete,
    unknown which, and none is called ``deleted`` on its word: ``absent``, the count in
    ``error_msg``."""
    assert answer.untold is not None
    room = answer.untold - ours
    if len(gone) <= room:
        return [doubt.gone(i, batch_id, attempt, exc, unlisted=True) for i, exc in gone.items()]
    said = (
        f"gone, and left out of a 200 that counts {answer.untold} deletions it did not list, "
        f"for {len(gone) + ours} ids it left out that are gone: which of them it removed is "
        "not known"
    )
    return [
        doubt.gone(i, batch_id, attempt, NotFound(said, http_status=exc.http_status,
                   error_code=exc.error_code, error_msg=said, request_id=exc.request_id))
        for i, exc in gone.items()
    ]  # fmt: skip


class _StaleCheck(Exception):
    """Raised before an attempt goes out: the guard's check of its ids is too old."""


class _SizeInDoubt(Exception):
    """Raised before a batch's first call goes out whole: a call as large was refused
    whole meanwhile, and its split has not yet said whether for its size."""


class Doubt:
    """What one batch knows about ids that may be gone by its own hand: those sent in an
    attempt without a readable answer (``unsure``, growing as such attempts happen) and
    the records read of its jobs before (``known``). And until when the guard's check of
    its jobs holds (``until``), with the ids it no longer covered when their turn to be
    sent came (``stale``).

    ``unsent``: the ids, open, whose share of the cap goes back when their batch is done
    sending (whole, stopped or cancelled): never sent, or sent only in attempts answered
    as not applied (a 429; a 200 that left them out, taken at its word). As the ledger
    counts them (``Ledger.sent_before``): not ``sent``, no outcome after an attempt."""

    __slots__ = ("known", "stale", "unsent", "unsure", "until", "wall_until")

    def __init__(self, batch: Batch) -> None:
        self.unsure: set[str] = set(batch.unsure)
        self.known: Mapping[str, JobRecord] = batch.known
        self.until = batch.fresh_until
        self.wall_until = batch.wall_until
        self.stale: list[str] = []
        self.unsent: set[str] = set(batch.ids) - self.unsure

    def given_back(self, ids: Sequence[str]) -> int:
        """Of ``ids``, how many give their share of the cap back (``unsent``): once only."""
        back = self.unsent.intersection(ids)
        self.unsent -= back
        return len(back)

    def gone(
        self, job_id: str, batch_id: str, attempts: int, error: ApiError, *, unlisted: bool = False
    ) -> Result:
        """A 404 for ``job_id``: ``absent``, or ``deleted`` unconfirmed if we may have.
        ``unlisted``: a 200 to a DELETE of it left it out, an answer not to be taken at its
        word (see the module's docstring)."""
        return gone(
            job_id,
            unsure=self.unsure,
            known=self.known,
            batch_id=batch_id,
            attempts=attempts,
            http_status=error.http_status,
            request_id=error.request_id,
            error_code=error.error_code,
            error_msg=error.error_msg or str(error),
            unlisted=unlisted,
        )


class Dispatcher:
    """Deletes batches. Stateless between batches but for counters shown in ``repr`` and what
    is known of the largest batch the API takes (``sizes``)."""

    def __init__(
        self,
        *,
        transport: Transport,
        limiter: RateLimiter,
        policy: RetryPolicy,
        journal: Journal,
        clock: Clock,
        budget: DeletionBudget,
        max_attempts: int,
        dry_run: bool = False,
        stopping: Callable[[], bool] = lambda: False,
        working: Working | None = None,
        gate: BreakerGate | None = None,
        sizes: BatchSize | None = None,
        keep_sizes: Callable[[Learnt], Awaitable[None]] | None = None,
    ) -> None:
        """``gate``: the breaker every call asks before it takes a token (none: no breaker).
        The calls go through one ``PacedCall`` (see ``paced``, to share it with readers).
        ``sizes``: what is known of the largest call the API takes (an earlier run's, with
        a ledger), told to ``keep_sizes`` as it is learnt."""
        self._transport = transport
        self._journal = journal
        self._budget = budget
        self._max_attempts = max_attempts
        self._dry_run = dry_run
        self._clock = clock
        self.paced = PacedCall(
            limiter=limiter, policy=policy, clock=clock, gate=gate, stopping=stopping,
            working=working if working is not None else Working(),
        )  # fmt: skip
        self.calls = 0
        self.splits = 0
        self.reconciled = 0
        self.sizes = sizes if sizes is not None else BatchSize()
        self._keep_sizes = keep_sizes

    def __repr__(self) -> str:
        return (
            f"Dispatcher(calls={self.calls}, splits={self.splits}, "
            f"reconciled={self.reconciled}, dry_run={self._dry_run}, budget={self._budget!r})"
        )

    async def process(self, batch: Batch) -> None:
        """Give every id of ``batch`` an outcome, or leave it open when the run stops."""
        await self.delete_checked(batch)

    async def delete_checked(self, batch: Batch) -> Batch:
        """``process``, for a batch the guard checked: the ids whose check was past
        ``batch.fresh_until`` when their DELETE's turn came are not sent, and are returned
        (without an outcome) to be checked again, as a batch (empty when there are none)
        whose ``unsure`` names those of them an attempt of this one, or of an earlier run,
        sent without a readable answer: found gone, they are ours (``answer_lost``), and
        they are counted against the cap already."""
        if self._dry_run:
            await self._skip(batch, batch.ids, "dry_run")
            return Batch(batch.batch_id, ())
        if batch.look:
            await self._look(batch)
            return Batch(batch.batch_id, ())
        ids = batch.ids
        if batch.unsure:  # sent by a run that died: counted against the cap by it already
            ids = (
                *[i for i in ids if i in batch.unsure],
                *[i for i in ids if i not in batch.unsure],
            )
        doubt = Doubt(batch)
        held = self._budget.take(len(ids) - len(batch.unsure))
        granted, done = len(batch.unsure) + held, 0
        while True:
            if granted:
                await self._delete_shared(batch.batch_id, ids[done : done + granted], doubt, held)
                done += granted
            if done == len(ids):
                break
            if self._budget.reached:  # the cap, and no share taken may come back
                await self._skip(batch, ids[done:], "max_deletions")
                break
            with self._waiting():  # shares taken are out: some may come back
                await self._budget.settled()
            await checkpoint()  # a stop wins, even where nothing came back and nothing waited
            held = granted = self._budget.take(len(ids) - done)
        stale = tuple(doubt.stale)
        unsure = frozenset(doubt.unsure.intersection(stale))
        return Batch(batch.batch_id, stale, unsure, batch.known)

    async def _delete_shared(
        self, batch_id: str, ids: Sequence[str], doubt: Doubt, held: int
    ) -> None:
        """``_delete_sized``, on ``held`` shares of the cap taken for ``ids`` (the others of
        them counted already, by a run that died with them sent), settled after."""
        try:
            await self._delete_sized(batch_id, ids, doubt)
        except BaseException as exc:
            if isinstance(exc, ApiUnavailable):  # the ids stay open: say which may be ours
                exc.unsure = frozenset(doubt.unsure)
            raise
        finally:
            # Not sent, or sent only to be answered "not applied" (a stop's cancel too): the
            # budget they took is theirs again (when they come back re-checked, or in the
            # next run). Those in doubt or ended after an attempt keep theirs.
            self._budget.settle(held, doubt.given_back(ids))

    async def _delete_sized(self, batch_id: str, ids: Sequence[str], doubt: Doubt) -> None:
        """``ids`` in one call, or in pieces of the size the API is known to take; a call
        as large as one refused whole whose split is under way waits for it first (nothing
        of it sent meanwhile, waiting: a stop cancels it at once)."""
        while True:
            if self.sizes.doubted(len(ids)):
                with self._waiting():
                    await self.sizes.clear(len(ids))
            cap = self.sizes.cap
            if cap is not None and len(ids) > cap:
                number = start = 0
                while start < len(ids):  # at the cap, or now and then a probe past it
                    # A stop wins here whatever a piece does: a cap of 0 (a learnt limit
                    # edited past sense, 6063c5c) sent nothing and awaited nothing, and the
                    # loop spun with SIGTERM unheard until kill -9.
                    await checkpoint()
                    number += 1
                    with self.sizes.piece(len(ids) - start) as size:
                        piece = ids[start : start + size]
                        await self._delete(f"{batch_id}.{number}", piece, doubt)
                    start += size
                return
            try:
                await self._delete(batch_id, ids, doubt, whole=True)
                return
            except _SizeInDoubt:
                await checkpoint()  # round again: a stop wins
                continue  # refused whole while this one waited its turn: wait, then split

    async def _learnt(self, before: Learnt | None) -> None:
        """Keep what is known of the largest call, when it changed from ``before``."""
        learnt = self.sizes.learnt
        if self._keep_sizes is not None and learnt is not None and learnt != before:
            await self._keep_sizes(learnt)

    def _waiting(self) -> AbstractContextManager[None]:
        working = self.paced.working
        return working.waiting() if working is not None else nullcontext()

    async def _look(self, batch: Batch) -> None:
        """Read the jobs of a batch that only looks (``Batch.look``), deleting none: gone,
        ``absent``; still there, ``failed`` (its entry gave them up). Stopped: left open."""
        doubt = Doubt(batch)
        there = ApiError(
            "not deleted: its entry was given up past max_deliveries before a call of it "
            "sent this id, and the job is still there"
        )
        for job_id in batch.ids:
            if await self._exists(batch.batch_id, job_id, 0, doubt):
                await self._journal.finished([_failed(job_id, batch.batch_id, 0, there)])

    async def _skip(self, batch: Batch, ids: Sequence[str], reason: str) -> None:
        await self._journal.finished([skipped(i, batch=batch, reason=reason) for i in ids])

    async def _delete(
        self, batch_id: str, ids: Sequence[str], doubt: Doubt, *, whole: bool = False
    ) -> bool:
        """True when the API took the ids as one call (no 4xx made them split). ``whole``:
        a batch's ids as one call, which raises ``_SizeInDoubt`` rather than go out while a
        call as large is refused whole and its split under way (none of it sent yet)."""
        remaining = tuple(ids)
        tries = Tries()

        async def sending(attempt: int) -> None:
            if whole and not tries.sent and self.sizes.doubted(len(remaining)):
                raise _SizeInDoubt  # its place and token came after such a refusal
            if doubt.until is not None and self._clock.now() > doubt.until:
                raise _StaleCheck  # the token came too late for the check these ids passed
            if doubt.wall_until is not None and self._clock.wall() >= doubt.wall_until:
                raise _StaleCheck  # or too late for the plan, on the system's clock
            doubt.unsent.difference_update(remaining)  # out: counted, unless heard unapplied
            await self._journal.sent(batch_id, remaining, attempt)

        async def retrying(exc: TransientError, attempt: int, delay_s: float, why: str) -> None:
            if isinstance(exc, AMBIGUOUS):  # it may have been applied unseen
                doubt.unsure.update(remaining)
            await self._journal.retrying(batch_id, attempt, delay_s, why)

        async def send(ids: Sequence[str]) -> DeleteResult:
            try:
                return await self._send_delete(ids)
            except TransientError as exc:  # heard even when the run stops on it
                if not isinstance(exc, AMBIGUOUS):  # answered "not applied": a 429
                    await self._heard(batch_id, ids, doubt)
                raise

        while remaining:
            try:
                answer = await self.paced(
                    partial(send, remaining),
                    what=batch_id, open_ids=len(remaining), tries=tries, sending=sending,
                    retrying=retrying,
                )  # fmt: skip
            except Stopped:
                return True  # the run is stopping: the ids stay open for the next run
            except _StaleCheck:
                # What they took of the cap is given back (``Doubt.unsent``) unless an
                # attempt, here or in a run that died, may have applied them.
                doubt.stale.extend(remaining)
                return True
            except (ClientError, NotFound) as exc:
                await self._refused(batch_id, remaining, tries.attempt, exc, doubt)
                return False
            learnt = self.sizes.learnt
            self.sizes.took(len(remaining))
            await self._learnt(learnt)
            attempt = tries.attempt
            remaining = await self._settle(batch_id, remaining, attempt, answer, doubt)
            if remaining and attempt >= self._max_attempts:
                error = ApiError(
                    "the API answered 200 without these jobs, and they still exist",
                    http_status=200,
                    error_msg="job still exists after DELETE",
                    request_id=answer.request_id,
                )
                await self._ended(doubt, [_failed(i, batch_id, attempt, error) for i in remaining])
                return True
        return True

    async def _refused(
        self,
        batch_id: str,
        ids: Sequence[str],
        attempt: int,
        exc: ClientError | NotFound,
        doubt: Doubt,
    ) -> None:
        """A 4xx that is not about credentials: isolate the ids the API objects to.

        An id refused after an ambiguous failure may already be gone: the show call decides
        between gone and ``failed``, so ``failed`` means the job is still there (when the
        show call is refused too, ``reason: answer_lost`` says it may be gone).
        """
        await self._heard(batch_id, ids, doubt)
        if len(ids) > 1:
            self.splits += 1
            half = len(ids) // 2
            sized = isinstance(exc, ClientError) and exc.http_status in (400, 413)
            with self.sizes.doubting(len(ids)) if sized else nullcontext():
                first = await self._delete(f"{batch_id}.1", ids[:half], doubt)
                second = await self._delete(f"{batch_id}.2", ids[half:], doubt)
                if first and second and sized:
                    learnt = self.sizes.learnt
                    self.sizes.learn(refused=len(ids), taken=len(ids) - half)
                    await self._learnt(learnt)
            return
        exists = True
        if ids[0] in doubt.unsure and isinstance(exc, ClientError):
            exists = await self._exists(batch_id, ids[0], attempt, doubt)
        if not exists:
            return  # gone, or left open by a stop: _exists has seen to it
        if isinstance(exc, NotFound):
            await self._ended(doubt, [doubt.gone(ids[0], batch_id, attempt, exc)])
            return
        await self._ended(doubt, [_failed(ids[0], batch_id, attempt, exc)])

    async def _settle(
        self, batch_id: str, ids: Sequence[str], attempt: int, answer: DeleteResult, doubt: Doubt
    ) -> tuple[str, ...]:
        """Record what a 200 says was deleted; check the rest; return the ids still there."""
        wanted = set(ids)
        deleted = {record.id: record for record in answer.records if record.id in wanted}
        if deleted:
            await self._ended(
                doubt,
                [
                    Result(
                        job_id=job_id,
                        outcome=Outcome.DELETED,
                        attempts=attempt,
                        batch_id=batch_id,
                        http_status=answer.http_status,
                        request_id=answer.request_id,
                        record=record,
                    )
                    for job_id, record in deleted.items()
                ],
            )
        missing = [job_id for job_id in ids if job_id not in deleted]
        taken_at_its_word = [i for i in missing if _left_out(answer, doubt, i) is False]
        await self._heard(batch_id, taken_at_its_word, doubt)
        still_there: list[str] = []
        counted: dict[str, NotFound] = {}  # gone, ours only if the answer's count allows
        ours = 0  # gone, and ours: read just before this DELETE (of the count's deletions)
        for job_id in missing:
            found = await self._show(batch_id, job_id, doubt, attempt)
            if found is True:
                still_there.append(job_id)
            if not isinstance(found, NotFound):
                continue
            # Left out by a 200 not to be taken at its word: found gone, the call is ours.
            unlisted = _left_out(answer, doubt, job_id)
            if unlisted is None:
                counted[job_id] = found
                continue
            ours += unlisted and job_id not in doubt.unsure
            await self._ended(
                doubt, [doubt.gone(job_id, batch_id, attempt, found, unlisted=unlisted)]
            )
        if counted:
            await self._ended(doubt, _counted(answer, doubt, counted, ours, batch_id, attempt))
        return tuple(still_there)

    async def _ended(self, doubt: Doubt, results: Sequence[Result]) -> None:
        """Outcomes of ids of the batch ``doubt`` is of: after an attempt, their share of the
        cap is spent (``Doubt.unsent``)."""
        doubt.unsent.difference_update(r.job_id for r in results)
        await self._journal.finished(results)

    async def _heard(self, batch_id: str, ids: Sequence[str], doubt: Doubt) -> None:
        """An answer was heard, and it says no DELETE of this batch applied ``ids`` (those
        of them in doubt stay so): they are not in doubt, and a run that stops or dies
        before they end (checking them one show call at a time, or asleep on a
        ``Retry-After``) leaves them to be sent again, not found gone and called
        ``deleted`` by a DELETE that did not apply them; their share of the cap goes back
        unless they end first (``Doubt.unsent``)."""
        heard = [i for i in ids if i not in doubt.unsure]
        if heard:
            await self._journal.unsent(batch_id, heard)
            doubt.unsent.update(heard)

    async def _exists(self, batch_id: str, job_id: str, attempt: int, doubt: Doubt) -> bool:
        """The show call: does the job still exist? A 404 ends it gone (``doubt.gone``);
        the record of another job ends it ``failed``: neither there nor gone is known."""
        found = await self._show(batch_id, job_id, doubt, attempt)
        if isinstance(found, NotFound):
            await self._ended(doubt, [doubt.gone(job_id, batch_id, attempt, found)])
            return False
        return found

    async def _show(
        self, batch_id: str, job_id: str, doubt: Doubt, attempt: int
    ) -> bool | NotFound:
        """The show call: ``True``, the job is there; its 404 when gone, its outcome left to
        the caller; ``False`` when ended here (``failed``) or left open (a stop)."""
        self.reconciled += 1

        async def retrying(exc: TransientError, check: int, delay_s: float, why: str) -> None:
            await self._journal.retrying(batch_id, check, delay_s, why)

        try:
            record = await self.paced(
                partial(self._send_show, job_id), what=batch_id,
                retrying=retrying,
            )  # fmt: skip
        except NotFound as exc:
            return exc
        except Stopped:
            return False  # the run is stopping: left open
        except PermanentError as exc:
            if not isinstance(exc, ClientError):
                raise
            await self._ended(doubt, [_unread(job_id, batch_id, attempt, exc, doubt)])
            return False
        if record.id != job_id:  # not the job asked about: nothing known of this one
            error = another_job(job_id, record.id)
            await self._ended(doubt, [_unread(job_id, batch_id, attempt, error, doubt)])
            return False
        return True

    async def _send_delete(self, ids: Sequence[str]) -> DeleteResult:
        self.calls += 1
        return await self._transport.delete_jobs(ids)

    async def _send_show(self, job_id: str) -> JobRecord:
        self.calls += 1
        return await self._transport.get_job(job_id)
