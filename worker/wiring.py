"""Turn settings into the collaborators the stages take: the API client, limiter, retry policy.

Shared by the commands that call the API (``run``, ``serve``, ``check``) so that they build
them the same way. This is the edge: it may read settings and the environment; the stages
it builds never do.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import anyio
import structlog

from worker.api.client import Api, ApiClient, make_session
from worker.api.credentials import CredentialSource, read_profile, resolve_credentials
from worker.api.projects import PROCESS_CACHE, FoundProject, iam_endpoint_for
from worker.batcher import DeletionBudget
from worker.batchsize import BatchSize, Learnt
from worker.clock import Clock
from worker.discovery.expiry import ExpiringLimiter
from worker.discovery.guard import Guard, PlanCheck, Protection, load_protection
from worker.discovery.recheck import ListingRecheck
from worker.dispatcher import Dispatcher, Journal, Working
from worker.errors import ConfigError
from worker.exit_codes import ExitCode
from worker.pacing.breaker import BreakerGate
from worker.pacing.bucket import RateLimiter
from worker.pacing.paced import PacedReader
from worker.pacing.retry import RetryPolicy
from worker.pipeline import BatchProcessor
from worker.redis_link import answering, redis_client
from worker.settings import Settings
from worker.targets import endpoint_problem, normal_endpoint, project_problem

if TYPE_CHECKING:
    import redis.asyncio as aioredis


@dataclass(frozen=True, slots=True)
class ProjectChoice:
    """The project in force and where it came from (``check`` says so)."""

    project_id: str
    source: str  # "settings", "profile PATH", or "IAM URL" (looked up by region)


def project_choice(settings: Settings) -> ProjectChoice:
    """The project: the setting, else the profile file's ``project_id`` (as the SDK does),
    held to the same rule as the setting (it goes into every URL and the ledger), else the
    id IAM gave for ``region`` earlier in this process (:func:`ensure_project`)."""
    if settings.project_id:
        return ProjectChoice(settings.project_id, "settings")
    profile = read_profile(os.environ)
    if profile is not None and profile.project_id:
        if (problem := project_problem(profile.project_id)) is not None:
            raise ConfigError(f"profile {profile.path}: project_id {problem}")
        return ProjectChoice(profile.project_id, f"profile {profile.path}")
    if settings.region:
        found = PROCESS_CACHE.get(settings.region, iam_endpoint(settings))
        if found is not None:
            return ProjectChoice(found.project_id, _from_iam(found))
    raise ConfigError(
        "missing settings: --project-id (or REAPER_PROJECT_ID), or --region with keys to look "
        "it up in IAM"
    )


def project_id(settings: Settings) -> str:
    return project_choice(settings).project_id


def iam_endpoint(settings: Settings) -> str | None:
    """Where a region's project id is looked up: the setting (``REAPER_IAM_ENDPOINT``, the
    SDK's ``HUAWEICLOUD_SDK_IAM_ENDPOINT``, the config file), else the profile file's
    ``iam_endpoint`` (the SDK reads it there too), else None: the region's own IAM."""
    if settings.iam_endpoint:
        return settings.iam_endpoint
    profile = read_profile(os.environ)
    if profile is None or profile.iam_endpoint is None:
        return None
    problem = endpoint_problem(profile.iam_endpoint, service="iam")
    if problem is not None:
        raise ConfigError(f"profile {profile.path}: iam_endpoint {problem}")
    return normal_endpoint(profile.iam_endpoint)


def _from_iam(found: FoundProject) -> str:
    return f"IAM {found.iam_endpoint}: the project named {found.region}"


def _looks_up(settings: Settings) -> bool:
    """Whether the project must come from IAM: none set anywhere (a profile's that
    :func:`project_choice` refuses is set: its error, not a look-up), a region to ask for,
    and not asked yet in this process."""
    if settings.project_id or settings.region is None:
        return False
    profile = read_profile(os.environ)
    if profile is not None and profile.project_id:
        return False
    return PROCESS_CACHE.get(settings.region, iam_endpoint(settings)) is None


