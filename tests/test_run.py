"""`run` end to end: the real command in a subprocess, the simulator in-process."""

from __future__ import annotations

import gzip
import os
import re
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from tests.e2e import (
    SIM_AK,
    SIM_PROJECT,
    SIM_SK,
    deletes_sent,
    read_all,
    reaper,
    reaper_env,
    results,
    start_reaper,
    until,
    write_ids,
)
from worker.simulator import FaultConfig, SimulatorConfig, run_simulator

pytestmark = pytest.mark.anyio

INVALID = ["bad id!", "x" * 65, "semi;colon", "ünïcode"]


async def test_fault_matrix_every_id_ends_with_exactly_one_outcome(tmp_path: Path) -> None:
    """Thousands of ids, every fault kind on: nothing lost, nothing extra, nothing invalid sent."""
    faults = FaultConfig(
        error_before=0.04, error_after=0.04, unavailable=0.04, reset_before=0.03,
        reset_after=0.03, truncated=0.03, latency_ms=1.0,
    )  # fmt: skip
    config = SimulatorConfig(jobs=3000, seed=11, quota=400, burst=20, faults=faults)
    async with run_simulator(config) as sim:
        real = sim.job_ids()
        ghosts = [f"ghost-{n}" for n in range(40)]
        lines = real + ghosts + INVALID + real[:100]  # 100 repeats
        src = write_ids(tmp_path / "ids.txt", lines)
        out = tmp_path / "results.jsonl"
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--results", str(out), "--batch-size", "25",
             "--concurrency", "8", "--rate", "300", "--burst", "20", "--max-attempts", "12"],
            reaper_env(sim.url),
        )  # fmt: skip
        assert done.code == 1, done.stderr  # 1: the invalid lines are rejected
        rows = results(out)
        by_id = Counter(row["job_id"] for row in rows if row["outcome"] != "rejected")
        assert set(by_id) == set(real) | set(ghosts)
        assert max(by_id.values()) == 1
        outcome = {row["job_id"]: row["outcome"] for row in rows}
        confirmed = {row["job_id"]: row.get("confirmed") for row in rows}
        # A ghost sent in an attempt whose answer was lost cannot be told from a job that
        # attempt deleted: it may end deleted, but never confirmed. A real job never absent.
        assert all(outcome[g] == "absent" or confirmed[g] is False for g in ghosts)
        assert {outcome[r] for r in real} == {"deleted"}
        assert sum(row["outcome"] == "rejected" for row in rows) == len(INVALID)
        # The simulator: every real job gone, each deleted exactly once, no 400 (no bad id sent).
        assert sim.deleted == set(real)
        assert sim.job_ids() == []
        assert max(sim.delete_counts.values()) == 1
        assert sim.stats.faults, "the fault injection did not fire"
        summary = done.summary()
        assert summary["deleted"] + summary["absent"] == len(real) + len(ghosts)
        assert summary["rejected"] == len(INVALID)
        assert summary["repeated"] == 100
        assert summary["exit_code"] == 1
        assert isinstance(summary["cpu_s"], float)
        assert summary["cpu_s"] > 0  # this process's CPU over the run, for sizing
        deleted_events = done.events("job.deleted")
        deleted = {i for i, o in outcome.items() if o == "deleted"}
        assert {e["job_id"] for e in deleted_events} == deleted
        sample = next(e for e in deleted_events if e["confirmed"])  # a record the API returned
        fields = ("name", "user_name", "type", "status", "abnormal_count", "create_at",
                  "update_at", "batch_id", "request_id", "run_id", "timestamp",
                  "level")  # fmt: skip
        assert set(fields) <= set(sample)
        assert sample["create_at"].endswith("Z")


def _batched(src: Path, out: Path, *, size: int, concurrency: int) -> list[str]:
    """``run`` of ``src`` into ``out`` in batches of ``size``, fast."""
    return ["run", "-i", str(src), "--yes", "--results", str(out), "--batch-size", str(size),
            "--concurrency", str(concurrency), "--rate", "1000", "--burst", "50"]  # fmt: skip


