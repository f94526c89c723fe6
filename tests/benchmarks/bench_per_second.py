"""``--rate auto`` against a gateway counting calls per whole second (``FixedWindow``: its
count starts again at each second, so its refusals come in a clump at the end of one), on
virtual time: quotas of 150, 200, 300 and 500 calls/s; answers 5, 50 and 100 ms later;
8, 32 and 64 in flight; each cell with that latency fixed, and drawn exponential around it
with sends about 2 ms late (seeds 1-3). 144 runs, the same figures every time.

    uv run pytest -m benchmark tests/benchmarks/bench_per_second.py -s -p no:randomly -n 0

Printed per cell: the share of what can be reached (the quota, or what the concurrency
allows at that latency) accepted from 10 s to 40 s, and the share refused; then the cells
that miss issue 23's goal (at least 0.90, at most 2 %) and the range refused per quota.
"""

from __future__ import annotations

import itertools
import random

import pytest

from tests.benchmarks.harness import record
from tests.fakes import Run, simulate

pytestmark = pytest.mark.benchmark

QUOTAS = (150.0, 200.0, 300.0, 500.0)
LATENCIES = (0.005, 0.05, 0.1)
CONCURRENCY = (8, 32, 64)
SEEDS = (None, 1, 2, 3)
"""``None``: the latency fixed, no send jitter; a seed: drawn, and sends late."""


def _run(quota: float, latency: float, concurrency: int, seed: int | None) -> Run:
    if seed is None:
        return simulate(lambda t: quota, duration=40.0, latency=latency,
                        concurrency=concurrency, windowed=True)  # fmt: skip
    draws, late = random.Random(seed + 100), random.Random(seed)
    return simulate(lambda t: quota, duration=40.0, concurrency=concurrency, windowed=True,
                    latency=lambda rate: draws.expovariate(1.0 / latency),
                    jitter=lambda: late.expovariate(500.0))  # fmt: skip


def test_a_per_second_gateway_across_quotas_latencies_and_concurrency() -> None:
    rows = []
    for quota, latency, concurrency, seed in itertools.product(
        QUOTAS, LATENCIES, CONCURRENCY, SEEDS
    ):
        run = _run(quota, latency, concurrency, seed)
        used = run.accepted_per_s(10.0, 40.0) / min(quota, concurrency / latency)
        refused = run.refused_share(10.0, 40.0)
        ok = used >= 0.90 and refused <= 0.02
        rows.append((quota, refused, ok))
        drawn = "fixed" if seed is None else f"seed {seed}"
        print(f"{quota:3g} calls/s {latency * 1000:3g} ms {concurrency:2d} in flight {drawn:7}: "
              f"{used:.2f} used, {refused:5.2%} refused", "" if ok else "MISSED")  # fmt: skip
    met = sum(row[-1] for row in rows)
    print(f"\n{met} of {len(rows)} meet the goal")
    refused_by_quota = {
        f"{quota:g}": [round(min(r[1] for r in rows if r[0] == quota), 4),
                       round(max(r[1] for r in rows if r[0] == quota), 4)]
        for quota in QUOTAS
    }  # fmt: skip
    print(f"refused from 10 s on, per quota: {refused_by_quota}")
    record("rate_auto_per_second_gateway", met=met, runs=len(rows), refused=refused_by_quota)