async def resolve_project(
    settings: Settings, http: aiohttp.ClientSession, keys: CredentialSource
) -> ProjectChoice:
    """:func:`project_choice`, looking the region's project up in IAM (signed with ``keys``,
    once a process) when no setting or profile names one. Errors: ``worker.api.projects``."""
    if not _looks_up(settings) or settings.region is None:
        return project_choice(settings)
    found = await project_of_region(settings, http, keys, settings.region)
    return ProjectChoice(found.project_id, _from_iam(found))


async def project_of_region(
    settings: Settings, http: aiohttp.ClientSession, keys: CredentialSource, region: str
) -> FoundProject:
    """The project IAM names after ``region`` (once a process: ``project.resolved`` says so
    when IAM is asked). Errors: ``worker.api.projects``."""
    where = iam_endpoint(settings)
    asked = PROCESS_CACHE.get(region, where, (await keys.current()).ak) is None
    found = await PROCESS_CACHE.resolve(
        session=http, credentials=keys, region=region, iam_endpoint=where,
        ca_bundle=ca_bundle_said(settings),
    )  # fmt: skip
    if asked:
        structlog.get_logger("devserver_reaper").info(
            "project.resolved",
            region=found.region,
            project_id=found.project_id,
            iam_endpoint=found.iam_endpoint,
            trace_id=found.trace_id,
        )
    return found


def region_lookup(
    settings: Settings, http: aiohttp.ClientSession, keys: CredentialSource
) -> Callable[[str], Awaitable[str]]:
    """How ``run`` (a line's region), ``serve`` (an entry's) and ``discover`` (a
    ``--project`` of a region) find a region's project: one door, :func:`project_of_region`,
    so each says ``project.resolved`` when IAM is asked, as the settings' own look-up does."""

    async def lookup(region: str) -> str:
        return (await project_of_region(settings, http, keys, region)).project_id

    return lookup


def ensure_project(settings: Settings) -> ProjectChoice:
    """:func:`resolve_project` before a command's own event loop (``run``, ``serve``), so
    that everything after it, the prompt and the ledger included, knows the project. Asks
    IAM only when needed, with its own session and keys (temporary keys are fetched once
    more for this)."""
    if not _looks_up(settings):
        return project_choice(settings)

    async def look_up() -> ProjectChoice:
        from worker.terminal.waiting import status_while

        where = iam_endpoint(settings) or iam_endpoint_for(settings.region or "")
        said = f"looking up the project of region {settings.region} in IAM ({where})"
        async with status_while(said), session(settings, concurrency=1) as http:
            keys = await credentials(settings, http, announce=False)
            return await resolve_project(settings, http, keys)

    try:
        return anyio.run(look_up)
    except SystemExit as exc:  # Ctrl-C or SIGTERM: the command's own handling is not yet in place
        if exc.code == ExitCode.INTERRUPTED:
            sys.stderr.write(
                f"\ninterrupted while IAM was asked for the project of region {settings.region}:"
                " nothing was sent\n"
            )
        raise


def protection(settings: Settings) -> Protection:
    """The jobs never to delete, from the settings' rules and files (``ConfigError``, 78, for
    a bad rule or a file that cannot be read): loaded before anything is opened or sent.
    One file is named as its source gave it; files from several sources add up, and the
    setting is named for them all."""
    files = settings.protect_files
    named = settings.named("protect_file") if len(files) == 1 else "protect_file"
    return load_protection(
        settings.protect, files, settings.protected_types, settings.protected_statuses, named
    )


def session(settings: Settings, *, concurrency: int | None = None) -> aiohttp.ClientSession:
    """The process's one HTTP session, its connector sized to the concurrency."""
    return make_session(
        concurrency=concurrency or settings.concurrency,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        ca_bundle=settings.ca_bundle,
        ca_bundle_named=settings.named("ca_bundle"),
    )