async def test_a_batch_limit_the_api_keeps_to_itself_is_learnt_once(tmp_path: Path) -> None:
    """The API takes at most 7 ids a call (it documents no limit). Every batch of 50 used to
    find that out again by splitting: 15 calls, 7 of them refused, for each batch. The first
    batch still does; the others go out in pieces of 7 (8 calls each), but for a larger
    piece now and then, to learn whether the limit rose (``worker.batchsize``): after 8,
    16 and 32 calls at the cap, each refused, split, and costing one call more."""
    async with run_simulator(SimulatorConfig(jobs=500, seed=12, max_batch=7)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        out = tmp_path / "results.jsonl"
        done = await reaper(_batched(src, out, size=50, concurrency=1), reaper_env(sim.url))
        assert done.code == 0, done.stderr
        assert {row["outcome"] for row in results(out)} == {"deleted"}
        assert len(results(out)) == 500 and sim.job_ids() == []
        assert (sim.stats.delete_calls, sim.stats.bad_requests) == (15 + 9 * 8 + 3, 7 + 3)


async def test_a_batch_limit_learnt_is_kept_in_the_ledger_for_the_run_that_resumes(
    tmp_path: Path,
) -> None:
    """The API takes at most 7 ids a call. A run on a ledger learns it from its batch of
    50 (refused, split); the run that resumes the input on that ledger sends its 49 ids
    left in 7 pieces of 7, none refused. (It learnt the limit again: 15 calls, 7 refused.)"""
    async with run_simulator(SimulatorConfig(jobs=99, seed=12, max_batch=7)) as sim:
        ids = sim.job_ids()
        ledger = ["--ledger", str(tmp_path / "ledger.db")]
        out = tmp_path / "results.jsonl"
        first = write_ids(tmp_path / "first.txt", ids[:50])
        done = await reaper([*_batched(first, out, size=50, concurrency=1), *ledger],
                            reaper_env(sim.url))  # fmt: skip
        assert done.code == 0 and sim.stats.bad_requests > 0, done.stderr
        calls, refused = sim.stats.delete_calls, sim.stats.bad_requests
        every = write_ids(tmp_path / "ids.txt", ids)
        again = await reaper([*_batched(every, out, size=50, concurrency=1), *ledger],
                             reaper_env(sim.url))  # fmt: skip
        assert again.code == 0, again.stderr
        assert again.summary()["deleted"] == 49 and sim.job_ids() == []
        assert (sim.stats.delete_calls - calls, sim.stats.bad_requests - refused) == (7, 0)


@pytest.mark.parametrize("row", ["[1, 5]", "[true, 9]"])
async def test_a_batch_limit_row_edited_past_sense_is_no_knowledge(
    tmp_path: Path, row: str
) -> None:
    """The ledger's learnt batch limit edited by hand to a refused size at or under the most
    taken (``[1, 5]``; ``true`` is no count): the run that resumes on it learns the limit
    again and deletes its 20 ids. (The old code read a cap of 0 ids a call from it and
    spun, its event loop busy, deaf to SIGTERM.)"""
    async with run_simulator(SimulatorConfig(jobs=40, seed=3, max_batch=7)) as sim:
        ids = sim.job_ids()
        ledger = tmp_path / "ledger.db"
        out = tmp_path / "results.jsonl"
        first = write_ids(tmp_path / "first.txt", ids[:20])
        args = ["--ledger", str(ledger)]
        done = await reaper([*_batched(first, out, size=20, concurrency=1), *args],
                            reaper_env(sim.url))  # fmt: skip
        assert done.code == 0, done.stderr
        with sqlite3.connect(ledger) as conn:
            edited = conn.execute(
                "UPDATE meta SET value = ? WHERE key LIKE 'batch_size %'", (row,)
            ).rowcount
        assert edited == 1
        every = write_ids(tmp_path / "ids.txt", ids)
        with anyio.fail_after(60):
            again = await reaper([*_batched(every, out, size=20, concurrency=1), *args],
                                 reaper_env(sim.url))  # fmt: skip
        assert again.code == 0, again.stderr
        assert again.summary()["deleted"] == 20 and sim.job_ids() == []


async def test_a_batch_limit_that_rises_mid_run_is_found_again(tmp_path: Path) -> None:
    """The API takes at most 3 ids a call, then, 40 calls in, 9. The run learns 3 by
    splitting, and later probes a larger piece now and then: taken, it is the new cap. So
    the ids left when the limit rose go out in far fewer calls than pieces of 3 need (the
    old code kept to 3 for good: 277 calls for 600 ids); every id ends deleted, each in one
    call taken whole."""
    async with run_simulator(SimulatorConfig(jobs=600, seed=5, max_batch=3)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        out = tmp_path / "results.jsonl"
        rose: dict[str, int] = {}

        async def raise_the_limit() -> None:
            while sim.stats.delete_calls < 40:
                await anyio.sleep(0.002)
            sim.config = replace(sim.config, max_batch=9)
            rose.update(calls=sim.stats.delete_calls, left=len(sim.job_ids()))

        async with anyio.create_task_group() as group:
            group.start_soon(raise_the_limit)
            done = await reaper(_batched(src, out, size=30, concurrency=2), reaper_env(sim.url))
        assert done.code == 0, done.stderr
        rows = results(out)
        assert {row["outcome"] for row in rows} == {"deleted"}
        assert len(rows) == 600 and sim.job_ids() == [] and sim.stats.deletions == 600
        after = sim.stats.delete_calls - rose["calls"]
        at_three = -(-rose["left"] // 3)  # what pieces of 3 need for the ids left
        assert rose["left"] > 300 and after < 0.6 * at_three, (rose, after, sim.stats)


async def test_rate_auto_against_a_quota_deletes_every_id_once_and_says_what_it_met(
    tmp_path: Path,
) -> None:
    """``run --rate auto`` in a real process against a quota of 10 calls/s it is not told:
    it meets the quota (429s) and comes to no harm. Every id ends deleted, each sent once
    in a call that was not refused; each refusal is a ``batch.retry`` that says so, as
    many as the summary's retries and the simulator's refusals; ``run.stats`` gives the
    pace the run learnt, and ``rate.slowed`` (``asked: auto``) when its controller cut;
    no ``rate.leader`` (that is a fleet's, through Redis)."""
    async with run_simulator(SimulatorConfig(jobs=200, seed=4, quota=10, burst=1)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        out = tmp_path / "results.jsonl"
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--rate", "auto", "--results", str(out),
             "--batch-size", "5", "--concurrency", "4", "--stats-interval", "1"],
            reaper_env(sim.url),
        )  # fmt: skip
        assert done.code == 0, done.stderr
        rows = results(out)
        assert sorted(row["job_id"] for row in rows) == sorted(set(sim.deleted))
        assert {row["outcome"] for row in rows} == {"deleted"} and len(rows) == 200
        assert sim.job_ids() == [] and max(sim.delete_counts.values()) == 1
        assert sim.stats.throttled >= 1, sim.stats  # it did meet the quota
        retries = done.events("batch.retry")
        assert len(retries) == done.summary()["retries"] == sim.stats.throttled
        assert {r["reason"] for r in retries} == {"throttled"}, retries
        stats = done.events("run.stats")
        assert stats and all(s["rate"] > 0 for s in stats), stats
        slowed = done.events("rate.slowed")
        assert slowed and {(e["asked"], e["reason"]) for e in slowed} == {("auto", "throttled")}
        assert all(e["rate"] > 0 for e in slowed), slowed
        assert not done.events("rate.leader")


async def test_dry_run_sends_no_delete(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=50)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(["run", "-i", str(src), "--dry-run"], reaper_env(sim.url))
        assert done.code == 0, done.stderr
        assert sim.stats.delete_calls == 0
        assert len(sim.job_ids()) == 50
        assert done.summary()["skipped"] == 50
        assert {e["reason"] for e in done.events("job.skipped")} == {"dry_run"}


@pytest.mark.parametrize(
    ("variable", "meant"),
    [("REAPER_DRYRUN", "REAPER_DRY_RUN"), ("REAPER_PROTECTED_STATUS", "REAPER_PROTECTED_STATUSES"),
     ("reaper_dry_runn", "REAPER_DRY_RUN")],
)  # fmt: skip
async def test_a_misspelt_reaper_variable_is_refused_before_any_call(
    tmp_path: Path, variable: str, meant: str
) -> None:
    """``REAPER_DRYRUN=true run --yes`` deleted every job, and ``REAPER_PROTECTED_STATUS``
    protected none: pydantic-settings passes over a variable that names no field, where the
    config file refuses an unknown key. Now 78, the variable named with the one it is close
    to, and nothing sent."""
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        env = reaper_env(sim.url, **{variable: "PROCESSING" if "STATUS" in variable else "true"})
        done = await reaper(["run", "-i", str(src), "--yes"], env)
        assert done.code == 78, done.stderr
        assert sim.stats.calls == 0
        assert len(sim.job_ids()) == 5
        assert f"{variable} (did you mean {meant}?) is not a setting" in done.stderr
        # simulate and completion read no settings: a stray variable is none of theirs
        shown = await reaper(["completion", "bash"], env)
        assert shown.code == 0, shown.stderr


@pytest.mark.parametrize("variable", ["REAPER_ALLOWED_PROJECTS", "REAPER_CONFIG"])
async def test_a_reaper_variable_set_to_nothing_is_refused_before_any_call(
    tmp_path: Path, variable: str
) -> None:
    """The config file allows the simulator's project only; a line names another. An empty
    ``REAPER_ALLOWED_PROJECTS`` stood for "any project" over the file's list and the DELETE
    went to the other project; an empty ``REAPER_CONFIG`` named no file, the file's list left
    out the same way. Now 78 naming the variable, nothing sent."""
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        config = tmp_path / "reaper.toml"
        config.write_text(f'allowed_projects = ["{SIM_PROJECT}"]\n')
        src = tmp_path / "ids.jsonl"
        src.write_text(f'{{"id": "{sim.job_ids()[0]}", "project_id": "other-project"}}\n')
        env = reaper_env(sim.url, **{variable: ""})
        given = [] if variable == "REAPER_CONFIG" else ["--config", str(config)]
        done = await reaper(["run", "-i", str(src), "--yes", *given], env)
        assert done.code == 78, done.stderr
        assert sim.stats.calls == 0
        assert f"{variable} is set but empty" in done.stderr


@pytest.mark.parametrize("flag", ["--results", "--events"])
@pytest.mark.parametrize("kind", ["protect", "sk"])
async def test_results_or_events_naming_a_file_the_run_reads_is_refused_before_any_call(
    tmp_path: Path, flag: str, kind: str
) -> None:
    """``--results`` naming the protect file wrote its rows over the rules: that run kept
    them (read before), the next found only lines of JSON, which protect no job, and
    deleted the job its rule kept (``--events`` appended to it; a key file named so was
    lost the same way). Now 64 naming what the file is, nothing sent, the file as it was."""
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        ids = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", ids)
        kept = tmp_path / f"{kind}.txt"
        kept.write_text(f"id:{ids[0]}\n" if kind == "protect" else f"{SIM_SK}\n")
        before = kept.read_bytes()
        env = reaper_env(sim.url)
        read_by = ["--protect-file", str(kept)] if kind == "protect" else ["--sk-file", str(kept)]
        done = await reaper(["run", "-i", str(src), "--yes", *read_by, flag, str(kept)], env)
        assert done.code == 64, done.stderr
        assert sim.stats.calls == 0
        assert kept.read_bytes() == before
        what = "a protect_file" if kind == "protect" else "the sk_file"
        assert f"{flag} {kept} is {what}: it would be overwritten" in done.stderr


async def test_a_plan_or_a_report_written_over_a_file_the_command_reads_is_refused(
    tmp_path: Path,
) -> None:
    """``discover --plan`` and ``report --output`` naming the protect file (or the plan key)
    wrote a plan or a report over it, and the next run met no rule it held. Now 64, naming
    what the file is, before the listing; the file as it was."""
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        rules = tmp_path / "protect.txt"
        rules.write_text(f"id:{sim.job_ids()[0]}\n")
        before = rules.read_bytes()
        env = reaper_env(sim.url, REAPER_PROTECT_FILE=str(rules))
        planned = await reaper(["discover", "--all", "--plan", str(rules)], env)
        assert planned.code == 64, planned.stderr
        assert f"--plan {rules} is a protect_file: it would be overwritten" in planned.stderr
        assert sim.stats.calls == 0
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        ledger = tmp_path / "reaper.db"
        dry = await reaper(["run", "-i", str(src), "--dry-run", "--ledger", str(ledger)], env)
        assert dry.code == 0, dry.stderr
        report = await reaper(["report", "--ledger", str(ledger), "--output", str(rules)], env)
        assert report.code == 64, report.stderr
        assert f"--output {rules} is a protect_file" in report.stderr
        assert rules.read_bytes() == before


async def test_without_a_terminal_or_yes_nothing_is_called_and_it_exits_64(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(["run", "-i", str(src)], reaper_env(sim.url))
        assert done.code == 64
        assert "--yes" in done.stderr
        assert sim.stats.calls == 0


async def test_yes_from_the_environment_is_enough(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(["run", "-i", str(src)], reaper_env(sim.url, REAPER_YES="true"))
        assert done.code == 0, done.stderr
        assert sim.job_ids() == []


async def test_stdin_and_gzip_inputs(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=20)) as sim:
        ids = sim.job_ids()
        gz = tmp_path / "ids.jsonl.gz"
        gz.write_bytes(
            gzip.compress(b"".join(b'{"job_id": "%s"}\n' % i.encode() for i in ids[:10]))
        )
        first = await reaper(["run", "-i", str(gz), "--yes"], reaper_env(sim.url))
        assert first.code == 0, first.stderr
        assert first.summary()["deleted"] == 10
        second = await reaper(
            ["run", "-i", "-", "--yes"], reaper_env(sim.url), stdin="\n".join(ids[10:]).encode()
        )
        assert second.code == 0, second.stderr
        assert second.summary()["deleted"] == 10
        assert sim.job_ids() == []


async def test_max_deletions_is_never_exceeded(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=300)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--max-deletions", "77", "--batch-size", "10",
             "--concurrency", "16", "--rate", "1000", "--burst", "100"],
            reaper_env(sim.url),
        )  # fmt: skip
        assert len(sim.deleted) == 77
        summary = done.summary()
        assert summary["deleted"] == 77
        assert summary["skipped"] == 300 - 77
        assert done.code == 1  # work was left undone on purpose: not a clean 0


async def test_concurrency_bound_holds_at_the_server(tmp_path: Path) -> None:
    config = SimulatorConfig(jobs=400, faults=FaultConfig(latency_ms=20.0, latency_jitter=False))
    async with run_simulator(config) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--batch-size", "5", "--concurrency", "3",
             "--rate", "1000", "--burst", "50"],
            reaper_env(sim.url),
        )  # fmt: skip
        assert done.code == 0, done.stderr
        assert sim.stats.max_in_flight <= 3
        assert sim.stats.max_in_flight >= 2  # it did run concurrently


