"""``--rate auto``: find the API's undocumented quota, use nearly all of it, and keep to it.

``RateController`` is pure arithmetic over the times passed in (events in, the rate out; no
clock, no I/O), and what it has learnt is the frozen ``ControllerState``, a value another
controller can adopt (``restore``). The limiters that run it are in
``worker.pacing.adaptive``. How it moves, and why (startup, cruise and probes, refusals at
the level and measured quotas, 503s and latency), is in ``docs/rate-auto.md``; the names
of the constants below are the ones used there.
"""

from __future__ import annotations

import abc
import math
import statistics
from collections import deque
from dataclasses import dataclass, replace
from enum import StrEnum


class Phase(StrEnum):
    STARTUP = "startup"
    CRUISE = "cruise"
    PROBE = "probe"


@dataclass(frozen=True, slots=True)
class AdaptiveConfig:
    """The controller's constants. The defaults suit quotas from about 1 to 5,000 calls/s."""

    initial_rate: float = 2.0
    min_rate: float = 0.2
    max_rate: float = 10_000.0
    startup_interval: float = 0.75  # seconds per doubling while starting up
    margin: float = 0.05  # the level after startup: this far under the rate refused
    step: float = 0.03  # a probe goes this far above the level ...
    min_step: float = 0.01
    max_step: float = 1.0
    probe_time: float = 2.0  # ... for this long (or ``probe_calls`` calls, if longer)
    probe_calls: int = 10
    hold: float = 5.0  # first cruise before probing, seconds
    hold_growth: float = 3.0  # each refused probe makes the next cruise this much longer
    rebound_hold: float = 2.0  # the cruise after a cut in a row (never longer than hold) ...
    rebound_calls: int = 40  # ... or this many calls at the level, if longer
    max_hold: float = 30.0  # ... up to this: the longest a rise of the quota goes unseen
    beta: float = 0.85  # cut on throttles in a row while cruising (the first steps ``step``)
    window: float = 1.0  # seconds of recent sends that say how fast we really send
    latency_samples: int = 50  # answers per latency window
    latency_factor: float = 1.4  # a window is high above this times the baseline ...
    latency_floor_s: float = 0.05  # ... plus this
    latency_join: float = 0.25  # a window joins the baseline under this share of that rise
    latency_windows: int = 2  # high windows in a row that cut
    latency_baseline: int = 9  # the baseline: the median of this many windows, not high
    overload_answers: int = 50  # 503s are overload when they are ...
    overload_share: float = 0.2  # ... this share of the last answers (random ones are not)
    max_pause: float = 30.0  # longest Retry-After pause honoured
    shared: bool = False  # replicas share the rate: each sends only its share of the
    # calls and sees only its share of the refusals, so growth and probes do not wait for
    # it to send at the rate, and it does not measure the quota between two refusals

    def __post_init__(self) -> None:
        positive = ("initial_rate", "min_rate", "max_rate", "startup_interval", "step",
                    "min_step", "max_step", "probe_time", "hold", "max_hold", "window",
                    "max_pause", "rebound_hold")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, not {value!r}")
        if not self.min_rate <= self.initial_rate <= self.max_rate:
            raise ValueError("need min_rate <= initial_rate <= max_rate")
        if not (0 < self.beta < 1 and 0 <= self.margin < 1 and self.hold_growth >= 1):
            raise ValueError("need 0 < beta < 1, 0 <= margin < 1 and hold_growth >= 1")
        if self.step >= 1:
            raise ValueError("need step < 1: a refusal at the level steps down by it")
        counts = ("latency_samples", "latency_windows", "latency_baseline", "overload_answers")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        if not (self.latency_factor >= 1 and self.latency_floor_s >= 0):
            raise ValueError("need latency_factor >= 1 and latency_floor_s >= 0")
        if not 0 <= self.latency_join <= 1:
            raise ValueError("need 0 <= latency_join <= 1")
        if not 0 < self.overload_share <= 1:
            raise ValueError("need 0 < overload_share <= 1")


