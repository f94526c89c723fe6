"""An error that ends a command, said once to each reader, in one or two lines with the fix.

Two readers may be watching: a program reading the events, and a person at a terminal.
Each hears it once: the person a line on stderr, the program the event; where the events
are shown on that same terminal, only the line. A line never carries a traceback, and names
the fix when there is a usual one.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from worker.errors import (
    ApiUnavailable,
    AuthError,
    NoSuchApi,
    ReaperError,
    TlsError,
    TransientError,
)


def fix_for(exc: BaseException, command: str = "run") -> str | None:
    """What usually cures ``exc``, in one line; None when the message says it already."""
    check = "" if command == "check" else ": `devserver-reaper check` shows what the API says"
    if isinstance(exc, AuthError):
        return (
            "check the access key and secret key (--ak/--sk, REAPER_AK/REAPER_SK, --sk-file or "
            f"the profile file) and that they may use this project{check}"
        )
    if isinstance(exc, NoSuchApi):
        return f"check --project-id and --region (or --endpoint){check}"
    if isinstance(exc, TlsError):
        return "the server's certificate was refused: give its CA with --ca-bundle FILE"
    if isinstance(exc, ApiUnavailable | TransientError):
        if command == "check":
            return "check the endpoint, and that it is reachable from here (proxy, firewall)"
        again = " (with --ledger it resumes)" if command == "run" else ""
        return f"the API did not answer: run the same command again later{again}{check}"
    return None


def say_error(
    log: Any,
    event: str,
    exc: ReaperError | str,
    *,
    command: str,
    events: IO[Any] | None = None,
    stderr: IO[str] | None = None,
) -> None:
    """Report an error that ends ``command``, once to each reader: one line (two with the
    fix) on stderr when a person is there (a terminal), and the event ``event`` through
    ``log`` unless the events are that same person's terminal. ``events``: where ``log``
    writes (None: somewhere a program reads)."""
    err = stderr if stderr is not None else sys.stderr
    person = err.isatty()
    if not person or events is None or not events.isatty():
        log.error(event, error=str(exc))
    if person:
        fix = fix_for(exc, command) if isinstance(exc, ReaperError) else None
        err.write(f"devserver-reaper {command}: {exc}\n" + (f"  fix: {fix}\n" if fix else ""))
        err.flush()