# -- exit codes ------------------------------------------------------------------------------


async def test_exit_66_when_the_input_does_not_exist(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=1)) as sim:
        done = await reaper(["run", "-i", str(tmp_path / "nope.txt"), "--yes"], reaper_env(sim.url))
        assert done.code == 66
        assert sim.stats.calls == 0


@pytest.mark.parametrize(
    "where",
    ["the input", "the ledger", "the ledger's WAL", "a missing directory", "a directory"],
)
async def test_exit_64_before_any_call_when_results_cannot_be_the_file_asked(
    tmp_path: Path, where: str
) -> None:
    """--results is truncated when the run starts: naming the input wiped it (and the run
    read nothing and exited 0); an unopenable path crashed with a traceback (exit 1)."""
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        ledger = tmp_path / "ledger.db"
        target = {"the input": tmp_path / "." / "ids.txt",
                  "the ledger": ledger,
                  "the ledger's WAL": tmp_path / "ledger.db-wal",  # SQLite's, beside it
                  "a missing directory": tmp_path / "nope" / "results.jsonl",
                  "a directory": tmp_path}[where]  # fmt: skip
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--ledger", str(ledger), "--results", str(target)],
            reaper_env(sim.url),
        )
        assert done.code == 64, done.stderr
        assert "--results" in done.stderr and "Traceback" not in done.stderr
        assert sim.stats.calls == 0
        assert src.read_text().split() == sim.job_ids()  # the input is untouched


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("jobs", [2000, 3])
async def test_a_results_file_that_fails_midway_stops_the_run_with_every_record_logged(
    tmp_path: Path, jobs: int
) -> None:
    """The disk fills under --results: the run stops (75, not a traceback and 1), and the
    calls in flight finish first, so every job the API deleted still has its event. With
    3 ids the failure comes with the first batch, and closing the file must not raise it
    a second time."""
    async with run_simulator(SimulatorConfig(jobs=jobs)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--results", "/dev/full", "--rate", "1000"],
            reaper_env(sim.url),
        )
        assert done.code == 75, done.stderr
        assert "Traceback" not in done.stderr
        summary = done.summary()
        assert "/dev/full cannot be written" in summary["error"]
        assert 0 < summary["deleted"] <= jobs
        assert {e["job_id"] for e in done.events("job.deleted")} == sim.deleted


