"""A fixed ``--rate`` that the server keeps refusing slows itself down for a while.

``--rate N`` is a promise to pace at N calls/s, made by someone who believed the quota was
at least N. When the server says otherwise (429s), sending at N anyway only collects
refusals until every batch has spent its retries. So a fixed rate follows a quota under N:
but only a *share* of refusals says so. At a quota the rate matches, a gateway with a small
burst refuses every call that reaches it less than an interval after the last, and a
loaded machine's calls reach it unevenly however evenly they start (three replicas at a
quota of 30 calls/s, burst 1: 1.8 % of calls refused, one for one the share of arrival
gaps shorter than 1/quota). Cutting for those (two refusals within a second used to cut
by 0.85) cost the fleet a third of its quota, and retrying them costs nothing.

So which of the two the refusals say is a sequential test on the calls (CUSUM): each call
sent is evidence of ``jitter`` (the share of calls a steady rate loses to a loaded
machine's timing), each refusal of a call sent since the last cut (refusals of calls sent
before it were sent at the old pace and say nothing new) evidence of ``quota`` (a share
that says the quota is under the pace), by their log-likelihood ratio; the sum never goes
below 0, and the pace is cut by ``cut`` when it reaches ``evidence``. Medians over random
refusals, in calls until the first cut: 13 at half the calls refused (a pace over a
gateway's burst of 1: six refusals in a row cut), 22 at 30 %, 112 at 10 %, 1,500 at 5 %;
about 60,000 at 3 % and 1.5 million at 2 %. Over real HTTP the refusals of jitter come in
clumps (a replica held up sends its late calls together): at ``evidence`` 6 three
replicas at a quota of 30 calls/s still cut about once in 20 s.

After ``hold`` seconds without a cut the pace climbs back by ``growth`` per ``hold``, up to
the rate asked. One cut from the rate asked may be a false alarm and the climb goes all
the way back; but a pace found over the quota twice (a slowed pace cut again, or the rate
asked cut again within ``probe`` s) is a step (``growth``) too high, and the climb stops
short of it until ``probe`` s after that cut: at a gateway's burst of 1 a pace just over
the quota loses every other call, so probing past it each ``hold`` refused 7 % of the
calls at a quota of 0.7 N on virtual time, against 3-4 % with a probe each 20 s. Each
change is an event (``rate.slowed``, ``rate.restored``), so the operator learns that the
quota is lower than the setting.

``Slowdown`` is the arithmetic, pure, over times passed in; ``SlowingLimiter`` applies it to
a limiter whose rate can be set (``LocalRateLimiter``). For processes sharing a quota the
same arithmetic runs in Redis, on the fleet's pace (``worker.pacing.shared``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from worker.clock import Clock


@dataclass(frozen=True, slots=True)
class SlowdownConfig:
    jitter: float = 0.03  # the share of calls refused at a steady rate the quota allows ...
    quota: float = 0.12  # ... and a share that says the quota is under the pace:
    evidence: float = 8.0  # the log-likelihood ratio of the second over the first that cuts
    cut: float = 0.85  # the pace by this factor ...
    min_rate: float = 0.2  # ... never below this
    hold: float = 2.0  # seconds without a cut before the pace climbs ...
    growth: float = 1.1  # ... by this factor, each ``hold``, up to the rate asked (or a
    probe: float = 20.0  # step short of a pace cut twice, until this long after the cut)
    window: int = 1000  # a warning says it when more than ``jitter`` of the last this many
    least: int = 500  # answers (at least this many) were refusals ...
    warn_every: float = 60.0  # ... at most once in this many seconds, of answers since
    idle: float = 60.0  # the last spell of this many seconds without a call (a queue idle)

    def __post_init__(self) -> None:
        if not (0 < self.jitter < self.quota < 1 and self.evidence > 0):
            raise ValueError("need 0 < jitter < quota < 1 and evidence > 0")
        if not (0 < self.cut < 1 and self.growth > 1):
            raise ValueError("need 0 < cut < 1 and growth > 1")
        if not (self.min_rate > 0 and 0 < self.hold <= self.probe):
            raise ValueError("need min_rate > 0 and 0 < hold <= probe")
        if not (0 < self.least <= self.window and self.warn_every > 0 and self.idle > 0):
            raise ValueError("need 0 < least <= window and warn_every, idle > 0")

    @property
    def per_call(self) -> float:
        """What a call sent takes from the evidence (it was accepted, most likely)."""
        return math.log((1 - self.jitter) / (1 - self.quota))

    @property
    def per_refusal(self) -> float:
        """What a refusal adds (its call, sent, took ``per_call``)."""
        return math.log(self.quota / self.jitter) + self.per_call


class Slowdown:
    """The pace of a fixed rate the server refuses. Pure: every method takes ``now``."""

    __slots__ = ("_cap", "_config", "_cut_at", "_since", "asked", "evidence", "pace")

    def __init__(self, rate: float, config: SlowdownConfig | None = None) -> None:
        self._config = config or SlowdownConfig()
        self.asked = float(rate)
        self.pace = float(rate)
        self._cut_at = -math.inf  # the last cut: refusals of calls sent before are old
        self._since = -math.inf  # the last change of pace
        self.evidence = 0.0  # that the quota is under the pace, since the last cut
        self._cap = self.asked  # the climb's top until ``probe`` after the last cut

    @property
    def slowed(self) -> bool:
        return self.pace < self.asked

    def sent(self) -> None:
        """A call sent."""
        self.evidence = max(0.0, self.evidence - self._config.per_call)

    def refused(self, now: float, sent: float) -> bool:
        """A 429 for a call sent at ``sent``: whether the pace was cut."""
        if sent < self._cut_at:
            return False
        was = self.pace_at(now)  # the climb back since the last cut comes first
        c = self._config
        self.evidence += c.per_refusal
        if self.evidence < c.evidence:
            return False
        # A pace found over the quota twice (a slowed one, or the rate asked again within
        # ``probe``) is a step too high until ``probe``; once is a false alarm maybe.
        twice = was < self.asked or now - self._cut_at < c.probe
        self._cap = was / c.growth if twice else self.asked
        self.pace = max(c.min_rate, was * c.cut)
        self._cut_at = self._since = now
        self.evidence = 0.0
        return self.pace < was

    def pace_at(self, now: float) -> float:
        """The pace at ``now``: it climbs back a step each ``hold`` without a cut."""
        c = self._config
        if self.slowed and now - self._since >= c.hold:
            steps = math.floor((now - self._since) / c.hold)
            top = self.asked if now - self._cut_at >= c.probe else self._cap
            self.pace = max(self.pace, min(top, self.pace * c.growth**steps))
            self._since += steps * c.hold
        return self.pace

    def __repr__(self) -> str:
        return f"Slowdown(asked={self.asked:g}, pace={self.pace:.4g})"


class RefusedShare:
    """Whether a fixed rate is over the quota by less than a cut needs: the share of the
    last ``window`` answers refused, said (``answered`` returns the warning's fields) when
    it is over the ``jitter`` level, at most once each ``warn_every`` s. Pure: every method
    takes the time.

    At a quota 5 % under the rate a gateway with a burst refuses one call in twenty, evenly:
    each refusal's evidence is taken back by the calls accepted before the next, so the
    test never cuts (a loaded machine's jitter looks alike, and must not slow the rate),
    and the operator learnt of it from nothing but throttled retries and a counter. The
    warning names the share and the rate the server accepted, and changes nothing.

    Answers before ``idle`` s without a call are forgotten: a queue idle for an hour
    between two spells held the first spell's answers in the window, and the rate accepted
    "from the first of them on" came out at 0.16 calls/s of a server that accepted 28.5
    whenever it was asked."""

    __slots__ = ("_answers", "_config", "_refused", "_said_at")

    def __init__(self, config: SlowdownConfig | None = None) -> None:
        self._config = config or SlowdownConfig()
        self._answers: deque[tuple[float, bool]] = deque()  # (sent, refused)
        self._refused = 0
        self._said_at = -math.inf

    def answered(self, now: float, sent: float, refused: bool) -> dict[str, float] | None:
        """An answer to a call sent at ``sent``: the warning's fields when it is due
        (``refused``, the share; ``calls``, how many it is of; ``accepted``, calls/s the
        server accepted from the first of them on), else ``None``."""
        c, answers = self._config, self._answers
        if answers and sent - answers[-1][0] > c.idle:
            self.forget()
        answers.append((sent, refused))
        self._refused += refused
        if len(answers) > c.window:
            self._refused -= answers.popleft()[1]
        share = self._refused / len(answers)
        if len(answers) < c.least or share <= c.jitter or now - self._said_at < c.warn_every:
            return None
        self._said_at = now
        span = max(now - answers[0][0], 1e-9)
        accepted = len(answers) - self._refused
        return {"refused": round(share, 4), "calls": len(answers),
                "accepted": round(accepted / span, 3)}  # fmt: skip

    def forget(self) -> None:
        """Start the count again (the pace was cut: its answers are another rate's)."""
        self._answers.clear()
        self._refused = 0

    def __repr__(self) -> str:
        return f"RefusedShare(refused={self._refused}, of={len(self._answers)})"


class Settable(Protocol):
    """A limiter whose rate can be changed while it runs."""

    @property
    def rate(self) -> float: ...

    def set_rate(self, rate: float) -> None: ...

    async def acquire(self) -> None: ...


Notify = Callable[..., Any]
"""``notify(event, **fields)``: where the ``rate.*`` events go (a structlog method)."""


def over_quota(
    share: RefusedShare,
    notify: Notify,
    now: float,
    *,
    latency_s: float | None,
    throttled: bool,
    pace: float,
    asked: float,
) -> None:
    """Tell ``share`` of an answer and say ``rate.over_quota`` (a warning) when it is due:
    ``rate`` the pace now, ``asked`` the rate set, and ``RefusedShare.answered``'s fields.

    Only answers while the pace is the rate asked count: a cut starts the count again. The
    warning is for refusals too few to cut; where they cut, ``rate.slowed`` says so. At a
    gateway of exactly the rate, burst 1, a loaded machine's jitter has 3-5 % refused and
    cut every 5-20 s: counted through the cuts, it was said once a minute that 30 calls/s
    was over a quota of 30 (``tests/test_over_quota.py``)."""
    if pace < asked * (1 - 1e-9):
        share.forget()
        return
    if (said := share.answered(now, now - (latency_s or 0.0), throttled)) is not None:
        notify("rate.over_quota", rate=round(pace, 3), asked=asked, **said)


class SlowingLimiter:
    """A fixed-rate ``RateLimiter`` that slows itself while the server refuses its pace
    (not a ``FixedRate``: its answers move the pace)."""

    __slots__ = ("_clock", "_inner", "_notify", "_share", "slowdown", "throttles")

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
        self._share = RefusedShare(config)
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
        s.sent()

    def feedback(
        self,
        *,
        throttled: bool,
        latency_s: float | None = None,
        retry_after: float | None = None,
        overloaded: bool = False,
    ) -> None:
        now = self._clock.now()
        over_quota(
            self._share, self._notify, now, latency_s=latency_s, throttled=throttled,
            pace=self.rate, asked=self.slowdown.asked,
        )  # fmt: skip
        if not throttled:
            return
        self.throttles += 1
        if self.slowdown.refused(now, now - (latency_s or 0.0)):
            pace = self.slowdown.pace
            self._inner.set_rate(pace)
            self._notify(
                "rate.slowed", rate=round(pace, 3), asked=self.slowdown.asked,
                reason="throttled",
            )  # fmt: skip

    def __repr__(self) -> str:
        return f"SlowingLimiter({self.slowdown!r}, throttles={self.throttles}, {self._inner!r})"
