"""The structured events of docs/reference.md, one method each; the per-job events' fields are
:mod:`worker.outcomes.schema`'s.

A run writes one ``job.*`` event per id, so :meth:`EventLog.results` and
:meth:`EventLog.rejections` take a whole batch: given a :class:`LineSink` (the command passes
``logsetup.json_sink()``), and while that JSON output is still in force, they write it
themselves (one timestamp, ``orjson`` per event, one write), in the same bytes structlog
would write; otherwise (console, ``capture_logs``, a logger of the caller's, no sink) each
event goes through structlog as before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import orjson
import structlog

from worker.input.intake import escape
from worker.outcomes.schema import ADDED, DELETED_WITHOUT_RECORD, EVENT_FIELDS, JOB_EVENTS
from worker.types import Outcome, Rejection, Result, target_fields

_INFO, _WARNING = logging.INFO, logging.WARNING
_LEVEL_NAMES = {_INFO: "info", _WARNING: "warning"}


def result_event(result: Result) -> tuple[str, int, dict[str, Any]]:
    """``(event, level, fields)`` of one terminal outcome; its project and region after its
    own fields when its line named them (``schema.TARGET``)."""
    if result.target is None:
        return _result_event(result)
    name, level, fields = _result_event(result)
    fields.update(target_fields(result.target))
    return name, level, fields


def _result_event(result: Result) -> tuple[str, int, dict[str, Any]]:
    outcome = result.outcome
    if outcome is Outcome.DELETED:
        record, confirmed = result.record, result.confirmed
        if record is None:
            values = (result.job_id, result.batch_id, result.request_id, confirmed)
            return "job.deleted", _INFO, dict(zip(DELETED_WITHOUT_RECORD, values, strict=True))
        fields = record.event_fields(
            batch_id=result.batch_id, request_id=result.request_id, confirmed=confirmed
        )
        return "job.deleted", _INFO, fields
    if outcome is Outcome.ABSENT:
        return _event("job.absent", _INFO, result.job_id, result.batch_id)
    if outcome is Outcome.FAILED:
        r = result
        return _event(
            "job.failed", _WARNING, r.job_id, r.http_status, r.error_code, r.error_msg,
            r.request_id, r.attempts, r.batch_id,
        )  # fmt: skip
    if outcome is Outcome.SKIPPED:
        return _event("job.skipped", _INFO, result.job_id, result.reason)
    return _rejected(escape(result.job_id), result.line, result.reason, result.raw)


def _event(name: str, level: int, *values: Any) -> tuple[str, int, dict[str, Any]]:
    """An event of :data:`~worker.outcomes.schema.JOB_EVENTS` from its values, in its order."""
    return name, level, dict(zip(JOB_EVENTS[name], values, strict=True))


def rejection_event(rejection: Rejection) -> tuple[str, int, dict[str, Any]]:
    text = None if rejection.text is None else escape(rejection.text)
    return _rejected(escape(rejection.raw), rejection.line, rejection.reason, text)


def _rejected(
    job_id: str, line: int | None, reason: str | None, raw: str | None
) -> tuple[str, int, dict[str, Any]]:
    """``job.rejected``: ``raw`` (the line's text) only for a line whose id could be read,
    ``job_id`` then that id; else ``job_id`` is the line's text, as it always was."""
    name, level, fields = _event("job.rejected", _WARNING, job_id, line, reason, raw)
    if raw is None:
        del fields["raw"]
    return name, level, fields


class LineSink(Protocol):
    """Where structlog's JSON lines go, for a batch of events to be written there at once
    (``logsetup.JsonSink``)."""

    @property
    def min_level(self) -> int:
        """The lowest level written (``logging.INFO`` ...)."""
        ...

    def active(self) -> bool:
        """Is this output still structlog's configuration, untouched?"""
        ...

    def write(self, data: bytes) -> None:
        """Write whole lines."""
        ...

    def timestamp(self) -> str:
        """The ``timestamp`` structlog would add now."""
        ...


class EventLog:
    """Writes ``job.*``, ``batch.retry`` and ``run.summary`` through structlog.

    ``run_id`` (and anything else the command binds) comes from structlog's context.
    ``sink``: where a batch of per-job events may be written at once, while it is active.
    """

    def __init__(self, logger: Any | None = None, *, sink: LineSink | None = None) -> None:
        # bind() resolves structlog's lazy proxy once, instead of on every event of a run.
        self._log = logger if logger is not None else structlog.get_logger().bind()
        # A caller's logger always gets every event: the sink is for structlog's own output.
        self._sink = sink if logger is None else None
        self.fast_batches = 0  # batches written by the fast path (for tests and repr)

    def result(self, result: Result) -> None:
        self._emit(*result_event(result))

    def results(self, results: Sequence[Result]) -> None:
        """Every outcome of a batch, in order."""
        self._many([result_event(result) for result in results])

    def rejected(self, rejection: Rejection) -> None:
        self._emit(*rejection_event(rejection))

    def rejections(self, rejections: Sequence[Rejection]) -> None:
        self._many([rejection_event(rejection) for rejection in rejections])

    def retry(self, batch_id: str, attempt: int, delay_s: float, reason: str) -> None:
        self._log.info(
            "batch.retry", batch_id=batch_id, attempt=attempt, delay_s=round(delay_s, 3),
            reason=reason,
        )  # fmt: skip

    def summary(self, fields: Mapping[str, Any]) -> None:
        self._log.info("run.summary", **fields)

    def note(self, event: str, **fields: Any) -> None:
        """Any other event (``run.started``, ``run.interrupted`` ...)."""
        self._log.info(event, **fields)

    def warn(self, event: str, **fields: Any) -> None:
        self._log.warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log.error(event, **fields)

    def _emit(self, event: str, level: int, fields: dict[str, Any]) -> None:
        method = self._log.info if level == _INFO else self._log.warning
        method(event, **fields)

    def _many(self, events: list[tuple[str, int, dict[str, Any]]]) -> None:
        sink = self._sink
        if sink is None or not events or not sink.active():
            for name, level, fields in events:
                self._emit(name, level, fields)
            return
        # The keys in structlog's order: the fields, event, context (a field of the same
        # name wins), level, timestamp; one timestamp for the batch. Everything after the
        # fields is the same for every event of one name in the batch, so it is serialised
        # once (a "tail") and joined onto each event's serialised fields.
        context = structlog.contextvars.get_contextvars()
        reserved = context.keys() | _ADDED
        shadows = not reserved.isdisjoint(EVENT_FIELDS)  # else no event's field can
        stamp = sink.timestamp()
        tails: dict[tuple[str, int], bytes] = {}
        lines: list[bytes] = []
        for name, level, fields in events:
            if level < sink.min_level:
                continue
            try:
                if shadows and fields.keys() & reserved:  # a field shadows what is added
                    whole = _added(dict(fields), name, level, context, stamp)
                    lines.append(orjson.dumps(whole, default=str))
                    continue
                tail = tails.get((name, level))
                if tail is None:
                    rest = orjson.dumps(_added({}, name, level, context, stamp), default=str)
                    tail = tails[name, level] = b"," + rest[1:]
                head = orjson.dumps(fields, default=str)
                lines.append(head[:-1] + tail if len(head) > 2 else b"{" + tail[1:])
            except orjson.JSONEncodeError:  # let structlog fail (or not) exactly as it would
                if lines:
                    sink.write(b"\n".join(lines) + b"\n")
                    lines = []
                self._emit(name, level, fields)
        if lines:
            sink.write(b"\n".join(lines) + b"\n")
        self.fast_batches += 1

    def __repr__(self) -> str:
        return f"EventLog(fast_batches={self.fast_batches}, sink={self._sink!r})"


_ADDED = frozenset(ADDED)


def _added(
    line: dict[str, Any], name: str, level: int, context: dict[str, Any], stamp: str
) -> dict[str, Any]:
    """What structlog's chain adds after an event's own fields, as it adds it: the event,
    the context (a field of the same name wins), the level, the timestamp."""
    line["event"] = name
    for key, value in context.items():
        line.setdefault(key, value)
    line["level"] = _LEVEL_NAMES[level]
    line["timestamp"] = stamp
    return line
