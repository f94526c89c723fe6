"""What a person sees on a terminal narrower than the text, and on one resized mid-run.

An SRE at 80 columns found sentences cut mid-word (the terminal wrapping them), a progress
bar of the old width left behind after the window was made narrower, and ``serve`` taking
three rows per job. Each is tried here on a real pseudo-terminal (pyte reads it back), and
the resize in tmux, which reflows its lines on a resize as most terminals do.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import structlog

from tests.conftest import REDIS_URL
from tests.e2e import reaper, reaper_env, until, write_ids
from tests.tty import Terminal, Tmux
from worker.discovery.plan import UNKEYED
from worker.simulator import SimulatorConfig, run_simulator
from worker.terminal.lines import EventLines

_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-B]|[78=>])")
_COMMAND = re.compile(r"^\s*(?:[a-z ]+:\s+)?devserver-reaper [a-z]+(?: |$)")


def written_lines(raw: bytes) -> list[str]:
    """Each line the program wrote, as the terminal shows it before wrapping it: escape
    sequences out, and only what the last carriage return left."""
    text = _ESCAPE.sub("", raw.decode(errors="replace")).replace("\r\n", "\n")
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


def overflowing(term: Terminal) -> list[str]:
    """The lines of prose wider than the terminal (which it cut wherever the edge fell).
    A command to copy is left whole: a terminal's own wrap is copied back as one line."""
    return [line for line in written_lines(term.raw)
            if len(line) > term.columns and not _COMMAND.match(line)]  # fmt: skip


def cut_words(sentence: str, term: Terminal) -> list[str]:
    """The words of ``sentence`` not seen whole on the screen."""
    seen = set(" ".join(term.lines()).split())
    return [word for word in sentence.split() if word not in seen]


@pytest.mark.anyio
@pytest.mark.parametrize("columns", [80, 60, 40])
async def test_the_unkeyed_plan_and_the_prompt_break_between_words(
    tmp_path: Path, columns: int
) -> None:
    """``plan.unkeyed``, the plan's review and the prompt for a plan of one project, at
    80, 60 and 40 columns: every line fits (a continuation indented under its label's
    value), every word whole; the commands to copy are not broken."""
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        cwd = str(tmp_path)

        def discover() -> tuple[int, Terminal]:
            term = Terminal(["discover", "--all", "--plan", "plan.txt"], env, columns=columns,
                            cwd=cwd)  # fmt: skip
            return term.wait(), term

        def answer_no() -> tuple[int, Terminal]:
            term = Terminal(["run", "--plan", "plan.txt"], env, columns=columns, cwd=cwd)
            term.expect("them: ")
            term.type(b"no\n")
            return term.wait(), term

        made, review = await anyio.to_thread.run_sync(discover)
        assert made == 0, review.screen_text()
        declined, prompt = await anyio.to_thread.run_sync(answer_no)
        assert declined == 64 and not sim.deleted, prompt.screen_text()
    for term in (review, prompt):
        assert overflowing(term) == [], term.screen_text()
        assert cut_words(UNKEYED.replace("its seal guards", ""), term) == []
    rows = review.lines()
    sealed = next(n for n, row in enumerate(rows) if row.startswith("  sealed"))
    assert rows[sealed].startswith("  sealed   with no plan key:")
    assert rows[sealed + 1].startswith(" " * 11 + rows[sealed + 1].strip())  # under its value
    assert "next: devserver-reaper run --plan plan.txt --dry-run" in written_lines(review.raw)
    said = "This cannot be undone. (with each job re-read on a listing page first) not confirmed:"
    assert cut_words(said, prompt) == []
    duration = next(n for n, row in enumerate(prompt.lines()) if row.startswith("  duration"))
    assert prompt.lines()[duration + 1].startswith(" " * 14)  # under the value, not column 0


def _unknown_ids(n: int) -> list[str]:
    """``n`` ids of jobs nobody has (each ends ``absent``), the same each run."""
    return [str(uuid.UUID(int=random.Random(k).getrandbits(128), version=4)) for k in range(n)]


def _done(rows: list[str]) -> int:
    """The count of ids done the display shows (the lowest row's: the live one)."""
    found = [m.group(1) for row in rows if (m := re.search(r"([\d,]+) / [\d,]+ ·", row))]
    return int(found[-1].replace(",", "")) if found else -1


def wider_than_80(rows: list[str]) -> bool:
    return any(len(row) > 80 for row in rows if "ids/s" in row)


