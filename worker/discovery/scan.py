"""Listing every job the queries match, and knowing whether the listing held still meanwhile.

A pass reads each query's listing page after page (:class:`~worker.discovery.listing.Pager`:
current/size, offset/limit, or no paging at all) and hands each job it had not yet seen in
that pass to a sink. Offset paging drifts when jobs come and go during a pass: a job deleted
before the page being read moves every later job forward, and one of them is skipped
unseen. A pass *moved* when the listing's stated ``total`` changed between its pages or a
page repeated a job already read in the pass (jobs before it went away). A pass that did not
move is complete. One that moved is read again, with a fresh sink, until a pass does not
move or two passes in a row saw the same jobs; after ``max_passes`` the last pass is kept
and the scan says it is not complete, and why. A server that ignores paging, or one that
keeps saying there are more pages past ``max_pages``, also makes a scan incomplete.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from worker.clock import Clock
from worker.discovery.listing import Pager, PageReader
from worker.types import JobRecord

MAX_PAGES = 10_000
"""A hard stop: a server that keeps saying "more pages" cannot keep a scan listing forever."""
MAX_PASSES = 4


class Sink(Protocol):
    """Where a pass's jobs go (each one once a pass)."""

    def add(self, record: JobRecord) -> None: ...


@dataclass(frozen=True, slots=True)
class Scan:
    """What the kept pass saw."""

    listed: int  # distinct jobs
    pages: int  # list calls, over every pass
    passes: int
    total: int | None  # the listings' stated sizes, summed, when every query stated one
    complete: bool
    reason: str | None  # why not complete


@dataclass(slots=True)
class _Pass:
    seen: set[str]
    fingerprint: int = 0
    total: int | None = 0
    moved: str | None = None
    cut: str | None = None  # a reason the listing could not be read to its end


async def scan_jobs(
    reader: PageReader,
    queries: Sequence[Mapping[str, str]],
    *,
    clock: Clock,
    new_sink: Callable[[], Sink],
    page_size: int | None = None,
    max_pages: int = MAX_PAGES,
    max_passes: int = MAX_PASSES,
    warn: Callable[..., None] = lambda event, **fields: None,
) -> Scan:
    """Every job the list call returns for ``queries``, in passes until the listing held still."""
    pages = 0
    previous: int | None = None
    for number in range(1, max_passes + 1):
        sink = new_sink()
        this = _Pass(seen=set())
        for query in queries or [{}]:
            pager = Pager(reader, query, clock=clock, page_size=page_size)
            pages += await _read_listing(pager, this, sink, max_pages - pages, warn)
        agreed = previous is not None and this.fingerprint == previous
        if this.cut is not None or this.moved is None or agreed:
            reason = this.cut
            return Scan(len(this.seen), pages, number, this.total, reason is None, reason)
        warn("discover.listing_moved", passes=number, reason=this.moved)
        previous = this.fingerprint
    reason = f"the listing kept changing over {max_passes} passes ({this.moved})"
    return Scan(len(this.seen), pages, max_passes, this.total, False, reason)


async def _read_listing(
    pager: Pager, this: _Pass, sink: Sink, budget: int, warn: Callable[..., None]
) -> int:
    """One query's listing into ``this`` pass; the list calls it took."""
    start, calls, first_total = 0, 0, None
    while True:
        if calls >= budget:
            warn("discover.too_many_pages", read=calls, max_pages=MAX_PAGES)
            this.cut = f"more than {MAX_PAGES} pages: the listing was not read to its end"
            break
        page = await pager.read(start)
        calls += 1
        if calls == 1:
            first_total = page.total
        elif page.total != first_total and this.moved is None:
            this.moved = f"its total went from {first_total} to {page.total}"
        for record in page.records:
            if record.id in this.seen:
                if calls > 1 and this.moved is None:
                    this.moved = "a page repeated a job read before it: jobs before it went"
                continue
            this.seen.add(record.id)
            this.fingerprint ^= _hash(record.id)
            sink.add(record)
        if not pager.paged:
            warn("discover.paging_ignored", query=pager.query, detail=pager.ignored)
            this.cut = f"the server ignored paging ({pager.ignored})"
            break
        if not page.more:
            break
        start = page.end
    if this.total is not None:
        this.total = None if first_total is None else this.total + first_total
    return calls


def _hash(job_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=8).digest())
