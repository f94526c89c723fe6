"""A count over a long window (10 s, a minute, fixed or sliding), for ``--rate auto``.

A token bucket refuses a call for a fraction of a second: its ``Retry-After`` is a second or
less (rounded up), and it accepts calls again at its quota whatever was sent before. A
gateway counting calls over a long window refuses every call from its count's end to the
window's end (fixed), or to when its oldest accepted call leaves it (sliding), and says so:
its ``Retry-After`` points seconds ahead, to the same instant for every call it refuses
meanwhile. Start-up spends such a count within seconds, and read as a token bucket's, each
refusal measured the quota from the calls between refusals, which says nothing of a count
over 10 s (41-80 % of the calls refused from 10 s on).

``LongWindow`` reads the count: the calls accepted since the window began (the first call,
or the end of the count refused before) over the time from then to the ``Retry-After``
are the window's rate. The controller pauses to the ``Retry-After`` and then paces at
``WINDOW_PACE`` of that rate (``RateController.on_throttle``). A long ``Retry-After`` is
read as a window's end only once it is confirmed:

- a refusal that is news (it would pause every call), or the first long one told, with a
  ``Retry-After`` of ``LONG_WAIT`` or more lets one call go ``CHECK_AFTER`` into the pause,
  the others held;
  a window's count refuses it too, its ``Retry-After`` pointing within a second (whole
  seconds, rounded up) of the first's, where a gateway that only asks for a wait accepts
  it or points further on (a token bucket saying ``Retry-After: 5`` at 5 calls/s);
- or refusals have lasted a ``window`` with nothing accepted, each pointing ``LONG_WAIT``
  ahead: no token bucket of a quota of a call every two seconds or more refuses that long.

Once a window is known, a refusal of a call sent before its end pauses again to its end
(the count is spent), one sent after it measures the window again (its count over the time
from where the last most likely ended to where the new ``Retry-After`` most likely ends;
past the cap's lapse, over the last span, the rate read before standing where the count
allows it: ``LongWindow._again``), and refusals with a
short ``Retry-After`` within the first span after it, while its pace caps the rate (a
sliding window's oldest calls leaving one by one, where start-up sent them in a burst), cut
nothing.

Pure: the times are the caller's; no clock, no I/O.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import ClassVar

LONG_WAIT = 2.0
"""A ``Retry-After`` at least this long may be a window's end: a token bucket's is its
next token, a second or less for a quota of a call a second or more."""

CHECK_AFTER = 1.5
"""The check call goes this long into the pause, or halfway to its end where sooner: a
gateway that only asks for a wait has a token by then, and says a later end if not. Not a
whole number of seconds: a whole-second ``Retry-After`` rounded up from the check then
bounds the window's end from another fraction of a second than the first refusal's."""

SAME_END = 1.0
"""Two ``Retry-After`` of whole seconds, rounded up, pointing within this of each other
point to the same instant."""

WINDOW_PACE = 0.95
"""After a window's end, calls go at this share of its rate: evenly, under its count."""

CHECK_CALLS = 3
"""The fewest calls accepted since the first that a check call is let go for: fewer make no
count to read (a refusal of the first calls pauses them all, as ever)."""

SAME_CALL = 1e-6
"""A call's start as ``sent`` saw it and as its answer's latency dates it (rounding)."""

MIRROR_S = 0.5
"""A sliding window's slots free at the pace its calls of a span before went, over this."""

KEEP_S = 150.0
"""Accepted calls are kept this long: the span of a minute's window, twice, and more."""


