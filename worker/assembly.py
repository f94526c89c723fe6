"""Put ``run`` and ``serve`` together: typed ``build_*`` functions over :mod:`worker.wiring`.

:mod:`worker.wiring` turns settings into one collaborator each (the API client, a limiter,
the dispatcher); here those are assembled into what a command runs: the records a run
writes to and the pipeline that fills them, or the service over its stream. The commands
keep their lifecycle (signals, the deadline, progress, how it ended and its exit code).

Every resource built here is closed by the exit stack the caller passes in, in the reverse
order of building: the command decides how long they live, and what happens after the run
(flushing the results, the summary) sees them still open.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio

from worker import wiring
from worker.batcher import Batcher, DeletionBudget
from worker.batchsize import BatchSize, Learnt
from worker.clock import Clock
from worker.discovery.applied import expires_on, plan_candidates, plan_check, plan_default
from worker.discovery.guard import Guard, Protection
from worker.dispatcher import Working
from worker.errors import ApiError, AuthError, ConfigError, NoSuchApi, ReaperError, UsageError
from worker.input.shard import Shard, ShardFilter
from worker.input.sources import read_entries
from worker.lanes import Lanes
from worker.ledger import UNBOUND, WHOLE, Ledger, TemporaryLedger
from worker.outcomes.events import EventLog
from worker.outcomes.journal import LedgerPort, ResultsWriter, RunJournal, Tally
from worker.pipeline import BatchProcessor, Entry, Pipeline, RunState
from worker.private_files import open_output
from worker.redis_link import redis_client
from worker.routing import Router, Stamped
from worker.settings import Settings
from worker.targets import LookupFailed, Target, Targets, normal_endpoint

if TYPE_CHECKING:
    import aiohttp
    import redis.asyncio as aioredis
    from aiohttp import web

    from worker.api.client import Api
    from worker.api.credentials import CredentialSource
    from worker.discovery.plan import SealedPlan
    from worker.service.consumer import StreamConsumer
    from worker.service.health import Health
    from worker.service.inflight import InFlight
    from worker.service.journal import ServeJournal
    from worker.service.metrics import Places, ServiceMetrics
    from worker.service.outage import Outage
    from worker.service.service import Service, ServiceConfig


def started_fields(settings: Settings, *, endpoint: str, project: str) -> dict[str, object]:
    """What ``run.started`` and ``serve.started`` both say of the settings, besides their own:
    among them ``allowed_endpoints``, where a line's signed calls may go besides the settings'
    own endpoint (URLs with no user name, password or query: no secret)."""
    return {
        "endpoint": endpoint,
        "project_id": project,
        "allowed_endpoints": settings.allowed_endpoints,
        "dry_run": settings.dry_run,
        "batch_size": settings.batch_size,
        "concurrency": settings.concurrency,
        "rate": settings.rate,
    }


async def _shielded(close: Callable[[], Awaitable[object]]) -> None:
    """Close even while the scope around is cancelled (a stop, a deadline)."""
    with anyio.CancelScope(shield=True):
        await close()


def _close_quietly(handle: IO[bytes]) -> None:
    with contextlib.suppress(OSError):
        handle.close()


# ``run``


@dataclass(frozen=True, slots=True)
class RunRecords:
    """What a run reads and where its outcomes go, all opened before any call."""

    default: Target  # the settings' project, where the ids whose line names none go
    ledger: Ledger | TemporaryLedger
    port: LedgerPort  # one port: one thread at a time on the ledger's connection
    journal: RunJournal
    results: ResultsWriter | None
    budget: DeletionBudget
    spent: int  # of the budget, by earlier runs on the ledger
    entries: Iterator[Entry]
    sharding: ShardFilter | None
    # The most ids a DELETE may carry, as earlier runs on the ledger learnt it: per
    # project and endpoint (worker.batchsize).
    sizes: Mapping[tuple[str, str], Learnt] = field(default_factory=dict)

    def batch_size(self, target: Target | None) -> BatchSize:
        """What is known of the largest call to ``target`` (None: the default), from
        earlier runs on the ledger."""
        place = self.default if target is None else target
        return BatchSize(self.sizes.get((place.project_id, place.endpoint)))

    async def keep_batch_size(self, target: Target | None, learnt: Learnt) -> None:
        await self.port.keep_batch_size(self.default if target is None else target, learnt)


def build_ledger(
    settings: Settings,
    *,
    default: Target,
    run_id: str,
    retry_failed: bool,
    shard: Shard | None,
) -> Ledger | TemporaryLedger:
    """The ledger of ``--ledger`` (resumable), or a temporary one for this run alone; made
    for the ``default`` target, the settings' project (an id's line may name another)."""
    if settings.ledger is None:
        return TemporaryLedger.open(default=default)
    return Ledger.open(
        settings.ledger,
        project_id=default.project_id,
        endpoint=default.endpoint,
        run_id=run_id,
        retry_failed=retry_failed,
        shard=WHOLE if shard is None else str(shard),
        region=default.region,
        named=settings.named("ledger"),
    )


def build_default_target(settings: Settings, *, project: str, endpoint: str) -> Target:
    """Where the ids whose line names no project go: the settings' project and endpoint.
    ``ConfigError`` (78) when ``allowed_projects`` leaves it out: every such line would be
    refused. (In a dry run given none, placeholders: nothing is sent.)"""
    allowed = settings.allowed_projects
    if allowed and project != UNBOUND and project not in allowed:
        raise ConfigError(
            f"project_id {project} is not in allowed_projects: every id whose line names "
            "no project would be refused; add it, or set another project_id"
        )
    return Target(project, endpoint, settings.region)


def build_results(
    stack: AsyncExitStack, path: str | None, ledger: Ledger | TemporaryLedger
) -> ResultsWriter | None:
    """``--results``, opened once, before any call (``UsageError``, 64, when it cannot be).

    A run that resumes work a ledger holds open appends: the ids the run before it settled
    are not written again, so together their lines hold one per id. Any other run starts the
    file afresh. Private, and never through a link another user planted
    (``worker.private_files``).
    """
    if not path:
        return None
    append = isinstance(ledger, Ledger) and ledger.holds_open_ids()
    try:
        handle = open_output(Path(path), append=append)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"--results {path} cannot be opened: {reason}") from None
    # Flushed after every batch and once more at the end, where a failure is reported
    # (ResultsUnwritable); closing must not raise the same failure again.
    stack.callback(_close_quietly, handle)
    return ResultsWriter(handle)


def build_entries(
    source: str,
    fmt: str,
    *,
    stdin: IO[bytes] | None,
    plan: SealedPlan | None,
    shard: Shard | None,
) -> tuple[Iterator[Entry], ShardFilter | None]:
    """The entries to read, a plan's ids or the input's lines, and this shard's filter."""
    entries: Iterator[Entry] = (
        plan_candidates(plan) if plan is not None else read_entries(source, fmt, stdin=stdin)
    )
    if shard is None:
        return entries, None
    sharding = ShardFilter(shard)
    return sharding.select(entries), sharding


