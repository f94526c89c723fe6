"""``devserver-reaper discover``: list jobs, keep those matching the filters, show or plan them.

Output (``-o``): ``table`` (the default on a terminal) shows the jobs, the review of the
selection (counts by type, status, user and age, what protection left out, the time it
would take) and the command to run next; ``ids`` (the default elsewhere) prints one id a
line, ready for ``run --input -``; ``jsonl`` full records. Events go to stderr. With
``--plan PATH`` the selection is sealed into a plan file (see
:mod:`worker.discovery.plan`), to review and then apply with ``run --plan``; on a terminal
the review and the next command are shown.

Nothing is printed or written until the listing is read to its end and the selection
passes its checks (``--all``, ``max_fraction``): the jobs wait in a private spool meanwhile,
so the memory a discovery takes does not grow with the project. Listing, paging and a
listing that moves under the scan: :mod:`worker.discovery.scan`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import IO, Any

import anyio
import structlog

from worker import wiring
from worker.clock import MonotonicClock
from worker.commands.selection import (
    NEXT,
    check_selection,
    log_summary,
    plan_review,
    plan_writer,
    select_in,
    sinks,
    table,
)
from worker.discovery.filters import FilterError, Filters, parse_duration, parse_instant
from worker.discovery.guard import Protection
from worker.discovery.plan import MAX_TTL
from worker.discovery.projects import ProjectSpec, parse_specs
from worker.discovery.review import estimate_s, render
from worker.discovery.select import Selected, Spool
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
from worker.outcomes.journal import check_output
from worker.settings import Settings, read_plan_key
from worker.stops import cancelled_on_stop
from worker.terminal.wrap import for_terminal

MAX_PAGE_SIZE = 1000


def filters_from_args(args: argparse.Namespace, now: datetime) -> Filters:
    """discover's filter flags (``run`` takes the same), parsed; ``UsageError`` (64) naming
    the flag when one does not parse, or when none is given without ``--all``."""

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
    except FilterError as exc:  # named as typed: --name-regex, not name_regex
        raise UsageError(exc.naming(lambda field: "--" + field.replace("_", "-"))) from None
    if filters.empty and not args.all:
        raise UsageError(
            "no filter given: that selects every job in the project. Pass filters "
            "(--status, --type, --name-glob, --older-than ...) or --all if you mean it"
        )
    return filters


def page_size_of(args: argparse.Namespace) -> int | None:
    if args.page_size is not None and not 1 <= args.page_size <= MAX_PAGE_SIZE:
        raise UsageError(f"--page-size must be from 1 to {MAX_PAGE_SIZE:,}, not {args.page_size:,}")
    page_size: int | None = args.page_size
    return page_size


@dataclass(frozen=True, slots=True)
class DiscoverRequest:
    """The command line's own flags, parsed and checked."""

    filters: Filters
    output: str = "ids"
    plan: Path | None = None
    plan_ttl: timedelta = timedelta(hours=24)
    page_size: int | None = None
    everything: bool = False  # --all: selecting every job is meant
    projects: tuple[ProjectSpec, ...] = ()  # --project: these, each in its turn

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, now: datetime, read: tuple[tuple[str, str], ...] = ()
    ) -> DiscoverRequest:
        """``UsageError`` (64) naming the flag when a value does not parse, or when
        ``--plan`` names a file the command reads (``read``: a protect file, a key file)."""
        filters = filters_from_args(args, now)
        projects = parse_specs(args.project or [])
        if projects and args.output == "ids":
            raise UsageError(
                "-o ids prints ids alone, which do not say their project: with --project, "
                "use -o jsonl (each line names its project_id, region and endpoint, which "
                "run --input reads) or --plan"
            )
        try:
            ttl = parse_duration(args.plan_ttl)
        except ValueError as exc:
            raise UsageError(f"--plan-ttl: {exc}") from None
        if ttl > MAX_TTL:
            raise UsageError(
                f"--plan-ttl must be at most {MAX_TTL.days}d, not {args.plan_ttl.strip()}"
            )
        if args.plan is not None:  # before the listing, not after it: a wrong path is 64 now
            check_output(args.plan, "--plan", None, None, also=read)
        elsewhere = "jsonl" if projects else "ids"
        output = args.output or ("table" if sys.stdout.isatty() else elsewhere)
        return cls(
            filters=filters,
            output=output,
            plan=Path(args.plan) if args.plan else None,
            plan_ttl=ttl,
            page_size=page_size_of(args),
            everything=bool(args.all),
            projects=projects,
        )


