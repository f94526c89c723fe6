"""Whether 503s fall with the rate, for ``--rate auto`` (``RateController.on_overload``): a
service past its capacity sheds what it cannot take, so the share of 503s falls when the
rate falls and what it serves stays flat as the rate rises; 503s at random (faults to
retry) are the same share at any rate. At one steady rate the two look alike: what is served
holds flat under either. The design is in ``docs/rate-auto.md``.

``FaultWatch`` counts the 503s of the last ``overload_answers`` answers: at
``overload_share`` of them over the share of faults known (``faults``) the service may be
past its capacity (``overloaded``). Where the controller cuts to what it served, it holds
the rate there: a trial (``start``). The 503s of the calls sent from a ``window`` after the
cut on decide (a service that counts what it served over the last second sheds for a
second after the rate fell, the load it took before still counted: its first three answers
after the cut were 503s, and read as random, 26-30 % of the calls were answered 503):

- more than ``TRIAL_FAULTS`` / 5 of them past what ``MOST_FAULTS`` of the trial's answers
  would hold (``Outcome.STILL``; 7 of 7, 10 of 14): the trial's own rate is still past what
  the service takes, more than any faults' share (a service counting its capacity over
  10 s, or shedding by a 10 s average, is still full seconds after the cut; read as
  random, the rate returned to start-up's and 47-61 % of the calls were answered 503 from
  10 s on). The controller halves the rate and tries again from there;
- more than ``TRIAL_FAULTS`` / 5 of them under ``MOST_FAULTS`` and a fifth of the trial's
  answers (the share that is overload whatever faults were counted): the cut bought
  nothing (``Outcome.RANDOM``): the controller returns to the rate before it, and the
  trial's answers, and every one after, tell the share of faults known, so that share is
  not read as overload again (between the two, the trial goes on);
- fewer, once as many answers as ``TRIAL_FAULTS`` 503s at the share that set it off (over
  the faults known) would take (``Outcome.FELL``): the service sheds past a capacity, and
  its next cuts are not tried (``shedding``).

Where nothing was served (the answers before the cut all 503s, as many in a row as an
overload counts: ``unserved``; or a trial ``STILL`` with no 503 after an answer served:
not ``mixed``), no capacity was found: a service out answers 503 at any rate, and one that
counts every call, its 503s too, serves none past its capacity. The controller's next trial
is short (``Stage.OUT`` of its ``Recovery``, which says what each trial is): it ends
``FELL`` at the recovery's ``length`` of answers served in a row, the 503s before them not
counted (an outage's last ones), and its ``FELL`` says nothing of shedding: the service
serves again (a trial of the first cut's 100 answers lasted 500 s at the floor of 0.2
calls/s, and ended ``FELL`` as a capacity). At the step back up to the rate before
(``Stage.UP``) more 503s than few rose with the rate (``STILL``), not random.

503s that pass their known share by ``overload_share`` again rose with the rate since a
trial found them random (at their share, the next fifth comes by chance in well under 1 %
of windows): that cut is not tried either (``clear``). The share known counts for at most
``MOST_FAULTS``: counted from the trial on, the share of a service shedding past its
capacity rose with the rate the trial returned to, and lifted what a fifth must pass out of
reach (a service shedding over a 10 s average of its arrivals: 5 of 9 answers of a trial,
then all, at 8000 calls/s against a capacity of 5, 99.7 % of the calls answered 503).

Pure: the times are the caller's; no clock, no I/O.
"""

from __future__ import annotations

from collections import deque
from enum import StrEnum
from typing import TYPE_CHECKING

from worker.pacing.outage import Recovery, Stage

if TYPE_CHECKING:
    from worker.pacing.controller import AdaptiveConfig

TRIAL_FAULTS = 20.0
"""A trial lasts as many answers as would hold this many 503s at the share that set it off
(over the faults known): 100 at a fifth, 40 at half. It finds 503s at random when more than
a fifth of these come: 2.4 % of trials of 10 % at random end otherwise (with 10 of 50, a
quarter, 11 %: a fifth of 50 answers comes by chance in 2.5 % of windows at 10 %), 0.04 %
at 15 %."""