def build_records(
    stack: AsyncExitStack,
    settings: Settings,
    *,
    source: str,
    fmt: str,
    results: str | None,
    retry_failed: bool,
    project: str,
    endpoint: str,
    run_id: str,
    shard: Shard | None,
    plan: SealedPlan | None,
    stdin: IO[bytes] | None,
    events: EventLog,
    tally: Tally,
) -> RunRecords:
    default = (
        plan_default(plan)  # a plan naming its projects: the first, checked against the list
        if plan is not None and plan.header.named
        else build_default_target(settings, project=project, endpoint=endpoint)
    )
    ledger = build_ledger(
        settings, default=default, run_id=run_id, retry_failed=retry_failed, shard=shard
    )
    stack.callback(ledger.close)
    # The cap is on the job, not on each process: what earlier runs on the ledger sent
    # counts (a kill -9 and a resume must not reach twice the cap).
    spent = ledger.sent_before() if isinstance(ledger, Ledger) else 0
    writer = build_results(stack, results, ledger)
    port = LedgerPort(ledger)
    entries, sharding = build_entries(source, fmt, stdin=stdin, plan=plan, shard=shard)
    return RunRecords(
        default=default,
        ledger=ledger,
        port=port,
        journal=RunJournal(ledger=port, events=events, tally=tally, results=writer),
        results=writer,
        budget=DeletionBudget(settings.max_deletions, spent=spent),
        spent=spent,
        entries=entries,
        sharding=sharding,
        sizes=ledger.batch_sizes() if isinstance(ledger, Ledger) else {},
    )


