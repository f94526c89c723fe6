"""``devserver-reaper serve``: consume ids from a Redis Stream until SIGTERM; serve health.

The edge: the service is built by :mod:`worker.assembly` (Redis clients, API client, the
shared rate limiter, the dispatcher, the service loop, the HTTP port); here signals become a
stop event, and how it ended becomes an exit code: 0 after a clean drain, 78 for bad
settings, 69 when Redis cannot be reached at start-up (Kubernetes restarts us with back-off).
Once running, neither a Redis outage nor refused credentials make it exit: it waits, unready.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import anyio
import structlog
from structlog.typing import FilteringBoundLogger

from worker import logsetup, stops, wiring
from worker.assembly import (
    ServeParts,
    build_service,
    build_service_redis,
    serve_places,
    serve_targets,
    service_config,
    start_http,
    started_fields,
)
from worker.errors import (
    AuthError,
    ConfigError,
    ReaperError,
    RedisCertificateRefused,
    TransientError,
)
from worker.exit_codes import ExitCode
from worker.redis_link import trusted_ping
from worker.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from worker.outcomes.events import EventLog
    from worker.service.outage import Outage

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STARTUP_WAIT_S = 30.0
"""How long start-up waits for Redis to answer before exiting 69."""


def main(args: argparse.Namespace, settings: Settings) -> int:
    del args
    _events_for(settings)
    # A service carries on without its event output (its outcomes are in Redis), said once.
    logsetup.when_lost(lambda name, exc: logsetup.tell(
        f"devserver-reaper serve: the events cannot be written to {name} "
        f"({exc.strerror or type(exc).__name__}); carrying on without them"
    ))  # fmt: skip
    structlog.contextvars.bind_contextvars(run_id=f"serve-{settings.consumer}")
    log = structlog.get_logger("devserver_reaper")
    import redis.exceptions

    from worker.pacing.shared import acl_denial
    from worker.service.consumer import not_permitted

    try:
        refuse_run_only(settings)
        settings.require_api()
        endpoint = settings.api_endpoint
        wiring.ensure_project(settings)  # before any call: a missing project is exit 78
        try:
            return anyio.run(serve, settings, endpoint)
        except (redis.exceptions.RedisError, BaseExceptionGroup) as exc:
            denied = acl_denial(exc)  # an ACL short of a right, in a task maybe
            if denied is None:
                raise
            raise not_permitted(settings.stream, denied) from None
    except ConfigError as exc:
        return _said(log, "serve.config_error", exc, ExitCode.CONFIG)
    except AuthError as exc:  # a credential service refused us at start-up
        return _said(log, "serve.credentials_refused", exc, ExitCode.NO_PERMISSION)
    except TransientError as exc:  # a credential service that does not answer
        return _said(log, "serve.credentials_unavailable", exc, ExitCode.UNAVAILABLE)
    except RedisCertificateRefused as exc:  # not waited on: no retry makes it trusted
        return _said(log, "serve.redis_certificate_refused", exc, ExitCode.UNAVAILABLE)


def _events_for(settings: Settings) -> None:
    """Every event as a JSON line on stdout (a pipe, a pod's log, ``--log-format json``),
    or on a terminal, rows for the person watching (:mod:`worker.terminal.served`)."""
    if not (sys.stdout.isatty() and settings.log_format == "auto"):
        logsetup.configure(fmt=settings.log_format, level=settings.log_level)
        return
    from worker.terminal.lines import style
    from worker.terminal.output import display_on
    from worker.terminal.served import ServeLines

    screen = display_on(sys.stdout)
    logsetup.configure_for_people(
        render=ServeLines(),
        write=lambda line: screen.print(line, style(line)),
        level=settings.log_level,
    )


def _said(log: FilteringBoundLogger, event: str, exc: ReaperError, code: int) -> int:
    """Once to each reader: the event to the log (stdout), one line and the fix to stderr."""
    from worker.terminal.failure import say_error

    say_error(log, event, exc, command="serve", events=sys.stdout)
    return code


def refuse_run_only(settings: Settings) -> None:
    """Settings that make sense for one run only, refused (78) rather than half-honoured.

    A dry run settles every id ``skipped`` and acknowledges it: on a shared stream it would
    take ids off the queue with nothing deleted. ``max_deletions`` caps one run; ``serve``
    never ends, and its replicas (and its restarts) share no count.
    """
    if settings.dry_run:
        raise ConfigError(
            "dry_run is for run: serve acknowledges what it settles, so a dry run would take "
            "ids off the queue with nothing deleted (try them with run --dry-run)"
        )
    if settings.max_deletions is not None:
        raise ConfigError(
            "max_deletions is for run: serve never ends and its replicas share no count, so "
            "it could not keep the cap (bound serve with --rate instead)"
        )


async def serve(
    settings: Settings,
    endpoint: str,
    *,
    stop: anyio.Event | None = None,
    on_ready: Callable[[int], None] | None = None,
    http_host: str | None = None,
) -> int:
    """Run the service until ``stop`` is set or a signal arrives; return the exit code."""
    from worker.clock import MonotonicClock
    from worker.outcomes.events import EventLog
    from worker.service.health import Health
    from worker.service.metrics import ServiceMetrics
    from worker.service.outage import Outage, redis_where

    stop = stop if stop is not None else anyio.Event()
    stop_now = anyio.Event()  # a second signal: no grace
    protection = wiring.protection(settings)  # before Redis or the API: a bad rule is 78
    clock = MonotonicClock()
    events = EventLog(sink=logsetup.json_sink())
    config = service_config(settings)
    targets = serve_targets(settings)
    metrics = ServiceMetrics(places=serve_places(targets))
    outage = Outage(events, clock, where=redis_where(settings.redis_url),
                    count=metrics.redis_errors.inc)  # fmt: skip
    parts: ServeParts | None = None

    async def refresh() -> None:  # the gauges before a scrape, once there is a service
        if parts is not None:
            await parts.service.refresh_gauges()

    try:
        async with AsyncExitStack() as stack, anyio.create_task_group() as signals:
            # From the start, as once running: a signal while Redis is waited for is said
            # and ends the wait, instead of exiting 75 without a word.
            waiting = anyio.CancelScope()
            signals.start_soon(_watch_signals, stop, stop_now, events, waiting.cancel)
            client, reader = build_service_redis(stack, settings, config)
            # The probes are answered from here on: live while start-up waits for Redis,
            # unready saying so (a port that refused connections had Kubernetes restart the
            # wait).
            health = Health(clock, stale_after=config.stale_after)
            where = redis_where(settings.redis_url)
            health.starting = f"waiting for Redis at {where}"
            host = http_host or settings.http_host
            port = await start_http(stack, health, metrics, ping=client.ping, refresh=refresh,
                                    host=host, port=settings.http_port)  # fmt: skip
            events.note("serve.starting", http_host=host, http_port=port, redis=where)
            answered = False
            with waiting:
                answered = await _redis_answers(client, outage, events, settings.redis_url)
            if stop.is_set():  # stopped before Redis answered: nothing was read
                events.note("serve.stopped", read=0, batches=0, reclaimed=0, acked=0,
                            dead_lettered=0, outcomes=0, left_pending=0,
                            waiting_for="redis")  # fmt: skip
                signals.cancel_scope.cancel()
                return ExitCode.INTERRUPTED
            if not answered:
                signals.cancel_scope.cancel()
                return ExitCode.UNAVAILABLE
            health.starting = f"setting up the queue on Redis at {where} and the API keys"
            await _warn_if_evicting(client, settings, events)
            parts = await build_service(
                stack, settings, config, client=client, reader=reader, metrics=metrics,
                outage=outage, events=events, clock=clock, protection=protection, stop=stop,
                stop_now=stop_now, targets=targets, health=health,
            )  # fmt: skip
            events.note(
                "serve.started",
                consumer=settings.consumer,
                stream=settings.stream,
                group=settings.group,
                http_host=host,
                http_port=port,
                allowed_projects=sorted(targets.allowed),
                **started_fields(settings, endpoint=endpoint, project=wiring.project_id(settings)),
            )
            if on_ready is not None:
                on_ready(port)
            await parts.service.run()
            signals.cancel_scope.cancel()
            events.note(
                "serve.stopped",
                read=parts.service.read,
                batches=parts.service.batches,
                reclaimed=parts.service.reclaimed,
                acked=parts.consumer.acked,
                dead_lettered=parts.consumer.dead_lettered,
                outcomes=parts.journal.outcomes,
                left_pending=len(parts.inflight) + len(parts.journal.unwritten),
            )
            return ExitCode.OK
    except BaseExceptionGroup as exc:  # the error alone, as main() tells them apart
        raise _alone(exc) from None
    raise AssertionError("serve returns from within its task group")  # pragma: no cover


def _alone(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error a task group raised (through the groups nested in it), else the group."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup) and len(found.exceptions) == 1:
        found = found.exceptions[0]
    return group if isinstance(found, BaseExceptionGroup) else found


async def _redis_answers(client: Redis, outage: Outage, events: EventLog, url: str) -> bool:
    """PING until Redis answers, for at most ``STARTUP_WAIT_S`` (the first failure names the
    Redis, the others are counted: ``worker.service.outage``); ``ConfigError`` when it
    refuses our settings (``worker.service.consumer.ping``), ``RedisCertificateRefused`` at
    once for a certificate refused (no wait makes it trusted)."""
    with anyio.move_on_after(STARTUP_WAIT_S):
        await outage.persist(
            lambda: trusted_ping(client, url, kept="the queue", done="nothing was read"),
            what="ping",
        )
        return True
    events.error("serve.redis_unavailable", waited_s=STARTUP_WAIT_S,
                 failed_calls=outage.failures)  # fmt: skip
    return False


async def _warn_if_evicting(client: Redis, settings: Settings, events: EventLog) -> None:
    """``serve.redis_may_evict`` when Redis, once full, may drop any key."""
    from worker.service.consumer import eviction_policy
    from worker.service.outage import redis_where

    policy = await eviction_policy(client)
    if policy is not None and policy.startswith("allkeys"):
        events.warn(
            "serve.redis_may_evict",
            policy=policy,
            redis=redis_where(settings.redis_url),
            why="when full, Redis drops any key, the ids stream and its group among them: "
            "ids lost unread; use maxmemory-policy noeviction (or volatile-*)",
        )


async def _watch_signals(
    stop: anyio.Event, stop_now: anyio.Event, events: EventLog, starting: Callable[[], None]
) -> None:
    """The first signal drains (``grace``); a second one cuts the grace short, as in ``run``:
    calls on the wire are cancelled, their entries left pending for another replica.
    ``starting``: ends the start-up wait for Redis, if it is still on."""

    def heard(signum: int) -> None:
        immediate = stop.is_set()
        events.warn("serve.interrupted", signal=signal.Signals(signum).name,
                    immediate=immediate)  # fmt: skip
        (stop_now if immediate else stop).set()
        starting()

    with stops.receiving() as received:
        if (lost := stops.asked()) is not None:  # its exit dropped before the loop ran
            heard(lost)
        async for signum in received:
            heard(signum)