def _later(done: int) -> Callable[[list[str]], bool]:
    """Whether the rows show more ids done than ``done``: the display was drawn again."""
    return lambda rows: _done(rows) > done


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
@pytest.mark.parametrize("columns", [80, 40])
async def test_a_window_made_narrower_mid_run_keeps_one_display_and_no_stale_rows(
    tmp_path: Path, columns: int
) -> None:
    """A run's display drawn at 120 columns, 83 wide, then the window made narrower: the
    terminal reflows the old display into more rows than were drawn, and a redraw that
    went back up the rows it drew left the rest (a bar and its figures) on the screen for
    good. After two redraws there is one display of the new width; after Ctrl-C, none."""
    async with run_simulator(SimulatorConfig(jobs=100)) as sim:
        write_ids(tmp_path / "ids.txt", [*sim.job_ids(), *_unknown_ids(99_900)])
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        args = ["run", "-i", "ids.txt", "--yes", "--rate", "20", "--batch-size", "10"]

        def resized() -> tuple[list[str], list[str], int]:
            earlier = [f"$ an earlier command's output, row {n}" for n in range(5)]
            window = Tmux(args, env, columns=120, rows=30, cwd=str(tmp_path), above=earlier)
            try:
                window.until(wider_than_80)  # 82 or 83 columns once the rate has 3 figures
                window.resize(columns)
                for _ in range(2):  # two redraws at the new width
                    shown = window.until(_later(_done(window.rows())))
                window.type("C-c")
                code = window.wait()
                return shown, window.rows(), code
            finally:
                window.close()

        shown, end, code = await anyio.to_thread.run_sync(resized)
    assert code == 75
    drawn = [row for row in shown if "━" in row or "ids/s" in row]
    assert [row for row in shown if "ids/s" in row] == drawn[-1:], "\n".join(shown)
    assert len(drawn) == 1, "\n".join(shown)
    assert all(len(row) <= columns for row in shown)
    assert not any("━" in row or "ids/s ·" in row for row in end), "\n".join(end)
    assert "devserver-reaper run summary" in end


@pytest.mark.anyio
async def test_serve_on_a_terminal_says_one_row_per_job(tmp_path: Path, redis_prefix: str) -> None:
    """``serve`` on an 80-column terminal wrote each event as a log line of every field,
    three rows or more a job. Now a job is one row (its time, outcome, id and name, cut to
    the width); the JSON events for machines are unchanged (tests/test_serve*.py)."""
    stream = f"{redis_prefix}ids"
    async with run_simulator(SimulatorConfig(jobs=12)) as sim:
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        ids = sim.job_ids()
        serve = ["serve", "--redis-url", REDIS_URL, "--stream", stream, "--consumer", "c1",
                 "--http-port", "0"]  # fmt: skip
        term = Terminal(serve, env, columns=80)
        try:
            source = write_ids(tmp_path / "ids.txt", ids)
            queued = await reaper(["enqueue", "-i", str(source), "--redis-url", REDIS_URL,
                                   "--stream", stream], reaper_env(sim.url))  # fmt: skip
            assert queued.code == 0, queued.stderr

            async def all_deleted() -> bool:
                return len(sim.deleted) == len(ids)

            await until(all_deleted)
            await anyio.to_thread.run_sync(lambda: term.expect_on_screen(ids[-1]))
        finally:
            term.process.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(term.wait)
    rows = term.lines()
    assert code == 0, "\n".join(rows)
    assert all(len(row) <= 80 for row in written_lines(term.raw)), "\n".join(rows)
    jobs = [row for row in rows if any(job in row for job in ids)]
    assert len(jobs) == len(ids) and all(" deleted " in row for row in jobs), "\n".join(rows)
    others = [row for row in rows if row not in jobs]  # serving..., SIGTERM: ..., stopped: ...
    assert len(others) <= 4 and rows[-1].endswith("stopped: 12 entries read, 12 acknowledged")


def test_a_slowed_rate_is_said_in_words_on_a_terminal() -> None:
    """``warning: rate.slowed  rate=5.255 asked=8.0 reason=throttled``, again at each cut,
    was the event's fields: said as what happened and the pace now."""
    lines = EventLines(0)
    slowed = {"event": "rate.slowed", "level": "warning", "rate": 5.255, "asked": 8.0,
              "reason": "throttled"}  # fmt: skip
    assert lines.line(slowed) == (
        "warning: the API refuses calls (throttled): slowed to 5.25 calls/s of the 8 asked"
    )
    assert lines.line({"event": "rate.restored", "level": "warning", "rate": 8.0}) == (
        "the API takes calls again: back to 8 calls/s"
    )


