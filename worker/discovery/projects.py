"""The projects one discovery scans (``discover --project``), each made a target.

A person names a project in one of these ways (``--project`` is repeatable, and takes
several separated by commas):

``REGION``
    the project IAM names after the region (``worker.api.projects``), at the region's
    endpoint; the settings' own project when it is the settings' region and they name one
``ID``
    the project ``ID`` at the settings' endpoint
``ID@REGION``
    the project ``ID`` at the region's endpoint (the settings' endpoint for their region)
``ID@URL`` or ``REGION@URL``
    that project, or the region's, at the endpoint ``URL`` (a private or test endpoint)

A word that looks like a region (``cn-north-4``) is one: a project id never does (ids are 32
hexadecimal digits), and one that did would be named ``ID@REGION``. Each part is held to the
rules an input line's ``project_id``, ``region`` and ``endpoint`` are (``worker.targets``).
The same project at the same endpoint named twice is scanned once; at two endpoints, it is
refused (a project id names one project: its jobs would be listed twice).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

from worker.errors import UsageError
from worker.targets import (
    REGION_RE,
    Target,
    endpoint_for,
    endpoint_problem,
    normal_endpoint,
    project_problem,
    region_problem,
    untrusted,
)


@dataclass(frozen=True, slots=True)
class ProjectSpec:
    """What one ``--project`` value names: a project id, a region, an endpoint, or some."""

    text: str
    project_id: str | None = None
    region: str | None = None
    endpoint: str | None = None


def parse_spec(text: str) -> ProjectSpec:
    """One ``--project`` value; ``UsageError`` (64) saying what is wrong with it."""
    value = text.strip()
    what, at, where = value.partition("@")
    if not what or (at and not where):
        raise UsageError(f"--project {text!r}: give REGION, ID, ID@REGION, ID@URL or REGION@URL")
    spec = ProjectSpec(value)
    if REGION_RE.fullmatch(what) and not (at and REGION_RE.fullmatch(where)):
        spec = ProjectSpec(value, region=_held(text, "region", what, region_problem))
    else:
        spec = ProjectSpec(value, project_id=_held(text, "project id", what, project_problem))
    if not at:
        return spec
    if "://" in where:
        endpoint = normal_endpoint(_held(text, "endpoint", where, endpoint_problem))
        return ProjectSpec(value, spec.project_id, spec.region, endpoint)
    if spec.project_id is None:
        raise UsageError(f"--project {text!r}: after a region, '@' takes an endpoint URL")
    return ProjectSpec(value, spec.project_id, _held(text, "region", where, region_problem))


def _held(text: str, name: str, value: str, problem: Callable[[str], str | None]) -> str:
    said = problem(value)
    if said is not None:
        raise UsageError(f"--project {text!r}: the {name} {said}")
    return value


def parse_specs(values: Sequence[str]) -> tuple[ProjectSpec, ...]:
    """Every ``--project`` given (each may hold several, separated by commas)."""
    return tuple(parse_spec(part) for value in values for part in value.split(",") if part.strip())


@dataclass(frozen=True, slots=True)
class Defaults:
    """What the settings say, for the specs that leave something out: their endpoint (and
    its region), and their project when they name one without asking IAM."""

    endpoint: str | None
    region: str | None
    project_id: str | None


LookUp = Callable[[str], Awaitable[str]]
"""A region's project id, from IAM (``worker.api.projects.ProjectCache.resolve``)."""


async def resolve_targets(
    specs: Sequence[ProjectSpec],
    defaults: Defaults,
    look_up: LookUp,
    *,
    allowed: Collection[str] = (),
    endpoints: Collection[str] = (),
) -> list[Target]:
    """The targets the specs name, in their order, each once. ``UsageError`` (64) for a
    spec that needs the settings' endpoint when they give none, names a project outside
    ``allowed`` (``allowed_projects``, when not empty), or an endpoint the settings do not
    trust (``endpoints``: theirs and ``allowed_endpoints``; ``untrusted``), which ``run``
    would refuse the plan for; IAM's errors as they are."""
    found: dict[tuple[str, str], Target] = {}
    for spec in specs:
        if spec.endpoint is not None and (problem := untrusted(spec.endpoint, endpoints)):
            raise UsageError(f"--project {spec.text!r}: {problem}")
        target = await _target(spec, defaults, look_up)
        if allowed and target.project_id not in allowed:
            raise UsageError(
                f"--project {spec.text!r}: project {target.project_id} is not in allowed_projects"
            )
        key = (target.project_id, target.endpoint.lower())
        twice = next((t for (p, e), t in found.items() if p == key[0] and e != key[1]), None)
        if twice is not None:
            # One project through two endpoints (public and private, an address and a
            # name): its jobs would be listed twice, counted twice against max_fraction,
            # and the plan refused by run as altered.
            raise UsageError(
                f"--project {spec.text!r}: project {target.project_id} is named twice, at "
                f"{twice.endpoint} and at {target.endpoint}; a project id names one "
                "project: give it once"
            )
        found.setdefault(key, target)
    return list(found.values())


async def _target(spec: ProjectSpec, defaults: Defaults, look_up: LookUp) -> Target:
    region = spec.region
    endpoint = spec.endpoint
    if endpoint is None:
        if region is None or region == defaults.region:
            if defaults.endpoint is None:
                raise UsageError(
                    f"--project {spec.text!r}: names no region or endpoint, and neither "
                    "--region nor --endpoint is set"
                )
            endpoint, region = defaults.endpoint, defaults.region
        else:
            endpoint = endpoint_for(region)
    project = spec.project_id
    if project is None:
        assert region is not None  # a spec names a project id or a region
        own = region == defaults.region and endpoint == defaults.endpoint
        project = defaults.project_id if own and defaults.project_id else await look_up(region)
    return Target(project, endpoint, region)
