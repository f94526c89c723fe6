"""Where a run's events and its display go, decided once, from what stdout and stderr are.

- stdout is a terminal: a person reads it. Events become short lines (``EventLines``: no
  line per id unless ``-v``) printed above a progress display pinned at the bottom, both
  through one :class:`~worker.terminal.screen.Screen` on stderr, so nothing interleaves.
  ``--events FILE`` keeps every event as a JSON line as well.
- stdout is not a terminal (a pipe, a file, a container's log): every event as a JSON line
  on stdout (or in ``--events FILE``), as before; the progress display, if stderr is a
  terminal, stays on stderr.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO, cast

from worker import logsetup
from worker.errors import UsageError
from worker.private_files import open_output
from worker.terminal.lines import EventLines, style
from worker.terminal.screen import Display, PlainScreen
from worker.terminal.wrap import for_terminal


@dataclass(frozen=True, slots=True)
class Output:
    """What a person sees of a run: ``display`` (None: nobody is watching), whether it shows
    progress, the events it shows, and the ``--events`` file if any."""

    display: Display | None = None
    progress: bool = False
    lines: EventLines | None = None
    events: TextIO | None = None
    quiet: bool = False
    command: str | None = None  # what was typed, secrets hidden: to run it again

    def name_jobs(self, names: Mapping[str, str]) -> None:
        """Job names the run knows without asking (a plan's), for ``DRY-RUN`` lines."""
        if self.lines is not None:
            self.lines.name_jobs(names)

    def unchecked(self, kinds: Sequence[str]) -> None:
        """The protect rules a dry run of ids could not check, for its ``DRY-RUN`` lines."""
        if self.lines is not None:
            self.lines.unchecked(kinds)

    def say(self, text: str, style: str | None = None) -> None:
        """A line for the person, if one is watching (and did not ask for quiet)."""
        if self.display is not None and not self.quiet:
            self.display.print(text, style)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()

    def __repr__(self) -> str:
        return (
            f"Output(display={self.display!r}, progress={self.progress}, "
            f"events={'file' if self.events else None}, quiet={self.quiet})"
        )


def for_run(
    *,
    log_format: str,
    log_level: str,
    progress: str = "auto",
    verbosity: int = 0,
    events: str | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    silent: frozenset[str] = frozenset(),
    command: str | None = None,
) -> Output:
    """Configure logging for a run and say where its display goes. ``silent``: events the
    command says to a person in its own words (not shown as lines, kept in ``--events``)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    handle = _open_events(events)
    people = out.isatty() and log_format != "console"
    if people:
        screen = display_on(err if err.isatty() else out)
        lines = EventLines(verbosity, as_json=log_format == "json", silent=silent)
        logsetup.configure_for_people(
            render=lines,
            write=lambda line: screen.print(line, style(line)),
            level=log_level,
            events=None if handle is None else handle.buffer,
        )
        shown = progress == "on" or (progress == "auto" and verbosity >= 0)
        return Output(screen, shown, lines, handle, quiet=verbosity < 0, command=command)
    if handle is not None:
        logsetup.configure(fmt="json", level=log_level, stream=handle)
    else:
        logsetup.configure(fmt=cast(logsetup.LogFormat, log_format), level=log_level, stream=out)
    if err.isatty() and progress != "off" and verbosity >= 0:
        return Output(display_on(err), True, None, handle, command=command)
    if err.isatty():
        return Output(display_on(err), False, None, handle, quiet=verbosity < 0, command=command)
    if progress == "on":
        return Output(PlainScreen(err), True, None, handle, command=command)
    return Output(None, False, None, handle)


TYPE_IDS = "reading ids from the terminal, one a line; Ctrl-D ends them"
"""Said when ``--input -`` is the terminal itself, which otherwise waits in silence."""


def reads_the_terminal(path: str | None) -> bool:
    """Whether ``--input`` is the terminal a person types at (``-`` with stdin a terminal)."""
    return path == "-" and sys.stdin is not None and sys.stdin.isatty()


def display_on(file: IO[str]) -> Display:
    """The display of a terminal: redrawn in place where the terminal can move its cursor;
    on one that cannot (``TERM=dumb``: an editor's shell buffer), a redrawn display shows
    nothing at all until the run ends, so a plain progress line every few seconds."""
    from worker.terminal.screen import Screen

    screen = Screen(file)
    return screen if screen.redraws else PlainScreen(file)


def _open_events(path: str | None) -> TextIO | None:
    """The ``--events`` file, appended to: events of earlier runs are never lost."""
    if path is None:
        return None
    try:  # private, and never through a link another user planted (worker.private_files)
        return io.TextIOWrapper(open_output(Path(path), append=True), encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"--events {path} cannot be opened: {reason}") from None


def for_people_on(stream: IO[str], *, log_format: str, log_level: str) -> EventLines | None:
    """Events of a command that speaks to people on ``stream`` (``check``, ``discover``,
    ``enqueue``): on a terminal, as short lines (warnings and errors, the first few rejected
    ids), and the lines returned, to say at the end what they held back; elsewhere as
    ``configure`` writes them (None)."""
    if stream.isatty() and log_format == "auto":
        lines = EventLines(0)
        logsetup.configure_for_people(
            render=lines, write=lambda line: _say(stream, line), level=log_level
        )
        return lines
    logsetup.configure(fmt=cast(logsetup.LogFormat, log_format), level=log_level, stream=stream)
    return None


def _say(stream: IO[str], line: str) -> None:
    stream.write(for_terminal(stream, line) + "\n")
    stream.flush()
