"""serve's Prometheus metrics: their own registry, every label value known in advance.

A registry of our own (not prometheus_client's global one) keeps the exposition to what we
define, and lets tests build as many as they like. Every label takes values from a small
fixed set, and each series of a place is created when the place is first met (the
default's at start-up), so the number of series never grows with traffic: a dashboard sees
zeros instead of gaps, and no id ever becomes a label.

The ``project_id`` and ``region`` labels (ids, API calls, throttled calls, an endpoint's
outage) take their values from the settings, never from what a stream entry says
(:class:`Places`): a project outside ``allowed_projects`` and the default is never sent to
(its entry is dead-lettered), and a region is one of the known regions, the default's, or
``other``. An entry naming a thousand projects or regions adds no series.

``MeteredTransport`` wraps the dispatcher's ``Transport`` to time and classify every API
call without touching the client: the error type says the status class.
"""

from __future__ import annotations

import time
from collections import Counter as CountOf
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from worker.clock import Clock
from worker.errors import (
    ApiError,
    ApiTimeout,
    MalformedResponse,
    NetworkError,
    ThrottledError,
    TlsError,
)
from worker.targets import Target
from worker.types import DeleteResult, JobRecord, Outcome

# No ``_created`` series beside every counter and histogram: each doubled a scrape's series
# to say when the series began counting, which nothing here reads (rate() and increase() see
# a counter's reset without it). prometheus_client keeps this setting per process; serve's
# process exposes only this registry.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

if TYPE_CHECKING:
    from worker.api.client import Api, JobPage

T = TypeVar("T")

PREFIX = "devserver_reaper_"
CALLS = ("delete", "show", "list")
STATUS_CLASSES = ("2xx", "4xx", "5xx", "timeout", "network", "malformed", "tls", "other")
RETRY_REASONS = ("throttled", "server_error", "network", "timeout", "malformed", "transient")
DEAD_REASONS = ("invalid", "unreadable", "max_deliveries", "target")
OTHER = "other"
"""The label value of a project or region outside the configured ones."""
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


class Places:
    """The ``project_id`` and ``region`` label values of a target: bounded by the settings.

    ``projects``: the projects serve may send to (``allowed_projects``, and the default's);
    ``regions``: the region names a label may take (the known regions and the default's).
    Anything else is ``other``; a target named by endpoint alone has region ``""``."""

    __slots__ = ("default", "projects", "regions")

    def __init__(
        self, default: Target | None, projects: Collection[str] = (),
        regions: Collection[str] = (),
    ) -> None:  # fmt: skip
        self.default = default
        mine = () if default is None else (default.project_id,)
        self.projects = frozenset((*projects, *mine))
        here = () if default is None or default.region is None else (default.region,)
        self.regions = frozenset((*regions, *here))

    def of(self, target: Target | None) -> tuple[str, str]:
        """``(project_id, region)`` of ``target`` (None: the default)."""
        place = target if target is not None else self.default
        if place is None:
            return "", ""
        project = place.project_id if place.project_id in self.projects else OTHER
        region = place.region or ""
        if region and region not in self.regions:
            region = OTHER
        return project, region

    def __repr__(self) -> str:
        return f"Places(default={self.default}, projects={len(self.projects)})"


NOWHERE = ("", "")
"""The labels of ids that belong to no project: rejected ones (an invalid id is no job)."""


class ServiceMetrics:
    """The metric objects. Methods take label values from the fixed sets above."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, places: Places | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.places = places if places is not None else Places(None)
        self.by_outcome: CountOf[str] = CountOf()
        """Ids by outcome since start, as plain numbers (for ``serve.stats``)."""
        r = self.registry
        where = ["project_id", "region"]
        self.ids = Counter(
            PREFIX + "ids", "Ids by terminal outcome", ["outcome", *where], registry=r
        )
        self.api_calls = Counter(
            PREFIX + "api_calls", "API calls by call and status class",
            ["call", "status_class", *where], registry=r,
        )  # fmt: skip
        self.api_duration = Histogram(
            PREFIX + "api_call_duration_seconds", "API call duration",
            ["call"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.retries = Counter(
            PREFIX + "retries", "Batch retries by reason", ["reason"], registry=r
        )
        self.throttled = Counter(PREFIX + "throttled", "API calls answered 429", where, registry=r)
        self.api_down = Gauge(
            PREFIX + "api_down",
            "1 while the circuit breaker of the project's endpoint is not closed (its API was "
            "failing when last heard from); its entries wait, the others are served",
            where, registry=r,
        )  # fmt: skip
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
        self._placed: set[tuple[str, str]] = set()
        self.place(None)
        self.ids.labels(Outcome.REJECTED.value, *NOWHERE)
        for call in CALLS:
            self.api_duration.labels(call)
        for reason in RETRY_REASONS:
            self.retries.labels(reason)
        for reason in DEAD_REASONS:
            self.dead_lettered.labels(reason)

    def place(self, target: Target | None) -> tuple[str, str]:
        """The labels of ``target``, its series made (at zero) the first time it is met:
        a dashboard sees zeros instead of gaps."""
        labels = self.places.of(target)
        if labels not in self._placed:
            self._placed.add(labels)
            for outcome in Outcome:
                if outcome is not Outcome.REJECTED:
                    self.ids.labels(outcome.value, *labels)
            for call in CALLS:
                for cls in STATUS_CLASSES:
                    self.api_calls.labels(call, cls, *labels)
            self.throttled.labels(*labels)
            self.api_down.labels(*labels)
        return labels

    def outcome(self, outcome: Outcome, n: int = 1, *, target: Target | None = None) -> None:
        self.ids.labels(outcome.value, *self.place(target)).inc(n)
        self.by_outcome[outcome.value] += n

    def rejected(self, n: int = 1) -> None:
        """Invalid ids, and those of an entry naming a place serve may not send to: they
        belong to no project, and count under empty labels."""
        self.ids.labels(Outcome.REJECTED.value, *NOWHERE).inc(n)
        self.by_outcome[Outcome.REJECTED.value] += n

    def retry(self, reason: str) -> None:
        self.retries.labels(reason if reason in RETRY_REASONS else "transient").inc()

    def dead(self, reason: str) -> None:
        self.dead_lettered.labels(reason).inc()

    def call(
        self, call: str, error: ApiError | None, duration_s: float, wall: float,
        target: Target | None = None,
    ) -> None:  # fmt: skip
        labels = self.place(target)
        self.api_calls.labels(call, status_class(error), *labels).inc()
        self.api_duration.labels(call).observe(max(0.0, duration_s))
        if isinstance(error, ThrottledError):
            self.throttled.labels(*labels).inc()
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
        target: Target | None = None,
    ) -> None:
        """``target``: the project its calls go to, for the labels (None: the default)."""
        self._target = target
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
        self._metrics.call(call, error, self._clock.now() - started, self._wall(), self._target)
        if self._observe is not None:
            self._observe(error)

    def __repr__(self) -> str:
        return f"MeteredTransport(calls={self.calls}, inner={self._inner!r})"