def test_a_rate_cut_again_and_again_is_said_once_then_when_it_halves() -> None:
    """A fixed rate of 50 the API keeps refusing, cut by 0.85 fourteen times down to 5: a
    warning line at every cut, a screenful. Said once, then again only where the rate is
    half the one said or less; the cuts between are counted, and said with the rate
    restored (or at the end). ``-v`` says every cut, as every event."""
    lines = EventLines(0)
    said: list[str] = []
    rate = 50.0
    for _ in range(14):
        rate *= 0.85
        event = {"event": "rate.slowed", "level": "warning", "rate": rate, "asked": 50.0,
                 "reason": "throttled"}  # fmt: skip
        with contextlib.suppress(structlog.DropEvent):
            said.append(lines(None, "warning", event))
    assert [line.split("slowed to ")[1].split(" ")[0] for line in said] == ["42.5", "18.9", "8.37"]
    assert lines.held_back_note() == (
        "(3 more rate cuts, down to 5.14 calls/s, not shown: -v shows each, "
        "--events FILE or --results FILE keeps them)"
    )
    restored = lines(None, "warning", {"event": "rate.restored", "level": "warning", "rate": 50})
    assert restored == (
        "the API takes calls again: back to 50 calls/s (after 3 more cuts, to 5.14 calls/s at "
        "the lowest)"
    )
    assert lines.held_back_note() is None
    everything = EventLines(1)
    assert everything(None, "warning", {"event": "rate.slowed", "level": "warning", "rate": 9,
                                        "asked": 50.0, "reason": "throttled"})  # fmt: skip
    assert everything(None, "warning", {"event": "rate.slowed", "level": "warning", "rate": 8,
                                        "asked": 50.0, "reason": "throttled"})  # fmt: skip


async def _discover_at_80(url: str, tmp_path: Path) -> tuple[int, Terminal]:
    """``discover --all`` on an 80-column terminal: its exit code and the terminal."""
    env = reaper_env(url, REAPER_LOG_FORMAT="auto")

    def discover() -> tuple[int, Terminal]:
        term = Terminal(["discover", "--all"], env, columns=80, cwd=str(tmp_path))
        return term.wait(), term

    return await anyio.to_thread.run_sync(discover)


@pytest.mark.anyio
async def test_discovers_table_is_a_row_per_job_at_80_columns(tmp_path: Path) -> None:
    """The table of jobs is 130 columns wide: at 80 the terminal wrapped each job into two
    rows, its type cut in two at column 0. Each row is cut to the width instead, with a
    note on how to see every field."""
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        code, term = await _discover_at_80(sim.url, tmp_path)
        ids = sim.job_ids()
    assert code == 0, term.screen_text()
    assert overflowing(term) == [], term.screen_text()
    rows = term.lines()
    assert rows[0].startswith("ID  ") and rows[0].endswith("…")
    assert [row[:36] for row in rows[1:4]] == ids
    assert "(rows cut to the terminal's width: -o jsonl shows every field)" in rows


async def _run_at_80(source: Path, env: dict[str, str]) -> tuple[int, Terminal]:
    """``run -i SOURCE --yes`` on an 80-column terminal: its exit code and the terminal."""

    def run() -> tuple[int, Terminal]:
        term = Terminal(["run", "-i", str(source), "--yes"], env, columns=80)
        return term.wait(), term

    return await anyio.to_thread.run_sync(run)


@pytest.mark.anyio
async def test_events_as_json_on_a_terminal_are_never_broken_into_rows(tmp_path: Path) -> None:
    """``--log-format json`` on an 80-column terminal: the rejected line's event is wider
    than the terminal and holds spaces; it is written as one line that parses, not broken
    at a space inside a string."""
    async with run_simulator(SimulatorConfig(jobs=2)) as sim:
        source = write_ids(tmp_path / "ids.txt", [*sim.job_ids(), "not a job id!"])
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="json")
        code, term = await _run_at_80(source, env)
    assert code == 1, term.screen_text()
    (rejected,) = [line for line in written_lines(term.raw) if "job.rejected" in line]
    assert orjson.loads(rejected)["job_id"] == "not a job id!" and len(rejected) > 80


