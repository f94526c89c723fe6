"""How far a run has got: done, total, rate, ETA, counts by outcome. Pure figures, no drawing."""

from __future__ import annotations

import math
import os
import stat
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from worker.outcomes.journal import Tally


def count_lines(path: str, fmt: str = "auto") -> int | None:
    """Lines in a regular file (an upper bound on its ids), or None when it cannot be known.

    A last line with no line break after it counts: the reader reads it as a line (two ids
    with no break after the second were "up to 1 job"). None for anything but a regular
    file: a pipe (``--input <(...)``, a named pipe) can be read once only, and counting it
    took every id from the run, which then said "nothing to do". None for a JSON array
    (``fmt``, or the name, says so): its ids are elements, not lines (100,000 on one line
    were "up to 1 job"). None for gzip, by its name or, as the reader finds it, by its first
    bytes: the line breaks of compressed bytes are none of its ids."""
    from worker.input.sources import GZIP_MAGIC, detect_format

    if path == "-" or path.endswith(".gz") or detect_format(path, fmt) == "json":
        return None
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # looked at, not opened: nothing read
            return None
        with open(path, "rb") as handle:
            if handle.read(2) == GZIP_MAGIC:  # read through whatever its name: not its lines
                return None
            handle.seek(0)
            lines, last = 0, b"\n"
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
            return lines + (last != b"\n")
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The run at one moment, as a person reads it."""

    done: int  # ids with an outcome, repeats and ids an earlier run finished included
    total: int | None  # ids expected, when the input's size is known
    ids_per_s: float
    eta_s: float | None
    counts: tuple[tuple[str, int], ...]  # outcome (or already done, repeated) -> ids, if any
    retries: int

    @property
    def share(self) -> float | None:
        return None if not self.total else min(self.done / self.total, 1.0)

    def figures(self) -> str:
        """``1,200 / 2,000 · 98 ids/s · ETA 8s``, as much of it as is known."""
        parts = [f"{self.done:,}" + (f" / {self.total:,}" if self.total else " done")]
        parts.append(f"{rate(self.ids_per_s)} ids/s")
        if self.eta_s is not None:
            parts.append(f"ETA {_duration(self.eta_s)}")
        return " · ".join(parts)

    def outcomes(self) -> str:
        """``deleted 1,150  absent 40  failed 2 · retries 12``."""
        text = "  ".join(f"{name} {n:,}" for name, n in self.counts)
        if self.retries:
            text += f"{' · ' if text else ''}retries {self.retries:,}"
        return text


def rate(per_s: float) -> str:
    """Ids per second as a person reads them: two significant figures, whole from 10 up
    (``1,234``, ``98``, ``9.6``, ``0.96``, ``0.3``, not the ``1.0`` that 0.96 was shown as,
    nor the 0 that said a slow run had stopped), ``<0.01`` below that but above none."""
    if per_s <= 0 or not math.isfinite(per_s):
        return f"{per_s:,.0f}"
    if per_s < 0.01:
        return "<0.01"
    if per_s >= 9.95:  # rounds to 10 or more: whole
        return f"{per_s:,.0f}"
    return f"{float(f'{per_s:.2g}'):g}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Reads a run's tally against the clock: what the display shows. Its ids/s and ETA are
    those of the last ``WINDOW_S`` seconds (since the start, until it has run that long):
    ids settled at once (skipped by the cap, struck out) are not a pace the rest will
    keep, and a run that slows down says so."""

    WINDOW_S = 10.0

    def __init__(self, tally: Tally, *, total: int | None, clock: Callable[[], float]) -> None:
        self._tally = tally
        self._total = total
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque([(clock(), 0)])  # (time, finished)

    def _rate(self, now: float, finished: int) -> float:
        """Ids/s from the latest sample at least ``WINDOW_S`` old (else the start) to now."""
        samples = self._samples
        samples.append((now, finished))
        while len(samples) > 2 and samples[1][0] <= now - self.WINDOW_S:
            samples.popleft()
        then, before = samples[0]
        return (finished - before) / max(now - then, 1e-9)

    def snapshot(self) -> Snapshot:
        tally = self._tally
        done = tally.finished + tally.repeated + tally.already_done
        rate = self._rate(self._clock(), tally.finished)
        eta = None
        if self._total and rate > 0 and done < self._total:
            eta = (self._total - done) / rate
        # done counts the ids an earlier run on the ledger settled, and repeats: said too
        earlier = {"already done": tally.already_done, "repeated": tally.repeated}
        counts = tuple((name, n) for name, n in (tally.counts() | earlier).items() if n)
        return Snapshot(done, self._total, rate, eta, counts, tally.retries)

    def line(self) -> str:
        """One plain line, for a log that is not a terminal."""
        snap = self.snapshot()
        share = f"{snap.share:6.1%} " if snap.share is not None else ""
        rest = snap.outcomes()
        return f"{share}{snap.figures()}" + (f" | {rest}" if rest else "")

    def __repr__(self) -> str:
        snap = self.snapshot()
        return f"Progress(done={snap.done}, total={snap.total}, retries={snap.retries})"