async def test_exit_77_on_a_wrong_secret_and_nothing_deleted(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=30)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(
            ["run", "-i", str(src), "--yes"], reaper_env(sim.url, REAPER_SK="wrong-secret")
        )
        assert done.code == 77, done.stderr
        assert sim.deleted == set()
        assert sim.stats.signature_failures >= 1


async def test_a_wrong_project_id_exits_78_with_every_id_left_open(tmp_path: Path) -> None:
    """The gateway's 404 for a project it does not know is not "the job is absent": the run
    stops (78) with nothing settled, and a rerun with the right project deletes them all.
    (Every id used to end ``absent`` with exit 0, and a ledger kept them as done.)"""
    async with run_simulator(SimulatorConfig(jobs=20)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        args = ["run", "-i", str(src), "--yes", "--batch-size", "5"]
        wrong = await reaper(args, reaper_env(sim.url, REAPER_PROJECT_ID="other-project"))
        assert wrong.code == 78, wrong.stderr
        assert not wrong.events("job.absent") and not wrong.events("job.deleted")
        summary = wrong.summary()
        assert summary["absent"] == 0 and summary["deleted"] == 0
        assert "APIGW.0101" in summary["error"]
        right = await reaper(args, reaper_env(sim.url))
        assert right.code == 0, right.stderr
        assert right.summary()["deleted"] == 20
        assert len(sim.deleted) == 20


@pytest.mark.parametrize(
    ("args", "env", "code"),
    [
        (["--results", ""], {}, 64),
        (["--ledger", ""], {}, 64),  # a flag given empty: a usage error, as --results
        ([], {"REAPER_LEDGER": " "}, 78),
        ([], {"REAPER_AK": "AK\r\nX-Injected: 1"}, 78),
    ],
)
async def test_empty_paths_and_control_characters_are_refused_before_any_call(
    tmp_path: Path, args: list[str], env: dict[str, str], code: int
) -> None:
    """Each used to be dropped in silence (no results file), crash (an empty ledger path
    is ``.``), or reach aiohttp as a header it refuses, as a traceback."""
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(["run", "-i", str(src), "--yes", *args], reaper_env(sim.url, **env))
        assert done.code == code, done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr
        assert sim.stats.calls == 0 and sim.deleted == set()


async def test_exit_69_when_the_api_stays_unavailable(tmp_path: Path) -> None:
    config = SimulatorConfig(jobs=10, faults=FaultConfig(unavailable=1.0))
    async with run_simulator(config) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--max-attempts", "2"], reaper_env(sim.url)
        )
        assert done.code == 69, done.stderr
        summary = done.summary()
        assert summary["open"] == 10
        assert summary["failed"] == 0


