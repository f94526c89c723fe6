"""A ledger whose disk fills midway: `run` in a subprocess whose files may not grow past a
size (``RLIMIT_FSIZE``: a write past it fails as on a full disk), then run again."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e import reaper, reaper_env, results, write_ids
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = pytest.mark.anyio


async def test_a_ledger_that_fills_midway_stops_75_and_the_resume_settles_every_id_once(
    tmp_path: Path,
) -> None:
    """It ended with a traceback, exit 1 ("some ids failed") and no summary, while the calls
    of jobs it had deleted went unrecorded. Now it stops as on SIGTERM (75) with the error
    in its summary; every job.deleted it said is a job the API deleted; and the same
    command with room again settles every id once, those whose outcome the full disk kept
    out found gone (deleted, unconfirmed), none sent by the first run sent twice."""
    jobs = 3000
    async with run_simulator(SimulatorConfig(jobs=jobs)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        ledger = tmp_path / "reaper.db"
        args = ["run", "-i", str(src), "--yes", "--ledger", str(ledger), "--rate", "2000",
                "--burst", "50"]  # fmt: skip
        env = reaper_env(sim.url)
        full = await reaper(args, env, files_up_to=512 * 1024)
        assert full.code == 75, full.stderr
        assert "Traceback" not in full.stderr
        first = full.summary()
        assert f"ledger {ledger} cannot be written" in first["error"]
        assert first["open"] > 0
        said = {event["job_id"] for event in full.events("job.deleted")}
        assert said <= sim.deleted
        assert len(said) == first["deleted"]

        out = tmp_path / "results.jsonl"
        done = await reaper([*args, "--results", str(out)], env)
        assert done.code == 0, done.stderr
        assert done.summary()["already_done"] == first["deleted"]
        rows = results(out)
        assert Counter(row["job_id"] for row in rows) == Counter(set(sim.deleted))
        assert {row["outcome"] for row in rows} == {"deleted"}
        assert len(sim.deleted) == jobs and not sim.job_ids()


async def test_a_temporary_ledger_that_cannot_spill_stops_75_without_a_traceback(
    tmp_path: Path,
) -> None:
    """Past 100,000 ids a run without --ledger moves the ids it has seen to an SQLite file
    in TMPDIR; a full TMPDIR ended the run with a traceback and exit 1. Now 75, the error
    said in the summary."""
    src = write_ids(tmp_path / "ids.txt", [str(uuid.UUID(int=n)) for n in range(150_000)])
    env = reaper_env("http://127.0.0.1:9", TMPDIR=str(tmp_path))
    done = await reaper(["run", "-i", str(src), "--dry-run", "-q"], env, files_up_to=1 << 20)
    assert done.code == 75, done.stderr
    assert "Traceback" not in done.stderr
    error = done.summary()["error"]
    assert "temporary ledger" in error and "cannot be written" in error
