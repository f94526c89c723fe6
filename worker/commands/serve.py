"""``devserver-reaper serve``: consume ids from a Redis Stream until SIGTERM; serve health.

The edge: settings become collaborators here (Redis client, API client, the shared rate
limiter, the dispatcher, the service loop, the HTTP port), signals become a stop event, and
how it ended becomes an exit code: 0 after a clean drain, 78 for bad settings, 69 when Redis
cannot be reached at start-up (Kubernetes restarts us with back-off). Once running, neither
a Redis outage nor refused credentials make it exit: it waits, unready.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import Any

import anyio
import structlog

from worker import wiring
from worker.errors import AuthError, ConfigError, ReaperError, TransientError
from worker.exit_codes import ExitCode
from worker.settings import Settings

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STARTUP_WAIT_S = 30.0
"""How long start-up waits for Redis to answer before exiting 69."""


def main(args: argparse.Namespace, settings: Settings) -> int:
    from worker import logsetup

    del args
    logsetup.configure(fmt=settings.log_format, level=settings.log_level)
    # A service carries on without its event output (its outcomes are in Redis), said once.
    logsetup.when_lost(lambda name, exc: logsetup.tell(
        f"devserver-reaper serve: the events cannot be written to {name} "
        f"({exc.strerror or type(exc).__name__}); carrying on without them"
    ))  # fmt: skip
    structlog.contextvars.bind_contextvars(run_id=f"serve-{settings.consumer}")
    log = structlog.get_logger("devserver_reaper")
    import redis.exceptions

    from worker.service.consumer import not_permitted

    try:
        refuse_run_only(settings)
        settings.require_api()
        endpoint = settings.api_endpoint
        wiring.project_id(settings)  # before any call: a missing project is exit 78
        try:
            return anyio.run(serve, settings, endpoint)
        except (redis.exceptions.NoPermissionError, BaseExceptionGroup) as exc:
            denied: BaseException | None = exc  # an ACL short of a right, in a task maybe
            while isinstance(denied, BaseExceptionGroup):
                found = denied.subgroup(redis.exceptions.NoPermissionError)
                denied = None if found is None else found.exceptions[0]
            if denied is None:
                raise
            raise not_permitted(settings.stream, denied) from None
    except ConfigError as exc:
        return _said(log, "serve.config_error", exc, ExitCode.CONFIG)
    except AuthError as exc:  # a credential service refused us at start-up
        return _said(log, "serve.credentials_refused", exc, ExitCode.NO_PERMISSION)
    except TransientError as exc:  # a credential service that does not answer
        return _said(log, "serve.credentials_unavailable", exc, ExitCode.UNAVAILABLE)


def _said(log: Any, event: str, exc: ReaperError, code: int) -> int:
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
    import redis.asyncio as aioredis
    from aiohttp import web

    from worker.clock import MonotonicClock
    from worker.discovery.guard import load_protection
    from worker.dispatcher import Working
    from worker.outcomes.events import EventLog
    from worker.pacing.breaker import BreakerGate
    from worker.service.consumer import StreamConsumer, eviction_policy
    from worker.service.health import Health, build_app, http_runner
    from worker.service.inflight import InFlight
    from worker.service.journal import ServeJournal
    from worker.service.layout import Retention, StreamLayout
    from worker.service.metrics import MeteredTransport, ServiceMetrics
    from worker.service.outage import Outage, redis_where
    from worker.service.retention import Keeper
    from worker.service.service import Service, ServiceConfig

    stop = stop if stop is not None else anyio.Event()
    stop_now = anyio.Event()  # a second signal: no grace
    protection = load_protection(  # before Redis or the API: a bad rule or file is 78
        settings.protect, settings.protect_files, settings.protected_types,
        settings.protected_statuses,
    )  # fmt: skip
    clock = MonotonicClock()
    events = EventLog()
    config = ServiceConfig(
        batch_size=settings.batch_size,
        concurrency=settings.concurrency,
        max_deliveries=settings.max_deliveries,
        reclaim_after=settings.reclaim_after,
        grace=settings.grace,
        stats_interval=settings.stats_interval,
    )
    try:
        client = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=config.block + 10.0,
            socket_connect_timeout=5.0,
            health_check_interval=30,
        )
        reader = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=config.block + 10.0,
            socket_connect_timeout=5.0,
            single_connection_client=True,
        )
    except ValueError as exc:
        raise ConfigError(f"redis_url is not a Redis URL: {exc}") from None
    session = None
    runner: web.AppRunner | None = None
    metrics = ServiceMetrics()
    outage = Outage(events, clock, where=redis_where(settings.redis_url),
                    count=metrics.redis_errors.inc)  # fmt: skip
    try:
        if not await _redis_answers(client, outage, events):
            return ExitCode.UNAVAILABLE
        policy = await eviction_policy(client)
        if policy is not None and policy.startswith("allkeys"):
            events.warn(
                "serve.redis_may_evict",
                policy=policy,
                redis=redis_where(settings.redis_url),
                why="when full, Redis drops any key, the ids stream and its group among them: "
                "ids lost unread; use maxmemory-policy noeviction (or volatile-*)",
            )
        layout = StreamLayout(settings.stream, settings.group)
        retention = Retention(
            outcomes_max_len=settings.outcomes_max_len,
            outcomes_max_age_s=settings.outcomes_max_age,
            dead_max_len=settings.dead_max_len,
            dead_max_age_s=settings.dead_max_age,
        )
        consumer = StreamConsumer(
            client, layout, settings.consumer, reader=reader, retention=retention
        )
        # Here, not in the loop's task group: a --stream naming a key of another type is a
        # ConfigError (78) that reaches main() unwrapped.
        await outage.persist(consumer.ensure_group, what="group")
        health = Health(clock, stale_after=config.stale_after)
        inflight = InFlight()
        journal = ServeJournal(
            events=events, metrics=metrics, inflight=inflight, consumer=consumer, clock=clock,
            outage=outage, max_deliveries=config.max_deliveries,
        )  # fmt: skip
        transport: Any = None
        if not settings.dry_run:
            session = wiring.session(settings)
            api = await wiring.api_client(settings, session)
            transport = MeteredTransport(api, metrics, clock, observe=health.observe_call)
        working = Working()  # what a stop waits for: calls on the wire, answers settling
        limiter = wiring.shared_limiter(settings, client, layout.ratelimit, clock)
        dispatcher = wiring.processor(
            settings,
            transport=transport,
            limiter=limiter,
            journal=journal,
            clock=clock,
            stopping=lambda: service.halting,  # the service is made next, and asked later
            protection=protection,  # protected jobs end skipped here too, whatever the queue says
            working=working,
            gate=BreakerGate(clock=clock),  # an API that keeps failing is probed, not hammered
        )
        service = Service(
            consumer=consumer,
            inflight=inflight,
            journal=journal,
            dispatcher=dispatcher,
            metrics=metrics,
            health=health,
            events=events,
            clock=clock,
            config=config,
            stop=stop,
            stop_now=stop_now,
            working=working,
            outage=outage,
            keeper=Keeper(client, layout, retention),
            rate=lambda: float(limiter.rate),
        )
        app = build_app(health, metrics, ping=consumer.ping, refresh=service.refresh_gauges)
        runner = http_runner(app)
        await runner.setup()
        host = http_host or settings.http_host
        try:
            site = web.TCPSite(runner, host, settings.http_port)
            await site.start()
        except OSError as exc:
            raise ConfigError(f"http_port {settings.http_port}: {exc.strerror or exc}") from None
        port = _bound_port(site, settings.http_port)
        events.note(
            "serve.started",
            consumer=settings.consumer,
            stream=settings.stream,
            group=settings.group,
            endpoint=endpoint,
            project_id=settings.project_id,
            http_host=host,
            http_port=port,
            batch_size=settings.batch_size,
            concurrency=settings.concurrency,
            rate=settings.rate,
            dry_run=settings.dry_run,
        )
        if on_ready is not None:
            on_ready(port)
        async with anyio.create_task_group() as group:
            group.start_soon(_watch_signals, stop, stop_now, events)
            await service.run()
            group.cancel_scope.cancel()
        events.note(
            "serve.stopped",
            read=service.read,
            batches=service.batches,
            reclaimed=service.reclaimed,
            acked=consumer.acked,
            dead_lettered=consumer.dead_lettered,
            outcomes=journal.outcomes,
            left_pending=len(inflight),
        )
        return ExitCode.OK
    finally:
        with anyio.CancelScope(shield=True):
            if runner is not None:
                await runner.cleanup()
            if session is not None:
                await session.close()
            await reader.aclose()
            await client.aclose()


async def _redis_answers(client: Any, outage: Any, events: Any) -> bool:
    """PING until Redis answers, for at most ``STARTUP_WAIT_S`` (the first failure names the
    Redis, the others are counted: ``worker.service.outage``); ``ConfigError`` when it
    refuses our settings (``worker.service.consumer.ping``)."""
    from worker.service.consumer import ping

    with anyio.move_on_after(STARTUP_WAIT_S):
        await outage.persist(lambda: ping(client), what="ping")
        return True
    events.error("serve.redis_unavailable", waited_s=STARTUP_WAIT_S,
                 failed_calls=outage.failures)  # fmt: skip
    return False


def _bound_port(site: Any, asked: int) -> int:
    server = getattr(site, "_server", None)
    sockets = list(getattr(server, "sockets", None) or ())
    return int(sockets[0].getsockname()[1]) if sockets else asked


async def _watch_signals(stop: anyio.Event, stop_now: anyio.Event, events: Any) -> None:
    """The first signal drains (``grace``); a second one cuts the grace short, as in ``run``:
    calls on the wire are cancelled, their entries left pending for another replica."""
    with anyio.open_signal_receiver(*SIGNALS) as received:
        async for signum in received:
            immediate = stop.is_set()
            events.warn("serve.interrupted", signal=signal.Signals(signum).name,
                        immediate=immediate)  # fmt: skip
            (stop_now if immediate else stop).set()
