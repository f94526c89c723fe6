"""Fresh records for the ids about to be deleted, read by listing pages just ahead of them.

A plan or a protection rule by type, status or name needs each job as it is *now*, not as it
was when somebody looked. One show call per job costs one API call per id, fifty times what
its share of a DELETE costs. A page of the list call answers for hundreds of jobs at once, so
:class:`ListingRecheck` reads the listing (with the plan's server-side filters, where they
narrow it) a page at a time, as batches ask for ids it has not seen, and keeps what it read
with the time it was read. A job a fresh listing did not return is left to the caller's show
call: listing is how most jobs are checked, never the only way one is.

A *sweep* reads the queries' listings from their first position on. Deleting the jobs of
earlier pages moves later jobs forward (offset paging drifts), so the next page is asked for
at its original position less the jobs of this sweep whose DELETE has been answered since
(``settled``, as of just before the page is asked for: a DELETE answered while the page is
on the wire may have landed after the server made it); asked too early the page overlaps
what was read (harmless: read again), too late it skips jobs (harmless: their show call
checks them). A batch stops the reading after
``gap`` pages in a row that held none of its ids (a job that is gone is in no page: reading
to the end for it would cost more than its show call). A job whose record has gone stale, or
several that the last complete sweep did not list (it may have skipped them), start a new
sweep. When a sweep answers for fewer ids than it cost calls, listing turns itself off and
show calls do the work.

Freshness is the caller's to enforce: every record here carries ``read_at``, the clock's time
just before the call that read it went out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import anyio

from worker.clock import Clock
from worker.discovery.listing import Pager, PageReader
from worker.types import JobRecord

MIN_SAMPLE = 4
STALE_SWEEP_PAGES = 16
"""Every so many pages, records read longer ago than they are handed out are let go: what
the reading holds is what it read within ``accept_age``, however long the run."""
"""List calls made before listing is judged on what it answered (and maybe turned off)."""


@dataclass(frozen=True, slots=True)
class Fresh:
    """A job as read, and when: the clock's time just before the read went out."""

    record: JobRecord
    read_at: float


