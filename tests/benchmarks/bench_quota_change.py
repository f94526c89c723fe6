"""Issue 23's quota change (50 -> 20 -> 50 calls/s) at every moment of the probe's cycle:
the fall moved 0-5.5 s after 30 s, the rise 0-5.5 s after 60 s, in 0.5 s steps, against
the six gateways of ``tests/test_rate_matrix.py``'s quota-change cells (bursts 1, 2 and
10; 5 and 50 ms; 8 in flight): 144 runs on virtual time (``tests.fakes.quota_change``), so
no machine enters the figures and every run gives the same ones.

    uv run pytest -m benchmark tests/benchmarks/bench_quota_change.py -s -p no:randomly

The goal for each run: every rate paced from 10 s after the change on within 10 % of the
new quota, and at most 2 % of calls throttled after the change's first 2 s. Printed per
run: seconds until followed (the last rate paced outside 10 %), the share throttled;
then the count that meet the goal and the ranges for each direction.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from tests.benchmarks.harness import record
from tests.fakes import followed_after, quota_change, simulate

pytestmark = pytest.mark.benchmark

OFFSETS = tuple(k / 2.0 for k in range(12))
BURSTS = (1, 2, 10)
LATENCIES = (0.005, 0.05)


def _one(kind: str, offset: float, burst: int, latency: float) -> tuple[float, float]:
    """Seconds until the change is followed, and the share throttled after its first 2 s."""
    run, start = quota_change(kind, offset, burst=burst, latency=latency)
    end, quota = (60.0, 20.0) if kind == "fall" else (start + 30.0, 50.0)
    return followed_after(run, start, end, quota), run.refused_share(start + 2.0, end)


def test_the_quota_change_at_every_moment() -> None:
    rows = []
    for kind, burst, latency, offset in itertools.product(
        ("fall", "rise"), BURSTS, LATENCIES, OFFSETS
    ):
        followed, refused = _one(kind, offset, burst, latency)
        ok = followed < 10.0 and refused <= 0.02
        rows.append((kind, offset, burst, latency, followed, refused, ok))
        print(f"{kind} +{offset:3.1f} s  burst {burst:2d}  {latency * 1000:2g} ms: followed in "
              f"{followed:4.1f} s, {refused:5.2%} throttled", "" if ok else "MISSED")  # fmt: skip
    met = sum(row[-1] for row in rows)
    print(f"\n{met} of {len(rows)} meet the goal")
    figures = {}
    for kind in ("fall", "rise"):
        mine = [row for row in rows if row[0] == kind]
        figures[kind] = {
            "met": sum(row[-1] for row in mine),
            "runs": len(mine),
            "followed_s": [round(min(r[4] for r in mine), 1), round(max(r[4] for r in mine), 1)],
            "throttled": [round(min(r[5] for r in mine), 4), round(max(r[5] for r in mine), 4)],
            "missed": [f"+{r[1]:g} s, burst {r[2]}, {r[3] * 1000:g} ms: {r[4]:.1f} s, {r[5]:.2%}"
                       for r in mine if not r[-1]],
        }  # fmt: skip
        print(f"{kind}: {figures[kind]}")
    record("rate_auto_quota_change_sweep", met=met, runs=len(rows), **figures)


RISES = ((1.0, 50.0), (2.0, 50.0), (5.0, 50.0), (1.0, 5.0))
GATEWAYS = ((1, 0.05), (2, 0.05), (10, 0.05), (1, 0.3))


def test_a_rise_from_a_low_quota_and_the_probes_before_it() -> None:
    """``tests/test_rate_matrix.py``'s rises from a low quota (``low`` calls/s for 60 s,
    then ``high``; 8 in flight at 50 ms, 32 at 300 ms), 300 s: seconds from the rise to the
    first rate at 0.9 of the new quota, and the seconds between the refusals from 20 s to
    the rise (how often the probes past a quota that stays the same come: a rise is first
    met by the next one)."""
    for (low, high), (burst, latency) in itertools.product(RISES, GATEWAYS):
        concurrency = 8 if latency < 0.1 else 32
        run = simulate(_rising(low, high), duration=300.0, burst=burst, latency=latency,
                       concurrency=concurrency)  # fmt: skip
        late = [t - 60.0 for t, rate in run.rates if t >= 60.0 and rate >= 0.9 * high]
        refused = [round(t, 1) for t in run.refused if 20.0 <= t < 60.0]
        gaps = [round(b - a, 1) for a, b in itertools.pairwise(refused)]
        print(f"{low:g} -> {high:g} calls/s, burst {burst}, {latency * 1000:g} ms: 0.9 of it "
              f"{round(late[0], 1) if late else None} s after the rise; refused before it at "
              f"{refused} (apart: {gaps})")  # fmt: skip


def _rising(low: float, high: float) -> Callable[[float], float]:
    return lambda t: low if t < 60.0 else high