MOST_FAULTS = 0.4
"""The most the share of faults known lifts what ``overload_share`` must pass: 503s are
overload at 0.6 of the last answers, whatever was counted."""

SAME_SHARE = 0.15
"""How far a trial's share of 503s may lie from the share it is compared with (``known``:
the 503s before its cut and in the trials before it ``STILL``, else the faults known) and
still be the same share: 503s that did not fall with the rate, faults. Two binomial
shares of 0.6 over 20 and 30 answers lie 0.14 apart at one standard deviation; a service
past a capacity that sheds 0.8 of its calls at a rate sheds 0.6 at half of it."""

SPAN = 10.0
"""The seconds from a cut's first trial before 503s at the same share read as faults: a
service that counts or averages its arrivals over 10 s sheds the same share at any rate
until the rate before the cut has left its count (read so from the first trial on, a
service shedding by a 10 s average answered 0.58 of the calls 503, median of 10 seeds;
0.07 now, as before). Only the first halving's trial reads so: a count or average over
longer sheds the same share through more halvings, and read random at the third, 2 calls/s
past a capacity of 5 averaged over 30 s, the rate returned to 57, 11 times the capacity
(from 20 s on 1.31 of it sent, 40 % answered 503, median of 10 seeds; 0.42 and 15 %
now). Random 503s past ``MOST_FAULTS`` at 50 calls/s halve deeper within 10 s: 0.36 of
the quota used at 60 % (0.51 read at any halving)."""

FEWEST_ANSWERS = 10
"""The answers a trial compared with a share known takes at least before it says."""


class Outcome(StrEnum):
    """What a trial found."""

    RANDOM = "random"  # the 503s did not fall with the rate: faults, whatever the rate
    FELL = "fell"  # they fell: a service past its capacity
    STILL = "still"  # more than faults' most share at the trial's rate: past the service