@pytest.mark.anyio
@pytest.mark.parametrize("columns", [80, 60])
async def test_a_mistyped_flag_is_said_between_words(columns: int) -> None:
    """``run --protect-name`` at 60 columns: the usage was cut ``[--e`` / ``xclude`` and the
    error ``did you m`` / ``ean``. Both are broken between words now."""

    def mistyped() -> tuple[int, Terminal]:
        term = Terminal(["run", "-i", "ids.txt", "--protect-name", "keep-*"], reaper_env(""),
                        columns=columns)  # fmt: skip
        return term.wait(), term

    code, term = await anyio.to_thread.run_sync(mistyped)
    assert code == 64
    said = "usage: devserver-reaper run (--input FILE | --plan FILE [--exclude FILE] unknown flag"
    assert cut_words(said + " --protect-name (did you mean --protect-file?);", term) == []
    assert all(len(line) <= columns for line in written_lines(term.raw)), term.screen_text()


@pytest.mark.anyio
async def test_a_yes_typed_before_the_prompt_is_no_answer_to_it(tmp_path: Path) -> None:
    """``yes`` typed while the run started (before its prompt was on the screen) was read
    as the answer: the jobs were deleted with the proposal unread. It is dropped now; the
    prompt waits for an answer typed after it, and a ``no`` there sends nothing."""
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        source = write_ids(tmp_path / "ids.txt", sim.job_ids())
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")

        def typed_ahead() -> tuple[int, Terminal]:
            term = Terminal(["run", "-i", str(source)], env, columns=80)
            term.type(b"yes\n")  # at once: the process is still starting
            term.expect("them: ")
            term.type(b"no\n")
            return term.wait(), term

        code, term = await anyio.to_thread.run_sync(typed_ahead)
        assert not sim.deleted, term.screen_text()
    assert code == 64
    assert "devserver-reaper run: not confirmed: nothing was sent (the prompt asks for 'yes'" in (
        term.screen_text()
    )


@pytest.mark.anyio
async def test_discovers_table_counts_a_wide_name_in_columns(tmp_path: Path) -> None:
    """A job named in CJK and emoji takes two columns a character: cut and padded by its
    ``len``, its row overran the 80 columns and the terminal wrapped it (a row of its own
    holding ``…``), and the columns after it stood out of line with the other rows'."""
    async with run_simulator(SimulatorConfig(jobs=2)) as sim:
        wide = sim.add_jobs(1, name="管理者ジョブ削除対象の名前" + "😀" * 8)
        code, term = await _discover_at_80(sim.url, tmp_path)
        ids = sim.job_ids()
    assert code == 0, term.screen_text()
    rows = term.lines()
    table = rows[1 : rows.index("(rows cut to the terminal's width: -o jsonl shows every field)")]
    assert sorted(row[:36] for row in table) == sorted(ids), term.screen_text()
    (named,) = [row for row in table if row.startswith(wide[0])]
    assert named.endswith("…") and "管理者" in named, term.screen_text()


Steps = Callable[[Tmux, Any], tuple[list[str], bool, list[str], int]]
"""What a person does in the shell once the run is stopped (Ctrl-Z), given the window and the
simulator: the rows then, whether the cursor was shown, the rows at the end, the exit code."""


async def _stopped_in_bash(tmp_path: Path, steps: Steps) -> tuple[list[str], bool, list[str], int]:
    """A run in an interactive bash, stopped with Ctrl-Z once its display shows ids done;
    then ``steps``."""
    async with run_simulator(SimulatorConfig(jobs=10)) as sim:
        write_ids(tmp_path / "ids.txt", [*sim.job_ids(), *_unknown_ids(400)])
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        args = ["run", "-i", "ids.txt", "--yes", "--rate", "20", "--batch-size", "2"]

        def stopped() -> tuple[list[str], bool, list[str], int]:
            window = Tmux(args, env, columns=80, rows=24, cwd=str(tmp_path), job_control=True)
            try:
                window.until(lambda rows: _done(rows) > 0)
                window.type("C-z")
                window.until(lambda rows: any("Stopped" in row for row in rows))
                return steps(window, sim)
            finally:
                window.close()

        return await anyio.to_thread.run_sync(stopped)


def _fg_and_ctrl_c(window: Tmux, seen: list[str]) -> tuple[list[str], int]:
    """``fg``, the display drawn again (more done than ``seen`` shows), then Ctrl-C: the
    rows at the end and the exit code."""
    window.fg()
    window.until(_later(_done(seen)))
    window.type("C-c")
    code = window.wait()
    return window.rows(), code


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("tmux") is None or shutil.which("bash") is None,
                    reason="needs tmux and bash")  # fmt: skip