@dataclass(frozen=True, slots=True)
class ControllerState:
    """What the controller has learnt: small, immutable, storable (in Redis, say)."""

    rate: float  # calls/s to use now
    level: float  # the rate believed safe (startup: the rate reached so far)
    phase: Phase
    since: float  # when the phase began (startup: the last growth step)
    step: float  # the next probe's height over the level, as a fraction
    hold: float  # how long the next cruise lasts
    cut_at: float  # the last cut: throttles for calls sent before it are old news
    cuts: int  # refusals in a row at the level (each cuts harder)
    refused: float  # the lowest rate refused since the quota last rose (inf: none),
    # forgotten ``max_hold`` after the last cut: the quota may have risen since
    pause_until: float  # no call starts before this (Retry-After)
    below: float | None = None  # while a level a probe raised has not held for a whole
    # cruise: the level before it, which a refusal goes back to (None: the level held)

    @property
    def provisional(self) -> bool:
        return self.below is not None


class AnswerEvents(abc.ABC):
    """A controller's three events, and ``on_answer``: one answer as the limiters report it.

    Shared by :class:`RateController` and any other controller run under the same limiter
    (the benchmarks run a port of botocore's this way)."""

    __slots__ = ()

    @abc.abstractmethod
    def on_success(self, now: float, latency: float | None = None) -> float: ...

    @abc.abstractmethod
    def on_throttle(
        self, now: float, retry_after: float | None = None, latency: float | None = None
    ) -> float: ...

    @abc.abstractmethod
    def on_overload(self, now: float, latency: float | None = None) -> float: ...

    def on_answer(
        self,
        now: float,
        *,
        throttled: bool,
        latency_s: float | None,
        retry_after: float | None,
        overloaded: bool,
    ) -> None:
        """A 429, a 503, or anything else."""
        if throttled:
            self.on_throttle(now, retry_after, latency_s)
        elif overloaded:
            self.on_overload(now, latency_s)
        else:
            self.on_success(now, latency_s)


