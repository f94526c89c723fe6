"""The most ids the API takes in one DELETE, learnt as a run goes (it documents no limit).

A call of more than one id refused whole with a 400 or a 413 is split in halves until the
offending ids stand alone (``worker.dispatcher``). When both halves of a refused call are
then taken whole, the refusal was its size: later batches go out in pieces no larger than
the halves were (``cap``).

The limit may rise later (an API's limit is its own to change): after ``PROBE_AFTER``
calls taken whole at the cap, one piece goes out larger (``piece``: a probe, one at a
time), halfway to the smallest size refused (that size itself when it is the next one up:
the refusal may be old news), or twice the cap when no refusal above it is known. Taken
whole, it is the new cap, a refusal it was over is forgotten, and the next probe follows
the next call at it; refused whole, it is split as any refused call (its ids end as they
would have, at the cost of that one call), and the next probe waits twice as many calls at
the cap (``PROBE_AFTER`` at least, ``PROBE_MOST`` at most). So a limit that never moves
costs a refused call in every ``PROBE_MOST`` at the cap once learnt, and one that rises is
found within some dozen calls.

While such a refusal of ``n`` ids is being split (``doubting``), and the API has taken no
call of ``n`` ids or more, any other call of ``n`` ids or more would most likely be refused
too, and split again: each dispatcher with a batch in hand would learn the limit for
itself. So such a call waits (``clear``) until the split is done, and then goes out in the
pieces it taught. A refusal of a size the API has taken before is no doubt about the size
(an id it objects to): nobody waits for it.

What was learnt (``learnt``: the smallest size refused, the most ids taken after it) is
kept with a ledger, and a run that resumes on it starts from there (``BatchSize(learnt)``):
re-learnt, it cost a refused call per dispatcher on every resume.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import anyio

PROBE_AFTER = 8
"""Calls taken whole at the cap before the first probe of a larger size."""
PROBE_MOST = 256
"""The most calls at the cap between probes, however many were refused."""

Learnt = tuple[int, int]
"""What a refusal taught: the fewest ids of a call refused whole for its size (0: none
above the cap is known), and the most ids of a call taken after such a refusal."""


class BatchSize:
    """What is known of the API's largest call: ``cap`` once learnt, the largest call taken,
    and the sizes refused whole whose split is under way."""

    __slots__ = ("_after", "_doubts", "_fewest_refused", "_most_taken", "_probe", "_settled",
                 "_streak", "grown", "probes", "taken", "waited")  # fmt: skip

    def __init__(self, learnt: Learnt | None = None) -> None:
        """``learnt``: what an earlier run learnt (``learnt``), the cap to start from."""
        self.taken = 0  # the most ids of a call the API took (a 200)
        self.waited = 0  # calls that waited for a split to say whether their size is refused
        self.probes = 0  # calls sent larger than the cap, to learn whether the limit rose
        self.grown = 0  # of them, taken whole: the cap grew
        self._fewest_refused = 0  # ids in the smallest call refused whole for its size
        self._most_taken = 0  # ids in the largest call taken after such a refusal
        self._doubts: Counter[int] = Counter()  # sizes refused whole, being split
        self._settled = anyio.Event()
        self._streak = 0  # calls taken whole at the cap since the cap or the last probe
        self._after = PROBE_AFTER  # calls at the cap before the next probe
        self._probe = 0  # the ids of the probe out now (one at a time), 0: none
        if learnt is not None and learnt[1] > 0:
            self._fewest_refused, self._most_taken = max(learnt[0], 0), learnt[1]

    @property
    def learnt(self) -> Learnt | None:
        """What is known of the limit, to start the next run from (None: nothing)."""
        return (self._fewest_refused, self._most_taken) if self._most_taken else None

    @property
    def cap(self) -> int | None:
        """The most ids the API took in one call after refusing more: learnt, not set."""
        if not self._most_taken:
            return None
        if not self._fewest_refused:
            return self._most_taken
        return min(self._most_taken, self._fewest_refused - 1)

    def learn(self, *, refused: int, taken: int) -> None:
        """``refused`` ids in one call were refused whole, and ``taken`` then went through."""
        if refused == self._probe:  # the probe refused: the next waits longer
            self._after = min(max(2 * self._after, PROBE_AFTER), PROBE_MOST)
        self._fewest_refused = min(refused, self._fewest_refused or refused)
        self._most_taken = max(taken, self._most_taken)
        self._streak = 0

    def took(self, ids: int) -> None:
        """The API took a call of ``ids`` ids whole: no size up to it is in doubt, and a call
        larger than the cap (a probe) is the new cap."""
        cap = self.cap
        if cap is not None:
            if ids > cap:
                self._most_taken = ids
                if self._fewest_refused <= ids:
                    self._fewest_refused = 0  # the limit rose past it: old news
                self._streak = 0
                if ids == self._probe:
                    self.grown += 1
                    self._after = 1  # it rose: the next probe soon, while it may rise further
            elif ids == cap:
                self._streak += 1
        if ids > self.taken:
            self.taken = ids
            if self._doubts:
                self._wake()

    @contextmanager
    def piece(self, ids: int) -> Iterator[int]:
        """How many of ``ids`` ids left to send go in the next call: at most the cap, or, once
        enough calls were taken at it and no other probe is out, a larger probe."""
        cap = self.cap
        if cap is None or ids <= cap:
            yield ids
            return
        if self._probe or self._streak < self._after:
            yield cap
            return
        refused = self._fewest_refused
        size = (cap + refused + 1) // 2 if refused else 2 * cap  # the refused size itself next
        self._probe = min(ids, size)
        self._streak = 0
        self.probes += 1
        try:
            yield self._probe
        finally:
            self._probe = 0

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
            f"waited={self.waited}, probes={self.probes}, grown={self.grown})"
        )