async def test_ctrl_z_leaves_the_shell_its_cursor_and_fg_draws_the_display_again(
    tmp_path: Path,
) -> None:
    """Ctrl-Z mid run, in an interactive bash: the run stopped as it was drawn, so the
    shell's prompt came up under a stale bar with the cursor hidden (the display hides it
    while it is drawn), and it stayed hidden in the shell until the run was brought back
    and ended. Now the display is erased and the cursor shown before the run stops, and
    ``fg`` draws the display again and the run goes on to its end."""

    def steps(window: Tmux, sim: Any) -> tuple[list[str], bool, list[str], int]:
        time.sleep(0.5)  # a redraw, had the run not stopped
        stopped, shown = window.rows(), window.cursor_shown()
        return stopped, shown, *_fg_and_ctrl_c(window, stopped)

    stopped, shown, end, code = await _stopped_in_bash(tmp_path, steps)
    assert shown, "\n".join(stopped)
    assert not any("━" in row or "ids/s ·" in row for row in stopped), "\n".join(stopped)
    assert code == 75, "\n".join(end)
    assert "devserver-reaper run summary" in end


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("tmux") is None or shutil.which("bash") is None,
                    reason="needs tmux and bash")  # fmt: skip
async def test_a_run_sent_to_the_background_draws_nothing_over_the_shell(tmp_path: Path) -> None:
    """Ctrl-Z, then ``bg``: the run goes on in the background, and its display was drawn
    again over the shell's prompt five times a second, the cursor hidden. A job in the
    background draws no display: the prompt stays clear, the cursor shown, while the run
    goes on; ``fg`` draws it again."""

    def steps(window: Tmux, sim: Any) -> tuple[list[str], bool, list[str], int]:
        window.type("-l", "bg")
        window.type("Enter")
        window.until(lambda rows: any(row.endswith("&") for row in rows))  # "[1]+ env ... &"
        calls = sim.stats.delete_calls
        while sim.stats.delete_calls < calls + 10:  # going on: 5 redraws or more
            time.sleep(0.05)
        behind, shown = window.rows(), window.cursor_shown()
        return behind, shown, *_fg_and_ctrl_c(window, behind)

    behind, shown, end, code = await _stopped_in_bash(tmp_path, steps)
    after_bg = behind[[i for i, row in enumerate(behind) if row.endswith("&")][-1] :]
    assert not any("━" in row or "ids/s ·" in row for row in after_bg), "\n".join(behind)
    assert shown, "\n".join(behind)
    assert code == 75, "\n".join(end)
    assert "devserver-reaper run summary" in end


@pytest.mark.anyio
async def test_serve_s_stop_line_is_not_written_after_the_echoed_ctrl_c(
    tmp_path: Path, redis_prefix: str
) -> None:
    """Ctrl-C at ``serve`` on a terminal: the terminal echoes ``^C`` at the cursor, and the
    stop's line came after it on that row ("^C12:00:01 SIGINT: stopping..."). The line
    is written over it now."""
    async with run_simulator(SimulatorConfig(jobs=1)) as sim:
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        serve = ["serve", "--redis-url", REDIS_URL, "--stream", f"{redis_prefix}ids",
                 "--consumer", "c1", "--http-port", "0"]  # fmt: skip
        term = Terminal(serve, env, columns=80)
        try:
            await anyio.to_thread.run_sync(lambda: term.expect_on_screen("serving"))
        except BaseException:
            term.process.send_signal(signal.SIGTERM)
            await anyio.to_thread.run_sync(term.wait)
            raise
        term.type(b"\x03")
        code = await anyio.to_thread.run_sync(term.wait)
    rows = term.lines()
    assert code == 0, "\n".join(rows)
    assert "^C" in term.text()  # echoed, and written over
    assert not any("^C" in row for row in rows), "\n".join(rows)
    assert any(re.match(r"\d\d:\d\d:\d\d SIGINT: stopping", row) for row in rows), rows


