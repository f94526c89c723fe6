"""The structured events of SPEC.md, one method each, so their fields live in one place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from worker.intake import escape
from worker.types import Outcome, Rejection, Result


class EventLog:
    """Writes ``job.*``, ``batch.retry`` and ``run.summary`` through structlog.

    ``run_id`` (and anything else the command binds) comes from structlog's context.
    """

    def __init__(self, logger: Any | None = None) -> None:
        # bind() resolves structlog's lazy proxy once, instead of on every event of a run.
        self._log = logger if logger is not None else structlog.get_logger().bind()

    def result(self, result: Result) -> None:
        log = self._log
        outcome = result.outcome
        if outcome is Outcome.DELETED:
            fields = result.record.event_fields() if result.record else {"job_id": result.job_id}
            log.info(
                "job.deleted", **fields, batch_id=result.batch_id, request_id=result.request_id
            )
        elif outcome is Outcome.ABSENT:
            log.info("job.absent", job_id=result.job_id, batch_id=result.batch_id)
        elif outcome is Outcome.FAILED:
            log.warning(
                "job.failed",
                job_id=result.job_id,
                http_status=result.http_status,
                error_code=result.error_code,
                error_msg=result.error_msg,
                request_id=result.request_id,
                attempts=result.attempts,
                batch_id=result.batch_id,
            )
        elif outcome is Outcome.SKIPPED:
            log.info("job.skipped", job_id=result.job_id, reason=result.reason)
        else:
            log.warning(
                "job.rejected", job_id=escape(result.job_id), line=result.line, reason=result.reason
            )

    def rejected(self, rejection: Rejection) -> None:
        self._log.warning(
            "job.rejected",
            job_id=escape(rejection.raw),
            line=rejection.line,
            reason=rejection.reason,
        )

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
