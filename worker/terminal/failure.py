"""An error that ends a command, said once to each reader, in one or two lines with the fix.

Two readers may be watching: a program reading the events, and a person (or a log of its
own) reading stderr. Each hears it once: the line on stderr, the event in the events; where
both end in one place (one terminal, or ``2>&1``), only one of them. A line never carries
a traceback, and names the fix when there is a usual one.
"""

from __future__ import annotations

import io
import os
import sys
from typing import IO, Any

from worker.errors import (
    ApiUnavailable,
    AuthError,
    ConfigError,
    InputUnreadable,
    NoSuchApi,
    ReaperError,
    RedisCertificateRefused,
    RedisUnavailable,
    TlsError,
    TransientError,
    UsageError,
    certificate_fix,
)
from worker.exit_codes import ExitCode
from worker.terminal.wrap import for_terminal

REFUSED = ((UsageError, ExitCode.USAGE), (InputUnreadable, ExitCode.NO_INPUT),
           (ConfigError, ExitCode.CONFIG))  # fmt: skip
"""What a command refuses before it does anything, and the exit code of each."""


def refused(command: str, exc: UsageError | InputUnreadable | ConfigError) -> int:
    """A flag, a setting or an input refused before anything was done: one line on stderr
    (no event: nothing has started), and the exit code of its kind (:data:`REFUSED`)."""
    print(for_terminal(sys.stderr, f"devserver-reaper {command}: {exc}"), file=sys.stderr)
    return next(code for kind, code in REFUSED if isinstance(exc, kind))


def fix_for(exc: BaseException, command: str = "run", ca_bundle: str | None = None) -> str | None:
    """What usually cures ``exc``, in one line; None when the message says it already.
    ``ca_bundle``: the CA bundle the command trusted, as named (``wiring.ca_bundle_said``)."""
    from worker.api.projects import ProjectLookupFailed

    check = "" if command == "check" else ": `devserver-reaper check` shows what the API says"
    if isinstance(exc, ProjectLookupFailed):  # IAM, not the API: its own cure
        return exc.fix or None
    if isinstance(exc, AuthError):
        return (
            "check the access key and secret key (--ak/--sk, REAPER_AK/REAPER_SK, --sk-file or "
            f"the profile file) and that they may use this project{check}"
        )
    if isinstance(exc, NoSuchApi):
        return f"check --project-id and --region (or --endpoint){check}"
    if isinstance(exc, TlsError):
        return "the server's certificate was refused: " + certificate_fix("the server", ca_bundle)
    if isinstance(exc, RedisCertificateRefused):
        return (
            "trust the CA that signed Redis's certificate: add ?ssl_ca_certs=/path/ca.pem to "
            "the Redis URL (PEM), or name Redis by a host its certificate carries"
        )
    if isinstance(exc, RedisUnavailable):
        return (
            "check that Redis runs and answers from here (redis-cli PING), then run the "
            "same command again"
        )
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
    ca_bundle: str | None = None,
    **fields: Any,
) -> None:
    """Report an error that ends ``command``, once to each reader: the event ``event``
    (with ``fields`` beside its ``error``) through ``log``, and one line (two with the fix)
    on stderr. Where the events and stderr end in one place, only one of them: the line on
    a terminal, else the event. ``events``: where ``log`` writes (None: somewhere else than
    stderr). ``ca_bundle``: the CA bundle trusted, for the cure (:func:`fix_for`)."""
    err = stderr if stderr is not None else sys.stderr
    person = err.isatty()
    same = events is not None and _same_place(events, err)
    if not (same and person):  # a program reads the events (unless a person reads them here)
        log.error(event, error=str(exc), **fields)
    if not same or person:  # a person, or a log of its own, reads stderr
        fix = fix_for(exc, command, ca_bundle) if isinstance(exc, ReaperError) else None
        said = f"devserver-reaper {command}: {exc}" + (f"\n  fix: {fix}" if fix else "")
        err.write(for_terminal(err, said) + "\n")
        err.flush()


def _same_place(one: IO[Any], other: IO[Any]) -> bool:
    """Do both streams end in one place (one terminal, one file: ``2>&1``)?"""
    if one is other:
        return True
    try:
        a, b = os.fstat(one.fileno()), os.fstat(other.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
