"""Two regions from one `run`: two simulator processes (one project each, a gateway quota
each) and one mixed input. Goals (issue 25, point 3):

- each project's quota held separately: >= 0.95 of each, <= 1 % of its calls throttled;
- a region whose simulator is stopped mid-run (SIGSTOP: its calls hang and time out)
  leaves the other region's work unaffected (all its ids deleted, at >= 0.95 of its
  quota), and its own ids end honestly: open or failed, never `deleted` unless its
  simulator deleted them; the run exits 69.

BENCH_REPEATS=3 uv run pytest -m benchmark tests/benchmarks/bench_multiregion.py -s -p no:randomly

The share of a quota is measured at its simulator, as bench_shards does: DELETE calls it
accepted between its first and its last deletion, over that time, over the quota (for the
region left running while the other is stopped, the same). ``BENCH_REPEATS`` (default 3)
runs of each; medians are reported.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.benchmarks.harness import AK, SK, SimProcess, simulator

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(1800)]

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
QUOTA = 50.0
BATCH = 10
JOBS = 5_000  # 500 DELETE calls a region: 10 s at the quota
HOME, AWAY = "proj-home", "proj-away"
CONCURRENCY = 16  # shared fairly by the regions with work: 8 each, what one region gets alone


def _env(home: SimProcess) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REAPER_", "HUAWEICLOUD_"))}
    env.update(
        REAPER_ENDPOINT=home.url, REAPER_REGION="cn-north-4", REAPER_PROJECT_ID=HOME,
        REAPER_AK=AK, REAPER_SK=SK, REAPER_LOG_FORMAT="json", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    return env


def _mixed(path: Path, home: SimProcess, away: SimProcess) -> Path:
    lines = []
    for mine, theirs in zip(home.ids, away.ids, strict=True):
        lines.append(orjson.dumps({"id": mine}))
        lines.append(orjson.dumps({"id": theirs, "project_id": AWAY, "region": "cn-east-3",
                                   "endpoint": away.url}))  # fmt: skip
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _args(source: Path, tmp: Path) -> list[str]:
    return [sys.executable, "-m", "worker", "run", "-i", str(source), "--yes",
            "--ledger", str(tmp / "ledger.db"), "--results", str(tmp / "results.jsonl"),
            "--batch-size", str(BATCH), "--rate", str(QUOTA), "--burst", "1",
            "--concurrency", str(CONCURRENCY), "--max-attempts", "3", "--connect-timeout", "2",
            "--read-timeout", "3", "--grace", "5"]  # fmt: skip


def _share(stats: dict[str, Any]) -> tuple[float, float]:
    """(share of the quota, share of DELETE calls throttled), at the simulator."""
    accepted = stats["delete_calls"] - stats["throttled"]
    span = stats["last_delete_at"] - stats["first_delete_at"]
    return (accepted - 1) / span / QUOTA, stats["throttled"] / stats["delete_calls"]


def _outcomes(tmp: Path) -> dict[str, str]:
    rows = (orjson.loads(line) for line in (tmp / "results.jsonl").read_bytes().splitlines())
    return {row["job_id"]: row["outcome"] for row in rows}


def _alone(tmp: Path) -> float:
    """The baseline, measured beside the others: one region alone, its ids naming nothing,
    at the concurrency one region gets of two (8): its share of its quota."""
    with simulator(tmp, jobs=JOBS, quota=QUOTA, burst=5, project=HOME, seed=1) as home:
        source = tmp / "ids.txt"
        source.write_text("\n".join(home.ids) + "\n")
        args = _args(source, tmp)
        args[args.index("--concurrency") + 1] = str(CONCURRENCY // 2)
        done = subprocess.run(args, env=_env(home), capture_output=True, timeout=600,
                              check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:]
        stats = home.stats()
        assert stats["deletions"] == JOBS
    return _share(stats)[0]


def _both(tmp: Path) -> tuple[float, float, float, float]:
    """Both regions up: each one's share of its quota and share throttled."""
    with (
        simulator(tmp, jobs=JOBS, quota=QUOTA, burst=5, project=HOME, seed=1) as home,
        simulator(tmp, jobs=JOBS, quota=QUOTA, burst=5, project=AWAY, seed=2) as away,
    ):
        source = _mixed(tmp / "mixed.jsonl", home, away)
        done = subprocess.run(_args(source, tmp), env=_env(home), capture_output=True,
                              timeout=600, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:]
        home_stats, away_stats = home.stats(), away.stats()
        assert home_stats["deletions"] == away_stats["deletions"] == JOBS
        outcomes = _outcomes(tmp)
        assert all(outcomes[i] == "deleted" for i in [*home.ids, *away.ids])
    return (*_share(home_stats), *_share(away_stats))


