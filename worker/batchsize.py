"""The most ids the API takes in one DELETE, learnt as a run goes (it documents no limit).

A call of more than one id refused whole with a 400 or a 413 is split in halves until the
offending ids stand alone (``worker.dispatcher``). When both halves of a refused call are
then taken whole, the refusal was its size: later batches go out in pieces no larger than
the halves were (``cap``).

While such a refusal of ``n`` ids is being split (``doubting``), and the API has taken no
call of ``n`` ids or more, any other call of ``n`` ids or more would most likely be refused
too, and split again: each dispatcher with a batch in hand would learn the limit for
itself. So such a call waits (``clear``) until the split is done, and then goes out in the
pieces it taught. A refusal of a size the API has taken before is no doubt about the size
(an id it objects to): nobody waits for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import anyio


class BatchSize:
    """What is known of the API's largest call: ``cap`` once learnt, the largest call taken,
    and the sizes refused whole whose split is under way."""

    __slots__ = ("_doubts", "_fewest_refused", "_most_taken", "_settled", "taken", "waited")

    def __init__(self) -> None:
        self.taken = 0  # the most ids of a call the API took (a 200)
        self.waited = 0  # calls that waited for a split to say whether their size is refused
        self._fewest_refused = 0  # ids in the smallest call refused whole for its size
        self._most_taken = 0  # ids in the largest call taken after such a refusal
        self._doubts: Counter[int] = Counter()  # sizes refused whole, being split
        self._settled = anyio.Event()

    @property
    def cap(self) -> int | None:
        """The most ids the API took in one call after refusing more: learnt, not set."""
        if not self._most_taken:
            return None
        return min(self._most_taken, self._fewest_refused - 1)

    def learn(self, *, refused: int, taken: int) -> None:
        """``refused`` ids in one call were refused whole, and ``taken`` then went through."""
        self._fewest_refused = min(refused, self._fewest_refused or refused)
        self._most_taken = max(taken, self._most_taken)

    def took(self, ids: int) -> None:
        """The API took a call of ``ids`` ids whole: no size up to it is in doubt."""
        if ids > self.taken:
            self.taken = ids
            if self._doubts:
                self._wake()

    def doubted(self, ids: int) -> bool:
        """Is a call of ``ids`` ids as large as one refused whole whose split is under way,
        past the largest call taken?"""
        return any(self.taken < size <= ids for size in self._doubts)

    @contextmanager
    def doubting(self, ids: int) -> Iterator[None]:
        """A call of ``ids`` ids was refused whole (400, 413): its split is under way."""
        self._doubts[ids] += 1
        try:
            yield
        finally:
            self._doubts[ids] -= 1
            if not self._doubts[ids]:
                del self._doubts[ids]
            self._wake()

    async def clear(self, ids: int) -> None:
        """Return once a call of ``ids`` ids is in no doubt (at once when it is not)."""
        if self.doubted(ids):
            self.waited += 1
        while self.doubted(ids):
            await self._settled.wait()

    def _wake(self) -> None:
        self._settled.set()
        self._settled = anyio.Event()

    def __repr__(self) -> str:
        return (
            f"BatchSize(cap={self.cap}, taken={self.taken}, doubts={sorted(self._doubts)}, "
            f"waited={self.waited})"
        )
