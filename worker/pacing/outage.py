"""Where the 503s' trials stand, and the way back from an outage, for ``--rate auto``
(``RateController._tried``; the trials' answers are read by ``FaultWatch``). The design is
in ``docs/rate-auto.md``.

A cut for 503s to what the service served is a trial (``begin``): the rate holds there
and its 503s say whether they fall with the rate. From that first cut on, until any other
cut (``drop``), the state before it is kept to return to (``before``), and the trials go
through these stages (``Stage``):

- ``BOUND``: the trial's rate bounds a capacity. ``STILL`` there halves the rate, tried
  again (``halve``; ``halved``: the rate last found still past the service); ``RANDOM``
  returns to the state before; ``FELL`` stands, the probes capped half-way to ``halved``.
- ``OUT``: nothing was served since the cut (its answers 503s in a row: a service out, or
  one counting every call, its 503s too, and full): the trial's rate bounds nothing. The
  trial is short: it ends ``FELL`` at ``length`` answers served in a row (``back_in``), the
  503s before them not counted; ``STILL`` halves on, still ``OUT`` unless a 503 came after
  an answer served (``mixed``). Served again, the rate before is tried (``step_up``).
- ``UP``: the step back up to a margin under the rate before (``stepped``), tried once an
  outage. Served in full there, the state before returns; more than a few 503s there rose
  with the rate (``STILL``): a bound, and the halving goes on (``BOUND``). A halving's
  trial under it that reads ``RANDOM`` where the one at twice its rate read ``STILL`` is a
  lower capacity (``lower``): the rate goes to what that trial served, and stands.

Where the rate before was start-up's (never served in full: a service counting every call
that start-up ran past), nothing is ``OUT``: there is no rate to step back up to.

Pure: the times are the caller's; no clock, no I/O.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.pacing.controller import ControllerState

SERVED_AGAIN = 2.0
"""The answers served in a row that end a trial after trials or a cut where nothing was
served (``back_in``): against 503s at near every answer (a service out, or one counting
every call, full), two in a row come by chance in one trial of a hundred at 90 %."""


class Stage(StrEnum):
    """What the trial under way is (``Recovery``)."""

    BOUND = "bound"  # at a rate that bounds a capacity
    OUT = "out"  # after nothing was served: short, ended by answers served in a row
    UP = "up"  # the step back up to the rate before, after an outage


def back_in(window: float, rate: float) -> float:
    """The answers served in a row that end a trial after nothing was served: at most
    ``SERVED_AGAIN``, and no more than a ``window`` holds at ``rate`` (one at least: at the
    floor, 0.2 calls/s, two take 10 s)."""
    return max(1.0, min(SERVED_AGAIN, window * rate))


class Recovery:
    """The 503s' trials since their first cut: the state before it (``before``: when, and
    the state; ``None``: no trial of theirs stands), the ``stage`` of the trial under way,
    the rate a trial last found still past the service (``halved``; 0: none), and the rate
    of the step back up after an outage (``stepped``; 0: none)."""

    __slots__ = ("again", "before", "halved", "length", "stage", "stepped")

    def __init__(self) -> None:
        self.before: tuple[float, ControllerState] | None = None
        self.stage = Stage.BOUND
        self.halved = 0.0
        self.stepped = 0.0
        self.length = 0.0  # the answers served in a row that end an ``OUT`` trial
        self.again = False  # the step back up met an outage again (``halve``): once a recovery

    @property
    def outage_before(self) -> ControllerState | None:
        """The state before the first cut of trials that served nothing, while the rate
        has not returned to it (``OUT`` or ``UP``)."""
        if self.before is None or self.stage is Stage.BOUND:
            return None
        return self.before[1]

    def begin(self, before: tuple[float, ControllerState], *, out: bool, length: float) -> None:
        """A trial from a cut for 503s (``out``: nothing was served before it, ``length``
        the answers served in a row that end it then); ``before`` is the first such cut's."""
        self.before = before
        self.stage = Stage.OUT if out else Stage.BOUND
        self.halved = self.stepped = 0.0
        self.again = False
        self.length = length

    def drop(self) -> None:
        """Another cut came: it stands, and no trial returns past it."""
        self.before = None

    def reset(self) -> None:
        """A state learnt elsewhere: no trial's cut is its."""
        self.before = None
        self.stage = Stage.BOUND
        self.halved = self.stepped = 0.0
        self.again = False

    def end(self) -> tuple[tuple[float, ControllerState], bool] | None:
        """The trial under way ended: the state before the first cut (``None``: another
        cut came since, and stands), and whether the trial was the step back up."""
        if self.before is None:
            return None
        before, self.before = self.before, None
        up = self.stage is Stage.UP
        if up:
            self.stage = Stage.OUT  # the step's trial is over; the outage is not, till read
        return before, up

    def halve(
        self, before: tuple[float, ControllerState], rate: float, *, up: bool, mixed: bool,
        startup: bool, length: float, again: bool,
    ) -> None:  # fmt: skip
        """The trial at ``rate`` ended ``STILL`` (``up``: it was the step back up; ``mixed``:
        a 503 came after an answer served; ``again``: it served, then only 503s,
        ``FaultWatch.out_again``); half of it is tried next, the state ``before`` kept.
        A trial that served nothing (none before it bounded, it was no step back up, and
        not ``mixed``) says nothing of a capacity: the next is ``OUT``, ``length`` answers
        served in a row ending it; else ``rate`` is a bound (``halved``). The step back up
        served, then 503s in a row, is a service out again as much as one past a capacity
        (one counting every call, full again): once a recovery (``again``) it bounds
        nothing, and the rate before is stepped back up to once served again (read as a
        bound, a second outage of 5 s from 5 s after the first halved to 6 calls/s and
        stood there, the probes capped at 9: 0.18 of a quota of 50 used 20-60 s after
        it). Where the rate before was ``startup``'s, never served in full, there is none
        to step back up to: every trial is ``BOUND``."""
        again = up and again and not self.again
        out = not startup and (again or not (self.halved or up or mixed))
        self.again = self.again or again
        if not out:
            self.halved = rate
        self.before = before
        self.stage = Stage.OUT if out else Stage.BOUND
        self.length = length

    def step_up(self, before: tuple[float, ControllerState], rate: float) -> None:
        """Served again after nothing was: the trial at ``rate``, a margin under the rate
        before, is the step back up."""
        self.before = before
        self.stage = Stage.UP
        self.stepped = rate

    def lower(self) -> bool:
        """Whether a trial that ended ``RANDOM`` is a lower capacity after an outage: the
        step back up was halved, and a halving under it too."""
        return 0.0 < self.halved < self.stepped

    def back(self) -> None:
        """The state before returns (``RANDOM``): the outage, if any, is over."""
        self.stage = Stage.BOUND
        self.stepped = 0.0
        self.again = False

    def stands(self) -> float:
        """The trial's rate stands (``FELL``): the rate last found still past the service
        (0: none), which the probes stop half-way to; the trials are over."""
        halved, self.halved, self.stepped = self.halved, 0.0, 0.0
        self.again = False
        return halved

    def __repr__(self) -> str:
        before = None if self.before is None else f"{self.before[1].rate:.4g}"
        return (
            f"Recovery(stage={self.stage.value}, before={before}, halved={self.halved:.4g}, "
            f"stepped={self.stepped:.4g})"
        )