@dataclass(frozen=True, slots=True)
class RunCalls:
    """What makes a run's calls: per target a lane (``worker.routing``) built from
    ``lanes`` (an API client and rate limiter per project and endpoint, a breaker per
    endpoint), the router the pipeline sends every batch to, the settings' project's guard
    (when its lane is a :class:`Guard`: a plan's recount reads through it), the targets
    the lines named, and the pipeline."""

    lanes: Lanes
    router: Router
    guard: Guard | None
    targets: Targets
    pipeline: Pipeline

    @property
    def guards(self) -> list[Guard]:
        """Every lane's guard, when jobs are protected or a plan binds the run."""
        return [lane for lane in self.router.lanes.values() if isinstance(lane, Guard)]


async def build_rate_redis(
    stack: AsyncExitStack, settings: Settings
) -> tuple[aioredis.Redis | None, str | None]:
    """The Redis client and the key of the shared rate limit, when a ``redis_url`` is given
    and the run sends (closed by ``stack``); ``(None, None)`` otherwise."""
    if not (wiring.shares_rate(settings) and not settings.dry_run):
        return None, None
    from worker.service.layout import StreamLayout

    redis = await wiring.rate_redis(settings)
    stack.push_async_callback(_shielded, redis.aclose)
    return redis, StreamLayout(settings.stream, settings.group).ratelimit


async def build_keys(
    stack: AsyncExitStack, settings: Settings
) -> tuple[aiohttp.ClientSession, CredentialSource]:
    """The process's one HTTP session (closed by ``stack``) and the keys every project's
    calls are signed with (one AK/SK pair serves all the projects of an account)."""
    session = wiring.session(settings)
    stack.push_async_callback(_shielded, session.close)
    return session, await wiring.credentials(settings, session)


async def build_calls(
    stack: AsyncExitStack,
    settings: Settings,
    records: RunRecords,
    *,
    reads: bool,
    clock: Clock,
    run_id: str,
    state: RunState,
    working: Working,
    protection: Protection,
    plan: SealedPlan | None,
    excluded: frozenset[str],
    events: EventLog,
    tally: Tally,
) -> RunCalls:
    # In a dry run, reads only: the dispatcher sends no DELETE. A dry run of ids reads none.
    session, keys = await build_keys(stack, settings) if reads else (None, None)
    redis, key = await build_rate_redis(stack, settings)
    # Per target: a rate limiter per project and endpoint (shared in Redis under a key of its
    # own), and per endpoint a breaker, which stops hammering an API that keeps failing and
    # tells the exit code whether a deadline struck while the API was down (69, not 75).
    lanes = Lanes(settings, default=records.default, clock=clock, session=session,
                  credentials=keys, redis=redis, limit_base=key)  # fmt: skip

    expires = None if plan is None else expires_on(plan, clock)

    def lane(target: Target | None) -> BatchProcessor:
        return wiring.processor(
            settings,
            transport=lanes.transport(target),
            limiter=lanes.limiter(target),
            journal=records.journal if target is None else Stamped(records.journal, target),
            clock=clock,
            stopping=lambda: state.stopping,
            protection=protection,
            plan=None if plan is None else plan_check(plan, excluded, target, expires),
            working=working,
            gate=lanes.gate(target),
            # Re-checked by listing: a plan's jobs with its server-side filters, a protected
            # input's jobs with none (protection reads every job's record).
            listing=plan.filters.server_queries() if plan is not None else [{}],
            warn=events.warn,
            budget=records.budget,
            sizes=records.batch_size(target),
            keep_sizes=partial(records.keep_batch_size, target),
        )

    def out(place: Target, exc: ReaperError) -> None:
        whole = not isinstance(exc, NoSuchApi | AuthError)  # else: that project alone
        events.warn(
            "run.endpoint_down" if whole else "run.project_refused",
            project_id=None if whole else place.project_id, region=place.region,
            endpoint=place.endpoint, error=str(exc),
            note="its ids stay open, never sent; the others go on",
        )  # fmt: skip

    router = Router(default=records.default, lane=lane, concurrency=settings.concurrency,
                    stopping=lambda: state.stopping, working=working, on_out=out)  # fmt: skip
    lookup = None
    if session is not None and keys is not None:  # a line's region, as serve's entries'
        lookup = wiring.region_lookup(settings, session, keys)
    targets = Targets(records.default, allowed=settings.allowed_projects,
                      endpoints=settings.trusted_endpoints, lookup=lookup)  # fmt: skip
    pipeline = Pipeline(
        entries=records.entries,
        ledger=records.port,
        journal=records.journal,
        dispatcher=router,
        batcher=Batcher(settings.batch_size, prefix=run_id[-6:]),
        tally=tally,
        concurrency=settings.concurrency,
        grace=settings.grace,
        state=state,
        working=working,
        targets=targets,
        held=router,
    )
    default_lane = router.lane(None)  # the settings' project's: a plan's, and the first made
    guard = default_lane if isinstance(default_lane, Guard) else None
    return RunCalls(lanes, router, guard, targets, pipeline)


