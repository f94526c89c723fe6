"""Plan files: what ``discover --plan`` selected, sealed so ``run --plan`` deletes just that.

A plan is text, one JSON value a line, so that neither writing nor applying it ever holds
it whole in memory::

    devserver-reaper plan v2
    {"created_at": ..., "endpoint": ..., "filters": {...}, "jobs": 3, ...}    <- the header
    {"create_at": ..., "id": "...", "name": ..., "status": ..., ...}         <- one job a line
    ...
    seal hmac-sha256:5c0f...                                                 <- the seal

The header holds the project and endpoint, the filters, when the plan was made and when it
expires, how many jobs it holds, how many the project held (``inventory_size``, for
``max_fraction``), whether the listing was complete, and a review of the selection (counts
by type, status and user, ages, what protection left out). Jobs are in the order the
listing returned them: applied in that order, the run's re-check reads the listing's pages
in the same order as its batches need them.

The seal covers every byte before it. With a *plan key* (``plan_key_file``: a secret only
the people and jobs allowed to make plans can read) it is an HMAC-SHA256 keyed with it:
nobody without the key can widen a plan (blank a filter, add jobs, raise
``inventory_size``, extend the expiry) and re-seal it. Without a key it is a SHA-256 digest,
which catches a plan edited by accident, cut short or pointed at the wrong project, and
nothing more: anyone who can write the file can recompute it. ``run`` with a plan key
refuses a plan sealed without one (a downgrade is an attack like any other), and a plan
sealed with a key cannot be checked, so is refused, without it.

Reading (:func:`open_plan`) checks the seal while copying the jobs into a private SQLite
file, and only then hands them out: what is applied is the copy that was verified, never
the file as it may be rewritten afterwards. The copy is in a ``worker.scratch`` folder: a
run killed with ``kill -9`` leaves it, and the next plan this user opens removes it.
A plan of the first format (one JSON object) is refused with a message that says to
discover again.

A plan of several projects (``discover --project``, format v3) names its projects: its
header holds, instead of one project, endpoint, inventory and review, a list of *sections*
(``projects``), one per project, each with its project id, endpoint, region, inventory,
job count, completeness and review; the job lines are those of v2, each section's in a run,
in the order of the list (the counts, under the seal, say where each section ends). It is
applied to the projects it names, each job sent only to its own section's project
(:meth:`SealedPlan.entries`), and ``max_fraction`` holds per project. A plan made without
``--project`` is a v2 plan, byte for byte as before, and applies to the run's own project.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson

from worker.discovery.filters import Filters, matched_fields
from worker.errors import ConfigError, InputUnreadable, UsageError, file_problem
from worker.scratch import Scratch, locked_file
from worker.targets import (
    Target,
    endpoint_problem,
    normal_endpoint,
    project_problem,
    region_problem,
    untrusted,
)
from worker.types import JOB_ID_RE, JobRecord, iso

PLAN_VERSION = 2
NAMED_VERSION = 3
"""A plan that names its projects, one section each (``discover --project``)."""
MAGIC = b"devserver-reaper plan v2\n"
MAGIC_NAMED = b"devserver-reaper plan v3\n"
SEAL_PREFIX = b"seal "
UNKEYED = (
    "its seal guards against accidents, not against anyone who can write the file (they can "
    "change it and seal it again); make and apply plans with --plan-key-file to stop that"
)
"""What a plan sealed with no plan key is worth, as ``plan show`` and ``run --plan`` say."""
HMAC_SCHEME = "hmac-sha256"
DIGEST_SCHEME = "sha256"
MAX_TTL = timedelta(days=30)
CLOCK_SKEW = timedelta(minutes=10)
"""How far ahead of this machine's clock the machine that made a plan may have been."""
LINE_LIMIT = 64 * 1024
"""The longest line a plan may hold: a job's fields are short; a longer line is not a plan."""
_JOB_FIELDS = ("id", "type", "status", "name", "user_name", "create_at", "update_at")
_HEADER_FIELDS = frozenset(
    {"version", "project_id", "endpoint", "filters", "created_at", "expires_at",
     "inventory_size", "jobs", "complete", "review"}
)  # fmt: skip
_NAMED_FIELDS = frozenset({"version", "filters", "created_at", "expires_at", "jobs", "projects"})
_SECTION_FIELDS = frozenset(
    {"project_id", "endpoint", "region", "inventory_size", "jobs", "complete", "review"}
)
MAX_SECTIONS = 1000
"""Projects one plan may name: an account's projects, not a list to scan the world with."""
_CHUNK = 5000
_SELECT_JOB = (
    "SELECT id, type, status, name, user_name, create_at, update_at FROM jobs "
    "WHERE id = ? AND seq > ? AND seq <= ?"
)
_HAS_JOB = "SELECT 1 FROM jobs WHERE id = ? AND seq > ? AND seq <= ?"
_SPELT = "SELECT id FROM jobs WHERE id = ? COLLATE NOCASE AND seq > ? AND seq <= ? LIMIT 1"
_IDS_IN = "SELECT id FROM jobs WHERE seq > ? AND seq <= ? ORDER BY seq"
_INSERT_JOB = (
    "INSERT INTO jobs (id, type, status, name, user_name, create_at, update_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


class PlanRefused(UsageError):
    """The plan may not be applied: altered, expired, foreign, malformed or over a cap (exit 64).

    A usage error rather than a configuration error: the settings are fine, the command was
    pointed at the wrong file (or at one that no longer says what was reviewed).
    """


# -- the key and the seal ------------------------------------------------------------------------


class _Sealer:
    """The running seal over a plan's bytes: HMAC-SHA256 with a key, SHA-256 without."""

    def __init__(self, key: bytes | None) -> None:
        self.scheme = HMAC_SCHEME if key is not None else DIGEST_SCHEME
        self._mac = hmac.new(key, digestmod=hashlib.sha256) if key is not None else None
        self._digest = hashlib.sha256() if key is None else None

    def update(self, data: bytes) -> None:
        if self._mac is not None:
            self._mac.update(data)
        elif self._digest is not None:
            self._digest.update(data)

    def line(self) -> bytes:
        """The seal line: ``seal SCHEME:HEX``."""
        hexed = self._mac.hexdigest() if self._mac is not None else self._digest.hexdigest()  # type: ignore[union-attr]
        return SEAL_PREFIX + f"{self.scheme}:{hexed}\n".encode()


# -- what a plan says ----------------------------------------------------------------------------


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


def project_place(project_id: str, region: str | None, endpoint: str) -> str:
    """How people are told which project: ``ID (REGION)``, else ``ID at ENDPOINT``."""
    return f"{project_id} ({region})" if region else f"{project_id} at {endpoint}"


@dataclass(frozen=True, slots=True)
class PlanSection:
    """One project's part of a plan: where its jobs go, what the project held, what was
    selected in it (its review)."""

    project_id: str
    endpoint: str
    inventory_size: int
    jobs: int
    complete: bool = True
    review: Mapping[str, Any] = field(default_factory=dict)
    region: str | None = None

    @property
    def where(self) -> str:
        return project_place(self.project_id, self.region, self.endpoint)

    @property
    def target(self) -> Target:
        """Where its jobs go: the project at its endpoint."""
        return Target(self.project_id, self.endpoint, self.region)

    def to_json(self) -> dict[str, Any]:
        return {
            "project_id": self.project_id,
            "endpoint": self.endpoint,
            "region": self.region,
            "inventory_size": self.inventory_size,
            "jobs": self.jobs,
            "complete": self.complete,
            "review": dict(self.review),
        }


@dataclass(frozen=True, slots=True)
class PlanHeader:
    """Everything a plan says but its jobs: what ``plan show`` prints and ``run`` checks.

    ``sections``: one per project, in the order of their jobs in the file. A plan made
    without ``--project`` has one, and is not ``named``: it applies to the run's project.
    """

    filters: Filters
    created_at: datetime
    expires_at: datetime
    sections: tuple[PlanSection, ...]
    named: bool = False
    seal: str = ""  # the seal line's value, SCHEME:HEX, once read or written

    @property
    def keyed(self) -> bool:
        return self.seal.startswith(HMAC_SCHEME + ":")

    @property
    def jobs(self) -> int:
        return sum(section.jobs for section in self.sections)

    @property
    def only(self) -> PlanSection:
        """The section of a plan of one project; ``ValueError`` for a plan of several."""
        if len(self.sections) != 1:
            raise ValueError(f"the plan names {len(self.sections)} projects, not one")
        return self.sections[0]

    @property
    def project_id(self) -> str:
        return self.only.project_id

    @property
    def endpoint(self) -> str:
        return self.only.endpoint

    @property
    def inventory_size(self) -> int:
        return self.only.inventory_size

    @property
    def complete(self) -> bool:
        return all(section.complete for section in self.sections)

    @property
    def review(self) -> Mapping[str, Any]:
        """The review of the one project, or the counts of every section added up."""
        if len(self.sections) == 1:
            return self.sections[0].review
        return merged_review([section.review for section in self.sections])

    def to_json(self) -> dict[str, Any]:
        shared = {"filters": self.filters.to_json(), "created_at": iso(self.created_at),
                  "expires_at": iso(self.expires_at)}  # fmt: skip
        if self.named:
            projects = [section.to_json() for section in self.sections]
            return {"version": NAMED_VERSION, **shared, "jobs": self.jobs, "projects": projects}
        only = self.only.to_json()
        del only["region"]  # a v2 header names no region: the run's own project is its
        return {"version": PLAN_VERSION, **shared, **only}

    def verify(
        self,
        *,
        project_id: str | None,
        endpoint: str | None,
        now: datetime,
        max_fraction: float | None = None,
        inventory: int | None = None,
        allowed: Collection[str] = (),
        endpoints: Collection[str] = (),
        settling: bool = False,
    ) -> None:
        """Refuse a plan for another project or endpoint, an expired one, or one over the cap
        (of the inventory it recorded, or of ``inventory`` counted now, whichever is less).
        ``settling``: an expired plan is not refused, the run sending nothing on it but
        reading what a run before sent unanswered (``worker.commands.planned``).

        A plan that names its projects is applied to those, not to ``project_id`` and
        ``endpoint`` (the run's own): each of them must be in ``allowed`` when that is not
        empty (``allowed_projects``), each endpoint one the settings trust (``endpoints``:
        theirs and ``allowed_endpoints``; see :func:`worker.targets.untrusted`), and
        ``max_fraction`` holds for each.

        The seal itself is checked by :func:`open_plan`, before the plan exists as an object.
        """
        if self.named:
            for section in self.sections:
                if allowed and section.project_id not in allowed:
                    raise PlanRefused(
                        f"plan names project {section.project_id}, which is not in "
                        "allowed_projects: refusing to apply it"
                    )
                if (problem := untrusted(normal_endpoint(section.endpoint), endpoints)) is not None:
                    raise PlanRefused(
                        f"plan names project {section.project_id}, but its {problem}; "
                        "refusing to apply it"
                    )
        else:
            if project_id is None or self.project_id != project_id:
                raise PlanRefused(
                    f"plan is for project {self.project_id}, not {project_id}: refusing to apply it"
                )
            if endpoint is None or normal_endpoint(self.endpoint) != normal_endpoint(endpoint):
                raise PlanRefused(
                    f"plan is for endpoint {self.endpoint}, not {endpoint}: refusing to apply it"
                )
        if self.created_at > now + CLOCK_SKEW:
            raise PlanRefused(
                f"plan says it was made at {iso(self.created_at)}, which is still to come: "
                "a plan re-sealed by hand is not applied"
            )
        if now >= self.expires_at and not settling:
            raise PlanRefused(
                f"plan expired at {iso(self.expires_at)} (made {iso(self.created_at)}): "
                "run discover again and review the new plan"
            )
        for section in self.sections:
            counted = section.inventory_size
            if inventory is not None and not self.named:
                counted = min(inventory, counted)
            within = section.where if self.named else None
            check_fraction(section.jobs, counted, max_fraction, project=within)

    def __repr__(self) -> str:
        projects = ", ".join(section.project_id for section in self.sections)
        return (
            f"PlanHeader(projects=[{projects}], jobs={self.jobs}, "
            f"expires_at={iso(self.expires_at)!r}, seal={self.seal[:24]!r}...)"
        )


def merged_review(reviews: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several sections' reviews as one: counts added up, the oldest and newest of all."""
    out: dict[str, Any] = {"selected": sum(int(r.get("selected") or 0) for r in reviews)}
    for key in ("by_type", "by_status", "by_user", "by_age", "protected"):
        total: Counter[str] = Counter()
        for review in reviews:
            total.update({str(k): int(v) for k, v in (review.get(key) or {}).items()})
        out[key] = dict(total.most_common())
    # ISO-8601 times of one format: their text sorts as their time
    out["oldest"] = min((str(r["oldest"]) for r in reviews if r.get("oldest")), default=None)
    out["newest"] = max((str(r["newest"]) for r in reviews if r.get("newest")), default=None)
    return out


def check_fraction(
    selected: int, inventory: int, max_fraction: float | None, *, project: str | None = None
) -> None:
    """``max_fraction``: refuse a selection larger than that share of the inventory (of
    ``project``, named in the refusal, when a plan holds several)."""
    if max_fraction is None:
        return
    if selected > max_fraction * inventory:
        share = f"{selected / inventory:.1%}" if inventory else "all"
        where = f"in project {project}: " if project else ""
        raise PlanRefused(
            f"{where}{selected} of {inventory} jobs selected ({share}) exceeds max_fraction "
            f"{max_fraction:g}: narrow the filters or raise --max-fraction"
        )


def _job_line(job: PlanJob) -> bytes:
    return orjson.dumps(job.to_json(), option=orjson.OPT_SORT_KEYS) + b"\n"


# -- writing -------------------------------------------------------------------------------------


class PlanWriter:
    """Writes a plan a job at a time: jobs go to a private spool first, and :meth:`seal`
    writes the file (header, jobs, seal) atomically once the header is known.

    Use as a context manager; leaving it without :meth:`seal` leaves nothing behind.
    """

    def __init__(self, path: Path, *, key: bytes | None) -> None:
        self._path = path
        self._key = key
        # Locked while this process lives: the next writer of this plan removes the spool a
        # kill -9 left (it names every job listed), never one in use.
        fd, self._spool_path = locked_file(path.parent, f".{path.name}.", ".jobs")
        self._spool: IO[bytes] = os.fdopen(fd, "w+b")
        self.jobs = 0

    def __enter__(self) -> PlanWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._spool.close()  # its last flush fails on a full disk: the spool goes anyway
        finally:
            self._spool_path.unlink(missing_ok=True)

    def add(self, record: JobRecord) -> None:
        self._spool.write(_job_line(PlanJob.of(record)))
        self.jobs += 1

    def seal(
        self,
        *,
        project_id: str,
        endpoint: str,
        filters: Filters,
        now: datetime,
        ttl: timedelta,
        inventory_size: int,
        complete: bool = True,
        review: Mapping[str, Any] | None = None,
    ) -> PlanHeader:
        """Write the plan of one project (mode 0600, renamed over the path); its header."""
        section = PlanSection(project_id, endpoint, inventory_size, self.jobs, complete,
                              dict(review or {}))  # fmt: skip
        return write_plan(
            self._path, key=self._key, filters=filters, now=now, ttl=ttl, parts=[(section, self)]
        )

    def copy_into(self, out: IO[bytes], sealer: _Sealer) -> None:
        """The spooled job lines, onto ``out`` and into the seal."""
        self._spool.flush()
        self._spool.seek(0)
        while chunk := self._spool.read(1 << 20):
            out.write(chunk)
            sealer.update(chunk)


def write_plan(
    path: Path,
    *,
    key: bytes | None,
    filters: Filters,
    now: datetime,
    ttl: timedelta,
    parts: Sequence[tuple[PlanSection, PlanWriter]],
    named: bool = False,
) -> PlanHeader:
    """Write a plan (mode 0600, renamed over ``path``): the header, each part's jobs in
    order, the seal; its header. ``named``: a plan of the projects its sections name (v3),
    else of one project, the run's own (v2, ``parts`` holds one). A section's job count is
    its writer's."""
    if not timedelta(0) < ttl <= MAX_TTL:
        raise ValueError(f"a plan's time to live must be within 1s..{MAX_TTL.days}d")
    if not named and len(parts) != 1:
        raise ValueError("a plan that does not name its projects holds one")
    sections = tuple(replace(section, jobs=writer.jobs) for section, writer in parts)
    header = PlanHeader(filters, now, now + ttl, sections, named)
    sealer = _Sealer(key)
    fd, temporary = locked_file(path.parent, f".{path.name}.", ".part")  # 0600, as the spool
    try:
        with os.fdopen(fd, "wb") as out:
            magic = MAGIC_NAMED if named else MAGIC
            head = magic + orjson.dumps(header.to_json(), option=orjson.OPT_SORT_KEYS) + b"\n"
            out.write(head)
            sealer.update(head)
            for _, writer in parts:
                writer.copy_into(out, sealer)
            seal = sealer.line()
            out.write(seal)
            out.flush()
            os.fsync(out.fileno())
            os.replace(temporary, path)  # still locked: no sweep takes it for a dead one's
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return replace(header, seal=seal[len(SEAL_PREFIX) :].decode().strip())


# -- reading -------------------------------------------------------------------------------------


class SealedPlan:
    """A plan whose seal held, its jobs in a private SQLite copy (deleted on :meth:`close`).

    ``ids()`` hands the jobs out in the plan's order (from any thread: each call opens its
    own connection), ``entries()`` each with the index of its section (its project);
    ``reviewed`` answers "is this job in the plan, and as what", ``reviewed_in(section)``
    the same of one project's jobs alone.
    """

    def __init__(self, header: PlanHeader, scratch: Scratch) -> None:
        self.header = header
        self._scratch = scratch
        self._db = scratch.path / "plan.sqlite"
        self.reviewed = PlanJobs(self._db)
        self._parts: dict[int, PlanJobs] = {}
        # Each section's jobs are the rows after the sections before it (seq counts from 1).
        self._bounds: list[tuple[int, int]] = []
        low = 0
        for section in header.sections:
            self._bounds.append((low, low + section.jobs))
            low += section.jobs

    def __enter__(self) -> SealedPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.reviewed.close()
        for part in self._parts.values():
            part.close()
        self._scratch.remove()

    def section_of(self, project_id: str, endpoint: str) -> int | None:
        """The index of the section of ``project_id`` at ``endpoint``; None: none of them."""
        for index, section in enumerate(self.header.sections):
            same = normal_endpoint(section.endpoint) == normal_endpoint(endpoint)
            if section.project_id == project_id and same:
                return index
        return None

    def reviewed_in(self, section: int) -> PlanJobs:
        """The jobs of section ``section`` alone: a job of another project is not in it."""
        found = self._parts.get(section)
        if found is None:
            found = self._parts[section] = PlanJobs(self._db, self._bounds[section])
        return found

    def entries(self) -> Iterator[tuple[str, int]]:
        """Every job id in the plan's order, with the index of its section."""
        for section in range(len(self._bounds)):
            for job_id in self.ids(section):
                yield job_id, section

    @property
    def filters(self) -> Filters:
        return self.header.filters

    def __len__(self) -> int:
        return self.header.jobs

    def ids(self, section: int | None = None) -> Iterator[str]:
        """The job ids in the plan's order: all of them, or those of ``section``."""
        bounds = (0, 2**62) if section is None else self._bounds[section]
        db = sqlite3.connect(self._db)
        try:
            cursor = db.execute(_IDS_IN, bounds)
            while rows := cursor.fetchmany(_CHUNK):
                for (job_id,) in rows:
                    yield job_id
        finally:
            db.close()

    def __repr__(self) -> str:
        return f"SealedPlan({self.header!r})"


class PlanJobs:
    """The plan's jobs by id, read from the verified copy: ``job_id in jobs``, ``jobs.get``;
    of one section only when ``rows`` bounds them (``low < seq <= high``)."""

    def __init__(self, db: Path, rows: tuple[int, int] | None = None) -> None:
        self._conn = sqlite3.connect(db, check_same_thread=False)
        self._rows = rows if rows is not None else (0, 2**62)

    def close(self) -> None:
        self._conn.close()

    def __contains__(self, job_id: object) -> bool:
        return self._row(_HAS_JOB, job_id) is not None

    def get(self, job_id: str) -> PlanJob | None:
        row = self._row(_SELECT_JOB, job_id)
        return None if row is None else PlanJob(*row)

    def spelt(self, job_id: str) -> str | None:
        """The plan's id that is ``job_id`` in another case (ids are ASCII), if any."""
        row = self._row(_SPELT, job_id)
        return None if row is None else str(row[0])

    def _row(self, query: str, job_id: object) -> Any:
        return self._conn.execute(query, (job_id, *self._rows)).fetchone()

    def names(self) -> PlanNames:
        """The planned jobs' names by id, looked up as asked (``DRY-RUN`` lines)."""
        return PlanNames(self)


class PlanNames(Mapping[str, str]):
    """A plan's job names by id, read from its copy one at a time."""

    def __init__(self, jobs: PlanJobs) -> None:
        self._jobs = jobs

    def __getitem__(self, job_id: str) -> str:
        job = self._jobs.get(job_id)
        if job is None or not job.name:
            raise KeyError(job_id)
        return job.name

    def __iter__(self) -> Iterator[str]:
        rows = self._jobs._conn.execute("SELECT id FROM jobs WHERE name IS NOT NULL ORDER BY seq")
        return (job_id for (job_id,) in rows)

    def __len__(self) -> int:
        (count,) = self._jobs._conn.execute(
            "SELECT count(*) FROM jobs WHERE name IS NOT NULL"
        ).fetchone()
        return int(count)


def open_plan(path: Path, *, key: bytes | None) -> SealedPlan:
    """Check a plan's seal and copy its jobs aside; ``InputUnreadable`` (66) when the file
    cannot be read, ``PlanRefused`` (64) when it is not a plan, not the one that was written,
    or sealed otherwise than ``key`` can check."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputUnreadable(f"cannot read plan {path}: {file_problem(exc)}") from None
    try:
        scratch = Scratch("plan")  # removed by a later run's if this process is killed
    except OSError as exc:
        handle.close()
        raise ConfigError(f"plan {path}: its private copy cannot be made in the temporary "
                          f"directory ({exc.strerror or type(exc).__name__}): set TMPDIR to a "
                          "folder this user may write") from None  # fmt: skip
    try:
        with handle:
            header = _copy_verified(path, handle, scratch.path / "plan.sqlite", key)
        return SealedPlan(header, scratch)
    except BaseException:
        scratch.remove()
        raise


def names_projects(path: Path) -> bool:
    """Whether the file at ``path`` looks like a plan that names its projects (v3), by its
    first line alone: what to ask of the settings before the plan is read (its seal is
    checked when it is, by :func:`open_plan`). False when it cannot be read: so it fails
    there, saying why."""
    try:
        with path.open("rb") as handle:
            return handle.readline(len(MAGIC_NAMED) + 1) == MAGIC_NAMED
    except OSError:
        return False


def read_header(path: Path, *, key: bytes | None) -> PlanHeader:
    """The header of a plan whose seal holds (``plan show``); nothing kept."""
    with open_plan(path, key=key) as plan:
        return plan.header


def _copy_verified(path: Path, handle: IO[bytes], db_path: Path, key: bytes | None) -> PlanHeader:
    first = handle.readline(LINE_LIMIT)
    if first.lstrip().startswith(b"{"):
        raise PlanRefused(
            f"plan {path} is in the old format (one JSON object), which this version no "
            "longer applies: run discover again and review the new plan"
        )
    named = first == MAGIC_NAMED
    if first != MAGIC and not named:
        raise PlanRefused(f"plan {path} is not a devserver-reaper plan (its first line is not "
                          f"{MAGIC.decode().strip()!r})")  # fmt: skip
    sealer = _Sealer(key)
    sealer.update(first)
    head = handle.readline(LINE_LIMIT)
    sealer.update(head)
    try:
        fields = orjson.loads(head)
    except orjson.JSONDecodeError:
        raise PlanRefused(f"plan {path} was cut short or altered (its header is not JSON): "
                          "run discover again") from None  # fmt: skip
    db = sqlite3.connect(db_path)
    twice: tuple[str, int, int] | None = None
    try:
        db.execute(
            "CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, type TEXT, "
            "status TEXT, name TEXT, user_name TEXT, create_at TEXT, update_at TEXT)"
        )
        count, stated = _copy_jobs(path, handle, db, sealer)
        try:
            db.execute("CREATE UNIQUE INDEX jobs_id ON jobs (id)")
        except sqlite3.IntegrityError:
            twice = db.execute(_LISTED_TWICE).fetchone()
        db.commit()
    finally:
        db.close()
    if not hmac.compare_digest(stated, sealer.line()):
        scheme = stated[len(SEAL_PREFIX) :].split(b":", 1)[0].decode(errors="replace")
        raise PlanRefused(_seal_refusal(path, scheme, key))
    try:
        header = _parse_named(fields) if named else _parse_header(fields)
    except KeyError as exc:  # a member every plan has
        raise PlanRefused(f"plan {path} is not a valid plan: it has no {exc.args[0]}") from None
    except (ValueError, TypeError) as exc:
        raise PlanRefused(f"plan {path} is not a valid plan: {exc}") from None
    if header.jobs != count:
        raise PlanRefused(f"plan {path} says it holds {header.jobs} jobs but holds {count}")
    if twice is not None:
        raise PlanRefused(_listed_twice(path, header, *twice))
    return replace(header, seal=stated[len(SEAL_PREFIX) :].decode().strip())


_LISTED_TWICE = "SELECT id, min(seq), max(seq) FROM jobs GROUP BY id HAVING count(*) > 1 LIMIT 1"


def _listed_twice(path: Path, header: PlanHeader, job_id: str, first: int, second: int) -> str:
    """Why a sealed plan listing ``job_id`` at rows ``first`` and ``second`` is refused: in
    two projects, two jobs sharing an id, which one run cannot tell apart (an id is sent to
    one project in a run); in one project, a listing discover never writes."""
    where = [_section_at(header, row) for row in (first, second)]
    if where[0] is not where[1]:
        one, other = (section.where for section in where)
        return (
            f"plan {path} lists job {job_id} in two projects, {one} and {other}: one run "
            "sends an id to one project, so it cannot apply this plan; discover each project "
            "into a plan of its own (--project) and run each"
        )
    return f"plan {path} lists job {job_id} twice in one project: it was altered"


def _section_at(header: PlanHeader, row: int) -> PlanSection:
    """The section whose jobs hold row ``row`` of the plan (rows count from 1)."""
    low = 0
    for section in header.sections:
        low += section.jobs
        if row <= low:
            return section
    return header.sections[-1]


def _copy_jobs(
    path: Path, handle: IO[bytes], db: sqlite3.Connection, sealer: _Sealer
) -> tuple[int, bytes]:
    """Copy the job lines into ``db``; the job count and the seal line as read."""
    count = 0
    rows: list[tuple[Any, ...]] = []
    insert = _INSERT_JOB
    while True:
        line = handle.readline(LINE_LIMIT)
        if not line:
            raise PlanRefused(f"plan {path} was cut short (it ends without its seal): "
                              "run discover again")  # fmt: skip
        if line.startswith(SEAL_PREFIX):
            if handle.read(1):
                raise PlanRefused(f"plan {path} holds more after its seal: it was altered")
            db.executemany(insert, rows)
            return count, line
        sealer.update(line)
        rows.append(_job_row(path, line))
        count += 1
        if len(rows) >= _CHUNK:
            db.executemany(insert, rows)
            rows = []


def _job_row(path: Path, line: bytes) -> tuple[Any, ...]:
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise PlanRefused(f"plan {path} holds a line that is not a job: it was altered") from None
    if not isinstance(entry, dict) or set(entry) != set(_JOB_FIELDS):
        raise PlanRefused(f"plan {path}: a job entry does not have the planned fields")
    job_id = entry["id"]
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise PlanRefused(f"plan {path}: a job id is not 1 to 64 letters, digits, '-' and '_'")
    if not all(v is None or isinstance(v, str) for v in entry.values()):
        raise PlanRefused(f"plan {path}: a job field is not text")
    return tuple(entry[name] for name in _JOB_FIELDS)


def _seal_refusal(path: Path, scheme: str, key: bytes | None) -> str:
    if scheme == HMAC_SCHEME and key is None:
        return (
            f"plan {path} is sealed with a plan key, and none is given to check it with: "
            "give the key it was made with, --plan-key-file FILE (or REAPER_PLAN_KEY_FILE, "
            "or plan_key_file in the config file)"
        )
    if scheme == DIGEST_SCHEME and key is not None:
        return (
            f"plan {path} is sealed without a plan key, and this run has one: a plan must be "
            "made with the plan key (discover with the same --plan-key-file) to be applied"
        )
    return (
        f"plan {path} was altered since discover wrote it (its seal does not match its "
        "content, or it was sealed with another plan key): run discover again and review "
        "the new plan"
    )


def _parse_header(data: object) -> PlanHeader:
    """A v2 header: one project, the run's own."""
    data = _members(data, _HEADER_FIELDS, PLAN_VERSION)
    _place_held(data, "its")
    section = _section(data, PLAN_VERSION)
    created, expires = _lifetime(data)
    return PlanHeader(Filters.from_json(data["filters"]), created, expires, (section,))


def _parse_named(data: object) -> PlanHeader:
    """A v3 header: the projects it names, one section each, each held to the settings'
    own rules (the plan's endpoints are where its jobs' DELETEs will go)."""
    data = _members(data, _NAMED_FIELDS, NAMED_VERSION)
    raw = data["projects"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_SECTIONS:
        raise ValueError(f"projects is not a list of 1 to {MAX_SECTIONS} projects")
    sections: list[PlanSection] = []
    for entry in raw:
        if not isinstance(entry, dict) or set(entry) != _SECTION_FIELDS:
            raise ValueError("a project of projects does not have the planned fields")
        _place_held(entry, "a project's")
        region = entry["region"]
        if region is not None and (not isinstance(region, str) or region_problem(region)):
            raise ValueError("a project's region is not a region")
        sections.append(_section(entry, NAMED_VERSION))
    places = [(section.project_id, normal_endpoint(section.endpoint)) for section in sections]
    if len(set(places)) != len(places):
        raise ValueError("it names one project at one endpoint twice")
    total = data["jobs"]
    if (
        isinstance(total, bool)
        or not isinstance(total, int)
        or total != sum(section.jobs for section in sections)
    ):
        raise ValueError("jobs is not the sum of its projects' jobs")
    created, expires = _lifetime(data)
    return PlanHeader(Filters.from_json(data["filters"]), created, expires, tuple(sections), True)


def _place_held(data: Mapping[str, Any], whose: str) -> None:
    """A header's (or a section's) project id and endpoint, held to the settings' rules:
    the endpoint is where the plan's DELETEs go, and is compared with the run's."""
    for key, problem in (("project_id", project_problem), ("endpoint", endpoint_problem)):
        if not isinstance(data[key], str) or (said := problem(data[key])) is not None:
            raise ValueError(f"{whose} {key} {said or 'is missing'}")


def _members(data: object, allowed: frozenset[str], version: int) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError("the header is not a JSON object")
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"unknown members {sorted(unknown)}")
    if data["version"] != version:
        raise ValueError(f"version {data['version']!r}; this worker reads version {version}")
    if not isinstance(data["filters"], dict):
        raise ValueError("filters is not an object")
    return data


def _section(data: Mapping[str, Any], version: int) -> PlanSection:
    """The project part of a v2 header, or one entry of a v3 header's ``projects``."""
    for key in ("inventory_size", "jobs"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} is not a count")
    review = data.get("review")
    if review is not None and not isinstance(review, dict):
        raise ValueError("review is not an object")
    complete = data.get("complete", True)
    if version == NAMED_VERSION and not isinstance(complete, bool):
        raise ValueError("complete is not true or false")
    return PlanSection(
        project_id=data["project_id"],
        endpoint=data["endpoint"],
        inventory_size=data["inventory_size"],
        jobs=data["jobs"],
        complete=bool(complete),
        review=review or {},
        region=data.get("region"),
    )


def _lifetime(data: Mapping[str, Any]) -> tuple[datetime, datetime]:
    created = _instant(data["created_at"])
    expires = _instant(data["expires_at"])
    if not expires > created:
        raise ValueError("it expires before it was made")
    if expires - created > MAX_TTL:  # re-sealed by hand: the cap holds for every plan
        raise ValueError(f"it lives longer than {MAX_TTL.days} days")
    return created, expires


def _instant(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError("a time is not a string")
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("a time carries no zone")
    return parsed
