"""``--rate auto``: the arithmetic that finds an undocumented quota and keeps just under it.

Pure: events with their times in, the rate to use out; no clock, no I/O. The design is in
``docs/rate-auto.md``. What the answers say of the gateway (the measure, the floor, the
ceiling, the burst start-up saw) is kept and read by ``GatewayEvidence``
(``evidence.py``); this module is the policy that decides on it. In short:

- **startup** doubles the rate every ``startup_interval`` (never past twice what is really
  sent) until the first refusal;
- a refusal of a call sent since the last cut (older ones say nothing new, and so do the
  others of a clump the cut's refusal opened: ``_of_the_clump``) sets the rate
  ``margin`` under the quota **measured**: a refusal means the gateway's bucket was empty
  when that call arrived, so between two refused calls it accepted its quota times the
  time between them (from as far back as ``measure_calls`` accepted calls, under about 4
  calls/s where a ``window`` holds too few). Never under the **floor**: since the last
  refused call the gateway accepted at most one call more than its quota allows, whatever
  its burst. When nothing can be measured, ``margin`` under the rate refused (or the
  quota measured before);
- after a cut the rate moves as CUBIC's window (``probe``): back fast to its **target**
  (the quota measured, or just under the rate refused; past a quota measured where
  start-up saw a burst, that quota: ``BURST_SEEN``), slow near it (the cruise), then
  past it slowly and faster and faster; its time unit is ``hold`` or longer, so each
  refusal a probe costs buys ``hold_calls`` calls (past the target, one refusal fewer:
  the cruise back has paid for it; a cut's second refusal at most ``hold_cap`` seconds
  where that holds ``hold_cap_calls`` calls at the quota measured). A probe the gateway
  lets past its target by more than the target allows since the bucket was last empty,
  and more than the quota could be when that refused call went (its **ceiling**: under
  one call in the time since the call before it), proves the quota rose: the rate grows
  as at startup until the next refusal measures it. Under ``LOW_RATE`` the probe is
  **early calls** (``EARLY``): twice the pace, once the rate is ``EARLY_AFTER`` units past
  its target, until one is refused or the floor proves a rise;
- a refusal that cuts while answers of its span are still out is measured once they are in,
  where its call is one of a clump (``CLUMP``): a gateway counting calls per whole second
  refuses every call from its count's end to the second's, and its 429s come back before
  the answers of the calls sent before them; the calls it accepted in a row before the
  clump, since a refusal less than a second earlier, are its count (``_measure_late``);
  where runs accepted in a row after runs refused prove the gateway no token bucket, that
  count is read as the refusal comes, however few its calls (``_count_of_a_second``);
- a ``Retry-After`` pointing seconds ahead, confirmed by a check call into its pause or by
  refusals lasting a ``window`` with nothing accepted, is a long window's end: the calls
  accepted since the window began over the time to it are its rate; the calls pause to it
  and then go at 0.95 of that (``worker.pacing.window``);
- 503s count only when they are ``overload_share`` of the last ``overload_answers``
  answers over the share of faults known (isolated ones are faults to retry), and latency
  only when it rises with the rate (``LatencyWatch``): then the rate is cut (to what the
  service served, where that held flat: ``_served_flat``), and the probes stay under the
  rate overloaded while it is remembered. Until a trial found the service shedding past a
  capacity, a cut to what it served is tried (``FaultWatch``): 503s that keep their share
  under it are faults, and the rate returns to where it was before the 503s' cuts; 503s
  past the most share of faults there halve the rate, tried again. Where nothing was served
  (a service out), the rates halved bound nothing: served again, the rate before the first
  cut is tried, and returns.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from worker.pacing.evidence import JITTER_SPAN, SECOND, TWICE, GatewayEvidence
from worker.pacing.faults import FaultWatch, Outcome
from worker.pacing.latency import LatencyWatch
from worker.pacing.outage import Recovery, Stage, back_in
from worker.pacing.window import LongWindow, Verdict

DELAY_WEIGHT = 0.02
"""Each answer's share of the smoothed latency the probe's growth is timed by."""

HALF = 0.55
"""A measure at most this share of the rate refused: half the calls were refused."""

SLOW_HALF = 0.8
"""``HALF`` where answers take longer than two measures' spans."""

ABOUT_HALF = 0.65
"""A measure from further back than ``window`` (under about 4 calls/s a window holds too
few calls for one) over ``TWICE`` and at most this share of the calls sent in its span:
about every other call was refused, as a burst of 1 refuses calls paced anywhere from just
over its quota to twice it. The quota is anywhere from the measure to the rate refused:
the refusal steps as one that cannot be measured (a cut to the measure, then a cruise back
in units of 30 calls, held a quota of 5 at 0.85 for 30 s)."""

HELD_CALLS = 4
"""Calls started in a ``window`` that say how fast the workers really send (fewer: it
knows too little of what they sent)."""

PLACES = 0.65
"""Calls really sent over a ``window`` under this share of a rate: at that rate the
workers' places on the wire bind, not the pace, and the pace leaves them nearly every slot
(8 in flight answered around 300 ms, drawn, carry about 26.7 calls/s; paced at 30, 36, 40
and 45 they send 0.90, 0.94, 0.95 and 0.97 of it, medians of 20 seeds). At 0.75, a target
just over what they carry (a refusal read as workers held back: 31 calls/s, 8 in flight at
330 ms sending 22-23) held the pace there: 0.86 of what the places carry over loopback."""

SURGE = 1.2
"""What the workers sent over the last ``window`` at most this many times the floor, over a
floor of a ``window`` or more: what they sent was accepted for as long, so a refusal of
workers held back by their places is of the pace's clumps, not of what they sent
(``_held``)."""

AT_PACE = 1.1
"""A call started at most this many intervals of the pace after the one before left as soon
as the pace let it (and a loop's send jitter: 2 ms at 50 calls/s)."""

BURST_SEEN = 3.0
"""Calls the gateway let through over its quota's pace before its first refusal (from a
full bucket, at start-up) that prove a burst: then the rate a probe is refused at tells of
the burst, not of the quota. Counted from the first call, a lower bound: it proves a burst
of 10 under about 9 calls/s (6.8-8.0 at 5), where start-up reaches the quota within a second
or two; a burst of 1 or 2 shows at most 1.3."""

FLOOR_CALLS = 3
"""The fewest calls accepted since the gateway's bucket was last empty that a floor checks
a measure with (``_level_after_refusal``). Any two make a floor (``GatewayEvidence.floor``);
under ``measure_calls`` it is rough: not enough to prove a rise, enough to prove a measure
low, and to raise it where a gateway counting calls per second allows it too
(``GatewayEvidence.floor_counted``)."""

COUNT_RESTART = 1.0
"""A gateway counting calls per whole second starts its count again each second: a span
this long with no refusal (``_measure_late``) says its count was not reached every second."""

FLOOR_SPAN = 2.0
"""A floor spanning less than this since the bucket was last seen empty proves no rise past
the ceiling within two margins of the quota measured (``_escalate``): a gateway counting
calls per whole second starts its count again at each second and lets it all through at any
pace, so a floor from its refusal holds the count of every second begun since: over less
than a second, the pace (past the ceiling of its last refusal by 1 % as a probe climbs: read
as a rise at a steady 300 calls/s, start-up climbed again to 361 and its clump of refusals
cost 1.56 % where 1.17 % without); over less than two, two counts (1,000 calls in 1.47 s
from a refusal at a count of 500: a floor of 505.2, past the ceiling of 500.1 by 1.02 %;
start-up climbed again to 705, and 2.36 % of the calls were refused from 10 s on, where
1.25 %). A token bucket's small rise waits for the probe's climb those two seconds."""

CLUMP = 8
"""Calls refused in a row that tell of a gateway counting calls per whole second: it refuses
every call from its count's end to the second's end, where a token bucket refuses calls
here and there (a burst of 1 at 500 calls/s under a loaded loop's send jitter: 5 in a
row). A refusal in such a run is measured once its span's answers are in
(``_measure_late``)."""

OVER = 0.35
"""Refused calls over this share of the last ``1 / jitter_share`` answered (since the cut):
a pace well over the quota (a burst of 1 refuses every other call past it), not jitter."""

JITTER_SPAN_CALLS = 300
"""Calls answered over the last ``JITTER_SPAN`` (30 calls/s and up) that weigh a refusal
as send jitter where a ``window`` holds too few (``RateController._jitter_lately``)."""

JITTER_SPAN_SHARE = 0.02
"""Refused calls over this share of those answered over the last ``JITTER_SPAN``, cuts or
no cuts between: more than the goal lets through (issue 23: 2 % throttled), no refusal of
them is send jitter (``RateController._jitter_lately``)."""


CLIMB = 1.25
"""A cut whose target is more than this over its level did not know the quota: the cruise
climbs from under it to a rate refused (``_climbed``)."""


LOW_RATE = 6.0
"""Under this target (a probe unit of 30 calls is 5 s or more) the probe is early calls."""

EARLY = 2.0
"""Early calls go this many times the pace, until one is refused or the floor proves the
quota rose: the pace before them drained what the gateway's bucket saved, so a quota that
stayed the same refuses the first or second, and one that rose accepts them all (a cubic
climb from the target in 30-call units took 150-205 s to prove a rise from 1 call/s)."""

