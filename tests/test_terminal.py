"""People at a terminal: `run` asks before deleting, shows progress, explains a stop, and
sums up; each on a real pseudo-terminal, read back as a screen (``tests/tty.py``)."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import re
import select
import shlex
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, cast

import anyio
import orjson
import pytest
import structlog

from tests.conftest import REDIS_URL
from tests.e2e import deletes_sent, reaper, reaper_env, until, write_ids
from tests.tty import Terminal
from worker.outcomes.journal import Tally
from worker.simulator import FaultConfig, Simulator, SimulatorConfig, run_simulator
from worker.terminal.lines import EventLines
from worker.terminal.output import display_on
from worker.terminal.progress import Progress, Snapshot, count_lines
from worker.terminal.prompt import Proposal, tally
from worker.terminal.screen import PlainScreen, progress_view
from worker.terminal.summary import RunEnd, command_line
from worker.terminal.waiting import status_while

PROMPT = "to delete them: "


@asynccontextmanager
async def _project(
    tmp_path: Path, jobs: int, *more_lines: str, **env: str
) -> AsyncIterator[tuple[Simulator, Path, dict[str, str]]]:
    """A simulated project of ``jobs`` jobs, a file of their ids (and ``more_lines``), and
    the environment that points the CLI at it, rendering for people."""
    async with run_simulator(SimulatorConfig(jobs=jobs)) as sim:
        src = write_ids(tmp_path / "ids.txt", [*sim.job_ids(), *more_lines])
        yield sim, src, reaper_env(sim.url, REAPER_LOG_FORMAT="auto", **env)


def _answer(args: list[str], env: dict[str, str], keys: bytes) -> tuple[int, Terminal]:
    """Run ``run ARGS`` on a terminal, wait for the prompt, type ``keys``."""
    term = Terminal(["run", *args], env)
    term.expect(PROMPT)
    term.type(keys)
    return term.wait(), term


def _after_prompt(term: Terminal) -> list[str]:
    lines = term.lines()
    asked = next(n for n, line in enumerate(lines) if PROMPT.strip() in line)
    return [line for line in lines[asked + 1 :] if line]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("keys", "code", "said"),
    [
        (b"yes\n", 0, None),
        (
            b"no\n",
            64,
            "devserver-reaper run: not confirmed: nothing was sent (the prompt asks "
            "for 'yes' exactly)",
        ),
        (
            b"y\n",
            64,
            "devserver-reaper run: not confirmed: nothing was sent (the prompt asks "
            "for 'yes' exactly)",
        ),
        (b"\n", 64, "devserver-reaper run: not confirmed: nothing was sent"),
        (b"\x03", 75, "interrupted at the prompt: nothing was sent"),
    ],
    ids=["yes", "no", "y-is-not-yes", "empty", "ctrl-c"],
)
async def test_the_prompt_accepts_exactly_yes_and_says_once_that_nothing_was_sent(
    tmp_path: Path, keys: bytes, code: int, said: str | None
) -> None:
    async with _project(tmp_path, 12) as (sim, src, env):
        returned, term = await anyio.to_thread.run_sync(
            lambda: _answer(["-i", str(src)], env, keys)
        )
        assert returned == code, term.screen_text()
        assert len(sim.deleted) == (12 if code == 0 else 0)
    lines = term.lines()
    assert lines[0] == f"About to delete up to 12 jobs from {src}"
    assert "  project     demo-project" in lines
    assert f"  endpoint    {sim.url}" in lines
    assert "  protected   nothing (no rule)" in lines
    assert "  duration    about a second at 10 calls/s" in lines
    after = _after_prompt(term)
    if said is None:
        assert "devserver-reaper run summary" in after
    else:
        assert after == [said]  # one line, not an event and a line


@pytest.mark.anyio
@pytest.mark.parametrize("before", ["all-done", "plan-all-done", "some-done", "dry-run"])
async def test_a_ledger_holding_every_id_done_asks_nothing_and_sends_nothing(
    tmp_path: Path, before: str
) -> None:
    """Run again over a ledger holding all 5 ids of the input done, the prompt asked to
    delete "up to 5 jobs from ids.txt, less those done already": a yes to nothing. It says
    so, asks nothing, and the run goes on as with --yes to its summary's "nothing to do".
    Where one id is not done (a run of part of the input, a dry run's skips) it asks as
    ever. ``no`` is typed if it asks (64)."""
    async with _project(tmp_path, 5) as (sim, src, env):
        ledger = tmp_path / "run.db"
        ids = sim.job_ids()
        if before.startswith("plan"):
            planned = await reaper(["discover", "--all", "--plan", str(tmp_path / "p.json")],
                                   reaper_env(sim.url))  # fmt: skip
            assert planned.code == 0, planned.stderr
            src = tmp_path / "p.json"
        source = ["--plan" if before.startswith("plan") else "-i", str(src)]
        first = {"all-done": [*source, "--yes"], "plan-all-done": [*source, "--yes"],
                 "some-done": ["-i", str(write_ids(tmp_path / "part.txt", ids[:3])), "--yes"],
                 "dry-run": ["-i", str(src), "--dry-run"]}[before]  # fmt: skip
        done = await reaper(["run", *first, "--ledger", str(ledger)], reaper_env(sim.url))
        assert done.code == 0, done.stderr
        left = len(sim.job_ids())

        def again() -> tuple[int, Terminal]:
            term = Terminal(["run", *source, "--ledger", str(ledger)], env, columns=300)
            term.answer_if_asked(PROMPT, b"no\n")
            return term.wait(), term

        code, term = await anyio.to_thread.run_sync(again)
        assert len(sim.job_ids()) == left  # nothing sent either way
    lines = [line for line in term.lines() if line]
    if before.startswith("plan"):  # discover wrote it with no plan key: said first
        assert lines.pop(0).startswith(f"warning: plan {src} is sealed with no plan key: ")
    if before.endswith("all-done"):
        assert code == 0, term.screen_text()
        assert lines[0] == (
            f"nothing to ask: the ledger {ledger} holds every id of {src} done already, so "
            "none will be sent"
        )
        assert lines[-1] == "nothing to do: the ledger holds the input's 5 ids done already"
        assert not any("About to delete" in line for line in lines)
    else:
        assert code == 64, term.screen_text()
        resumed = ", less those done already (ledger, below)" * (before == "some-done")
        assert lines[0] == f"About to delete up to 5 jobs from {src}{resumed}"


# ``python -m worker`` that counts the ledger's opens to read (``open_readonly``'s ``mode=``
# URIs: the run's own connection names the file bare) into the file ``argv[1]`` at exit.
_COUNTING_READS = (
    "import atexit, runpy, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
    "out, reads = sys.argv.pop(1), []; "
    "sys.addaudithook(lambda event, args: event == 'sqlite3.connect' "
    "and 'mode=r' in str(args[0]) and reads.append(1)); "
    "atexit.register(lambda: open(out, 'w').write(str(len(reads)))); "
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)"
)


@pytest.mark.anyio
@pytest.mark.parametrize("done", [True, False], ids=["all-done", "some-left"])
async def test_the_prompt_reads_the_ledger_once(tmp_path: Path, done: bool) -> None:
    """What the prompt shows of the ledger (``already done``) and whether it need ask at all
    (every id done) came from two reads of it, each counting its every id: one now."""
    async with _project(tmp_path, 5) as (sim, src, env):
        ledger, reads = tmp_path / "run.db", tmp_path / "reads"
        first = src if done else write_ids(tmp_path / "part.txt", sim.job_ids()[:3])
        ran = await reaper(["run", "-i", str(first), "--yes", "--ledger", str(ledger)],
                           reaper_env(sim.url))  # fmt: skip
        assert ran.code == 0, ran.stderr

        def again() -> int:
            term = Terminal([str(reads), "run", "-i", str(src), "--ledger", str(ledger)], env,
                            program=(sys.executable, "-c", _COUNTING_READS))  # fmt: skip
            term.answer_if_asked(PROMPT, b"no\n")
            return term.wait()

        code = await anyio.to_thread.run_sync(again)
    assert code == (0 if done else 64)
    assert reads.read_text() == "1"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("pipe", "asked"), [("fifo", False), ("fifo", True), ("process-substitution", True)]
)
async def test_a_pipe_is_read_by_the_run_alone_not_by_its_checks_before(
    tmp_path: Path, pipe: str, asked: bool
) -> None:
    """A named pipe (``mkfifo ids; cat ids.txt > ids &``) as ``--input``: the input check
    before any call opened it and closed it, which took its writer's ids, and the run then
    waited for ever on a pipe with no writer left. Only the run opens a pipe now. Asked (a
    pipe's count unknown: the project id), the ids are then deleted, as with ``--yes``."""
    async with _project(tmp_path, 4) as (sim, src, env):
        fifo, reaper_cli = tmp_path / "ids.fifo", f"{shlex.quote(sys.executable)} -m worker"
        os.mkfifo(fifo)
        yes = "" if asked else " --yes"
        line = {  # for the FIFO, bash starts its one writer, then becomes the reaper
            "process-substitution": f"{reaper_cli} run -i <(cat {src}){yes}",
            "fifo": f"cat {src} > {fifo} & exec {reaper_cli} run -i {fifo}{yes}",
        }[pipe]

        def go() -> tuple[int, Terminal]:
            term = Terminal([line], env, columns=300, program=["bash", "-c"])
            try:
                if asked:
                    term.expect(PROMPT)
                    term.type(b"demo-project\n")
                return term.wait(timeout=60), term
            finally:
                if term.process.poll() is None:  # the old code's wait on the FIFO
                    term.process.kill()

        code, term = await anyio.to_thread.run_sync(go)
        left = sim.job_ids()
    lines = term.lines()
    assert (code, left) == (0, []), term.screen_text()
    assert any(re.fullmatch(r"\s*deleted\s+4", line) for line in lines), term.screen_text()


def _holds(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (its ``/proc`` file descriptors)."""
    wanted = os.stat(path)
    with suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with suppress(OSError):
                held = os.stat(f"/proc/{pid}/fd/{fd}")
                if (held.st_dev, held.st_ino) == (wanted.st_dev, wanted.st_ino):
                    return True
    return False


@pytest.mark.anyio
async def test_a_named_pipe_read_again_does_not_ask_nothing_while_ids_are_sent(
    tmp_path: Path,
) -> None:
    """A ledger holding every id of the input done asks nothing (74240d6), the input read
    once more to know it. A named pipe gives each open what its writer writes then: the
    input check's open and the ledger's look got the 5 ids done, the run's own the 3 new
    too. It said "nothing to ask ... none will be sent", and deleted the 3 jobs unasked.
    A pipe is read by the run alone now: the prompt asks, and "no" sends nothing."""
    async with _project(tmp_path, 8) as (sim, _, env):
        ids, ledger = sim.job_ids(), tmp_path / "run.db"
        done = write_ids(tmp_path / "done.txt", ids[:5])
        first = await reaper(["run", "-i", str(done), "--yes", "--ledger", str(ledger)],
                             reaper_env(sim.url))  # fmt: skip
        assert first.code == 0, first.stderr
        fifo = tmp_path / "ids.fifo"
        os.mkfifo(fifo)
        stop = threading.Event()

        def writer(pid: int) -> None:
            """One writing per open of the FIFO: the 5 done ids for the first 2, then all 8.
            A reader woken by the open may take a while to hold the FIFO: the writing waits
            until it does (or is gone: POLLERR), then, closed, until it lets go, or that
            reader would read on into the next writing."""
            opened = 0
            while not stop.is_set():
                with suppress(BrokenPipeError), open(fifo, "wb", buffering=0) as out:
                    opened += 1
                    if stop.is_set():
                        break
                    out.write("".join(f"{i}\n" for i in ids[: 5 if opened <= 2 else 8])
                              .encode())  # fmt: skip
                    gone = select.poll()
                    gone.register(out, select.POLLERR)
                    while not _holds(pid, fifo) and not gone.poll(5) and not stop.is_set():
                        pass
                while _holds(pid, fifo) and not stop.is_set():
                    time.sleep(0.005)  # no event says that another process closed a file

        def again() -> tuple[int, Terminal]:
            term = Terminal(["run", "-i", str(fifo), "--ledger", str(ledger)], env, columns=300)
            feeding = threading.Thread(target=writer, args=(term.process.pid,), daemon=True)
            feeding.start()
            try:
                term.answer_if_asked(PROMPT, b"no\n")
                return term.wait(timeout=60), term
            finally:
                if term.process.poll() is None:
                    term.process.kill()
                stop.set()
                release = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the writer's open returns
                feeding.join(timeout=10)
                os.close(release)

        code, term = await anyio.to_thread.run_sync(again)
        left = len(sim.job_ids())
    assert (code, left) == (64, 3), term.screen_text()  # asked; "no": nothing sent
    assert not any("nothing to ask" in line for line in term.lines())


@pytest.mark.anyio
async def test_sigterm_at_the_prompt_says_once_that_nothing_was_sent(tmp_path: Path) -> None:
    """A `kill` of the process waiting at the prompt ended it 75 with nothing said, the
    prompt's line left unfinished: it now ends as Ctrl-C does, with one line."""

    def stopped(src: Path, env: dict[str, str]) -> tuple[int, Terminal]:
        term = Terminal(["run", "-i", str(src)], env)
        term.expect(PROMPT)
        term.process.send_signal(signal.SIGTERM)
        return term.wait(), term

    async with _project(tmp_path, 5) as (sim, src, env):
        returned, term = await anyio.to_thread.run_sync(lambda: stopped(src, env))
        assert returned == 75, term.screen_text()
        assert sim.deleted == set()
    assert _after_prompt(term) == ["stopped by SIGTERM at the prompt: nothing was sent"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("allowed", "said"),
    [
        ("", "  project     demo-project, and any project a line names"),
        ("demo-project,south", "  project     demo-project, and south where a line names it"),
        ("demo-project", "  project     demo-project"),
    ],
    ids=["any", "listed", "only-the-default"],
)
async def test_the_prompt_says_a_line_of_json_may_send_ids_to_another_project(
    tmp_path: Path, allowed: str, said: str
) -> None:
    """The prompt named only the settings' project while a JSON Lines input's lines may
    each name another one, where its ids would be deleted: the person confirming was not
    told. A file of bare ids cannot name one, and its prompt is unchanged (above)."""
    # Any project: the setting left out (an empty REAPER_* variable exits 78).
    listed = {"REAPER_ALLOWED_PROJECTS": allowed} if allowed else {}
    async with _project(tmp_path, 3, **listed) as (sim, _, env):
        lines = [orjson.dumps({"id": job}).decode() for job in sim.job_ids()]
        named = tmp_path / "ids.jsonl"
        named.write_text("\n".join(lines) + "\n")
        returned, term = await anyio.to_thread.run_sync(
            lambda: _answer(["-i", str(named)], env, b"no\n")
        )
        assert returned == 64 and not sim.deleted
    assert said in term.lines()


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["plan.json", "plan.jsonl", "plan.txt"])
async def test_the_prompt_for_a_plan_of_one_project_names_that_project_alone(
    tmp_path: Path, name: str
) -> None:
    """A one-project plan named ``*.json`` or ``*.jsonl`` was asked about as an input whose
    lines may name projects ("demo-project, and any project a line names"): a plan has no
    lines, and applies to its own project only."""
    async with _project(tmp_path, 3) as (sim, _, env):
        plan = tmp_path / name
        planned = await reaper(["discover", "--all", "--plan", str(plan)], reaper_env(sim.url))
        assert planned.code == 0, planned.stderr
        returned, term = await anyio.to_thread.run_sync(
            lambda: _answer(["--plan", str(plan)], env, b"no\n")
        )
        assert returned == 64 and not sim.deleted
    assert f"About to delete 3 jobs from {plan}" in term.lines()
    assert [line for line in term.lines() if line.startswith("  project ")] == [
        "  project     demo-project"
    ]


async def _yes_is_refused(src: Path, env: dict[str, str], sim: Any) -> Terminal:
    """``run -i src`` answered ``yes`` where the prompt asks for the project id: refused
    (64) and nothing deleted. The terminal, for what the prompt said."""
    refused, term = await anyio.to_thread.run_sync(lambda: _answer(["-i", str(src)], env, b"yes\n"))
    assert refused == 64
    assert len(sim.deleted) == 0
    return term


@pytest.mark.anyio
async def test_a_last_line_with_no_line_break_is_counted_by_the_prompt(tmp_path: Path) -> None:
    """A file of 3 ids whose last has no line break after it (``printf``, an editor, an
    export) was counted 2 by its line breaks: the prompt said "up to 2 jobs", asked for
    ``yes`` under ``confirm_project_over`` 2, and 3 jobs went. Now it says 3 and asks for
    the project id: ``yes`` is a no."""
    async with _project(tmp_path, 3, REAPER_CONFIRM_PROJECT_OVER="2") as (sim, src, env):
        src.write_text("\n".join(sim.job_ids()))
        term = await _yes_is_refused(src, env, sim)
    assert any(f"About to delete up to 3 jobs from {src}" in line for line in term.lines())


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["json", "gzip"])
async def test_a_json_array_or_gzip_is_not_announced_by_its_lines(
    tmp_path: Path, kind: str
) -> None:
    """A JSON array of ids written on one line was counted as one line, and a gzip file
    named ``ids.txt`` (the reader finds gzip by its first bytes) by the line breaks of its
    compressed bytes: the prompt said "up to 1 job" (or 0), asked for ``yes``, and every id
    went. Their count is unknown without reading them, so the prompt says so and asks for
    the project id, as for stdin."""
    async with _project(tmp_path, 3) as (sim, _, env):
        if kind == "json":
            array = tmp_path / "ids.json"
            array.write_bytes(orjson.dumps(sim.job_ids()))
        else:
            array = tmp_path / "packed.txt"
            array.write_bytes(gzip.compress("\n".join(sim.job_ids()).encode() + b"\n"))
        term = await _yes_is_refused(array, env, sim)
    assert any(f"About to delete the jobs listed in {array}" in line for line in term.lines())


@pytest.mark.anyio
async def test_ids_from_a_pipe_are_deleted_not_counted_away(tmp_path: Path) -> None:
    """``run -i <(cat ids.txt) --yes`` on a terminal: the progress display counted the
    input's lines first, which read the pipe to its end, and the run found nothing left
    ("nothing to do: the input gave no ids", exit 0, every job still there). A pipe can be
    read once: it is not counted, and its ids are deleted."""
    async with _project(tmp_path, 5) as (sim, src, env):
        shell = f"exec {shlex.quote(sys.executable)} -m worker run -i <(cat {src}) --yes"
        term = Terminal([], env, program=["bash", "-c", shell])
        code = await anyio.to_thread.run_sync(term.wait)
        assert code == 0, term.lines()
        assert len(sim.deleted) == 5
    assert not any("nothing to do" in line for line in term.lines())


@pytest.mark.anyio
async def test_a_pipe_over_a_finished_ledger_is_asked_about_not_read_away(tmp_path: Path) -> None:
    """A ledger whose every id is done, and new ids from ``<(cat ids.txt)``: before asking,
    the prompt looked at the input's first ids to see whether the ledger held them all,
    which read the pipe away from the run. The person typed the project id and the run
    said "nothing to do" (exit 0, every job still there). A pipe is not looked at: asked,
    and its ids deleted."""
    async with _project(tmp_path, 7) as (sim, _, env):
        ledger, ids = tmp_path / "reaper.db", sim.job_ids()
        first = write_ids(tmp_path / "first.txt", ids[:2])
        done = await reaper(["run", "-i", str(first), "--yes", "--ledger", str(ledger)], env)
        assert done.code == 0, done.stderr
        rest = write_ids(tmp_path / "rest.txt", ids[2:])
        shell = (
            f"exec {shlex.quote(sys.executable)} -m worker run -i <(cat {rest}) --ledger {ledger}"
        )
        term = Terminal([], env, program=["bash", "-c", shell])
        term.expect(PROMPT)
        term.type(b"demo-project\n")
        code = await anyio.to_thread.run_sync(term.wait)
        assert code == 0, term.lines()
        assert len(sim.deleted) == 7, "\n".join(term.lines())


@pytest.mark.anyio
async def test_a_terminal_that_goes_away_stops_the_run_with_every_deletion_recorded(
    tmp_path: Path,
) -> None:
    """An ssh session dropped under a run: SIGHUP killed it outright (its calls in flight
    recorded nowhere), and once SIGHUP stopped it as SIGTERM does, the progress display's
    next write to the gone terminal (EIO) ended it with a traceback and exit 1. Now it stops
    (75) and every job the API deleted has its line in --results."""
    config = SimulatorConfig(jobs=2000, faults=FaultConfig(latency_ms=30.0, latency_jitter=False))
    async with run_simulator(config) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        out = tmp_path / "results.jsonl"
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        term = Terminal(
            ["run", "-i", str(src), "--yes", "--results", str(out), "--batch-size", "10",
             "--concurrency", "2", "--rate", "1000"],
            env,
        )  # fmt: skip
        await until(deletes_sent(sim, 3))
        code = await anyio.to_thread.run_sync(term.hang_up)
        assert code == 75
        rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
        assert {row["job_id"] for row in rows if row["outcome"] == "deleted"} == sim.deleted
        assert 0 < len(sim.deleted) < 2000


@pytest.mark.anyio
async def test_above_the_threshold_the_project_id_must_be_typed(tmp_path: Path) -> None:
    async with _project(tmp_path, 12, REAPER_CONFIRM_PROJECT_OVER="5") as (sim, src, env):
        refused, term = await anyio.to_thread.run_sync(
            lambda: _answer(["-i", str(src)], env, b"yes\n")
        )
        assert refused == 64
        asked = "This cannot be undone. Type the project id (demo-project) to delete them: yes"
        assert asked in term.lines()
        assert len(sim.deleted) == 0
        accepted, _ = await anyio.to_thread.run_sync(
            lambda: _answer(["-i", str(src)], env, b"demo-project\n")
        )
        assert accepted == 0
        assert len(sim.deleted) == 12


def test_a_plans_proposal_counts_by_type_and_status_and_estimates_the_time() -> None:
    proposal = Proposal(
        source="plan.txt", project="p-1", endpoint="https://e", count=3000, exact=True,
        by_type=tally(["COMMON"] * 2000 + ["ASCEND_DIAGNOSIS"] * 1000),
        by_status=tally(["FINISHED"] * 3000), protection=("name prod-*", "status PROCESSING"),
        already_done=40, rechecked=True, batch_size=50, rate=10.0,
    )  # fmt: skip
    assert proposal.lines() == [
        "About to delete up to 3,000 jobs from plan.txt, less those done already (ledger, below)",
        "  project     p-1",
        "  endpoint    https://e",
        "  by type     COMMON 2,000, ASCEND_DIAGNOSIS 1,000",
        "  by status   FINISHED 3,000",
        "  protected   name prod-*; status PROCESSING",
        "  ledger      40 ids already done there (resuming): those are not sent again",
        "  duration    about 7 s at 10 calls/s (with each job re-read on a listing page first)",
    ]  # the 2,960 jobs the ledger does not hold done: 60 DELETEs and 6 pages of 500 to list
    # them, as plan show estimates it (a read of each job, 5 min, was 6 times what a run took)
    capped = Proposal(source="ids.txt", project="p", endpoint="e", count=None, cap=7, rate="auto")
    assert capped.lines()[0] == "About to delete up to 7 jobs from ids.txt"
    assert capped.lines()[-1] == "  duration    unknown yet: --rate auto finds the quota as it goes"
    assert "  cap         at most 7 sent, in this run (--max-deletions)" in capped.lines()
    # With --ledger the cap is on every run on it: "this run" said more than a resume may send.
    resumed = dataclasses.replace(capped, ledger=True).lines()
    cap = "  cap         at most 7 sent, in every run on this ledger together (--max-deletions)"
    assert cap in resumed


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
    tally.already_done, tally.repeated = 85, 2  # counted in done: said beside the outcomes
    assert progress.snapshot().outcomes() == (
        "deleted 200  absent 50  already done 85  repeated 2 · retries 3"
    )
    slow = Tally()
    progress = Progress(slow, total=1000, clock=lambda: now[0])
    slow.outcomes["deleted"] += 250
    now[0] += 250 / 0.05  # a slow run: the ETA reads in minutes and hours
    assert "ETA 4h10m" in progress.snapshot().figures()


def test_the_rate_and_eta_are_those_of_the_last_seconds_not_of_ids_settled_at_once() -> None:
    """240 ids skipped at once (the cap reached), then one id a second: the display said
    13 ids/s and "ETA 3s" for 40 s (the average since the start)."""
    now = [0.0]
    tally = Tally()
    progress = Progress(tally, total=300, clock=lambda: now[0])
    tally.outcomes["skipped"] += 240
    for second in range(1, 21):
        now[0] = float(second)
        tally.outcomes["absent"] += 1
        snap = progress.snapshot()
    assert snap.figures() == "260 / 300 · 1 ids/s · ETA 40s"


@pytest.mark.parametrize("width", [40, 120])
def test_a_narrow_terminal_shows_the_figures_whole(width: int) -> None:
    """At 40 columns the bar took 10 of them and the figures were cut: ``ETA 3m…``."""
    from rich.console import Console

    snap = Snapshot(25, 300, 2.0, 184.0, (("deleted", 25),), 0)
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(progress_view(snap, width))
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "8% 25 / 300 · 2 ids/s · ETA 3m04s\n" in shown and "deleted 25" in shown
    assert ("━" in shown) == (width == 120) and "…" not in shown


def test_count_lines_knows_plain_files_only(tmp_path: Path) -> None:
    plain = write_ids(tmp_path / "ids.txt", ["a", "b", "c"])
    assert count_lines(str(plain)) == 3
    (tmp_path / "open.txt").write_text("a\nb")
    assert count_lines(str(tmp_path / "open.txt")) == 2
    (tmp_path / "empty.txt").write_text("")
    assert count_lines(str(tmp_path / "empty.txt")) == 0
    assert count_lines(str(tmp_path / "ids.json")) is None  # elements, not lines
    assert count_lines(str(plain), "json") is None
    os.mkfifo(tmp_path / "pipe")
    assert count_lines(str(tmp_path / "pipe")) is None  # not opened: no writer waited on
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
    async with _project(tmp_path, 2000, "not a job id!") as (sim, src, env):
        ids = sim.job_ids()
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
    async with _project(tmp_path, 30) as (sim, src, env):
        ids = sim.job_ids()
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
async def test_a_dry_run_of_ids_says_on_each_line_which_rules_it_did_not_check(
    tmp_path: Path,
) -> None:
    """``--dry-run -v`` of ids under ``--protect 'prod-*'`` and a protected status: it reads
    no job, so it cannot know which of them those rules protect. Each line said "DRY-RUN
    delete ID" all the same, where the summary says "at most"; now each says the rules it
    did not check. The id rule it did check skips its id, and says so."""
    async with _project(tmp_path, 4) as (sim, src, env):
        ids = sim.job_ids()
        args = ["-i", str(src), "--dry-run", "-v", "--protect", f"prod-*,id:{ids[0]}",
                "--protected-statuses", "RUNNING"]  # fmt: skip
        _, term = await anyio.to_thread.run_sync(lambda: _run_on_a_pty(args, env, columns=200))
    lines = term.lines()
    unless = "  (unless the name and status rules protect it: not checked)"
    assert [line for line in lines if line.startswith("DRY-RUN")] == [
        f"DRY-RUN delete {job_id}{unless}" for job_id in ids[1:]
    ]
    assert f"skipped   {ids[0]}  (protected)" in lines


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


@pytest.mark.anyio
async def test_ctrl_c_explains_itself_and_the_summary_prints_the_command_that_resumes(
    tmp_path: Path,
) -> None:
    """A first Ctrl-C says what the stop waits for; the summary says how much of the input
    is left and the exact command to finish it, which then finishes it."""
    async with _project(tmp_path, 600) as (sim, src, env):
        ledger = tmp_path / "reaper.db"
        args = ["run", "-i", str(src), "--yes", "--ledger", str(ledger), "--rate", "2",
                "--batch-size", "10", "--burst", "1"]  # fmt: skip

        def interrupted() -> tuple[int, Terminal]:
            term = Terminal(args, env, columns=400)  # the command on one line, to compare
            term.expect("ids/s")  # the run is under way
            term.type(b"\x03")
            return term.wait(), term

        code, term = await anyio.to_thread.run_sync(interrupted)
        assert code == 75, term.screen_text()
        deleted_first = len(sim.deleted)
        lines = [line for line in term.lines() if line]
        assert re.fullmatch(
            r"Ctrl-C: stopping; (finishing \d calls? in flight \(up to 20 s\)|no call in "
            r"flight); Ctrl-C again to stop now",
            lines[0],
        ), lines
        left = 600 - deleted_first
        assert f"stopped with work left: up to {left:,} ids of the input are not done" in lines
        resume = next(line for line in lines if line.startswith("resume: "))
        assert resume == "resume: devserver-reaper " + shlex.join(args)
        again = await anyio.to_thread.run_sync(
            lambda: _run_on_a_pty([*args[1:6], "--rate", "1000"], env)
        )
        assert again[0] == 0, again[1].screen_text()
        assert len(sim.deleted) == 600


@pytest.mark.parametrize(
    ("why", "said"),
    [("Ctrl-C", "Ctrl-C: stopping; no call in flight; Ctrl-C again to stop now"),
     ("SIGTERM", "SIGTERM: stopping; no call in flight; Ctrl-C to stop now"),
     ("deadline of 60 s reached",
      "deadline of 60 s reached: stopping; no call in flight; Ctrl-C to stop now")],
)  # fmt: skip
def test_a_stop_not_by_ctrl_c_does_not_say_ctrl_c_again(why: str, said: str) -> None:
    """A ``kill`` or the deadline said "Ctrl-C again to stop now" of a Ctrl-C never typed."""
    from worker.commands.run import _say_stopping

    lines: list[str] = []

    class Said:
        def say(self, text: str, color: str) -> None:
            lines.append(text)

    idle = dataclasses.make_dataclass("Idle", [("count", int)])(0)
    _say_stopping(cast(Any, Said()), idle, 20.0, why, False)
    assert lines == [said]


@pytest.mark.parametrize(
    ("typed", "shown"),
    [
        (["--redis-url", "redis://:hunter2@redis:6379/0"], "--redis-url redis://:...@redis:6379/0"),
        (["--redis-url=rediss://app:hunter2@redis/1"], "--redis-url=rediss://app:...@redis/1"),
        (["--redis-url", "redis://redis/0?password=hunter2&db=2"],
         "--redis-url 'redis://redis/0?password=...&db=2'"),
        (["--yes", "--sk", "hunter2", "--ak=hunter2"], "--yes --sk ... --ak=..."),
    ],
)  # fmt: skip
def test_the_command_that_resumes_never_shows_a_password_or_key(
    typed: list[str], shown: str
) -> None:
    """The summary's ``resume:`` line is the command as typed, but a Redis URL's password
    (which the run warns about on the command line) is ``...`` as a key is."""
    fields = {"duration_s": 1.0, "ids_per_s": 1.0, "exit_code": 75, "open": 3}
    args = ["run", "-i", "ids.txt", *typed]
    text = RunEnd(fields, total=9, command=command_line(args), ledger=True).text()
    assert "hunter2" not in text
    assert f"resume: devserver-reaper run -i ids.txt {shown}" in text.splitlines()


@pytest.mark.anyio
async def test_ids_typed_at_the_terminal_are_asked_for_and_never_drawn_over(
    tmp_path: Path,
) -> None:
    """``run -i -`` with the terminal as stdin: the progress display was drawn over the
    ids being typed, and nothing said to type them; without ``--yes`` the refusal said
    "not on a terminal" to a person at one."""
    async with _project(tmp_path, 3) as (sim, _, env):
        job = sim.job_ids()[0]

        def typed() -> tuple[int, Terminal]:
            term = Terminal(["run", "-i", "-", "--dry-run"], env)
            term.expect("Ctrl-D ends them")
            term.type(f"{job}\nnot an id!\n".encode())
            term.expect_on_screen("not an id!")
            term.type(b"\x04")
            return term.wait(), term

        code, term = await anyio.to_thread.run_sync(typed)
        refused, asked = await anyio.to_thread.run_sync(
            lambda: _run_on_a_pty(["-i", "-"], env, columns=300)
        )
    assert code == 1, term.screen_text()  # the line that is not an id is rejected
    lines = [line for line in term.lines() if line]
    assert lines[:3] == ["reading ids from the terminal, one a line; Ctrl-D ends them", job,
                         "not an id!"], lines  # fmt: skip
    assert "━" not in term.text() and "ids/s" not in term.text()
    assert "  would delete            1" in lines
    assert lines[-1] == "dry run: nothing was sent; a real run would delete up to 1 job"
    assert refused == 64
    assert [line for line in asked.lines() if line] == [
        "devserver-reaper run: refusing to delete without confirmation: --input - reads the "
        "ids from the terminal, so the prompt cannot ask there; pass --yes, or try --dry-run "
        "first"
    ]


@pytest.mark.anyio
async def test_a_dry_run_says_what_it_would_delete_not_what_it_skipped(tmp_path: Path) -> None:
    """... and why the others were skipped (a skip may be work left undone: the cap)."""
    async with _project(tmp_path, 40) as (sim, src, env):
        args = ["-i", str(src), "--dry-run", "--protect", f"id:{sim.job_ids()[0]}"]
        code, term = await anyio.to_thread.run_sync(lambda: _run_on_a_pty(args, env))
    assert code == 0
    lines = [line for line in term.lines() if line]
    assert lines[1:3] == [
        "  would delete           39",
        "  skipped                 1  (protected 1)",
    ]
    assert not any("ids/s" in line for line in lines)
    assert lines[-1] == "dry run: nothing was sent; a real run would delete up to 39 jobs"


@pytest.mark.anyio
async def test_a_dry_run_of_ids_says_its_count_is_at_most_when_rules_need_the_jobs(
    tmp_path: Path,
) -> None:
    """``--protect 'prod-*' --protected-statuses PROCESSING`` in a dry run of ids, which
    reads no job: the screen said "would delete 41" and "a real run would delete up to 41
    jobs" as if the rules had been applied; the real run keeps prod-db. It now says, at the
    start and where the count is, that those rules were not checked."""
    async with _project(tmp_path, 40) as (sim, src, env):
        sim.add_jobs(1, name="prod-db", status="FINISHED")
        write_ids(src, sim.job_ids())
        args = ["-i", str(src), "--dry-run", "--protect", "prod-*",
                "--protected-statuses", "PROCESSING"]  # fmt: skip
        code, term = await anyio.to_thread.run_sync(lambda: _run_on_a_pty(args, env))
        assert sim.stats.calls == 0
    assert code == 0, term.screen_text()
    lines = [line for line in term.lines() if line]
    assert lines[:2] == [
        "devserver-reaper run: a dry run of ids reads no job, so the name and status rules "
        "are not checked:",
        "  would delete counts the jobs they protect too; a run, or a plan's dry run, reads "
        "each job and checks them",
    ], lines[:3]
    assert "  would delete           41  (at most: name, status rules not checked)" in lines
    assert lines[-2:] == [
        "dry run: nothing was sent; a real run would delete up to 41 jobs, less those the "
        "name and status rules protect:",
        "  a dry run of ids reads no job, so it checks id rules alone; a run, or a plan's "
        "dry run, reads the jobs for the rest",
    ], lines[-3:]


@pytest.mark.parametrize(
    ("deleted", "hours", "shown"), [(1, 1, "<0.01"), (3, 2, "<0.01"), (90, 0.01, "2.5")]
)
def test_a_run_slower_than_one_id_in_2000_s_shows_its_rate_not_zero(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, deleted: int, hours: float, shown: str
) -> None:
    """run.summary rounded ``ids_per_s`` to three decimals before the summary showed it: a
    run of one id an hour (a long throttle, a slow gateway) was ``0.0`` in the event and
    ``0 ids/s`` on the screen, as if it had done nothing. The run's own summary, with its
    duration given (no wall clock), on a terminal's display and in the event."""
    from worker.commands.run import _summarise
    from worker.outcomes.events import EventLog
    from worker.pipeline import RunState
    from worker.settings import load_settings
    from worker.terminal.output import Output

    monkeypatch.setenv("TERM", "dumb")  # the summary written as it is, no redrawing
    screen = _Screen(tty=True)
    ended = Tally(read=deleted)
    ended.outcomes["deleted"] = deleted
    with structlog.testing.capture_logs() as logs:
        _summarise(EventLog(), ended, RunState(), 0, hours * 3600.0, 0.1, load_settings(),
                   Output(display=display_on(screen)), {})  # fmt: skip
    rows = [line for line in screen.getvalue().splitlines() if line.startswith("  rate ")]
    assert rows == [f"  {'rate':<13}{shown:>8} ids/s"], screen.getvalue()
    event = next(e for e in logs if e["event"] == "run.summary")
    exact = deleted / (hours * 3600.0)
    assert abs(event["ids_per_s"] - exact) <= 0.001 * exact, event


@pytest.mark.anyio
async def test_the_summary_shows_the_runs_rate_to_two_figures_not_whole(tmp_path: Path) -> None:
    """The summary's rate was run.summary's ``ids_per_s`` rounded to a tenth, then shown to
    one decimal under 1 and whole from 1 up: a run of 0.96 ids/s said 1.0, one of 2.46 said
    2. One call of 1.3 s: under one id a second, shown to two significant figures."""
    faults = FaultConfig(latency_ms=1300, latency_jitter=False)
    async with run_simulator(SimulatorConfig(jobs=1, faults=faults)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        events = tmp_path / "events.jsonl"
        args = ["-i", str(src), "--yes", "--events", str(events)]
        code, term = await anyio.to_thread.run_sync(lambda: _run_on_a_pty(args, env))
    assert code == 0, term.screen_text()
    said = [orjson.loads(line) for line in events.read_text().splitlines()]
    summary = next(e for e in said if e["event"] == "run.summary")
    exact = 1 / summary["duration_s"]
    row = next(line for line in term.lines() if line.startswith("  rate "))
    shown = row.split()[1]
    assert 0.1 < exact < 1 and re.fullmatch(r"0\.\d\d?", shown), (row, exact)
    assert abs(float(shown) - exact) <= 0.005 + 0.002 * exact, (row, exact)


def test_a_dry_run_that_would_delete_nothing_says_none_not_up_to_0() -> None:
    """A dry run over a file of no valid id (a binary file given by mistake) ended "a real run
    would delete up to 0 jobs"."""
    fields = {"duration_s": 0.1, "ids_per_s": 0.0, "exit_code": 1, "rejected": 494}
    lines = RunEnd({**fields, "dry_run": True}, would_delete=0).text().splitlines()
    assert lines[-1] == "dry run: nothing was sent; a real run would delete none"


def test_a_summary_of_no_ids_says_there_was_nothing_to_do() -> None:
    """It was a duration and a rate of 0 ids/s; a shard whose input all went to the others
    is not "no ids" either."""
    fields = {"duration_s": 0.0, "ids_per_s": 0.0, "exit_code": 0, "open": 0}
    assert RunEnd(fields).text().endswith("\nnothing to do: the input gave no ids")
    sharded = RunEnd({**fields, "shard": "1/2", "other_shards": 7}).text()
    assert sharded.endswith("\nnothing to do: the input's 7 ids are other shards'")
    assert "nothing to do" not in RunEnd({**fields, "deleted": 1}).text()


def test_a_run_over_a_ledger_done_already_says_so_in_words() -> None:
    """Run again over a finished ledger, the summary was one row, ``already_done 301``, in
    the field's spelling, and no word that there had been nothing to do."""
    fields = {"duration_s": 0.1, "ids_per_s": 0.0, "exit_code": 0, "open": 0}
    lines = RunEnd({**fields, "already_done": 301}, total=301, ledger=True).text().splitlines()
    assert "  already done          301" in lines
    assert lines[-1] == "nothing to do: the ledger holds the input's 301 ids done already"
    some = RunEnd({**fields, "deleted": 2, "already_done": 9, "already_failed": 3}).text()
    assert "  already failed          3" in some.splitlines()
    assert "nothing to do" not in some and "_" not in some


@pytest.mark.anyio
async def test_an_error_before_any_call_is_said_once_with_nothing_else(tmp_path: Path) -> None:
    env = reaper_env("http://127.0.0.1:9", REAPER_LOG_FORMAT="auto")
    code, term = await anyio.to_thread.run_sync(
        lambda: _run_on_a_pty(["-i", str(tmp_path / "gone.txt"), "--yes"], env, columns=300)
    )
    assert code == 66
    assert [line for line in term.lines() if line] == [
        f"devserver-reaper run: cannot read input {tmp_path / 'gone.txt'}: no such file"
    ]


@pytest.mark.anyio
async def test_refused_credentials_are_said_once_with_the_fix(tmp_path: Path) -> None:
    async with _project(tmp_path, 20, REAPER_SK="not-the-key") as (_, src, env):
        code, term = await anyio.to_thread.run_sync(
            lambda: _run_on_a_pty(["-i", str(src), "--yes"], env)
        )
    assert code == 77
    text = term.screen_text()
    assert text.count("APIGW.0301") == 1, text
    assert "fix:   check the access key and secret key" in text
    assert "not-the-key" not in term.text()


@pytest.mark.anyio
async def test_a_secret_flag_is_one_warning_line_for_a_person(tmp_path: Path) -> None:
    async with _project(tmp_path, 5) as (_, src, env):
        args = ["-i", str(src), "--dry-run", "--sk", "typed-secret"]
        code, term = await anyio.to_thread.run_sync(lambda: _run_on_a_pty(args, env, columns=300))
    assert code == 0
    lines = [line for line in term.lines() if line]
    assert lines[0] == (
        "warning: --sk (use --sk-file, REAPER_SK_FILE or REAPER_SK): every user of this "
        "machine can read it (ps, /proc/PID/cmdline)"
    )
    assert lines[1] == "devserver-reaper run summary"
    assert "typed-secret" not in "\n".join(lines[1:])


def test_event_lines_name_the_job_where_a_plan_gives_it_and_hold_back_repeats() -> None:
    lines = EventLines(1)
    lines.name_jobs({"job-1": "diag-0412"})
    skipped = {"event": "job.skipped", "job_id": "job-1", "reason": "dry_run", "level": "info"}
    assert lines.line(skipped) == "DRY-RUN delete job-1 diag-0412"
    failed = {"event": "job.failed", "job_id": "job-2", "http_status": 400,
              "error_code": "ModelArts.0001", "error_msg": "bad", "request_id": "r-1",
              "level": "warning"}  # fmt: skip
    assert lines.line(failed) == "FAILED    job-2  400 ModelArts.0001: bad (request id r-1)"
    quiet = EventLines(0, first=2)
    shown = []
    for n in range(5):
        with suppress(structlog.DropEvent):
            shown.append(quiet(None, "warning", {**failed, "job_id": f"job-{n}"}))
    assert len(shown) == 2
    assert quiet.held_back_note() == (
        "(3 more failed ids not shown: -v shows each, --events FILE or --results FILE keeps them)"
    )


@pytest.mark.anyio
async def test_discover_on_a_terminal_shows_its_table_and_review_without_event_lines(
    tmp_path: Path,
) -> None:
    """The table and the review are what a person reads; info events (credentials.source,
    discover.summary) were printed above them as key=value lines."""
    async with _project(tmp_path, 40) as (_sim, _src, env):
        term = Terminal(["discover", "--all"], env)
        assert await anyio.to_thread.run_sync(term.wait) == 0
        shown = term.screen_text()
    assert "jobs selected" in shown
    assert "credentials.source" not in shown
    assert "discover.summary" not in shown
    assert "[info" not in shown


@pytest.mark.anyio
async def test_discover_says_its_warnings_on_a_terminal_as_sentences(tmp_path: Path) -> None:
    """``plan.unkeyed`` was a log line (a timestamp, ``[warning  ]``, the event's name,
    ``reason="..."``, the run id) above the review a person reads."""
    async with _project(tmp_path, 20) as (_sim, _src, env):
        plan = tmp_path / "plan"
        term = Terminal(["discover", "--status", "FINISHED", "--plan", str(plan)], env,
                        columns=300)  # fmt: skip
        assert await anyio.to_thread.run_sync(term.wait) == 0
    lines = [line for line in term.lines() if line]
    assert lines[0] == (
        "warning: no --plan-key-file: the plan's seal is a plain SHA-256 digest, which catches "
        "accidents, not someone who can write the file and re-seal it"
    )
    assert lines[1] == f"plan {plan}"
    assert "run_id" not in term.screen_text()


@pytest.mark.anyio
async def test_enqueue_on_a_terminal_says_a_redis_that_does_not_answer_and_few_bad_lines(
    tmp_path: Path, redis_prefix: str
) -> None:
    """``enqueue`` at a terminal: a Redis that does not answer was a log line
    (``error=ConnectionError``) with no fix, and each bad line of the input one more."""
    source = tmp_path / "ids.txt"
    source.write_text("".join(f"bad id {n}\n" for n in range(8)) + "a-1\n")
    env = {**reaper_env("http://127.0.0.1:9"), "REAPER_LOG_FORMAT": "auto"}
    args = ["enqueue", "-i", str(source), "--stream", redis_prefix + "ids", "--redis-url"]

    def enqueue(url: str) -> tuple[int, list[str]]:
        term = Terminal([*args, url], env, columns=300)
        return term.wait(), [line for line in term.lines() if line]

    assert await anyio.to_thread.run_sync(enqueue, "redis://127.0.0.1:1/0") == (69, [
        "devserver-reaper enqueue: Redis at redis://127.0.0.1:1/0, where the ids stream is "
        "kept, does not answer (ConnectionError); nothing was sent",
        "  fix: check that Redis runs and answers from here (redis-cli PING), then run the "
        "same command again",
    ])  # fmt: skip
    code, lines = await anyio.to_thread.run_sync(enqueue, REDIS_URL)
    assert code == 1, lines
    rejected = [line for line in lines if line.startswith("rejected")]
    assert rejected == [f"rejected  line {n + 1}: bad id {n} (invalid character ' ' at "
                        "position 4)" for n in range(5)]  # fmt: skip
    assert "(3 more rejected ids not shown: 2> FILE keeps each as JSON)" in lines
    summary = next(line for line in lines if line.startswith("{"))  # stdout: data
    assert orjson.loads(summary)["enqueued"] == 1


class _Screen(io.StringIO):
    """A stream that says it is (or is not) a terminal."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.anyio
@pytest.mark.parametrize("term", ["dumb", "xterm-256color"])
async def test_a_terminal_that_cannot_redraw_gets_plain_progress_lines(
    term: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``TERM=dumb`` (an editor's shell buffer): a display redrawn in place showed nothing
    for the whole run; there it is a plain progress line every few seconds, as in a log."""
    monkeypatch.setenv("TERM", term)
    display = display_on(_Screen(tty=True))
    assert isinstance(display, PlainScreen) == (term == "dumb"), display
    if isinstance(display, PlainScreen):
        plain = PlainScreen(screen := _Screen(tty=True), every_s=0)
        with anyio.move_on_after(1):
            async with anyio.create_task_group() as group:
                group.start_soon(plain.show, Progress(Tally(), total=3, clock=lambda: 1.0))
                while not screen.getvalue():  # a condition: the first line is written
                    await anyio.sleep(0)
                plain.stop()
        assert screen.getvalue().startswith("progress:   0.0% 0 / 3 · 0 ids/s")


@pytest.mark.anyio
async def test_a_long_wait_shows_its_line_and_erases_it_when_done() -> None:
    screen = _Screen(tty=True)
    async with status_while("asking IAM", screen, after_s=0):
        while not screen.getvalue():  # a condition: the line is shown
            await anyio.sleep(0)
        assert screen.getvalue() == "asking IAM…"
    assert screen.getvalue() == "asking IAM…\r\x1b[K"


@pytest.mark.anyio
async def test_a_quick_wait_or_no_terminal_shows_nothing() -> None:
    quick, piped = _Screen(tty=True), _Screen(tty=False)
    async with status_while("asking IAM", quick, after_s=3600):
        pass
    async with status_while("asking IAM", piped, after_s=0):
        for _ in range(10):
            await anyio.sleep(0)
    assert quick.getvalue() == piped.getvalue() == ""


class _Revocable:
    """A real pseudo-terminal's stream whose terminal can be revoked (its other end closed:
    every write then fails with EIO), counting the writes tried."""

    def __init__(self) -> None:
        self._master, slave = os.openpty()
        self.stream = os.fdopen(slave, "w", encoding="utf-8")
        self.writes = 0

    def isatty(self) -> bool:
        return self.stream.isatty()

    def write(self, text: str) -> int:
        self.writes += 1
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def shown(self) -> bytes:
        return os.read(self._master, 1024)

    def revoke(self) -> None:
        os.close(self._master)

    def close(self) -> None:
        with suppress(OSError):
            self.stream.close()


@pytest.mark.anyio
@pytest.mark.parametrize("when", ["before the line", "while it is shown"])
async def test_a_terminal_revoked_during_the_wait_does_not_stop_the_command(when: str) -> None:
    """The line is a courtesy: a terminal gone while IAM is asked (EIO on the write that
    shows the line, or on the one that erases it) loses the line, not the command, which
    ends with what its block returned."""
    tty = _Revocable()
    try:
        async with status_while("asking IAM", tty, after_s=0):  # type: ignore[arg-type]
            if when == "before the line":
                tty.revoke()
            while tty.writes == 0:  # a condition: the line was tried
                await anyio.sleep(0)
            if when == "while it is shown":
                assert tty.shown() == "asking IAM…".encode()
                tty.revoke()
            answer = "found"
        assert answer == "found"
        assert tty.writes == (1 if when == "before the line" else 2)
    finally:
        tty.close()


@pytest.mark.anyio
async def test_the_api_s_text_cannot_erase_a_row_of_the_review(tmp_path: Path) -> None:
    """A job named ``tmp-1 ESC[1A ESC[2K`` (up a line, erase it), by a user named so too,
    listed after ``prod-db``: discover's table and ``plan show`` wrote the API's text raw,
    and on the reviewer's screen ``prod-db``'s row (and the user count above) vanished from
    what was reviewed. The names are now shown escaped, and every row stays."""
    erase = "\x1b[1A\x1b[2K"
    async with run_simulator(SimulatorConfig(jobs=0, seed=37)) as sim:
        prod = sim.add_jobs(1, name="prod-db", status="FINISHED", user_name="prod-team")
        sim.add_jobs(1, name=f"tmp-1{erase}", status="FINISHED", user_name=f"ops{erase}",
                     type=f"COMMON{erase}")  # fmt: skip
        env = reaper_env(sim.url)
        on_screen = {k: v for k, v in env.items() if k != "REAPER_LOG_FORMAT"}  # lines, not JSON
        raw = [b"tmp-1\x1b", b"ops\x1b", b"COMMON\x1b"]  # the API's text as it came
        term = Terminal(["discover", "--status", "FINISHED", "--all"], on_screen)
        code = await anyio.to_thread.run_sync(term.wait)
        assert code == 0, term.lines()
        assert erase.encode() not in term.raw  # discover draws no progress of its own
        assert any(prod[0] in line and "prod-db" in line for line in term.lines())
        plan = tmp_path / "plan"
        made = await reaper(["discover", "--status", "FINISHED", "--all", "--plan", str(plan)],
                            env)  # fmt: skip
        assert made.code == 0, made.stderr
        shown = await reaper(["plan", "show", str(plan)], env)
        assert shown.code == 0 and "\x1b" not in shown.stdout, shown.stdout
        assert "ops\\x1b[1A\\x1b[2K" in shown.stdout and "prod-team" in shown.stdout
        term = Terminal(["run", "--plan", str(plan), "--dry-run", "-v"], on_screen)
        assert await anyio.to_thread.run_sync(term.wait) == 0, term.lines()
        assert not any(text in term.raw for text in raw)
        assert any("DRY-RUN delete" in line and "tmp-1\\x1b" in line for line in term.lines())

        def asked() -> Terminal:  # the prompt's counts by type and status, then "no"
            term = Terminal(["run", "--plan", str(plan)], on_screen)
            term.expect("This cannot be undone.")
            term.type(b"no\n")
            term.wait()
            return term

        term = await anyio.to_thread.run_sync(asked)
        assert b"COMMON\x1b" not in term.raw and len(sim.deleted) == 0
