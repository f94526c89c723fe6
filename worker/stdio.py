"""Standard streams closed when the process starts (``<&-``, ``>&-``, ``2>&-``).

A closed descriptor 0, 1 or 2 is a trap: the next file the process opens takes its number
(the ledger, the results file, a SQLite journal), and whatever is then written to stdout or
stderr lands in it. So each closed one is occupied by ``/dev/null`` at once, before anything
is opened, and its name is returned for the command line to refuse the run: events and
messages would go nowhere. stdin stays ``None`` in ``sys`` (Python's own mark for a closed
one), so ``--input -`` can tell "closed" from "empty".
"""

from __future__ import annotations

import contextlib
import os
import sys

_STREAMS = ((0, "stdin"), (1, "stdout"), (2, "stderr"))


def occupy_closed() -> tuple[str, ...]:
    """Open ``/dev/null`` on each closed standard descriptor; return their names."""
    closed: list[str] = []
    for fd, name in _STREAMS:
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: ``fd`` itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            closed.append(name)
            if name != "stdin":  # writes to it go nowhere, and fail nothing
                setattr(sys, name, open(fd, "w", encoding="utf-8", closefd=False))  # noqa: SIM115
    return tuple(closed)


def refused(closed: tuple[str, ...]) -> bool:
    """Whether stdout or stderr is among ``closed``: then say so on the other one, if it is
    open, and the command exits 64."""
    shut = [name for name in closed if name != "stdin"]
    if not shut:
        return False
    symbol = {"stdout": ">&-", "stderr": "2>&-"}
    what = " and ".join(f"{name} ({symbol[name]})" for name in shut)
    message = (
        f"devserver-reaper: {what} is closed: what the command says would go nowhere; "
        "redirect it to a file or /dev/null instead\n"
    )
    for name in ("stderr", "stdout"):
        if name not in shut:
            with contextlib.suppress(OSError, ValueError):
                stream = getattr(sys, name)
                stream.write(message)
                stream.flush()
            break
    return True


class Report:
    """A command's report on stdout (``check``, ``plan show``): a write that fails (its
    reader gone, as ``| head -1``; the disk full) ends the report without a traceback, and
    later writes go nowhere. The command's exit code stays its own: what it checked is as
    true as before; :meth:`close` says on stderr that the report was cut short, unless the
    reader left on purpose (a broken pipe)."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.failed: OSError | None = None

    def write(self, text: str) -> int:
        if self.failed is None:
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except OSError as exc:
                self.failed = exc
                with contextlib.suppress(OSError):  # nothing more for it, at exit either
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return len(text)

    def isatty(self) -> bool:
        """Whether a person reads it (its lines are then fitted to the terminal)."""
        return self.failed is None and sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()

    def close(self) -> None:
        if self.failed is None or isinstance(self.failed, BrokenPipeError):
            return
        reason = (self.failed.strerror or type(self.failed).__name__).lower()
        with contextlib.suppress(OSError):
            sys.stderr.write(f"devserver-reaper {self.command}: cannot write stdout: {reason}\n")
            sys.stderr.flush()

    def __repr__(self) -> str:
        return f"Report({self.command!r}, failed={self.failed!r})"
