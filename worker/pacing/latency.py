"""Whether latency rises with the rate, for ``--rate auto`` (``RateController``): a rise
cuts the rate as a refusal would, and caps the probes at the rate it began at while that is
remembered. The design is in ``docs/rate-auto.md``."""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.pacing.controller import AdaptiveConfig


class LatencyWatch:
    """Whether latency rises with the rate.

    Latency is read in windows of ``latency_samples`` answers, each summed up by its mean
    without its slowest tenth (one slow call or a GC pause is no signal; a median is no
    good either: with answers in two modes, already-deleted jobs fast and real deletes
    slow, it jumps from one mode to the other by chance). The baseline is the median of the
    last ``latency_baseline`` windows that were not high. A window is high above
    ``latency_factor`` times the baseline plus ``latency_floor_s``, and joins the baseline
    only under ``latency_join`` of that rise (else the baseline would creep up a rise a
    window at a time). ``latency_windows`` high windows in a row are a rise, but only at a
    rate above the lowest rate a baseline window was read at: latency that stays high at a
    rate that had the baseline's latency all along is not ours to cure, and becomes the
    baseline. After a cut, answers are not read until the slowest of the last window has
    had time to come back for calls sent since (``settle``).
    """

    __slots__ = ("_baseline", "_config", "_high", "_rate", "_settle_until", "_slowest",
                 "_window", "rose_at")  # fmt: skip

    def __init__(self, config: AdaptiveConfig) -> None:
        self._config = config
        self._window: list[float] = []
        self._rate = config.initial_rate  # the rate the window being filled began at
        self._baseline: deque[tuple[float, float]] = deque(maxlen=config.latency_baseline)
        self._high = 0
        self._slowest = 0.0  # the slowest answer of the last window
        self._settle_until = -math.inf
        self.rose_at = math.inf  # the rate the first high window of a rise began at

    def settle(self, now: float) -> None:
        """After a cut: answers that come soon are those of calls sent before it, the slow
        ones most of all, and a window of them would look like a rise."""
        self._window.clear()
        self._high = 0
        self._settle_until = now + self._slowest

    def rising(self, now: float, latency: float, rate: float, *, learn: bool) -> bool:
        """One answer at ``rate``; ``learn``: a window may join the baseline (not while
        starting up: as the rate doubles the fast answers come back first)."""
        c = self._config
        if now < self._settle_until:
            return False
        window = self._window
        if not window:
            self._rate = rate
        window.append(latency)
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
                if not self._high:
                    self.rose_at = self._rate
                self._high += 1
                if self._high < c.latency_windows:
                    return False
                self._high = 0
                if rate > min(at for _, at in baseline):
                    return True
                baseline.clear()  # high at a rate that was once calm: not our doing
            elif typical > usual + c.latency_join * rise:
                self._high = 0
                return False
        self._high = 0
        if learn:
            baseline.append((typical, min(rate, self._rate)))
        return False
