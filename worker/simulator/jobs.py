"""The simulated project's jobs: created deterministically from a seed, deleted at most once.

Pure state, no I/O and no clock of its own (the caller passes "now" where it matters), so the
HTTP layer stays thin and tests can read the truth directly: which ids exist, which were
deleted, and how many times each delete was applied (it must never be more than once).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

JOB_TYPES = ("COMMON", "SERVICE_DEPLOY", "ASCEND_SOFTWARE_UPGRADE", "ASCEND_DIAGNOSIS")
JOB_STATUSES = ("FINISHED", "FAILED", "PROCESSING")
_STATUS_TABLE = ("FINISHED",) * 6 + ("FAILED",) * 2 + ("PROCESSING",) * 2  # 60/20/20
_USERS = ("alice", "bob", "carol", "dave")

JOBS_EPOCH_MS = 1_780_272_000_000
"""2026-06-01T00:00:00Z. Seeded jobs are created in the 90 days before it, so tests of
age filters can compute their cut-off from a constant instead of from the wall clock."""
SPREAD_MS = 90 * 24 * 3600 * 1000
_MAX_RUN_MS = 6 * 3600 * 1000

# Version 4 and the RFC 4122 variant, as uuid.UUID(version=4) sets them.
_UUID_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_BITS = (0x4000 << 64) | (0x8000 << 48)

# Fields a caller of add_jobs may pin; the rest come from the seeded RNG.
OVERRIDABLE = frozenset(
    {"name", "user_name", "description", "type", "status", "abnormal_count", "create_at",
     "update_at", "visible"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Job:
    """One job, with the record fields the API returns plus what ``show`` adds."""

    id: str
    name: str
    user_name: str
    description: str
    type: str
    status: str
    abnormal_count: int
    create_at: int  # epoch milliseconds, as the API's examples and the SDK model carry them
    update_at: int
    visible: bool = True  # only a filter of the list call; not part of the record
    server_ids: tuple[str, ...] = ()
    items: tuple[Any, ...] = ()
    template_id: str | None = None
    # ``record()`` as JSON, made once when the job is made (``replace`` makes it again):
    # the delete and list answers join these instead of serialising every job per call.
    record_json: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "record_json", orjson.dumps(self.record()))

    def record(self) -> dict[str, Any]:
        """The job as the list and delete calls return it."""
        return {
            "id": self.id,
            "name": self.name,
            "user_name": self.user_name,
            "description": self.description,
            "type": self.type,
            "status": self.status,
            "abnormal_count": self.abnormal_count,
            "create_at": self.create_at,
            "update_at": self.update_at,
        }

    def detail(self) -> dict[str, Any]:
        """The job as the show call returns it: the record plus items, tasks, template_id."""
        out = self.record()
        out["items"] = list(self.items)
        out["tasks"] = [
            {"server_id": server_id, "status": self.status} for server_id in self.server_ids
        ]
        out["template_id"] = self.template_id
        return out


@dataclass(slots=True)
class JobStore:
    """Jobs that exist, in creation order, and the ids deleted so far."""

    seed: int = 0
    jobs: dict[str, Job] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    delete_counts: dict[str, int] = field(default_factory=dict)
    sent_counts: dict[str, int] = field(default_factory=dict)  # ids named in accepted DELETEs
    _rng: random.Random = field(init=False, repr=False)
    _seq: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        # Its own stream, apart from the fault RNG, so the jobs do not depend on the calls.
        self._rng = random.Random(f"jobs-{self.seed}")

    def __repr__(self) -> str:
        return f"JobStore(seed={self.seed}, jobs={len(self.jobs)}, deleted={len(self.deleted)})"

    def _new_id(self) -> str:
        # uuid.UUID(int=..., version=4), formatted by hand: benchmarks create 10^5 jobs.
        n = (self._rng.getrandbits(128) & _UUID_CLEAR) | _UUID4_BITS
        h = f"{n:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def generate(self, n: int, **fields: Any) -> list[str]:
        """Create ``n`` jobs from the seeded RNG; ``fields`` pins any of :data:`OVERRIDABLE`."""
        unknown = set(fields) - OVERRIDABLE
        if unknown:
            raise TypeError(f"unknown job fields: {sorted(unknown)}")
        if n < 0:
            raise ValueError(f"cannot create {n} jobs")
        rng = self._rng
        created: list[str] = []
        for _ in range(n):
            self._seq += 1
            job_type = JOB_TYPES[rng.randrange(4)]
            status = _STATUS_TABLE[rng.randrange(len(_STATUS_TABLE))]
            create_at = JOBS_EPOCH_MS - rng.randrange(SPREAD_MS)
            update_at = min(JOBS_EPOCH_MS, create_at + rng.randrange(_MAX_RUN_MS))
            values: dict[str, Any] = {
                "id": self._new_id(),
                "name": f"{job_type.lower().replace('_', '-')}-{self._seq:06d}",
                "user_name": _USERS[rng.randrange(len(_USERS))],
                "description": f"simulated {job_type} job",
                "type": job_type,
                "status": status,
                "abnormal_count": rng.randint(1, 5) if status == "FAILED" else 0,
                "create_at": create_at,
                "update_at": update_at,
                "server_ids": (self._new_id(),),
            }
            values.update(fields)
            job = Job(**values)
            self.jobs[job.id] = job
            created.append(job.id)
        return created

    def create(
        self,
        *,
        name: str,
        description: str,
        job_type: str,
        server_ids: Iterable[str],
        items: Iterable[Any],
        user_name: str,
        now_ms: int,
    ) -> Job:
        """A job made by the create call: PROCESSING, created now."""
        self._seq += 1
        job = Job(
            id=self._new_id(),
            name=name,
            user_name=user_name,
            description=description,
            type=job_type,
            status="PROCESSING",
            abnormal_count=0,
            create_at=now_ms,
            update_at=now_ms,
            server_ids=tuple(server_ids),
            items=tuple(items),
        )
        self.jobs[job.id] = job
        return job

    def delete(self, ids: Iterable[str]) -> list[Job]:
        """Delete the ids that exist; the others (never were, or already gone) are skipped."""
        removed: list[Job] = []
        jobs = self.jobs
        sent = self.sent_counts
        for job_id in ids:
            sent[job_id] = sent.get(job_id, 0) + 1
            job = jobs.pop(job_id, None)
            if job is None:
                continue
            removed.append(job)
            self.deleted.add(job_id)
            self.delete_counts[job_id] = self.delete_counts.get(job_id, 0) + 1
        return removed

    def set_status(self, job_id: str, status: str) -> None:
        """Change one job's status (``KeyError`` if it does not exist)."""
        self.jobs[job_id] = replace(self.jobs[job_id], status=status)

    def query(self, filters: Mapping[str, str]) -> list[Job]:
        """Jobs matching every filter exactly; ``visible`` compares as true/false."""
        found: Iterable[Job] = self.jobs.values()
        job_id = filters.get("id")
        if job_id is not None:
            one = self.jobs.get(job_id)
            found = () if one is None else (one,)
        for key in ("name", "type", "status"):
            wanted = filters.get(key)
            if wanted is not None:
                found = [job for job in found if getattr(job, key) == wanted]
        visible = filters.get("visible")
        if visible is not None:
            flag = visible.lower() == "true"
            found = [job for job in found if job.visible is flag]
        return list(found)