EARLY_AFTER = 2.0
"""Early calls begin this many units past the target (of ``_past_unit``): a probe about
110 calls after a cut, what the budget leaves (one unit: 2 calls/s at burst 2 refused
2.2 % of its calls)."""

EARLY_LEAD = 3.0
"""Early calls prove a rise only this many margins past the target: they pass a target under
the quota by all it allows since the bucket was last empty (at 5 calls/s, burst 10, 6 % past
start-up's measure of 0.94 of it)."""


class Reading(StrEnum):
    """What a refusal says, weighed against the calls of its ``window`` (``jitter_share``)."""

    JITTER = "jitter"  # a share of the calls within budget: spread them, cut nothing
    EXCESS = "excess"  # a little over the budget, most calls accepted: a small step down
    RATE = "rate"  # too few calls to say, or a clear excess: measured, as ever


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
    startup_interval: float = 0.5  # seconds per doubling while starting up
    margin: float = 0.03  # the level: this far under the quota measured (or the rate refused)
    window: float = 2.0  # how far back a refusal is measured from, seconds
    measure_s: float = 0.25  # a measure spans at least this long ...
    measure_calls: int = 8  # ... and this many accepted calls
    hold: float = 1.0  # the probe's time unit: at least this long ...
    hold_calls: int = 30  # ... and this many calls per refusal of the last cut
    hold_cap: float = 2.0  # a cut's second refusal stretches the unit at most this long ...
    hold_cap_calls: int = 35  # ... where that holds this many calls at the quota measured
    cubic: float = 0.0064  # the probe: target * (1 + cubic * (units since - k) ** 3)
    rise_interval: float = 2.0  # after a proven rise the rate doubles at least this often
    forget: float = 30.0  # a refused rate caps the probes for this long
    max_pause: float = 30.0  # longest Retry-After pause honoured (every call waits it)
    overload_answers: int = 50  # 503s are overload when they are ...
    overload_share: float = 0.2  # ... this share of the last answers (random ones are not)
    overload_cut: float = 0.85  # a rise of latency with the rate multiplies it by this
    latency_samples: int = 50  # answers per latency window
    latency_factor: float = 1.4  # a window is high above this times the baseline ...
    latency_floor_s: float = 0.05  # ... plus this
    latency_join: float = 0.25  # a window joins the baseline under this share of that rise
    latency_windows: int = 2  # high windows in a row that cut
    latency_baseline: int = 9  # the baseline: the median of this many windows, not high
    jitter_share: float = 0.01  # refusals of at most this share of a window's calls ...
    jitter_calls: int = 500  # ... when it holds this many, cut nothing (send jitter) ...
    jitter_run: int = 4  # ... unless more came in the last 1 / jitter_share calls
    jitter_step: float = 0.02  # a little over: this far under the rate refused

    def __post_init__(self) -> None:
        positive = ("initial_rate", "min_rate", "max_rate", "startup_interval", "window",
                    "measure_s", "hold", "hold_cap", "cubic", "rise_interval", "forget",
                    "max_pause")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, not {value!r}")
        if not self.min_rate <= self.initial_rate <= self.max_rate:
            raise ValueError("need min_rate <= initial_rate <= max_rate")
        if not (0 < self.margin < 1 and 0 < self.overload_cut < 1 and self.overload_share > 0):
            raise ValueError("need 0 < margin < 1, 0 < overload_cut < 1, overload_share > 0")
        counts = ("measure_calls", "hold_calls", "hold_cap_calls", "overload_answers",
                  "latency_samples", "latency_windows", "latency_baseline")  # fmt: skip
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        if not (self.latency_factor >= 1 and self.latency_floor_s >= 0):
            raise ValueError("need latency_factor >= 1 and latency_floor_s >= 0")
        if not 0 <= self.latency_join <= 1:
            raise ValueError("need 0 <= latency_join <= 1")
        if not (0 < self.jitter_share < 1 and 0 < self.jitter_step < 1):
            raise ValueError("need 0 < jitter_share < 1 and 0 < jitter_step < 1")
        if self.jitter_calls < 1 or self.jitter_run < 0:
            raise ValueError("need jitter_calls >= 1 and jitter_run >= 0")


@dataclass(frozen=True, slots=True)
class ControllerState:
    """What the controller has learnt: small, immutable, comparable in tests."""

    rate: float  # calls/s to use now
    level: float  # where the probe starts (startup: the rate reached so far)
    phase: Phase
    since: float  # when the phase began (startup: the last growth step)
    cut_at: float  # the last cut: refusals of calls sent before it are old news
    quota: float  # the quota last measured (inf: none yet)
    refused: float  # the lowest rate refused lately (inf: none), the probes' ceiling
    refused_at: float  # when
    pause_until: float = -math.inf  # no call starts before this (a Retry-After)
    overload: bool = False  # ``refused`` is a rate latency (or 503s) rose at: a hard cap
    target: float = math.inf  # the rate the probe returns to (the quota, or the rate refused)
    unit: float = 1.0  # the probe's time unit, seconds
    refusals: int = 0  # refusals the last cut cost (those in flight at it too)
    early: float = math.inf  # when the probe's early calls began (``EARLY``; inf: not yet)


def probe(
    state: ControllerState, now: float, cubic: float, margin: float, past: float
) -> tuple[float, Phase]:
    """The rate after a cut, as CUBIC grows its window: ``target * (1 + cubic * x**3)``,
    ``x`` the time since the cut in the state's units less ``k``, the units it takes to
    return from the level to the target: fast away from the target, slow near it (the
    cruise). Past the target, ``x`` counts units of ``past`` seconds (the probe): slow,
    then faster and faster, so a stable quota is refused a little past it, and one that
    rose is found in a few seconds."""
    target = _target(state, margin)
    x = (now - state.since) / state.unit - units_back(state, cubic, margin)
    if x > 0:
        x = min(x * state.unit / past, 100.0)
    return target * (1.0 + cubic * x**3), Phase.PROBE if x > 0 else Phase.CRUISE


def _target(state: ControllerState, margin: float) -> float:
    target = state.target
    return target if state.level < target < math.inf else state.level / (1.0 - margin)


def units_back(state: ControllerState, cubic: float, margin: float) -> float:
    """``k``: the units it takes the rate after a cut to return to its target (``probe``)."""
    return float(((1.0 - state.level / _target(state, margin)) / cubic) ** (1.0 / 3.0))


class PacedController(Protocol):
    """What a limiter needs of the controller that sets its rate: :class:`RateController`,
    or a port of another project's (the benchmarks' botocore and rclone peers), by shape
    alone. Each event returns the rate from then on."""

    @property
    def rate(self) -> float: ...

    def pause_until(self) -> float: ...

    def rate_at(self, now: float) -> float: ...

    def on_sent(self, now: float) -> None: ...

    def on_success(self, now: float, latency: float | None = None) -> float: ...

    def on_throttle(
        self, now: float, retry_after: float | None = None, latency: float | None = None
    ) -> float: ...

    def on_overload(self, now: float, latency: float | None = None) -> float: ...


def answer(
    controller: PacedController,
    now: float,
    *,
    throttled: bool,
    latency_s: float | None,
    retry_after: float | None,
    overloaded: bool,
) -> None:
    """One answer, as the limiters report it, as the controller's event: a 429, a 503, or
    anything else."""
    if throttled:
        controller.on_throttle(now, retry_after, latency_s)
    elif overloaded:
        controller.on_overload(now, latency_s)
    else:
        controller.on_success(now, latency_s)


