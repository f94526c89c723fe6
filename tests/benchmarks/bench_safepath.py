"""Issue 20's benchmark: the safe path (a plan, protection by status or type) at the speed of
the plain one.

Run on demand (not part of the default suite):

    uv run pytest -m benchmark tests/benchmarks/bench_safepath.py -s

5,000 jobs, ``--rate 20``, ``--batch-size 50``, against ``devserver-reaper simulate`` in its
own process (a fresh one for every run, so every run deletes the same 5,000 jobs). Four ways
to delete them, each the real command in a child process:

- ``input``: ``run --input ids.txt``, no check at all: the figure to keep up with;
- ``plan``: ``run --plan`` of a plan ``discover --all`` wrote just before (not timed);
- ``protected``: ``run --input ids.txt --protected-statuses HELD --protected-types KEPT``:
  rules that protect none of these jobs but make every job's record be read, so the run
  deletes the same 5,000 jobs as ``input`` and only the checking differs.
- ``protected-some``: ``--protected-statuses PROCESSING`` protects a fifth of them (fewer
  DELETEs, so its ids/s counts skipped ids too; shown, not asserted).

The figure is ids/s from the run's own summary (ids with an outcome / the run's duration);
medians of ``BENCH_REPEATS`` (default 3) runs. The goal: plan and protected each >= 0.8 of
input. At rate 20 and 50 ids a call, input's ceiling is 1,000 ids/s.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.benchmarks.harness import AK, PROJECT, SK, simulator

pytestmark = pytest.mark.benchmark

JOBS = 5_000
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
COMMON = ["--rate", "20", "--batch-size", "50", "--yes"]


def reaper(url: str, args: list[str]) -> dict[str, Any]:
    """Run the CLI to the end (exit 0); its last JSON event (the summary for ``run``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REAPER_", "HUAWEICLOUD_"))}
    env.update(REAPER_ENDPOINT=url, REAPER_PROJECT_ID=PROJECT, REAPER_AK=AK, REAPER_SK=SK,
               REAPER_LOG_FORMAT="json")  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(b"{")]
    summary: dict[str, Any] = orjson.loads(lines[-1]) if lines else {}
    return summary


def one_run(tmp: Path, mode: str) -> dict[str, Any]:
    with simulator(tmp, jobs=JOBS) as sim:
        ids = tmp / "ids.txt"
        ids.write_text("\n".join(sim.ids) + "\n")
        if mode == "plan":
            plan = tmp / "plan.json"
            reaper(sim.url, ["discover", "--all", "--plan", str(plan), "--rate", "20"])
            args = ["run", "--plan", str(plan)]
        elif mode == "protected":
            args = ["run", "--input", str(ids), "--protected-statuses", "HELD",
                    "--protected-types", "KEPT"]  # fmt: skip
        elif mode == "protected-some":
            args = ["run", "--input", str(ids), "--protected-statuses", "PROCESSING"]
        else:
            args = ["run", "--input", str(ids)]
        summary = reaper(sim.url, [*args, *COMMON])
        assert summary.get("event") == "run.summary", summary
        finished = sum(summary[k] for k in ("deleted", "absent", "failed", "skipped"))
        assert finished == JOBS and summary["failed"] == 0
        if mode != "protected-some":
            assert summary["deleted"] == JOBS
        return summary


@pytest.mark.timeout(1800)
def test_the_safe_path_deletes_at_the_speed_of_the_plain_one(tmp_path: Path) -> None:
    modes = ("input", "plan", "protected", "protected-some")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for _ in range(REPEATS):
        for mode in modes:  # interleaved, so a busy moment of the machine hits every mode
            runs[mode].append(one_run(tmp_path, mode))
    speed = {mode: statistics.median(r["ids_per_s"] for r in runs[mode]) for mode in modes}
    print(f"\n{JOBS:,} jobs, --rate 20, --batch-size 50, median of {REPEATS}")
    print(f"{'mode':<16}{'ids/s':>8}{'ratio':>8}   checks (last run)")
    for mode in modes:
        checks = runs[mode][-1].get("checks", {})
        ratio = speed[mode] / speed["input"]
        print(f"{mode:<16}{speed[mode]:>8.0f}{ratio:>8.2f}   {checks}")
    assert speed["plan"] >= 0.8 * speed["input"]
    assert speed["protected"] >= 0.8 * speed["input"]
