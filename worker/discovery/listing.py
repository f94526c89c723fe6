"""The list call, page by page, whatever paging the server turns out to honour.

The API reference documents no paging parameters, but the answer carries
``current/pages/size/total``. :meth:`Pager.read` returns the records from a position on:

1. the first page is asked for with no position at all (any server answers that), with
   ``size`` when a page size is set; its length is the page length from then on;
2. a later position is asked for as a page, ``current`` (1-based) and ``size``; an answer
   that names another page, or repeats the first page's ids, means the server ignored them;
3. it is then asked for as ``offset`` and ``limit``; ignored in turn (an ``offset`` other than
   the one asked for, or the first page again), the server does not page: the first answer
   is the whole listing and the pager says so (``paged`` is False, ``ignored`` names it).

Whichever way works is kept for the pager's later reads. Positions are counted in records,
so a caller that knows jobs before its position went away can step back by that many.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from worker.clock import Clock
from worker.types import JobRecord

if TYPE_CHECKING:
    from worker.api.client import JobPage

Style = Literal["unknown", "pages", "offset", "none"]


class PageReader(Protocol):
    """The paced list call (``worker.discovery.guard.PacedReader`` is one)."""

    async def list_page(self, **query: str | int | bool) -> JobPage: ...


@dataclass(frozen=True, slots=True)
class Page:
    """Records of the listing from ``start`` on, as read at ``read_at`` (the clock's time
    just before the call went out: every record is at least that fresh)."""

    records: tuple[JobRecord, ...]
    start: int
    total: int | None
    more: bool
    read_at: float

    @property
    def end(self) -> int:
        return self.start + len(self.records)


class Pager:
    """Reads one query's listing at any position; learns the server's paging on the way."""

    def __init__(
        self,
        reader: PageReader,
        query: Mapping[str, str],
        *,
        clock: Clock,
        page_size: int | None = None,
    ) -> None:
        self._reader = reader
        self.query = dict(query)
        self._clock = clock
        self._page_size = page_size
        self._length = page_size or 0  # records per page, learnt from the first answer
        self._first: tuple[str, ...] | None = None
        self.style: Style = "unknown"
        self.ignored: str | None = None  # what the server ignored, in words
        self.calls = 0

    def __repr__(self) -> str:
        return (
            f"Pager(query={self.query!r}, style={self.style}, length={self._length}, "
            f"calls={self.calls})"
        )

    @property
    def paged(self) -> bool:
        return self.style != "none"

    async def read(self, start: int) -> Page:
        """The page holding position ``start`` (it may begin before ``start``)."""
        if self._first is None or start < self._length:
            return await self._first_page()
        if self.style == "none":
            return Page((), start, None, False, self._clock.now())
        if self.style in ("unknown", "pages"):
            number = start // self._length + 1
            at = self._clock.now()
            answer = await self._ask(current=number, **self._sized("size"))
            if self._honoured(answer, answer.current, number):
                self.style = "pages"
                return self._page(answer, (number - 1) * self._length, at)
            self.ignored = f"page {number} was asked for, page {answer.current} came"
        at = self._clock.now()
        answer = await self._ask(offset=start, limit=self._length)
        if self._honoured(answer, answer.offset, start):
            self.style = "offset"
            return self._page(answer, start, at)
        self.style = "none"
        self.ignored = (self.ignored or "") + (
            f"; offset {start} was asked for, offset {answer.offset} came"
            if answer.offset is not None
            else "; offset/limit gave the first page again"
        )
        return Page((), start, answer.total, False, at)

    async def _first_page(self) -> Page:
        at = self._clock.now()
        answer = await self._ask(**self._sized("size"))
        self._first = tuple(r.id for r in answer.records)
        self._length = max(self._length, answer.size or 0, len(answer.records), 1)
        return self._page(answer, 0, at)

    def _sized(self, name: str) -> dict[str, int]:
        return {} if self._page_size is None else {name: self._page_size}

    async def _ask(self, **paging: int) -> JobPage:
        self.calls += 1
        return await self._reader.list_page(**self.query, **paging)

    def _honoured(self, answer: JobPage, said: int | None, asked: int) -> bool:
        ids = tuple(r.id for r in answer.records)
        return (said is None or said == asked) and not (ids and ids == self._first)

    def _page(self, answer: JobPage, start: int, at: float) -> Page:
        end = start + len(answer.records)
        if not answer.records:
            more = False
        elif answer.pages is not None and answer.current is not None and self.style != "offset":
            more = answer.current < answer.pages
        elif answer.total is not None:
            more = end < answer.total
        else:
            more = len(answer.records) >= self._length
        return Page(answer.records, start, answer.total, more, at)


async def count_listing(reader: PageReader, *, clock: Clock, page_size: int | None = None) -> int:
    """How many jobs the whole (unfiltered) listing holds: its stated ``total``, else its
    pages counted one by one."""
    pager = Pager(reader, {}, clock=clock, page_size=page_size)
    page = await pager.read(0)
    if page.total is not None:
        return max(page.total, len(page.records))
    count = len(page.records)
    while page.more and pager.paged:
        page = await pager.read(page.end)
        count += len(page.records)
    return count
