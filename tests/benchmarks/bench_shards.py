"""A sharded run: four `run --shard i/4` processes against one simulator, sharing one rate
limit through Redis: issue 23's fleet goals, "the same for sharded one-shot runs". With
``--rate N``, together >= 0.97 of N with <= 1 % of calls throttled, and every id exactly one
outcome across the four ledgers merged by `report`. On `--rate auto` (one controller for the
four, ``worker.pacing.fleet``), a quota they are not told: >= 0.90 of it from 15 s on with
<= 2 % throttled; the whole run, start-up from 2 calls/s included, is said beside it.

    BENCH_REPEATS=3 uv run pytest -m benchmark tests/benchmarks/bench_shards.py -s -p no:randomly

The simulator is a process of its own (``harness.simulator``). The share of the quota is
measured at the simulator: DELETE calls it accepted between its first and its last deletion,
over that time, over the quota; from ``SETTLED`` s on, the calls whose quota check came
``SETTLED`` s or more after the first (``/_sim/arrivals``). ``BENCH_REPEATS`` (default 3)
runs; medians are reported.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest

from tests.benchmarks.harness import AK, PROJECT, SK, Arrivals, simulator
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.benchmark

REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
SHARDS = 4
QUOTA = 50.0
BATCH = 10
JOBS = 8_000  # 800 calls: 16 s at the quota
SETTLED = 15.0  # issue 23's fleet goal for auto counts from 15 s on


def _env(url: str, stream: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REAPER_", "HUAWEICLOUD_"))}
    env.update(
        REAPER_ENDPOINT=url, REAPER_PROJECT_ID=PROJECT, REAPER_AK=AK, REAPER_SK=SK,
        REAPER_LOG_FORMAT="json",
    )  # fmt: skip
    if stream is not None:
        env.update(REAPER_REDIS_URL=REDIS_URL, REAPER_STREAM=stream)
    return env


def _settled(arrivals: Arrivals) -> tuple[float, float]:
    """(share of the quota, share throttled) of the calls checked ``SETTLED`` s or more after
    the first, up to the last."""
    checked = arrivals.checked
    late = [ok for at, ok in zip(checked, arrivals.accepted, strict=True)
            if at >= checked[0] + SETTLED]  # fmt: skip
    span = checked[-1] - (checked[0] + SETTLED)
    if span <= 0:
        return math.nan, math.nan
    return sum(late) / span / QUOTA, late.count(False) / max(1, len(late))


def _one_run(
    tmp: Path, shards: int, rate: str = f"{QUOTA:g}", jobs: int = JOBS
) -> tuple[float, float, float, float]:
    """(share of the quota, share throttled, the same two from ``SETTLED`` s on) of one run
    split in ``shards`` processes (sharing a limit in Redis), or of one plain process
    (``shards`` 0). Every id must end with exactly one outcome across the ledgers merged by
    ``report``."""
    stream = f"reaper-bench:{uuid.uuid4().hex[:8]}:ids" if shards else None
    count = shards or 1
    with simulator(tmp, jobs=jobs, quota=QUOTA, burst=5) as sim:
        ids = tmp / "ids.txt"
        ids.write_text("\n".join(sim.ids) + "\n")
        ledgers = [tmp / f"shard-{i}.db" for i in range(count)]
        env = _env(sim.url, stream)

        def args(i: int) -> list[str]:
            shard = ["--shard", f"{i}/{shards}"] if shards else []
            return [sys.executable, "-m", "worker", "run", "-i", str(ids), "--yes", *shard,
                    "--ledger", str(ledgers[i]), "--batch-size", str(BATCH),
                    "--rate", rate, "--burst", "1", "--concurrency", "8"]  # fmt: skip

        out = subprocess.DEVNULL
        procs = [subprocess.Popen(args(i), env=env, stdout=out, stderr=out) for i in range(count)]
        codes = [proc.wait(timeout=600) for proc in procs]
        assert codes == [0] * count, codes
        stats = sim.stats()
        settled = _settled(sim.arrivals())
    accepted = stats["delete_calls"] - stats["throttled"]
    span = stats["last_delete_at"] - stats["first_delete_at"]
    share = (accepted - 1) / span / QUOTA  # calls after the first, over the time they took
    throttled = stats["throttled"] / stats["delete_calls"]
    report = subprocess.run(
        [sys.executable, "-m", "worker", "report", *map(str, ledgers), "--format", "jsonl"],
        env=env, capture_output=True, check=True,
    )  # fmt: skip
    once = Counter(orjson.loads(line)["job_id"] for line in report.stdout.splitlines())
    assert set(once) == set(sim.ids), "an id without an outcome, or one never read"
    assert max(once.values()) == 1, "an id with two outcomes across the shards"
    assert stats["deleted"] == jobs
    for ledger in tmp.glob("shard-*"):
        ledger.unlink()
    return share, throttled, *settled


@pytest.mark.timeout(1200)
def test_four_shards_share_one_quota(tmp_path: Path) -> None:
    single = [_one_run(tmp_path, 0) for _ in range(REPEATS)]
    sharded = [_one_run(tmp_path, SHARDS) for _ in range(REPEATS)]
    figures = {
        name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        for name, runs in (("one process", single), (f"{SHARDS} shards", sharded))
    }
    print(
        f"\n--rate {QUOTA:g} --burst 1, quota {QUOTA:g} calls/s (gateway burst 5), {JOBS:,} ids "
        f"in batches of {BATCH}; medians of {REPEATS} runs; every id one outcome across the "
        "merged ledgers:"
    )
    for name, (share, throttled) in figures.items():
        print(f"  {name:<12} share of the quota {share:.3f}  throttled {throttled:.2%}")
    share, throttled = figures[f"{SHARDS} shards"]
    print(f"  sharded / one process: {share / figures['one process'][0]:.3f}")
    assert share >= 0.97
    assert throttled <= 0.01


@pytest.mark.timeout(1200)
def test_four_shards_on_auto_share_one_estimate(tmp_path: Path) -> None:
    jobs = 16_000  # 1,600 calls: 32 s at the quota
    runs = [_one_run(tmp_path, SHARDS, "auto", jobs) for _ in range(REPEATS)]
    share, throttled, settled, settled_throttled = (
        statistics.median(column) for column in zip(*runs, strict=True)
    )
    print(
        f"\n{SHARDS} shards on --rate auto, quota {QUOTA:g} calls/s (gateway burst 5), "
        f"{jobs:,} ids in batches of {BATCH}; medians of {REPEATS} runs: first to last "
        f"deletion, share of the quota {share:.3f}  throttled {throttled:.2%}; from "
        f"{SETTLED:g} s on, {settled:.3f}  throttled {settled_throttled:.2%}  "
        f"(runs: {[tuple(round(x, 4) for x in run) for run in runs]})"
    )
    assert settled >= 0.90
    assert settled_throttled <= 0.02
