"""A Redis client for a URL, its first ``PING``, and a ``rediss://`` certificate refused,
said in words: for ``enqueue``, ``serve`` and a run's shared rate limit.

Apart from ``worker.wiring`` so that ``enqueue``, which calls no API, imports neither it nor
the HTTP stack it builds the API client with (aiohttp: 0.15 s of CPU of a start).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from worker.errors import ConfigError, RedisCertificateRefused, RedisUnavailable

if TYPE_CHECKING:
    import redis.asyncio as aioredis


def redis_client(
    url: str,
    *,
    timeout: float,
    health_check_interval: int = 0,
    single_connection: bool = False,
    entries: bool = False,
) -> aioredis.Redis:
    """A Redis client for ``url`` (``ConfigError``, 78, for one that is not a Redis URL);
    nothing is sent until it is used. ``timeout``: for each command's answer. ``entries``:
    a client only for the calls that read stream entries, which keeps no more of one than
    the entry size limit (``worker.service.bounded``)."""
    import redis.asyncio as aioredis

    from worker.service.bounded import BoundedParser

    bounded: dict[str, Any] = {"parser_class": BoundedParser} if entries else {}
    try:
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=5.0,
            health_check_interval=health_check_interval,
            single_connection_client=single_connection,
            **bounded,
        )
    except ValueError as exc:
        raise ConfigError(f"redis_url is not a Redis URL: {exc}") from None
    _takes_its_query(client, url)
    return client


def _takes_its_query(client: aioredis.Redis, url: str) -> None:
    """redis-py passes a URL's every ``?name=value`` to its connections, and a name its
    connection does not take (``ssl_ca_certs`` on a ``redis://`` URL, a typo) raised
    ``TypeError`` with a traceback at the first command: a connection is made here, which
    sends nothing, to say it in words (the name only: the URL may carry a password)."""
    pool = client.connection_pool
    try:
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        name = re.search(r"argument '(\w+)'", str(exc))
        said = f"?{name.group(1)}=" if name else "a setting in its query"
        tls = " is a setting of rediss:// (TLS), not of this scheme"
        raise ConfigError(
            f"redis_url: {said}"
            + (tls if name and name.group(1).startswith("ssl") else " is not a Redis setting")
        ) from None


async def answering(client: aioredis.Redis, url: str, *, kept: str) -> None:
    """``PING`` once: ``ConfigError`` (78) for a URL or credentials Redis refuses,
    ``RedisUnavailable`` (69) for a Redis that does not answer, named without its password
    (``kept``: what is kept there, for the message). The caller closes ``client``."""
    from worker.service.outage import REDIS_ERRORS, redis_where

    try:
        await trusted_ping(client, url, kept=kept)
    except REDIS_ERRORS as exc:
        raise RedisUnavailable(
            f"Redis at {redis_where(url)}, where {kept} is kept, does not answer "
            f"({type(exc).__name__}); nothing was sent",
            cause=type(exc).__name__,
        ) from None


async def trusted_ping(
    client: aioredis.Redis, url: str, *, kept: str, done: str = "nothing was sent"
) -> None:
    """``PING`` once (``worker.service.consumer.ping``): a ``rediss://`` certificate refused
    is raised as :func:`certificate_refusal` says it, any other Redis error as it came."""
    from worker.service.consumer import ping
    from worker.service.outage import REDIS_ERRORS

    try:
        await ping(client)
    except REDIS_ERRORS as exc:
        if (refused := certificate_refusal(exc, url, kept=kept, done=done)) is not None:
            raise refused from None
        raise


def certificate_refusal(
    exc: BaseException, url: str, *, kept: str, done: str = "nothing was sent"
) -> RedisCertificateRefused | None:
    """``exc`` said as a ``rediss://`` Redis whose certificate was refused (69: asking again
    changes nothing), named without its password (``kept``: what is kept there; ``done``:
    what that left undone); None when that is not what failed."""
    from worker.service.outage import redis_where

    if (why := _certificate_refused(exc)) is None:
        return None
    return RedisCertificateRefused(
        f"the TLS certificate of Redis at {redis_where(url)}, where {kept} is kept, "
        f"was refused ({why}); {done}",
        cause="certificate",
    )


def _certificate_refused(exc: BaseException) -> str | None:
    """Why a ``rediss://`` Redis's certificate was refused (``self-signed certificate``), or
    None when that is not what failed: redis-py says "Error 1 connecting to HOST:PORT.
    [SSL: CERTIFICATE_VERIFY_FAILED] ...", its ``ssl`` error the context, and it was read
    as a Redis that does not answer."""
    import ssl

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or "certificate verify failed"
        seen = seen.__cause__ or seen.__context__
    return None
