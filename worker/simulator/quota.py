"""The gateway's quota over every API call, with time passed in: a token bucket, or a count
over a long window (``WindowCount``: a quota stated per second, enforced per 10 s or per
minute, as gateways that count do).

Pure arithmetic: the caller passes the monotonic time, so tests script it instead of
sleeping, and the HTTP layer turns a refusal into a 429 with ``Retry-After``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal, Protocol

WindowKind = Literal["fixed", "sliding"]
WINDOW_KINDS: tuple[WindowKind, ...] = ("fixed", "sliding")


class Quota(Protocol):
    def try_acquire(self, now: float) -> float:
        """0.0 for an accepted call, else the seconds until one would be."""
        ...


class TokenBucket:
    """``rate`` tokens per second, at most ``capacity`` stored; ``rate == 0`` means no limit."""

    __slots__ = ("_stamp", "_tokens", "capacity", "rate")

    def __init__(self, rate: float, capacity: int, now: float) -> None:
        if rate < 0 or capacity < 1:
            raise ValueError("a token bucket needs rate >= 0 and capacity >= 1")
        self.rate = rate
        self.capacity = capacity
        self._tokens = float(capacity)
        self._stamp = now

    def __repr__(self) -> str:
        return (
            f"TokenBucket(rate={self.rate:g}, capacity={self.capacity}, tokens={self._tokens:.3f})"
        )

    def _refill(self, now: float) -> None:
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(float(self.capacity), self._tokens + elapsed * self.rate)
        self._stamp = max(self._stamp, now)

    def try_acquire(self, now: float) -> float:
        """Take one token and return 0.0, or take none and return the seconds until one exists."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    @property
    def tokens(self) -> float:
        return self._tokens


class WindowCount:
    """At most ``quota * span`` calls accepted per window of ``span`` seconds (at least one).
    ``fixed``: the count starts again at each window's start (windows from ``now`` at
    construction), and a call past it waits for the next window's start. ``sliding``: any
    rolling ``span`` seconds (the accepted calls' times are kept; a refused call is not
    counted), and a call past it waits for the oldest of them to leave."""

    __slots__ = ("_log", "count", "kind", "limit", "span", "start")

    def __init__(self, quota: float, span: float, kind: WindowKind, now: float) -> None:
        if quota <= 0 or span <= 0 or kind not in WINDOW_KINDS:
            raise ValueError("a window count needs quota > 0, span > 0, fixed or sliding")
        self.limit = max(1, round(quota * span))
        self.span = span
        self.kind = kind
        self.start = now  # the fixed window's start
        self.count = 0  # calls accepted in the fixed window
        self._log: deque[float] = deque()  # the sliding window's accepted calls

    def __repr__(self) -> str:
        used = self.count if self.kind == "fixed" else len(self._log)
        return f"WindowCount({self.kind}, limit={self.limit}, span={self.span:g}, used={used})"

    def try_acquire(self, now: float) -> float:
        """Count one call and return 0.0, or count none and return the seconds until the
        window's end (fixed) or until the oldest call counted leaves it (sliding)."""
        if self.kind == "fixed":
            if now >= self.start + self.span:
                self.start += math.floor((now - self.start) / self.span) * self.span
                self.count = 0
            if self.count < self.limit:
                self.count += 1
                return 0.0
            return self.start + self.span - now
        log = self._log
        while log and log[0] <= now - self.span:
            log.popleft()
        if len(log) < self.limit:
            log.append(now)
            return 0.0
        return log[0] + self.span - now


def retry_after_seconds(wait: float) -> int:
    """``Retry-After`` in whole seconds: rounded up, never below 1."""
    return max(1, math.ceil(wait - 1e-9))
