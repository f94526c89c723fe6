"""What the gateway's answers say of its quota, for ``--rate auto`` (``RateController``).

The controller's policy (``controller.py``: its phases, the cut, the probe) decides; this
module only keeps and reads the evidence it decides on: when calls were sent and which were
accepted or refused, and what follows from a token bucket's refusals, whatever its quota or
burst. A refusal means the gateway's bucket was empty when that call arrived, so:

- between two refused calls it accepted its quota times the time between them (``measure``);
- since the last refused call it accepted at most one call more than its quota allows
  (``floor``), and no burst let the calls accepted since past it by more than that
  (``since_empty_pace``);
- it got less than a token between the refused call and the accepted one just before it
  (``ceiling``);
- the calls it let through over the quota's pace before its first refusal, at start-up
  from a full bucket, tell of its burst (``burst``);
- and a gateway whose runs of calls accepted in a row say more of its quota than the runs
  refused before them allow is no token bucket (``no_token_bucket``): one counting calls
  per second.

Pure: the times are the caller's, and the send times are kept only as far back as a measure
can reach (``horizon``). The design is in ``docs/rate-auto.md``.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.pacing.controller import AdaptiveConfig

TWICE = 0.4
"""A measure at most this share of the calls sent in its span: they went out at twice the
quota or more, whatever its burst, and the rate falls to the measure at once."""

SECOND = 1.0
"""What a gateway counting calls per whole second counts them over (``floor_counted``)."""

LATE = 0.03
"""How much later than it started a call may reach the gateway, for ``no_token_bucket``: a
loaded loop sends calls late, and the calls behind a late one leave with it, so a run of
calls the send times spread over milliseconds may reach the gateway at once (``LOADED`` of
tests/test_rate_matrix.py: up to 1 ms late, 1 % of the calls 5 ms more on average). More
proves fewer counts: at 0.05 s a count of 5 at 50 ms was not proven (bench_near_five's
per-second set 106 of 120, not 108), at 0.08 a count of 3 at 300 ms neither (104)."""

JITTER_SPAN = 10.0
"""How far back a refusal is weighed as send jitter where a ``window`` holds too few calls
(``RateController._jitter_lately``): the accepted and refused calls are kept this long, or
as the last ``jitter_calls`` of them where that is shorter (``_remember``)."""

SAME_CALL = 1e-6
"""A call's start as ``on_sent`` saw it and as its answer's latency dates it may differ by
this much (rounding): the same call."""


class GatewayEvidence:
    """The send/accept/refuse history of one controller's calls and the estimates of the
    gateway read from it: the floor, the ceiling, the measure and the burst seen at
    start-up. Told of each call sent (``sent``), each answer (``accepted``, ``refused``)
    and each rate the controller paces at (``paced``); it decides nothing.

    The rate paced at is kept here too (``rate_sent_at``): a measure across an idle
    stretch, a ceiling and a measure of calls paced slower than it all depend on the pace
    each call went at, not on the rate now.
    """

    __slots__ = ("_accepted", "_awaited", "_began", "_burst", "_ceiling", "_config", "_empty",
                 "_first", "_history", "_initial", "_refused", "_sends",
                 "_since_empty")  # fmt: skip

    def __init__(self, config: AdaptiveConfig) -> None:
        self._config = config
        self._sends: deque[float] = deque()  # when calls started (how fast we really send)
        self._accepted: list[float] = []  # when the accepted calls were sent, in order
        self._refused: list[float] = []  # when the refused calls were sent, in order
        self._history: deque[tuple[float, float]] = deque()  # (from when, rate) changes
        self._initial = config.initial_rate  # the rate paced at before any change
        # The gateway's bucket was empty when the last refused call was sent (``_empty``);
        # accepted calls sent since: their count, and when the last of them was sent; the
        # most the quota can have been then (``_ceiling_at``), and while the answer of the
        # call before it is still out, that call's start and the ceiling its acceptance sets.
        self._empty = -math.inf
        self._since_empty = (0, -math.inf)
        self._ceiling = math.inf
        self._awaited: tuple[float, float] | None = None
        # Calls started before the first refused call, over how long (from the first), and
        # when it was sent: with a quota measured from it, the burst the gateway let through
        # (``_burst``).
        self._first: tuple[int, float, float] | None = None
        self._began = math.inf  # when start-up's first call was sent (``sent``)
        self._burst = math.nan

    # -- what happened -------------------------------------------------------------------
    def sent(self, now: float) -> None:
        """A call starts: the measure of how fast we really send."""
        sends = self._sends
        if not sends or now - sends[-1] > self._config.window:
            # The first call, or the first after an idle stretch (the gateway's bucket got
            # tokens meanwhile): what start-up's gateway let through is counted from here.
            self._began = now
        bisect.insort(sends, now)  # in order: a fleet's starts may come a little out of it
        # Kept as long as the refusals a measure spans (``horizon``).
        horizon = self.horizon(now)
        while sends[0] < horizon:
            sends.popleft()

    def accepted(self, sent: float, now: float) -> bool:
        """The call sent at ``sent`` was accepted (answered ``now``). Whether it was sent
        after the gateway's bucket was last seen empty: then it counts toward the floor."""
        self._remember(self._accepted, sent, now)
        self._settle_ceiling()
        if sent > self._empty:
            count, last = self._since_empty
            self._since_empty = (count + 1, max(last, sent))
            return True
        return False

    def refused(self, sent: float, now: float) -> None:
        """The call sent at ``sent`` was refused (answered ``now``): the gateway's bucket
        was empty when it arrived. If it was sent after the last refused call, the count
        of calls accepted since the bucket was empty (``floor``) starts again from it."""
        self._remember(self._refused, sent, now)
        self._settle_ceiling()
        if self._first is None and self._sends and sent >= self._began:
            # Counted from start-up's first call (or the first after an idle stretch), if it
            # is still remembered: else start-up's end came so late that it says little of a
            # burst (held at 27 calls/s by 8 in flight for 30 s, under a quota of 50 that then
            # fell to 5 at burst 1, its last 3.7 s read as a burst of 87; every probe after
            # stopped at the quota measured, 0.83 of it from 20 s after the fall, not 0.94).
            # Not from a call sent before that first call: a fleet's new leader, which sees
            # the starts from its taking over on and the answers of calls sent before, read
            # a span of less than nothing there, and a burst of 3.4-13.6 at a burst of 1
            # (the quota times the span's length), past ``BURST_SEEN``.
            began = self._began
            calls = self.sends_since(began, sent) if self._sends[0] <= began else 0
            self._first = (calls, sent - began, sent)
        if sent > self._empty:
            self._empty = sent
            after = len(self._accepted) - bisect.bisect_right(self._accepted, sent)
            self._since_empty = (after, self._accepted[-1] if after else sent)
            self._ceiling, self._awaited = math.inf, self._ceiling_at(sent)
            self._settle_ceiling()

    def paced(self, now: float, rate: float) -> None:
        """The controller paces at ``rate`` from ``now`` on."""
        if not self._history or rate != self._history[-1][1]:
            self._history.append((now, rate))
            horizon = self.horizon(now)
            while len(self._history) > 1 and self._history[1][0] < horizon:
                self._history.popleft()

    def restart(self, since: float, rate: float) -> None:
        """The controller adopted a state learnt elsewhere: its ``rate`` holds from
        ``since`` on, whatever was paced before."""
        self._history = deque([(since, rate)])

    def forgo_burst(self) -> None:
        """Start-up's first calls went out under another controller (a fleet's leader that
        took over): the calls seen here did not begin at a full bucket, so they read no
        burst (``burst`` stays unknown). Counted from the first start reported to a
        successor, 2 s of the fleet at the pace its lease took to lapse were in the span,
        and with a measure of half the quota (a burst of 1 refusing every other call) they
        read a burst of 3.4-18 at a burst of 1: past ``BURST_SEEN``, every probe stopped at
        that measure (0.76-0.84 of the quota from 15 s on)."""
        self._first = (0, 0.0, -math.inf)  # a first refusal no measure is near

    def learn_burst(self, quota: float, start: float) -> None:
        """A quota measured from a span that began at ``start``: with the calls start-up
        sent before the first refusal, the burst the gateway let through (``burst``), read
        once. Only a measure from just after start-up's end is of start-up's quota: the
        first, 28 s later, after a fall from 20 to 2 calls/s at burst 1, read start-up's 14
        calls as a burst of 11 (then every probe stopped at the quota measured: 0.86 of it
        from 20 s after the fall, not 0.93)."""
        if math.isnan(self._burst) and self._first is not None:
            calls, span, first = self._first
            if start <= first + 2.0 * self._config.window:
                self._burst = calls - quota * span

    # -- the estimates -------------------------------------------------------------------
    @property
    def burst(self) -> float:
        """The calls start-up's gateway let through over the quota's pace before its first
        refusal (``nan``: not measured): a lower bound on its burst (``learn_burst``)."""
        return self._burst

    @property
    def ceiling(self) -> float:
        """The most the quota can have been when the call that last emptied the gateway's
        bucket was sent (``inf``: nothing known; ``_ceiling_at``)."""
        return self._ceiling

    @property
    def floor_span(self) -> float:
        """The time the floor is counted over: from the refused call that last emptied the
        gateway's bucket to the last call accepted since (0: none accepted)."""
        count, last = self._since_empty
        return last - self._empty if count else 0.0

    def floor(self, calls: int = 0) -> float:
        """The least the quota can be (0 if too little is known: fewer than ``calls``
        accepted, or ``measure_calls`` by default): the gateway's bucket was empty when the
        last refused call was sent, so it accepted at most one call more than its quota
        allowed since, whatever its burst: ``(accepted - 1) / span``."""
        accepted = self._accepted_since_empty(calls)
        return 0.0 if accepted is None else (accepted[0] - 1) / accepted[1]

    def floor_counted(self, calls: int = 0) -> float:
        """The floor (``floor``) where a gateway counting calls per whole second allows it
        too (0 if too little is known). Such a gateway starts its count again at each second
        and lets it through at any pace, so calls it accepted over less than a second say
        its count, not a pace: ``(accepted - 1) / span`` of the six calls start-up's end
        sent in 0.43 s said 11.6 calls/s of a count of 6. The second in which it refused
        the call that emptied the bucket was full, so every call accepted since was counted
        in a later second, begun by the first of them: the calls accepted within a second
        of the refused one were counted in one second, and its count is at least theirs."""
        accepted = self._accepted_since_empty(calls)
        if accepted is None:
            return 0.0
        times, empty = self._accepted, self._empty
        within = bisect.bisect_left(times, empty + SECOND) - bisect.bisect_right(times, empty)
        return min((accepted[0] - 1) / accepted[1], float(within))

    def since_empty_pace(self) -> float:
        """The calls accepted since the gateway's bucket was last seen empty, per second
        (``inf``: too few to say): a pace no burst let past the quota by more than a call
        in that span (``floor``)."""
        accepted = self._accepted_since_empty()
        return math.inf if accepted is None else accepted[0] / accepted[1]

    def _accepted_since_empty(self, calls: int = 0) -> tuple[int, float] | None:
        """The calls accepted since the gateway's bucket was last seen empty and the time
        they span (``None``: too few, or too short, to say)."""
        c = self._config
        count, last = self._since_empty
        span = last - self._empty
        if count < (calls or c.measure_calls) or not c.measure_s <= span < math.inf:
            return None
        return count, span

    def gap_before(self, sent: float) -> float:
        """The time from the call started before the one started at ``sent`` to it (``inf``:
        none known)."""
        starts = self._starts(sent)
        return math.inf if starts is None else starts[1] - starts[0]

    def accepted_as_close(self, since: float, until: float, gap: float) -> bool:
        """Whether the gateway accepted two calls in a row, sent from ``since`` to ``until``,
        at most ``gap`` apart: then it does not refuse a call for its gap after the one
        before alone (a burst of 1 accepts none closer than 1/quota)."""
        accepted = self._accepted
        first = bisect.bisect_left(accepted, since)
        end = bisect.bisect_left(accepted, until)
        return any(accepted[i + 1] - accepted[i] <= gap for i in range(first, end - 1))

    def no_token_bucket(self, start: float, end: float) -> bool:
        """Whether the calls started from ``start`` up to ``end`` prove the gateway no token
        bucket, whatever its burst: twice, a run of calls refused in a row after an accepted
        one, then a run accepted in a row, says more of the quota with the second than the
        first allows. A bucket held no token just after the accepted call, so over the
        refused run it got under one in all: the quota is under 1 / the time from the
        accepted call to the run's last. It held under a token at that last refused call, so
        over the accepted run it got more than a token a call but one: the quota is over
        ``m - 1`` calls / the time to the run's last (``floor``). Each time as the gateway
        saw it, which is up to ``LATE`` shorter or longer than the send times say: a clump
        of calls a loaded loop sent late reaches a bucket at once, and those past its token
        are refused however far apart they started (at 500 calls/s, burst 2, two refused
        calls started 4.8 ms after the accepted one before them said under 209 calls/s, the
        72 accepted after them over 413, twice in 2 s: read as a count of 7 calls per second,
        the rate fell to 6.8 calls/s). A gateway counting calls per whole second (or over
        any rolling second) lets its count through in a row at any pace and refuses every
        call to the second's end: at a count of 3 paced at 6.6 calls/s, 3 accepted in a row
        say over 4.1, 4 refused in a row under 1.8. Twice: a quota that changed between the
        two runs of one pair says nothing of the kind (a fall from 50 to 20 calls/s at a
        burst of 1 read so set the quota at 1)."""
        sends = self._sends
        first, last = bisect.bisect_left(sends, start), bisect.bisect_right(sends, end)
        runs: list[tuple[bool | None, float, int]] = []  # accepted?, its last start, calls
        for started in itertools.islice(sends, first, last):
            accepted = self._was(self._accepted, started)
            kind = True if accepted else (False if self._was(self._refused, started) else None)
            if runs and runs[-1][0] is kind:
                runs[-1] = (kind, started, runs[-1][2] + 1)
            else:
                runs.append((kind, started, 1))
        proofs = 0
        for before, refusals, after in zip(runs, runs[1:], runs[2:], strict=False):
            if before[0] is not True or refusals[0] is not False or after[0] is not True:
                continue
            refused_for = refusals[1] - before[1] - LATE
            if refused_for <= 0.0:
                continue  # the gateway may have seen these calls at once: no ceiling
            ceiling = 1.0 / refused_for
            floor = (after[2] - 1) / (after[1] - refusals[1] + LATE)
            proofs += floor > ceiling
        return proofs >= 2

    def _starts(self, sent: float) -> tuple[float, float] | None:
        """When the call before the one started at ``sent`` started, and when that one did
        as ``sent`` saw it (``SAME_CALL``); ``None``: no call before it known."""
        sends = self._sends
        own = bisect.bisect_right(sends, sent + SAME_CALL) - 1
        return (sends[own - 1], sends[own]) if own >= 1 else None

    def _ceiling_at(self, sent: float) -> tuple[float, float] | None:
        """The call before the one refused at ``sent`` and the most the quota can have been
        then, if that call was accepted (``None``: nothing known): the gateway's bucket
        held less than a token at the refused call, and no less than none just after the
        accepted one before, so it got less than a token in between, whatever its burst:
        the quota is under 1 / (the time between them), the pace the refused call went at.
        Only after an accepted call: a gateway counting calls per whole second refuses
        every call past its count however far apart (walking back over refused calls to
        the last accepted one, as a token bucket allows, said 2-25 calls/s of a quota of
        150), and a gap of more than two intervals of the pace is a pause or an idle
        stretch. Whether it was accepted is decided once its answer is in
        (``_settle_ceiling``): a 429 comes back in milliseconds, before the answers of
        calls sent before it, refused ones too where the gateway's answers take their
        latency."""
        starts = self._starts(sent)
        if starts is None:
            return None
        before, own = starts
        gap = own - before
        return (before, 1.0 / gap) if 0.0 < gap <= 2.0 / self.rate_sent_at(sent) else None

    def _settle_ceiling(self) -> None:
        """The ceiling (``_ceiling_at``) once the answer of the call it waits on is in:
        accepted, it holds; refused, there is none."""
        if self._awaited is None:
            return
        before, ceiling = self._awaited
        if self._was(self._accepted, before):
            self._ceiling, self._awaited = ceiling, None
        elif self._was(self._refused, before):
            self._awaited = None

    @staticmethod
    def _was(times: list[float], started: float) -> bool:
        """Whether the call started at ``started`` is one of ``times`` (``SAME_CALL``)."""
        index = bisect.bisect_left(times, started - SAME_CALL)
        return index < len(times) and times[index] <= started + SAME_CALL

    def measure(self, sent: float, not_before: float) -> tuple[float, float, float] | None:
        """The quota, and when the span it is from began and ended, from the accepted calls
        sent between an earlier refused call of the last ``window`` (or further back, as far
        as the last ``measure_calls`` accepted calls: ``look_back``; never from before
        ``not_before``, a pause's end) and the one refused at ``sent`` (the gateway's bucket was
        empty at both, and calls went at least as fast in between: it accepted its quota
        times the time between them, give or take a call); ``None`` when that is too
        short, holds too few calls, or spans a pause, to say, or when calls sent in between
        are still out, unless even counted as accepted they are under ``TWICE`` of the
        calls sent: then that count, the most the quota can be; else the span up to the
        latest earlier refused call whose calls are all answered, if that measures
        (``_answered``). From the earliest such call (the longest span, the finest measure),
        unless the latest one that spans enough says otherwise by more than a call in its
        span: then the quota changed in between, and the latest says what it is now."""
        measured, out = self._measure_to(sent, not_before)
        return self._answered(sent, not_before) if out and measured is None else measured

    def _answered(self, sent: float, not_before: float) -> tuple[float, float, float] | None:
        """The measure (``measure``) up to the latest refused call before ``sent`` whose
        span's calls are all answered (``None``: none, or it measures nothing). A 429 comes
        back at once and an accepted call takes its latency: with latency spread around
        300 ms some call sent in the last half second is nearly always out when a refusal
        comes, and where workers sleeping on Retry-After held what was really sent to about
        twice the quota, no refusal was measured for 5-13 s, each stepping 3 % under the
        rate refused (a quota of 5 at burst 10: 3-13 % of the calls refused from 10 s on in
        6 of 10 runs). Both ends' buckets were empty as at any two refused calls. Only a
        span of a ``SECOND`` or more: a gateway counting calls per whole second refuses a
        clump as each second's count runs out, and a span from one clump to the next under a
        second holds a whole count (300 calls/s over 0.92 s read as 324.7, and the cruise
        at it refused 2.3 % of the calls from 10 s on, where 1.5 %)."""
        refused = self._refused
        first = bisect.bisect_left(refused, self.look_back(sent, not_before))
        for end in range(bisect.bisect_left(refused, sent) - 1, first, -1):
            earlier = refused[end]
            if not self.out_before(earlier, not_before):
                measured = self._measure_to(earlier, not_before)[0]
                return measured if measured and measured[2] - measured[1] >= SECOND else None
        return None

    def _measure_to(
        self, sent: float, not_before: float
    ) -> tuple[tuple[float, float, float] | None, bool]:
        """``measure`` up to the refused call sent at ``sent``, and whether calls in its span
        are still out."""
        c = self._config
        # Not from before a pause's end: nobody sent while it lasted, and the gateway's
        # bucket filled up again.
        first = bisect.bisect_left(self._refused, self.look_back(sent, not_before))
        end = bisect.bisect_left(self._refused, sent)
        if first >= end:
            return None, False
        before = bisect.bisect_left(self._accepted, sent)
        out = self.out_before(sent, not_before)
        if out > 0:
            # Calls sent in between are still out: their answers would count. Counted as
            # accepted, every one, they say the most the quota can be; where that is under
            # ``TWICE`` of the calls sent, the pace was twice the quota or more: that is the
            # measure (a 429 comes back at once, the calls accepted take their latency).
            # Not where none in between is known accepted: that is a bound only for a token
            # bucket; a gateway counting calls per second refuses a clump, and the calls out
            # in it said 39.5 calls/s of a quota of 150 (12 out over 0.3 s). Nor where two
            # in a row are known accepted: at twice a token bucket's quota it gets under a
            # token between two calls and accepts no two in a row, where a gateway counting
            # calls per second accepts its whole count in a row as each second begins, and
            # a span from one second's clump into the next's holds one count over more than
            # a second (300 calls over 1.46 s measured 206 calls/s of a quota of 300).
            start = self._refused[first]
            accepted = before - bisect.bisect_left(self._accepted, start)
            most = accepted + out
            span = sent - start
            sends = self.sends_since(start, sent)
            if span < c.measure_s or most < c.measure_calls or most > TWICE * sends or not accepted:
                return None, True
            if not self.alternated(start, sent, known=True):
                return None, True
            return (most / span, start, sent), True
        latest = None
        for index in range(end - 1, first - 1, -1):
            start = self._refused[index]
            span = sent - start
            accepted = before - bisect.bisect_left(self._accepted, start)
            if span < c.measure_s or accepted < c.measure_calls:
                continue
            if latest is None:
                latest = (accepted / span, start, sent)
            if index == first:
                quota = accepted / span
                now, since, _ = latest
                close = abs(quota - now) <= 1.0 / (sent - since) + 1.0 / span
                return ((quota, start, sent) if close else latest), False
        return latest, False

    def out_before(self, sent: float, not_before: float) -> int:
        """Calls sent between the earliest refused call a measure of ``sent`` reaches back
        to (``look_back``; never before ``not_before``) and ``sent`` whose answers are
        still out (0: none, or no such refused call): ``measure`` counts them as what the
        quota could be at most, and a refusal can be measured in full once they are in."""
        first = bisect.bisect_left(self._refused, self.look_back(sent, not_before))
        end = bisect.bisect_left(self._refused, sent)
        if first >= end:
            return 0
        start = self._refused[first]
        known = self.accepted_between(start, math.nextafter(sent, -math.inf)) + end - first
        return self.sends_since(start, sent) - known

    def look_back(self, sent: float, not_before: float) -> float:
        """The earliest refused call a refusal of a call sent at ``sent`` is measured from:
        the last ``window``, or further back to the call before the last ``measure_calls``
        accepted where that is longer (under about ``measure_calls / window`` calls/s a
        window never holds enough for a measure); never across a pause (``not_before``, its end)
        or an idle stretch (``idle_ended``)."""
        c = self._config
        start = sent - c.window
        before = bisect.bisect_left(self._accepted, sent) - c.measure_calls - 1
        if before >= 0 and self._accepted[before] < start:
            start = max(self._accepted[before], sent - c.forget)
            start = max(start, self.idle_ended(start, sent))
        return max(start, not_before)

    def idle_ended(self, since: float, sent: float) -> float:
        """When the last idle stretch between ``since`` and ``sent`` ended (``-inf``: none):
        no call started for longer than ``window`` and two intervals of the pace. The gateway's
        bucket filled up while nobody sent, and the tokens it got while full were lost: a
        measure across it says a fraction of the quota (a run that waited 20 s for ids at a
        quota of 3 calls/s was cut to 0.32 calls/s by its first refusal after)."""
        c = self._config
        sends = self._sends
        later = sent
        for index in range(bisect.bisect_left(sends, sent) - 1, -1, -1):
            earlier = sends[index]
            if later <= since:
                break
            if later - earlier > max(c.window, 2.0 / self.rate_sent_at(earlier)):
                return later
            later = earlier
        return -math.inf

    # -- the history ---------------------------------------------------------------------
    def horizon(self, now: float) -> float:
        """How far back the calls are kept: two ``window``s, or as far as the last
        ``measure_calls`` accepted ones and two more where that is longer (a measure's
        look-back, ``look_back``), at most ``forget``."""
        c = self._config
        accepted = self._accepted
        horizon = now - 2.0 * c.window
        if len(accepted) < c.measure_calls + 2:
            horizon = -math.inf
        elif accepted[-c.measure_calls - 2] < horizon:
            horizon = accepted[-c.measure_calls - 2]
        return max(horizon, now - c.forget)

    def _remember(self, times: list[float], sent: float, now: float) -> None:
        bisect.insort(times, sent)
        # As far back as a measure reaches (``horizon``), and a ``JITTER_SPAN`` where that
        # holds no more than ``jitter_calls`` (at most that many kept for it).
        kept = now - JITTER_SPAN
        calls = self._config.jitter_calls
        if len(times) > calls:
            kept = max(kept, times[-calls])
        horizon = min(self.horizon(now), kept)
        if times[0] < horizon:
            del times[: bisect.bisect_left(times, horizon)]

    def accepted_between(self, start: float, sent: float) -> int:
        """Accepted calls sent from ``start`` up to ``sent``."""
        return self._count(self._accepted, start, sent)

    def refused_between(self, start: float, sent: float) -> int:
        """Refused calls sent from ``start`` up to ``sent`` (one at ``sent`` counts: it is
        the refusal being read)."""
        return self._count(self._refused, start, sent)

    @staticmethod
    def _count(times: list[float], start: float, sent: float) -> int:
        return bisect.bisect_right(times, sent) - bisect.bisect_left(times, start)

    def sends_since(self, start: float, end: float = math.inf) -> int:
        """Calls started from ``start`` up to (not at) ``end``: the one count of what was
        really sent, for the growth's cap, the rate the workers were held to and
        ``measure``."""
        sends = self._sends
        return bisect.bisect_left(sends, end) - bisect.bisect_left(sends, start)

    def sent_rate(self, now: float, span: float) -> float:
        """Calls started per second over the last ``span`` seconds."""
        return self.sends_since(now - span) / span

    def rate_sent_at(self, sent: float) -> float:
        """The rate calls were paced at, at ``sent`` (before the history kept: the rate
        paced at now)."""
        history = self._history
        index = bisect.bisect_right(history, sent, key=lambda change: change[0]) - 1
        return history[index][1] if index >= 0 else self._pace()

    def _pace(self) -> float:
        """The rate paced at now: the last change's, else the first rate."""
        return self._history[-1][1] if self._history else self._initial

    def alternated(self, start: float, end: float, *, known: bool = False) -> bool:
        """Whether every call started from ``start`` up to ``end`` that was not refused
        came next to a refused one (no two accepted in a row); ``known``: every call whose
        answer said accepted (one still out is neither)."""
        sends = self._sends
        accepted_last = False
        for index in range(bisect.bisect_left(sends, start), bisect.bisect_left(sends, end)):
            if known:
                accepted = self._was(self._accepted, sends[index])
            else:
                accepted = not self._was(self._refused, sends[index])
            if accepted and accepted_last:
                return False
            accepted_last = accepted
        return True

    def longest_unrefused(self, start: float, end: float) -> float:
        """The longest time between two refused calls sent from ``start`` up to ``end``
        (``inf``: fewer than two)."""
        refused = self._refused
        times = refused[bisect.bisect_left(refused, start) : bisect.bisect_right(refused, end)]
        return max((later - earlier for earlier, later in itertools.pairwise(times)),
                   default=math.inf)  # fmt: skip

    def refused_run(self, sent: float) -> tuple[int, bool]:
        """How many calls in a row were refused (as their answers said) around the one
        sent at ``sent`` (0: it was not), and whether the run is known to have ended: the
        calls on either side of it known accepted (or none before it)."""
        sends = self._sends
        own = bisect.bisect_right(sends, sent + SAME_CALL) - 1
        if own < 0 or not self._was(self._refused, sends[own]):
            return 0, True
        first = own
        while first > 0 and self._was(self._refused, sends[first - 1]):
            first -= 1
        last = own
        while last + 1 < len(sends) and self._was(self._refused, sends[last + 1]):
            last += 1
        sides = [sends[index] for index in (first - 1, last + 1) if 0 <= index < len(sends)]
        ended = last + 1 < len(sends) and all(self._was(self._accepted, t) for t in sides)
        return last - first + 1, ended

    def counted_before(self, sent: float) -> tuple[int, float] | None:
        """The calls accepted in a row before the run of refusals the call refused at
        ``sent`` is in, and the time from the refused call before them to the run's first
        (``None``: not every one of them known, or no refused call before them): where that
        is under a ``SECOND``, what a gateway counting calls per whole second counted in the
        second between (``RateController._measure_late``)."""
        own = self._refused_index(sent)
        if own is None:
            return None
        sends = self._sends
        first = self._back_while(own, self._refused, known=True)
        start = self._back_while(first, self._accepted, known=True)
        if start == 0 or not self._was(self._refused, sends[start - 1]):
            return None
        return first - start, sends[first] - sends[start - 1]

    def unrefused_before(self, sent: float) -> int:
        """The calls not known refused (accepted, or still out) in a row before the calls
        not known accepted around the one refused at ``sent`` (0: it was not refused): how
        long the gateway let calls through before the refusals its refusal is one of."""
        own = self._refused_index(sent)
        if own is None:
            return 0
        first = self._back_while(own, self._accepted, known=False)
        return first - self._back_while(first, self._refused, known=False)

    def refusing_since(self, sent: float) -> float:
        """When the first of the calls not known accepted around the one refused at ``sent``
        started (``sent``: it was not refused): how long the gateway has refused every call
        (or left it unanswered) up to it."""
        own = self._refused_index(sent)
        if own is None:
            return sent
        return self._sends[self._back_while(own, self._accepted, known=False)]

    def _refused_index(self, sent: float) -> int | None:
        """The index among the starts of the refused call sent at ``sent`` (``None``: not
        one, as its answer said)."""
        own = bisect.bisect_right(self._sends, sent + SAME_CALL) - 1
        return own if own >= 0 and self._was(self._refused, self._sends[own]) else None

    def _back_while(self, index: int, times: list[float], *, known: bool) -> int:
        """The earliest index from which every call started before ``index`` is one of
        ``times`` (``known``), or every one is not."""
        sends = self._sends
        while index > 0 and self._was(times, sends[index - 1]) is known:
            index -= 1
        return index

    def paced_under(self, rate: float, start: float, end: float) -> bool:
        """Whether calls were paced slower than ``rate`` at some time between the two."""
        if self.rate_sent_at(start) < rate:
            return True
        return any(start < when < end and paced < rate for when, paced in self._history)

    def __repr__(self) -> str:
        return (
            f"GatewayEvidence(sent={len(self._sends)}, accepted={len(self._accepted)}, "
            f"refused={len(self._refused)}, floor={self.floor():.4g}, "
            f"ceiling={self._ceiling:.4g}, burst={self._burst:.4g})"
        )
