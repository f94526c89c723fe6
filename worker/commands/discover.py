"""``devserver-reaper discover``: list jobs, keep those matching the filters, print or plan them.

Stdout is data (ids one per line, ready for ``run --input -``, or JSON lines with
``--output jsonl``); events go to stderr. With ``--plan PATH`` the selection is sealed into a
plan file instead (see :mod:`worker.discovery.plan`), to review and then apply with ``run --plan``.

Paging: the API reference documents no paging parameters, but the answer carries
``current/pages/size/total``. The first page is asked for with none (any server answers
that); while ``pages`` says there are more, page ``current=2, 3, ...`` is asked for. A server
that ignores ``current`` (it answers another page number, or the same ids again) stops the
scan with a ``discover.paging_ignored`` warning rather than looping: what was seen is still
filtered exactly, only the inventory is incomplete. Ids seen twice (the listing shifts while
jobs come and go) are kept once. Every call goes through the rate limiter and is retried on
transient errors, exactly like the DELETEs of ``run``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import anyio
import orjson
import structlog

from worker import wiring
from worker.clock import MonotonicClock
from worker.discovery.filters import Filters, parse_duration, parse_instant
from worker.discovery.guard import PacedReader, Protection, load_protection
from worker.discovery.plan import MAX_TTL, Plan, check_fraction, write_plan
from worker.errors import (
    ApiError,
    ApiUnavailable,
    AuthError,
    ConfigError,
    InputUnreadable,
    NoSuchApi,
    ReaperError,
    UsageError,
)
from worker.exit_codes import ExitCode
from worker.input.intake import escape
from worker.outcomes.journal import check_output
from worker.settings import Settings
from worker.types import JOB_ID_RE, JobRecord

MAX_PAGES = 10_000
"""A hard stop: a server that keeps saying "more pages" cannot keep discover listing forever."""
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class DiscoverRequest:
    """The command line's own flags, parsed and checked."""

    filters: Filters
    output: str = "ids"
    plan: Path | None = None
    plan_ttl: timedelta = timedelta(hours=24)
    page_size: int | None = None
    everything: bool = False  # --all: selecting every job is meant

    @classmethod
    def from_args(cls, args: argparse.Namespace, now: datetime) -> DiscoverRequest:
        """``UsageError`` (64) naming the flag when a value does not parse."""

        def instant(flag: str, value: str | None) -> datetime | None:
            if value is None:
                return None
            try:
                return parse_instant(value, now)
            except ValueError as exc:
                raise UsageError(f"{flag}: {exc}") from None

        try:
            filters = Filters(
                status=args.filter_status,
                type=args.filter_type,
                name=args.filter_name,
                id=args.filter_id,
                name_glob=args.name_glob,
                name_regex=args.name_regex,
                user_name=args.user_name,
                older_than=instant("--older-than", args.older_than),
                newer_than=instant("--newer-than", args.newer_than),
                time_field=args.time_field,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if filters.empty and not args.all:
            raise UsageError(
                "no filter given: that selects every job in the project. Pass filters "
                "(--status, --type, --name-glob, --older-than ...) or --all if you mean it"
            )
        try:
            ttl = parse_duration(args.plan_ttl)
        except ValueError as exc:
            raise UsageError(f"--plan-ttl: {exc}") from None
        if ttl > MAX_TTL:
            raise UsageError(f"--plan-ttl: at most {MAX_TTL.days}d")
        if args.page_size is not None and not 1 <= args.page_size <= MAX_PAGE_SIZE:
            raise UsageError(f"--page-size: 1 to {MAX_PAGE_SIZE}")
        if args.plan is not None:  # before the listing, not after it: a wrong path is 64 now
            check_output(args.plan, "--plan", None, None)
        return cls(
            filters=filters,
            output=args.output,
            plan=Path(args.plan) if args.plan else None,
            plan_ttl=ttl,
            page_size=args.page_size,
            everything=bool(args.all),
        )


@dataclass(frozen=True, slots=True)
class Scan:
    """What the listing saw: every distinct job, how many pages, whether it was cut short."""

    records: tuple[JobRecord, ...]
    pages: int
    total: int | None
    complete: bool


async def scan_jobs(
    reader: PacedReader,
    query: Mapping[str, str],
    *,
    page_size: int | None = None,
    max_pages: int = MAX_PAGES,
    warn: Callable[..., None] = lambda event, **fields: None,
) -> Scan:
    """Every job the list call returns for ``query``, page after page while there are more."""
    paging: dict[str, int] = {} if page_size is None else {"size": page_size}
    seen: dict[str, JobRecord] = {}
    page = await reader.list_page(**query, **paging)
    seen.update((r.id, r) for r in page.records)
    previous = tuple(r.id for r in page.records)
    last, read, complete, total = page.pages or 1, 1, True, page.total
    while read < last:
        if read >= max_pages:
            warn("discover.too_many_pages", pages=last, read=read, max_pages=max_pages)
            complete = False
            break
        current = read + 1
        page = await reader.list_page(**query, current=current, **paging)
        ids = tuple(r.id for r in page.records)
        if (page.current is not None and page.current != current) or (ids and ids == previous):
            warn("discover.paging_ignored", asked=current, answered=page.current, pages=last)
            complete = False
            break
        read += 1
        if not ids:
            break
        seen.update((r.id, r) for r in page.records)
        previous = ids
        last = page.pages or last
        total = page.total if page.total is not None else total
    return Scan(records=tuple(seen.values()), pages=read, total=total, complete=complete)


def main(args: argparse.Namespace, settings: Settings) -> int:
    from worker import logsetup

    logsetup.configure(fmt=settings.log_format, level=settings.log_level, stream=sys.stderr)
    structlog.contextvars.bind_contextvars(run_id=logsetup.new_run_id())
    log = structlog.get_logger("devserver_reaper")
    try:
        settings.require_api()
        request = DiscoverRequest.from_args(args, datetime.now(UTC))
        protection = load_protection(
            settings.protect, settings.protect_files, settings.protected_types,
            settings.protected_statuses,
        )  # fmt: skip
        return anyio.run(discover, request, settings, protection, sys.stdout.buffer)
    except (ConfigError, NoSuchApi) as exc:
        return _said(log, "discover.config_error", exc, ExitCode.CONFIG)
    except UsageError as exc:
        return _said(log, "discover.usage_error", exc, ExitCode.USAGE)
    except InputUnreadable as exc:
        return _said(log, "discover.input_unreadable", exc, ExitCode.NO_INPUT)
    except AuthError as exc:
        return _said(log, "discover.auth_error", exc, ExitCode.NO_PERMISSION)
    except (ApiError, ApiUnavailable) as exc:
        return _said(log, "discover.unavailable", exc, ExitCode.UNAVAILABLE)


def _said(log: Any, event: str, exc: ReaperError, code: int) -> int:
    """Once: a line for a person at the terminal, else the event (both go to stderr)."""
    from worker.terminal.failure import say_error

    say_error(log, event, exc, command="discover", events=sys.stderr)
    return code


async def discover(
    request: DiscoverRequest, settings: Settings, protection: Protection, out: IO[bytes]
) -> int:
    """List, filter, leave out protected jobs, check the cap, then print or write the plan."""
    log = structlog.get_logger("devserver_reaper")
    clock = MonotonicClock()
    project = wiring.project_id(settings)
    endpoint = settings.api_endpoint
    filters = request.filters
    async with wiring.session(settings, concurrency=1) as session:
        api = await wiring.api_client(settings, session)
        reader = PacedReader(
            api=api,
            limiter=wiring.limiter(settings, clock),
            policy=wiring.retry_policy(settings),
            clock=clock,
        )
        query = filters.server_query()
        scan = await scan_jobs(reader, query, page_size=request.page_size, warn=log.warning)
        inventory = max(len(scan.records), scan.total or 0)
        if query:  # the listing was narrowed by the server: count the whole project apart
            everything = await reader.list_page(
                **({} if request.page_size is None else {"size": request.page_size})
            )
            inventory = max(everything.total or 0, len(everything.records))
    matched = [r for r in scan.records if filters.matches(r)]
    selected: list[JobRecord] = []
    protected = invalid = 0
    for record in matched:
        if not JOB_ID_RE.fullmatch(record.id):
            # Printed, "old-1\nvictim-2" would be two ids to the run it is piped to, the second
            # one nobody selected; a plan holding it would be refused whole.
            invalid += 1
            log.warning("discover.invalid_id", job_id=escape(record.id),
                        reason="the API listed a job whose id is not 1 to 64 letters, digits, "
                               "'-' or '_': left out, since run would refuse it")  # fmt: skip
            continue
        rule = protection.reason(record)
        if rule is None:
            selected.append(record)
        else:
            protected += 1
            log.info("discover.protected", job_id=record.id, rule=rule)
    log.info(
        "discover.summary",
        project_id=project,
        endpoint=endpoint,
        listed=len(scan.records),
        pages=scan.pages,
        complete=scan.complete,
        matched=len(matched),
        protected=protected,
        invalid_ids=invalid,
        selected=len(selected),
        inventory_size=inventory,
        reader_calls=reader.calls,
    )
    check_fraction(len(selected), inventory, settings.max_fraction)
    if len(matched) == inventory > 1 and not request.everything:
        # Filters that match everything (--name-regex ., --older-than 2099-01-01) are the
        # "no filter" that --all guards, spelt another way.
        raise UsageError(
            f"the filters match every job the project holds ({inventory}): pass --all if "
            "that is meant"
        )
    if request.plan is not None:
        now = datetime.now(UTC)
        plan = Plan.create(
            project_id=project,
            endpoint=endpoint,
            filters=filters,
            records=selected,
            inventory_size=inventory,
            now=now,
            ttl=request.plan_ttl,
        )
        try:
            write_plan(request.plan, plan)
        except OSError as exc:
            raise UsageError(
                f"plan {request.plan} cannot be written: {exc.strerror or type(exc).__name__}"
            ) from None
        log.info("discover.plan_written", path=str(request.plan), jobs=len(plan.jobs),
                 digest=plan.digest, expires_at=plan.to_json()["expires_at"])  # fmt: skip
        return ExitCode.OK
    _write(out, selected, request.output)
    return ExitCode.OK


def _write(out: IO[bytes], records: list[JobRecord], output: str) -> None:
    if output == "jsonl":
        lines = [orjson.dumps(_jsonl(r)) + b"\n" for r in records]
    else:
        lines = [r.id.encode() + b"\n" for r in records]
    out.write(b"".join(lines))
    out.flush()


def _jsonl(record: JobRecord) -> dict[str, Any]:
    fields = record.event_fields()
    fields.pop("job_id")
    return {"id": record.id, **fields}
