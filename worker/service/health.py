"""``/healthz``, ``/readyz`` and ``/metrics`` on serve's HTTP port (aiohttp.web).

Two questions Kubernetes asks, kept apart on purpose:

- **live** (``/healthz``): is the event loop turning? A heartbeat task of the service marks
  progress every second or so, whatever the loop is waiting for: a Retry-After, a backoff,
  the rate limit, a Redis outage or a pause on refused credentials are waits it knows the
  end of (or waits out unready), not hangs, and a restart would not shorten them. No
  heartbeat for ``stale_after`` seconds means the event loop is stuck: restart it.
- **ready** (``/readyz``): should this replica get work? Redis answers ``PING``, the last
  API call was not refused for credentials (401/403) or for a project or path the gateway
  does not know (its 404, ``NoSuchApi``), the queue's keys are streams (not replaced by
  another type while it ran), and it is not draining after SIGTERM.
  Unready is not unhealthy: a replica paused on a 401 is alive and is not restarted in a
  loop; it waits, unready, until the credentials work again.

The port is served from the start, before Redis has answered (``Health.starting`` says
what start-up waits for): live, since answering at all is the loop turning, and unready
with that reason, instead of refusing connections for the 30 s start-up may wait.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import anyio
import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.clock import Clock
from worker.errors import ApiError, AuthError, NoSuchApi
from worker.service.metrics import ServiceMetrics


class Health:
    """What the probes report. The service and the transport write it; handlers read it."""

    def __init__(self, clock: Clock, *, stale_after: float) -> None:
        self._clock = clock
        self.stale_after = stale_after
        self.last_progress = clock.now()
        self.auth_refused = False
        self.queue_ok = True
        self.draining = False
        self.loop_running = False
        self.starting: str | None = None
        """What start-up waits for (Redis), or None once the service runs."""

    def progress(self) -> None:
        self.last_progress = self._clock.now()

    def observe_call(self, error: ApiError | None) -> None:
        """Every API call's outcome: a 401/403, or the gateway's 404 for a project or path it
        does not know, makes us unready; any other answer (a success, or another error from
        a server that accepted the keys and the project) clears it."""
        if isinstance(error, AuthError | NoSuchApi):
            self.auth_refused = True
        elif error is None or error.http_status is not None:
            self.auth_refused = False

    @property
    def live(self) -> bool:
        if self.starting is not None:  # no heartbeat yet; that it answers is the loop turning
            return True
        return self.loop_running and self._clock.now() - self.last_progress <= self.stale_after

    def __repr__(self) -> str:
        idle = self._clock.now() - self.last_progress
        return (
            f"Health(live={self.live}, idle_s={idle:.1f}, auth_refused={self.auth_refused}, "
            f"queue_ok={self.queue_ok}, draining={self.draining}, starting={self.starting!r})"
        )


HEADER_TIMEOUT = 10.0
"""Seconds a connection has to send a whole request's headers, from its start or from the
answer before: a client sending one header line a second is dropped, not kept forever."""

LIMITS = {"max_line_size": 4096, "max_field_size": 4096, "max_headers": 32}
"""Request line, header size and header count: the probes and a scraper send a few short
headers; anything bigger is refused (400) before a handler runs."""

BODY_LIMIT = 1024
"""Bytes of body a request may carry: the three endpoints are GETs and read none."""


class AccessLog(AbstractAccessLogger):
    """One ``http.access`` event per request, at debug level (the probes call every few
    seconds), in the log's own format."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        structlog.get_logger("devserver_reaper").debug(
            "http.access",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_s=round(time, 4),
            remote=request.remote,
        )

    @property
    def enabled(self) -> bool:
        return True


def http_runner(app: web.Application) -> web.AppRunner:
    """The runner of the health server, with its limits: the header timeout (through
    aiohttp's keep-alive timer, which also runs before the first request is complete), the
    header and body sizes, and access and error logs through structlog."""
    return web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=1.0,
        access_log_class=AccessLog,
        keepalive_timeout=HEADER_TIMEOUT,
        **LIMITS,
    )


def build_app(
    health: Health,
    metrics: ServiceMetrics,
    *,
    ping: Callable[[], Awaitable[object]],
    refresh: Callable[[], Awaitable[None]] | None = None,
    ping_timeout: float = 1.0,
) -> web.Application:
    """The three endpoints. ``ping`` checks Redis; ``refresh`` updates gauges before a scrape."""

    async def healthz(request: web.Request) -> web.Response:
        status = 200 if health.live else 503
        return web.json_response({"live": health.live}, status=status)

    async def readyz(request: web.Request) -> web.Response:
        redis_ok = False
        with anyio.move_on_after(ping_timeout):
            try:
                await ping()
                redis_ok = True
            except Exception:  # noqa: BLE001 - any failure to answer is "not reachable"
                redis_ok = False
        body: dict[str, object] = {
            "redis": redis_ok,
            "credentials": not health.auth_refused,
            "stream": health.queue_ok,
            "draining": health.draining,
        }
        ready = redis_ok and not health.auth_refused and health.queue_ok and not health.draining
        if health.starting is not None:
            body["starting"] = health.starting
            ready = False
        return web.json_response(body | {"ready": ready}, status=200 if ready else 503)

    async def metrics_handler(request: web.Request) -> web.Response:
        if refresh is not None:
            # Stale gauges beat a failed scrape: any failure to refresh keeps the last values.
            with anyio.move_on_after(ping_timeout), contextlib.suppress(Exception):
                await refresh()
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=BODY_LIMIT)
    # HEAD too: a load balancer's HTTP health check may be set to HEAD (Huawei ELB's
    # ``http_method`` takes GET or HEAD), and a 405 there marks a live worker down.
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler, allow_head=False)
    return app
