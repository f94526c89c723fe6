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
the file as it may be rewritten afterwards. A plan of the first format (one JSON object) is
refused with a message that says to discover again.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson

from worker.discovery.filters import Filters, matched_fields
from worker.errors import InputUnreadable, UsageError
from worker.types import JOB_ID_RE, JobRecord, iso

PLAN_VERSION = 2
MAGIC = b"devserver-reaper plan v2\n"
SEAL_PREFIX = b"seal "
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
_CHUNK = 5000
_SELECT_JOB = (
    "SELECT id, type, status, name, user_name, create_at, update_at FROM jobs WHERE id = ?"
)
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


@dataclass(frozen=True, slots=True)
class PlanHeader:
    """Everything a plan says but its jobs: what ``plan show`` prints and ``run`` checks."""

    project_id: str
    endpoint: str
    filters: Filters
    created_at: datetime
    expires_at: datetime
    inventory_size: int
    jobs: int
    complete: bool = True
    review: Mapping[str, Any] = field(default_factory=dict)
    seal: str = ""  # the seal line's value, SCHEME:HEX, once read or written

    @property
    def keyed(self) -> bool:
        return self.seal.startswith(HMAC_SCHEME + ":")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "project_id": self.project_id,
            "endpoint": self.endpoint,
            "filters": self.filters.to_json(),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "inventory_size": self.inventory_size,
            "jobs": self.jobs,
            "complete": self.complete,
            "review": dict(self.review),
        }

    def verify(
        self,
        *,
        project_id: str,
        endpoint: str,
        now: datetime,
        max_fraction: float | None = None,
        inventory: int | None = None,
    ) -> None:
        """Refuse a plan for another project or endpoint, an expired one, or one over the cap
        (of the inventory it recorded, or of ``inventory`` counted now, whichever is less).

        The seal itself is checked by :func:`open_plan`, before the plan exists as an object.
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
        counted = self.inventory_size if inventory is None else min(inventory, self.inventory_size)
        check_fraction(self.jobs, counted, max_fraction)

    def __repr__(self) -> str:
        return (
            f"PlanHeader(project_id={self.project_id!r}, jobs={self.jobs}, "
            f"inventory_size={self.inventory_size}, expires_at={iso(self.expires_at)!r}, "
            f"seal={self.seal[:24]!r}...)"
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


def _normal_endpoint(endpoint: str) -> str:
    return endpoint.rstrip("/").lower()


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
        folder = path.parent if str(path.parent) else Path(".")
        self._folder = folder
        fd, spool = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".jobs", dir=folder)
        os.chmod(spool, 0o600)
        self._spool_path = Path(spool)
        self._spool: IO[bytes] = os.fdopen(fd, "w+b")
        self.jobs = 0

    def __enter__(self) -> PlanWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._spool.close()
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
        """Write the plan (mode 0600, renamed over the path) and return its header."""
        if not timedelta(0) < ttl <= MAX_TTL:
            raise ValueError(f"a plan's time to live must be within 1s..{MAX_TTL.days}d")
        header = PlanHeader(
            project_id=project_id, endpoint=endpoint, filters=filters, created_at=now,
            expires_at=now + ttl, inventory_size=inventory_size, jobs=self.jobs,
            complete=complete, review=dict(review or {}),
        )  # fmt: skip
        sealer = _Sealer(self._key)
        fd, temporary = tempfile.mkstemp(prefix=f".{self._path.name}.", dir=self._folder)
        try:
            with os.fdopen(fd, "wb") as out:
                os.chmod(temporary, 0o600)
                head = MAGIC + orjson.dumps(header.to_json(), option=orjson.OPT_SORT_KEYS) + b"\n"
                out.write(head)
                sealer.update(head)
                self._spool.flush()
                self._spool.seek(0)
                while chunk := self._spool.read(1 << 20):
                    out.write(chunk)
                    sealer.update(chunk)
                seal = sealer.line()
                out.write(seal)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self._path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        value = seal[len(SEAL_PREFIX) :].decode().strip()
        return PlanHeader(**{**_fields(header), "seal": value})


def _fields(header: PlanHeader) -> dict[str, Any]:
    return {name: getattr(header, name) for name in PlanHeader.__slots__}


# -- reading -------------------------------------------------------------------------------------


class SealedPlan:
    """A plan whose seal held, its jobs in a private SQLite copy (deleted on :meth:`close`).

    ``ids()`` hands the jobs out in the plan's order (from any thread: each call opens its
    own connection); ``reviewed`` answers "is this job in the plan, and as what".
    """

    def __init__(self, header: PlanHeader, folder: Path) -> None:
        self.header = header
        self._folder = folder
        self._db = folder / "plan.sqlite"
        self.reviewed = PlanJobs(self._db)

    def __enter__(self) -> SealedPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.reviewed.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    @property
    def filters(self) -> Filters:
        return self.header.filters

    def __len__(self) -> int:
        return self.header.jobs

    def ids(self) -> Iterator[str]:
        db = sqlite3.connect(self._db)
        try:
            cursor = db.execute("SELECT id FROM jobs ORDER BY seq")
            while rows := cursor.fetchmany(_CHUNK):
                for (job_id,) in rows:
                    yield job_id
        finally:
            db.close()

    def __repr__(self) -> str:
        return f"SealedPlan({self.header!r})"


class PlanJobs:
    """The plan's jobs by id, read from the verified copy: ``job_id in jobs``, ``jobs.get``."""

    def __init__(self, db: Path) -> None:
        self._conn = sqlite3.connect(db, check_same_thread=False)

    def close(self) -> None:
        self._conn.close()

    def __contains__(self, job_id: object) -> bool:
        row = self._conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None

    def get(self, job_id: str) -> PlanJob | None:
        row = self._conn.execute(_SELECT_JOB, (job_id,)).fetchone()
        return None if row is None else PlanJob(*row)

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
        raise InputUnreadable(f"plan {path}: {exc.strerror or type(exc).__name__}") from None
    folder = Path(tempfile.mkdtemp(prefix="devserver-reaper-plan-"))
    try:
        with handle:
            header = _copy_verified(path, handle, folder / "plan.sqlite", key)
        return SealedPlan(header, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


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
    if first != MAGIC:
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
    try:
        db.execute(
            "CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, type TEXT, "
            "status TEXT, name TEXT, user_name TEXT, create_at TEXT, update_at TEXT)"
        )
        count, stated = _copy_jobs(path, handle, db, sealer)
        db.commit()
    except sqlite3.IntegrityError:
        raise PlanRefused(f"plan {path} lists a job twice: it was altered") from None
    finally:
        db.close()
    if not hmac.compare_digest(stated, sealer.line()):
        scheme = stated[len(SEAL_PREFIX) :].split(b":", 1)[0].decode(errors="replace")
        raise PlanRefused(_seal_refusal(path, scheme, key))
    try:
        header = _parse_header(fields)
    except (ValueError, TypeError, KeyError) as exc:
        raise PlanRefused(f"plan {path} is not a valid plan: {exc}") from None
    if header.jobs != count:
        raise PlanRefused(f"plan {path} says it holds {header.jobs} jobs but holds {count}")
    value = stated[len(SEAL_PREFIX) :].decode().strip()
    return PlanHeader(**{**_fields(header), "seal": value})


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
            f"plan {path} is sealed with a plan key, and no plan_key_file is set to check it "
            "with: set the plan key the plan was made with"
        )
    if scheme == DIGEST_SCHEME and key is not None:
        return (
            f"plan {path} is sealed without a plan key, and this run has one: a plan must be "
            "made with the plan key (discover with the same plan_key_file) to be applied"
        )
    return (
        f"plan {path} was altered since discover wrote it (its seal does not match its "
        "content, or it was sealed with another plan key): run discover again and review "
        "the new plan"
    )


