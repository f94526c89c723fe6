"""serve's intake as decisions: which read comes next, and when a batch is due. Pure logic:
no I/O, time passed in. The service's read loop carries out what these return.

``IntakePlan`` chooses the next read (as httpcore's pool chooses the next connection):

1. ``ReadOwn``: this consumer's own pending entries first, page by page, without counting a
   delivery (a restart and a pause are not deliveries); again mid-round when asked
   (``reread``: a paused region answers again, and the entries handed back for it wait).
2. ``AwaitAnswer``: after a pause (``resumed``), while those entries have not had one answer
   from the API, nothing new is read: refused credentials must not pull in more entries
   each round.
3. ``Reclaim``: every ``reclaim_interval``, entries idle longer than ``reclaim_after`` from
   anyone, scanning the pending list page by page until the scan wraps.
4. ``ReadNew``: new entries, blocking at most until the linger deadline of the batch being
   filled or the next reclaim, whichever is sooner, and at most ``block`` seconds.

``LingerBatcher`` cuts ids into batches of ``batch_size``, or sooner: when the first id of a
batch has waited ``linger`` seconds, or when a read comes back empty.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.batcher import Batcher
from worker.targets import Target
from worker.types import Batch


@dataclass(frozen=True, slots=True)
class ReadOwn:
    after: str
    """``"-"`` from the start, else the last entry id of the previous page."""


@dataclass(frozen=True, slots=True)
class AwaitAnswer:
    """Flush what is batched, then wait for an answer of the API to one of our batches."""


@dataclass(frozen=True, slots=True)
class Reclaim:
    cursor: str
    min_idle_ms: int


@dataclass(frozen=True, slots=True)
class ReadNew:
    block_ms: int


Action = ReadOwn | AwaitAnswer | Reclaim | ReadNew


class IntakePlan:
    """Where the intake of one round stands, and what it does next."""

    __slots__ = ("_block", "_cursor", "_held", "_interval", "_min_idle_ms", "_next_reclaim",
                 "_own", "_resumed")  # fmt: skip

    def __init__(
        self,
        now: float,
        *,
        resumed: bool,
        reclaim_after: float,
        reclaim_interval: float,
        block: float,
    ) -> None:
        self._resumed = resumed
        self._own: str | None = "-"
        self._held = False
        self._cursor = "0-0"
        self._next_reclaim = now
        self._min_idle_ms = int(reclaim_after * 1000)
        self._interval = reclaim_interval
        self._block = block

    def next(self, now: float, *, answered: bool, linger_until: float | None) -> Action:
        """The next thing to do. ``answered``: a batch of this round has had an answer;
        ``linger_until``: when the batch being filled is due (``None``: nothing batched)."""
        if self._own is not None:
            return ReadOwn(self._own)
        if self._resumed and self._held and not answered:
            return AwaitAnswer()
        if now >= self._next_reclaim:
            return Reclaim(self._cursor, self._min_idle_ms)
        wait = self._block
        if linger_until is not None:
            wait = max(0.001, linger_until - now)
        wait = min(wait, max(0.001, self._next_reclaim - now))
        return ReadNew(int(wait * 1000))

    def reread(self) -> None:
        """Read our own pending entries again from the start, before anything new."""
        self._own = "-"

    def read_own(self, last_entry: str | None, *, took_ids: bool) -> None:
        """A page of our own entries was read: ``last_entry`` of it (``None``: the page was
        empty, so they are all read), and whether any of their ids were taken to send."""
        self._own = last_entry
        self._held = self._held or took_ids

    def reclaimed(self, now: float, cursor: str, *, found: bool) -> None:
        """A reclaim page came back: go on scanning from ``cursor``, or, once the scan
        wrapped (``0-0``) or found nothing, look again ``reclaim_interval`` from now."""
        if cursor == "0-0" or not found:
            self._cursor = "0-0"
            self._next_reclaim = now + self._interval
        else:
            self._cursor = cursor

    def __repr__(self) -> str:
        return (
            f"IntakePlan(own={self._own!r}, held={self._held}, cursor={self._cursor!r}, "
            f"next_reclaim={self._next_reclaim:g})"
        )


class LingerBatcher:
    """Batches by size, or by how long the first id of a batch has waited. Pure."""

    __slots__ = ("_batcher", "_first_at", "_linger")

    def __init__(self, batcher: Batcher, linger: float) -> None:
        self._batcher = batcher
        self._linger = linger
        self._first_at: float | None = None

    @property
    def due_at(self) -> float | None:
        """When the batch being filled is due (``None``: nothing is batched)."""
        return None if self._first_at is None else self._first_at + self._linger

    def add(self, job_id: str, now: float, target: Target | None = None) -> Batch | None:
        """Take one id (of ``target``; None: the default); a full batch when it completes
        one."""
        if self._first_at is None:
            self._first_at = now
        batch = self._batcher.add(job_id, target)
        if batch is not None and not self._batcher.pending:  # else other targets' ids wait
            self._first_at = None
        return batch

    def settle(self, now: float, *, idle: bool) -> list[Batch]:
        """After a read: the partial batches if they are due, or the read came back ``idle``
        (empty: waiting for more would only delay these)."""
        due = self.due_at
        if due is None or not (idle or now >= due):
            return []
        return self.flush()

    def flush(self) -> list[Batch]:
        """Whatever is batched, now: a partial batch per target."""
        self._first_at = None
        return list(iter(self._batcher.flush, None))

    def __repr__(self) -> str:
        return f"LingerBatcher(due_at={self.due_at}, {self._batcher!r})"