@pytest.mark.anyio
async def test_events_into_a_closed_pipe_are_said_between_words(tmp_path: Path) -> None:
    """``run ... | head -1``, the pipe closed: the run stops (75) and says why on the
    terminal, stderr. That line went out whole and the terminal cut it mid-word at 80
    columns ("outcom" / "es"); it is broken between words like the rest now."""
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        source = write_ids(tmp_path / "ids.txt", sim.job_ids())
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="json")

        def into_a_closed_pipe() -> tuple[int, Terminal]:
            read, write = os.pipe()
            os.close(read)  # head has read its line and gone
            try:
                term = Terminal(["run", "-i", str(source), "--yes"], env, columns=80,
                                stdout_to=write)  # fmt: skip
            finally:
                os.close(write)
            return term.wait(), term

        code, term = await anyio.to_thread.run_sync(into_a_closed_pipe)
    said = ("the events cannot be written to stdout (Broken pipe); stopping as on SIGTERM: "
            "the calls in flight finish and nothing else records their outcomes")  # fmt: skip
    assert code == 75, term.screen_text()
    assert cut_words(said, term) == [], term.screen_text()
    assert overflowing(term) == [], term.screen_text()


@pytest.mark.anyio
async def test_a_terminal_not_in_utf8_gets_a_display_in_its_own_characters(
    tmp_path: Path,
) -> None:
    """A terminal whose encoding is not UTF-8 (``PYTHONIOENCODING=ascii`` here; a Latin-1
    locale is the same): the bar's characters were written as ``\\u2501`` escapes, ten
    columns each, so the display filled the screen and every redraw left most of it there.
    Now the bar is ASCII and a character the encoding lacks is one ``?``: one display, of
    the terminal's width, gone after the run."""
    async with run_simulator(SimulatorConfig(jobs=4)) as sim:
        source = write_ids(tmp_path / "ids.txt", [*sim.job_ids(), *_unknown_ids(60)])
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto", PYTHONIOENCODING="ascii")
        args = ["run", "-i", str(source), "--yes", "--rate", "20", "--batch-size", "2"]

        def drawn() -> tuple[int, Terminal, list[str]]:
            term = Terminal(args, env, columns=80, rows=24)
            term.expect(" / 64 ")
            time.sleep(1)  # a few redraws
            mid = term.lines()
            return term.wait(), term, mid

        code, term, mid = await anyio.to_thread.run_sync(drawn)
    assert code == 0, term.screen_text()
    assert len([row for row in mid if " / 64 " in row]) == 1, "\n".join(mid)
    assert not any("\\u25" in row for row in mid), "\n".join(mid)
    assert not any("\\u25" in row or " / 64 " in row for row in term.lines()), term.screen_text()


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
async def test_a_window_lower_than_the_display_keeps_no_copies_of_it(tmp_path: Path) -> None:
    """A window one row high, the display two (its bar, its outcomes): a redraw went back
    up one row from the top, which stays the top, so every redraw pushed a copy of the bar
    into the scrollback, five a second. The display is cut to the rows there are."""
    async with run_simulator(SimulatorConfig(jobs=4)) as sim:
        write_ids(tmp_path / "ids.txt", [*sim.job_ids(), *_unknown_ids(40)])
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        args = ["run", "-i", "ids.txt", "--yes", "--rate", "10", "--batch-size", "2"]

        def low() -> tuple[list[str], int]:
            window = Tmux(args, env, columns=80, rows=1, cwd=str(tmp_path))
            try:
                code = window.wait()
                return window.rows(), code
            finally:
                window.close()

        seen, code = await anyio.to_thread.run_sync(low)
    assert code == 0, "\n".join(seen)
    assert "devserver-reaper run summary" in seen
    assert not any("ids/s ·" in row for row in seen), "\n".join(seen)


@pytest.mark.anyio
async def test_a_line_of_cjk_is_broken_between_words_at_its_width_in_columns(
    tmp_path: Path,
) -> None:
    """A rejected line of CJK, 62 characters and 110 columns: broken by its ``len`` it
    fitted 80 and was left whole, and the terminal cut it, the rest at column 0 under the
    label. It is broken between words by its columns now, the rest under its value."""
    words = ["管理者ジョブ削除対象の名前です"] * 3 + ["管理者ジョブ削除対象"]
    async with run_simulator(SimulatorConfig(jobs=1)) as sim:
        source = write_ids(tmp_path / "ids.txt", [" ".join(words), *sim.job_ids()])
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        code, term = await _run_at_80(source, env)
    assert code == 1, term.screen_text()
    rows = term.lines()
    first = next(n for n, row in enumerate(rows) if row.startswith("rejected  line 1: "))
    assert rows[first + 1].startswith(" " * 10 + words[0]), term.screen_text()
    assert cut_words(" ".join(words), term) == [], term.screen_text()
