"""One terminal, shared by everything a command shows: lines scroll above, progress stays below.

Writing to a terminal from two places at once is what garbles it (a ``\\r`` progress line
overwritten by an event, an event cut in half by a redraw). So on a terminal everything goes
through one :class:`Screen`: :meth:`Screen.print` puts a line above the live display, and
:meth:`Screen.show` keeps a progress display pinned at the bottom while a run lasts. rich
renders it, Screen writes it (rich is imported here, and this module only when a display is
shown, so ``--help`` stays fast). Where no terminal is (``--progress on`` into a log file),
:class:`PlainScreen` writes a plain progress line every few seconds instead of redrawing one.
"""

from __future__ import annotations

import io
import os
import signal
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

import anyio

from worker.terminal.lines import in_one_row
from worker.terminal.progress import Progress, Snapshot
from worker.terminal.wrap import columns, fit
from worker.terminal.wrap import rows as rows_of

if TYPE_CHECKING:
    from rich.console import Console, RenderableType


class Display(Protocol):
    """Somewhere a person reads: lines, and while a run lasts, its progress."""

    def print(self, text: str, style: str | None = None) -> None: ...

    async def show(self, progress: Progress) -> None: ...

    def stop(self) -> None: ...


class Screen:
    """A terminal: lines above, and while :meth:`show` runs, a progress display below.

    The display is redrawn from its top-left corner, where the cursor waits between two
    draws: erase its rows, draw, go back up. rich's ``Live`` waited at the display's end and
    went back up as many rows as it had drawn, which is wrong once the rows are not those it
    drew: a window made narrower reflows a row into two or three (most terminals do; xterm
    cuts it instead), and the ``^C`` a terminal echoes at the cursor pushes a row down; the
    rows it missed stayed on the screen for good (a stale bar of the old width, a bar left
    above the summary). The display's first row moves with its text, whatever the terminal
    does with the rest, so erasing down from there takes all of it: row by row, as many as
    the reflow can have made, since below the display is nothing (it is the last output).
    Not "erase to the end of the screen": from the top row that is the whole screen, which
    tmux (``scroll-on-clear``) and others keep in the scrollback, a frame a redraw."""

    REFRESH_S = 0.2
    _SAVE, _RESTORE = "\x1b7", "\x1b8"  # the cursor's place (DECSC, DECRC)
    _ERASE_ROW, _DOWN = "\x1b[2K", "\x1b[B"  # a row erased; a row down (never a scroll)
    _HIDE, _SHOW = "\x1b[?25l", "\x1b[?25h"  # the cursor, which waits over the display

    def __init__(self, file: IO[str]) -> None:
        from rich.console import Console

        self._file = file
        self._console: Console = Console(file=file, highlight=False, emoji=False)
        # What is drawn is rendered off the screen, in the terminal's colours (or none:
        # NO_COLOR), then written at once by _write: the terminal's own console wrote to it
        # from inside a capture too, past _write's guard against a terminal gone away.
        # In the terminal's encoding: where it is not UTF-8 (PYTHONIOENCODING=ascii, a
        # Latin-1 locale) the bar is drawn in ASCII, as rich does on such a console.
        self._encoding: str = getattr(file, "encoding", None) or "utf-8"
        self._paper: Console = Console(
            file=_Paper(self._encoding), force_terminal=True, no_color=self._console.no_color,
            color_system=cast(Any, self._console.color_system), highlight=False, emoji=False,
        )  # fmt: skip
        self._view: RenderableType | None = None  # the display while one is shown
        self._drawn: tuple[int, int] | None = None  # on the screen: its rows, the width then
        self._hidden = False  # the cursor, hidden while a display is drawn
        self._gone = False  # the terminal went away (EIO): nobody left to show anything to

    @property
    def width(self) -> int:
        """The terminal's width now (after a resize too; a stale ``COLUMNS`` is not it)."""
        return columns(self._file) or self._console.width

    @property
    def redraws(self) -> bool:
        """Whether the terminal can redraw the display in place (not ``TERM=dumb``)."""
        return self._console.is_interactive

    def print(self, text: str, style: str | None = None) -> None:
        """A line above the display (or simply a line, when none is shown), wrapped
        between words at the terminal's width (a job's line cut to it instead).

        In the foreground it starts over whatever the terminal echoed at the cursor, which
        waits at the start of a row: the ``^C`` of a Ctrl-C came before the stop's line
        ("^C12:00:01 SIGINT: stopping..."). In the background (``bg``) the row is the
        shell's, and the line is only added (as any job's output)."""
        width = self.width
        shown = in_one_row(text, width) or fit(text, width)
        lead = self._erased() or ("\r" + self._ERASE_ROW) * self._foreground()
        self._write(lead + self._rendered(shown, style, width) + "\n" + self._draw())

    def _rendered(self, renderable: RenderableType | str, style: str | None, width: int) -> str:
        """What the console writes for ``renderable`` (colour as it does, or none: NO_COLOR,
        not a colour terminal), with no line break after it; the terminal wraps nothing."""
        with self._paper.capture() as captured:
            self._paper.print(
                renderable, style=style, markup=False, highlight=False, width=width, end="",
                soft_wrap=isinstance(renderable, str),
            )  # fmt: skip
        return captured.get().removesuffix("\n")

    def _erased(self) -> str:
        """The display erased (the cursor left at its top-left); "" when none is drawn, or
        in the background (stopped by SIGSTOP, which cannot be caught, then ``bg``): the
        rows at the cursor are the shell's then, the display left where it was."""
        drawn, self._drawn = self._drawn, None
        if drawn is None or not self._foreground():
            return ""
        rows, then = drawn
        reflowed = rows * -(-then // max(self.width, 1))  # each row in as many as now fit
        each = self._ERASE_ROW + self._DOWN
        return "\r" + self._SAVE + each * reflowed + self._RESTORE

    def _foreground(self) -> bool:
        """Whether the run is the terminal's foreground job (or cannot tell: no terminal).
        A job in the background (``bg`` after Ctrl-Z, ``&``) draws no display: its
        redraws went over the shell's prompt and what was typed at it, its cursor hidden."""
        try:
            return os.tcgetpgrp(self._file.fileno()) == os.getpgrp()
        except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation: an OSError
            return True

    def _draw(self) -> str:
        """The display, and the cursor back at its top-left corner ("" when none, or in
        the background: drawn again once in the foreground), the cursor hidden."""
        if self._view is None or not self._foreground():
            return ""
        width = self.width
        # One column short of the edge: a row the width of the terminal leaves the cursor
        # past it, where some terminals start the next row on the next output.
        drawn = self._rendered(self._view, None, max(width - 1, 1))
        # A character the terminal's encoding lacks (the figures' "·") one "?", a column as
        # it was drawn: written as "\xb7" it made rows wider than the terminal, and wrapped.
        drawn = drawn.encode(self._encoding, "replace").decode(self._encoding)
        # No more rows than the terminal has: the rows above its top cannot be gone back
        # up to, so each redraw left a copy of them in the scrollback (a 1-row window had
        # a bar there five times a second).
        height = rows_of(self._file)
        if height is not None and drawn.count("\n") >= height:
            drawn = "\n".join(drawn.split("\n")[:height])
        rows = drawn.count("\n")
        self._drawn = (rows + 1, width)
        hide, self._hidden = "" if self._hidden else self._HIDE, True
        return hide + drawn + "\r" + (f"\x1b[{rows}A" if rows else "")

    def _shown_cursor(self) -> str:
        """The cursor shown again, if hidden ("" if not)."""
        show, self._hidden = self._SHOW if self._hidden else "", False
        return show

    def _write(self, text: str) -> None:
        """``text`` written at once (no half-drawn display between two writes), unless the
        terminal has gone away (a dropped ssh session: every write fails with EIO); then
        nothing more is written to it. The display is for a person, not the run's record:
        the run stops on the SIGHUP that came with it (75), its outcomes in the ledger, the
        results and the events, where they were going. A write that failed here ended the
        run with a traceback and exit 1."""
        if self._gone or not text:
            return
        try:
            self._file.write(text)
            self._file.flush()
        except OSError:
            self._gone = True

    async def show(self, progress: Progress) -> None:
        """Keep ``progress`` pinned at the bottom, redrawn on the event loop (no thread),
        until cancelled or :meth:`stop`."""
        view = progress_view(progress.snapshot(), self.width)
        self._view = view
        self._write(self._draw())
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._suspended_on_ctrl_z)
                while self._view is not None and not self._gone:
                    await anyio.sleep(self.REFRESH_S)
                    if self._view is not None:
                        self._view = progress_view(progress.snapshot(), self.width)
                        self._write(self._erased() + self._draw())
                group.cancel_scope.cancel()
        finally:
            self.stop()

    async def _suspended_on_ctrl_z(self) -> None:
        """Ctrl-Z (SIGTSTP): the display erased and the cursor shown before the run stops,
        then drawn again once it is continued in the foreground (``fg``; after ``bg``, not
        until then). Stopped as it was drawn, the run left the shell's prompt under a stale
        bar with its cursor hidden, and the cursor stayed hidden in the shell until the run
        was brought back and ended."""
        with anyio.open_signal_receiver(signal.SIGTSTP) as received:
            async for _ in received:
                self._write(self._erased() + self._shown_cursor())
                ours = signal.signal(signal.SIGTSTP, signal.SIG_DFL)
                try:
                    os.kill(os.getpid(), signal.SIGTSTP)  # stopped here until continued
                finally:
                    signal.signal(signal.SIGTSTP, ours)
                self._write(self._draw())

    def stop(self) -> None:
        """Remove the display at once (the summary comes next, where it was); lines go on
        as lines."""
        if self._view is not None:
            self._view = None
            self._write(self._erased() + self._shown_cursor())

    def __repr__(self) -> str:
        return f"Screen(width={self.width}, shown={self._view is not None}, gone={self._gone})"