# ``serve``


def service_config(settings: Settings) -> ServiceConfig:
    from worker.service.service import ServiceConfig

    return ServiceConfig(
        batch_size=settings.batch_size,
        concurrency=settings.concurrency,
        max_deliveries=settings.max_deliveries,
        reclaim_after=settings.reclaim_after,
        grace=settings.grace,
        stats_interval=settings.stats_interval,
    )


def serve_targets(settings: Settings) -> Targets:
    """Where ``serve`` may send: the settings' project at their endpoint by default, and the
    projects of ``allowed_projects``; none listed: the default project only (a queue anyone
    can write to must not widen what a replica deletes). An entry may name the endpoints
    the settings trust only (``allowed_endpoints``: ``worker.targets.untrusted``)."""
    default = Target(
        wiring.project_id(settings), normal_endpoint(settings.api_endpoint), settings.region
    )
    allowed = settings.allowed_projects or [default.project_id]
    return Targets(default, allowed=allowed, endpoints=settings.trusted_endpoints)


def serve_places(targets: Targets) -> Places:
    """The metrics' ``project_id`` and ``region`` labels: the configured projects and the
    known regions, never what an entry says."""
    from worker.service.metrics import Places
    from worker.settings import REGIONS

    return Places(targets.default, targets.allowed, REGIONS)


def build_service_redis(
    stack: AsyncExitStack, settings: Settings, config: ServiceConfig
) -> tuple[aioredis.Redis, aioredis.Redis]:
    """``serve``'s two Redis clients: one for everything but reading entries, and one
    connection of its own for those reads (``worker.service.consumer``), each answering within
    the read's block and ``redis_timeout``. Closed by ``stack``; nothing is sent yet."""
    timeout = config.block + settings.redis_timeout
    client = redis_client(settings.redis_url, timeout=timeout, health_check_interval=30)
    stack.push_async_callback(_shielded, client.aclose)
    reader = redis_client(  # memory bounded by the entry size limit, not the entry
        settings.redis_url, timeout=timeout, single_connection=True, entries=True
    )
    stack.push_async_callback(_shielded, reader.aclose)
    return client, reader


@dataclass(frozen=True, slots=True)
class ServeParts:
    """The service and what ``serve`` reports of it when it stops."""

    service: Service
    consumer: StreamConsumer
    journal: ServeJournal
    inflight: InFlight
    health: Health
    metrics: ServiceMetrics


