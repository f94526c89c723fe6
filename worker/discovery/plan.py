"""Plan files: what ``discover --plan`` selected, sealed so ``run --plan`` deletes just that.

A plan records the filters, the project and endpoint, the matched jobs with the fields that
made them match, when it was made, when it expires, how many jobs the project held (for
``max_fraction``), and a SHA-256 digest over a canonical serialisation of all of it.

What the digest is for: it catches a plan that was edited by accident or carelessly (an id
changed by hand, a filter widened, a file cut short, a merge gone wrong), and a plan pointed
at the wrong project. It is *not* a signature: anyone who can write the file can recompute
it. It is deliberately not an HMAC keyed with the SK either: temporary credentials (ECS
metadata, pod identity) rotate within hours, so a keyed plan would become unverifiable for
reasons that have nothing to do with its content. Protect plan files the way you protect the
keys: file permissions (plans are written ``0600``), and a review step before ``run``.

Canonical form: the JSON object without its ``digest`` member, keys sorted, no whitespace
(orjson ``OPT_SORT_KEYS``), prefixed with ``devserver-reaper plan v1\\n``. Verification hashes
the object *as read*, so a member added to the file breaks the digest as surely as one changed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from worker.discovery.filters import Filters, matched_fields
from worker.errors import InputUnreadable, UsageError
from worker.types import JOB_ID_RE, JobRecord, iso

PLAN_VERSION = 1
DIGEST_PREFIX = "sha256:"
_DOMAIN = b"devserver-reaper plan v1\n"
PLAN_SIZE_LIMIT = 512 * 1024 * 1024
MAX_TTL = timedelta(days=30)
CLOCK_SKEW = timedelta(minutes=10)
"""How far ahead of this machine's clock the machine that made a plan may have been."""
_JOB_FIELDS = ("id", "type", "status", "name", "user_name", "create_at", "update_at")
_TOP_FIELDS = frozenset(
    {"version", "project_id", "endpoint", "filters", "created_at", "expires_at",
     "inventory_size", "jobs", "digest"}
)  # fmt: skip


class PlanRefused(UsageError):
    """The plan may not be applied: altered, expired, foreign, malformed or over a cap (exit 64).

    A usage error rather than a configuration error: the settings are fine, the command was
    pointed at the wrong file (or at one that no longer says what was reviewed).
    """


def canonical(body: Mapping[str, Any]) -> bytes:
    """The bytes the digest covers: ``body`` without ``digest``, keys sorted, compact."""
    content = {key: value for key, value in body.items() if key != "digest"}
    return _DOMAIN + orjson.dumps(content, option=orjson.OPT_SORT_KEYS)


def digest_of(body: Mapping[str, Any]) -> str:
    return DIGEST_PREFIX + hashlib.sha256(canonical(body)).hexdigest()


def _normal_endpoint(endpoint: str) -> str:
    return endpoint.rstrip("/").lower()


@dataclass(frozen=True, slots=True)
class PlanJob:
    """One planned job and the fields it had when it was discovered."""

    id: str
    type: str | None
    status: str | None
    name: str | None
    user_name: str | None
    create_at: str | None
    update_at: str | None

    @classmethod
    def of(cls, record: JobRecord) -> PlanJob:
        return cls(**matched_fields(record))

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _JOB_FIELDS}


@dataclass(frozen=True, slots=True)
class Plan:
    """A sealed selection. Build with :meth:`create`; load with :func:`read_plan`."""

    project_id: str
    endpoint: str
    filters: Filters
    created_at: datetime
    expires_at: datetime
    inventory_size: int
    jobs: tuple[PlanJob, ...]
    digest: str

    @classmethod
    def create(
        cls,
        *,
        project_id: str,
        endpoint: str,
        filters: Filters,
        records: Sequence[JobRecord],
        inventory_size: int,
        now: datetime,
        ttl: timedelta,
    ) -> Plan:
        """Seal a selection. Jobs are kept in id order, so the same selection hashes the same."""
        if not timedelta(0) < ttl <= MAX_TTL:
            raise ValueError(f"a plan's time to live must be within 1s..{MAX_TTL.days}d")
        jobs = tuple(sorted((PlanJob.of(r) for r in records), key=lambda job: job.id))
        body = _body(project_id, endpoint, filters, now, now + ttl, inventory_size, jobs)
        return cls(
            project_id=project_id,
            endpoint=endpoint,
            filters=filters,
            created_at=now,
            expires_at=now + ttl,
            inventory_size=inventory_size,
            jobs=jobs,
            digest=digest_of(body),
        )

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(job.id for job in self.jobs)

    def to_json(self) -> dict[str, Any]:
        body = _body(
            self.project_id,
            self.endpoint,
            self.filters,
            self.created_at,
            self.expires_at,
            self.inventory_size,
            self.jobs,
        )
        body["digest"] = self.digest
        return body

    def verify(
        self,
        *,
        project_id: str,
        endpoint: str,
        now: datetime,
        max_fraction: float | None = None,
    ) -> None:
        """Refuse a plan for another project or endpoint, an expired one, or one over the cap.

        The digest itself is checked by :func:`read_plan`, before the plan exists as an object.
        """
        if self.project_id != project_id:
            raise PlanRefused(
                f"plan is for project {self.project_id}, not {project_id}: refusing to apply it"
            )
        if _normal_endpoint(self.endpoint) != _normal_endpoint(endpoint):
            raise PlanRefused(
                f"plan is for endpoint {self.endpoint}, not {endpoint}: refusing to apply it"
            )
        if self.created_at > now + CLOCK_SKEW:
            raise PlanRefused(
                f"plan says it was made at {iso(self.created_at)}, which is still to come: "
                "a plan re-sealed by hand is not applied"
            )
        if now >= self.expires_at:
            raise PlanRefused(
                f"plan expired at {iso(self.expires_at)} (made {iso(self.created_at)}): "
                "run discover again and review the new plan"
            )
        check_fraction(len(self.jobs), self.inventory_size, max_fraction)

    def __repr__(self) -> str:
        return (
            f"Plan(project_id={self.project_id!r}, jobs={len(self.jobs)}, "
            f"inventory_size={self.inventory_size}, expires_at={iso(self.expires_at)!r}, "
            f"digest={self.digest[:19]!r}...)"
        )


