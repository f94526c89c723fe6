"""The fields of each per-job event, declared once.

The event writer (:mod:`worker.outcomes.events`) builds its events from these tuples, the
results file and ``report`` take their columns from them (``RESULT_COLUMNS``), a test checks
every event and results line a real run writes against them, and another holds the events
table of docs/reference.md to them. A field is added here, or nowhere.

Each tuple is the fields an event may carry, in the order they are written; structlog then
adds ``event``, the bound context (``run_id``) and ``level`` and ``timestamp`` (``ADDED``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

RECORD = (
    "job_id", "name", "user_name", "description", "type", "status", "abnormal_count",
    "create_at", "update_at",
)  # fmt: skip
"""A job's record, as ``job.deleted`` carries it (``JobRecord.event_fields``)."""

JOB_EVENTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "job.deleted": (*RECORD, "batch_id", "request_id", "confirmed"),
    "job.absent": ("job_id", "batch_id"),
    "job.failed": (
        "job_id", "http_status", "error_code", "error_msg", "request_id", "attempts", "batch_id",
    ),
    "job.skipped": ("job_id", "reason"),
    "job.rejected": ("job_id", "line", "reason", "raw"),
})  # fmt: skip
"""One terminal outcome of one id each."""

DELETED_WITHOUT_RECORD = ("job_id", "batch_id", "request_id", "confirmed")
"""What ``job.deleted`` carries when no record of the job is known (an unconfirmed deletion
no look-up read): the fields of ``job.deleted`` that are not the record's, and the id."""

TARGET = ("project_id", "region")
"""What every per-job event carries after its own fields when its input line named a project,
region or endpoint (``Result.target``); an event of the default project carries neither."""

RESULT_COLUMNS = (
    "job_id",
    "outcome",
    *dict.fromkeys(
        field for fields in JOB_EVENTS.values() for field in fields if field not in RECORD
    ),
)
"""The columns of ``--results`` and ``report``: the id, its outcome, then every field of the
per-job events that is not the job's record, in the order the events first declare them.
Every line carries each of them (``null`` where its outcome has none) but ``line``, which
only a rejected line has, and ``raw``, which only a rejected line whose id could be read has
(its ``job_id`` is then that id); ``TARGET`` follows when its input line named one."""

ADDED = ("event", "level", "timestamp")
"""What structlog's chain adds to every event, besides the bound context."""

EVENT_FIELDS = frozenset(field for fields in (*JOB_EVENTS.values(), TARGET) for field in fields)
"""Every field a per-job event can carry."""
