"""Outcomes fan out from here: ledger first, then events, results file and tallies.

The ledger is synchronous SQLite; ``LedgerPort`` runs it in one worker thread at a time so
the event loop never blocks on disk. Everything the dispatcher reports passes through
``RunJournal``, which keeps the invariant in one place: an outcome is in the ledger before
anyone else hears of it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
import anyio.lowlevel
import anyio.to_thread
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from worker.errors import OutcomeConflict, ReaperError, ResultsUnwritable, UsageError
from worker.input.intake import escape
from worker.private_files import replacing
from worker.targets import Target
from worker.types import Candidate, Outcome, Rejection, Result

if TYPE_CHECKING:  # a type only: report and discover (check_output) log nothing from here
    from worker.outcomes.events import EventLog


class AdmissionLike(Protocol):
    @property
    def new(self) -> list[Candidate]: ...
    @property
    def repeated(self) -> list[Candidate]: ...
    @property
    def done(self) -> list[tuple[Candidate, Outcome]]: ...
    @property
    def resent(self) -> int: ...
    @property
    def unsure(self) -> frozenset[str]: ...
    @property
    def conflicts(self) -> list[Rejection]: ...


class SeenLike(Protocol):
    """What de-duplicates a run's ids (``worker.ledger.TemporaryLedger`` does only this)."""

    def admit(self, candidates: Sequence[Candidate]) -> AdmissionLike: ...

    def admits_in_memory(self, n: int) -> bool:
        """Whether admitting ``n`` more ids touches no disk (the port then admits them on the
        event loop instead of hopping to a thread)."""
        ...


@runtime_checkable
class LedgerLike(SeenLike, Protocol):
    """The durable ledger (``worker.ledger.Ledger``): also what was sent and settled."""

    def mark_sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None: ...
    def mark_unsent(self, ids: Sequence[str]) -> None: ...
    def record(self, results: Sequence[Result]) -> None: ...
    def record_rejected(self, rejections: Sequence[Rejection]) -> None: ...
    def keep_batch_size(self, target: Target, learnt: tuple[int, int]) -> None: ...


class LedgerPort:
    """The ledger, off the event loop: one thread, one call at a time.

    A run without ``--ledger`` de-duplicates through a temporary ledger that can only
    ``admit``: nothing can resume from it or report on it, so there is nothing to tell it
    about sends and outcomes, and ``mark_sent``, ``record`` and ``record_rejected`` cost
    nothing (no thread hop). "Exactly one outcome per id" does not rest on them either:
    :class:`RunJournal` enforces it for every run. While its ids still fit in memory it
    admits on the event loop too: a set look-up per id costs less than the hop.
    """

    def __init__(self, ledger: SeenLike) -> None:
        self._seen = ledger
        self._durable = ledger if isinstance(ledger, LedgerLike) else None
        self._one = anyio.CapacityLimiter(1)

    @property
    def durable(self) -> bool:
        """Whether a later run resumes from what is recorded here (``--ledger``)."""
        return self._durable is not None

    async def admit(self, candidates: Sequence[Candidate]) -> AdmissionLike:
        if self._seen.admits_in_memory(len(candidates)):
            return self._seen.admit(candidates)
        return await anyio.to_thread.run_sync(self._seen.admit, candidates, limiter=self._one)

    async def mark_sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        if self._durable is not None:
            await anyio.to_thread.run_sync(
                self._durable.mark_sent, batch_id, ids, attempt, limiter=self._one
            )

    async def mark_unsent(self, ids: Sequence[str]) -> None:
        if self._durable is not None:
            await anyio.to_thread.run_sync(self._durable.mark_unsent, ids, limiter=self._one)

    async def record(self, results: Sequence[Result]) -> None:
        if self._durable is not None:
            await anyio.to_thread.run_sync(self._durable.record, results, limiter=self._one)

    async def record_rejected(self, rejections: Sequence[Rejection]) -> None:
        if self._durable is not None:
            await anyio.to_thread.run_sync(
                self._durable.record_rejected, rejections, limiter=self._one
            )

    async def keep_batch_size(self, target: Target, learnt: tuple[int, int]) -> None:
        if self._durable is not None:
            await anyio.to_thread.run_sync(
                self._durable.keep_batch_size, target, learnt, limiter=self._one
            )

    def __repr__(self) -> str:
        return f"LedgerPort({self._seen!r}, durable={self._durable is not None})"


@dataclass(slots=True)
class Tally:
    """What the run has done so far: the summary and the progress display read it."""

    outcomes: Counter[str] = field(default_factory=Counter)
    skip_reasons: Counter[str] = field(default_factory=Counter)
    read: int = 0
    repeated: int = 0
    already_done: int = 0
    already_failed: int = 0  # of already_done: ids an earlier run left failed
    resent: int = 0
    retries: int = 0
    unconfirmed: int = 0  # of outcomes["deleted"]: known gone, record never returned
    by_target: dict[Target, Counter[str]] = field(default_factory=dict)
    """Of ``outcomes``: those of ids whose line named a target, per target (the rest are
    the default project's)."""

    @property
    def finished(self) -> int:
        return sum(self.outcomes.values())

    def counts(self) -> dict[str, int]:
        return {outcome.value: self.outcomes[outcome.value] for outcome in Outcome}


