"""``discover --project``: several projects scanned in one discovery, one plan naming each.

Each project named (``worker.discovery.projects``: a region, an id, either at an endpoint)
is listed in turn, through its own client at its own endpoint and its own rate limiter (the
quota is the project's), with the same filters and protection. Every check a one-project
discovery makes holds per project: ``max_fraction`` of that project's jobs, ``--all`` when
the filters match every job that project holds. Nothing is written unless every project
passes.

The selection goes to a plan that names its projects (format v3, ``worker.discovery.plan``:
one section per project, ``run --plan`` sends each job only to its own), or to stdout as
JSON Lines whose rows carry ``project_id``, ``region`` and ``endpoint`` (which ``run
--input`` reads as each line's target), or as a table per project. Bare ids (``-o ids``) are
refused: they would not say which project they are of.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING

import orjson
import structlog

from worker import wiring
from worker.api.client import ApiClient
from worker.clock import MonotonicClock
from worker.commands import selection as shared  # what one project's discovery does too
from worker.discovery.guard import Protection
from worker.discovery.plan import (
    PlanSection,
    project_place,
    write_plan,
)
from worker.discovery.projects import Defaults, resolve_targets
from worker.discovery.review import estimate_s, render
from worker.discovery.select import JobSink, Selected, Spool
from worker.exit_codes import ExitCode
from worker.settings import Settings
from worker.targets import Target
from worker.terminal.wrap import for_terminal

if TYPE_CHECKING:
    from worker.commands.discover import DiscoverRequest


@dataclass(slots=True)
class Scanned:
    """One project's selection: where it was listed, and what was selected there."""

    target: Target
    selected: Selected

    @property
    def where(self) -> str:
        return project_place(self.target.project_id, self.target.region, self.target.endpoint)


async def discover_named(
    request: DiscoverRequest,
    settings: Settings,
    protection: Protection,
    out: IO[str],
    key: bytes | None = None,
) -> int:
    """discover over ``request.projects``: select in each, check each, then write."""

    log = structlog.get_logger("devserver_reaper")
    now = datetime.now(UTC)
    scanned: list[Scanned] = []
    try:
        scanned = await select_each(
            request, settings, protection, now=now, new_sink=shared.sinks(request.plan, key)
        )
        for part in scanned:
            target = part.target
            shared.log_summary(log, part.selected, project_id=target.project_id,
                        region=target.region, endpoint=target.endpoint)  # fmt: skip
        for part in scanned:
            shared.check_selection(part.selected, settings, everything=request.everything,
                            project=part.where)  # fmt: skip
        if request.plan is not None:
            header = write_plan(
                request.plan, key=key, filters=request.filters, now=now, ttl=request.plan_ttl,
                parts=[(section_of(part), shared.plan_writer(part.selected)) for part in scanned],
                named=True,
            )  # fmt: skip
            log.info("discover.plan_written", path=str(request.plan), jobs=header.jobs,
                     seal=header.seal, expires_at=header.to_json()["expires_at"],
                     projects=len(header.sections))  # fmt: skip
            if request.output == "table":
                review = shared.plan_review(header, settings, request.plan)
                out.write(for_terminal(out, review) + "\n")
            return ExitCode.OK
        write_rows(out, scanned, request.output, settings)
        out.flush()
        return ExitCode.OK
    finally:
        for part in scanned:
            part.selected.selection.sink.close()


async def select_each(
    request: DiscoverRequest,
    settings: Settings,
    protection: Protection,
    *,
    now: datetime,
    new_sink: Callable[[], JobSink],
) -> list[Scanned]:
    """Each project's selection, one project after another, through one session and keys."""
    clock = MonotonicClock()
    scanned: list[Scanned] = []
    async with wiring.session(settings, concurrency=1) as session:
        keys = await wiring.credentials(settings, session)

        targets = await resolve_targets(
            request.projects, project_defaults(settings),
            wiring.region_lookup(settings, session, keys),
            allowed=settings.allowed_projects, endpoints=settings.trusted_endpoints,
        )  # fmt: skip
        try:
            for target in targets:
                api = ApiClient(session=session, endpoint=target.endpoint,
                                project_id=target.project_id, credentials=keys)  # fmt: skip
                selected = await shared.select_in(
                    api, settings, request.filters, protection, clock=clock, now=now,
                    new_sink=new_sink, page_size=request.page_size,
                )  # fmt: skip
                scanned.append(Scanned(target, selected))
        except BaseException:
            for part in scanned:
                part.selected.selection.sink.close()
            raise
    return scanned


def project_defaults(settings: Settings) -> Defaults:
    """The settings' endpoint, region and project, for what a ``--project`` leaves out; the
    project only when no IAM call is needed for it (the settings or the profile name it)."""
    from worker.errors import ConfigError

    endpoint = settings.endpoint or (settings.region and settings.api_endpoint) or None
    try:
        project: str | None = wiring.project_choice(settings).project_id
    except ConfigError:
        project = None
    return Defaults(endpoint, settings.region, project)


def section_of(part: Scanned) -> PlanSection:
    selected = part.selected
    return PlanSection(
        project_id=part.target.project_id,
        endpoint=part.target.endpoint,
        inventory_size=selected.inventory,
        jobs=selected.selection.selected,
        complete=selected.scan.complete,
        review=selected.selection.review.to_json(),
        region=part.target.region,
    )


# -- stdout --------------------------------------------------------------------------------


def write_rows(out: IO[str], scanned: list[Scanned], output: str, settings: Settings) -> None:
    """JSON Lines naming each job's project, or a table and review per project."""
    for part in scanned:
        spool = part.selected.selection.sink
        assert isinstance(spool, Spool)
        place = {"project_id": part.target.project_id, "region": part.target.region,
                 "endpoint": part.target.endpoint}  # fmt: skip
        if output == "jsonl":
            for row in spool.rows():
                out.write(orjson.dumps({**row, **place}).decode() + "\n")
            continue
        selection = part.selected.selection
        out.write(f"project {part.where}: {selection.selected:,} of "
                  f"{part.selected.inventory:,} jobs selected\n")  # fmt: skip
        shared.table(out, spool, listed_by="-o jsonl")
        estimate = estimate_s(selection.selected, rate=settings.rate,
                              batch_size=settings.batch_size)  # fmt: skip
        said = render(selection.review.to_json(),
                      heading=f"{selection.selected:,} jobs selected in {part.where}",
                      estimate=estimate)  # fmt: skip
        out.write(for_terminal(out, f"\n{said}") + "\n\n")
    if output == "table":
        out.write(for_terminal(out, shared.NEXT) + "\n")
