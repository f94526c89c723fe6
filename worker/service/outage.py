"""Redis being away, said once and counted: the retry loop every Redis call of serve uses.

An outage of Redis used to log one bare ``ConnectionError`` line per failed call (ten a
second across the loops), none saying which Redis. Now the first failure of an outage is
one ``serve.redis_unreachable`` event naming the Redis (its URL without the password); the
calls that keep failing back off quietly (a ``debug`` event each) and are counted
(``devserver_reaper_redis_errors_total``); the first success after it is one
``serve.redis_back`` event with how long it lasted and how many calls failed meanwhile.

A key of the queue replaced by another type while serve runs (``WRONGTYPE``) is not an
outage: it is :class:`NotAStream`, a setting to fix, which the service answers by pausing
unready (``worker.service.service``) and ``serve`` at start-up by exiting 78.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.exceptions
import structlog

from worker.clock import Clock
from worker.errors import NotAStream

_T = TypeVar("_T")

REDIS_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)
"""Failures of Redis itself (not of a command): wait and try again. A Redis at its
``maxmemory`` (``OOM``) refuses writes until memory is freed, much as an absent one does;
a replica (``READONLY``: a failover demoted the primary the URL names) refuses them until
the URL leads to a primary again, as the shared rate limit already waits it out."""


REFUSED = (
    "Redis refuses the user or password of redis_url (changed on the server?): nothing is "
    "sent until it takes them again; give the replicas the new password and restart them"
)
"""What ``serve.redis_refused`` says: Redis answers, and refuses our credentials."""


def wrong_type(error: BaseException) -> bool:
    return isinstance(error, redis.exceptions.ResponseError) and "WRONGTYPE" in str(error)


def redis_where(url: str) -> str:
    """The Redis a URL names, fit for a log line: scheme, user, host, port and database, never
    the password (nor anything else the query may carry)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    user = f"{parts.username}@" if parts.username else ""
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{user}{parts.hostname or ''}{port}{parts.path}"


class Outage:
    """Whether Redis answers, as the calls that use it find out."""

    def __init__(
        self,
        events: Any,
        clock: Clock,
        *,
        where: str,
        count: Callable[[], None] | None = None,
    ) -> None:
        self._events = events
        self._clock = clock
        self._where = where
        self._count = count
        self._since: float | None = None
        self._failed_now = 0
        self._refused = False
        self._certificate = False
        self.failures = 0
        self.outages = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, operation: str, error: BaseException) -> None:
        """A call failed for want of Redis: said once per outage, counted every time."""
        self.failures += 1
        self._failed_now += 1
        if self._count is not None:
            self._count()
        refused = isinstance(error, redis.exceptions.AuthenticationError)
        if refused and not self._refused:  # it answers, but not to us: said apart, once
            self._refused = True
            self._events.error("serve.redis_refused", redis=self._where, error=REFUSED)
        distrusted = self._distrusted(error)
        if self._since is None:
            self._since = self._clock.now()
            self.outages += 1
            if not refused and not distrusted:
                self._events.error("serve.redis_unreachable", redis=self._where,
                                   operation=operation, error=type(error).__name__)  # fmt: skip
        else:
            structlog.get_logger("devserver_reaper").debug(
                "serve.redis_error", operation=operation, error=type(error).__name__
            )

    def _distrusted(self, error: BaseException) -> bool:
        """``error`` is a ``rediss://`` certificate refused (a Redis that answers, with a
        certificate not trusted here): said apart, once an outage, in words
        (``serve.redis_certificate_refused``), not as a Redis away."""
        from worker.redis_link import certificate_refusal

        said = certificate_refusal(error, self._where, kept="the queue",
                                   done="nothing is read until it is trusted again")  # fmt: skip
        if said is None:
            return False
        if not self._certificate:
            self._certificate = True
            self._events.error("serve.redis_certificate_refused", redis=self._where,
                               error=str(said))  # fmt: skip
        return True

    def answered(self) -> None:
        """A call got its answer: an outage, if there was one, is over."""
        if self._since is None:
            return
        self._events.note("serve.redis_back", redis=self._where,
                          down_s=round(self._clock.now() - self._since, 3),
                          failed_calls=self._failed_now)  # fmt: skip
        self._since = None
        self._failed_now = 0
        self._refused = False
        self._certificate = False

    async def persist(
        self, operation: Callable[[], Awaitable[_T]], *, what: str, max_delay: float = 5.0
    ) -> _T:
        """Run a Redis operation until it succeeds, backing off while Redis does not answer."""
        delay = 0.1
        while True:
            try:
                answer = await operation()
            except REDIS_ERRORS as exc:
                self.failed(what, exc)
                await self._clock.sleep(delay)
                delay = min(max_delay, delay * 2)
                continue
            except redis.exceptions.ResponseError as exc:
                if wrong_type(exc):
                    raise NotAStream(f"{what}: a key of the queue holds another type") from None
                raise
            self.answered()
            return answer

    def __repr__(self) -> str:
        return (
            f"Outage(redis={self._where!r}, down={self.down}, outages={self.outages}, "
            f"failures={self.failures})"
        )
