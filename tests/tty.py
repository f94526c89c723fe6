"""A person at a terminal, for tests: the real CLI on a pseudo-terminal, read back as a screen.

The child gets a new session whose controlling terminal is the pseudo-terminal, on stdin,
stdout and stderr, sized like a real window; Ctrl-C typed at it reaches the child as SIGINT
through the terminal's line discipline, as it would from a keyboard. What the child wrote is
replayed through pyte (a VT100 emulator), so a test asserts on what a person would see, not
on escape codes: the lines that scrolled away and the screen left at the end.
"""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import pyte

COLUMNS, ROWS = 120, 40


def _controlling_terminal() -> None:  # runs in the child, before exec
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    # As a login shell starts it, whatever started the tests (under nohup the run would
    # take SIGHUP as ignored on purpose and go on through a hang-up).
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class Terminal:
    """``python -m worker ARGS`` on a pseudo-terminal of ``columns`` × ``rows`` (or, given
    ``program``, that command line: a shell, say)."""

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        *,
        columns: int = COLUMNS,
        rows: int = ROWS,
        stdout_to: int | None = None,
        program: Sequence[str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.columns, self.rows = columns, rows
        main, secondary = pty.openpty()
        fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self._main = main
        self._raw = bytearray()
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [*(program or (sys.executable, "-m", "worker")), *args],
            stdin=secondary,
            stdout=secondary if stdout_to is None else stdout_to,
            stderr=secondary,
            env={**env, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(rows)},
            close_fds=True,
            preexec_fn=_controlling_terminal,
            cwd=cwd,
        )
        os.close(secondary)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._main, 65536)
            except OSError:  # EIO: every process holding the secondary side has gone
                return
            if not chunk:
                return
            with self._lock:
                self._raw += chunk

    @property
    def raw(self) -> bytes:
        with self._lock:
            return bytes(self._raw)

    def text(self) -> str:
        return self.raw.decode(errors="replace")

    def expect(self, marker: str, timeout: float = 60.0) -> None:
        """Wait until ``marker`` has been written (as text, escape codes and all)."""
        self._wait_for(marker, self.text, timeout)

    def expect_on_screen(self, marker: str, timeout: float = 60.0) -> None:
        """Wait until ``marker`` is on the screen a person sees (what a line editor redrew,
        not the bytes it wrote to get there)."""
        self._wait_for(marker, self.screen_text, timeout)

    def _wait_for(self, marker: str, seen: Callable[[], str], timeout: float) -> None:
        """Until ``marker`` is in ``seen()``; once the process has exited, only until what
        it wrote has all been read."""
        deadline = time.monotonic() + timeout
        while marker not in seen():
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                if marker in seen():
                    return
                raise AssertionError(f"exited {self.process.returncode} before {marker!r}:\n"
                                     f"{self.screen_text()}")  # fmt: skip
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} within {timeout}s:\n{self.screen_text()}")
            time.sleep(0.02)

    def type(self, keys: bytes) -> None:
        os.write(self._main, keys)

    def wait(self, timeout: float = 120.0) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        os.close(self._main)
        return code

    def hang_up(self, timeout: float = 120.0) -> int:
        """The terminal goes away (an ssh session dropped): its main side is closed, so the
        child gets SIGHUP and every write to the terminal fails (EIO); its exit code."""
        os.close(self._main)
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def lines(self) -> list[str]:
        """Every line a person saw at the end: those scrolled off the top, then the screen,
        right-trimmed, trailing blank lines dropped."""
        screen = pyte.HistoryScreen(self.columns, self.rows, history=100_000)
        stream = pyte.ByteStream(screen)
        stream.feed(self.raw)  # the terminal turned each \n into \r\n (ONLCR), as a real one

        def row(line: dict[int, pyte.screens.Char]) -> str:
            return "".join(line[x].data for x in range(self.columns)).rstrip()

        seen = [row(line) for line in screen.history.top] + [
            line.rstrip() for line in screen.display
        ]
        while seen and not seen[-1]:
            seen.pop()
        return seen

    def screen_text(self) -> str:
        return "\n".join(self.lines())
