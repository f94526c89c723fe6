"""Periodic progress in the logs: ``serve.stats`` every minute, ``run.stats`` when no terminal
shows a progress line (a CronJob's log), as rclone's ``--stats`` does.

``StatsWindow`` is the pure part: given the cumulative ids by outcome at the end of each
interval, it says what the interval added, the totals, and the rate. ``every`` is the loop
that asks for a report each ``interval`` seconds of the injected clock. Each command adds
what only it knows (serve: lag, pending, dead letters; both: the limiter's current rate).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from worker.clock import Clock
from worker.types import Outcome


def per_second(count: int, seconds: float) -> float:
    """``count`` a second to three decimals, and under 1 to three significant figures: a
    run of one id an hour is 0.000278, not the 0.0 that three decimals made of it (shown
    ``0 ids/s``, as if it had done nothing)."""
    if count <= 0 or seconds <= 0:
        return 0.0
    rate = count / seconds
    return round(rate, max(3, 2 - math.floor(math.log10(rate))))


class StatsWindow:
    """Interval and since-start figures from cumulative counts by outcome. Pure."""

    __slots__ = ("_last", "_last_at", "_started")

    def __init__(self, now: float, counts: Mapping[str, int] | None = None) -> None:
        self._started = now
        self._last_at = now
        self._last = {o.value: (counts or {}).get(o.value, 0) for o in Outcome}

    def close(self, now: float, counts: Mapping[str, int]) -> dict[str, Any]:
        """End the interval at ``now`` with these cumulative ``counts``; start the next.

        Fields: each outcome's ids in the interval (``deleted``...), and since the start
        (``deleted_total``...), ``ids`` and ``ids_total``, ``ids_per_s`` over the interval,
        ``interval_s`` and ``elapsed_s``."""
        fields: dict[str, Any] = {}
        current = {o.value: counts.get(o.value, 0) for o in Outcome}
        for outcome, total in current.items():
            fields[outcome] = total - self._last[outcome]
        for outcome, total in current.items():
            fields[f"{outcome}_total"] = total
        ids = sum(fields[o.value] for o in Outcome)
        interval = max(0.0, now - self._last_at)
        fields.update(
            ids=ids,
            ids_total=sum(current.values()),
            ids_per_s=per_second(ids, interval),  # an interval of 1 id in 250 s: 0.004
            interval_s=round(interval, 3),
            elapsed_s=round(now - self._started, 3),
        )
        self._last, self._last_at = current, now
        return fields

    def __repr__(self) -> str:
        return f"StatsWindow(since={self._last_at:g}, totals={sum(self._last.values())})"


async def every(interval: float, clock: Clock, report: Callable[[], Awaitable[None]]) -> None:
    """Call ``report`` every ``interval`` seconds until cancelled; ``interval`` 0: never."""
    if interval <= 0:
        return
    while True:
        await clock.sleep(interval)
        await report()
