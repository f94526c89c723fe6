"""SIGTERM and Ctrl-C in the commands without a stop of their own to make (``check``,
``discover``, ``enqueue``, ``report``, ``plan show``): what was asked is kept until the
command looks, so no stop is lost.

Before a command's event loop runs, a signal raises ``SystemExit(75)`` where it lands
(:func:`raise_stop`). CPython drops what a handler raises inside some C code (compiling a
module folds ``2**31`` in C and keeps only a KeyboardInterrupt), and the command went on as
if never stopped; the signal is also kept, and :func:`checkpoint` raises it again. Inside
the loop nothing is raised: the loop hears the signal (:func:`watching`) and the command
stops at its next ``await``, so it never lands in the middle of a write. Only the standard
library here: ``cli`` imports this before any command.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from worker.exit_codes import ExitCode

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_asked: list[int] = []
"""The SIGTERM or SIGINT each call of :func:`raise_stop` was for, oldest first."""


def raise_stop(signum: int, frame: object) -> None:
    """The handler outside an event loop: exit as interrupted (75), not killed by the signal
    (143, which no CronJob policy expects) or with a KeyboardInterrupt traceback, and keep
    the signal for :func:`checkpoint` where CPython drops the exit."""
    _asked.append(signum)
    held_back()
    raise SystemExit(ExitCode.INTERRUPTED)


def held_back(*signums: int) -> None:
    """Once a stop's exit is under way: SIGTERM, SIGINT and ``signums`` are held back
    (blocked) in this thread, and any caught already let pass. Raised again where the exit
    was unwinding, each said "Exception ignored in: <generator ...>" with a traceback, its
    stop line again, or killed the process once the interpreter had put the system's
    handlers back as it ended (-2). Not ``SIG_IGN``: one caught before would be said
    "Signal 2 ignored due to race condition", with a traceback. A loop's signal watch hears
    them again (:func:`receiving`): where CPython dropped the exit, :func:`checkpoint` or
    the watch still stops the command."""
    again = {*SIGNALS, *signums}
    signal.pthread_sigmask(signal.SIG_BLOCK, again)
    for each in again:
        signal.signal(each, let_pass)


def ended(*signums: int) -> None:
    """The command has ended 75 and the process only closes: SIGTERM, SIGINT and ``signums``
    are ignored from now to its end, in every thread. Held back in this thread alone, one
    delivered to a thread still reading (enqueue's and run's input) killed the process once
    the interpreter, ending, had put the system's handlers back. Those caught already are
    let pass first (``signal.signal`` runs them before it changes a handler)."""
    held_back(*signums)
    for each in {*SIGNALS, *signums}:
        signal.signal(each, signal.SIG_IGN)


def let_pass(signum: int, frame: object) -> None:
    """A stop after the one whose exit is under way."""


@contextmanager
def receiving(*signums: signal.Signals) -> Iterator[AsyncIterator[signal.Signals]]:
    """anyio's signal receiver for SIGTERM, SIGINT and ``signums``, those held back
    (:func:`held_back`) delivered again once its own handlers are in: every loop's signal
    watch opens it here, so none is left deaf to a stop held back before it began."""
    import anyio

    with anyio.open_signal_receiver(*SIGNALS, *signums) as received:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {*SIGNALS, *signums})
        yield received


def asked() -> int | None:
    """The first SIGTERM or SIGINT :func:`raise_stop` was called for, or None."""
    return _asked[0] if _asked else None


def said(signum: int) -> str:
    """A signal as a person knows it: ``Ctrl-C``, ``SIGTERM``."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def checkpoint() -> None:
    """Exit as interrupted (75) where a stop was asked and its exit was lost."""
    if _asked:
        raise SystemExit(ExitCode.INTERRUPTED)


@asynccontextmanager
async def watching(stop: Callable[[str], None]) -> AsyncIterator[None]:
    """Inside, each SIGTERM or SIGINT calls ``stop`` with its name (from a task of the
    loop, never inside the code it interrupts), as does one asked already whose exit was
    lost before the loop. On the way out :func:`raise_stop` is the handler again (the
    loop's leaving put the system's back: a SIGTERM killed the process, 143, while it
    wrote its last lines)."""
    import anyio

    async def hear(received: AsyncIterator[int]) -> None:
        async for signum in received:
            stop(said(signum))

    try:
        async with anyio.create_task_group() as group:
            with receiving() as received:
                if (signum := asked()) is not None:
                    stop(said(signum))
                group.start_soon(hear, received)
                try:
                    yield
                finally:
                    group.cancel_scope.cancel()
    except BaseExceptionGroup as raised:  # the command's error alone, as it raised it
        if len(raised.exceptions) != 1:
            raise
        raise raised.exceptions[0] from None
    finally:
        outside_loop()


def outside_loop(*signums: int, handler: Callable[[int, object], None] = raise_stop) -> None:
    """``handler`` (:func:`raise_stop`) for SIGTERM, SIGINT and ``signums`` again, once a
    loop that heard them has left: its leaving put the system's handlers back, and a
    SIGTERM killed the process (143, without a word) while it wrote its last lines."""
    for signum in (*SIGNALS, *signums):
        signal.signal(signum, handler)


async def cancelled_on_stop(
    command: Callable[[], Awaitable[int]], stopped: Callable[[str], None]
) -> int:
    """``command``'s exit code, or 75 when a SIGTERM or SIGINT cancelled it first, at its
    next ``await`` (``stopped`` says so with the signal's name). What it had under way is
    left as a cancellation leaves it: its files removed (a plan's part, a spool), nothing
    written claimed whole."""
    import anyio

    heard: list[str] = []
    with anyio.CancelScope() as scope:

        def stop(name: str) -> None:
            heard.append(name)
            scope.cancel()

        async with watching(stop):
            return await command()
    stopped(heard[0])
    return ExitCode.INTERRUPTED
