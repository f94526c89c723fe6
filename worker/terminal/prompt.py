"""Asking before deleting: say what is about to happen, and accept exactly what was asked.

As aws-nuke does, the prompt shows what will go (how many, by type and status where a plan
says), what protects jobs from it, what an earlier run on the ledger already did, and how
long it should take; then asks for ``yes``, or, above ``confirm_project_over`` jobs, for the
project id itself to be typed. Anything else (``y`` included), an empty line, end of input
or Ctrl-C is a no, and nothing is sent.
"""

from __future__ import annotations

import math
import signal
import sys
import termios
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO

from worker.discovery.review import estimate_s
from worker.errors import UsageError
from worker.input.intake import escape
from worker.terminal.wrap import for_terminal


class Declined(UsageError):
    """The person did not confirm (exit 64): nothing was sent."""


class InterruptedAtPrompt(Exception):
    """Ctrl-C or SIGTERM at the prompt: nothing was sent."""


class _Terminated(Exception):
    """SIGTERM while the prompt waits for its answer."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


@dataclass(frozen=True, slots=True)
class Proposal:
    """What ``run`` is about to do, as far as it is known before any call."""

    source: str  # the input file or plan
    project: str
    endpoint: str
    count: int | None  # jobs (a plan) or lines (a file); None when unknown
    exact: bool = False  # a plan's count is exact; a file's lines may hold comments
    cap: int | None = None  # --max-deletions
    by_type: tuple[tuple[str, int], ...] = ()
    by_status: tuple[tuple[str, int], ...] = ()
    protection: tuple[str, ...] = ()  # the rules in force, in words
    already_done: int | None = None  # ids the ledger holds settled (None: no ledger yet)
    ledger: bool = False  # --ledger given: the cap is on every run on it together
    rechecked: bool = False  # each job read first (a plan, protection by record)
    batch_size: int = 50
    rate: float | str = 10.0
    typed: str | None = None  # what to type above project_over (None: the project id)

    @property
    def jobs(self) -> int | None:
        if self.count is None:
            return self.cap
        return self.count if self.cap is None else min(self.count, self.cap)

    def estimate_s(self) -> float | None:
        """Seconds the calls take at ``rate`` for the ids the ledger does not hold done
        already: deletes in batches, plus, where a plan or a protection rule reads each job
        first, the listing pages that re-check them (as ``plan show`` estimates it: a page
        answers for hundreds of jobs). None when unknown."""
        jobs = self.jobs
        if jobs is None or isinstance(self.rate, str) or self.rate <= 0:
            return None
        jobs = max(0, jobs - (self.already_done or 0))
        if self.rechecked:
            return estimate_s(jobs, rate=self.rate, batch_size=self.batch_size)
        return math.ceil(jobs / self.batch_size) / self.rate

    def lines(self) -> list[str]:
        jobs = self.jobs
        resuming = bool(self.already_done)
        if jobs is None:
            head = f"About to delete the jobs listed in {self.source}"
        else:
            exact = (
                ""
                if self.exact and (self.cap is None or self.cap >= (self.count or 0))
                and not resuming
                else "up to "
            )  # fmt: skip
            head = (
                f"About to delete {exact}{jobs:,} job{'s' if jobs != 1 else ''} from {self.source}"
            )
        if resuming:  # which of the ledger's done ids the input holds is known as it is read
            head += ", less those done already (ledger, below)"
        rows = [head, f"  project     {self.project}", f"  endpoint    {self.endpoint}"]
        if self.by_type:
            rows.append(f"  by type     {_counts(self.by_type)}")
        if self.by_status:
            rows.append(f"  by status   {_counts(self.by_status)}")
        rows.append(
            "  protected   "
            + ("; ".join(self.protection) if self.protection else "nothing (no rule)")
        )
        if self.already_done is not None:
            rows.append(
                f"  ledger      {self.already_done:,} ids already done there (resuming): "
                "those are not sent again"
            )
        if self.cap is not None:
            runs = "every run on this ledger together" if self.ledger else "this run"
            rows.append(f"  cap         at most {self.cap:,} sent, in {runs} (--max-deletions)")
        rows.append(f"  duration    {self._duration()}")
        return rows

    def _duration(self) -> str:
        if isinstance(self.rate, str):
            return "unknown yet: --rate auto finds the quota as it goes"
        seconds = self.estimate_s()
        if seconds is None:
            return f"unknown (the number of ids is), at {self.rate:g} calls/s"
        reads = " (with each job re-read on a listing page first)" if self.rechecked else ""
        return f"about {_span(seconds)} at {self.rate:g} calls/s{reads}"


def _counts(pairs: Iterable[tuple[str, int]]) -> str:
    # A type or status is the API's text: escaped, so no control sequence reaches the screen.
    return ", ".join(f"{escape(name, 120)} {n:,}" for name, n in pairs)


def _span(seconds: float) -> str:
    if seconds < 1:
        return "a second"
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes / 60:.1f} h"


def tally(values: Iterable[str | None]) -> tuple[tuple[str, int], ...]:
    """``[("FINISHED", 300), ("PROCESSING", 13)]``, most first; a missing value is ``?``."""
    return tuple(Counter(value or "?" for value in values).most_common())


def _drop_typed_ahead(into: IO[str]) -> None:
    """What was typed at the terminal before the question was shown is no answer to it:
    dropped. A ``yes`` typed ahead while the run started (a pasted block of commands, a
    key pressed to see if it hung) confirmed a deletion nobody had read, and a ``no`` was
    echoed before the prompt, which then seemed to wait no more."""
    try:
        if into.isatty():
            termios.tcflush(into.fileno(), termios.TCIFLUSH)
    except (OSError, ValueError, termios.error):  # not a terminal's input after all
        return


def confirm(
    proposal: Proposal,
    *,
    project_over: int,
    stdin: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> None:
    """Show ``proposal`` and ask. Returns when confirmed; ``Declined`` (64) or
    ``InterruptedAtPrompt`` otherwise, having said that nothing was sent."""
    into = stdin if stdin is not None else sys.stdin
    out = stderr if stderr is not None else sys.stderr
    jobs = proposal.jobs
    asked = proposal.typed or proposal.project
    typed = asked if jobs is None or jobs > project_over else "yes"
    if typed == "yes":
        ask = "Type 'yes' to delete them"
    elif proposal.typed is not None:  # several projects: how many, as the plan names them
        ask = f"Type '{typed}' to delete them, each in its own project"
    else:
        ask = f"Type the project id ({proposal.project}) to delete them"
    # Before the prompt is seen: Ctrl-C and SIGTERM (a `kill`, a terminal closing) both end it
    # with one line saying nothing was sent, not a silent exit on an unanswered prompt.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    terminated = signal.signal(signal.SIGTERM, _terminated)
    try:
        _drop_typed_ahead(into)
        asked = "\n".join(proposal.lines()) + f"\nThis cannot be undone. {ask}: "
        out.write(for_terminal(out, asked))
        out.flush()
        answer = into.readline()
    except KeyboardInterrupt:
        raise InterruptedAtPrompt("interrupted at the prompt: nothing was sent") from None
    except _Terminated:
        raise InterruptedAtPrompt("stopped by SIGTERM at the prompt: nothing was sent") from None
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, terminated)
    if answer.strip() != typed:
        raise Declined(
            "not confirmed: nothing was sent"
            + (f" (the prompt asks for {typed!r} exactly)" if answer.strip() else "")
        )