class FaultWatch:
    """The last ``overload_answers`` answers (503 or not), the trial under way (``trial``:
    when its cut was made; what it is: ``recovery``'s ``stage``), the faults known
    (``faults``) and whether a trial found the service shedding past a capacity
    (``shedding``)."""

    __slots__ = ("_answers", "_config", "_cut", "_faults", "_first", "_halvings", "_length",
                 "_run", "_same", "_served", "_still", "_streak", "_tried", "mixed",
                 "recovery", "shedding", "trial")  # fmt: skip

    def __init__(self, config: AdaptiveConfig, recovery: Recovery | None = None) -> None:
        self._config = config
        self.recovery = Recovery() if recovery is None else recovery
        self._answers: deque[bool] = deque(maxlen=config.overload_answers)  # True: a 503
        self._faults = (0, 0)  # 503s and answers since a trial found them random
        self._streak = (0, 0.0)  # the last answers' 503s in a row, and when the first was sent
        self._served = (0, 0)  # the answers served in a row before the streak, and since it
        self.trial: float | None = None
        self._length = 0.0  # the answers a trial from the last cut lasts
        self._run = 0  # the answers served in a row in the trial under way
        self._tried = (0, 0)  # its 503s and answers so far
        self._cut = (0, 0)  # the 503s and answers that set the last cut off
        self._still = (0, 0)  # those of the trials since it that ended STILL
        self._halvings = 0  # those trials: the halvings since the cut
        self._first = 0.0  # when the cut's first trial began
        self._same = False  # the verdict last said: the share known, at a lower rate
        self.mixed = False  # a 503 came after an answer served, in the trial last under way
        self.shedding = False

    @property
    def faults(self) -> float:
        """The share of 503s at random (0: no trial found any)."""
        failed, answers = self._faults
        return min(MOST_FAULTS, failed / answers) if answers else 0.0

    def answered(self, sent: float, *, failed: bool) -> Outcome | None:
        """An answer (``failed``: a 503) of a call sent at ``sent``: what the trial under
        way found, once it can say (``None``: nothing yet, or no trial)."""
        self._answers.append(failed)
        streak, first = self._streak
        before, since = self._served
        if failed:
            self._streak = (streak + 1, first if streak else sent)
            self._served = (before, 0) if streak else (since, 0)
        elif not (streak and sent < first):  # one sent before them, overtaken, breaks none
            self._streak = (0, 0.0)
            self._served = (before, since + 1)
        else:
            self._served = (before + 1, since)
        trial = self.trial
        if trial is None:
            if self._faults[1]:  # faults found: every answer tells their share
                self._faults = (self._faults[0] + failed, self._faults[1] + 1)
            return None
        if sent < trial + self._config.window:
            return None
        self.mixed = self.mixed or (failed and self._tried[0] < self._tried[1])
        self._tried = tried = (self._tried[0] + failed, self._tried[1] + 1)
        self._run = 0 if failed else self._run + 1
        outcome = self._verdict(*tried, sent=sent)
        if outcome is not None:
            self.trial = None
            still = (self._still[0] + tried[0], self._still[1] + tried[1])
            self._still = still if outcome is Outcome.STILL else (0, 0)
            self._halvings = self._halvings + 1 if outcome is Outcome.STILL else 0
        if outcome is Outcome.RANDOM:
            self._faults = (self._faults[0] + tried[0], self._faults[1] + tried[1])
            if self._same:  # the trial's answers, at its rate, are counted as faults
                self._answers.clear()
        elif outcome is Outcome.FELL and self.recovery.stage is not Stage.OUT:  # OUT: served again
            self.shedding = True
        return outcome

    def _verdict(self, failed: int, answers: int, sent: float) -> Outcome | None:
        """What a trial's ``failed`` 503s of its ``answers`` (the last sent at ``sent``)
        say (``None``: not yet)."""
        few = TRIAL_FAULTS / 5.0
        stage = self.recovery.stage
        known = self._known()
        self._same = False
        if known is not None and stage is Stage.BOUND:
            if answers < FEWEST_ANSWERS:
                return Outcome.STILL if failed - MOST_FAULTS * answers > few else None
            share = failed / answers
            same = abs(share - known) <= SAME_SHARE
            # The same share at a lower rate: faults, not a service past a capacity (under
            # the share a service full, or still draining, sheds at near every call); at
            # one halving only, deeper a count over more than 10 s still draining.
            most = 1.0 - self._config.overload_share / (1.0 if self._still[1] else 2.0)
            spent = sent - self._first >= SPAN and self._halvings <= 1
            if failed > few and same and share < most and spent:
                self._same = True
                return Outcome.RANDOM
            # Fell with the rate, its 503s all before the answers served (a count
            # draining): not random, whatever the share left.
            fell = not same and share < known and not self.mixed
            if failed > few and fell and failed - MOST_FAULTS * answers <= few:
                return Outcome.FELL if answers >= self._length else None
        if failed - MOST_FAULTS * answers > few:
            return Outcome.STILL  # past the most share of faults ever counted, by more than few
        if stage is Stage.OUT:  # nothing served before it: its 503s are an outage's last ones
            return Outcome.FELL if self._run >= self.recovery.length else None
        if failed > few and stage is Stage.UP:
            return Outcome.STILL  # served under this rate, not at it: they rose with it
        if failed > few:
            # Under the share that is overload whatever faults were counted: random ones.
            overload = (MOST_FAULTS + self._config.overload_share) * answers
            return Outcome.RANDOM if failed < overload else None
        return Outcome.FELL if answers >= self._length else None

    def _known(self) -> float | None:
        """The share of 503s a trial's is compared with: after a trial ``STILL``, that of
        the answers that set the cut off and of the trials ``STILL`` since (at rates over
        the trial's); else the share of faults known, not capped (``None``: neither)."""
        failed, answers = self._faults
        if self._still[1]:
            failed, answers = self._still[0] + self._cut[0], self._still[1] + self._cut[1]
        return failed / answers if answers else None

    def shed(self) -> float:
        """The trial that just ended ``RANDOM`` was a service shedding past a capacity after
        all (the caller knows a trial at twice its rate ended ``STILL``): its 503s are not
        faults, and the service sheds (``shedding``). Returns the share of its answers
        served."""
        failed, answers = self._tried
        self._faults = (0, 0)  # the share counted was the shedding's, not faults'
        self.shedding = True
        return (answers - failed) / max(1, answers)

    def overloaded(self) -> bool:
        """Whether 503s are ``overload_share`` of the last answers over the faults known
        (and not a trial under way, nor two 503s fewer)."""
        return self.trial is None and sum(self._answers) >= self._overload()

    def unserved(self) -> bool:
        """Whether the last answers are 503s, as many in a row as ``overloaded`` counts:
        nothing served since the 503s came (a service out, or full), the rate they came
        at no capacity. The answer of a call sent before the first of them breaks no run:
        an outage's 503s come back at once, and overtake the answers of calls sent before
        it (read in the order answered, a service out 1 s of every 11 was read as a
        capacity at each outage: 0.65 of a quota of 50 used after it held, 0.997 now)."""
        return self._streak[0] >= self._overload()

    def out_again(self, rate: float) -> bool:
        """Whether the trial under way ends in 503s in a row (every one of its 503s in
        them, in send order) after a second of calls at ``rate`` served in a row (and as
        many as an overload counts 503s): a service out again. One back with a lower
        capacity it sheds past serves less than a second's calls in a row (its capacity's:
        20 of 48 at 48 calls/s past 20, then 503s)."""
        least = max(self._overload(), rate)
        return 0 < self._tried[0] <= self._streak[0] and self._served[0] >= least

    def _overload(self) -> float:
        """How many 503s of the last answers are overload: ``overload_share`` of them over
        the faults known, and two at least."""
        c = self._config
        return max(2.0, (self.faults + c.overload_share) * c.overload_answers)

    def clear(self) -> None:
        """The controller cut for 503s: the answers before it are spent. After a trial
        found them random, they rose with the rate since: the service sheds past a
        capacity, and the cut is not tried. Not where they are 503s in a row
        (``unserved``): a service out answers 503 at any rate (read so, a service out 2 s
        of every 4 was read shedding at its second outage, and the rate stepped down
        through the rest: 0.035 of a quota of 50 used after it held, 0.94 now)."""
        share = sum(self._answers) / max(1, len(self._answers))
        rose = share >= self.faults + 2.0 * self._config.overload_share
        if self._faults[1] and rose and not self.unserved():
            self.shedding = True
            self._faults = (0, 0)  # the share counted was the shedding's, not faults'
        self._length = TRIAL_FAULTS / max(share - self.faults, self._config.overload_share)
        self._cut = (sum(self._answers), len(self._answers))
        self._still, self._halvings = (0, 0), 0
        self._answers.clear()
        self._streak = (0, 0.0)

    def start(self, now: float) -> None:
        """A trial from the cut just made at ``now`` (after ``clear``), of the kind the
        ``recovery``'s ``stage`` says. ``OUT``, a short one, after nothing was served: it
        ends ``FELL`` at the recovery's ``length`` of answers served in a row (against 503s
        at near every answer, a handful is decisive; the first cut's 100 answers took 500 s
        at 0.2 calls/s), the 503s before them not counted. ``UP``: at a rate over one just
        served in full, where more 503s than few rose with the rate (``STILL``), not random
        (a service counting every call fills its count again: its first answers served,
        then 503s, read random, restored the rate past it)."""
        self.trial = now
        if not self._still[1]:
            self._first = now
        self._tried = (0, 0)
        self.mixed = False
        self._run = 0

    def __repr__(self) -> str:
        return f"FaultWatch(faults={self.faults:.3g}, shedding={self.shedding}, trial={self.trial})"