def main(args: argparse.Namespace, settings: Settings) -> int:
    from worker import logsetup
    from worker.terminal.output import for_people_on

    # A person at a terminal reads the table and its review: the info events (which keys,
    # the summary the review already shows) are for logs, so only warnings are shown there,
    # each as a line of its own words (not a log line with a timestamp and a run id).
    if sys.stderr.isatty() and "log_level" not in settings.model_fields_set:
        for_people_on(sys.stderr, log_format=settings.log_format, log_level="warning")
    else:
        logsetup.configure(fmt=settings.log_format, level=settings.log_level, stream=sys.stderr)
    structlog.contextvars.bind_contextvars(run_id=logsetup.new_run_id())
    log = structlog.get_logger("devserver_reaper")
    try:
        request = DiscoverRequest.from_args(args, datetime.now(UTC), settings.files_read())
        settings.require_api(endpoint=not request.projects)
        protection = wiring.protection(settings)
        key = plan_key(settings, log.warning) if request.plan is not None else None
        command = partial(discover, request, settings, protection, sys.stdout, key)
        return anyio.run(cancelled_on_stop, command, partial(_stopped, request))
    except BrokenPipeError:  # `discover | head`: the reader has seen enough
        with contextlib.suppress(OSError):  # and the interpreter's last flush must not fail
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    except OSError as exc:  # a full disk under the plan's spool, or under stdout
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        reason = (exc.strerror or type(exc).__name__).lower()
        where = "the plan or stdout" if args.plan is not None else "stdout"
        gone = UsageError(
            f"cannot write {where}: {reason}"
            + ("; no plan was written" if args.plan is not None else "")
        )
        return _said(log, "discover.unwritable", gone, ExitCode.USAGE)
    except (ConfigError, NoSuchApi) as exc:
        return _said(log, "discover.config_error", exc, ExitCode.CONFIG)
    except UsageError as exc:
        return _said(log, "discover.usage_error", exc, ExitCode.USAGE)
    except InputUnreadable as exc:
        return _said(log, "discover.input_unreadable", exc, ExitCode.NO_INPUT)
    except AuthError as exc:
        return _said(log, "discover.auth_error", exc, ExitCode.NO_PERMISSION)
    except (ApiError, ApiUnavailable) as exc:
        return _said(log, "discover.unavailable", exc, ExitCode.UNAVAILABLE,
                     wiring.ca_bundle_said(settings))  # fmt: skip


def _stopped(request: DiscoverRequest, signal: str) -> None:
    """A stop said on stderr: it comes before anything is printed or written (the listing
    is read to its end first), so nothing was, and no plan is left in part."""
    what = "no plan was written" if request.plan is not None else "nothing was printed"
    sys.stderr.write(f"devserver-reaper discover: stopped by {signal} while listing; {what}\n")


def _said(log: Any, event: str, exc: ReaperError, code: int, ca_bundle: str | None = None) -> int:
    """Once: a line for a person at the terminal, else the event (both go to stderr)."""
    from worker.terminal.failure import say_error

    say_error(log, event, exc, command="discover", events=sys.stderr, ca_bundle=ca_bundle)
    return code


def plan_key(settings: Settings, warn: Any) -> bytes | None:
    """The plan key, or ``None`` with a warning that a plan is then only checked for accidents."""
    key = read_plan_key(settings, lambda text: warn("settings.key_file_exposed", error=text))
    if key is not None:
        return key
    warn("plan.unkeyed", reason="no --plan-key-file: the plan's seal is a plain SHA-256 digest, "
         "which catches accidents, not someone who can write the file and re-seal it")  # fmt: skip
    return None


async def discover(
    request: DiscoverRequest,
    settings: Settings,
    protection: Protection,
    out: IO[str],
    key: bytes | None = None,
) -> int:
    """List, filter, leave out protected jobs, check the caps, then show or write the plan."""
    if request.projects:
        from worker.commands.scanned import discover_named

        return await discover_named(request, settings, protection, out, key)
    log = structlog.get_logger("devserver_reaper")
    endpoint = settings.api_endpoint
    now = datetime.now(UTC)
    selected = await select_jobs(
        settings, request.filters, protection, now=now, new_sink=sinks(request.plan, key),
        page_size=request.page_size,
    )  # fmt: skip
    selection, scan = selected.selection, selected.scan
    project = wiring.project_id(settings)  # looked up in IAM by now, if it had to be
    try:
        log_summary(log, selected, project_id=project, endpoint=endpoint)
        check_selection(selected, settings, everything=request.everything)
        review = selection.review.to_json()
        if request.plan is not None:
            header = plan_writer(selected).seal(
                project_id=project, endpoint=endpoint, filters=request.filters, now=now,
                ttl=request.plan_ttl, inventory_size=selected.inventory,
                complete=scan.complete, review=review,
            )  # fmt: skip
            log.info("discover.plan_written", path=str(request.plan), jobs=header.jobs,
                     seal=header.seal, expires_at=header.to_json()["expires_at"])  # fmt: skip
            if request.output == "table":
                out.write(for_terminal(out, plan_review(header, settings, request.plan)) + "\n")
            return ExitCode.OK
        assert isinstance(selection.sink, Spool)
        _write(out, selection.sink, request.output)
        if request.output == "table":
            estimate = estimate_s(selection.selected, rate=settings.rate,
                                  batch_size=settings.batch_size)  # fmt: skip
            said = render(review, heading=f"{selection.selected:,} jobs selected",
                          estimate=estimate)  # fmt: skip
            out.write(for_terminal(out, f"\n{said}\n\n{NEXT}") + "\n")
        out.flush()
        return ExitCode.OK
    finally:
        selection.sink.close()


async def select_jobs(
    settings: Settings,
    filters: Filters,
    protection: Protection,
    *,
    now: datetime,
    new_sink: Any,
    page_size: int | None,
) -> Selected:
    """The selection, listed through its own session at the configured rate."""
    async with wiring.session(settings, concurrency=1) as session:
        api = await wiring.api_client(settings, session)
        return await select_in(
            api, settings, filters, protection, clock=MonotonicClock(), now=now,
            new_sink=new_sink, page_size=page_size,
        )  # fmt: skip


def _write(out: IO[str], spool: Spool, output: str) -> None:
    import orjson

    if output == "jsonl":
        for row in spool.rows():
            out.write(orjson.dumps(row).decode() + "\n")
    elif output == "ids":
        for row in spool.rows():
            out.write(row["id"] + "\n")
    else:
        table(out, spool)
