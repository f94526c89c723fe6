"""The values that pass between stages: frozen, slotted, and free of I/O."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
PROJECT_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")


class Outcome(StrEnum):
    """The terminal outcome of one id. Every id read ends with exactly one."""

    DELETED = "deleted"
    ABSENT = "absent"
    FAILED = "failed"
    REJECTED = "rejected"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A valid id read from the input, with where it was read."""

    job_id: str
    line: int


@dataclass(frozen=True, slots=True)
class Rejection:
    """An input entry that is not a valid id; it is never sent."""

    raw: str
    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class Batch:
    """Ids to delete in one call. ``batch_id`` names it in events and the ledger."""

    batch_id: str
    ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)


def _parse_time(value: object) -> datetime | None:
    """``create_at``/``update_at``: epoch milliseconds (int or digits) or an ISO-8601 string."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ValueError(f"not a time: {value!r}")


def iso(value: datetime | None) -> str | None:
    """ISO-8601 in UTC with a ``Z``, milliseconds kept."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job as the API returns it."""

    id: str
    name: str | None = None
    user_name: str | None = None
    description: str | None = None
    type: str | None = None
    status: str | None = None
    abnormal_count: int | None = None
    create_at: datetime | None = None
    update_at: datetime | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> JobRecord:
        """Parse an API record; ``ValueError`` when it has no usable id or a bad field."""
        job_id = data.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise ValueError("job record without an id")
        count = data.get("abnormal_count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise ValueError(f"abnormal_count is not an integer: {count!r}")

        def text(key: str) -> str | None:
            value = data.get(key)
            return None if value is None else str(value)

        return cls(
            id=job_id,
            name=text("name"),
            user_name=text("user_name"),
            description=text("description"),
            type=text("type"),
            status=text("status"),
            abnormal_count=count,
            create_at=_parse_time(data.get("create_at")),
            update_at=_parse_time(data.get("update_at")),
        )

    def event_fields(self) -> dict[str, Any]:
        """The fields of a ``job.deleted`` event, times as ISO-8601 UTC."""
        return {
            "job_id": self.id,
            "name": self.name,
            "user_name": self.user_name,
            "description": self.description,
            "type": self.type,
            "status": self.status,
            "abnormal_count": self.abnormal_count,
            "create_at": iso(self.create_at),
            "update_at": iso(self.update_at),
        }


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """A successful DELETE answer: the records the server says it deleted."""

    records: tuple[JobRecord, ...]
    request_id: str | None
    http_status: int = 200


@dataclass(frozen=True, slots=True)
class Result:
    """The terminal outcome of one id, as written to ``--results`` and the ledger."""

    job_id: str
    outcome: Outcome
    attempts: int = 0
    batch_id: str | None = None
    http_status: int | None = None
    error_code: str | None = None
    error_msg: str | None = None
    request_id: str | None = None
    reason: str | None = None
    line: int | None = None
    record: JobRecord | None = None

    def row(self) -> dict[str, Any]:
        """One line of the results file (SPEC.md's fields, plus ``reason``)."""
        return {
            "job_id": self.job_id,
            "outcome": self.outcome.value,
            "attempts": self.attempts,
            "batch_id": self.batch_id,
            "http_status": self.http_status,
            "error_code": self.error_code,
            "error_msg": self.error_msg,
            "request_id": self.request_id,
            "reason": self.reason,
        }
