"""What ``run`` applies when it applies a plan: a plan file, or discover's filters sealed here.

``run --plan PLAN`` opens the plan (its seal checked with ``plan_key_file``, its jobs copied
aside: :func:`worker.discovery.plan.open_plan`) and verifies it before anything is sent:
project, endpoint, expiry, ``max_fraction``. ``--exclude FILE`` names ids the review struck
out; they end ``skipped`` (``excluded``), in the summary and the results.

``run`` with discover's filters (``--status FINISHED --older-than 30d`` ...) selects exactly
as ``discover`` does (protection, ``--all``, ``max_fraction``), seals the selection into a
private plan under a key made for this process alone, and applies that: a nightly policy,
reviewed as a command line instead of as a list.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import structlog

from worker import wiring
from worker.discovery.filters import Filters
from worker.discovery.guard import Protection
from worker.discovery.plan import UNKEYED, PlanWriter, SealedPlan, open_plan
from worker.errors import InputUnreadable, UsageError
from worker.input.sources import read_entries
from worker.scratch import Scratch
from worker.settings import Settings, read_plan_key
from worker.types import Candidate

EXCLUDE_LIMIT = 1_000_000
"""Ids an exclusion file may hold: struck out by a person after a review, not a second input."""


@dataclass(frozen=True, slots=True)
class Selecting:
    """discover's filter flags, given to ``run``."""

    filters: Filters
    everything: bool = False
    page_size: int | None = None

    def describe(self) -> str:
        from worker.commands.selection import filters_text

        return f"filters: {filters_text(self.filters)}"


def open_file_plan(path: str, settings: Settings) -> SealedPlan:
    """A plan file, its seal checked and its header verified (``PlanRefused``, 64)."""
    log = structlog.get_logger("devserver_reaper")
    key = read_plan_key(settings, lambda text: log.warning("settings.key_file_exposed", error=text))
    plan = open_plan(Path(path), key=key)
    if key is None and not plan.header.keyed:  # with a key, open_plan refused it (64)
        log.warning("plan.unkeyed", reason=f"plan {path} is sealed with no plan key: {UNKEYED}")
    try:
        named = plan.header.named  # applied to the projects it names, not the run's own
        now = datetime.now(UTC)
        expired = now >= plan.header.expires_at
        in_doubt = sent_unanswered(settings, plan) if expired and not settings.dry_run else 0
        plan.header.verify(
            project_id=None if named else wiring.project_id(settings),
            endpoint=None if named else settings.api_endpoint,
            now=now,
            max_fraction=settings.max_fraction,
            allowed=settings.allowed_projects,
            endpoints=settings.trusted_endpoints,
            settling=in_doubt > 0,
        )
    except BaseException:
        plan.close()
        raise
    if in_doubt:
        log.warning(
            "run.plan_expired", expires_at=plan.header.to_json()["expires_at"], in_doubt=in_doubt,
            note=(f"the plan has expired: nothing is sent on it; the {in_doubt} of its jobs a "
                  "run on the ledger sent without hearing back are read, to say whether that "
                  "DELETE took them, and the rest end skipped (plan_expired)"),
        )  # fmt: skip
    return plan


def sent_unanswered(settings: Settings, plan: SealedPlan) -> int:
    """How many of ``plan``'s jobs the ledger holds ``sent``: a run sent their DELETE and
    ended (killed, the machine down) before its answer. Once the plan has expired, no new
    plan can take up those that DELETE removed (discover lists no job that is gone), so the
    run on the expired plan is the one that can still say what became of them."""
    from worker.ledger import open_readonly

    if settings.ledger is None or not settings.ledger.is_file():
        return 0
    try:
        view = open_readonly(settings.ledger)
    except InputUnreadable:
        return 0  # the run itself says why
    with view:
        jobs = plan.reviewed
        return sum(1 for job_id, state in view.open_ids() if state == "sent" and job_id in jobs)


