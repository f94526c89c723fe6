"""What discover does with a selection, for one project or several (``discover``,
``discover --project``, ``run`` with discover's filters, ``plan show``): the listing of a
project, where its jobs go, the checks a selection must pass, its summary, its review and
its table. Imported by ``worker.commands.discover`` and ``worker.commands.scanned``, and
importing neither. ``plan show`` reads a plan and lists nothing: the logging and the HTTP
stack the listing needs (structlog, aiohttp through ``worker.wiring``, 0.15 s of CPU of a
start) are imported by ``select_in`` when a listing runs.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from worker.clock import MonotonicClock
from worker.discovery.filters import Filters
from worker.discovery.guard import Protection
from worker.discovery.plan import UNKEYED, PlanHeader, PlanWriter, check_fraction
from worker.discovery.review import SHOWN_LIMIT, estimate_s, render
from worker.discovery.select import JobSink, Selected, Spool, select
from worker.errors import UsageError
from worker.input.intake import escape
from worker.pacing.paced import PacedReader, ReadApi
from worker.settings import Settings
from worker.terminal.wrap import cells, cut, pad
from worker.terminal.wrap import columns as terminal_width

TABLE_ROWS = 50
"""Jobs a table shows before "... N more" (all of them: ``-o ids`` or ``-o jsonl``)."""


async def select_in(
    api: ReadApi,
    settings: Settings,
    filters: Filters,
    protection: Protection,
    *,
    clock: MonotonicClock,
    now: datetime,
    new_sink: Callable[[], JobSink],
    page_size: int | None,
) -> Selected:
    """The selection of ``api``'s project, listed at the configured rate (a limiter of its
    own: the quota is the project's)."""
    import structlog

    from worker import wiring

    log = structlog.get_logger("devserver_reaper")
    reader = PacedReader(
        api=api, limiter=wiring.limiter(settings, clock), policy=wiring.retry_policy(settings),
        clock=clock,
    )  # fmt: skip
    return await select(
        reader, filters, protection, clock=clock, now=now, new_sink=new_sink,
        page_size=page_size, warn=log.warning, note=log.info,
    )  # fmt: skip


def sinks(plan: Path | None, key: bytes | None) -> Callable[[], PlanWriter | Spool]:
    """A fresh sink for each pass of the listing: the plan's writer, else a spool for stdout."""
    return lambda: Spool() if plan is None else PlanWriter(plan, key=key)


def plan_writer(selected: Selected) -> PlanWriter:
    """The writer a selection for ``--plan`` went into."""
    sink = selected.selection.sink
    assert isinstance(sink, PlanWriter)
    return sink


def log_summary(log: Any, selected: Selected, **where: str | None) -> None:
    """``discover.summary``: what the listing of one project (``where``) found and kept."""
    selection, scan = selected.selection, selected.scan
    log.info(
        "discover.summary", **where, listed=selection.listed, pages=scan.pages,
        passes=scan.passes, complete=scan.complete, incomplete_reason=scan.reason,
        matched=selection.matched, protected=selection.protected,
        invalid_ids=selection.invalid, selected=selection.selected,
        inventory_size=selected.inventory,
    )  # fmt: skip


def check_selection(
    selected: Selected, settings: Settings, *, everything: bool, project: str | None = None
) -> None:
    """``max_fraction`` and ``--all``: ``PlanRefused``/``UsageError`` (64) when over, naming
    ``project`` when a discovery scans several."""
    selection, inventory = selected.selection, selected.inventory
    check_fraction(selection.selected, inventory, settings.max_fraction, project=project)
    if selection.matched == inventory >= 1 and not everything:
        # Filters that match everything (--name-regex ., --older-than 2099-01-01) are the
        # "no filter" that --all guards, spelt another way: in a project of one job too.
        which = f"project {project}" if project else "the project"
        raise UsageError(
            f"the filters match every job {which} holds ({inventory}): pass --all if that is meant"
        )


NEXT = (
    "next: add --plan PLAN to seal this selection for review, then:\n"
    "      devserver-reaper run --plan PLAN"
)
"""What a selection shown, not sealed, is for."""