def ca_bundle_said(settings: Settings) -> str | None:
    """The CA bundle the session trusts as its user named it (``--ca-bundle ca.pem``), for
    the cure of a certificate refused; None when there is none."""
    if settings.ca_bundle is None:
        return None
    return f"{settings.named('ca_bundle')} {settings.ca_bundle}"


def check_ca_bundle(settings: Settings) -> None:
    """``ConfigError`` (78) for a ``ca_bundle`` that cannot be read or holds no PEM
    certificate, before anything is asked or sent: a dry run makes no session, and took a
    missing bundle without a word (exit 0) that the real run then refused."""
    if settings.ca_bundle is not None:
        from worker.api.session import tls_context

        tls_context(settings.ca_bundle, settings.named("ca_bundle"))


async def credentials(
    settings: Settings, http: aiohttp.ClientSession, *, announce: bool = True
) -> CredentialSource:
    """Keys from the first place that has them (settings, env, profile, pod, metadata), and
    an event saying which place that was: ``auto`` must never pick one silently (``announce``
    False: keys only for a look-up before the command's own, which says it)."""
    found = await resolve_credentials(
        ak=settings.ak,
        sk=settings.sk.get_secret_value() if settings.sk else None,
        security_token=(
            settings.security_token.get_secret_value() if settings.security_token else None
        ),
        environ=os.environ,
        session=http,
        metadata_url=settings.metadata_url,
        source=settings.credential_source,
        files=settings.secret_files,
    )
    if not announce:
        return found
    files = sorted(f"{key}_file {path}" for key, path in settings.secret_files.items())
    structlog.get_logger("devserver_reaper").info(
        "credentials.source",
        source=found.name,
        asked=settings.credential_source,
        files=files if found.name == "settings" and files else None,
    )
    return found


async def api_client(settings: Settings, http: aiohttp.ClientSession) -> ApiClient:
    """The client of the project in force, looked up in IAM first if it must be."""
    keys = await credentials(settings, http)
    return ApiClient(
        session=http,
        endpoint=settings.api_endpoint,
        project_id=(await resolve_project(settings, http, keys)).project_id,
        credentials=keys,
    )


def limiter(settings: Settings, clock: Clock) -> RateLimiter:
    """``--rate N``: exact pacing at N calls/s; ``--rate auto``: find the quota, pausing
    every call for a ``Retry-After`` no longer than ``max_retry_after``."""
    from worker.pacing.adaptive import build_limiter

    return build_limiter(
        settings.rate, settings.burst, clock, max_retry_after=settings.max_retry_after
    )


def starting_rate(settings: Settings) -> float:
    """The calls per second a limiter of these settings starts at, before any call: the
    fixed ``--rate``, or where ``--rate auto`` begins (its controller's first rate)."""
    if settings.rate == "auto":
        from worker.pacing.controller import AdaptiveConfig

        return AdaptiveConfig().initial_rate
    return float(settings.rate)


def shares_rate(settings: Settings) -> bool:
    """Whether ``run`` paces through the rate limit kept in Redis: when a ``redis_url`` is
    given (flag, environment or config file), as ``serve`` always does. Shards of one
    clean-up, and ``serve`` replicas on the same ``stream``, then share one quota."""
    return "redis_url" in settings.model_fields_set


async def rate_redis(settings: Settings) -> aioredis.Redis:
    """A Redis client for the shared rate limit, once it has answered (:func:`answering`)."""
    client = redis_client(settings.redis_url, timeout=10.0)
    try:
        await answering(client, settings.redis_url, kept="the shared rate limit")
    except BaseException:
        await client.aclose()
        raise
    return client


