"""People at a terminal: `run` asks before deleting, and shows progress and a summary."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from tests.e2e import reaper_env, write_ids
from tests.tty import Terminal
from worker.outcomes.journal import Tally
from worker.simulator import SimulatorConfig, run_simulator
from worker.terminal.progress import Progress, count_lines


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


def test_progress_figures_show_done_rate_eta_and_outcomes() -> None:
    now = [100.0]
    tally = Tally()
    progress = Progress(tally, total=1000, clock=lambda: now[0])
    tally.outcomes["deleted"] += 200
    tally.outcomes["absent"] += 50
    tally.retries = 3
    now[0] = 110.0
    snap = progress.snapshot()
    assert (snap.done, snap.total, snap.share) == (250, 1000, 0.25)
    assert snap.figures() == "250 / 1,000 · 25 ids/s · ETA 30s"
    assert snap.outcomes() == "deleted 200  absent 50 · retries 3"
    assert (
        progress.line()
        == " 25.0% 250 / 1,000 · 25 ids/s · ETA 30s | deleted 200  absent 50 · retries 3"
    )
    now[0] = 100.0 + 250 / 0.05  # a slow run: the ETA reads in minutes and hours
    assert "ETA 4h10m" in progress.snapshot().figures()


def test_count_lines_knows_plain_files_only(tmp_path: Path) -> None:
    plain = write_ids(tmp_path / "ids.txt", ["a", "b", "c"])
    assert count_lines(str(plain)) == 3
    assert count_lines("-") is None
    assert count_lines(str(tmp_path / "ids.txt.gz")) is None


# -- what a person sees during a run ------------------------------------------------------------

SUMMARY_ROW = re.compile(r"^  [a-z_ ]+\s+[\d,.]+(s| ids/s)?$")


def _run_on_a_pty(args: list[str], env: dict[str, str], **kw: Any) -> tuple[int, Terminal]:
    term = Terminal(["run", *args], env, **kw)
    return term.wait(), term


@pytest.mark.anyio
async def test_run_on_a_terminal_shows_progress_and_warnings_but_no_line_per_id(
    tmp_path: Path,
) -> None:
    """2,000 ids on a real pseudo-terminal: the progress display is drawn, the invalid line
    is a warning above it, and nothing else is on the screen at the end but the summary:
    no line per id, no JSON, no leftover of the progress display."""
    async with run_simulator(SimulatorConfig(jobs=2000)) as sim:
        ids = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", [*ids, "not a job id!"])
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        args = ["-i", str(src), "--yes", "--rate", "40", "--batch-size", "50"]
        code, term = await anyio.to_thread.run_sync(lambda: _run_on_a_pty(args, env))
        assert len(sim.deleted) == 2000
    assert code == 1, term.screen_text()  # the invalid line is rejected
    raw = term.text()
    assert "━" in raw and " / 2,001" in raw and "ids/s" in raw  # the display was drawn
    seen = [line for line in term.lines() if line]
    assert not any(job_id in line for line in seen for job_id in ids), seen[:5]
    assert not any(job_id in raw for job_id in ids[:50])  # not even drawn and wiped
    warning, header, *rows = seen
    assert warning == "rejected  line 2001: not a job id! (invalid character ' ' at position 4)"
    assert header == "devserver-reaper run summary"
    assert all(SUMMARY_ROW.match(row) for row in rows), rows
    assert "  deleted             2,000" in rows


@pytest.mark.anyio
async def test_verbose_shows_a_line_per_id_and_quiet_only_the_summary(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=30)) as sim:
        ids = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", ids)
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        _, verbose = await anyio.to_thread.run_sync(
            lambda: _run_on_a_pty(["-i", str(src), "--dry-run", "-v"], env)
        )
        _, quiet = await anyio.to_thread.run_sync(
            lambda: _run_on_a_pty(["-i", str(src), "--yes", "-q", "--rate", "1000"], env)
        )
    lines = verbose.lines()
    assert [line for line in lines if line.startswith("DRY-RUN")] == [
        f"DRY-RUN delete {job_id}" for job_id in ids
    ]
    seen = [line for line in quiet.lines() if line]
    assert seen[0] == "devserver-reaper run summary", seen
    assert all(SUMMARY_ROW.match(row) for row in seen[1:]), seen
    assert "━" not in quiet.text()


@pytest.mark.anyio
async def test_events_file_on_a_terminal_keeps_every_event_while_the_screen_stays_quiet(
    tmp_path: Path,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=200)) as sim:
        ids = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", ids)
        events = tmp_path / "events.jsonl"
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        args = ["-i", str(src), "--yes", "--events", str(events), "--rate", "1000"]
        code, term = await anyio.to_thread.run_sync(lambda: _run_on_a_pty(args, env))
    assert code == 0
    written = [orjson.loads(line) for line in events.read_text().splitlines()]
    deleted = [event["job_id"] for event in written if event["event"] == "job.deleted"]
    assert sorted(deleted) == sorted(ids)
    assert [event["event"] for event in written][-1] == "run.summary"
    assert not any(job_id in term.text() for job_id in ids)


@pytest.mark.anyio
async def test_not_a_terminal_every_event_still_goes_to_stdout_as_json(tmp_path: Path) -> None:
    """stdout piped, stderr a terminal: the JSON events are whole, one per line, and the
    progress display stays on stderr."""
    async with run_simulator(SimulatorConfig(jobs=300)) as sim:
        ids = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", ids)
        out = tmp_path / "stdout.jsonl"
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        with out.open("wb") as handle:
            args = ["-i", str(src), "--yes", "--rate", "30", "--batch-size", "20"]
            code, term = await anyio.to_thread.run_sync(
                lambda: _run_on_a_pty(args, env, stdout_to=handle.fileno())
            )
    assert code == 0
    events = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert sorted(e["job_id"] for e in events if e["event"] == "job.deleted") == sorted(ids)
    assert "━" in term.text()
    assert "devserver-reaper run summary" in term.lines()
