"""Outcomes fan out from here: ledger first, then events, results file and tallies.

The ledger is synchronous SQLite; ``LedgerPort`` runs it in one worker thread at a time so
the event loop never blocks on disk. Everything the dispatcher reports passes through
``RunJournal``, which keeps the invariant in one place: an outcome is in the ledger before
anyone else hears of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import anyio
import anyio.to_thread
import orjson

from worker.events import EventLog
from worker.intake import escape
from worker.types import Candidate, Outcome, Rejection, Result


class AdmissionLike(Protocol):
    @property
    def new(self) -> list[Candidate]: ...
    @property
    def repeated(self) -> list[Candidate]: ...
    @property
    def done(self) -> list[tuple[Candidate, Outcome]]: ...
    @property
    def resent(self) -> int: ...


class LedgerLike(Protocol):
    """The synchronous ledger (``worker.ledger.Ledger``)."""

    @property
    def temporary(self) -> bool: ...

    def admit(self, candidates: Sequence[Candidate]) -> AdmissionLike: ...
    def mark_sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None: ...
    def record(self, results: Sequence[Result]) -> None: ...
    def record_rejected(self, rejections: Sequence[Rejection]) -> None: ...


class LedgerPort:
    """The ledger, off the event loop: one thread, one call at a time.

    A temporary ledger (no ``--ledger``) is deleted when the run ends, so nothing can ever
    resume from it: ``mark_sent``, which exists only to tell a later run what may already
    be deleted, is skipped for it (one thread hop and one transaction per batch saved).
    ``record`` is kept: it is where "exactly one outcome per id" is enforced at any scale.
    """

    def __init__(self, ledger: LedgerLike) -> None:
        self._ledger = ledger
        self._one = anyio.CapacityLimiter(1)
        self._track_sent = not ledger.temporary

    async def admit(self, candidates: Sequence[Candidate]) -> AdmissionLike:
        return await anyio.to_thread.run_sync(self._ledger.admit, candidates, limiter=self._one)

    async def mark_sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        if not self._track_sent:
            return
        await anyio.to_thread.run_sync(
            self._ledger.mark_sent, batch_id, ids, attempt, limiter=self._one
        )

    async def record(self, results: Sequence[Result]) -> None:
        await anyio.to_thread.run_sync(self._ledger.record, results, limiter=self._one)

    async def record_rejected(self, rejections: Sequence[Rejection]) -> None:
        await anyio.to_thread.run_sync(self._ledger.record_rejected, rejections, limiter=self._one)

    def __repr__(self) -> str:
        return f"LedgerPort({self._ledger!r}, track_sent={self._track_sent})"


@dataclass(slots=True)
class Tally:
    """What the run has done so far: the summary and the progress display read it."""

    outcomes: Counter[str] = field(default_factory=Counter)
    skip_reasons: Counter[str] = field(default_factory=Counter)
    read: int = 0
    repeated: int = 0
    already_done: int = 0
    resent: int = 0
    retries: int = 0

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
        self._stream.write(b"".join(orjson.dumps(row) + b"\n" for row in rows))
        self.written += len(rows)

    def flush(self) -> None:
        self._stream.flush()

    def __repr__(self) -> str:
        return f"ResultsWriter(written={self.written})"


class RunJournal:
    """Implements the dispatcher's ``Journal`` and the intake's reporting."""

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

    async def sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        await self._ledger.mark_sent(batch_id, ids, attempt)

    async def retrying(self, batch_id: str, attempt: int, delay_s: float, reason: str) -> None:
        self._tally.retries += 1
        self._events.retry(batch_id, attempt, delay_s, reason)

    async def finished(self, results: Sequence[Result]) -> None:
        await self._ledger.record(results)
        outcomes, skipped = self._tally.outcomes, Outcome.SKIPPED
        for result in results:
            outcomes[result.outcome.value] += 1
            if result.outcome is skipped:
                self._tally.skip_reasons[result.reason or ""] += 1
        self._events.results(results)
        if self._results is not None:
            self._results.write([result.row() for result in results])

    async def rejected(self, rejections: Sequence[Rejection]) -> None:
        await self._ledger.record_rejected(rejections)
        self._tally.outcomes[Outcome.REJECTED.value] += len(rejections)
        self._events.rejections(rejections)
        if self._results is not None:
            self._results.write(
                [
                    Result(job_id=escape(r.raw), outcome=Outcome.REJECTED, reason=r.reason).row()
                    | {"line": r.line}
                    for r in rejections
                ]
            )

    def __repr__(self) -> str:
        return f"RunJournal(tally={self._tally!r}, results={self._results!r})"
