"""People at a terminal: `run` asks before deleting, and shows progress and a summary."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tests.e2e import reaper_env, write_ids
from worker.outcomes.journal import Tally
from worker.terminal.progress import Progress, count_lines
from worker.simulator import SimulatorConfig, run_simulator


def _run_on_a_terminal(args: list[str], env: dict[str, str], answer: bytes) -> tuple[int, str]:
    """Run the CLI with stdin and stderr on a pseudo-terminal; type ``answer`` at the prompt."""
    main, secondary = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-m", "worker", *args],
        stdin=secondary,
        stderr=secondary,
        stdout=subprocess.DEVNULL,
        env=env,
        close_fds=True,
    )
    os.close(secondary)
    seen = b""
    while b"continue:" not in seen:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.write(main, answer)
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    return child.wait(timeout=60), seen.decode(errors="replace")


@pytest.mark.anyio
@pytest.mark.parametrize(("answer", "code"), [(b"yes\n", 0), (b"no\n", 64)])
async def test_run_asks_on_a_terminal_naming_project_endpoint_and_count(
    tmp_path: Path, answer: bytes, code: int
) -> None:
    async with run_simulator(SimulatorConfig(jobs=12)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        env = reaper_env(sim.url)
        returned, screen = await anyio.to_thread.run_sync(
            _run_on_a_terminal, ["run", "-i", str(src)], env, answer
        )
        assert "demo-project" in screen
        assert sim.url in screen
        assert "up to 12 job ids" in screen
        assert returned == code, screen
        assert len(sim.deleted) == (12 if code == 0 else 0)
        if code == 0:
            assert "run summary" in screen  # the readable summary on the terminal
            assert "deleted" in screen


def test_progress_line_shows_done_rate_and_eta() -> None:
    now = [100.0]
    tally = Tally()
    progress = Progress(tally, total=1000, clock=lambda: now[0])
    tally.outcomes["deleted"] += 200
    tally.outcomes["absent"] += 50
    now[0] = 110.0
    line = progress.line()
    assert line.startswith(" 25.0%")
    assert "250 done" in line
    assert "25 ids/s" in line
    assert "ETA 30s" in line
    assert "deleted 200" in line


def test_count_lines_knows_plain_files_only(tmp_path: Path) -> None:
    plain = write_ids(tmp_path / "ids.txt", ["a", "b", "c"])
    assert count_lines(str(plain)) == 3
    assert count_lines("-") is None
    assert count_lines(str(tmp_path / "ids.txt.gz")) is None
