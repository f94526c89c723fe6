"""One terminal, shared by everything a command shows: lines scroll above, progress stays below.

Writing to a terminal from two places at once is what garbles it (a ``\\r`` progress line
overwritten by an event, an event cut in half by a redraw). So on a terminal everything goes
through one :class:`Screen`: :meth:`Screen.print` puts a line above the live display, and
:meth:`Screen.show` keeps a progress display pinned at the bottom while a run lasts. rich
draws it (imported here, and this module only when a display is shown, so ``--help`` stays
fast). Where no terminal is (``--progress on`` into a log file), :class:`PlainScreen` writes
a plain progress line every few seconds instead of redrawing one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import IO, TYPE_CHECKING, Protocol

import anyio

from worker.terminal.progress import Progress, Snapshot
from worker.terminal.wrap import fit

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live


class Display(Protocol):
    """Somewhere a person reads: lines, and while a run lasts, its progress."""

    def print(self, text: str, style: str | None = None) -> None: ...

    async def show(self, progress: Progress) -> None: ...

    def stop(self) -> None: ...


class Screen:
    """A terminal: lines above, and while :meth:`live` runs, a progress display below."""

    REFRESH_S = 0.2

    def __init__(self, file: IO[str]) -> None:
        from rich.console import Console

        self._console: Console = Console(file=file, highlight=False, emoji=False)
        self._live: Live | None = None
        self._gone = False  # the terminal went away (EIO): nobody left to show anything to

    @property
    def width(self) -> int:
        return self._console.width

    @property
    def redraws(self) -> bool:
        """Whether the terminal can redraw the display in place (not ``TERM=dumb``)."""
        return self._console.is_interactive

    def print(self, text: str, style: str | None = None) -> None:
        """A line above the display (or simply a line, when none is shown), broken between
        words at the terminal's width (rich's soft wrap left that to the terminal)."""
        console, text = self._console, fit(text, self.width)
        self._unless_gone(
            lambda: console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)
        )

    def _unless_gone(self, write: Callable[[], object]) -> None:
        """``write()``, unless the terminal has gone away (a dropped ssh session: every
        write fails with EIO); then nothing more is written to it. The display is for a
        person, not the run's record: the run stops on the SIGHUP that came with it (75),
        its outcomes in the ledger, the results and the events, where they were going. A
        write that failed here ended the run with a traceback and exit 1."""
        if self._gone:
            return
        try:
            write()
        except OSError:
            self._gone = True

    async def show(self, progress: Progress) -> None:
        """Keep ``progress`` pinned at the bottom, redrawn on the event loop (no thread),
        until cancelled or :meth:`stop`."""
        from rich.live import Live

        live = Live(
            progress_view(progress.snapshot(), self.width),
            console=self._console,
            auto_refresh=False,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live = live
        self._unless_gone(partial(live.start, refresh=True))
        try:
            while self._live is live and not self._gone:
                await anyio.sleep(self.REFRESH_S)
                if self._live is live:
                    view = progress_view(progress.snapshot(), self.width)
                    self._unless_gone(partial(live.update, view, refresh=True))
        finally:
            self.stop()

    def stop(self) -> None:
        """Remove the display at once (the summary comes next); lines go on as lines."""
        live, self._live = self._live, None
        if live is not None:
            self._unless_gone(live.stop)

    def __repr__(self) -> str:
        return f"Screen(width={self.width}, live={self._live is not None}, gone={self._gone})"


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