def check_fraction(selected: int, inventory: int, max_fraction: float | None) -> None:
    """``max_fraction``: refuse a selection larger than that share of the inventory."""
    if max_fraction is None:
        return
    if selected > max_fraction * inventory:
        share = f"{selected / inventory:.1%}" if inventory else "all"
        raise PlanRefused(
            f"{selected} of {inventory} jobs selected ({share}) exceeds max_fraction "
            f"{max_fraction:g}: narrow the filters or raise --max-fraction"
        )


def _body(
    project_id: str,
    endpoint: str,
    filters: Filters,
    created_at: datetime,
    expires_at: datetime,
    inventory_size: int,
    jobs: Sequence[PlanJob],
) -> dict[str, Any]:
    return {
        "version": PLAN_VERSION,
        "project_id": project_id,
        "endpoint": endpoint,
        "filters": filters.to_json(),
        "created_at": iso(created_at),
        "expires_at": iso(expires_at),
        "inventory_size": inventory_size,
        "jobs": [job.to_json() for job in jobs],
    }


# -- files ---------------------------------------------------------------------------------


def write_plan(path: Path, plan: Plan) -> None:
    """Write atomically (a temporary file renamed over ``path``), readable by the owner only."""
    data = orjson.dumps(plan.to_json(), option=orjson.OPT_INDENT_2) + b"\n"
    folder = path.parent if str(path.parent) else Path(".")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_plan(path: Path) -> Plan:
    """Load a plan and check its digest. ``InputUnreadable`` (66) when the file cannot be read,
    ``PlanRefused`` (64) when it is not a plan or not the one that was written."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(PLAN_SIZE_LIMIT + 1)
    except OSError as exc:
        raise InputUnreadable(f"plan {path}: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > PLAN_SIZE_LIMIT:
        raise PlanRefused(f"plan {path} is larger than {PLAN_SIZE_LIMIT} bytes")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise PlanRefused(f"plan {path} is not JSON: it was cut short or is not a plan") from None
    if not isinstance(data, dict):
        raise PlanRefused(f"plan {path} is not a JSON object")
    stated = data.get("digest")
    if not isinstance(stated, str) or not hmac.compare_digest(stated, digest_of(data)):
        raise PlanRefused(
            f"plan {path} was altered since discover wrote it (its digest does not match "
            "its content): run discover again and review the new plan"
        )
    try:
        return _parse(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise PlanRefused(f"plan {path} is not a valid plan: {exc}") from None


def _parse(data: Mapping[str, Any]) -> Plan:
    unknown = set(data) - _TOP_FIELDS
    if unknown:
        raise ValueError(f"unknown members {sorted(unknown)}")
    if data["version"] != PLAN_VERSION:
        raise ValueError(f"version {data['version']!r}; this worker reads version {PLAN_VERSION}")
    jobs = []
    for entry in data["jobs"]:
        if not isinstance(entry, dict) or set(entry) != set(_JOB_FIELDS):
            raise ValueError("a job entry does not have the planned fields")
        if not isinstance(entry["id"], str) or not JOB_ID_RE.fullmatch(entry["id"]):
            raise ValueError("a job id is not 1 to 64 letters, digits, '-' and '_'")
        jobs.append(PlanJob(**entry))
    if len({job.id for job in jobs}) != len(jobs):
        raise ValueError("a job is listed twice")
    inventory = data["inventory_size"]
    if isinstance(inventory, bool) or not isinstance(inventory, int) or inventory < 0:
        raise ValueError("inventory_size is not a count")
    created = _instant(data["created_at"])
    expires = _instant(data["expires_at"])
    if not expires > created:
        raise ValueError("it expires before it was made")
    if expires - created > MAX_TTL:  # re-sealed by hand: the cap holds for every plan
        raise ValueError(f"it lives longer than {MAX_TTL.days} days")
    for key in ("project_id", "endpoint"):
        if not isinstance(data[key], str) or not data[key]:
            raise ValueError(f"{key} is missing")
    filters = data["filters"]
    if not isinstance(filters, dict):
        raise ValueError("filters is not an object")
    return Plan(
        project_id=data["project_id"],
        endpoint=data["endpoint"],
        filters=Filters.from_json(filters),
        created_at=created,
        expires_at=expires,
        inventory_size=inventory,
        jobs=tuple(jobs),
        digest=data["digest"],
    )


def _instant(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError("a time is not a string")
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("a time carries no zone")
    return parsed
