"""A plan as ``run`` applies it: its ids with the project each goes to, and what each
project's lane checks them against.

A plan of one project (v2) is applied to the run's own project, its ids naming none. A plan
that names its projects (v3, ``discover --project``) is applied to those: each id carries
its section's project, region and endpoint as the address its line named, so the run's
routing (``worker.routing``) sends it to that project's lane and nowhere else, and that
lane's guard holds it to that project's section alone. The run's own project is then the
plan's first, whatever the settings say: a ledger of such a run is bound to it.
"""

from __future__ import annotations

from collections.abc import Iterator

from worker.clock import Clock
from worker.discovery.guard import PlanCheck
from worker.discovery.plan import SealedPlan
from worker.targets import Address, Target
from worker.types import Candidate


def plan_candidates(plan: SealedPlan) -> Iterator[Candidate]:
    """A plan's ids as the run reads them, in the plan's order. Those of a plan that names
    its projects each carry their section's project, region and endpoint as the address its
    line named: the run's routing sends each to its own project and nowhere else."""
    if not plan.header.named:
        yield from (Candidate(job_id, n) for n, job_id in enumerate(plan.ids(), 1))
        return
    addresses = [
        Address(section.project_id, section.region, section.endpoint)
        for section in plan.header.sections
    ]
    for n, (job_id, section) in enumerate(plan.entries(), 1):
        yield Candidate(job_id, n, address=addresses[section])


def plan_default(plan: SealedPlan) -> Target:
    """The run's own project when it applies a plan that names its projects: the first of
    them (so a ledger of such a run is bound to the same project whatever the settings say)."""
    return plan.header.sections[0].target


def plan_check(
    plan: SealedPlan,
    excluded: frozenset[str],
    target: Target | None,
    expires: float | None = None,
) -> PlanCheck:
    """What the jobs going to ``target`` (None: the run's own project) must still be: for a
    plan that names its projects, jobs of that project's section alone; any other job is
    not one the plan holds there, and is skipped, never deleted. Until ``expires`` (on the
    run's clock: :func:`expires_on`), when the plan's time is up."""
    if not plan.header.named:
        return PlanCheck.of(plan, excluded, expires=expires)
    place = target if target is not None else plan_default(plan)
    section = plan.section_of(place.project_id, place.endpoint)
    if section is None:
        return PlanCheck(plan.filters, {}, excluded)
    return PlanCheck.of(plan, excluded, section, expires)


def expires_on(plan: SealedPlan, clock: Clock) -> float:
    """When ``plan`` expires, on ``clock`` (the run's monotonic one): its ``expires_at`` is
    wall-clock time, read against the wall clock once, here, and from then on counted on the
    clock the run checks it by, which no change of the system's time moves."""
    return clock.now() + plan.header.expires_at.timestamp() - clock.wall()