class ResultsWriter:
    """``--results``: one JSON line per id with its terminal outcome."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.written = 0

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        try:
            self._stream.write(b"".join(orjson.dumps(row) + b"\n" for row in rows))
        except OSError as exc:
            raise self._unwritable(exc) from None
        self.flush()  # a batch's lines out with its events: a kill loses none
        self.written += len(rows)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise self._unwritable(exc) from None

    def _unwritable(self, exc: OSError) -> ResultsUnwritable:
        name = getattr(self._stream, "name", "the results file")
        return ResultsUnwritable(f"results file {name} cannot be written: {exc.strerror or exc}")

    def __repr__(self) -> str:
        return f"ResultsWriter(written={self.written})"


def check_output(
    name: str,
    flag: str,
    source: str | None,
    ledger: Path | None,
    *,
    also: Sequence[tuple[str | None, str]] = (),
) -> None:
    """A file about to be truncated (``--results``, ``report --output``), checked before
    anything is done (``UsageError``, 64): it must be named, must not be the input (or
    plan), one of the ledger's files or another output (``also``: path and what it is),
    and must be a file we can write."""
    if not name.strip():
        raise UsageError(f"{flag} needs a file path, not an empty one")
    path = Path(name)
    others: list[tuple[str | Path | None, str]] = [(source, "the input"), *also]
    if ledger is not None:  # SQLite keeps a ledger in up to three files, plus our lock
        others += [(ledger.with_name(ledger.name + suffix), "the ledger")
                   for suffix in ("", "-wal", "-shm", "-journal", ".lock")]  # fmt: skip
    for other, what in others:
        if other is None or other == "-":
            continue
        if path.resolve() == Path(other).resolve() or (
            path.exists() and Path(other).exists() and path.samefile(other)
        ):
            raise UsageError(f"{flag} {path} is {what}: it would be overwritten")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory")
    target = path if path.exists() else path.parent
    if not target.is_dir() and not path.exists():
        raise UsageError(f"{flag} {path}: the directory {path.parent} does not exist")
    if not os.access(target, os.W_OK):
        raise UsageError(f"{flag} {path} cannot be written (permission denied)")


def rewrite_results(results: Iterable[Result], path: Path) -> int:
    """Replace the results file at ``path`` with a line for each of ``results`` (from the
    ledger: every id the run read, whichever run settled it), atomically: written beside
    it in a private temporary file that takes its mode, then renamed over it (see
    ``worker.private_files.replacing``). Returns the lines written (none to a file that is
    not a regular one, which is left as it is). ``ResultsUnwritable`` when it cannot be.

    What a run writes batch by batch can miss lines (a kill between the ledger's commit and
    the file's write; a run that found nothing left open and started the file afresh; a
    rejected line written again on each resumption); the ledger cannot, so a run that has
    one ends by writing the file from it."""
    written = 0
    try:
        with replacing(path) as out:
            if out is None:
                return 0  # a pipe or a device (/dev/stdout): what was written to it is all it gets
            for result in results:
                out.write(orjson.dumps(result.row()) + b"\n")
                written += 1
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ResultsUnwritable(f"results file {path} cannot be written: {reason}") from None
    return written


class RunJournal:
    """Implements the dispatcher's ``Journal`` and the intake's reporting.

    It also holds the run's invariant in memory: an id may get an outcome only after the
    pipeline has handed it to the dispatcher (:meth:`dispatching`), and only once. The
    ledger's admission already lets each id into one batch only, so the set of ids handed
    over and not yet settled is bounded by the calls in flight, whatever the input's size.
    """

    def __init__(
        self,
        *,
        ledger: LedgerPort,
        events: EventLog,
        tally: Tally,
        results: ResultsWriter | None = None,
    ) -> None:
        self._ledger = ledger
        self._events = events
        self._tally = tally
        self._results = results
        self._unsettled: set[str] = set()
        self._later: MemoryObjectSendStream[Sequence[Result]] | None = None

    def dispatching(self, ids: Sequence[str]) -> None:
        """The ids of a batch handed to the dispatcher: each is now due one outcome."""
        self._unsettled.update(ids)

    @property
    def unsettled(self) -> int:
        """Ids handed to the dispatcher without an outcome yet (left open by a stop)."""
        return len(self._unsettled)

    def _settle(self, results: Sequence[Result]) -> None:
        """Take the results' ids off the unsettled set; ``OutcomeConflict`` (and nothing
        taken, nothing written) when an id is not due an outcome or appears twice."""
        ids = [result.job_id for result in results]
        unique = set(ids)
        if len(unique) != len(ids) or not unique <= self._unsettled:
            stray = [i for i in unique if i not in self._unsettled]
            example = stray[0] if stray else _first_repeat(ids)
            raise OutcomeConflict(
                f"an outcome for {escape(example)}, which is not due one (never handed to "
                "the dispatcher, already settled, or twice in one report); nothing of the "
                "report was recorded"
            )
        self._unsettled -= unique

    async def sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        await self._ledger.mark_sent(batch_id, ids, attempt)

    async def unsent(self, batch_id: str, ids: Sequence[str]) -> None:
        await self._ledger.mark_unsent(ids)

    async def retrying(self, batch_id: str, attempt: int, delay_s: float, reason: str) -> None:
        self._tally.retries += 1
        self._events.retry(batch_id, attempt, delay_s, reason)

    async def finished(self, results: Sequence[Result]) -> None:
        """The outcomes of ``results``: taken off the ids due one at once (or
        ``OutcomeConflict``), and recorded (ledger, tallies, events, results file) at once
        or, inside :meth:`recording_behind`, by its task."""
        self._settle(results)
        later = self._later
        if later is None:
            await self._record(results)
            return
        try:
            later.send_nowait(results)
        except anyio.WouldBlock:
            # Settled already: a dispatcher cancelled while it waits for room (a second
            # Ctrl-C, --grace 0) must not take its ids' outcomes with it; the recording
            # task is draining the reports ahead, so the wait is short.
            with anyio.CancelScope(shield=True):
                await later.send(results)

    async def _record(self, results: Sequence[Result]) -> None:
        await self._ledger.record(results)
        self._count(results)
        self._events.results(results)
        if self._results is not None:
            self._results.write([result.row() for result in results])

    @asynccontextmanager
    async def recording_behind(
        self, failed: Callable[[ReaperError], None], *, buffer: int
    ) -> AsyncIterator[None]:
        """While inside, outcomes are recorded by a task of their own, each report after
        the calls sent meanwhile have gone out: a dispatcher reporting a batch's outcomes
        goes on to its next call at once, not held behind their recording (a line per id,
        the results file: at 20 ms latency a slot's hand-off from one call to the next
        fell from 2.9 to 0.8 ms, ``bench_sdk``'s ``slot_waits``). What is recorded, and in
        which order, is unchanged; on the way out every outcome reported is recorded.
        ``buffer``: reports waiting before a dispatcher reporting another waits for room
        (one per dispatcher keeps what a ``kill -9`` leaves unrecorded to about two calls
        per dispatcher: the one in flight and the one answered).

        ``failed`` is told a recording's error (the results file unwritable), which no
        dispatcher then sees: the run stops as it did, but a dispatcher may have one more
        call out by then, as the others had theirs in flight.

        Not with a durable ledger: each outcome is committed before the next call, as
        ``docs/ledger.md`` promises (a crash leaves no more than the calls in flight
        unsettled, to be sent again by the run that resumes)."""
        if self._ledger.durable:
            yield
            return
        send, receive = anyio.create_memory_object_stream[Sequence[Result]](buffer)
        async with anyio.create_task_group() as group:
            group.start_soon(self._record_behind, receive, failed)
            self._later = send
            try:
                yield
            finally:
                self._later = None
                send.close()

    async def _record_behind(
        self,
        receive: MemoryObjectReceiveStream[Sequence[Result]],
        failed: Callable[[ReaperError], None],
    ) -> None:
        async with receive:
            async for results in receive:
                # One trip round the loop: a call its dispatcher went on to send after
                # reporting these is written first (aiohttp writes a body from a task of
                # its own before Python 3.12, queued behind whatever is ready).
                await anyio.lowlevel.checkpoint()
                try:
                    await self._record(results)
                except ReaperError as exc:
                    failed(exc)

    def _count(self, results: Sequence[Result]) -> None:
        outcomes, skipped = self._tally.outcomes, Outcome.SKIPPED
        if not results:
            return
        self._tally.unconfirmed += sum(not result.confirmed for result in results)
        target = results[0].target  # one call's results are one lane's: one target
        if target is not None:
            by_target = self._tally.by_target.setdefault(target, Counter())
            by_target.update(result.outcome.value for result in results)
        first = results[0].outcome
        if first is not skipped and all(result.outcome is first for result in results):
            outcomes[first.value] += len(results)  # a batch's usual report: one outcome
            return
        for result in results:
            outcomes[result.outcome.value] += 1
            if result.outcome is skipped:  # skips are counted by reason too
                self._tally.skip_reasons[result.reason or ""] += 1

    async def rejected(self, rejections: Sequence[Rejection]) -> None:
        await self._ledger.record_rejected(rejections)
        self._tally.outcomes[Outcome.REJECTED.value] += len(rejections)
        self._events.rejections(rejections)
        if self._results is not None:
            self._results.write(
                [
                    Result(
                        job_id=escape(r.raw),
                        outcome=Outcome.REJECTED,
                        reason=r.reason,
                        line=r.line,
                        raw=None if r.text is None else escape(r.text),
                    ).row()
                    for r in rejections
                ]
            )

    def __repr__(self) -> str:
        return (
            f"RunJournal(tally={self._tally!r}, unsettled={len(self._unsettled)}, "
            f"results={self._results!r})"
        )


def _first_repeat(ids: Sequence[str]) -> str:
    seen: set[str] = set()
    for job_id in ids:
        if job_id in seen:
            return job_id
        seen.add(job_id)
    return ids[0]
