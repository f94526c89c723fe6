"""A selection: list the jobs, keep those the filters match and protection allows, count them.

Shared by ``discover`` (which prints the selection or seals it into a plan) and by ``run``
with discover's filters (which seals it and applies it in one process). The jobs selected go
to a sink as they are listed, never held in memory: a plan being written, or a spool of JSON
lines for stdout. A pass of the listing that turns out to have moved is thrown away whole,
its sink with it (:mod:`worker.discovery.scan`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, Protocol

import orjson

from worker.clock import Clock
from worker.discovery.filters import Filters
from worker.discovery.guard import Protection
from worker.discovery.listing import PageReader, count_listing
from worker.discovery.review import Review
from worker.discovery.scan import Scan, scan_jobs
from worker.input.intake import escape
from worker.types import JOB_ID_RE, JobRecord


class JobSink(Protocol):
    def add(self, record: JobRecord) -> None: ...

    def close(self) -> None: ...


class Spool:
    """Selected jobs as JSON lines in a private temporary file, to print once all is known."""

    def __init__(self) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self.jobs = 0

    def add(self, record: JobRecord) -> None:
        self._file.write(orjson.dumps(as_jsonl(record)) + b"\n")
        self.jobs += 1

    def rows(self) -> Iterator[dict[str, Any]]:
        self._file.flush()
        self._file.seek(0)
        for line in self._file:
            row: dict[str, Any] = orjson.loads(line)
            yield row

    def close(self) -> None:
        self._file.close()


def as_jsonl(record: JobRecord) -> dict[str, Any]:
    fields = record.event_fields()
    fields.pop("job_id")
    return {"id": record.id, **fields}


class Selection:
    """One pass's selection: each listed job matched, checked against protection, counted."""

    def __init__(
        self,
        *,
        filters: Filters,
        protection: Protection,
        sink: JobSink,
        now: datetime,
        warn: Callable[..., None],
        note: Callable[..., None],
    ) -> None:
        self._filters = filters
        self._protection = protection
        self.sink = sink
        self._warn = warn
        self._note = note
        self.review = Review(now)
        self.listed = self.matched = self.protected = self.invalid = 0

    @property
    def selected(self) -> int:
        return self.review.selected

    def add(self, record: JobRecord) -> None:
        self.listed += 1
        if not self._filters.matches(record):
            return
        self.matched += 1
        if not JOB_ID_RE.fullmatch(record.id):
            # Printed, "old-1\nvictim-2" would be two ids to the run it is piped to, the second
            # one nobody selected; a plan holding it would be refused whole.
            self.invalid += 1
            self._warn("discover.invalid_id", job_id=escape(record.id),
                       reason="the API listed a job whose id is not 1 to 64 letters, digits, "
                              "'-' or '_': left out, since run would refuse it")  # fmt: skip
            return
        rule = self._protection.reason(record)
        if rule is not None:
            self.protected += 1
            self.review.left_out(rule)
            self._note("discover.protected", job_id=record.id, rule=rule)
            return
        self.review.add(record)
        self.sink.add(record)


@dataclass(frozen=True, slots=True)
class Selected:
    selection: Selection
    scan: Scan
    inventory: int


async def select(
    reader: PageReader,
    filters: Filters,
    protection: Protection,
    *,
    clock: Clock,
    now: datetime,
    new_sink: Callable[[], JobSink],
    page_size: int | None,
    warn: Callable[..., None],
    note: Callable[..., None],
) -> Selected:
    """List, select into a fresh sink per pass, and count the project's inventory. A
    listing that fails closes the sink it was filling (a plan's spool is removed)."""
    kept: list[Selection] = []

    def fresh() -> Selection:
        for old in kept:
            old.sink.close()
        kept[:] = [Selection(filters=filters, protection=protection, sink=new_sink(), now=now,
                             warn=warn, note=note)]  # fmt: skip
        return kept[0]

    queries = filters.server_queries()
    try:
        scan = await scan_jobs(
            reader, queries, clock=clock, new_sink=fresh, page_size=page_size, warn=warn
        )
        inventory = max(scan.listed, scan.total or 0)
        if queries != [{}]:  # narrowed by the server: count the whole project apart
            inventory = await count_listing(reader, clock=clock, page_size=page_size)
    except BaseException:  # the caller never sees this sink: a plan's spool must not stay
        for old in kept:
            old.sink.close()
        raise
    return Selected(kept[0], scan, inventory)