async def test_when_the_api_gives_out_the_calls_in_flight_finish_and_are_logged(
    tmp_path: Path,
) -> None:
    """One batch runs out of retries (69) while others' calls are on the wire: those calls
    finish within the grace period, so every job the API deleted has its job.deleted event
    (they were cancelled at once: deleted, and their records never logged)."""
    faults = FaultConfig(unavailable=0.3, latency_ms=200, latency_jitter=False)
    async with run_simulator(SimulatorConfig(jobs=400, seed=3, faults=faults)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--max-attempts", "1", "--batch-size", "10",
             "--concurrency", "8", "--rate", "1000", "--burst", "50"],
            reaper_env(sim.url),
        )  # fmt: skip
        assert done.code == 69, done.stderr
        assert sim.deleted, "some calls were answered 200"
        assert {e["job_id"] for e in done.events("job.deleted")} == sim.deleted
        assert done.summary()["open"] == 400 - len(sim.deleted)


async def test_exit_69_when_nothing_listens(tmp_path: Path) -> None:
    src = write_ids(tmp_path / "ids.txt", ["a", "b"])
    done = await reaper(
        ["run", "-i", str(src), "--yes", "--max-attempts", "2"],
        reaper_env("http://127.0.0.1:9"),
    )
    assert done.code == 69, done.stderr