async def build_service(
    stack: AsyncExitStack,
    settings: Settings,
    config: ServiceConfig,
    *,
    client: aioredis.Redis,
    reader: aioredis.Redis,
    metrics: ServiceMetrics,
    outage: Outage,
    events: EventLog,
    clock: Clock,
    protection: Protection,
    stop: anyio.Event,
    stop_now: anyio.Event,
    targets: Targets,
    health: Health,
) -> ServeParts:
    """The service over a Redis that has answered: its group made sure of, the API client,
    the shared limiter and the dispatcher, sending where ``targets`` (:func:`serve_targets`)
    allows. ``serve`` never runs dry (``refuse_run_only``)."""
    from worker.api.credentials import FileCredentials
    from worker.service.consumer import StreamConsumer
    from worker.service.inflight import InFlight
    from worker.service.journal import ServeJournal
    from worker.service.layout import Retention, StreamLayout
    from worker.service.lookups import RETRY_S, RegionLookups
    from worker.service.metrics import MeteredTransport
    from worker.service.regions import RegionRouter
    from worker.service.retention import Keeper
    from worker.service.service import Service

    layout = StreamLayout(settings.stream, settings.group)
    retention = Retention(
        outcomes_max_len=settings.outcomes_max_len,
        outcomes_max_age_s=settings.outcomes_max_age,
        dead_max_len=settings.dead_max_len,
        dead_max_age_s=settings.dead_max_age,
    )
    consumer = StreamConsumer(client, layout, settings.consumer, reader=reader, retention=retention)
    # Here, not in the loop's task group: a --stream naming a key of another type is a
    # ConfigError (78) that reaches main() unwrapped.
    await outage.persist(consumer.ensure_group, what="group")
    inflight = InFlight()
    journal = ServeJournal(
        events=events, metrics=metrics, inflight=inflight, consumer=consumer, clock=clock,
        outage=outage, max_deliveries=config.max_deliveries,
    )  # fmt: skip
    # What a stop waits for (calls on the wire, answers settling), and the places on the wire
    working = Working(places=settings.concurrency)
    session, keys = await build_keys(stack, settings)
    # One limiter per project and endpoint, shared through Redis (the default's on the key
    # of one project's fleet), one breaker per endpoint: worker.lanes.
    lanes = Lanes(settings, default=targets.default, clock=clock, session=session,
                  credentials=keys, redis=client, limit_base=layout.ratelimit)  # fmt: skip

    lookup = wiring.region_lookup(settings, session, keys)  # an entry's region (run's too)

    def lookup_failed(failure: LookupFailed) -> None:
        events.warn("serve.project_lookup_failed", region=failure.region,
                    error=str(failure.error), entries="left pending, read again later"
                    if failure.later else "dead-lettered")  # fmt: skip

    targets.look_up_with(lookup)
    # Held at most until its entries would be reclaimed anyway.
    hold = min(RETRY_S, config.reclaim_after)
    lookups = RegionLookups(targets, clock, retry_s=hold, on_failed=lookup_failed)

    def lane(target: Target | None) -> BatchProcessor:
        transport = lanes.transport(target)
        assert transport is not None  # serve always has a session and keys
        # Readiness hears the default project's calls only: another project's refusal
        # pauses that project alone (worker.service.regions), and its answers must not
        # clear a refusal of the deployment's own.
        observe = health.observe_call if target is None else None
        api: Api = MeteredTransport(transport, metrics, clock, observe=observe,
                                    target=target)  # fmt: skip
        return wiring.processor(
            settings,
            transport=api,
            limiter=lanes.limiter(target),
            journal=journal.lane(target),
            clock=clock,
            stopping=lambda: service.halting,  # the service is made next, and asked later
            protection=protection,  # protected jobs end skipped here too, whatever the queue says
            working=working,
            gate=lanes.gate(target),  # an API that keeps failing is probed, not hammered
        )

    def paused(target: Target, error: ApiError) -> None:
        events.error("serve.region_paused", project_id=target.project_id,
                     region=target.region, endpoint=target.endpoint, error=str(error))  # fmt: skip

    def resumed(target: Target) -> None:
        service.reread_own()  # what was handed back for it, now rather than at a reclaim
        events.note("serve.region_resumed", project_id=target.project_id,
                    region=target.region, endpoint=target.endpoint)  # fmt: skip

    router = RegionRouter(lane=lane, gate=lanes.gate, place=lanes.place, on_pause=paused,
                          on_resume=resumed, stopping=lambda: service.halting,
                          clock=clock)  # fmt: skip

    def gauges() -> None:
        for target, down in router.down():
            metrics.api_down.labels(*metrics.place(target)).set(int(down))

    service = Service(
        consumer=consumer,
        inflight=inflight,
        journal=journal,
        dispatcher=router,
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
        rate=lambda: lanes.rate,
        targets=targets,
        gauges=gauges,
        lookups=lookups,
        down=router.down_for,
        keys=keys if isinstance(keys, FileCredentials) else None,  # a pause ends on new ones
    )
    return ServeParts(service, consumer, journal, inflight, health, metrics)


async def start_http(
    stack: AsyncExitStack,
    health: Health,
    metrics: ServiceMetrics,
    *,
    ping: Callable[[], Awaitable[object]],
    refresh: Callable[[], Awaitable[None]],
    host: str,
    port: int,
) -> int:
    """The health and metrics port (``ConfigError``, 78, when it cannot be bound); the port
    it is bound to, which is the one asked unless that was 0. Started before Redis is
    waited for: ``ping`` checks it, ``refresh`` sets the gauges before a scrape."""
    from aiohttp import web

    from worker.service.health import build_app, http_runner

    app = build_app(health, metrics, ping=ping, refresh=refresh)
    runner: web.AppRunner = http_runner(app)
    await runner.setup()
    stack.push_async_callback(_shielded, runner.cleanup)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        raise ConfigError(f"http_port {port}: {exc.strerror or exc}") from None
    return bound_port(runner.addresses, port)


def bound_port(addresses: Sequence[object], asked: int) -> int:
    """The port of the first address a runner is bound to (``AppRunner.addresses``)."""
    for address in addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return asked
