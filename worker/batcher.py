"""Group admitted ids into bounded batches, and hold the deletion cap.

Pure logic: no I/O, no clock (the cap's wait for shares that may come back is an event).
The pipeline feeds ``Batcher`` and forwards what it returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import anyio

from worker.targets import Target
from worker.types import Batch


class Batcher:
    """Cuts a stream of ids into batches of at most ``size``, naming each one.

    A batch holds the ids of one target only (a DELETE goes to one project at one
    endpoint): ids are held per target (``None``: the settings' default) until their
    target's batch is full. The batch numbers run across targets."""

    def __init__(self, size: int, *, prefix: str) -> None:
        if size < 1:
            raise ValueError("batch size must be at least 1")
        self._size = size
        self._prefix = prefix
        self._pending: dict[Target | None, list[str]] = {}
        self._made = 0

    def add(self, job_id: str, target: Target | None = None) -> Batch | None:
        """Take one id; return a full batch when this id completes one."""
        pending = self._pending.get(target)
        if pending is None:
            pending = self._pending[target] = []
        pending.append(job_id)
        if len(pending) >= self._size:
            return self._cut(target)
        return None

    def extend(self, job_ids: Iterable[str], target: Target | None = None) -> Iterator[Batch]:
        for job_id in job_ids:
            batch = self.add(job_id, target)
            if batch is not None:
                yield batch

    def flush(self) -> Batch | None:
        """A partial batch left at the end of the input, if any: the oldest target's first.
        Call it until it returns None to have them all."""
        for target in self._pending:
            return self._cut(target)
        return None

    def _cut(self, target: Target | None) -> Batch:
        self._made += 1
        ids = tuple(self._pending.pop(target))
        return Batch(batch_id=f"{self._prefix}-{self._made:06d}", ids=ids, target=target)

    @property
    def pending(self) -> int:
        return sum(len(ids) for ids in self._pending.values())

    def __repr__(self) -> str:
        return (
            f"Batcher(size={self._size}, made={self._made}, pending={self.pending}, "
            f"targets={len(self._pending)})"
        )


class DeletionBudget:
    """``--max-deletions``: at most ``limit`` ids are ever sent for deletion, in one run or,
    with a ledger, over every run on it (``spent``: the ids earlier runs sent).

    Taking is synchronous, with no await between the check and the decrement, so the cap
    holds however many dispatchers run at once. It counts ids *sent*, an upper bound on ids
    deleted, so the cap can never be exceeded even when a reply is lost.

    What a batch takes is open (``open``) until it has sent its ids (``settle``): some may
    come back then (not sent after all: their check expired, a 429 said not applied), so
    the cap is reached (``reached``) only once nothing taken is open. Until then an id
    refused a share waits (``settled``), not skipped for a cap it may yet have room in.
    """

    def __init__(self, limit: int | None, *, spent: int = 0) -> None:
        self._limit = limit
        self._taken = spent
        self._open = 0
        self._settled: anyio.Event | None = None

    def take(self, wanted: int) -> int:
        """Reserve up to ``wanted`` deletions; return how many were granted: open until
        ``settle``."""
        if self._limit is None:
            self._taken += wanted
            return wanted
        granted = max(0, min(wanted, self._limit - self._taken))
        self._taken += granted
        self._open += granted
        return granted

    @property
    def taken(self) -> int:
        return self._taken

    @property
    def open(self) -> int:
        """Deletions taken by batches still sending them: some may come back."""
        return self._open

    def settle(self, held: int, unsent: int = 0) -> None:
        """A batch is done sending the ``held`` it took: ``unsent`` of them were not sent
        after all, and may be taken again."""
        if self._limit is not None:
            self._open -= min(held, self._open)
        self._taken -= min(unsent, self._taken)
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    @property
    def spent(self) -> bool:
        """Nothing more may be taken now (some of it may come back while ``open``)."""
        return self._limit is not None and self._taken >= self._limit

    @property
    def reached(self) -> bool:
        """The cap is reached: all of it is taken, and nothing taken may come back."""
        return self.spent and not self._open

    async def settled(self) -> None:
        """Return once there is room again, or the cap is reached: at once while not
        ``spent``."""
        while self.spent and self._open:
            if self._settled is None:
                self._settled = anyio.Event()
            await self._settled.wait()

    @property
    def left(self) -> int | None:
        """Ids that may still be sent (None: no cap)."""
        return None if self._limit is None else max(0, self._limit - self._taken)

    def __repr__(self) -> str:
        return f"DeletionBudget(limit={self._limit}, taken={self._taken}, open={self._open})"
