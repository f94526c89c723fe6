"""A status line for a wait a person would otherwise watch in silence (the IAM look-up of
a region's project before a command begins): shown on a terminal only, and only once the
wait has lasted ``after_s``, then erased, so a quick answer shows nothing."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import IO

import anyio

AFTER_S = 0.5


@asynccontextmanager
async def status_while(
    text: str, stream: IO[str] | None = None, *, after_s: float = AFTER_S
) -> AsyncIterator[None]:
    """``text`` on ``stream`` (stderr) while the block runs longer than ``after_s``, if it
    is a terminal; the line erased when the block ends, however it ends."""
    out = sys.stderr if stream is None else stream
    try:
        watched = out is not None and out.isatty()
    except (OSError, ValueError):  # closed
        watched = False
    if not watched:
        yield
        return
    shown = False

    async def say_later() -> None:
        nonlocal shown
        await anyio.sleep(after_s)
        shown = _put(out, f"{text}…")

    async with anyio.create_task_group() as group:
        group.start_soon(say_later)
        try:
            yield
        finally:
            group.cancel_scope.cancel()
            if shown:
                _put(out, "\r\x1b[K")


def _put(out: IO[str], text: str) -> bool:
    """``text`` written and flushed; False when the terminal is gone (closed, or revoked
    while the wait ran: EIO). The line is a courtesy: losing it must not stop the command."""
    try:
        out.write(text)
        out.flush()
    except (OSError, ValueError):
        return False
    return True
