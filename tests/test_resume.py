"""Crash and resume for real: `run` in a subprocess, killed, run again on the same ledger."""

from __future__ import annotations

import random
import signal
from collections import Counter
from pathlib import Path

import anyio
import orjson
import pytest

from tests.e2e import read_all, reaper, reaper_env, start_reaper, write_ids
from worker.simulator import FaultConfig, SimulatorConfig, run_simulator

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BATCH, CONCURRENCY = 10, 4
# The ids a kill can leave sent and unsettled: the dispatchers' batches, twice as many as the
# calls on the wire (a batch asleep on a Retry-After or a back-off, or waiting for a place
# for its show calls, holds its ids sent while another's call takes its place).
WINDOW = 2 * BATCH * CONCURRENCY


def run_args(src: Path, ledger: Path) -> list[str]:
    return ["run", "-i", str(src), "--yes", "--ledger", str(ledger),
            "--batch-size", str(BATCH), "--concurrency", str(CONCURRENCY),
            "--rate", "2000", "--burst", "50"]  # fmt: skip


async def ledger_outcomes(ledger: Path, env: dict[str, str]) -> list[dict[str, object]]:
    export = await reaper(["report", "--ledger", str(ledger), "--format", "jsonl"], env)
    assert export.code == 0, export.stderr
    return [orjson.loads(line) for line in export.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("seed", range(10))
async def test_kill_9_at_random_points_then_resume_loses_and_repeats_nothing(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    config = SimulatorConfig(
        jobs=400, seed=seed, faults=FaultConfig(latency_ms=4.0, latency_jitter=False)
    )
    async with run_simulator(config) as sim:
        real = sim.job_ids()
        valid = real + [f"ghost-{seed}-{n}" for n in range(10)]
        src = write_ids(tmp_path / "ids.txt", [*valid, "not valid!", *real[:20]])
        ledger = tmp_path / "ledger.db"
        env = reaper_env(sim.url)
        kills = 0
        for _ in range(3):  # several kills per run, at random points
            process = await start_reaper(run_args(src, ledger), env)
            async with process:
                before = sim.stats.delete_calls
                target = before + rng.randint(1, 12)
                with anyio.fail_after(30):
                    while sim.stats.delete_calls < target and process.returncode is None:
                        await anyio.sleep(0.005)
                if process.returncode is None:
                    process.kill()
                    kills += 1
                await process.wait()
        for _ in range(5):  # then run again until it finishes
            done = await reaper(run_args(src, ledger), env)
            if done.code != 75:
                break
        assert done.code == 1, done.stderr  # 1: the invalid line is rejected
        rows = await ledger_outcomes(ledger, env)
        per_id = Counter(str(row["job_id"]) for row in rows if row["outcome"] != "rejected")
        assert {str(row["job_id"]) for row in rows if row["outcome"] == "rejected"} == {
            "not valid!"
        }
        assert set(per_id) == set(valid)
        assert max(per_id.values()) == 1
        assert sim.deleted == set(real)
        assert max(sim.delete_counts.values()) == 1
        resent = sum(sim.sent_counts.values()) - len(sim.sent_counts)
        assert kills >= 1
        assert resent <= kills * WINDOW, f"{resent} ids sent again after {kills} kills"


async def test_sigterm_then_resume_exits_75_then_0(tmp_path: Path) -> None:
    """Interrupted, then the same command again: every id done once, in the ledger and in
    the results file the two runs share, and every invalid line in it once."""
    config = SimulatorConfig(jobs=600, faults=FaultConfig(latency_ms=10.0, latency_jitter=False))
    async with run_simulator(config) as sim:
        real = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", ["bad id!", *real[:300], "also/bad", *real[300:]])
        ledger, results = tmp_path / "ledger.db", tmp_path / "results.jsonl"
        env = reaper_env(sim.url)
        args = [*run_args(src, ledger), "--results", str(results)]
        process = await start_reaper(args, env)
        async with process:
            with anyio.fail_after(30):
                while sim.stats.delete_calls < 5:
                    await anyio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                _, stderr = await read_all(process)
        assert process.returncode == 75, stderr
        first = set(sim.deleted)
        assert 0 < len(first) < len(real)
        done = await reaper(args, env)
        assert done.code == 1, done.stderr  # the two invalid lines
        summary = done.summary()
        assert summary["already_done"] >= len(first) - WINDOW
        # One line per id and per invalid line between the two runs (the second truncated
        # the first's lines once, and wrote the invalid lines again).
        lines = [orjson.loads(line) for line in results.read_text().splitlines()]
        assert sorted(str(row["job_id"]) for row in lines if row["outcome"] != "rejected") == (
            sorted(real)
        )
        assert sorted((row["line"], row["job_id"]) for row in lines if "line" in row) == [
            (1, "bad id!"), (302, "also/bad"),
        ]  # fmt: skip
        # Lines a kill lost after the ledger's commit (here: cut from the file by hand) are
        # written again by the next run from the ledger, which holds every id's outcome:
        # that run found every id done, and used to start the file afresh, empty.
        results.write_text("".join(results.read_text().splitlines(keepends=True)[:100]))
        again = await reaper(args, env)
        assert again.code == 1, again.stderr
        rebuilt = [orjson.loads(line) for line in results.read_text().splitlines()]
        assert sorted(rebuilt, key=str) == sorted(lines, key=str)
        assert sim.deleted == set(real)
        assert max(sim.delete_counts.values()) == 1
        rows = await ledger_outcomes(ledger, env)
        assert sorted(rows, key=str) == sorted(lines, key=str)  # report says the same


async def test_a_second_process_on_the_same_ledger_is_refused(tmp_path: Path) -> None:
    # Slow enough (15 s of calls) that the first run is surely still going.
    config = SimulatorConfig(jobs=600, faults=FaultConfig(latency_ms=1000.0, latency_jitter=False))
    async with run_simulator(config) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        ledger = tmp_path / "ledger.db"
        env = reaper_env(sim.url)
        first = await start_reaper(run_args(src, ledger), env)
        async with first:
            with anyio.fail_after(30):
                while sim.stats.delete_calls < 2:
                    await anyio.sleep(0.01)
            second = await reaper(run_args(src, ledger), env)
            still_running = first.returncode is None
            first.send_signal(signal.SIGTERM)
            await read_all(first)
        assert still_running
        assert second.code == 78
        assert "ledger" in second.stdout + second.stderr


async def test_a_ledger_for_another_project_refuses_to_start(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        ledger = tmp_path / "ledger.db"
        env = reaper_env(sim.url)
        assert (await reaper([*run_args(src, ledger), "--dry-run"], env)).code == 0
        other = await reaper(run_args(src, ledger), {**env, "REAPER_PROJECT_ID": "other-project"})
        assert other.code == 78
        assert "project" in other.stdout + other.stderr
        assert sim.stats.delete_calls == 0


async def test_retry_failed_gives_failed_ids_another_chance(tmp_path: Path) -> None:
    """An id the API refused ends failed; a later run skips it unless --retry-failed, and
    exits 1 while it stays failed (a run resumed after an interruption exited 0 and hid
    the failures of the run before it)."""
    src_ids: list[str] = []
    ledger = tmp_path / "ledger.db"
    refusing = SimulatorConfig(jobs=20, seed=5, reject_ids=frozenset({"stubborn-1"}))
    async with run_simulator(refusing) as sim:
        port = int(sim.url.rsplit(":", 1)[1])
        src_ids = [*sim.job_ids(), "stubborn-1"]
        src = write_ids(tmp_path / "ids.txt", src_ids)
        first = await reaper(run_args(src, ledger), reaper_env(sim.url))
        assert first.code == 1, first.stderr
        assert first.summary()["failed"] == 1
    # The same endpoint again (same port), now accepting the id: it does not exist there.
    async with run_simulator(SimulatorConfig(jobs=0, seed=5), port=port) as sim:
        env = reaper_env(sim.url)
        plain = await reaper(run_args(src, ledger), env)
        assert plain.code == 1, plain.stderr  # the id is still failed: a rerun says so
        assert plain.summary()["already_done"] == len(src_ids)
        assert plain.summary()["already_failed"] == 1
        assert sim.stats.delete_calls == 0
        again = await reaper([*run_args(src, ledger), "--retry-failed"], env)
        assert again.code == 0, again.stderr
        assert again.summary()["absent"] == 1
        assert again.summary()["already_done"] == len(src_ids) - 1


async def test_a_dry_run_without_endpoint_or_project_leaves_the_ledger_to_the_real_run(
    tmp_path: Path,
) -> None:
    """A dry run needs no endpoint, project or keys; its ledger records placeholders for
    them, which the real run takes over (it was refused: "belongs to another project")."""
    ledger = tmp_path / "ledger.db"
    async with run_simulator(SimulatorConfig(jobs=12, seed=7)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        unset = ("REAPER_ENDPOINT", "REAPER_PROJECT_ID", "REAPER_AK", "REAPER_SK")
        bare = {k: v for k, v in reaper_env(sim.url).items() if k not in unset}
        dry = await reaper([*run_args(src, ledger), "--dry-run"], bare)
        assert dry.code == 0, dry.stderr
        real = await reaper(run_args(src, ledger), reaper_env(sim.url))
        assert real.code == 0, real.stdout + real.stderr
        assert real.summary()["deleted"] == 12 and len(sim.deleted) == 12
        other = await reaper(run_args(src, ledger), reaper_env(sim.url, REAPER_PROJECT_ID="p2"))
        assert other.code == 78  # now bound to the real project, as any ledger is


async def test_skipped_ids_are_decided_again_by_the_next_run(tmp_path: Path) -> None:
    """A dry run, then the same command for real on the same ledger, deletes; a run capped
    by --max-deletions is followed by one that deletes the next ids. (skipped was final in
    the ledger: the real run found every id already_done, deleted nothing and exited 0.)"""
    ledger = tmp_path / "ledger.db"
    async with run_simulator(SimulatorConfig(jobs=30, seed=6)) as sim:
        ids = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", ids)
        env = reaper_env(sim.url)
        dry = await reaper([*run_args(src, ledger), "--dry-run"], env)
        assert dry.code == 0, dry.stderr
        assert dry.summary()["skipped"] == 30 and sim.stats.delete_calls == 0
        capped = await reaper([*run_args(src, ledger), "--max-deletions", "10"], env)
        assert capped.code == 1, capped.stderr  # the cap left work undone on purpose
        assert capped.summary()["deleted"] == 10 and capped.summary()["skipped"] == 20
        rest = await reaper(run_args(src, ledger), env)
        assert rest.code == 0, rest.stderr
        assert rest.summary()["deleted"] == 20
        assert rest.summary()["already_done"] == 10
        assert sim.deleted == set(ids)
        assert max(sim.delete_counts.values()) == 1


@pytest.mark.parametrize("stopped", ["checking", "asleep"])
async def test_ids_an_answer_said_were_not_deleted_are_not_called_deleted_after_a_stop(
    tmp_path: Path, stopped: str
) -> None:
    """Ids that never were jobs, stopped (Ctrl-C) after an answer said no DELETE applied
    them: ``checking``, a 200 that left them out, with the run checking them one show call
    at a time; ``asleep``, a 429, with the batch asleep on its Retry-After. The run that
    resumes finds them gone: ``absent``, as a run never stopped says, not ``deleted``
    (``answer_lost``) by a DELETE whose answer was heard."""
    checking = stopped == "checking"
    config = SimulatorConfig(jobs=0, quota=0.0 if checking else 4.0, burst=1)
    async with run_simulator(config) as sim:
        phantoms = [f"phantom-{n:04d}" for n in range(200 if checking else 12)]
        src = write_ids(tmp_path / "ids.txt", phantoms)
        ledger = tmp_path / "ledger.db"
        env = reaper_env(sim.url)
        args = ["run", "-i", str(src), "--yes", "--ledger", str(ledger), "-q",
                "--batch-size", "100" if checking else "4", "--concurrency", "2",
                "--rate", "20" if checking else "50"]  # fmt: skip
        process = await start_reaper(args, env)
        async with process:
            with anyio.fail_after(30):  # the checks under way, or a 429 come back
                while (sim.stats.show_calls < 5) if checking else (sim.stats.throttled < 1):
                    await anyio.sleep(0.005)
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(30):
                _, stderr = await read_all(process)
        assert process.returncode == 75, stderr
        assert sim.stats.deletions == 0
        done = await reaper(args, env)
        assert done.code == 0, done.stderr
        rows = await ledger_outcomes(ledger, env)
        outcomes = Counter(str(row["outcome"]) for row in rows)
        assert outcomes == {"absent": len(phantoms)}, outcomes