def plan_review(header: PlanHeader, settings: Settings, path: Path | str) -> str:
    """What ``plan show`` prints and ``discover --plan`` shows on a terminal."""
    estimate = estimate_s(header.jobs, rate=settings.rate, batch_size=settings.batch_size)
    seal = ["  sealed   with a plan key (HMAC-SHA256)"]
    if not header.keyed:  # said plainly: what the digest is worth, and what it is not
        seal = ["  sealed   with no plan key: " + UNKEYED.replace("its seal guards", "it guards")]
    made = f"  made     {header.to_json()['created_at']}   expires {header.to_json()['expires_at']}"
    shared = [made, *seal, f"  filters  {filters_text(header.filters)}"]
    if header.named:
        lines = [
            f"plan {path}: {header.jobs:,} jobs in {len(header.sections)} projects, each sent "
            "only to its own",
            *shared,
            *named_review(header, settings),
        ]
    else:
        lines = [
            f"plan {path}",
            f"  project  {header.project_id}",
            f"  endpoint {header.endpoint}",
            *shared,
            f"  inventory {header.inventory_size:,} jobs"
            + ("" if header.complete else "   (listing incomplete)"),
            "",
            render(header.review, heading=f"{header.jobs:,} jobs planned", estimate=estimate),
        ]
    plan = next_plan_flags(header, settings, path)
    lines += [
        "",
        f"next: devserver-reaper run {plan} --dry-run",
        f"      devserver-reaper run {plan}",
        "      (the dry run checks every job and deletes none)",
    ]
    return "\n".join(lines)


def next_plan_flags(header: PlanHeader, settings: Settings, path: Path | str) -> str:
    """``--plan PATH`` as the next command needs it: with the plan key a keyed plan is
    checked with (without it, ``run --plan`` refuses the plan), quoted for a shell."""
    words = ["--plan", str(path)]
    if header.keyed and settings.plan_key_file is not None:
        words += ["--plan-key-file", str(settings.plan_key_file)]
    return shlex.join(words)


def filters_text(filters: Filters) -> str:
    given = {k: v for k, v in filters.to_json().items() if v is not None and k != "time_field"}
    if filters.older_than is not None or filters.newer_than is not None:
        given["time_field"] = filters.time_field
    words = [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in given.items()]
    return " ".join(words) or "none (--all)"


def table(out: IO[str], spool: Spool, *, listed_by: str = "-o ids or -o jsonl") -> None:
    """The first jobs as a table, and how many more ``listed_by`` would print."""
    columns = ("id", "name", "type", "status", "user_name", "create_at")
    shown: list[list[str]] = []
    for row in spool.rows():
        if len(shown) >= TABLE_ROWS:
            break
        # The API's text, escaped: a name holding ESC[1A ESC[2K would erase the row above
        # it (another job's) on the reviewer's terminal.
        shown.append([escape(str(row.get(c) or ""), SHOWN_LIMIT) for c in columns])
    widths = [max([len(c)] + [cells(r[i]) for r in shown]) for i, c in enumerate(columns)]
    lines = ["  ".join(pad(v, w) for v, w in zip(r, widths, strict=True)).rstrip()
             for r in [[c.upper() for c in columns], *shown]]  # fmt: skip
    # On a terminal narrower than the table, a row each job still: cut with "…" (wrapped by
    # the terminal, each job took two rows, its type cut in two at column 0).
    width = terminal_width(out)
    for line in lines:
        out.write((cut(line, width) if width else line) + "\n")
    if width is not None and any(cells(line) > width for line in lines):
        out.write("(rows cut to the terminal's width: -o jsonl shows every field)\n")
    if spool.jobs > len(shown):
        out.write(f"... {spool.jobs - len(shown):,} more ({listed_by} lists them all)\n")


def named_review(header: PlanHeader, settings: Settings) -> list[str]:
    """The lines of ``plan show`` for each project a named plan holds."""
    lines: list[str] = []
    for section in header.sections:
        estimate = estimate_s(section.jobs, rate=settings.rate, batch_size=settings.batch_size)
        lines += [
            "",
            f"  project  {section.where}",
            f"  endpoint {section.endpoint}",
            f"  inventory {section.inventory_size:,} jobs"
            + ("" if section.complete else "   (listing incomplete)"),
            render(section.review, heading=f"{section.jobs:,} jobs planned in "
                   f"{section.project_id}", estimate=estimate),
        ]  # fmt: skip
    return lines