def shared_limiter(
    settings: Settings, client: aioredis.Redis, key: str, clock: Clock
) -> RateLimiter:
    """The rate limit every process on ``key`` shares, kept in Redis with the fleet's one
    rate (``worker.pacing.shared``, ``worker.pacing.fleet``).

    With ``--rate auto`` one process, the leader, runs the fleet's controller on every
    process's answers, and every process paces at its rate. With a fixed rate the fleet
    sends N calls/s together, and slows together while the server refuses them.
    """
    from worker.pacing.controller import AdaptiveConfig
    from worker.pacing.fleet import FleetRateController
    from worker.pacing.shared import RedisRateLimiter

    if settings.rate == "auto":
        config = AdaptiveConfig(max_pause=settings.max_retry_after)  # as run's limiter
        return FleetRateController(client, key, clock, config=config)
    return RedisRateLimiter(client, key, rate=settings.rate, burst=settings.burst, clock=clock)


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.max_attempts,
        base_delay=settings.retry_base_delay,
        max_retry_after=settings.max_retry_after,
    )


def processor(
    settings: Settings,
    *,
    transport: Api | None,
    limiter: RateLimiter,
    journal: Journal,
    clock: Clock,
    stopping: Callable[[], bool],
    protection: Protection,
    plan: PlanCheck | None = None,
    working: Working | None = None,
    gate: BreakerGate | None = None,
    listing: Sequence[Mapping[str, str]] | None = None,
    warn: Callable[..., None] = lambda event, **fields: None,
    budget: DeletionBudget | None = None,
    sizes: BatchSize | None = None,
    keep_sizes: Callable[[Learnt], Awaitable[None]] | None = None,
) -> BatchProcessor:
    """The dispatcher, wrapped in the guard when jobs are protected or a plan binds the run.

    ``transport`` is None in a dry run of ids: nothing is read or sent then (a dry run of
    a plan reads, and its dispatcher sends nothing). ``working`` counts
    the dispatchers at work, for a stopping run to wait on (``Pipeline``). ``gate``: the
    circuit breaker every call, read or delete, asks before it takes a rate token.
    ``listing``: the list calls' queries whose pages re-check the jobs before their DELETE
    (see ``worker.discovery.recheck``); ``None`` checks each job with a show call.
    ``budget``: ``--max-deletions`` with what earlier runs on the ledger spent of it.
    ``sizes``: what earlier runs on the ledger learnt of the largest call the API takes,
    and ``keep_sizes`` keeps what this one learns (``worker.batchsize``).
    """
    policy = retry_policy(settings)
    if budget is None:
        budget = DeletionBudget(settings.max_deletions)
    if plan is not None:  # a DELETE waiting for its token stops waiting at the plan's expiry
        limiter = ExpiringLimiter(limiter, clock)
    dispatcher = Dispatcher(
        transport=transport,  # type: ignore[arg-type]  # None only in a dry run: never called
        limiter=limiter,
        policy=policy,
        journal=journal,
        clock=clock,
        budget=budget,
        max_attempts=settings.max_attempts,
        dry_run=settings.dry_run,
        stopping=stopping,
        working=working,
        gate=gate,
        sizes=sizes,
        keep_sizes=keep_sizes,
    )
    if not protection.active and plan is None:
        return dispatcher
    reader = None
    if transport is not None:
        # The dispatcher's paced call: one breaker, one limiter, one count of who is working.
        reader = PacedReader(api=transport, paced=dispatcher.paced)
    recheck = None
    if reader is not None and listing is not None:
        recheck = ListingRecheck(
            reader=reader,
            queries=listing,
            clock=clock,
            # Handed out only while fresh for half the bound: the other half is for the
            # DELETE to wait its turn at the rate limiter.
            accept_age=settings.recheck_max_age / 2,
            warn=warn,
        )
    return Guard(
        inner=dispatcher,
        outcomes=journal,
        protection=protection,
        reader=reader,
        plan=plan,
        recheck=recheck,
        clock=clock,
        max_age=settings.recheck_max_age,
        budget=budget,
        deletes=not settings.dry_run,
    )
