"""Group admitted ids into bounded batches, and hold the deletion cap.

Pure logic: no I/O, no clock. The pipeline feeds ``Batcher`` and forwards what it returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from worker.types import Batch


class Batcher:
    """Cuts a stream of ids into batches of at most ``size``, naming each one."""

    def __init__(self, size: int, *, prefix: str) -> None:
        if size < 1:
            raise ValueError("batch size must be at least 1")
        self._size = size
        self._prefix = prefix
        self._pending: list[str] = []
        self._made = 0

    def add(self, job_id: str) -> Batch | None:
        """Take one id; return a full batch when this id completes one."""
        self._pending.append(job_id)
        if len(self._pending) >= self._size:
            return self._cut()
        return None

    def extend(self, job_ids: Iterable[str]) -> Iterator[Batch]:
        for job_id in job_ids:
            batch = self.add(job_id)
            if batch is not None:
                yield batch

    def flush(self) -> Batch | None:
        """The partial batch left at the end of the input, if any."""
        return self._cut() if self._pending else None

    def _cut(self) -> Batch:
        self._made += 1
        batch = Batch(batch_id=f"{self._prefix}-{self._made:06d}", ids=tuple(self._pending))
        self._pending = []
        return batch

    def __repr__(self) -> str:
        return f"Batcher(size={self._size}, made={self._made}, pending={len(self._pending)})"


class DeletionBudget:
    """``--max-deletions``: at most ``limit`` ids are ever sent for deletion, in one run or,
    with a ledger, over every run on it (``spent``: the ids earlier runs sent).

    Taking is synchronous, with no await between the check and the decrement, so the cap
    holds however many dispatchers run at once. It counts ids *sent*, an upper bound on ids
    deleted, so the cap can never be exceeded even when a reply is lost.
    """

    def __init__(self, limit: int | None, *, spent: int = 0) -> None:
        self._limit = limit
        self._taken = spent

    def take(self, wanted: int) -> int:
        """Reserve up to ``wanted`` deletions; return how many were granted."""
        if self._limit is None:
            self._taken += wanted
            return wanted
        granted = max(0, min(wanted, self._limit - self._taken))
        self._taken += granted
        return granted

    @property
    def taken(self) -> int:
        return self._taken

    def give_back(self, count: int) -> None:
        """``count`` ids taken were not sent after all: they may be taken again."""
        self._taken -= min(count, self._taken)

    @property
    def spent(self) -> bool:
        """Nothing more may be sent: the cap is reached."""
        return self._limit is not None and self._taken >= self._limit

    @property
    def left(self) -> int | None:
        """Ids that may still be sent (None: no cap)."""
        return None if self._limit is None else max(0, self._limit - self._taken)

    def __repr__(self) -> str:
        return f"DeletionBudget(limit={self._limit}, taken={self._taken})"
