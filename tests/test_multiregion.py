"""Two regions from one run, through the real path: `devserver-reaper run` in a process of
its own, against two `devserver-reaper simulate` processes (one project each). A DELETE
goes to one project only, at its own endpoint; a region whose simulator is gone leaves the
other's ids untouched, and its own ids open, never called deleted. No timing is asserted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.benchmarks.harness import AK, SK, SimProcess, simulator

pytestmark = pytest.mark.timeout(180)

HOME, AWAY = "proj-home", "proj-away"
JOBS = 60


def _env(home_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REAPER_", "HUAWEICLOUD_"))}
    env.update(
        REAPER_ENDPOINT=home_url, REAPER_REGION="cn-north-4", REAPER_PROJECT_ID=HOME,
        REAPER_AK=AK, REAPER_SK=SK, REAPER_LOG_FORMAT="json", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    return env


def _mixed(
    path: Path, home: list[str], away: list[str], away_url: str, *, project: bool = True
) -> Path:
    """The two projects' ids interleaved: the home ids name nothing (the default project),
    the away ids their project (unless not ``project``), region and endpoint."""
    lines = []
    named = {"project_id": AWAY} if project else {}
    for mine, theirs in zip(home, away, strict=True):
        lines.append(orjson.dumps({"id": mine}))
        lines.append(orjson.dumps({"id": theirs, **named, "region": "cn-east-3",
                                   "endpoint": away_url}))  # fmt: skip
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _command(tmp: Path, source: Path) -> list[str]:
    return [
        sys.executable, "-m", "worker", "run", "--input", str(source), "--yes",
        "--ledger", str(tmp / "ledger.db"), "--results", str(tmp / "results.jsonl"),
        "--batch-size", "7", "--concurrency", "4", "--rate", "200", "--max-attempts", "2",
        "--connect-timeout", "2", "--read-timeout", "5", "--grace", "5",
    ]  # fmt: skip


def _read(tmp: Path, stdout: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    events = [orjson.loads(line) for line in stdout.splitlines() if line.startswith(b"{")]
    results = (tmp / "results.jsonl").read_bytes().splitlines()
    return events, [orjson.loads(line) for line in results if line.strip()]


def _run(tmp: Path, env: dict[str, str], source: Path) -> tuple[int, list[dict[str, Any]],
                                                                 list[dict[str, Any]]]:  # fmt: skip
    done = subprocess.run(_command(tmp, source), env=env, capture_output=True, timeout=150,
                          check=False)  # fmt: skip
    return done.returncode, *_read(tmp, done.stdout)


def _deletions(sim: SimProcess) -> int:
    return int(sim.stats()["deletions"])


def test_each_delete_goes_to_its_own_project_and_every_id_is_deleted_there(
    tmp_path: Path,
) -> None:
    with (
        simulator(tmp_path, jobs=JOBS, project=HOME, seed=1) as home,
        simulator(tmp_path, jobs=JOBS, project=AWAY, seed=2) as away,
    ):
        source = _mixed(tmp_path / "mixed.jsonl", home.ids, away.ids, away.url)
        code, events, rows = _run(tmp_path, _env(home.url), source)
        assert code == 0, events[-1:]
        # each simulator deleted exactly its own jobs: no id went to the other's project
        # (it would have been answered without it, and found absent by a show call)
        assert _deletions(home) == JOBS
        assert _deletions(away) == JOBS
    outcomes = {row["job_id"]: (row["outcome"], row.get("project_id")) for row in rows}
    assert outcomes == {
        **dict.fromkeys(home.ids, ("deleted", None)),
        **dict.fromkeys(away.ids, ("deleted", AWAY)),
    }
    projects_of_batch: dict[str, set[str | None]] = defaultdict(set)
    for row in rows:
        projects_of_batch[row["batch_id"]].add(row.get("project_id"))
    assert all(len(projects) == 1 for projects in projects_of_batch.values())
    assert len(projects_of_batch) >= 2 * (JOBS // 7)
    summary = events[-1]
    assert summary["event"] == "run.summary"
    assert [
        (p["project_id"], p["region"], p["deleted"], p["out"]) for p in summary["projects"]
    ] == [
        (HOME, "cn-north-4", JOBS, False),
        (AWAY, "cn-east-3", JOBS, False),
    ]


def test_a_region_that_is_gone_leaves_the_others_ids_deleted_and_its_own_open(
    tmp_path: Path,
) -> None:
    with simulator(tmp_path, jobs=JOBS, project=HOME, seed=1) as home:
        with simulator(tmp_path, jobs=JOBS, project=AWAY, seed=2) as away:
            pass  # stopped before the run: its endpoint refuses every connection
        source = _mixed(tmp_path / "mixed.jsonl", home.ids, away.ids, away.url)
        code, events, rows = _run(tmp_path, _env(home.url), source)
        assert _deletions(home) == JOBS
    assert code == 69  # the API of a region unavailable: run again to finish its ids
    down = [e for e in events if e["event"] == "run.endpoint_down"]
    assert [(e["endpoint"], e["region"]) for e in down] == [(away.url, "cn-east-3")]
    outcomes = {row["job_id"]: row["outcome"] for row in rows}
    assert all(outcomes[i] == "deleted" for i in home.ids)
    assert not any(outcomes.get(i) == "deleted" for i in away.ids)
    summary = events[-1]
    assert summary["deleted"] == JOBS
    assert summary["open"] + summary["failed"] == JOBS  # every away id, honestly unfinished
    assert [(p["project_id"], p["out"]) for p in summary["projects"]] == [
        (HOME, False),
        (AWAY, True),
    ]
    # resumed once the region is back, the same command finishes the away ids only
    with simulator(tmp_path, jobs=JOBS, project=AWAY, seed=2) as back:
        source = _mixed(tmp_path / "again.jsonl", home.ids, back.ids, back.url)
        code, events, rows = _run(tmp_path, _env(home.url), source)
        assert code == 0, events[-1:]
        assert _deletions(back) == JOBS
    assert events[-1]["already_done"] == JOBS


def test_stopping_a_region_mid_run_sends_it_nothing_more(tmp_path: Path) -> None:
    """A simulator paused (SIGSTOP) once it has deleted a first batch of the run's: its
    later calls time out, its endpoint is taken out, the home region finishes; every away
    id called deleted is one its simulator deleted, and none it held while stopped."""
    with (
        simulator(tmp_path, jobs=JOBS, project=HOME, seed=1) as home,
        simulator(tmp_path, jobs=JOBS, project=AWAY, seed=2) as away,
    ):
        away.set_quota(5, burst=1)  # slow enough to be caught mid-run
        source = _mixed(tmp_path / "mixed.jsonl", home.ids, away.ids, away.url)
        run = subprocess.Popen(_command(tmp_path, source), env=_env(home.url),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        try:
            while _deletions(away) == 0:  # a condition, not a time: the run is under way
                assert run.poll() is None, "the run ended before the away region answered"
                time.sleep(0.01)
            os.kill(away.proc.pid, signal.SIGSTOP)
            stdout, _ = run.communicate(timeout=150)
        finally:
            os.kill(away.proc.pid, signal.SIGCONT)
            if run.poll() is None:
                run.kill()
        assert _deletions(home) == JOBS
        gone = _deletions(away)  # its deletions before the stop, and of calls it held
    events, rows = _read(tmp_path, stdout)
    assert run.returncode == 69
    assert [e["endpoint"] for e in events if e["event"] == "run.endpoint_down"] == [away.url]
    outcomes = {row["job_id"]: row["outcome"] for row in rows}
    assert all(outcomes[i] == "deleted" for i in home.ids)
    called_deleted = sum(outcomes.get(i) == "deleted" for i in away.ids)
    assert 1 <= called_deleted <= gone < JOBS  # stopped mid-run: some answered, not all
    assert all(outcomes.get(i) in {"deleted", "failed", None} for i in away.ids)


def test_a_project_the_keys_may_not_touch_is_left_open_and_the_others_finish(
    tmp_path: Path,
) -> None:
    """The away project answers every call 403 (the keys' IAM user has no ModelArts policy
    there; policies may be granted project by project): its ids stay open, never called
    deleted, the home project's are all deleted, and the run ends 77 naming the project."""
    with (
        simulator(tmp_path, jobs=JOBS, project=HOME, seed=1) as home,
        simulator(tmp_path, jobs=JOBS, project=AWAY, seed=2, flags=["--forbidden"]) as away,
    ):
        source = _mixed(tmp_path / "mixed.jsonl", home.ids, away.ids, away.url)
        code, events, rows = _run(tmp_path, _env(home.url), source)
        assert _deletions(home) == JOBS
        assert _deletions(away) == 0
    assert code == 77
    refused = [e for e in events if e["event"] == "run.project_refused"]
    assert [(e["project_id"], e["endpoint"]) for e in refused] == [(AWAY, away.url)]
    outcomes = {row["job_id"]: row["outcome"] for row in rows}
    assert all(outcomes[i] == "deleted" for i in home.ids)
    assert not any(outcomes.get(i) == "deleted" for i in away.ids)
    summary = events[-1]
    assert summary["deleted"] == JOBS
    assert summary["open"] + summary["failed"] == JOBS
    assert [(p["project_id"], p["out"]) for p in summary["projects"]] == [
        (HOME, False),
        (AWAY, True),
    ]


def test_a_region_named_without_its_project_id_gets_it_from_iam(tmp_path: Path) -> None:
    """The away lines name their region (and endpoint) only: the run asks IAM for the
    project named after the region, once, and sends them there."""
    with (
        simulator(tmp_path, jobs=JOBS, project=HOME, seed=1) as home,
        simulator(tmp_path, jobs=JOBS, project=AWAY, seed=2, region="cn-east-3") as away,
    ):
        source = _mixed(tmp_path / "mixed.jsonl", home.ids, away.ids, away.url, project=False)
        env = _env(home.url) | {"REAPER_IAM_ENDPOINT": away.url}
        code, events, rows = _run(tmp_path, env, source)
        assert code == 0, events[-1:]
        assert _deletions(away) == JOBS
        assert away.stats()["iam_calls"] == 1
    assert {row["project_id"] for row in rows if row["job_id"] in set(away.ids)} == {AWAY}
