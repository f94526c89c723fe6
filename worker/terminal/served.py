"""What ``serve`` shows a person watching it on a terminal: a row per job, not a log.

Written as log lines of every field, a job's ``job.deleted`` took three rows or more of an
80-column terminal, after a ``batch.retry`` of its own. On a terminal (stdout one, and
``--log-format auto``), ``serve`` says instead: when it started and what it serves, one
row per job (its time, outcome, id and name; cut to the width, never wrapped), a line of
figures when its ``serve.stats`` saw work, its warnings and errors, and how it stopped.
The rest (retries, start-up steps) stays in the events, which anywhere else (a pipe, a
pod's log, ``--log-format json``) are every event as JSON, as they always were.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from worker.terminal.lines import PER_ID, EventLines
from worker.terminal.progress import rate


def _started(e: Mapping[str, Any]) -> str:
    return (
        f"serving {e.get('stream')} for {e.get('project_id')} at {e.get('endpoint')}; "
        f"health on :{e.get('http_port')}"
    )


def _interrupted(e: Mapping[str, Any]) -> str:
    if e.get("immediate"):
        return f"{e.get('signal')} again: stopping now; what is in flight stays pending"
    return f"{e.get('signal')}: stopping once the calls in flight end (again: at once)"


def _stats(e: Mapping[str, Any]) -> str | None:
    if not (e.get("ids") or e.get("pending") or e.get("lag")):
        return None  # an idle minute: nothing to read
    counts = ", ".join(f"{e[k]:,} {k}" for k in ("deleted", "absent", "failed", "rejected",
                                                  "skipped") if e.get(k))  # fmt: skip
    return (
        f"in the last {float(e.get('interval_s') or 0):.0f} s: {counts or 'no id done'} "
        f"({rate(float(e.get('ids_per_s') or 0))} ids/s); {e.get('pending', 0):,} pending, "
        f"lag {e.get('lag', 0):,}"
    )


def _stopped(e: Mapping[str, Any]) -> str:
    said = [f"stopped: {e.get('read', 0):,} entries read", f"{e.get('acked', 0):,} acknowledged"]
    if e.get("dead_lettered"):
        said.append(f"{e['dead_lettered']:,} dead-lettered")
    if e.get("left_pending"):
        said.append(f"{e['left_pending']:,} left pending")
    return ", ".join(said)


SAID: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    "serve.started": _started,
    "serve.interrupted": _interrupted,
    "serve.stats": _stats,
    "serve.stopped": _stopped,
}
"""Events of serve's life said in words (None: not worth a row)."""


class ServeLines(EventLines):
    """A structlog processor: serve's event as one row for a person, or ``DropEvent``."""

    def __init__(self, clock: Callable[[], str] = lambda: time.strftime("%H:%M:%S")) -> None:
        super().__init__(0)
        self._clock = clock

    def _wanted(self, name: str, event: Mapping[str, Any]) -> bool:
        if name in PER_ID:
            return True
        if name in SAID:
            return SAID[name](event) is not None
        return event.get("level") != "info"

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        return f"{self._clock()} {super().__call__(logger, method, event)}"

    def line(self, event: Mapping[str, Any]) -> str:
        said = SAID.get(str(event.get("event", "")))
        return (said(event) if said else None) or super().line(event)

    def __repr__(self) -> str:
        return f"ServeLines(shown={dict(self.shown)})"
