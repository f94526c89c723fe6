"""Sentences for a terminal, broken between words at its width, not by it mid-word.

A terminal wraps a line wider than itself wherever its edge falls (``ca`` / ``tches``), and
puts the rest at column 0, under the labels of a table. So what a command says to a person
on a terminal is wrapped here first: at a space, the rest indented under the line's value
(``  sealed   with no plan key: ...`` goes on under ``with``). A command to copy is left
whole: the terminal's own wrap of it is copied back as one line, a line break is not. Not
a terminal (a pipe, a file, a log): lines are left whole, for ``grep``.
"""

from __future__ import annotations

import io
import os
import re
import textwrap
from typing import Protocol

_COMMAND = re.compile(r"^\s*(?:[a-z ]+:\s+)?devserver-reaper [a-z]+(?: |$)")
"""A line that is (or is labelled, ``resume: ``) a command: ``devserver-reaper run ...``;
not ``devserver-reaper run: not confirmed`` (a command's name before what it says)."""

_LABELLED = re.compile(r" *\S+(?: \S+)*? {2,}(?=\S)")
"""A row of a table: its label, then two spaces or more, then its value."""


class Stream(Protocol):
    """Where lines go: a file object, or :class:`~worker.stdio.Report`."""

    def isatty(self) -> bool: ...

    def fileno(self) -> int: ...


def columns(stream: Stream) -> int | None:
    """The width of the terminal ``stream`` writes to; None when it is not a terminal."""
    try:
        if not stream.isatty():
            return None
    except (OSError, ValueError, AttributeError):  # closed, or not a stream of a file
        return None
    try:
        return os.get_terminal_size(stream.fileno()).columns or _columns_variable()
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return _columns_variable()  # a terminal that cannot say its size: COLUMNS, or 80


def rows(stream: Stream) -> int | None:
    """The height of the terminal ``stream`` writes to; None when it is not a terminal or
    cannot say."""
    try:
        if not stream.isatty():
            return None
        return os.get_terminal_size(stream.fileno()).lines or None
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None


def _columns_variable() -> int:
    given = os.environ.get("COLUMNS", "")
    return int(given) if given.isdigit() and int(given) > 0 else 80


def fit(text: str, width: int) -> str:
    """``text`` with each line wider than ``width`` broken at spaces, its continuations
    indented under the line's value (a table row's) or two columns in; the spaces a line
    ends with (a prompt's) kept. Commands are left whole, and so are events as JSON
    (``--log-format json`` on a terminal): a line break in a string is no JSON."""
    out: list[str] = []
    for line in text.split("\n"):
        if cells(line) <= width or _COMMAND.match(line) or line.startswith("{"):
            out.append(line)
            continue
        line = _widened(line)
        body = line.rstrip(" ")
        trail = line[len(body) :]
        lead = len(body) - len(body.lstrip(" "))
        table = _LABELLED.match(body)
        indent = table.end() if table and table.end() <= width // 2 else min(lead + 2, width // 2)
        rows = textwrap.wrap(body, width, subsequent_indent=" " * indent, break_on_hyphens=False)
        if len(rows[-1]) + len(trail) > width:
            rows.append(" " * indent)
        out.extend(rows[:-1])
        out.append(rows[-1] + trail)
    return "\n".join(out).replace(_WIDE, "")


_WIDE = "\x00"
"""Put after a character two columns wide while a line is wrapped (textwrap counts
characters, so a line of CJK came out twice the width it was wrapped to, and the
terminal cut it again at column 0); taken out after."""


def _widened(line: str) -> str:
    from rich.cells import get_character_cell_size

    if line.isascii():
        return line
    return "".join(c + _WIDE if get_character_cell_size(c) == 2 else c for c in line)


def for_terminal(stream: Stream, text: str) -> str:
    """``text`` fitted to the terminal ``stream`` writes to; as it is anywhere else."""
    width = columns(stream)
    return text if width is None else fit(text, width)


def cells(text: str) -> int:
    """The columns ``text`` takes on a terminal: two for a wide character (CJK, most
    emoji), none for a combining one; not its ``len``."""
    from rich.cells import cell_len

    return cell_len(text)


def cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` columns, ending in ``…`` where it was cut (counted in
    columns: a name in CJK cut by its ``len`` took twice the row and wrapped)."""
    from rich.cells import set_cell_size

    if cells(text) <= width:
        return text
    return set_cell_size(text, max(width - 1, 0)).rstrip(" ") + "…"


def pad(text: str, width: int) -> str:
    """``text`` and spaces after it to ``width`` columns (``str.ljust`` counts characters)."""
    return text + " " * max(width - cells(text), 0)