async def test_exit_78_on_invalid_settings(tmp_path: Path) -> None:
    src = write_ids(tmp_path / "ids.txt", ["a"])
    done = await reaper(
        ["run", "-i", str(src), "--yes", "--project-id", "not/valid"],
        reaper_env("http://127.0.0.1:9"),
    )
    assert done.code == 78
    assert (
        done.stderr
        == "devserver-reaper: --project-id must be 1 to 64 letters, digits and hyphens\n"
    )


async def test_exit_64_on_a_usage_error() -> None:
    done = await reaper(["run", "--no-such-flag"], reaper_env("http://127.0.0.1:9"))
    assert done.code == 64


async def test_exit_0_when_all_deleted_or_absent(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=10)) as sim:
        src = write_ids(tmp_path / "ids.txt", [*sim.job_ids(), "gone-1"])
        done = await reaper(["run", "-i", str(src), "--yes"], reaper_env(sim.url))
        assert done.code == 0, done.stderr
        assert done.summary()["absent"] == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_a_signal_stops_intake_and_exits_75_with_work_left(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGHUP (the terminal gone: an ssh session dropped) killed the run outright, the
    jobs its calls in flight deleted written nowhere; it stops as SIGTERM does, every job
    deleted in the results."""
    config = SimulatorConfig(jobs=2000, faults=FaultConfig(latency_ms=30.0, latency_jitter=False))
    async with run_simulator(config) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        out = tmp_path / "results.jsonl"
        process = await start_reaper(
            ["run", "-i", str(src), "--yes", "--batch-size", "10", "--concurrency", "2",
             "--rate", "1000", "--burst", "10", "--grace", "5", "--results", str(out)],
            reaper_env(sim.url),
        )  # fmt: skip
        async with process:
            with anyio.fail_after(30):
                while sim.stats.delete_calls < 5:
                    await anyio.sleep(0.05)
            process.send_signal(signum)
            with anyio.fail_after(30):
                stdout, stderr = await read_all(process)
        assert process.returncode == 75, stderr
        summaries = [line for line in stdout.splitlines() if '"run.summary"' in line]
        assert len(summaries) == 1
        assert 0 < len(sim.deleted) < 2000
        assert {row["job_id"] for row in results(out) if row["outcome"] == "deleted"} == sim.deleted


async def test_a_run_started_under_nohup_goes_on_through_sighup(tmp_path: Path) -> None:
    """SIGHUP is the run's to handle only where it was not ignored when the run started:
    under ``nohup`` it stays ignored, and the run finishes."""
    config = SimulatorConfig(jobs=300, faults=FaultConfig(latency_ms=30.0, latency_jitter=False))
    async with run_simulator(config) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        process = await anyio.open_process(
            ["nohup", sys.executable, "-m", "worker", "run", "-i", str(src), "--yes",
             "--batch-size", "10", "--concurrency", "2", "--rate", "1000"],
            env=reaper_env(sim.url),
        )  # fmt: skip
        async with process:
            await until(deletes_sent(sim, 3))
            process.send_signal(signal.SIGHUP)
            _, stderr = await read_all(process)
        assert process.returncode == 0, stderr
        assert not sim.job_ids()


async def test_exit_75_at_the_deadline(tmp_path: Path) -> None:
    config = SimulatorConfig(jobs=1000, faults=FaultConfig(latency_ms=50.0, latency_jitter=False))
    async with run_simulator(config) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--batch-size", "5", "--concurrency", "1",
             "--deadline", "1", "--grace", "2"],
            reaper_env(sim.url),
        )  # fmt: skip
        assert done.code == 75, done.stderr
        assert done.summary()["stop_reason"] == "deadline"
        assert len(sim.job_ids()) > 0


async def test_secrets_never_appear_in_output_or_results(tmp_path: Path) -> None:
    """Canary AK/SK/token through every fault at debug level: never printed, never written."""
    ak, sk, token = "CANARYAKXQ7", "canary-secret-sk-ZZ81", "canary-token-TT42"
    faults = FaultConfig.spread(0.3)
    config = SimulatorConfig(jobs=200, ak=ak, sk=sk, faults=faults, seed=3, quota=200, burst=5)
    async with run_simulator(config) as sim:
        src = write_ids(tmp_path / "ids.txt", [*sim.job_ids(), "bad id"])
        out = tmp_path / "results.jsonl"
        env = reaper_env(
            sim.url, REAPER_AK=ak, REAPER_SK=sk, REAPER_SECURITY_TOKEN=token,
            REAPER_LOG_LEVEL="debug",
        )  # fmt: skip
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--results", str(out), "--max-attempts", "10",
             "--rate", "150"],
            env,
        )  # fmt: skip
        wrong = await reaper(["run", "-i", str(src), "--yes"], {**env, "REAPER_SK": sk + "-wrong"})
        assert wrong.code == 77
        for text in (done.stdout, done.stderr, out.read_text(), wrong.stdout, wrong.stderr):
            for secret in (ak, sk, token):
                assert secret not in text
        assert done.code in (0, 1), done.stderr
        assert sim.job_ids() == []


def test_simulator_constants_match_the_demo() -> None:
    from worker.commands import demo

    assert (demo.DEMO_AK, demo.DEMO_SK, demo.DEMO_PROJECT) == (SIM_AK, SIM_SK, SIM_PROJECT)


async def test_the_demo_tours_every_step_and_ends_with_0() -> None:
    """``demo`` as a newcomer runs it: eight narrated steps (check, discover into a plan, the
    plan, a dry run, a run interrupted by Ctrl-C and resumed, a file with bad lines on
    purpose, the ledger), each with what came of it, and exit 0."""
    done = await reaper(["demo"], reaper_env("http://127.0.0.1:9"))
    assert done.code == 0, done.stderr
    lines = done.stderr.splitlines()
    steps = [line for line in lines if re.match(r"\[\d/8\] ", line)]
    assert [step[:5] for step in steps] == [f"[{n}/8]" for n in range(1, 9)]
    assert "Traceback" not in done.stderr and done.stdout == ""
    said = "\n".join(lines)
    assert "→ result OK (HTTP 200" in said
    assert re.search(r"→ would delete (\d+); the simulator still holds 300 jobs", said)
    first = re.search(r"→ first: deleted (\d+); open (\d+); exit 75", said)
    again = re.search(r"→ again: deleted (\d+), already_done (\d+); open 0; exit 0", said)
    assert first and again, said
    assert first.group(1) == again.group(2)  # what the first run did is not done again
    assert "rejected 3" in said and "exit 1, as meant" in said
    assert "--plan plan.txt" in said and "plan.json" not in said  # a plan is not JSON
    assert lines[-1].startswith("demo: done, every job deleted")


async def test_sigterm_stops_a_run_waiting_on_a_quiet_stdin() -> None:
    """Reading is abandoned on a signal: a pipe that never closes cannot hold the run open."""
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        process = await anyio.open_process(
            [sys.executable, "-m", "worker", "run", "-i", "-", "--yes"],
            env=reaper_env(sim.url),
        )
        async with process:
            assert process.stdin is not None
            assert process.stdout is not None
            await process.stdin.send("\n".join(sim.job_ids()).encode() + b"\n")
            seen = b""
            with anyio.fail_after(30):
                async for chunk in process.stdout:  # wait until the run is under way ...
                    seen += chunk
                    if b"run.started" in seen:
                        break
            process.send_signal(signal.SIGTERM)  # ... while stdin stays open and silent
            with anyio.fail_after(20):
                stdout, stderr = await read_all(process)
        assert process.returncode == 75, stderr
        assert '"run.summary"' in stdout
        assert sim.stats.delete_calls == 0  # nothing was batched yet: all left for the next run


def _waits_on_a_pipe(pid: int) -> Callable[[], Awaitable[bool]]:
    """For ``until``: the process is blocked opening a named pipe, waiting for a writer."""

    async def waiting() -> bool:
        return Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner"

    return waiting


@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="needs /proc/PID/wchan")
async def test_sigterm_stops_a_run_waiting_for_a_named_pipes_writer(tmp_path: Path) -> None:
    """``run -i FIFO`` with no writer yet opened the pipe inside its event loop, where the
    open's wait could not be interrupted: SIGTERM and Ctrl-C did nothing, only kill -9
    ended it. The pipe is opened before the loop now: SIGTERM ends the wait, 75, one line
    saying nothing was read or sent; and with a writer the ids are deleted as from a file."""
    fifo = tmp_path / "ids.fifo"
    os.mkfifo(fifo)
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        process = await start_reaper(["run", "-i", str(fifo), "--yes"], reaper_env(sim.url))
        async with process:
            await until(_waits_on_a_pipe(process.pid), timeout=30)
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                _, stderr = await read_all(process)
        assert process.returncode == 75, stderr
        assert f"interrupted while --input {fifo} waited for a writer" in stderr
        assert sim.stats.calls == 0
        process = await start_reaper(["run", "-i", str(fifo), "--yes"], reaper_env(sim.url))
        async with process:
            await until(_waits_on_a_pipe(process.pid), timeout=30)
            with fifo.open("w") as writer:
                writer.write("\n".join(sim.job_ids()) + "\n")
            with anyio.fail_after(30):
                _, stderr = await read_all(process)
        assert process.returncode == 0, stderr
        assert len(sim.deleted) == 3


async def test_a_deadline_while_the_api_is_down_exits_69_with_the_ids_open(
    tmp_path: Path,
) -> None:
    """The circuit breaker waits out an outage instead of spending the retry budget; a
    deadline that strikes while the API is still down is 'unavailable' (69), not 75. The
    deadline counts from the event loop's start, and the circuit opens only after 8 failures
    over at least 2 s: at a deadline of 4 s a set-up slowed by a loaded host (CI, load 10)
    left the first calls too little time to open it, and the run said 75."""
    config = SimulatorConfig(jobs=40, faults=FaultConfig(unavailable=1.0))
    async with run_simulator(config) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--batch-size", "10", "--concurrency", "4",
             "--max-attempts", "50", "--deadline", "7", "--grace", "1"],
            reaper_env(sim.url),
        )  # fmt: skip
        assert done.code == 69, done.stderr
        summary = done.summary()
        assert summary["open"] == 40
        assert summary["stop_reason"] == "deadline"
        assert sim.deleted == set()


async def test_one_file_for_events_and_results_is_refused_before_any_call(
    tmp_path: Path,
) -> None:
    """``--events F --results F``: the results' writes went over the events appended there,
    leaving one event of the run's; refused (64) before anything is sent, as the input or
    the ledger is, whichever way the same file is named."""
    async with run_simulator(SimulatorConfig(jobs=10)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        same = tmp_path / "out.jsonl"
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--events", str(same),
             "--results", str(tmp_path / "." / "out.jsonl")],
            reaper_env(sim.url),
        )  # fmt: skip
        assert done.code == 64, done.stderr
        assert "is the --results file: it would be overwritten" in done.stderr
        assert sim.deleted == set() and sim.stats.delete_calls == 0
