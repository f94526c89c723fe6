"""Issue 20's memory benchmark: a 200,000-job plan, written by discover and applied (and
dry-run) by run, each in at most 150 MB of peak RSS.

Run on demand (not part of the default suite):

    uv run pytest -m benchmark tests/benchmarks/bench_plan_memory.py -s

``devserver-reaper simulate`` holds the 200,000 jobs in its own process. Each step is the
real command in a child process, its peak RSS that child's ``ru_maxrss``: ``discover --all
--plan`` (the listing read page by page, the jobs spooled to disk as they come), ``run
--plan --dry-run`` (every job checked against the live ones, nothing sent) and ``run
--plan`` (every job checked and deleted). The plan is opened through a private SQLite copy
of its jobs, never held in memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks.bench_scale import measure
from tests.benchmarks.harness import AK, PROJECT, SK, simulator

pytestmark = pytest.mark.benchmark

JOBS = 200_000
LIMIT_MB = 150.0


@pytest.mark.timeout(1800)
def test_a_200k_job_plan_is_written_and_applied_in_bounded_memory(tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    fast = ["--rate", "1000", "--burst", "100", "--batch-size", "500", "--concurrency", "8"]
    with simulator(tmp_path, jobs=JOBS) as sim:
        env = {"REAPER_ENDPOINT": sim.url, "REAPER_PROJECT_ID": PROJECT, "REAPER_AK": AK,
               "REAPER_SK": SK}  # fmt: skip
        steps = {
            "discover --all --plan": ["discover", "--all", "--plan", str(plan), "--rate", "1000"],
            "run --plan --dry-run": ["run", "--plan", str(plan), "--dry-run", *fast],
            "run --plan": ["run", "--plan", str(plan), "--yes", *fast],
        }
        figures = {name: measure(args, env) for name, args in steps.items()}
        left = sim.stats()["jobs"]
    size_mb = plan.stat().st_size / 1e6
    print(f"\n{JOBS:,} jobs, plan of {size_mb:.1f} MB")
    print(f"{'step':<24}{'seconds':>9}{'peak RSS MB':>13}")
    for name, (seconds, rss) in figures.items():
        print(f"{name:<24}{seconds:>9.1f}{rss:>13.1f}")
    assert left == 0  # the run deleted every planned job
    for name, (_, rss) in figures.items():
        assert rss <= LIMIT_MB, f"{name}: {rss:.1f} MB"