class ListingRecheck:
    """Listing pages read ahead of the batches, and the records they held, until used."""

    def __init__(
        self,
        *,
        reader: PageReader,
        queries: Sequence[Mapping[str, str]],
        clock: Clock,
        accept_age: float,
        page_size: int | None = None,
        gap: int = 3,
        warn: Callable[..., None] = lambda event, **fields: None,
    ) -> None:
        """``accept_age``: a record read longer ago than this is not handed out."""
        self._pagers = [
            Pager(reader, query, clock=clock, page_size=page_size) for query in queries or [{}]
        ]
        self._clock = clock
        self._accept_age = accept_age
        self._gap = gap
        self._warn = warn
        self._found: dict[str, Fresh] = {}
        # The jobs of this sweep: id -> its query's index, times two, plus one once it was
        # handed out (not held again when a page overlaps). One dict: it holds every job.
        self._seen: dict[str, int] = {}
        self._query = 0  # the query whose pages are being read
        self._next = 0  # where its next page starts, in positions before any delete
        self._settled = 0  # its jobs, this sweep, whose DELETE was answered
        self._in_flight = 0  # its jobs, this sweep, whose DELETE may or may not be applied
        self._stalled = 0  # pages in a row that held no job this sweep had not read
        self._complete = True  # the first call starts the first sweep
        self._lock = anyio.Lock()
        self.sweeps = 0
        self.pages = 0
        self.answered = 0
        self.enabled = True
        self._mark = (0, 0)  # pages and answered when the current sweep began
        self._told = False  # that the server does not page

    def __repr__(self) -> str:
        return (
            f"ListingRecheck(sweeps={self.sweeps}, pages={self.pages}, answered={self.answered}, "
            f"held={len(self._found)}, enabled={self.enabled})"
        )

    async def listed(self, ids: Sequence[str]) -> dict[str, Fresh]:
        """Those of ``ids`` a listing returned no longer than ``accept_age`` ago.

        Each record is handed out once: the caller decides on it and moves on.
        """
        async with self._lock:
            if self.enabled:
                need = {i for i in ids if not self._fresh(i)}
                if need:
                    await self._read_for(need)
            out = {}
            for job_id in ids:
                if self._fresh(job_id):
                    out[job_id] = self._found.pop(job_id)
                    self._seen[job_id] = self._seen.get(job_id, 0) | 1
            self.answered += len(out)
            if self.enabled and not self._worth_it():
                self._turn_off()
            return out

    def passed(self, ids: Iterable[str]) -> None:
        """These ids go on to their DELETE: the jobs listed after them will move forward."""
        self._in_flight += sum(self._ours(job_id) for job_id in ids)

    def settled(self, ids: Iterable[str]) -> None:
        """These ids' DELETE was answered: the jobs listed after them have moved forward."""
        ours = sum(self._ours(job_id) for job_id in ids)
        self._settled += ours
        self._in_flight = max(0, self._in_flight - ours)

    def _ours(self, job_id: str) -> bool:
        """Listed on the pages of the query now being read, this sweep."""
        seen = self._seen.get(job_id)
        return seen is not None and seen >> 1 == self._query

    def _fresh(self, job_id: str) -> bool:
        seen = self._found.get(job_id)
        return seen is not None and self._clock.now() - seen.read_at <= self._accept_age

    async def _read_for(self, need: set[str]) -> None:
        stale = any(i in self._found for i in need)  # read before: behind where reading is
        if self._complete or stale:
            if self.sweeps and not stale and len(need) < 2:
                return  # one job the last sweep did not list: its show call costs less
            self._start_sweep()
        idle = 0
        while need and not self._complete and idle < self._gap:
            held = await self._read_page()
            hit = need & held
            need -= hit
            idle = 0 if hit else idle + 1

    def _worth_it(self) -> bool:
        """Whether this sweep has answered for at least a job per call it cost."""
        pages, answered = self.pages - self._mark[0], self.answered - self._mark[1]
        return pages < MIN_SAMPLE or answered >= pages

    def _turn_off(self) -> None:
        self.enabled = False
        self._found.clear()
        self._seen.clear()
        self._warn("recheck.listing_off", pages=self.pages, answered=self.answered,
                   reason="listing answered for fewer jobs than it cost calls: the rest "
                          "are read one at a time")  # fmt: skip

    def _start_sweep(self) -> None:
        self._mark = (self.pages, self.answered)
        self.sweeps += 1
        self._seen.clear()
        self._query = self._next = self._settled = self._in_flight = self._stalled = 0
        self._complete = False
        now = self._clock.now()
        self._drop_stale(now)

    def _drop_stale(self, now: float) -> None:
        for job_id in [i for i, f in self._found.items() if now - f.read_at > self._accept_age]:
            del self._found[job_id]

    async def _read_page(self) -> set[str]:
        pager = self._pagers[self._query]
        # A DELETE in flight may land before this read or after it: counted as landed, the
        # page may overlap what was read (read again) rather than skip jobs not yet read.
        # A page that held nothing new steps back less the next time, so reading moves on.
        back = (self._settled + self._in_flight, self._settled, 0)[min(self._stalled, 2)]
        # Those settled by now landed before the page is made; one answered while it is on
        # the wire may land after (counted, the next page would start past jobs not read).
        settled = self._settled
        page = await pager.read(max(0, self._next - back))
        self.pages += 1
        held = set()
        self._stalled = (
            0 if any(r.id not in self._seen for r in page.records) else self._stalled + 1
        )
        for record in page.records:
            was = self._seen.get(record.id, 0)
            self._seen[record.id] = self._query * 2 | (was & 1)
            if was & 1:
                continue  # read again (the page overlapped): decided on already
            self._found[record.id] = Fresh(record, page.read_at)
            held.add(record.id)
        if self.pages % STALE_SWEEP_PAGES == 0:  # what nobody asked for in time goes
            self._drop_stale(self._clock.now())
        # Positions are kept as they were before this sweep's deletes took effect.
        self._next = max(self._next, page.end + settled)
        if not pager.paged and not self._told:
            self._told = True
            self._warn("recheck.paging_ignored", query=pager.query, detail=pager.ignored)
        if not page.more:
            self._query += 1
            self._next = self._settled = self._in_flight = 0
            self._complete = self._query >= len(self._pagers)
        return held