def _parse_header(data: object) -> PlanHeader:
    if not isinstance(data, dict):
        raise ValueError("the header is not a JSON object")
    unknown = set(data) - _HEADER_FIELDS
    if unknown:
        raise ValueError(f"unknown members {sorted(unknown)}")
    if data["version"] != PLAN_VERSION:
        raise ValueError(f"version {data['version']!r}; this worker reads version {PLAN_VERSION}")
    for key in ("inventory_size", "jobs"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} is not a count")
    created = _instant(data["created_at"])
    expires = _instant(data["expires_at"])
    if not expires > created:
        raise ValueError("it expires before it was made")
    if expires - created > MAX_TTL:  # re-sealed by hand: the cap holds for every plan
        raise ValueError(f"it lives longer than {MAX_TTL.days} days")
    for key in ("project_id", "endpoint"):
        if not isinstance(data[key], str) or not data[key]:
            raise ValueError(f"{key} is missing")
    if not isinstance(data["filters"], dict):
        raise ValueError("filters is not an object")
    review = data.get("review")
    if review is not None and not isinstance(review, dict):
        raise ValueError("review is not an object")
    return PlanHeader(
        project_id=data["project_id"],
        endpoint=data["endpoint"],
        filters=Filters.from_json(data["filters"]),
        created_at=created,
        expires_at=expires,
        inventory_size=data["inventory_size"],
        jobs=data["jobs"],
        complete=bool(data.get("complete", True)),
        review=review or {},
    )


def _instant(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError("a time is not a string")
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("a time carries no zone")
    return parsed