def check_excluded(
    path: str, excluded: frozenset[str], plan: SealedPlan, *, selected: bool
) -> frozenset[str]:
    """The ids of ``--exclude`` ``path`` the plan holds, to strike out; ``UsageError`` (64),
    before any DELETE, for an id the plan holds in another case (``0A92...`` for
    ``0a92...``: ids are compared exactly), and, for a plan file (not ``selected`` here by
    filters, where a job that no longer matches is rightly absent), for an id the plan does
    not hold at all. Either is a strike-out that strikes nothing: the job meant would be
    deleted, and ``run.started`` would count it as excluded."""
    jobs = plan.reviewed
    strays: list[str] = []
    for job_id in excluded:
        if job_id in jobs:
            continue
        other = jobs.spelt(job_id)
        if other is not None:
            strays.append(f"{job_id} (the plan holds {other}: ids are compared case and all)")
        elif not selected:
            strays.append(job_id)
    if strays:
        what = "the selection" if selected else "the plan"
        shown = "; ".join(sorted(strays)[:3]) + ("; ..." if len(strays) > 3 else "")
        raise UsageError(
            f"--exclude {path} names {len(strays)} id(s) {what} does not hold, so nothing "
            f"would be struck out for them and the jobs meant would be deleted: {shown}; "
            "correct those lines (copy the ids from the plan) and run again"
        )
    return frozenset(job_id for job_id in excluded if job_id in jobs)


def select_and_seal(selecting: Selecting, settings: Settings, protection: Protection) -> SealedPlan:
    """Select with discover's filters and seal the selection into a private plan."""
    from worker.commands.discover import select_jobs
    from worker.commands.selection import check_selection

    key = secrets.token_bytes(32)  # this process's own: nothing else can seal for it
    scratch = Scratch("select")  # removed by a later run's if this process is killed
    path = scratch.path / "plan"
    now = datetime.now(UTC)
    writers: list[PlanWriter] = []

    def new_sink() -> PlanWriter:
        writers[:] = [PlanWriter(path, key=key)]
        return writers[0]

    async def selected() -> None:
        found = await select_jobs(
            settings, selecting.filters, protection, now=now, new_sink=new_sink,
            page_size=selecting.page_size,
        )  # fmt: skip
        try:
            check_selection(found, settings, everything=selecting.everything)
            header = writers[0].seal(
                project_id=wiring.project_id(settings), endpoint=settings.api_endpoint,
                filters=selecting.filters, now=now, ttl=timedelta(days=1),
                inventory_size=found.inventory, complete=found.scan.complete,
                review=found.selection.review.to_json(),
            )  # fmt: skip
        finally:
            found.selection.sink.close()
        structlog.get_logger("devserver_reaper").info(
            "run.selected", jobs=header.jobs, listed=found.selection.listed,
            protected=found.selection.protected, inventory_size=found.inventory,
            complete=found.scan.complete, incomplete_reason=found.scan.reason,
        )  # fmt: skip

    try:
        anyio.run(selected)
        plan = open_plan(path, key=key)
    finally:
        scratch.remove()
    return plan


def read_excluded(path: str) -> frozenset[str]:
    """``--exclude FILE``: the ids in it (any input format ``run`` reads); ``UsageError`` (64)
    for a line that is not an id, ``InputUnreadable`` (66) when it cannot be read (raised by
    the reader)."""
    ids: set[str] = set()
    entries = read_entries(path, called="--exclude")
    try:
        for entry in entries:
            if not isinstance(entry, Candidate):
                raise UsageError(
                    f"--exclude {path}, line {entry.line}: not a job id ({entry.reason})"
                )
            ids.add(entry.job_id)
            if len(ids) > EXCLUDE_LIMIT:
                raise UsageError(f"--exclude {path} holds more than {EXCLUDE_LIMIT:,} ids")
    finally:
        entries.close()
    return frozenset(ids)
