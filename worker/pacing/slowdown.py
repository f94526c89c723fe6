"""A fixed ``--rate`` that the server keeps refusing slows itself down for a while.

``--rate N`` is a promise to pace at N calls/s, made by someone who believed the quota was
at least N. When the server says otherwise (429s), sending at N anyway only collects
refusals until every batch has spent its retries. So a fixed rate behaves like a polite
client: each refusal of a call sent since the last cut multiplies the pace by ``cut``
(refusals of calls sent before it were sent at the old pace and say nothing new); after
``hold`` seconds without a refusal the pace climbs back by ``growth`` per ``hold``, up to
the rate asked. Each change is an event (``rate.slowed``, ``rate.restored``), so the
operator learns that the quota is lower than the setting.

``Slowdown`` is the arithmetic, pure, over times passed in; ``SlowingLimiter`` applies it to
a limiter whose rate can be set (``LocalRateLimiter``, or ``RedisRateLimiter`` for replicas).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from worker.clock import Clock
from worker.pacing.bucket import FixedRate


@dataclass(frozen=True, slots=True)
class SlowdownConfig:
    cut: float = 0.7  # a refusal multiplies the pace by this ...
    min_rate: float = 0.2  # ... never below this
    hold: float = 5.0  # seconds without a refusal before the pace climbs ...
    growth: float = 1.1  # ... by this factor, each ``hold``, up to the rate asked

    def __post_init__(self) -> None:
        if not (0 < self.cut < 1 and self.growth > 1):
            raise ValueError("need 0 < cut < 1 and growth > 1")
        if not (self.min_rate > 0 and self.hold > 0):
            raise ValueError("need min_rate > 0 and hold > 0")


class Slowdown:
    """The pace of a fixed rate the server refuses. Pure: every method takes ``now``."""

    __slots__ = ("_config", "_cut_at", "_since", "asked", "pace")

    def __init__(self, rate: float, config: SlowdownConfig | None = None) -> None:
        self._config = config or SlowdownConfig()
        self.asked = float(rate)
        self.pace = float(rate)
        self._cut_at = -math.inf  # the last cut: refusals of calls sent before it are old
        self._since = -math.inf  # the last change of pace

    @property
    def slowed(self) -> bool:
        return self.pace < self.asked

    def refused(self, now: float, sent: float) -> bool:
        """A 429 for a call sent at ``sent``: whether the pace was cut."""
        if sent < self._cut_at:
            return False
        self.pace = max(self._config.min_rate, min(self.asked, self.pace * self._config.cut))
        self._cut_at = self._since = now
        return True

    def pace_at(self, now: float) -> float:
        """The pace at ``now``: it climbs back a step each ``hold`` without a refusal."""
        c = self._config
        if self.slowed and now - self._since >= c.hold:
            steps = math.floor((now - self._since) / c.hold)
            self.pace = min(self.asked, self.pace * c.growth**steps)
            self._since += steps * c.hold
        return self.pace

    def __repr__(self) -> str:
        return f"Slowdown(asked={self.asked:g}, pace={self.pace:.4g})"


class Settable(Protocol):
    """A limiter whose rate can be changed while it runs."""

    @property
    def rate(self) -> float: ...

    def set_rate(self, rate: float) -> None: ...

    async def acquire(self) -> None: ...


Notify = Callable[..., Any]
"""``notify(event, **fields)``: where the ``rate.*`` events go (a structlog method)."""


class SlowingLimiter(FixedRate):
    """A fixed-rate ``RateLimiter`` that slows itself while the server refuses its pace."""

    __slots__ = ("_clock", "_inner", "_notify", "slowdown", "throttles")

    def __init__(
        self,
        inner: Settable,
        clock: Clock,
        *,
        notify: Notify,
        config: SlowdownConfig | None = None,
    ) -> None:
        self._inner = inner
        self._clock = clock
        self._notify = notify
        self.slowdown = Slowdown(inner.rate, config)
        self.throttles = 0

    @property
    def rate(self) -> float:
        return self._inner.rate

    async def acquire(self) -> None:
        s = self.slowdown
        if s.slowed:
            pace = s.pace_at(self._clock.now())
            if pace != self._inner.rate:
                self._inner.set_rate(pace)
                if not s.slowed:
                    self._notify("rate.restored", rate=round(pace, 3))
        await self._inner.acquire()

    def feedback(
        self,
        *,
        throttled: bool,
        latency_s: float | None = None,
        retry_after: float | None = None,
        overloaded: bool = False,
    ) -> None:
        if not throttled:
            return
        self.throttles += 1
        now = self._clock.now()
        if self.slowdown.refused(now, now - (latency_s or 0.0)):
            pace = self.slowdown.pace
            self._inner.set_rate(pace)
            self._notify(
                "rate.slowed", rate=round(pace, 3), asked=self.slowdown.asked,
                reason="throttled",
            )  # fmt: skip

    def __repr__(self) -> str:
        return f"SlowingLimiter({self.slowdown!r}, throttles={self.throttles}, {self._inner!r})"
