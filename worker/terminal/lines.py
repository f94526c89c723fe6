"""Which events a person at a terminal sees, each as one short line.

A run writes an event per id: 20,000 ids are 20,000 events, which a terminal cannot show
and a person cannot read. On a terminal the counts live in the progress display instead, and
the events shown are those that need a person: warnings and errors, and the first few
failed or rejected ids (their reasons usually repeat). ``-v`` shows one line per id; ``-q``
shows none (the summary still comes); ``--events FILE`` keeps every event as JSON.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import orjson
import structlog

from worker.input.intake import escape
from worker.terminal.wrap import cut

PER_ID = frozenset({"job.deleted", "job.absent", "job.skipped", "job.failed", "job.rejected"})
QUIET_UNLESS_VERBOSE = PER_ID | {"batch.retry", "run.started"}
NEVER = frozenset({"run.summary"})  # the summary is printed as a table of its own
"""Shown in full by other means, or said better by the command itself."""

_COMMON = ("event", "level", "timestamp", "run_id")


class EventLines:
    """A structlog processor: the event as one line for a person, or ``DropEvent``.

    ``verbosity``: -1 (``-q``) nothing, 0 warnings and errors (and the first ``first`` ids
    of each of ``job.failed`` and ``job.rejected``), 1 (``-v``) every event. ``names`` gives
    a job's name where the run knows it without asking (a plan), for ``DRY-RUN`` lines.
    ``as_json``: the line is the event as JSON (``--log-format json`` on a terminal).
    """

    def __init__(
        self,
        verbosity: int = 0,
        *,
        names: Mapping[str, str] | None = None,
        as_json: bool = False,
        first: int = 5,
        silent: frozenset[str] = frozenset(),
    ) -> None:
        self._verbosity = verbosity
        self._names = names or {}
        self._json = as_json
        self._first = first
        self._silent = NEVER | silent
        self.shown: Counter[str] = Counter()
        self.held_back: Counter[str] = Counter()
        self._unless = ""  # after a DRY-RUN line: the rules that were not checked
        self._cuts = _Cuts()

    def name_jobs(self, names: Mapping[str, str]) -> None:
        self._names = names

    def unchecked(self, kinds: Sequence[str]) -> None:
        """The kinds of protect rule a dry run could not check (``name``, ``status``): each
        ``DRY-RUN`` line says the job is deleted unless they protect it, as the summary
        says its count is an upper bound."""
        from worker.terminal.summary import rules_in_words

        self._unless = f"  (unless {rules_in_words(kinds)} protect it: not checked)" * bool(kinds)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        name = str(event.get("event", ""))
        if not self._wanted(name, event):
            raise structlog.DropEvent
        if name in _RATE and not self._json and self._verbosity < 1:
            said = self._cuts.said(event)
            if not said:
                raise structlog.DropEvent
            self.shown[name] += 1
            return self.line(said)
        self.shown[name] += 1
        if self._json:
            return orjson.dumps(dict(event), default=str).decode()
        return self.line(event)

    def _wanted(self, name: str, event: Mapping[str, Any]) -> bool:
        if self._verbosity < 0 or name in self._silent:
            return False
        if self._verbosity > 0:
            return True
        if name in ("job.failed", "job.rejected"):
            if self.shown[name] < self._first:
                return True
            self.held_back[name] += 1
            return False
        return name not in QUIET_UNLESS_VERBOSE and event.get("level") != "info"

    def line(self, event: Mapping[str, Any]) -> str:
        """One line: what happened to which id, or the event and what it says."""
        name = str(event.get("event", ""))
        job = event.get("job_id", "")
        # A name is the API's text: escaped, so no control sequence of it reaches the screen.
        label = escape(str(self._names.get(job) or event.get("name") or ""), 120)
        if name == "job.deleted":
            return f"deleted   {job}  {label}".rstrip()
        if name == "job.absent":
            return f"absent    {job}  (already gone)"
        if name == "job.skipped":
            if event.get("reason") == "dry_run":
                return f"DRY-RUN delete {job} {label}".rstrip() + self._unless
            return f"skipped   {job}  ({event.get('reason')})"
        if name == "job.failed":
            code = " ".join(str(event[k]) for k in ("http_status", "error_code") if event.get(k))
            request = event.get("request_id")
            why = f"{code}: {event.get('error_msg') or 'no message'}"
            return f"FAILED    {job}  {why}" + (f" (request id {request})" if request else "")
        if name == "job.rejected":
            return f"rejected  line {event.get('line')}: {job} ({event.get('reason')})"
        if name == "batch.retry":
            return (
                f"retry     batch {event.get('batch_id')} attempt {event.get('attempt')} "
                f"in {event.get('delay_s')}s ({event.get('reason')})"
            )
        level = str(event.get("level", "info"))
        head = f"{level}: " if level in ("warning", "error", "critical") else ""
        if name in _RATE:  # said again at each change: a sentence, not the event's fields
            return _RATE[name](head, event)
        said = [key for key in ("error", "reason") if key in event]  # a sentence of its own
        if said and len(event) - len(_present(event)) == 1:
            return f"{head}{event[said[0]]}"
        rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in _COMMON)
        return f"{head}{name}" + (f"  {rest}" if rest else "")

    def held_back_note(
        self, how: str = "-v shows each, --events FILE or --results FILE keeps them"
    ) -> str | None:
        """What was not shown, and ``how`` to see it; None when everything was."""
        parts = [f"{n:,} more {name.removeprefix('job.')}" for name, n in self.held_back.items()]
        said = [f"{', '.join(parts)} ids"] if parts else []
        if cuts := self._cuts.unsaid():
            said.append(cuts)
        if not said:
            return None
        return f"({'; '.join(said)} not shown: {how})"

    def __repr__(self) -> str:
        return f"EventLines(verbosity={self._verbosity}, shown={dict(self.shown)})"


_RATE = {
    "rate.slowed": lambda head, e: (
        f"{head}the API refuses calls ({e.get('reason')}): slowed to "
        f"{float(e.get('rate') or 0):.3g} calls/s of the {float(e.get('asked') or 0):g} asked"
    ),
    "rate.restored": lambda head, e: (
        f"the API takes calls again: back to {float(e.get('rate') or 0):g} calls/s"
        + (
            f" (after {e['cuts']:,} more cut{'s' * (e['cuts'] > 1)}, to {e['lowest']:.3g} "
            "calls/s at the lowest)"
            if e.get("cuts")
            else ""
        )
    ),
}
"""``--rate``'s slow-downs in words: ``rate=5.255 asked=8.0 reason=throttled`` said little."""


