"""serve's Prometheus metrics: their own registry, every label value known in advance.

A registry of our own (not prometheus_client's global one) keeps the exposition to what we
define, and lets tests build as many as they like. Every label takes values from a small
fixed set, and each series is created at start-up, so the number of series never changes
with traffic: a dashboard sees zeros instead of gaps, and no id ever becomes a label.

``MeteredTransport`` wraps the dispatcher's ``Transport`` to time and classify every API
call without touching the client: the error type says the status class.
"""

from __future__ import annotations

import time
from collections import Counter as CountOf
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.clock import Clock
from worker.errors import (
    ApiError,
    ApiTimeout,
    MalformedResponse,
    NetworkError,
    ThrottledError,
    TlsError,
)
from worker.types import DeleteResult, JobRecord, Outcome

if TYPE_CHECKING:
    from worker.api.client import Api, JobPage

T = TypeVar("T")

PREFIX = "devserver_reaper_"
CALLS = ("delete", "show", "list")
STATUS_CLASSES = ("2xx", "4xx", "5xx", "timeout", "network", "malformed", "tls", "other")
RETRY_REASONS = ("throttled", "server_error", "network", "timeout", "malformed", "transient")
DEAD_REASONS = ("invalid", "unreadable", "max_deliveries")
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def status_class(error: ApiError | None) -> str:
    """The ``status_class`` label of one call: from the HTTP status, else the error type."""
    if error is None:
        return "2xx"
    status = error.http_status
    if status is not None and 200 <= status < 600:
        return f"{status // 100}xx"
    if isinstance(error, ApiTimeout):
        return "timeout"
    if isinstance(error, NetworkError):
        return "network"
    if isinstance(error, MalformedResponse):
        return "malformed"
    if isinstance(error, TlsError):
        return "tls"
    return "other"


class ServiceMetrics:
    """The metric objects. Methods take label values from the fixed sets above."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.by_outcome: CountOf[str] = CountOf()
        """Ids by outcome since start, as plain numbers (for ``serve.stats``)."""
        r = self.registry
        self.ids = Counter(PREFIX + "ids", "Ids by terminal outcome", ["outcome"], registry=r)
        self.api_calls = Counter(
            PREFIX + "api_calls", "API calls by call and status class",
            ["call", "status_class"], registry=r,
        )  # fmt: skip
        self.api_duration = Histogram(
            PREFIX + "api_call_duration_seconds", "API call duration",
            ["call"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.retries = Counter(
            PREFIX + "retries", "Batch retries by reason", ["reason"], registry=r
        )
        self.throttled = Counter(PREFIX + "throttled", "API calls answered 429", registry=r)
        self.dead_lettered = Counter(
            PREFIX + "dead_lettered", "Stream entries dead-lettered by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            PREFIX + "batch_size", "Ids per batch sent", buckets=BATCH_BUCKETS, registry=r
        )
        self.inflight = Gauge(PREFIX + "inflight_calls", "API calls in flight", registry=r)
        self.consumer_lag = Gauge(
            PREFIX + "consumer_lag", "Entries in the stream not yet read by the group", registry=r
        )
        self.pending = Gauge(
            PREFIX + "pending_entries", "Entries read by the group but not acknowledged", registry=r
        )
        self.ready = Gauge(
            PREFIX + "ready", "1 when this replica takes work (what /readyz says, Redis as last "
            "found)", registry=r,
        )  # fmt: skip
        self.credentials_refused = Gauge(
            PREFIX + "credentials_refused",
            "1 while the API refuses the credentials (401/403) or the project (its 404)",
            registry=r,
        )
        self.redis_errors = Counter(
            PREFIX + "redis_errors", "Redis calls that failed for want of Redis (then retried)",
            registry=r,
        )  # fmt: skip
        self.last_success = Gauge(
            PREFIX + "last_success_timestamp_seconds", "Unix time of the last successful API call",
            registry=r,
        )  # fmt: skip
        for outcome in Outcome:
            self.ids.labels(outcome.value)
        for call in CALLS:
            self.api_duration.labels(call)
            for cls in STATUS_CLASSES:
                self.api_calls.labels(call, cls)
        for reason in RETRY_REASONS:
            self.retries.labels(reason)
        for reason in DEAD_REASONS:
            self.dead_lettered.labels(reason)

    def outcome(self, outcome: Outcome, n: int = 1) -> None:
        self.ids.labels(outcome.value).inc(n)
        self.by_outcome[outcome.value] += n

    def retry(self, reason: str) -> None:
        self.retries.labels(reason if reason in RETRY_REASONS else "transient").inc()

    def dead(self, reason: str) -> None:
        self.dead_lettered.labels(reason).inc()

    def call(self, call: str, error: ApiError | None, duration_s: float, wall: float) -> None:
        self.api_calls.labels(call, status_class(error)).inc()
        self.api_duration.labels(call).observe(max(0.0, duration_s))
        if isinstance(error, ThrottledError):
            self.throttled.inc()
        if error is None:
            self.last_success.set(wall)

    def __repr__(self) -> str:
        return f"ServiceMetrics(series={sum(len(m.samples) for m in self.registry.collect())})"


class MeteredTransport:
    """The API client, timed and counted; ``observe`` hears every outcome.

    ``observe`` lets the health state learn that the credentials were refused (or work
    again) from the calls themselves, without the dispatcher knowing about health.
    """

    def __init__(
        self,
        inner: Api,
        metrics: ServiceMetrics,
        clock: Clock,
        *,
        observe: Callable[[ApiError | None], None] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._inner = inner
        self._metrics = metrics
        self._clock = clock
        self._observe = observe
        self._wall = wall
        self.calls = 0

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult:
        return await self._timed("delete", lambda: self._inner.delete_jobs(ids))

    async def get_job(self, job_id: str) -> JobRecord:
        return await self._timed("show", lambda: self._inner.get_job(job_id))

    async def list_jobs(self, **filters: str | int | bool) -> JobPage:
        return await self._timed("list", lambda: self._inner.list_jobs(**filters))

    async def _timed(self, call: str, send: Callable[[], Awaitable[T]]) -> T:
        started = self._start()
        try:
            answer = await send()
        except ApiError as exc:
            self._end(call, started, exc)
            raise
        except BaseException:
            self._metrics.inflight.dec()
            raise
        self._end(call, started, None)
        return answer

    def _start(self) -> float:
        self.calls += 1
        self._metrics.inflight.inc()
        return self._clock.now()

    def _end(self, call: str, started: float, error: ApiError | None) -> None:
        self._metrics.inflight.dec()
        self._metrics.call(call, error, self._clock.now() - started, self._wall())
        if self._observe is not None:
            self._observe(error)

    def __repr__(self) -> str:
        return f"MeteredTransport(calls={self.calls}, inner={self._inner!r})"
