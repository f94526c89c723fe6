"""The values that pass between stages: slotted, free of I/O, and never changed once made.

Most are frozen. The three made once per id per stage (:class:`Candidate`, :class:`JobRecord`,
:class:`Result`) are not: a frozen dataclass's ``__init__`` sets each field through
``object.__setattr__``, measured at 1.3 us against 0.4 us for eleven fields, and a run of a
million ids makes three million of them. Nothing assigns to them after they are made.
"""

from __future__ import annotations

import re
from collections.abc import Container, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from worker.outcomes.schema import RESULT_COLUMNS

if TYPE_CHECKING:
    from worker.errors import ApiError
    from worker.targets import Address, Target

JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
PROJECT_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def holds_control(text: str) -> bool:
    """Does ``text`` hold a control character (C0 or DEL), which no HTTP header carries?"""
    return _CONTROL_RE.search(text) is not None


class Outcome(StrEnum):
    """The terminal outcome of one id. Every id read ends with exactly one."""

    DELETED = "deleted"
    ABSENT = "absent"
    FAILED = "failed"
    REJECTED = "rejected"
    SKIPPED = "skipped"


@dataclass(slots=True)
class Candidate:
    """A valid id read from the input, with where it was read.

    ``address``: the project, region or endpoint its line named (None: none, the settings'
    default); ``target``: where its calls go once that is resolved (None: the default)."""

    job_id: str
    line: int
    address: Address | None = None
    target: Target | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """An input entry that is not a valid id, or a valid id its line cannot be sent with (a
    bad project, region or endpoint); it is never sent.

    ``raw``: the id when the line's id could be read, else the line's text. ``text``: the
    line's text when ``raw`` is its id (None otherwise), so a script finds the id by its
    ``job_id`` and a person the line as written."""

    raw: str
    line: int
    reason: str
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """Ids to delete in one call. ``batch_id`` names it in events and the ledger.

    ``unsure``: ids an earlier run on the ledger sent without hearing the answer (it died
    with them in flight), or an earlier round of the guard's whose check then expired, so
    the job may be gone by our own hand (and they are counted against the cap already).
    ``known``: records of its jobs already read (a protection or plan look-up), for a
    deletion whose answer is lost to still say what was deleted. ``fresh_until``: when the
    guard checked the jobs (read and found them deletable), the clock time after which that
    check is too old for their DELETE to go out on it."""

    batch_id: str
    ids: tuple[str, ...]
    unsure: frozenset[str] = frozenset()
    known: Mapping[str, JobRecord] = field(default_factory=dict)
    fresh_until: float | None = None
    target: Target | None = None
    """Where its ids' calls go; None: the settings' default (its lines named none)."""
    look: bool = False
    """Its ids are read (the show call), never deleted: ids of a ``serve`` entry given up
    past ``max_deliveries`` that none of its calls sent. Found gone they are ``absent``
    (another entry's call may have deleted the job: ``failed`` would say it is there);
    still there, ``failed``."""
    wall_until: float | None = None
    """The system's time (epoch seconds) after which no attempt of it goes out: its plan's
    ``expires_at``, checked on the system's clock as ``fresh_until`` is on the run's."""

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


# Epoch milliseconds whose seconds stay below 2**32 (1833 to 2106) are kept as ints: there
# ``datetime.fromtimestamp(ms / 1000)`` is exact to the millisecond (the float's error is
# under half a microsecond), so the integer arithmetic of :func:`_ms_iso` gives the very
# string ``iso(_parse_time(ms))`` gives. Anything else is parsed to a datetime at once.
_EXACT_MS = 2**32 * 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAYS: dict[int, str] = {}  # day number -> "YYYY-MM-DD"; a run's jobs span few days
_DAYS_KEPT = 4096
_MINUTES = tuple(f"T{h:02d}:{m:02d}:" for h in range(24) for m in range(60))
_SECONDS = tuple(f"{s:02d}." for s in range(60))
_MILLIS = tuple(f"{ms:03d}Z" for ms in range(1000))  # joining these beats format specs 2:1

Stamp = int | datetime | None
"""A job time as kept in a :class:`JobRecord`: epoch milliseconds, or a parsed datetime."""


def _stamp(value: object) -> Stamp:
    """Validate a time as :func:`_parse_time` does, without building a datetime for the
    common case (epoch milliseconds, as int or digits); raises what it raises."""
    if type(value) is int:
        if -_EXACT_MS < value < _EXACT_MS:
            return value
    elif type(value) is str:
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= 13 and int(text) < _EXACT_MS:
            return int(text)
    return _parse_time(value)