def _one_stopped(tmp: Path) -> tuple[float, float, int, int, int]:
    """The away region's simulator stopped once it has deleted a third of its jobs: the
    home region's share and share throttled, and of the away ids, how many the run called
    deleted, how many its simulator deleted, and how many ended open or failed."""
    with (
        simulator(tmp, jobs=JOBS, quota=QUOTA, burst=5, project=HOME, seed=1) as home,
        simulator(tmp, jobs=JOBS, quota=QUOTA, burst=5, project=AWAY, seed=2) as away,
    ):
        source = _mixed(tmp / "mixed.jsonl", home, away)
        proc = subprocess.Popen(_args(source, tmp), env=_env(home), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        stopped = threading.Event()

        def watch() -> None:  # stop the away simulator a third of the way through
            assert proc.stdout is not None
            seen = 0
            for line in proc.stdout:
                if not stopped.is_set() and b'"job.deleted"' in line and AWAY.encode() in line:
                    seen += 1
                    if seen >= JOBS // 3:
                        os.kill(away.proc.pid, signal.SIGSTOP)
                        stopped.set()

        reader = threading.Thread(target=watch, daemon=True)
        reader.start()
        code = proc.wait(timeout=600)
        reader.join(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
        assert stopped.is_set(), "the away region finished before it could be stopped"
        os.kill(away.proc.pid, signal.SIGCONT)
        assert code == 69, code
        home_stats, away_stats = home.stats(), away.stats()
        assert home_stats["deletions"] == JOBS
        outcomes = _outcomes(tmp)
        assert all(outcomes[i] == "deleted" for i in home.ids)
        called = sum(outcomes.get(i) == "deleted" for i in away.ids)
        unfinished = sum(outcomes.get(i) in (None, "failed") for i in away.ids)
        assert called <= away_stats["deletions"], "an away id called deleted its region kept"
        assert called + unfinished == JOBS
    return (*_share(home_stats), called, int(away_stats["deletions"]), unfinished)


def test_two_regions_hold_each_quota_and_an_outage_stays_in_its_region(tmp_path: Path) -> None:
    both, alone = [], []
    for n in range(REPEATS):
        run = tmp_path / f"both-{n}"
        run.mkdir()
        both.append(_both(run))
        run = tmp_path / f"alone-{n}"
        run.mkdir()
        alone.append(_alone(run))
    baseline = statistics.median(alone)
    print(f"\none region alone (the baseline), {REPEATS} runs, median: {baseline:.3f}")
    home_share, home_throttled, away_share, away_throttled = (
        statistics.median(values) for values in zip(*both, strict=True)
    )
    print(
        f"both regions up, {REPEATS} runs, medians: home {home_share:.3f} of its quota "
        f"({home_throttled:.2%} throttled), away {away_share:.3f} ({away_throttled:.2%})"
    )
    stopped = []
    for n in range(REPEATS):
        run = tmp_path / f"stopped-{n}"
        run.mkdir()
        stopped.append(_one_stopped(run))
    for share, throttled, called, gone, unfinished in stopped:
        print(
            f"away stopped mid-run: home {share:.3f} of its quota ({throttled:.2%} "
            f"throttled); away: {called} called deleted, {gone} deleted by its simulator, "
            f"{unfinished} open or failed"
        )
    stopped_share = statistics.median(s[0] for s in stopped)
    stopped_throttled = statistics.median(s[1] for s in stopped)
    print(f"away stopped, medians: home {stopped_share:.3f} ({stopped_throttled:.2%} throttled)")
    print(
        f"ratios to the baseline: both up {home_share / baseline:.3f} / "
        f"{away_share / baseline:.3f}, away stopped {stopped_share / baseline:.3f}"
    )
    assert home_share >= 0.95 and away_share >= 0.95
    assert home_throttled <= 0.01 and away_throttled <= 0.01
    assert stopped_share >= 0.95
    assert stopped_throttled <= 0.01