class RateController(AnswerEvents):
    """Pure arithmetic: events with their times in, the rate to use out.

    Call ``on_sent`` when a call starts, and ``on_success``, ``on_throttle`` or
    ``on_overload`` when it ends; each returns the rate from then on. ``rate_at(now)`` moves
    the phases along between events. Times passed in must not go backwards.
    """

    __slots__ = ("_answers", "_baseline", "_config", "_high", "_latencies", "_sends",
                 "_settle_until", "_slowest", "_state", "_window_rate")  # fmt: skip
    _baseline: deque[tuple[float, float]]  # windows not high: (latency, the rate then)

    def __init__(self, now: float, config: AdaptiveConfig | None = None) -> None:
        self._config = config or AdaptiveConfig()
        c = self._config
        self._state = ControllerState(
            rate=c.initial_rate,
            level=c.initial_rate,
            phase=Phase.STARTUP,
            since=now,
            step=c.step,
            hold=c.hold,
            cut_at=-math.inf,
            cuts=0,
            refused=math.inf,
            pause_until=-math.inf,
        )
        self._sends: deque[float] = deque()
        self._latencies: list[float] = []  # the latency window being filled ...
        self._window_rate = c.initial_rate  # ... from answers at this rate on
        self._baseline = deque(maxlen=c.latency_baseline)
        self._high = 0  # high latency windows in a row
        self._slowest = 0.0  # the slowest answer in the last window
        self._settle_until = -math.inf  # answers before this say nothing (see ``_cut``)
        self._answers: deque[bool] = deque(maxlen=c.overload_answers)  # True: a 503

    @property
    def config(self) -> AdaptiveConfig:
        return self._config

    @property
    def state(self) -> ControllerState:
        return self._state

    def restore(self, state: ControllerState) -> None:
        """Adopt a state learnt elsewhere (another replica's, through Redis)."""
        self._state = state

    @property
    def rate(self) -> float:
        return self._state.rate

    def pause_until(self) -> float:
        return self._state.pause_until

    # -- events --------------------------------------------------------------------------
    def on_sent(self, now: float) -> None:
        """A call starts: the measure of how fast we really send."""
        self._sends.append(now)

    def on_success(self, now: float, latency: float | None = None) -> float:
        """A call was answered (any answer but a throttle or a 503)."""
        rate = self.rate_at(now)
        self._answers.append(False)
        if latency is not None and latency >= 0 and now >= self._settle_until:
            # Windows are answers in the order they come, whenever their calls were sent:
            # counting only calls sent since a cut would fill the next window with the
            # ones that came back first, the fast ones.
            if not self._latencies:
                self._window_rate = rate
            self._latencies.append(latency)
            # A call sent before the last cut went out at the rate cut: no cut again for it.
            if self._latency_rising(rate) and now - latency >= self._state.cut_at:
                return self._cut(now, now - latency)
        return rate

    def on_throttle(
        self, now: float, retry_after: float | None = None, latency: float | None = None
    ) -> float:
        """A 429. ``latency`` dates the call: one sent before the last cut is old news.
        Its ``Retry-After`` pauses every call unless a probe was refused (see ``_cut``)."""
        return self._refusal(now, latency, retry_after, quota=True)

    def on_overload(self, now: float, latency: float | None = None) -> float:
        """A 503. Random ones, at a steady rate, are faults to retry, not a reason to slow
        down: only when 503s are ``overload_share`` of the last ``overload_answers``
        answers is the service overloaded, and that counts as a throttle without
        Retry-After, and not a quota's (no rate can be learnt from when it comes)."""
        answers = self._answers
        answers.append(True)
        c = self._config
        if sum(answers) < max(2.0, c.overload_share * c.overload_answers):
            return self.rate_at(now)
        answers.clear()  # the next cut needs as many again, sent at the new rate
        return self._refusal(now, latency, None, quota=False)

    def _refusal(
        self, now: float, latency: float | None, retry_after: float | None, *, quota: bool
    ) -> float:
        sent = now - latency if latency is not None and latency >= 0 else now
        if sent < self._state.cut_at:
            return self._state.rate  # the cut it belongs to has been made, pause and all
        return self._cut(now, sent, retry_after, quota=quota)

    # -- arithmetic ----------------------------------------------------------------------
    def _sent_rate(self, now: float, span: float | None = None) -> float:
        """Calls started per second over the last ``span`` seconds (``window`` by default).
        Sends older than that are forgotten."""
        span = self._config.window if span is None else span
        sends = self._sends
        horizon = now - span
        while sends and sends[0] < horizon:
            sends.popleft()
        return len(sends) / span

    def _latency_rising(self, rate: float) -> bool:
        """Whether a window of latencies has just filled, at ``rate``, and made
        ``latency_windows`` high ones in a row against the baseline, at a rate above the
        baseline's (see the module's docstring): then the rate is to be cut. A window not
        high joins the baseline with the rate it began at (startup grows while it fills:
        the lower rate is the one known to get the baseline's latency)."""
        c = self._config
        window = self._latencies
        if len(window) < c.latency_samples:
            return False
        window.sort()
        typical = statistics.fmean(window[: len(window) - len(window) // 10])
        self._slowest = window[-1]
        window.clear()
        baseline = self._baseline
        if baseline:
            usual = statistics.median(latency for latency, _ in baseline)
            rise = (c.latency_factor - 1.0) * usual + c.latency_floor_s
            if typical > usual + rise:
                self._high += 1
                if self._high < c.latency_windows:
                    return False
                self._high = 0
                if rate > min(sent_at for _, sent_at in baseline):
                    return True  # windows sent from now on say whether the cut was enough
                baseline.clear()  # high at a rate that was once calm: not our doing
            elif typical > usual + c.latency_join * rise:
                # Neither high nor the baseline's: a baseline that took in every window
                # under the bar would creep up a rise it is there to see.
                self._high = 0
                return False
        self._high = 0
        if self._state.phase is not Phase.STARTUP:
            # Not while starting up: as the rate doubles, the answers that come back first
            # are the fast ones, and a window of them says less than the latency is.
            baseline.append((typical, min(rate, self._window_rate)))
        return False

    def _probe_rate(self, s: ControllerState) -> float:
        """``step`` above the level, but no further than halfway to the lowest refused
        rate (a bisection), and at least ``min_step`` above the level; within half a
        ``step`` under that rate, just past it."""
        c = self._config
        rate = s.level * (1.0 + s.step)
        refused = self._refused(s)
        if refused <= s.level * (1.0 + c.step / 2.0):
            # So close under a refusal that halving the gap gains little: go just past the
            # refused rate, to confirm it, or to find that the quota has risen since.
            rate = max(refused, s.level) * (1.0 + c.min_step)
        elif math.isfinite(refused):
            rate = max(s.level * (1.0 + c.min_step), min(rate, (s.level + refused) / 2.0))
        return min(rate, c.max_rate)

    def _refused(self, s: ControllerState) -> float:
        """The lowest rate refused while it still counts (inf: none): ``max_hold`` after
        the last cut, the quota may have risen since."""
        return s.refused if s.since - s.cut_at <= self._config.max_hold else math.inf

    def _probe_length(self, rate: float) -> float:
        return max(self._config.probe_time, self._config.probe_calls / rate)

    def rate_at(self, now: float) -> float:
        """The rate at ``now``: startup grows, cruise holds, probes start and pass."""
        s = self._state
        c = self._config
        if now < s.pause_until:
            return s.rate
        since = max(s.since, s.pause_until)
        if s.phase is Phase.STARTUP:
            if now > since:
                grown = s.rate * 2.0 ** ((now - since) / c.startup_interval)
                # One more call than counted: at 2 calls/s a one-second window holds one or
                # two, and that quantisation alone must not stall the growth.
                cap = c.max_rate
                if not c.shared:
                    cap = max(2.0 * (self._sent_rate(now) + 1.0 / c.window), s.rate)
                rate = min(grown, cap, c.max_rate)
                s = replace(s, rate=rate, level=rate, since=now)
        elif s.phase is Phase.CRUISE:
            if now - since >= s.hold:
                # Probe, unless we do not even send at the level (then nothing is learnt).
                # Over a span that holds a few calls at the level: under one call per
                # ``window``, a window just before a send holds none.
                span = max(c.window, 4.0 / s.level)
                if c.shared or self._sent_rate(now, span) >= 0.5 * s.level or s.level <= c.min_rate:
                    s = replace(
                        s, phase=Phase.PROBE, rate=self._probe_rate(s), since=now, cuts=0,
                        below=None,  # the level held for a whole cruise
                    )  # fmt: skip
                else:
                    s = replace(s, since=now)
        elif now - since >= self._probe_length(s.rate):
            # The probe passed: its rate is the new level, and the next probe goes twice as
            # far as this one went (never past halfway to a refusal: a bisection; a step
            # doubled behind that cap would jump once the refusal is forgotten). Under a
            # refusal that still counts, after a cruise: each refused probe costs calls.
            # Above every refusal, or with none remembered, the quota rose: the next probe
            # follows at once, and the next, so it is found in a few steps.
            step = min(max(2.0 * (s.rate / s.level - 1.0), c.min_step), c.max_step)
            raised = replace(s, level=s.rate, below=s.level, step=step)
            if s.rate < self._refused(s) < math.inf:
                s = replace(raised, phase=Phase.CRUISE, since=now, cuts=0)
            else:
                s = replace(raised, since=now, cuts=0, refused=math.inf)
                s = replace(s, rate=self._probe_rate(s), hold=c.hold)
        self._state = s
        return s.rate

    def _cut(
        self, now: float, sent: float, retry_after: float | None = None, *, quota: bool = False
    ) -> float:
        """A refusal of a call sent at ``sent`` (``quota``: a 429): the new level.
        ``retry_after`` pauses every call, but for a refused probe (found at once, or late
        while its level is provisional), whose level was being accepted, and for a refusal
        whose level is measured from what the server accepted: calls go on at once, and
        only the refused call waits (the retry policy sees to that)."""
        self.rate_at(now)
        s = self._state
        c = self._config
        # A probe is refused only by a call it sent: one sent before it began was sent at
        # the level (or at the probe before, which has just passed and made the level).
        this_probe = s.phase is Phase.PROBE and sent >= s.since
        cuts = 0  # refusals in a row at the level, this one included
        if this_probe:
            # The probe found the top: the level stands. Probe less often from now on, and
            # by half the step (down to ``min_step``), closing in on the quota from below.
            level = s.level
            wide = s.step > c.step  # a big step refused: the quota is still far above
            hold = c.hold if wide else min(s.hold * c.hold_growth, c.max_hold)
            step = max(s.step / 2.0, c.min_step)
            refused = min(s.rate, self._refused(s))  # a probe past a refusal confirms it
            pause_all = False  # the level under it was being accepted
        elif s.phase is Phase.STARTUP:
            level = (1.0 - c.margin) * s.rate
            hold = c.hold
            step = c.step
            refused = s.rate
            pause_all = True
        elif s.below is not None:
            # Refused at a level a probe raised, before a whole cruise there: the probe's
            # refusal, found late (the server's burst hid its overshoot while it lasted).
            # Back to the level under it, as for a refused probe.
            level = s.below
            hold = min(s.hold * c.hold_growth, c.max_hold)
            step = max(s.step / 4.0, c.min_step)  # the pass doubled it; a refusal halves
            refused = s.level
            pause_all = False
        else:
            # Refused at the level: a server's burst hid an overshoot (a mild cut is
            # enough), or the quota fell: each further refusal in a row cuts harder.
            again = now - s.cut_at < c.hold  # refused again soon after a cut: harder
            level = c.beta ** (s.cuts + 1) * s.level if again else (1.0 - c.step) * s.level
            cuts = s.cuts + 1 if again else 0
            hold = c.hold
            pause_all = True
            if again and quota and not c.shared and s.pause_until <= s.cut_at < sent:
                # The cut before paused nobody (a refused probe, a provisional level given
                # up, a measure like this one): the server's bucket was empty then, and at
                # the level since it has stayed so. What it accepted in between, every
                # call but this one, is its quota: go just under that, and nobody need
                # wait. Unless the measure, over too short a time, says less than the cut
                # in a row would.
                measure = (1.0 - c.step) * (s.level - 1.0 / (sent - s.cut_at))
                if measure >= level:
                    level = min(measure, (1.0 - c.step) * s.level)
                    pause_all = False
            if again and pause_all:
                # After a cut in a row the level is well under the rate refused: the cruise
                # before climbing back is short, but long enough for a few dozen calls.
                hold = min(c.hold, max(c.rebound_hold, c.rebound_calls / level))
            step = c.step
            refused = s.level
        pause = s.pause_until
        if pause_all and retry_after is not None and 0 < retry_after < math.inf:
            pause = max(pause, now + min(retry_after, c.max_pause))
        level = min(max(level, c.min_rate), c.max_rate)
        # Answers that come in soon after a cut, or a pause, are those of calls sent before
        # it, the slow ones most of all (the fast came back already): a window of them
        # would look like a rise. Latency is read again once the slowest answer of the
        # last window has had time to come back for calls sent since.
        self._latencies.clear()
        self._high = 0
        self._settle_until = max(now, pause) + self._slowest
        self._state = replace(
            s,
            cuts=cuts,
            rate=level,
            level=level,
            phase=Phase.CRUISE,
            since=now,
            step=step,
            hold=hold,
            cut_at=now,
            refused=refused,
            pause_until=pause,
            below=s.below if this_probe else None,
        )
        return level

    def __repr__(self) -> str:
        s = self._state
        return (
            f"RateController(rate={s.rate:.4g}, level={s.level:.4g}, phase={s.phase.value}, "
            f"hold={s.hold:g})"
        )
