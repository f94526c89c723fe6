"""One rate limit for every replica: GCRA kept atomically in Redis.

N replicas each with their own ``LocalRateLimiter(rate)`` would send N x ``rate`` calls per
second. Here the limiter's whole state is one number in Redis, the *theoretical arrival
time* (``tat``: when the bucket will be full again, in microseconds of the Redis server's
clock), and a Lua script reserves a start time atomically. It is the same arithmetic as
``worker.pacing.bucket.TokenBucket`` (``burst`` calls at once after an idle spell, then exactly
``1 / rate`` apart), so a fleet behaves like one process with a ``LocalRateLimiter``.

Why this shape:

- The script reads ``TIME`` on the Redis server, so replicas whose clocks disagree still
  agree on the schedule; each caller only sleeps the *relative* wait it is handed.
- It reserves (and returns how long to wait) rather than refusing: no polling, strict
  FIFO across replicas, one round trip per call.
- All arithmetic is in integer microseconds (exact in Lua's doubles) with the spacing
  rounded up, so rounding can only make the fleet slower than ``rate``, never faster.
- A waiter cancelled while sleeping gives its slot back only when it holds the latest
  reservation (compare-and-set on ``tat``), as the local bucket does.
- The key expires once the bucket is full again, so an idle queue leaves nothing behind.

When Redis does not answer, ``acquire`` waits and asks again: a call not made is always
safe, and the service is unready meanwhile anyway.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from worker.clock import Clock
from worker.pacing.bucket import FixedRate

_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local start = new_tat - burst * interval
if start < now then start = now end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
           'PX', math.floor((new_tat - now) / 1000) + 1000)
return {string.format('%.0f', start), string.format('%.0f', now),
        string.format('%.0f', new_tat)}
"""

_REFUND = """
local tat = redis.call('GET', KEYS[1])
if tat ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local back = tonumber(tat) - tonumber(ARGV[2])
if back <= now then redis.call('DEL', KEYS[1]) return 1 end
redis.call('SET', KEYS[1], string.format('%.0f', back),
           'PX', math.floor((back - now) / 1000) + 1000)
return 1
"""

_REDIS_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    redis.exceptions.OutOfMemoryError,  # at its maxmemory: no write until memory is freed
)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A start time handed out by the script, in microseconds of the Redis server's clock.

    ``wait_s`` is how long the caller sleeps; ``token`` identifies the reservation for a
    refund (the ``tat`` it left behind).
    """

    start_us: int
    now_us: int
    token: str

    @property
    def wait_s(self) -> float:
        return max(0, self.start_us - self.now_us) / 1_000_000


def interval_us(rate: float) -> int:
    """Microseconds between two calls at ``rate``, rounded up (never faster than ``rate``)."""
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number of calls per second > 0, not {rate!r}")
    return max(1, math.ceil(1_000_000 / rate))


class RedisRateLimiter(FixedRate):
    """A ``worker.pacing.bucket.RateLimiter`` whose bucket lives in Redis at ``key``."""

    def __init__(
        self,
        client: aioredis.Redis,
        key: str,
        *,
        rate: float,
        burst: int,
        clock: Clock,
        retry_s: float = 0.5,
    ) -> None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, not {burst!r}")
        self._interval = interval_us(rate)
        self._rate = float(rate)
        self._burst = burst
        self._key = key
        self._clock = clock
        self._retry_s = retry_s
        self._reserve: Any = client.register_script(_RESERVE)
        self._refund: Any = client.register_script(_REFUND)
        self.granted = 0
        self.waited_s = 0.0
        self.redis_errors = 0
        self._log = structlog.get_logger("devserver_reaper")

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    def set_rate(self, rate: float) -> None:
        """Space the next reservations at ``rate``: the adaptive controller moves it.

        The spacing travels with each reservation, so every replica's next call is spaced
        by the rate the last one set (``worker.pacing.adaptive.SharedAdaptiveLimiter``).
        """
        self._interval = interval_us(rate)
        self._rate = float(rate)

    async def reserve(self) -> Reservation:
        """Reserve the next start time (one round trip); the caller waits ``wait_s``."""
        start, now, token = await self._reserve(
            keys=[self._key], args=[self._interval, self._burst]
        )
        return Reservation(
            int(start), int(now), token.decode() if isinstance(token, bytes) else token
        )

    async def acquire(self) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                reservation = await self.reserve()
                break
            except _REDIS_ERRORS as exc:
                self.redis_errors += 1
                self._log.warning("ratelimit.redis_error", error=type(exc).__name__)
                await self._clock.sleep(self._retry_s)
        self.granted += 1
        wait = reservation.wait_s
        if wait <= 0:
            return
        self.waited_s += wait
        try:
            await self._clock.sleep(wait)
        except BaseException:
            # On failure the slot goes unused once: slower, never faster.
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(1.0),
                contextlib.suppress(*_REDIS_ERRORS),
            ):
                await self._refund(keys=[self._key], args=[reservation.token, self._interval])
            raise

    def __repr__(self) -> str:
        return (
            f"RedisRateLimiter(key={self._key!r}, rate={self._rate:g}, burst={self._burst}, "
            f"granted={self.granted}, waited_s={self.waited_s:.3f})"
        )