class _Paper(io.StringIO):
    """What the display is rendered on: text, in the encoding of the terminal it is for."""

    def __init__(self, encoding: str) -> None:
        super().__init__()
        self._encoding = encoding

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding


def progress_view(snap: Snapshot, width: int) -> RenderableType:
    """The display of ``snap`` at ``width`` columns: a bar and the figures, or on a narrow
    terminal the figures alone, whole."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    share = f"{snap.share:4.0%}" if snap.share is not None else ""
    figures = Text(f"{share} {snap.figures()}".strip())
    outcomes = Text(snap.outcomes(), style="dim")
    bar_width = min(40, width - len(figures) - 2)
    if bar_width < 10:  # a narrow terminal: the figures whole, wrapped, rather than a stub
        return Group(figures, outcomes) if outcomes else figures  # of a bar and "ETA 3m…"
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    bar = ProgressBar(total=snap.total, completed=snap.done, width=bar_width)
    grid.add_row(bar, figures)
    if outcomes:
        grid.add_row(Text(""), outcomes)
    return grid


class PlainScreen:
    """Not a terminal (``--progress on`` into a file or a CI log): lines, and every
    ``every_s`` seconds one progress line of its own, never redrawn."""

    def __init__(self, file: IO[str], every_s: float = 5.0) -> None:
        self._file = file
        self._every = every_s
        self._showing = False

    def print(self, text: str, style: str | None = None) -> None:
        del style
        self._file.write(text + "\n")
        self._file.flush()

    async def show(self, progress: Progress) -> None:
        self._showing = True
        while self._showing:
            await anyio.sleep(self._every)
            if self._showing:
                self.print("progress: " + progress.line())

    def stop(self) -> None:
        self._showing = False

    def __repr__(self) -> str:
        return f"PlainScreen(every_s={self._every})"