@dataclass(frozen=True, slots=True)
class Window:
    """A window's count as read: it ends at ``end``, at ``rate`` calls/s over ``span``."""

    end: float
    rate: float
    span: float
    last: float = math.inf  # the last call the count accepted before the window's end
    shift: float = math.inf  # from the window's first call to ``end``: a span, at the least
    mirror: bool = False  # slots free as the calls a span before left it (a sliding window)
    likely: float = math.inf  # where it most likely ended (``inf``: at ``end``)

    @property
    def began(self) -> float:
        """Where the window after it began, as read again: where it most likely ended, or
        where calls went again where that is sooner (read from a check's two ends, the
        earliest they allow)."""
        return min(self.likely, self.end)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a refusal with a long ``Retry-After`` calls for (``LongWindow.refused``)."""

    CHECK: ClassVar[str] = "check"  # news: pause to ``until``, the check call's time
    HOLD: ClassVar[str] = "hold"  # pause to ``until`` (a count spent); cut nothing
    READ: ClassVar[str] = "read"  # a window read (``LongWindow.window``), ending at ``until``
    IGNORE: ClassVar[str] = "ignore"  # a short wait within a known window: cut nothing

    kind: str
    until: float = -math.inf


@dataclass(frozen=True, slots=True)
class Check:
    """A long ``Retry-After`` not yet read: the pause to ``end`` lets one call go at
    ``at`` (``sent``: when it went), the window counted from ``anchor``."""

    anchor: float
    end: float
    at: float
    hold: float  # the pause's end, at most ``max_pause`` after the refusal
    sent: float = math.inf
    count: int = 0  # the calls accepted since ``anchor`` when it was made: the count read


class LongWindow:
    """What the refusals with a long ``Retry-After`` say of a window's count."""

    __slots__ = ("_accepted", "_check", "_first", "_last_end", "_prior_end", "_seen_from",
                 "window", "windows")  # fmt: skip

    def __init__(self) -> None:
        self._accepted: deque[float] = deque()  # when the accepted calls were sent, in order
        self._first = math.inf  # the first call sent
        self._seen_from = -math.inf  # calls accepted before this were another's to count
        self._check: Check | None = None
        self._last_end = -math.inf  # the latest end a long Retry-After pointed to
        self._prior_end = -math.inf  # the one before it (another run of refusals)
        self.window: Window | None = None
        self.windows = 0  # windows read (confirmed)

    def sent(self, now: float) -> float | None:
        """A call starts. Where it is the check call: the pause's end (every other call
        waits for it); else ``None``."""
        self._first = min(self._first, now)
        check = self._check
        if check is None or now < check.at or check.sent < math.inf:
            return None
        self._check = replace(check, sent=now)
        return check.hold

    def accepted(self, sent: float, now: float) -> None:
        """The call sent at ``sent`` was accepted; the check's, if it was: no window."""
        accepted = self._accepted
        if accepted and sent < accepted[-1]:
            bisect.insort(accepted, sent)
        else:
            accepted.append(sent)
        while accepted[0] < now - KEEP_S:
            accepted.popleft()
        check = self._check
        if check is not None and sent >= check.sent - SAME_CALL:
            self._check = None  # a wait, not a window's end: the pause stays as it was

    def refused(
        self,
        sent: float,
        now: float,
        retry_after: float | None,
        *,
        news: bool,
        lasting: Callable[[], bool],
        max_pause: float,
        forget: float,
    ) -> Verdict | None:
        """A refusal of the call sent at ``sent``, answered at ``now`` with ``retry_after``
        (``news``: no other remembered, so it would pause every call; ``lasting()``: every
        call has been refused for a ``window`` or more up to it, asked only where needed;
        ``max_pause``: the longest pause; ``forget``: how long after its end the window's pace
        caps the rate, ``cap``). ``None``: nothing here (a token bucket's, as ever)."""
        window, check = self.window, self._check
        checked = check is not None and sent >= check.sent - SAME_CALL
        said = math.inf if retry_after is None else now + retry_after
        if (
            check is not None
            and checked
            and said < now + LONG_WAIT
            and abs(said - check.end) < SAME_END
        ):
            # The check refused with what was left of the count's window (its first refusal
            # came within a few seconds of the end): the same end. Read as a token bucket's,
            # the count was spent at start-up's pace again after the pause, and each worker
            # refused slept to the next end, unread (a fleet: 32 % refused).
            return self._confirm(check, said)
        if retry_after is None or retry_after < LONG_WAIT:
            if window is not None and sent < window.end + min(window.span, forget):
                # A sliding window's oldest calls leave one by one (start-up sent them in a
                # burst): a slot frees soon. The count is known; nothing to cut, but the
                # calls go no faster than those of a span before left it (``cap``). Not
                # once the cap has lapsed: a span read long (from the end before, across a
                # quota's change) would let the probe past it go uncut.
                self.window = replace(window, mirror=True)
                return Verdict(Verdict.IGNORE)
            if window is not None and retry_after is not None and sent > window.end + forget:
                return self._again(window, sent, now + retry_after, forget, short=True)
            return None
        end = now + retry_after
        # The first long wait told: news to what the window is, whatever short waits came
        # before it (a token bucket's, or a window's last second: a count spent in it said
        # 1 s, and the next window's 8 s was no news, unchecked and never read).
        first_long = self._last_end == -math.inf
        if end >= self._last_end + SAME_END:
            self._prior_end, self._last_end = self._last_end, end
        if check is not None and checked:
            return self._confirm(check, end)
        if window is not None:
            if sent < window.end:
                return Verdict(Verdict.HOLD, window.end)  # the count is spent until its end
            if window.end < self._seen_from:
                # A fleet's leader that took over after the window's end: the calls
                # accepted before it came were counted by another. Read from them, the count
                # was too low; the rate read stands, and the window ends anew there (the
                # next read from that end, not from where the old one likely ended).
                self.window = replace(window, end=end, likely=math.inf)
                return Verdict(Verdict.HOLD, end)
            return self._again(window, sent, end, forget)
        if lasting():
            # From the end of the count refused before (the window began again there), or
            # from the first call.
            return self._read(max(self._first, self._prior_end), end)
        if (news or first_long) and check is None and self._count(self._first, now) >= CHECK_CALLS:
            at = now + min(retry_after / 2.0, CHECK_AFTER)
            hold, count = now + min(retry_after, max_pause), self._count(self._first, now)
            self._check = Check(self._first, end, at, hold, count=count)
            return Verdict(Verdict.CHECK, at)
        return None

    def _again(
        self, window: Window, sent: float, end: float, forget: float, *, short: bool = False
    ) -> Verdict | None:
        """The window read again at a refusal pointing to ``end`` (whole seconds, rounded
        up): its count over the span from where the last most likely ended to where this
        one most likely ends, half a second before what it says (read to what it says, the
        span was half a second long on average and the pace 0.86 of the quota; from what
        the last said, half a second short: 2.1 % refused after a quota's fall).

        Past the cap's lapse (``forget``) the windows between were paced under their count:
        read from the last end, the count was mostly the pace's, and each lapse read the
        rate 3-5 % lower (0.86-0.89 of a fixed count used over 200 s). The count is then the
        last span's: where that began is known to a second (the end's rounding), and the
        probe past the lapse spends the count within seconds, so that second may hold a
        fifth of it. Where the count over the span begun a second earlier or later says
        the rate read before, that stands (its pace went unrefused for ``forget``); else
        the likely one. (Not where the span, read short from a window begun before the
        first call, ends before the refused call: no count in it.)

        ``short``: a wait under ``LONG_WAIT`` past the lapse (``None`` where not past it): a
        sliding count's oldest call about to leave as the probe passes its count, or a fixed
        count spent in its window's last second. Cut as a token bucket's, the rate came back
        and spent the count again and again: 3.7-4.5 % of a sliding 10 s count's calls
        refused over 200 s. It reads the window too; where the rate before does not stand,
        the count over the span begun a second earlier, the sliding count's own (its oldest
        call leaves within the second), not the likely one's, half a second of calls short
        (0.90 of the quota used). Calls go again from where the wait most likely ends, not
        from what it says: each lapse paused a second of the count (0.93 used, now 0.94)."""
        likely = end - SAME_END / 2.0
        began, span = window.began, window.span
        if sent <= window.end + forget or not likely - began >= 1.5 * span > 0 or end - span > sent:
            return None if short else self._read(began, likely, end)
        low, high = (self._count(end - span - late, end) / span for late in (0.0, SAME_END))
        rate = window.rate if low <= window.rate <= high else high if short else None
        return self._read(likely - span, likely, likely if short else end, rate=rate)

    def _confirm(self, check: Check, end: float) -> Verdict:
        """The check call refused, pointing to ``end``: the window read where that is the
        first refusal's end, else a wait that moved on (no window), held to its end."""
        self._check = None
        if abs(end - check.end) < SAME_END:
            # Each end is rounded up to a whole second from its refusal: the window ends
            # within a second before the earlier of the two, and after the later less a
            # second. Its rate is read to the middle, and calls go from the earliest it can
            # be (a call sent before it is refused with a short wait).
            early, late = max(end, check.end) - SAME_END, min(end, check.end)
            read = self._read(check.anchor, (early + late) / 2.0, early, check.count)
            if read is not None:
                return read
        return Verdict(Verdict.HOLD, check.hold)  # a wait that moved on: no window

    def _read(
        self,
        anchor: float,
        end: float,
        resume: float | None = None,
        least: int = 0,
        rate: float | None = None,
    ) -> Verdict | None:
        """The window from ``anchor`` to ``end``: the calls accepted in it (``least`` at the
        least: those its check counted, where a leader that took over saw fewer), per second;
        calls go again from ``resume`` (``end``: by default). ``None``: too few accepted
        (``CHECK_CALLS``) to read a count from, or a span longer than the calls are kept
        (``KEEP_S``): no count was kept over it, and a ``Retry-After`` an hour ahead (a
        date from a gateway whose clock is an hour off) read as a count over that hour
        paced the run at 0.013 calls/s until its end. ``rate``: the rate read, where not
        the count's (``_again``: the rate before, where the count allows it)."""
        accepted = self._accepted
        span = end - anchor
        count = max(self._count(anchor, end), least)
        if count < CHECK_CALLS or not 0 < span <= KEEP_S:
            return None
        before = bisect.bisect_left(accepted, end)
        last = accepted[before - 1] if before else -math.inf  # (none seen: no mirror)
        resume = end if resume is None else resume
        rate = count / span if rate is None else rate
        self.window = Window(resume, rate, span, last, resume - anchor, likely=end)
        self.windows += 1
        return Verdict(Verdict.READ, resume)

    @property
    def check(self) -> Check | None:
        """The check call a pause lets go, until it starts (a fleet's script hands it out)."""
        check = self._check
        return check if check is not None and check.sent == math.inf else None

    def kept(self) -> dict[str, dict[str, float]]:
        """What a fleet's next leader needs of it: the window read, the check under way."""
        return {
            name: {f.name: float(getattr(value, f.name)) for f in fields(value)}
            for name, value in (("window", self.window), ("check", self._check))
            if value is not None
        }

    def adopt(self, kept: dict[str, dict[str, float]], now: float) -> None:
        """Take up what another leader ``kept`` (``kept()``); the calls it saw accepted
        before ``now`` were counted by it, not here (``_seen_from``). ``KeyError`` where a
        field is missing."""
        if (w := kept.get("window")) is not None:
            self.window = Window(w["end"], w["rate"], w["span"], w["last"], w["shift"],
                                 bool(w["mirror"]), w.get("likely", math.inf))  # fmt: skip
        if (c := kept.get("check")) is not None:
            self._check = Check(c["anchor"], c["end"], c["at"], c["hold"], c["sent"],
                                int(c["count"]))  # fmt: skip
        self._seen_from = now

    def _count(self, start: float, end: float) -> int:
        """Accepted calls sent from ``start`` up to (not at) ``end``."""
        accepted = self._accepted
        return bisect.bisect_left(accepted, end) - bisect.bisect_left(accepted, start)

    def cap(self, now: float, forget: float) -> float:
        """The most the rate may be at ``now``: ``WINDOW_PACE`` of the window's rate, from
        its end until ``forget`` after it (``inf``: no window, or forgotten)."""
        window = self.window
        if window is None or now > window.end + forget:
            return math.inf
        pace = WINDOW_PACE * window.rate
        start = now - window.shift - MIRROR_S / 2.0
        if window.mirror and now < window.last + window.shift and start >= self._seen_from:
            # No faster than the calls of a span before went (and were accepted): a
            # sliding window frees their slots as they leave it. (Not where another leader
            # saw them: none seen here is not none sent.)
            accepted = self._accepted
            left = bisect.bisect_left(accepted, start + MIRROR_S)
            left -= bisect.bisect_left(accepted, start)
            pace = min(pace, max(left / MIRROR_S, 1.0 / MIRROR_S))
        return pace
