"""The gateway's quota: a token bucket over every API call, with time passed in.

Pure arithmetic: the caller passes the monotonic time, so tests script it instead of
sleeping, and the HTTP layer turns a refusal into a 429 with ``Retry-After``.
"""

from __future__ import annotations

import math


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


def retry_after_seconds(wait: float) -> int:
    """``Retry-After`` in whole seconds: rounded up, never below 1."""
    return max(1, math.ceil(wait - 1e-9))
