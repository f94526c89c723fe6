"""A fixed ``--rate`` that the server keeps refusing slows itself down for a while.

``--rate N`` is a promise to pace at N calls/s, made by someone who believed the quota was
at least N. When the server says otherwise (429s), sending at N anyway only collects
refusals until every batch has spent its retries. So a fixed rate behaves like a polite
client: a refusal of a call sent since the last cut (refusals of calls sent before it were
sent at the old pace and say nothing new) that comes within ``window`` of the last one
multiplies the pace by ``cut``; one that is the first for a while only marks the time
(``first_cut`` is 1). After ``hold`` seconds without a refusal the pace climbs back by
``growth`` per ``hold``, up to the rate asked. The first refusal does not cut because at a
quota the rate asked matches, a call that a loaded machine sends late arrives in a clump
with the next ones, and the gateway refuses one of them: that says "a clump", not "too
fast" (shared by a fleet, each such refusal cut to 0.7 cost it a tenth of its quota over
the next 20 s). A rate really over the quota is refused again within a second. Each
change is an event (``rate.slowed``, ``rate.restored``), so the operator learns that the
quota is lower than the setting.

``Slowdown`` is the arithmetic, pure, over times passed in; ``SlowingLimiter`` applies it to
a limiter whose rate can be set (``LocalRateLimiter``). For processes sharing a quota the
same arithmetic runs in Redis, on the fleet's pace (``worker.pacing.shared``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from worker.clock import Clock


@dataclass(frozen=True, slots=True)
class SlowdownConfig:
    cut: float = 0.85  # a refusal within ``window`` s of the last multiplies the pace by
    window: float = 1.0  # this, the first for a while by ``first_cut`` ...
    first_cut: float = 1.0
    min_rate: float = 0.2  # ... never below this
    hold: float = 2.0  # seconds without a refusal before the pace climbs ...
    growth: float = 1.1  # ... by this factor, each ``hold``, up to the rate asked

    def __post_init__(self) -> None:
        if not (0 < self.cut < 1 and self.cut <= self.first_cut <= 1 and self.growth > 1):
            raise ValueError("need 0 < cut < 1, cut <= first_cut <= 1 and growth > 1")
        if not self.window >= 0:
            raise ValueError("need window >= 0")
        if not (self.min_rate > 0 and self.hold > 0):
            raise ValueError("need min_rate > 0 and hold > 0")


class Slowdown:
    """The pace of a fixed rate the server refuses. Pure: every method takes ``now``."""

    __slots__ = ("_config", "_cut_at", "_since", "asked", "pace")

    def __init__(self, rate: float, config: SlowdownConfig | None = None) -> None:
        self._config = config or SlowdownConfig()
        self.asked = float(rate)
        self.pace = float(rate)
        self._cut_at = -math.inf  # the last refusal that was news: ones sent before are old
        self._since = -math.inf  # the last change of pace

    @property
    def slowed(self) -> bool:
        return self.pace < self.asked

    def refused(self, now: float, sent: float) -> bool:
        """A 429 for a call sent at ``sent``: whether the pace was cut. A refusal that is
        news marks the time even when it does not cut: the next within ``window`` does."""
        if sent < self._cut_at:
            return False
        was = self.pace_at(now)  # the climb back since the last cut comes first
        c = self._config
        factor = c.cut if now - self._cut_at <= c.window else c.first_cut
        self.pace = max(c.min_rate, min(self.asked, was * factor))
        self._cut_at = self._since = now
        return self.pace < was

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


class SlowingLimiter:
    """A fixed-rate ``RateLimiter`` that slows itself while the server refuses its pace
    (not a ``FixedRate``: its answers move the pace)."""

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