class RateController:
    """Pure arithmetic: events with their times in, the rate to use out.

    Call ``on_sent`` when a call starts, and ``on_success``, ``on_throttle`` or
    ``on_overload`` when it ends (with its latency, which dates its sending); each returns
    the rate from then on. ``rate_at(now)`` moves the phases along between events. Times
    passed in must not go backwards.

    The policy only: what the answers say of the gateway (the measure, the floor, the
    ceiling, the burst start-up saw) is ``GatewayEvidence``'s; this class decides what to
    do about it. The phases move along in ``rate_at``: start-up's growth, the cruise back
    to the target after a cut and the probe past it (early calls under ``LOW_RATE``), and
    the return to growth on a proven rise (``_escalate``). A refusal is read against its
    window's calls (``_read``: send jitter, a little over, or a rate to measure), and
    what it calls for is cut to (``_level_after_refusal``, ``_cut``); 503s and latency
    rising with the rate cut too (``_overloaded_at``). What it has learnt is its
    ``ControllerState``.
    """

    __slots__ = ("_clump", "_config", "_delay", "_evidence", "_faults", "_late", "_latency",
                 "_outage", "_served", "_shed", "_shed_cap", "_start_seen", "_state", "_window",
                 "cuts", "escalated", "measured", "tolerated")  # fmt: skip

    def __init__(self, now: float, config: AdaptiveConfig | None = None) -> None:
        self._config = c = config or AdaptiveConfig()
        self._state = ControllerState(
            rate=c.initial_rate, level=c.initial_rate, phase=Phase.STARTUP, since=now,
            cut_at=-math.inf, quota=math.inf, refused=math.inf, refused_at=-math.inf,
            unit=c.startup_interval,
        )  # fmt: skip
        self._evidence = GatewayEvidence(c)  # what the gateway's answers say of its quota
        # The 503s' trials since their first cut, and the way back from an outage.
        self._outage = Recovery()
        self._faults = FaultWatch(c, self._outage)  # whether 503s fall with the rate
        self._latency = LatencyWatch(c)
        self._delay = 0.0  # the answers' mean latency, smoothed: how late a refusal comes
        self._late: float | None = None  # a refusal measured once its answers are in
        self._clump = -math.inf  # the refusal that last cut, if it opened a clump (``_opened``)
        self._start_seen = True  # start-up's first calls were this controller's (``restore``)
        self._window = LongWindow()  # a count over a long window, read from its Retry-After
        self._served: deque[float] = deque()  # when calls were answered (not 503, not 429)
        self._shed = (-math.inf, 0.0)  # when a 503 cut to what the service served, and to what
        self._shed_cap = False  # the probes' hard cap (``overload``) is from 503s, not latency
        self.cuts = 0
        self.measured = 0  # refusals that measured the quota
        self.escalated = 0  # probes that found the quota had risen past their target
        self.tolerated = 0  # refusals read as send jitter (``Reading.JITTER``): no cut

    @property
    def config(self) -> AdaptiveConfig:
        return self._config

    @property
    def state(self) -> ControllerState:
        return self._state

    def restore(self, state: ControllerState, *, start_seen: bool = True) -> None:
        """Adopt a state learnt elsewhere (a test's, or another replica's): its rate holds
        from its ``since`` on. ``start_seen=False``: start-up's first calls went out under
        another controller (a fleet's leader that took over), so no burst is read from the
        calls seen here (``GatewayEvidence.forgo_burst``), and a measure from a cruise still
        climbing is not the quota (``_climbed``)."""
        self._state = state
        self._start_seen = start_seen
        self._outage.reset()  # a trial's cut is not this state's
        self._faults.trial = None
        self._evidence.restart(state.since, state.rate)
        if not start_seen:
            self._evidence.forgo_burst()

    @property
    def outage_before(self) -> ControllerState | None:
        """The state before the first cut of trials that served nothing (a service out),
        while the rate has not returned to it (``_step_up``): a fleet's next leader resumes
        from it (``resume``)."""
        return self._outage.outage_before

    def resume(self, now: float, before: ControllerState) -> None:
        """After ``restore``: the state a leader stored was a cut where nothing was served,
        ``before`` the state before it (``outage_before``). The next trial ends at the first
        answers served in a row, and the rate before is tried then, as under the leader
        that cut: restored as a plain cut, 0.12 of a quota of 50 was used 10-60 s after a
        20 s outage whose leader changed mid-way (0.997 under one leader)."""
        self._outage.begin((now, before), out=True, length=self._back_in(self._state.level))
        self._faults.start(now)

    @property
    def rate(self) -> float:
        return self._state.rate

    @property
    def windows(self) -> int:
        """Long windows' counts read from their ``Retry-After`` (``LongWindow``)."""
        return self._window.windows

    @property
    def long_window(self) -> LongWindow:
        """What the refusals with a long ``Retry-After`` said: the window read, the check
        call under way (a fleet's leader hands both on)."""
        return self._window

    def pause_until(self) -> float:
        """No call starts before this: the ``Retry-After`` (at most ``max_pause``) of a
        refusal that is news, the first with no other remembered (``forget``): the end of
        startup, or a quota that fell after a quiet while. Later refusals pause nobody: the
        rate moves to just under the quota they tell of, and only the refused call waits
        its ``Retry-After`` (a gateway's is a whole second, rounded up: pausing every call
        for each would cost a second's quota per refusal)."""
        return self._state.pause_until

    def measure(self, sent: float) -> float | None:
        """The quota a refusal of a call sent at ``sent`` measures (``None``: none; the
        arithmetic is ``GatewayEvidence.measure``'s), from nothing before the last pause."""
        measured = self._evidence.measure(sent, self._state.pause_until)
        return None if measured is None else measured[0]

    def rate_sent_at(self, sent: float) -> float:
        """The rate calls were paced at, at ``sent``."""
        return self._evidence.rate_sent_at(sent)

    # -- events --------------------------------------------------------------------------
    def on_sent(self, now: float) -> None:
        """A call starts: the measure of how fast we really send."""
        self._evidence.sent(now)
        pause = self._window.sent(now)
        if pause is not None:
            # The check call of a long Retry-After (``LongWindow``): the others wait on.
            self._state = replace(self._state, pause_until=max(self._state.pause_until, pause))

    def on_success(self, now: float, latency: float | None = None) -> float:
        """A call was answered (any answer but a throttle or a 503)."""
        rate = self.rate_at(now)
        sent = self._sent_at(now, latency)
        self._served.append(now)
        rate = self._tried(now, self._faults.answered(sent, failed=False), rate)
        rate = self._let_through(now, sent, rate)
        rate = self._measure_late(now, rate)
        if latency is not None and latency >= 0:
            self._delay += DELAY_WEIGHT * (latency - self._delay)
            learn = self._state.phase is not Phase.STARTUP
            rising = self._latency.rising(now, latency, rate, learn=learn)
            if rising and sent >= self._state.cut_at:
                # The rise began a window or more before it was seen: the probes' cap is
                # the rate the first high window began at.
                sent_rate = self._overloaded_at(sent, min(rate, self._latency.rose_at))
                self._shed_cap = False
                return self._cut(now, sent_rate * self._config.overload_cut, 0.0)
        return rate

    def on_throttle(
        self, now: float, retry_after: float | None = None, latency: float | None = None
    ) -> float:
        """A 429. ``latency`` dates the call: one sent before the last cut is old news
        (though it still marks the gateway's bucket empty, for the next measure, and
        slows the next probe: it was one more refusal that probe cost). Any other is read
        against the calls of its window (``_read``): send jitter cuts nothing, a little
        over the budget steps a little under the rate refused, an early call refused
        goes back to the pace before it, and anything else cuts to just under what the
        refusal measures (``_level_after_refusal``). First, a ``Retry-After`` pointing
        seconds ahead may be a long window's end (``LongWindow``, ``_windowed``)."""
        rate = self.rate_at(now)
        sent = self._sent_at(now, latency)
        # What the calls accepted since the gateway's bucket was last seen empty say, read
        # before this refusal (if of a call sent after the last refused one) starts them again.
        evidence = self._evidence
        floor, most = evidence.floor(), evidence.since_empty_pace()
        rough, counted = evidence.floor(FLOOR_CALLS), evidence.floor_counted(FLOOR_CALLS)
        # The floor over a window or more: what the workers sent was accepted for as long.
        accepted_floor = floor if evidence.floor_span >= self._config.window else 0.0
        evidence.refused(sent, now)
        s = self._state
        news = math.isinf(self._refused_lately(sent))
        c = self._config
        verdict = self._window.refused(
            sent, now, retry_after, news=news, max_pause=c.max_pause, forget=c.forget,
            lasting=lambda: evidence.refusing_since(sent) <= sent - c.window,
        )  # fmt: skip
        if verdict is not None and verdict.kind != Verdict.CHECK:
            return self._windowed(now, rate, verdict)
        if verdict is not None and retry_after is not None:
            # The check's pause, whatever the reading below: at start-up's 800 calls/s the
            # refusal read as send jitter, cut nothing and paused nobody, and every call
            # went on into the window's spent count (a fleet: 24 refused a window).
            until = min(now + min(max(retry_after, 0.0), c.max_pause), verdict.until)
            self._state = replace(s, pause_until=max(s.pause_until, until))
        # Old news too: a call sent within one interval of the cut had its slot before it,
        # and one of the clump the cut's refusal opened (``_of_the_clump``). Either cost the
        # cut one more refusal: the probe takes longer to come back.
        if sent < s.cut_at + 1.0 / s.level or self._of_the_clump(sent):
            self._one_more_refusal(s)
            return self._measure_late(now, rate)
        reading = self._read(sent)
        if reading is Reading.JITTER:
            self.tolerated += 1
            return rate
        if reading is Reading.EXCESS:
            # Just past what the gateway lets through with the calls' spacing as it is (or
            # just past a quota): a small step under the rate refused, and back to near it.
            step = self._config.jitter_step
            refused_rate = min(self.rate_sent_at(sent), rate)
            level = self._cut(now, (1.0 - step) * refused_rate, (1.0 - step / 4.0) * refused_rate)
            self._late = sent
            self._clump = self._opened(sent)
            return self._measure_late(now, level)
        if sent >= s.early:
            # An early call refused: the quota is under twice the pace, and the pace was
            # accepted, unless a burst let it past the quota: no more than the target or what
            # the gateway accepted since its bucket was last empty. Back to just under it, the
            # pace the target; nobody pauses: this is no news.
            pace = min(s.rate / EARLY, max(s.target, most))
            self._clump = self._opened(sent)
            return self._cut(now, (1.0 - self._config.margin / 3.0) * pace, pace)
        held = self._held(now, sent, accepted_floor)
        moved = self._level_after_refusal(sent, rate, floor, held, rough, counted)
        self._late = sent
        self._clump = self._opened(sent)
        level = self._cut(now, *moved)
        if retry_after is not None and news:
            pause = now + min(max(retry_after, 0.0), self._config.max_pause)
            # A long Retry-After lets one call go into the pause first (``LongWindow``).
            until = pause if verdict is None else min(pause, verdict.until)
            self._state = replace(self._state, pause_until=until, since=max(now, pause))
        return level

    def _windowed(self, now: float, rate: float, verdict: Verdict) -> float:
        """A refusal a long window's count explains (``LongWindow``): pause to its end,
        where the count is spent, and on a window read, pace at ``WINDOW_PACE`` of its rate
        from there (the probe capped there until ``forget`` after its end)."""
        if verdict.kind == Verdict.IGNORE:
            return rate
        c = self._config
        until = min(verdict.until, now + c.max_pause)
        s = self._state
        if verdict.kind == Verdict.HOLD:
            if until > s.pause_until:
                self._state = replace(s, pause_until=until, since=max(s.since, until))
            return rate
        window = self._window.window
        assert window is not None
        self._late = None
        self._clump = -math.inf
        pace = self._window.cap(window.end, c.forget)
        level = self._cut(now, pace, pace)
        self._state = replace(self._state, quota=window.rate, pause_until=until,
                              since=max(now, until))  # fmt: skip
        return level

    def on_overload(self, now: float, latency: float | None = None) -> float:
        """A 503. Random ones, at a steady rate, are faults to retry, not a reason to slow
        down: only when 503s are ``overload_share`` of the last ``overload_answers``
        answers over the share of faults known (``FaultWatch``) is the service overloaded.
        Where the calls it served held flat over the last two ``window``s (``_served_flat``:
        a service past its capacity, shedding what it cannot take), the rate goes half a
        ``margin`` under what it served, and a 503 past that caps the probes at its rate
        (``_shed_past``); else it steps ``margin`` under the rate its call was sent at (no
        quota can be learnt from when it comes). Until a trial found the service shedding,
        the cut to what it served is one: the rate holds there, and 503s that keep their
        share are faults (``_tried``). Random ones hold what is served flat too, at a steady
        rate: before trials, only a service serving a fifth under the rate sent was cut to
        it, and 15 % of random 503s stepped 3 % down at each fifth of 50 by chance."""
        rate = self.rate_at(now)
        c = self._config
        sent = self._sent_at(now, latency)
        faults = self._faults
        rate = self._tried(now, faults.answered(sent, failed=True), rate)
        rate = self._shed_past(now, sent, rate)
        # The gateway let the call through: its quota's evidence counts it accepted (with
        # 30 % answered 503 left out, a measure said 0.7 of a quota of 20).
        rate = self._let_through(now, sent, rate)
        if not faults.overloaded() or sent < self._state.cut_at:
            return rate
        unserved = faults.unserved()
        faults.clear()  # the next cut needs as many again, sent at the new rate
        served = self._served_flat(now)
        before = self._outage.before or (now, self._state)
        out = unserved and before[1].phase is not Phase.STARTUP
        sent_rate = self._overloaded_at(sent, rate)
        self._shed_cap = True
        # Served a share of what was sent under the 503s' share: random ones at a steady
        # rate (a tenth of the calls) hold what is served flat too, a tenth under it. Until
        # a trial found the service shedding, any flat service is tried.
        shed = c.overload_share if faults.shedding else 0.0
        # Nothing served over the windows (a service counting over 10 s, full): no level
        # to cut to; the rate steps down.
        if 0.0 < served < (1.0 - shed) * sent_rate:
            if self._shed_at(now, sent_rate):
                # Cut to what it served before, and as many 503s at that rate: they do not
                # fall with the rate (random faults, a fifth or more): no lower.
                return rate
            # Back to what it served; the rate of this 503 caps the probes
            # (``_under_overload``), and any 503 past what it served lowers that cap
            # (``_shed_past``). No target: the calls it serves are no quota, and passing
            # them proves no rise (``_escalate``).
            level = (1.0 - c.margin / 2.0) * served
            self._shed = (now, level)
            level = self._cut(now, level, math.inf)
            unit = max(c.hold, self._delay, c.hold_calls / served)
            self._state = replace(self._state, unit=unit)
            if not faults.shedding:
                # A trial (``_tried``): held there, a service past its capacity sheds
                # nothing, and 503s at random keep their share.
                self._outage.begin(before, out=out, length=self._back_in(level))
                faults.start(now)
            return level
        level = self._cut(now, (1.0 - c.margin) * sent_rate, 0.0)
        self._outage.before = None if faults.shedding else before
        return level

    def _let_through(self, now: float, sent: float, rate: float) -> float:
        """The gateway let the call sent at ``sent`` through (answered ``now``): the
        quota's evidence, and a probe's proof of a rise (``_escalate``)."""
        since_empty = self._evidence.accepted(sent, now)
        self._window.accepted(sent, now)
        return self._escalate(now, rate) if since_empty else rate

    def _tried(self, now: float, outcome: Outcome | None, rate: float) -> float:
        """A trial's end (``FaultWatch.answered``). 503s that did not fall with the rate
        (``RANDOM``): the cut bought nothing; the rate returns to where it was before it,
        its phase going on from there, and no cap from a 503 holds the probes (unless
        another cut came since: that one holds). Their share is not read as overload
        again. 503s that fell (``FELL``): the cut stands, and the probe climbs from it.
        503s past the most share of faults (``STILL``): half the trial's rate is tried.
        Served again after trials, or a cut, where nothing was served (``Stage.OUT``): the rate
        before the first cut is tried (``_step_up``), and served in full there, returns;
        tried there and halved past the service again, it is not tried twice
        (``_lower_after_outage``)."""
        if outcome is None:
            return rate
        outage = self._outage
        ended = outage.end()
        if ended is None:
            return rate  # another cut came since the trial's: it stands
        (at, before), up = ended
        s = self._state
        if outcome is Outcome.STILL:
            # Still past what the service takes at the trial's rate (a count over 10 s not
            # yet drained): half of it is tried in turn, the rate before the first cut kept
            # to return to if the 503s turn out random there. A trial that served nothing
            # bounds nothing (a service out answers 503 at any rate): the next is ``OUT``
            # (``Recovery.halve``).
            level = self._cut(now, s.rate / 2.0, math.inf)
            self._shed = (now, level)
            outage.halve((at, before), s.rate, up=up, mixed=self._faults.mixed,
                         startup=before.phase is Phase.STARTUP, length=self._back_in(level),
                         again=self._faults.out_again(s.rate))  # fmt: skip
            self._faults.start(now)
            return level
        if outcome is Outcome.RANDOM and outage.lower():
            return self._lower_after_outage(now, s)
        if outcome is Outcome.FELL and up:
            # Served in full at the rate before: the service was out, and shed nothing.
            outcome, self._faults.shedding = Outcome.RANDOM, False
        elif outcome is Outcome.FELL and outage.stage is Stage.OUT:
            return self._step_up(now, at, before)
        if outcome is Outcome.FELL:
            return self._stands(now, s)
        outage.back()
        # No measure reaches back into the trial, as none across a pause: the gateway's
        # bucket filled while the pace held under it, and lost the tokens it got while full
        # (a refusal at start-up's rate after it measured 6.4 of a quota of 20).
        state = replace(before, since=before.since + (now - at),
                        pause_until=max(now, s.pause_until))  # fmt: skip
        if state.overload and self._shed_cap:
            state = replace(state, overload=False, refused=math.inf, refused_at=-math.inf)
        self._shed = (-math.inf, 0.0)
        return self._set(state, now)

    def _stands(self, now: float, s: ControllerState) -> float:
        """A trial's rate stands (``FELL``): the service sheds past a capacity over it. Two
        margins over what it served cap the probes, as a 503 there would (``_shed_past``),
        the probe climbing from it (to the rate of the 503 that set the trial off, 5.4
        calls/s past a capacity of 5 cost 2.7-5.4 % of the calls answered 503 from 10 s on;
        at what it served, 28.5 of 30 during start-up, 0.95 of it)."""
        margin = self._config.margin
        refused = s.level * (1.0 + 2.0 * margin) / (1.0 - margin / 2.0) ** 2
        # Served in full at half the rate a trial before found still past the service: its
        # capacity is anywhere between, and the probes stop half-way (at two margins over
        # the rate served, a count over 10 s of 5 calls/s found at 3 was 0.66 used).
        refused = max(refused, (s.level + self._outage.stands()) / 2.0)
        return self._set(replace(s, since=now, refused=refused, refused_at=now), now)

    def _lower_after_outage(self, now: float, s: ControllerState) -> float:
        """A trial ``RANDOM`` where the step back up to the rate before an outage
        (``_step_up``) was halved, and a halving under it too (``STILL``, past the most
        share of faults; ``Recovery.lower``): the service came back with a lower capacity,
        between this rate and the one halved, and what reads random here is the little it
        sheds past it (6.1 calls/s past a capacity of 5: 5 of 18 answers). The rate before
        is not tried a second time (95 more 503s in 2 s at 50 calls/s): the 503s are no
        faults, the service sheds (``FaultWatch.shed``), and the rate goes half a
        ``margin`` under what the trial served, held there as a ``FELL`` (``_stands``).
        Random 503s after an outage read ``STILL`` at the step back too, but ``RANDOM`` at
        half of it, and the rate before returns (read so there, 0.48 of a quota of 50
        used, 0.99 now)."""
        served = self._faults.shed() * s.rate
        self._cut(now, (1.0 - self._config.margin / 2.0) * served, math.inf)
        return self._stands(now, self._state)

    def _back_in(self, rate: float) -> float:
        """The answers served in a row that end a trial after nothing was served
        (``outage.back_in``)."""
        return back_in(self._config.window, rate)

    def _step_up(self, now: float, at: float, before: ControllerState) -> float:
        """Served again after trials that served nothing (a service out, or one that
        counts every call, its 503s too, and serves nothing past its capacity): the rate
        before the first cut, served before it, is tried (``Stage.UP``). Served there, its
        state returns (``_tried``); still 503s, it is a capacity, and the halving goes on."""
        # A margin under it: the rate before was a probe's, maybe past the quota, and a
        # refusal's cut would end the trial unread.
        level = self._cut(now, (1.0 - self._config.margin) * before.rate, math.inf)
        self._shed = (now, level)
        self._outage.step_up((at, before), level)
        self._faults.start(now)
        return level

    def _served_flat(self, now: float) -> float:
        """The calls answered (not 503, not 429) per second over the last two ``window``s,
        where the second half of them holds no more than the first by ``margin`` (a service
        past its capacity serves as much whatever is sent); else ``inf``. Not across a pause
        (no call was sent while it lasted), nor over less than a ``window`` in all."""
        c = self._config
        served = self._served
        while served and served[0] <= now - 2.0 * c.window:
            served.popleft()
        start = max(now - 2.0 * c.window, self._state.pause_until + self._delay)
        if now - start < c.window:
            return math.inf
        middle = (start + now) / 2.0
        last = len(served) - bisect.bisect_right(served, middle)
        before = len(served) - bisect.bisect_right(served, start) - last
        flat = last <= (1.0 + c.margin) * before
        return (last + before) / (now - start) if flat else math.inf

    def _shed_past(self, now: float, sent: float, rate: float) -> float:
        """A 503 of a call sent at ``sent``, past the rate a 503 cut to what the service
        served within ``forget`` (``_shed``): the probe has found its capacity. Its rate
        caps the probes from now on (``_under_overload``), never under that cut's rate."""
        when, level = self._shed
        s, c = self._state, self._config
        sent_rate = min(self.rate_sent_at(sent), rate)
        if now - when > c.forget or not s.overload or sent_rate <= level:
            return rate
        self._shed = (now, level)
        refused = min(self._refused_lately(sent), sent_rate)
        cap = max(level, (1.0 - c.margin / 2.0) * refused)
        self._state = replace(s, refused=refused, refused_at=sent, rate=min(s.rate, cap))
        return self._set(self._state, now) if cap < rate else rate

    def _shed_at(self, now: float, sent_rate: float) -> bool:
        """Whether the rate was cut to what the service served within ``forget`` and has
        not passed that since: 503s that did not fall with the rate."""
        when, level = self._shed
        c = self._config
        return now - when <= c.forget and sent_rate <= (1.0 + c.margin) * level

    @staticmethod
    def _sent_at(now: float, latency: float | None) -> float:
        return now - latency if latency is not None and latency >= 0 else now

    # -- the phases: start-up, the cruise back to the target, the probe past it ----------
    def rate_at(self, now: float) -> float:
        """The rate at ``now``: startup grows; after a cut the rate returns to its target
        and grows past it as CUBIC's window does (``probe``)."""
        s = self._state
        if self._faults.trial is not None:
            return s.rate  # a trial for 503s: the rate holds where it cut (``on_overload``)
        if s.phase is Phase.STARTUP:
            return self._startup_rate(s, now)
        c = self._config
        grown, phase = probe(s, now, c.cubic, c.margin, self._past_unit())
        target = _target(s, c.margin)
        if phase is Phase.PROBE and self._places_bind(now, target):
            # The workers' places bind at the target, not the pace: a probe past it buys
            # nothing but refusals. The pace holds there, and the probe starts from there
            # once the places no longer bind.
            grown, phase = target, Phase.CRUISE
            s = replace(s, since=now - units_back(s, c.cubic, c.margin) * s.unit)
        if now >= min(s.early, self._early_from(s)):
            grown = EARLY * grown
            s = replace(s, early=min(s.early, now))
        # Not past twice what is really sent: a worker held back by its concurrency does
        # not talk itself into a rate it never uses.
        grown = min(grown, max(2.0 * (self._evidence.sent_rate(now, 1.0) + 1.0), s.level))
        if s.overload:
            grown = self._under_overload(s, now, grown)
        # At most a long window's pace (``LongWindow.cap``), even under the level, but
        # never under ``min_rate`` (a window read from few calls over a minute may be 0.07).
        window_cap = max(self._window.cap(now, c.forget), c.min_rate)
        rate = min(max(grown, s.rate), c.max_rate, window_cap)
        if s is self._state and rate == s.rate and phase is s.phase:
            return rate  # nothing moved: no new state (this runs before every call)
        return self._set(replace(s, rate=rate, phase=phase), now)

    def _startup_rate(self, s: ControllerState, now: float) -> float:
        """Start-up, or the growth after a proven rise: the rate doubles every unit, never
        past twice what is really sent."""
        if now > s.since:
            grown = s.rate * 2.0 ** ((now - s.since) / s.unit)
            # One more call than counted: at 2 calls/s a second's window holds one or
            # two, and that alone must not stall the growth.
            cap = max(2.0 * (self._evidence.sent_rate(now, 1.0) + 1.0), s.rate)
            rate = min(grown, cap, self._config.max_rate)
            return self._set(replace(s, rate=rate, level=rate, since=now), now)
        return s.rate

    def _early_from(self, s: ControllerState) -> float:
        """When the probe's early calls begin (``inf``: none): under ``LOW_RATE``,
        ``EARLY_AFTER`` units past the target, where an early call's answer comes before
        the next leaves."""
        if s.phase is Phase.STARTUP or s.overload or not s.target < LOW_RATE:
            return math.inf
        if self._delay * EARLY * s.target >= 1.0:
            return math.inf  # an early call's refusal would come after the next one left
        c = self._config
        back = units_back(s, c.cubic, c.margin) * s.unit
        return s.since + back + EARLY_AFTER * self._past_unit()

    def _past_unit(self) -> float:
        """The probe's time unit past its target: that of one refusal fewer than the cut
        cost (at least one). The cruise back to the target spans 1.7-1.9 units, so it
        alone holds 50 calls or more for each refusal; with a burst of 1 every cut costs
        two (the call after the refused one had its slot before the cut), and in units of
        two a probe at 20 calls/s climbed 2 % in the 4.5 s past its target where a quota
        that rose needs it to climb 17 %."""
        s, c = self._state, self._config
        fewer = max(1, min(s.refusals, 6) - 1)
        return min(s.unit, max(c.hold, self._delay, c.hold_calls * fewer / max(s.target, s.level)))

    def _escalate(self, now: float, rate: float) -> float:
        """A probe past its target whose calls the gateway all accepted, more than its
        target allows since the bucket was last seen empty: the quota rose past the target
        (``(accepted - 1) / span`` is a floor under it, whatever the burst). Grow as at
        startup until the next refusal, which measures the new quota, doubling every unit
        of the probe past its target or every ``rise_interval``, whichever is shorter
        (under about 15 calls/s the unit, 30 calls a refusal, is longer: doubling once a
        unit took 145 s from 1 call/s to 45). A floor past the target but within two
        margins of the quota measured proves that measure low, not a rise (the floor
        becomes the target), unless it is past the ceiling of the call that emptied the
        bucket by 1 %: the quota was under that then, whatever the measure (where the floor
        spans ``FLOOR_SPAN`` or more). Two margins over the measure waited out the
        cruise back from a refusal just before a rise, and the probe past it: a rise from
        20 to 50 calls/s then was followed in up to 10.7 s, now 4.5-9.9 s."""
        s = self._state
        c = self._config
        if s.phase is not Phase.PROBE or math.isinf(s.target):
            return rate
        floor = self._evidence.floor()
        if floor <= (1.0 + c.margin / 3.0) * s.target:
            return rate
        if floor <= (1.0 + 2.0 * c.margin) * s.quota < math.inf and (
            floor <= (1.0 + c.margin / 3.0) * self._evidence.ceiling
            or self._evidence.floor_span < FLOOR_SPAN
        ):
            # Past a quota measured a little low, and not past the ceiling (or not for two
            # seconds: a per-second gateway's counts starting again): no proof that it rose.
            # The probe's target is the floor (the probe is not as far past it as it was).
            return self._set(replace(s, target=floor), now)
        if now >= s.early and floor <= (1.0 + EARLY_LEAD * c.margin) * s.target:
            return rate
        self.escalated += 1
        if now >= s.early:
            rate = floor  # what is proven (early calls go at twice the pace)
        # Doubling every ``hold`` (or the answers' latency, where longer) where the cut cost
        # more than one refusal, as a burst of 1's does (the call after the refused one had
        # its slot before the cut): the stretch of the cruise's unit is the budget of a
        # cycle at a quota that stayed the same, and a burst of 1 refuses the growth as soon
        # as it passes the new quota, so a faster growth costs only what a round trip adds.
        # In units of the probe past its target (1.5 s at 20 calls/s), a rise 1.5 s after a
        # probe's refusal was followed in 10.1 s (9.7 s now). Not after a cut of one refusal:
        # a burst of 10 lets the growth past the new quota until its tokens are spent, and
        # doubling every second after it took a rise from 20 to 50 calls/s to 83 before its
        # first refusal (two moments followed in 11.2-11.7 s). Nor after a cut of more
        # refusals than the calls then in flight and the one after the refused call: a clump
        # that a window's count let through first (a sliding window of 1 s cut by 8 at 5 ms),
        # not a burst of 1; doubling every second there took a rise from 20 to 50 calls/s to
        # 68.9 before its first refusal (59.1 in units of the probe), 4.2 % refused after it.
        burst_of_one = 1 < s.refusals <= 2.0 + self._delay * s.level
        unit = max(c.hold, self._delay) if burst_of_one else s.unit
        state = replace(s, phase=Phase.STARTUP, rate=rate, level=rate, since=now, quota=math.inf,
                        target=math.inf, unit=min(unit, c.rise_interval),
                        early=math.inf)  # fmt: skip
        return self._set(state, now)

    def _under_overload(self, s: ControllerState, now: float, grown: float) -> float:
        """The probe's rate ``grown`` where ``refused`` is a rate latency (or 503s) rose
        at: a hard cap while it is remembered, a slow climb past it once forgotten."""
        c = self._config
        ceiling = self._refused_lately(now)
        if ceiling < math.inf:
            # A rise of latency takes a hundred answers to see: a probe stops just under
            # the rate overloaded lately, and a quota that rose is found once that is
            # forgotten.
            return min(grown, max(s.level, (1.0 - c.margin / 2.0) * ceiling))
        # Forgotten: past the rate overloaded only slowly (as fast as CUBIC's growth
        # at its target plus one unit): a rise of latency there is seen a hundred
        # answers late, and by then the rate must not have gone far.
        x = max(0.0, now - s.refused_at - c.forget) / s.unit
        return min(grown, max(s.level, s.refused * (1.0 + 3.0 * c.cubic * x)))

    # -- what a refusal (or an overload) says, and where it sends the rate ---------------
    def _read(self, sent: float) -> Reading:
        """What a refusal of a call sent at ``sent`` says, weighed against the calls answered
        in its ``window`` (refusals only since the last cut: those before it cost that cut;
        accepted calls from the whole window, the pace before the cut included). Where the
        window holds ``jitter_calls`` or more, refusals of at most ``jitter_share`` of them
        are the gateway's answer to calls that reached it unevenly (a burst of 1 refuses any
        call less than 1/quota after the last it accepted, whatever the mean rate), unless
        more than ``jitter_run`` came in the last ``1 / jitter_share`` calls: spread the
        calls, do not slow down (``JITTER``). Over ``OVER`` of those last calls refused, the
        pace is well over the quota (``RATE``); else it is a little past what the gateway
        lets through (``EXCESS``). Fewer calls in the window: send jitter where the last
        ``JITTER_SPAN`` says so (``_jitter_lately``), else each refusal is read as ever
        (``RATE``)."""
        c = self._config
        refused, answered, run, over = self._weighed(sent, c.window)
        if answered < c.jitter_calls:
            return Reading.JITTER if self._jitter_lately(sent) else Reading.RATE
        if refused <= c.jitter_share * answered and run <= c.jitter_run:
            return Reading.JITTER
        return Reading.RATE if over else Reading.EXCESS

    def _weighed(self, sent: float, span: float) -> tuple[int, int, int, bool]:
        """A refusal of a call sent at ``sent`` weighed against the calls of the last
        ``span`` (not from before a pause's end): the refusals since the last cut, the
        calls answered (those refusals, and the calls accepted over the whole span), the
        refusals of the last ``1 / jitter_share`` calls since the cut, and whether they are
        over ``OVER`` of the calls answered there."""
        c, s, evidence = self._config, self._state, self._evidence
        start = max(sent - span, s.pause_until)
        since = max(start, s.cut_at + 1.0 / s.level)
        refused = evidence.refused_between(since, sent)
        answered = refused + evidence.accepted_between(start, sent)
        lately = max(since, sent - 1.0 / c.jitter_share / self.rate_sent_at(sent))
        run = evidence.refused_between(lately, sent)
        return refused, answered, run, run > OVER * (run + evidence.accepted_between(lately, sent))

    def _jitter_lately(self, sent: float) -> bool:
        """Whether a refusal of a call sent at ``sent``, where its ``window`` holds under
        ``jitter_calls`` (``_read``), is send jitter: over the last ``JITTER_SPAN`` the
        gateway answered ``JITTER_SPAN_CALLS`` or more, the call went no faster than the
        quota last measured, and since the last cut it is the only refusal of the last
        ``1 / jitter_share`` calls, with no more than ``OVER`` of those since refused.

        A burst of 1 refuses a call that reaches it less than 1/quota after the last it
        accepted, so a loaded loop's late calls are refused about 1 % of the time at any
        pace from 0.9 of the quota up (at 50 calls/s: a steady 0.94 of it, 0.85 %
        refused), and each such refusal measured what was sent, not the quota: the cut went
        3 % under it, the measure after under that, 0.86-0.90 of the quota from 10 s on in
        6 of 20 seeds (``LOADED``, 8 in flight, 5 and 50 ms; 3 of 20 now). Not in start-up,
        nor with no quota measured, nor past that quota: a refusal there is a probe's, or a
        quota's fall (read as jitter past it, a fall from 50 to 20 calls/s was followed in
        12-18 s at a burst of 1, and at bursts of 2 and 10 over 2 % of the calls after it
        were refused: 92 of bench_quota_change's 144 met). Nor in a probe, under that quota
        too: a probe's refusal is its news (read as jitter, a fleet's probes after a fall from
        55 to 49.5 calls/s at a burst of 1 each ran a refusal longer, 2.39 % throttled, 1.77 %
        without; no refusal of ``LOADED``'s cells at 50 calls/s was a probe's). A second
        refusal in those calls is a pace over the quota, as ever (a burst of 1 past it
        refuses every other call), and so is one of the first calls after a cut (read as
        jitter: 140 of the 144).

        Nor where the last ``JITTER_SPAN`` refused over ``JITTER_SPAN_SHARE`` of its calls,
        the refusals before the last cut counted: a quota falling 1 %/s behind a gateway
        counting calls per second refuses about one call a second, the first after each cut
        the only one since it; read as jitter, 2.07-2.15 % of the calls from 10 s on were
        refused at 60 calls/s (2 of 20 seeds met the goal, 18 before ``_jitter_lately``)."""
        s = self._state
        paced = min(self.rate_sent_at(sent), s.rate)
        if s.phase is not Phase.CRUISE or not paced <= s.quota < math.inf:
            return False
        _, answered, run, over = self._weighed(sent, JITTER_SPAN)
        evidence = self._evidence
        start = max(sent - JITTER_SPAN, s.pause_until)
        refused = evidence.refused_between(start, sent)
        within = refused <= JITTER_SPAN_SHARE * (refused + evidence.accepted_between(start, sent))
        return answered >= JITTER_SPAN_CALLS and run <= 1 and not over and within

    def _opened(self, sent: float) -> float:
        """``sent``, where the refusal of the call sent then (which cuts) opened a clump: it
        came after ``CLUMP`` calls or more in a row none of which was refused, as a gateway
        counting calls per whole second refuses every call from its count's end to the
        second's end, its count let through first; else ``-inf``. A token bucket past twice
        its quota refuses runs of calls too, one call accepted between them: each of those
        runs cuts (cut once a run, start-up's end at 5 calls/s with a burst of 10 came down
        four times slower, and its measure said 4.65, where 5.00). Not where every call has
        been refused for a ``window`` or more up to it: no per-second count refuses that
        long, and a gateway counting over 10 s or a minute that does is refused by each call
        while it lasts (a clump opened again by each cut held a count of 300 calls a minute
        at 350-400 calls/s, 97 % refused, 1.5 % slower a second)."""
        evidence = self._evidence
        if evidence.refusing_since(sent) < sent - self._config.window:
            return -math.inf
        return sent if evidence.unrefused_before(sent) >= CLUMP else -math.inf

    def _of_the_clump(self, sent: float) -> bool:
        """Whether the call refused at ``sent`` is one of the clump the refusal that last cut
        opened (``_opened``): no call sent between the two is known accepted, within a
        ``window``. It tells nothing the cut did not: the count of that second was spent.
        With answers a few milliseconds long, every refusal of start-up's clump came back
        after the cut before it and cut 3 % more: 33 cuts in 0.45 s, from 1,132 calls/s to
        425 at a count of 500, and the climb back to it was read as a rise (500 calls/s,
        5 ms drawn, 32 in flight: 2.5-2.6 % refused from 10 s on)."""
        clump = self._clump
        if not clump < sent <= clump + self._config.window:
            return False
        return self._evidence.accepted_between(math.nextafter(clump, math.inf), sent) == 0

    def _one_more_refusal(self, s: ControllerState) -> None:
        """The last cut cost one more refusal (of a call sent before it, or within one
        interval of it): the probe's unit stretches to ``hold_calls`` calls at the target
        for each, so the probe takes longer to come back."""
        # At most six: with answers seconds long, a probe costs a hundred refusals
        # in flight, and the next must still come within seconds.
        c = self._config
        unit = c.hold_calls * min(s.refusals + 1, 6) / max(s.target, s.level)
        # The quota measured (none since startup or a rise: the rate refused may be
        # twice the quota there, and the budget needs the whole unit).
        known = min(s.quota, s.target) if math.isfinite(s.quota) else 0.0
        if s.refusals == 1 and c.hold_cap * known >= c.hold_cap_calls:
            # A burst of 1's second refusal (the call after the refused one had its
            # slot before the cut) doubled the unit: 3 s at 20 calls/s, a cruise of 5 s
            # that a rise just after the cut waited out before the probe could prove
            # it (followed in 13.5 s). Where 2 s hold 35 calls at the quota measured,
            # the unit stops there (under 17.5 calls/s the budget needs it all).
            unit = max(c.hold, self._delay, min(unit, c.hold_cap))
        self._state = replace(s, refusals=s.refusals + 1, unit=max(s.unit, unit))

    def _level_after_refusal(
        self,
        sent: float,
        rate: float,
        floor: float = 0.0,
        held: float = math.inf,
        rough: float = 0.0,
        counted: float = 0.0,
    ) -> tuple[float, float]:
        """Where a refusal of a call sent at ``sent`` sends the rate (never up), and the
        target the probe returns to: just under the quota measured, if it can be
        (``measure``; a per-second count, ``_count_of_a_second``); else, for a probe past
        the quota measured before, back to just under that; else just under the rate
        refused (``held``: the rate really sent, when the workers could not keep to the
        pace), the target."""
        c = self._config
        refused_rate = min(self.rate_sent_at(sent), rate, held)
        self._state = s = replace(
            self._state,
            refused=min(refused_rate, self._refused_lately(sent)),
            refused_at=sent,
            overload=False,
        )
        evidence = self._evidence
        count = self._count_of_a_second(sent)
        if count is not None:
            # A gateway counting calls per second: the count it let through is its quota.
            self.measured += 1
            quota = max(count, counted)
            self._state = replace(s, quota=quota)
            return min(rate, (1.0 - c.margin) * quota), quota
        measured, paced = self._weighed_measure(sent, refused_rate)
        # With answers slower than a measure's span, the calls in it went out before
        # the gateway's answers to the ones before could say anything: a measure far
        # under the rate refused is as suspect as one of half.
        half = HALF if self._delay < c.measure_s * 2.0 else SLOW_HALF
        if measured is not None:
            self.measured += 1
            quota, start, _ = measured
            target = quota
            if (
                quota <= half * paced
                or quota < rough
                or evidence.paced_under(quota, start, sent)
                or self._climbed(start, sent, refused_rate)
                or self._by_a_hair(quota, start, sent, refused_rate)
            ):
                # The gateway's bucket may have filled up in between, and the tokens it
                # got while full were lost: the measure says less than the quota. Calls
                # were paced slower than it for a while, or half were refused: the rate
                # was twice the quota, or a gateway with a burst of 1 refused every other
                # call paced evenly a little over its quota; or the gateway accepted more
                # since its bucket was last empty than the measure allows (``rough``, the
                # floor from as few as ``FLOOR_CALLS``): a burst of 1 refused calls inside
                # the span and lost the tokens it got before the next (after start-up's
                # steps down, 8 accepted at 5.0-5.4 calls/s with every other call refused,
                # then 6 in a row at 5.0 and the seventh refused: a measure of 3.71 under
                # a floor of 4.18, and a probe returning to it held a quota of 5 at 0.74
                # from 10 s on). The probe returns to just under the rate refused.
                target = self._just_under(refused_rate)
            # Never under the floor, nor under the rough floor where a gateway counting
            # calls per second allows it too (``counted``): a measure under the rough floor
            # left the level 3 % under the measure, and the climb back took 3.7 units of
            # 30 calls (q5, burst 1, 50 ms drawn: 0.913 of the quota from 10 s on, where
            # 0.953 now); from the rough floor alone, a per-second gateway's six calls in
            # 0.43 s set the level at 11.6 of a count of 6.
            quota = max(quota, floor, counted)
            evidence.learn_burst(quota, start)
            self._state = replace(s, quota=quota)
            return min(rate, (1.0 - c.margin) * quota), max(target, quota)
        quota = max(s.quota, floor)
        if rate > quota:
            # Past the quota measured before (or under the target on the way back to it):
            # back to just under that quota, never under the floor. Only the floor proves
            # the quota rose (what the probe paced at for a while does not: a burst of 10
            # hides 2 s of 10 calls/s from a quota of 5). The probe returns to just under
            # the rate refused: with a burst of 1 the quota can seldom be measured, and the
            # floor is what the last cycle sent. But where start-up saw a burst, a probe is
            # refused only once the burst's tokens are spent, at a rate past the quota by
            # how fast it spent them: back to the quota (returning to just under the rate
            # refused, 5.2-5.7 calls/s at 5 with a burst of 10, refused every 6-10 s).
            self._state = replace(s, quota=quota)
            target = self._just_under(refused_rate)
            if evidence.burst >= BURST_SEEN:
                target = min(target, quota)
            return (1.0 - c.margin) * quota, target
        return (1.0 - c.margin) * refused_rate, self._just_under(refused_rate)

    def _count_of_a_second(self, sent: float) -> float | None:
        """The count of a gateway counting calls per whole second, from a refusal of a call
        sent at ``sent`` (``None``: not proven, or no count to read): where the calls of its
        look-back prove the gateway no token bucket (``GatewayEvidence.no_token_bucket``),
        the calls accepted in a row before the refusal's run, since a refused call less than
        a ``SECOND`` before that run (``counted_before``), are one second's whole count.
        Such a gateway lets its count through in a row at any pace and refuses every call to
        the second's end. At a count of 3 nothing was measured: 3 calls a second are under
        the ``measure_calls`` a measure needs between two refused calls, and from further
        back the measure said 0.4-0.65 of start-up's pace of 6-7 calls/s, as a burst of 1
        does (it loses the tokens it gets while full), and was not trusted; each refusal
        stepped 3 % under the pace, a second's run of refusals at a time (16-36 % refused
        from 10 s on)."""
        evidence = self._evidence
        counted = evidence.counted_before(sent)
        if counted is None or counted[1] >= SECOND:
            return None
        start = evidence.look_back(sent, self._state.pause_until)
        if not evidence.no_token_bucket(start, sent):
            return None
        count = float(counted[0])
        # Any second holds at most two seconds' counts: more accepted in the last is no count
        # of a second (a token bucket proven none by calls a pause sent late in clumps).
        return count if evidence.accepted_between(sent - SECOND, sent) <= 2.0 * count else None

    def _climbed(self, start: float, sent: float, refused_rate: float) -> bool:
        """Whether a measure from ``start`` to ``sent``, taken by a controller that did not
        see start-up (a fleet's leader that took over: ``restore``), spans a cruise still
        climbing from a cut that did not know the quota (its target more than ``CLIMB`` over
        its level: a measure of half the rate refused) through it: the pace in the span
        went more than two margins under the rate refused. A token bucket paced under its
        quota fills up and loses the tokens it gets while full, so the measure says less
        than the quota, however far over the measure the pace went: the probe returns to
        just under the rate refused, as where the measure is suspect. A successor's start-up
        grows from the stored rate at once to twice what is sent, past the quota by two to
        three times (10-16 calls/s at 5, where the first leader's ends at 8-14), and its
        first measure says half: the cut goes 11-18 % under the quota, and the climb's
        measure said 0.78-0.85 of it (3.92 of 5 at a burst of 1, 300 ms); its probes stopped
        there, early calls at a burst of 1 being refused whatever the quota under twice the
        pace (0.81-0.89 of the quota from 15 s on). A controller that saw start-up is left
        as it was: its cut after start-up goes within a few percent of the quota, and the
        refusals the probe's climb back from the rate refused would cost, a cut each, are
        over the budget at 4-6 calls/s (2.1-2.3 % at a burst of 2, where 0.7 %)."""
        s, c = self._state, self._config
        if self._start_seen or s.phase is not Phase.CRUISE or s.target <= CLIMB * s.level:
            return False
        return self._evidence.paced_under((1.0 - 2.0 * c.margin) * refused_rate, start, sent)

    def _by_a_hair(self, quota: float, start: float, sent: float, refused_rate: float) -> bool:
        """Whether a measure ``quota`` from ``start`` to ``sent`` is what was sent less a call:
        no call between its two refused ones was refused, and it is more than two margins
        under the rate refused. Between two refused calls a token bucket accepted its quota
        times the time between them, give or take a call; where it accepted every call sent
        between them, the quota is anywhere from the measure less a call to the pace. A
        fleet's successor cruising at the quota at a burst of 1 measured 4.45 of 5 so (8 calls
        accepted over 1.8 s), and under ``LOW_RATE`` its probe is early calls, which a burst of
        1 refuses under twice the pace whatever the quota: its target climbed 1 % in 22 s, and
        the fleet used 0.89 of the quota from 15 s on. One process too: at 3.9 calls/s, burst
        1, 429s at once, start-up's end stepped down to 3.90 and the next refusal measured 3.47
        (8 calls over 2.3 s): 0.897 of the quota used from 10 s on, 0.966 now, and 4 of the 372
        runs at 3.0-6.0 calls/s with 429s at once met the goal that did not (the least used
        0.944, where 0.897). The probe returns to just under the rate refused."""
        if quota >= (1.0 - 2.0 * self._config.margin) * refused_rate:
            return False
        inside = (math.nextafter(start, math.inf), math.nextafter(sent, -math.inf))
        return self._evidence.refused_between(*inside) == 0

    def _just_under(self, refused_rate: float) -> float:
        """The target the probe returns to when all a refusal says is the rate refused: a
        third of ``margin`` under it, or two thirds under ``LOW_RATE``, where a refusal is
        0.7 % or more of the calls of a 30 s window. A burst of 1 refuses a call that
        reaches it less than 1/quota after the last it accepted, so a pace 1 % under the
        rate refused (2 ms from the quota's spacing at 5 calls/s) is refused by a call or
        two a millisecond late: over real HTTP the cruise back to it was refused 5 s after
        the probe's refusal, the third in a window of 147 calls (2.04 %); at 5 calls/s,
        burst 1, latency drawn and 429s at once, with a quiet loop's send jitter 174 of
        180 runs met the goal, 180 now, and with a loaded loop's 150, 180 now."""
        under = self._config.margin / 3.0
        return (1.0 - (2.0 * under if refused_rate < LOW_RATE else under)) * refused_rate

    def _weighed_measure(
        self, sent: float, refused_rate: float
    ) -> tuple[tuple[float, float, float] | None, float]:
        """What a refusal of a call sent at ``sent`` measures (``GatewayEvidence.measure``:
        the quota and when its span began and ended; ``None``: nothing, or nothing to trust),
        and the pace to weigh it against: the rate refused, or what was really sent in the
        span where that was more and the span is longer than a ``window`` or has no two
        calls accepted in a row (a burst of 1 past its quota). Over more than a window, a
        measure ``TWICE``-``ABOUT_HALF`` of that pace is not trusted (of the calls sent in
        the span, not up to ``sent``: a span up to an earlier refused call, where calls
        after it were still out, read a quota of 5 from 3.2 s to 5.3 s as under a pace of
        10 from further back than a window of 5.5 s, and not trusted)."""
        c = self._config
        evidence = self._evidence
        measured = evidence.measure(sent, self._state.pause_until)
        paced = refused_rate
        if measured is not None:
            # The rate may have fallen in between: the share refused is of what was sent
            # in the span, not of the rate refused.
            quota, start, end = measured
            spanned = evidence.sends_since(start, end) / (end - start)
            if start < end - c.window:
                # From further back than a window before its end (``sent``, or an earlier
                # refused call where the calls after it are still out).
                paced = max(paced, spanned)
                if TWICE * paced < quota <= ABOUT_HALF * paced:
                    measured = None
            elif evidence.alternated(start, end):
                # No two calls accepted in a row: a burst of 1 past its quota, which loses
                # the tokens it gets while full, and cut step by step as it fell (from
                # 50 to 20 calls/s: a measure of 15.0 at 24.8, after 29-48 in the span).
                paced = max(paced, spanned)
        return measured, paced

    def _measure_late(self, now: float, rate: float) -> float:
        """The last refusal that cut (``_late``), measured once every answer of its span is
        in and it is known to be one of ``CLUMP`` refused in a row (the run's ends known
        accepted, or the refusal a ``window`` old: given up). A gateway counting calls per
        whole second refuses every call from its count's end to the second's end, and its
        429s come back while answers of the calls before them are still out, so with
        answers tens of milliseconds long such a refusal could seldom be measured when it
        came, and start-up's end came down 2-3 % a second, a clump of refusals each (300
        calls/s, answers drawn around 50 ms, 32 in flight: 2.7-3.6 % refused from 10 s on).
        Where the clump follows calls accepted in a row since a refused call less than a
        ``SECOND`` before its first, their number is the measure (that second's count,
        ``GatewayEvidence.counted_before``); else it is measured from refused call to
        refused call. Where the measure is under the level, the rate goes ``margin`` under
        it, the probe returning to it; not where no two calls of its span were accepted in
        a row (a burst of 1: its measure says about half its quota), nor where the span
        holds more than ``COUNT_RESTART`` with no refusal (the count was not reached every
        second: the workers were held back and the measure is short)."""
        sent = self._late
        evidence = self._evidence
        if sent is None or evidence.out_before(sent, self._state.pause_until) > 0:
            return rate
        run, ended = evidence.refused_run(sent)
        if run < CLUMP and not ended and sent > now - self._config.window:
            return rate  # the run may go on: answers of the calls after it are out
        self._late = None
        if run < CLUMP:
            return rate
        s, c = self._state, self._config
        counted = evidence.counted_before(sent)
        if counted is not None and counted[0] >= c.measure_calls and counted[1] < SECOND:
            # The calls accepted in a row between the refused call before them and this
            # clump, in less than a second: the count of the second between, whatever the
            # pace (a measure from refused call to refused call across the second's start
            # reads the count over part of a second where the pace rose, over more where it
            # fell: 1,157 and 370 calls/s of a count of 500). A token bucket accepts fewer
            # than its quota in less than a second, so this says less than it at most.
            quota = float(counted[0])
            if (1.0 - c.margin) * quota >= s.level:
                return rate
            self.measured += 1
            self._state = replace(s, quota=quota)
            return self._cut(now, (1.0 - c.margin) * quota, quota)
        measured, _ = self._weighed_measure(sent, self.rate_sent_at(sent))
        if measured is None:
            return rate
        quota, start, _ = measured
        if (
            (1.0 - c.margin) * quota >= s.level
            or evidence.alternated(start, sent, known=True)
            or evidence.longest_unrefused(start, sent) > COUNT_RESTART
        ):
            return rate
        self.measured += 1
        self._state = replace(s, quota=quota)
        return self._cut(now, (1.0 - c.margin) * quota, quota)

    def _held(self, now: float, refused: float, accepted_floor: float = 0.0) -> float:
        """What was really sent over the last ``window``, when all of it was paced (no
        start-up, cut or pause in it) and that is under ``HALF`` the rate: the workers were
        held back (too few for the answers' latency), and a refusal says that what they
        really sent was too much, not the pace they never used; else ``inf``. Not where the
        call refused at ``refused`` left as soon as the pace let it after the one before:
        a burst of 1 refuses a call less than 1/quota after the last it accepted, whatever
        was sent on average, so the pace may be what it refused (8 in flight answered
        around 300 ms sent 20 calls/s in clumps paced at 50; a probe's refusal at 50.5 read
        as workers held back cut a quota of 50 to 19.4, under the 26.7 they could send).
        Unless the gateway accepted two calls in a row as close in the window: then the gap
        was not what it refused (2 in flight answered around 300 ms, a quota of 8 with a
        burst of 4 accepting pairs at the pace of 22: read as the pace refused, each refusal
        stepped 3 % under it, 12 in 2 s, where the workers sent 6.5)."""
        s, c = self._state, self._config
        if s.phase is Phase.STARTUP or max(s.cut_at, s.pause_until) > now - c.window:
            return math.inf
        evidence = self._evidence
        gap = evidence.gap_before(refused)
        if gap * evidence.rate_sent_at(refused) <= AT_PACE and not evidence.accepted_as_close(
            now - c.window, refused, gap
        ):
            return math.inf
        count = evidence.sends_since(now - c.window, math.nextafter(now, math.inf))
        sent = count / c.window
        if sent <= SURGE * accepted_floor:
            return math.inf  # what they sent was accepted for a window or more: the pace's clumps
        return sent if count >= HELD_CALLS and sent < HALF * s.rate else math.inf

    def _places_bind(self, now: float, rate: float) -> bool:
        """Whether the calls really sent over the last ``window`` are under ``PLACES`` of
        ``rate`` (and ``HELD_CALLS`` or more): at that rate the places bind, not the pace."""
        s, c = self._state, self._config
        if s.phase is Phase.STARTUP or max(s.cut_at, s.pause_until) > now - c.window:
            return False
        count = self._evidence.sends_since(now - c.window, math.nextafter(now, math.inf))
        return count >= HELD_CALLS and count < PLACES * rate * c.window

    def _refused_lately(self, now: float) -> float:
        """The lowest rate refused, while it still says something (``forget`` seconds)."""
        s = self._state
        return s.refused if now - s.refused_at <= self._config.forget else math.inf

    def _overloaded_at(self, sent: float, rate: float) -> float:
        """An overload of a call sent at ``sent``: its rate (returned) caps the probes, as
        a refused one does."""
        s = self._state
        sent_rate = min(self.rate_sent_at(sent), rate)
        refused = min(sent_rate, self._refused_lately(sent))
        self._state = replace(s, refused=refused, refused_at=sent, overload=True)
        return sent_rate

    # -- moving the rate -----------------------------------------------------------------
    def _cut(self, now: float, rate: float, target: float) -> float:
        """To ``rate``, the probe returning to ``target`` (0: none, for an overload, which
        is seen too late to go back fast to where it began), its time unit ``hold`` (or longer:
        ``hold_calls`` calls at the target, for each refusal this cut costs, and at least the
        answers' latency, so a refusal of a call sent past the target comes back before the
        probe is far past it)."""
        c = self._config
        level = min(max(rate, c.min_rate), c.max_rate)
        self.cuts += 1
        self._latency.settle(now)
        target = max(target, level)
        unit = max(c.hold, self._delay, c.hold_calls / target)
        self._outage.drop()  # any cut but the 503s' own (``on_overload``) stands
        state = replace(self._state, rate=level, level=level, phase=Phase.CRUISE, since=now,
                        cut_at=now, target=target, unit=unit, refusals=1,
                        early=math.inf)  # fmt: skip
        return self._set(state, now)

    def _set(self, state: ControllerState, now: float) -> float:
        """The state from ``now`` on; its rate is recorded as paced (``rate_sent_at``)."""
        self._evidence.paced(now, state.rate)
        self._state = state
        return state.rate

    def __repr__(self) -> str:
        s = self._state
        return (
            f"RateController(rate={s.rate:.4g}, phase={s.phase.value}, quota={s.quota:.4g}, "
            f"cuts={self.cuts}, measured={self.measured})"
        )