class _Cuts:
    """``rate.slowed`` to a person: the first cut is said, and another only where the rate
    is half the one last said or less; the cuts between are counted, said with the
    ``rate.restored`` that ends them (or at the run's end, ``unsaid``). At each cut it was
    a line of its own: a refusing API cut a fixed rate every few seconds for minutes, a
    screenful of the same warning over the display."""

    __slots__ = ("_count", "_last", "_lowest")

    def __init__(self) -> None:
        self._last: float | None = None  # the rate last said, while slowed
        self._count = 0  # cuts not said since
        self._lowest = math.inf  # the lowest rate of those

    def said(self, event: Mapping[str, Any]) -> Mapping[str, Any]:
        """``event`` as said (``rate.restored`` with the cuts since said), or ``{}``:
        held back."""
        rate = _number(event.get("rate"))
        if event.get("event") == "rate.restored":
            told = {**event, "cuts": self._count, "lowest": self._lowest} if self._count else event
            self._last, self._count, self._lowest = None, 0, math.inf
            return told
        if self._last is None or rate <= self._last / 2:
            self._last, self._count, self._lowest = rate, 0, math.inf
            return event
        self._count += 1
        self._lowest = min(self._lowest, rate)
        return {}

    def unsaid(self) -> str | None:
        """The cuts held back since the last said, in words; None when none were."""
        if not self._count:
            return None
        times = "s" if self._count > 1 else ""
        return f"{self._count:,} more rate cut{times}, down to {self._lowest:.3g} calls/s,"


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


def _present(event: Mapping[str, Any]) -> list[str]:
    return [key for key in _COMMON if key in event]


_TIME = re.compile(r"^\d\d:\d\d:\d\d ")
_ONE_ROW = re.compile(r"(?:\d\d:\d\d:\d\d )?(?:deleted|absent) +\S+")
"""A job's outcome that needs no more than its row: its time, what, which id (and name)."""


def in_one_row(line: str, width: int) -> str | None:
    """``line``, a job deleted or absent, cut to ``width`` (its name ends in ``…``), so a
    job is a row however long its name; None for any other line, or when the cut would
    fall in the id (a cut id names no job: the line is wrapped instead)."""
    named = _ONE_ROW.match(line)
    if named is None or named.end() > width:
        return None
    return cut(line, width)


def style(line: str) -> str | None:
    """The colour of a line (after its time, if it has one): failures red, warnings yellow."""
    line = _TIME.sub("", line, count=1)
    if line.startswith(("FAILED", "error:", "critical:")):
        return "red"
    if line.startswith(("warning:", "rejected")):
        return "yellow"
    return None
