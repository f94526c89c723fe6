"""The ledger's own throughput: admissions/s, sends marked/s and outcomes/s.

Run on demand (not part of the default suite):

    uv run pytest -m benchmark tests/benchmarks/bench_ledger.py -s

The access pattern is the pipeline's: admit a chunk of 1,000 ids, mark them sent in batches
of 50, record each batch's outcomes. Two kinds of ids: sequential (``job-000000000001``, the
best case for a B-tree) and random UUIDs (what ModelArts hands out, the worst case: every
insert lands on a random index page). A third figure is a resumed run re-admitting ids that
all already have an outcome. Median of 3 runs on a fresh ledger each; ``BENCH_LEDGER_N``
changes the size (default 1,000,000).
"""

from __future__ import annotations

import os
import random
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from worker.ledger import Ledger
from worker.types import Candidate, Outcome, Result

pytestmark = pytest.mark.benchmark

N = int(os.environ.get("BENCH_LEDGER_N", "1000000"))
CHUNK = 1000
BATCH = 50
REPEATS = 3


def sequential(n: int) -> list[str]:
    return [f"job-{i:012d}" for i in range(n)]


def random_uuids(n: int) -> list[str]:
    rnd = random.Random(4)
    return [str(uuid.UUID(int=rnd.getrandbits(128), version=4)) for _ in range(n)]


def one_run(path: Path, ids: list[str]) -> dict[str, float]:
    """Seconds spent in each ledger call over ``ids``, plus the resumed run's admit."""
    spent = {"admit": 0.0, "mark_sent": 0.0, "record": 0.0, "resume": 0.0}
    clock = time.perf_counter
    with Ledger.open(path, project_id="bench", endpoint="http://127.0.0.1:1", run_id="r1") as led:
        for start in range(0, len(ids), CHUNK):
            chunk = [Candidate(job_id, n) for n, job_id in enumerate(ids[start : start + CHUNK])]
            t0 = clock()
            admission = led.admit(chunk)
            spent["admit"] += clock() - t0
            new = [c.job_id for c in admission.new]
            for b in range(0, len(new), BATCH):
                batch, batch_id = new[b : b + BATCH], f"b-{start + b}"
                t0 = clock()
                led.mark_sent(batch_id, batch, 1)
                spent["mark_sent"] += clock() - t0
                results = [
                    Result(i, Outcome.DELETED, 1, batch_id, 200, request_id="r") for i in batch
                ]
                t0 = clock()
                led.record(results)
                spent["record"] += clock() - t0
    with Ledger.open(path, project_id="bench", endpoint="http://127.0.0.1:1", run_id="r2") as led:
        for start in range(0, len(ids), CHUNK):
            chunk = [Candidate(job_id, n) for n, job_id in enumerate(ids[start : start + CHUNK])]
            t0 = clock()
            admission = led.admit(chunk)
            spent["resume"] += clock() - t0
            assert len(admission.done) == len(chunk)
    return spent


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("kind", [sequential, random_uuids], ids=["sequential", "uuid"])
def test_ledger_throughput(tmp_path: Path, kind: Callable[[int], list[str]]) -> None:
    ids = kind(N)
    runs = []
    size_mb = 0.0
    for repeat in range(REPEATS):
        path = tmp_path / f"ledger-{repeat}.sqlite"
        runs.append(one_run(path, ids))
        size_mb = path.stat().st_size / 1e6
    print(f"\nledger, {N:,} {kind.__name__} ids, median of {REPEATS}, file {size_mb:.0f} MB")
    for op, label in (
        ("admit", "admissions/s (chunks of 1000)"),
        ("mark_sent", "sends marked/s (batches of 50)"),
        ("record", "outcomes/s (batches of 50)"),
        ("resume", "re-admissions/s of settled ids"),
    ):
        seconds = statistics.median(run[op] for run in runs)
        print(f"  {label:<34}{N / seconds:>12,.0f}")
    total = statistics.median(run["admit"] + run["mark_sent"] + run["record"] for run in runs)
    print(f"  {'ids/s through all three':<34}{N / total:>12,.0f}")