def _ms_iso(ms: int) -> str:
    """``iso(datetime.fromtimestamp(ms / 1000, UTC))`` in integer arithmetic."""
    seconds, millis = divmod(ms, 1000)
    day, second = divmod(seconds, 86400)
    date = _DAYS.get(day)
    if date is None:
        if len(_DAYS) >= _DAYS_KEPT:
            _DAYS.clear()
        date = _DAYS[day] = (_EPOCH + timedelta(days=day)).date().isoformat()
    minute, second = divmod(second, 60)
    return date + _MINUTES[minute] + _SECONDS[second] + _MILLIS[millis]


def stamp_iso(value: Stamp) -> str | None:
    """A kept job time as ISO-8601 UTC with milliseconds and a ``Z`` (what :func:`iso` gives)."""
    if value is None or isinstance(value, datetime):
        return iso(value)
    return _ms_iso(value)


def stamp_datetime(value: Stamp) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(value / 1000, tz=UTC)


def _text(value: object) -> str | None:
    return value if value is None or type(value) is str else str(value)


@dataclass(slots=True)
class JobRecord:
    """One job as the API returns it.

    The two times are kept as given when they are epoch milliseconds (``create_stamp``,
    ``update_stamp``) and turned into a datetime (``create_at``) or an ISO string only when
    asked: a run renders hundreds of thousands of them and never compares one."""

    id: str
    name: str | None = None
    user_name: str | None = None
    description: str | None = None
    type: str | None = None
    status: str | None = None
    abnormal_count: int | None = None
    create_stamp: Stamp = None
    update_stamp: Stamp = None

    @property
    def create_at(self) -> datetime | None:
        return stamp_datetime(self.create_stamp)

    @property
    def update_at(self) -> datetime | None:
        return stamp_datetime(self.update_stamp)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> JobRecord:
        """Parse an API record; ``ValueError`` when it has no usable id or a bad field."""
        get = data.get
        job_id = get("id")
        if not isinstance(job_id, str) or not job_id:
            raise ValueError("job record without an id")
        count = get("abnormal_count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise ValueError(f"abnormal_count is not an integer: {count!r}")
        return cls(
            job_id,
            _text(get("name")),
            _text(get("user_name")),
            _text(get("description")),
            _text(get("type")),
            _text(get("status")),
            count,
            _stamp(get("create_at")),
            _stamp(get("update_at")),
        )

    def event_fields(self, **more: Any) -> dict[str, Any]:
        """The fields of a ``job.deleted`` event, times as ISO-8601 UTC, then ``more``."""
        create, update = self.create_stamp, self.update_stamp
        return {
            "job_id": self.id,
            "name": self.name,
            "user_name": self.user_name,
            "description": self.description,
            "type": self.type,
            "status": self.status,
            "abnormal_count": self.abnormal_count,
            "create_at": _ms_iso(create) if type(create) is int else stamp_iso(create),
            "update_at": _ms_iso(update) if type(update) is int else stamp_iso(update),
            **more,
        }


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """A successful DELETE answer: the records the server says it deleted."""

    records: tuple[JobRecord, ...]
    request_id: str | None
    http_status: int = 200
    # False when the envelope says it lists only some of what was deleted (``total`` above
    # the records it holds, or more than one page): a job left out may be gone by this call.
    whole: bool = True
    # How many it deleted and did not list, when the envelope counts them (``total`` less
    # the records it holds); None when it does not say (no ``total``).
    untold: int | None = None


@dataclass(slots=True)
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
    raw: str | None = None
    """For a rejected line whose id could be read (``job_id`` that id): the line's text,
    escaped and bounded."""
    record: JobRecord | None = None
    confirmed: bool = True
    """For ``deleted``: False when the API never returned the job's record (the answer to
    the DELETE that removed it was lost), so the deletion is known only by its absence."""
    target: Target | None = None
    """The project its line named (None: the default, and no ``project_id``/``region``
    fields in its row or event). Set by the journal of its target, once, as it is settled."""

    def row(self) -> dict[str, Any]:
        """One line of ``--results`` and of ``report``: ``schema.RESULT_COLUMNS`` (``line``
        for a rejected line only, and ``raw`` for one whose id could be read), then its
        project and region if its line named them."""
        row = dict(zip(_ROW_COLUMNS, _row_values(self), strict=True))
        row["outcome"] = self.outcome.value
        if self.outcome is not Outcome.DELETED:
            row["confirmed"] = None
        if self.line is not None:
            row["line"] = self.line
        if self.raw is not None:
            row["raw"] = self.raw
        if self.target is not None:
            row.update(target_fields(self.target))
        return row


_ROW_COLUMNS = tuple(column for column in RESULT_COLUMNS if column not in ("line", "raw"))
_row_values = attrgetter(*_ROW_COLUMNS)  # a column is a Result's attribute of the same name


def target_fields(target: Target | None) -> dict[str, str | None]:
    """``project_id`` and ``region`` of an outcome whose line named a target; nothing for
    the default's, so a single-project run's rows and events are as they always were."""
    if target is None:
        return {}
    return {"project_id": target.project_id, "region": target.region}


def doubted(batch: Batch, unsure: set[str]) -> Batch:
    """``batch`` naming those of its ids in ``unsure`` (sent by an earlier run or delivery
    without a readable answer), which are taken out of ``unsure``: each is named once."""
    if not unsure:
        return batch
    named = unsure.intersection(batch.ids)
    if not named:
        return batch
    unsure -= named
    return replace(batch, unsure=frozenset(named | batch.unsure))


def skipped(job_id: str, *, batch: Batch, reason: str, detail: str | None = None) -> Result:
    """An id let go unsent (a dry run, the cap, a protection or plan rule). One an earlier
    run sent without hearing back (``batch.unsure``) keeps an attempt: its job may be gone by
    that run's hand, and the next run on the ledger must still know it (and count it
    against ``--max-deletions``)."""
    return Result(
        job_id=job_id,
        outcome=Outcome.SKIPPED,
        attempts=int(job_id in batch.unsure),
        batch_id=batch.batch_id,
        reason=reason,
        error_msg=detail,
    )


ANSWER_LOST = "answer_lost"
"""The ``reason`` of a deletion known only by the job's absence (``confirmed`` false), and
of a failure of an id sent without a readable answer that could not be read after it
(:func:`unverified`): its job may be gone by that call."""


NOT_LISTED = "not_listed"
"""The ``reason`` of a deletion known only by the job's absence after a DELETE of it was
answered 200 without its record, when that answer cannot be taken as the whole truth: the
run read the job just before that DELETE (it existed then), or the answer said it listed only
some of the jobs it deleted (``DeleteResult.whole`` false)."""


def unverified(
    job_id: str, *, batch_id: str | None, attempts: int, error: ApiError, ours: bool
) -> Result:
    """``failed``: the job could not be read (a 4xx other than 404) before its DELETE, so it
    is not sent. ``ours``: a DELETE of it went out before without a readable answer, so it
    may be gone by that call: ``reason`` says so (``answer_lost``), and a run on the ledger
    that tries it again (``--retry-failed``) knows it sent (found gone, it ends ``deleted``,
    unconfirmed, not ``absent``)."""
    why = ("could not be read after a DELETE of it went unanswered, so not sent again; it "
           "may be gone by that DELETE" if ours else
           "could not be read before deleting, so not deleted")  # fmt: skip
    return refused(job_id, batch_id=batch_id, attempts=attempts, error=error, why=why,
                   reason=ANSWER_LOST if ours else None)  # fmt: skip


def refused(
    job_id: str,
    *,
    batch_id: str | None,
    attempts: int,
    error: ApiError,
    why: str | None = None,
    reason: str | None = None,
) -> Result:
    """``failed`` with the API's ``error`` (its message after ``why``, when given)."""
    said = error.error_msg or str(error)
    return Result(
        job_id=job_id,
        outcome=Outcome.FAILED,
        attempts=attempts,
        batch_id=batch_id,
        http_status=error.http_status,
        error_code=error.error_code,
        error_msg=f"{why}: {said}" if why else said,
        request_id=error.request_id,
        reason=reason,
    )


def gone(
    job_id: str,
    *,
    unsure: Container[str],
    known: Mapping[str, JobRecord],
    batch_id: str | None,
    attempts: int,
    http_status: int | None = 404,
    request_id: str | None = None,
    error_code: str | None = None,
    error_msg: str | None = None,
    reason: str | None = None,
    unlisted: bool = False,
) -> Result:
    """The outcome of a job found gone. ``deleted`` (unconfirmed) when it was ``unsure``:
    sent in an attempt whose answer never arrived whole, here or in a run that died, so
    the likeliest hand that removed it is ours (``answer_lost``); also when ``unlisted``: a
    DELETE of it was answered 200 without its record by an answer that is not the whole
    truth of it (:data:`NOT_LISTED`). ``absent`` otherwise. An unconfirmed deletion carries
    the record when one was read before (``known``), not the 404 that found it gone: it is
    not an error."""
    ours = job_id in unsure or unlisted
    return Result(
        job_id=job_id,
        outcome=Outcome.DELETED if ours else Outcome.ABSENT,
        attempts=attempts,
        batch_id=batch_id,
        http_status=http_status,
        error_code=None if ours else error_code,
        error_msg=None if ours else error_msg,
        request_id=request_id,
        reason=(ANSWER_LOST if job_id in unsure else NOT_LISTED) if ours else reason,
        record=known.get(job_id) if ours else None,
        confirmed=not ours,
    )
