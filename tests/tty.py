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
import shlex
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

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

    def answer_if_asked(self, marker: str, keys: bytes, timeout: float = 60.0) -> bool:
        """Type ``keys`` once ``marker`` (a question) has been written, as a person answers
        what is on the screen: keys typed before a prompt are dropped (``confirm``). False,
        nothing typed, when the process ends without asking."""
        try:
            self.expect(marker, timeout)
        except AssertionError:
            if self.process.poll() is None:
                raise  # still running, never asked: the timeout
            return False
        self.type(keys)
        return True

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


class Tmux:
    """A terminal that reflows its lines when it is resized, as most do (tmux, VTE, iTerm2,
    kitty, Windows Terminal; pyte, above, cuts them instead, as xterm does): ``python -m
    worker ARGS`` in a window of a private tmux server, read back as the rows it shows."""

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        *,
        columns: int = COLUMNS,
        rows: int = ROWS,
        cwd: str,
        above: Sequence[str] = (),
        job_control: bool = False,
    ) -> None:
        """``above``: rows printed first, as a person's terminal holds what came before.
        ``job_control``: the command typed into an interactive bash, as a person runs it,
        so that Ctrl-Z stops it and ``fg`` continues it."""
        self._socket = f"reaper-test-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        self._code = os.path.join(cwd, "tmux-exit-code")
        variables = [f"{k}={v}" for k, v in env.items() if k not in ("COLUMNS", "LINES")]
        command = shlex.join(["env", "-i", *variables, "TERM=screen", sys.executable, "-m",
                              "worker", *args])  # fmt: skip
        # The shell stays after the command, so its last screen can still be read.
        before = "".join(f"echo {shlex.quote(row)}; " for row in above)
        shell = f"{before}{command}; echo $? > {shlex.quote(self._code)}"
        interactive = "env -i PS1='$ ' TERM=screen bash --norc --noprofile -i"
        window = interactive if job_control else f"{shell}; exec sleep 600"
        self.tmux("-f", "/dev/null", "new-session", "-d", "-x", str(columns), "-y", str(rows),
                  "-c", cwd, window)  # fmt: skip
        if job_control:
            self.tmux("send-keys", "-l", shell)
            self.tmux("send-keys", "Enter")

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self._socket, *args], capture_output=True, text=True, check=True
        )
        return done.stdout

    def rows(self) -> list[str]:
        """The rows the window holds now (those scrolled off its top too), right-trimmed, trailing
        blank rows dropped."""
        seen = [row.rstrip() for row in self.tmux("capture-pane", "-p", "-S", "-").splitlines()]
        while seen and not seen[-1]:
            seen.pop()
        return seen

    def resize(self, columns: int, rows: int = ROWS) -> None:
        self.tmux("resize-window", "-x", str(columns), "-y", str(rows))

    def until(self, seen: Callable[[list[str]], bool], timeout: float = 60.0) -> list[str]:
        """The rows, once ``seen(rows)`` holds."""
        deadline = time.monotonic() + timeout
        while not seen(rows := self.rows()):
            if time.monotonic() > deadline:
                raise AssertionError(f"not seen within {timeout}s:\n" + "\n".join(rows))
            time.sleep(0.05)
        return rows

    def fg(self) -> None:
        """``fg`` typed (with ``job_control``): the stopped command continued, and its exit
        code the one :meth:`wait` reads (the shell went on to say 148 when it stopped)."""
        Path(self._code).unlink(missing_ok=True)
        self.tmux("send-keys", "-l", f"fg; echo $? > {shlex.quote(self._code)}")
        self.tmux("send-keys", "Enter")

    def cursor_shown(self) -> bool:
        """Whether the cursor is shown (not hidden by ``ESC[?25l``)."""
        return self.tmux("display-message", "-p", "#{cursor_flag}").strip() == "1"

    def type(self, *keys: str) -> None:
        self.tmux("send-keys", *keys)

    def wait(self, timeout: float = 120.0) -> int:
        """The command's exit code, once it has exited."""
        deadline = time.monotonic() + timeout
        code = Path(self._code)
        while not code.exists() or not code.read_text().strip():
            if time.monotonic() > deadline:
                raise AssertionError("the command did not exit:\n" + "\n".join(self.rows()))
            time.sleep(0.05)
        return int(code.read_text())

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self._socket, "kill-server"], capture_output=True)
