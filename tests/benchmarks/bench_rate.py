"""Issue 7's rate figures: how much of a quota ``--rate N`` and ``--rate auto`` use, and the
picture of ``auto`` finding a quota and following it down.

    uv run pytest -m benchmark tests/benchmarks/bench_rate.py -s -p no:randomly

The simulator runs in its own process (``devserver-reaper simulate``) with a token-bucket
quota of ``q`` calls/s and a burst of ``BURST``; our side is the real dispatcher, client and
limiter with concurrency 8. Utilisation is calls the server accepted per second over a steady
window, divided by the quota; "throttled" is the share of calls in that window refused with
a 429. ``BENCH_REPEATS`` (default 3) runs per figure; the median is reported.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.benchmarks.harness import (
    Arrivals,
    BotocoreCubic,
    EvenPacer,
    RclonePacer,
    Trace,
    drive,
    machine,
    median,
    percentiles,
    record,
    repeats,
    run_queue_seconds,
    simulator,
)
from tests.fakes import simulate
from worker.clock import Clock
from worker.pacing.adaptive import AdaptiveRateLimiter, build_limiter
from worker.pacing.bucket import RateLimiter
from worker.pacing.controller import PacedController, RateController

pytestmark = pytest.mark.benchmark

BURST = 5
"""Our burst for ``--rate N`` (the ``burst`` setting's default)."""


def server_burst(quota: float) -> int:
    """The simulator's burst: 100 ms of quota, at least 5. A gateway with less slack than
    that refuses calls for the jitter of a loaded 2-core machine alone (see the report)."""
    return max(5, round(quota / 10))


BATCH = 5
CONCURRENCY = 8
DOCS = Path(__file__).resolve().parents[2] / "docs"


RCLONE_MIN_SLEEP = 0.001
"""The rclone peer's ``min_sleep``: its default (10 ms) would cap it at 100 calls/s."""

PEERS: dict[str, Callable[[float], PacedController]] = {
    "botocore": BotocoreCubic,
    "rclone": lambda now: RclonePacer(min_sleep=RCLONE_MIN_SLEEP),
    "rclone_no_retry_after": lambda now: RclonePacer(
        min_sleep=RCLONE_MIN_SLEEP, honour_retry_after=False
    ),
}
"""The controllers ``--rate auto`` is measured against, each run under the same limiter."""


def _limiter(rate: float | str, clock: Clock) -> RateLimiter:
    if isinstance(rate, str) and rate in PEERS:
        return AdaptiveRateLimiter(clock, controller=PEERS[rate](clock.now()))
    return build_limiter(rate, BURST, clock)  # type: ignore[arg-type]


def _run(
    tmp: Path,
    quota: float,
    rate: float | str,
    duration: float,
    *,
    quota_at: Any = None,
) -> Trace:
    jobs = int(quota * duration * 1.3 * BATCH) + 1000
    with simulator(tmp, jobs=jobs, quota=quota, burst=server_burst(quota)) as sim:
        on_second = None
        if quota_at is not None:
            current = [quota]

            def on_second(elapsed: float) -> None:
                wanted = quota_at(elapsed)
                if wanted != current[0]:
                    sim.set_quota(wanted)
                    current[0] = wanted

        async def go() -> Trace:
            return await drive(
                sim.url,
                sim.ids,
                lambda clock: _limiter(rate, clock),
                duration=duration,
                concurrency=CONCURRENCY,
                batch_size=BATCH,
                on_second=on_second,
            )

        return anyio.run(go)


def _figures(trace: Trace, quota: float, start: float, end: float) -> tuple[float, float]:
    ok, throttled, _ = trace.window(start, end)
    return ok / ((end - start) * quota), throttled / max(1, ok + throttled)


@pytest.mark.timeout(repeats(3) * 40 + 60)
@pytest.mark.parametrize("quota", [50.0, 500.0])
def test_fixed_rate_uses_the_known_quota(quota: float, tmp_path: Path) -> None:
    """``--rate q --burst 5`` against a server enforcing q calls/s with a burst of 5."""
    utils, shares = [], []
    for _ in range(repeats(3)):
        trace = _run(tmp_path, quota, quota, duration=14.0)
        util, share = _figures(trace, quota, 2.0, 14.0)
        utils.append(util)
        shares.append(share)
    record(
        "rate_fixed",
        quota=quota,
        utilisation=round(median(utils), 3),
        throttled=round(median(shares), 4),
        runs=[round(u, 3) for u in utils],
        machine=machine(),
    )
    assert median(utils) >= 0.97
    assert median(shares) <= 0.01


AUTO_SECONDS = float(os.environ.get("BENCH_AUTO_SECONDS", "40"))


@pytest.mark.timeout(repeats(3) * (AUTO_SECONDS + 20) + 60)
@pytest.mark.parametrize("controller", ["auto", *PEERS])
@pytest.mark.parametrize("quota", [5.0, 50.0, 500.0])
def test_auto_rate_finds_an_unknown_quota(controller: str, quota: float, tmp_path: Path) -> None:
    """``--rate auto`` from 2 calls/s, and its peers: botocore's adaptive mode and rclone's
    pacer, with and without ``Retry-After`` (ported: see ``harness.BotocoreCubic`` and
    ``harness.RclonePacer``); measured from 10 s after the start to 40 s."""
    duration = AUTO_SECONDS
    utils, shares = [], []
    for _ in range(repeats(3)):
        trace = _run(tmp_path, quota, controller, duration=duration)
        util, share = _figures(trace, quota, 10.0, duration)
        utils.append(util)
        shares.append(share)
    record(
        f"rate_{controller}",
        quota=quota,
        utilisation=round(median(utils), 3),
        throttled=round(median(shares), 4),
        runs=[round(u, 3) for u in utils],
        machine=machine(),
    )
    if controller == "auto":
        assert median(utils) >= 0.90
        assert median(shares) <= 0.02


def _falls_and_rises(t: float) -> float:
    """Issue 23's quota change: 50 calls/s, 20 from 30 s, 50 again from 60 s."""
    return 50.0 if t < 30.0 or t >= 60.0 else 20.0


@pytest.mark.timeout(240)
def test_auto_rate_picture(tmp_path: Path) -> None:
    """calls/s over time against a quota that falls from 50 to 20 at 30 s and rises back
    at 60 s, over loopback (the simulator's burst 5): accepted calls per second over each
    new quota from 10 s after each change, and the share throttled after its first 2 s
    (issue 23's goal: within 10 %, at most 2 %). Draws ``docs/rate-auto.png``."""
    matplotlib = pytest.importorskip("matplotlib")  # a benchmark-only dependency
    matplotlib.use("Agg")
    plt = pytest.importorskip("matplotlib.pyplot")

    duration = 90.0
    load_before = os.getloadavg()
    trace = _run(tmp_path, 50.0, "auto", duration, quota_at=_falls_and_rises)
    load_after = os.getloadavg()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    seconds = trace.per_second(duration)
    xs = [i + 0.5 for i in range(len(seconds))]
    ax.step([0, 30, 60, duration], [50, 20, 50, 50], where="post", color="black",
            linestyle="--", label="server quota")  # fmt: skip
    ax.plot(xs, [ok for ok, _ in seconds], marker="o", ms=3, label="accepted calls/s")
    ax.bar(xs, [thr for _, thr in seconds], width=0.8, color="tab:red", label="429s/s")
    ax.plot([t for t, _ in trace.rates], [r for _, r in trace.rates], color="tab:green",
            alpha=0.6, label="limiter rate")  # fmt: skip
    ax.set_ylim(0, 75)
    ax.set_ylabel("calls per second")
    ax.set_xlabel("seconds since start")
    ax.set_title(f"--rate auto over loopback, quota 50 -> 20 -> 50 calls/s; load average "
                 f"{load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs",
                 fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = DOCS / "rate-auto.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    fell, fell_throttled = _figures(trace, 20.0, 40.0, 60.0)
    rose, rose_throttled = _figures(trace, 50.0, 70.0, 90.0)
    _, after_fall = _figures(trace, 20.0, 32.0, 60.0)
    _, after_rise = _figures(trace, 50.0, 62.0, 90.0)
    record("rate_auto_quota_change", png=str(out), used_40_60_of_20=round(fell, 3),
           used_70_90_of_50=round(rose, 3), throttled_32_60=round(after_fall, 4),
           throttled_62_90=round(after_rise, 4), load_before=load_before,
           load_after=load_after, machine=machine())  # fmt: skip
    assert out.stat().st_size > 10_000
    assert fell_throttled <= 0.05 and rose_throttled <= 0.05


SWEEP = (1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 35.0, 50.0, 80.0, 130.0, 200.0, 350.0, 500.0, 800.0)
CHANGES = ((50.0, 20.0), (500.0, 200.0), (20.0, 50.0), (200.0, 500.0))
CHANGE_WINDOWS = ((35.0, 50.0), (50.0, 120.0))


def _quota(before: float, after: float | None = None) -> Callable[[float], float]:
    """``before`` calls/s, and ``after`` from 30 s on."""
    later = before if after is None else after
    return lambda t: before if t < 30.0 else later


def _swept(make: Callable[[float], PacedController], quota_at: Callable[[float], float], burst: int,
           windows: tuple[tuple[float, float], ...]) -> list[tuple[float, float]]:  # fmt: skip
    """(share of the quota accepted, share of calls refused) per window, 120 s simulated."""
    run = simulate(quota_at, duration=120.0, burst=burst, controller=make(0.0))
    return [
        (run.accepted_per_s(start, end) / quota_at(end - 1e-9), run.refused_share(start, end))
        for start, end in windows
    ]


@pytest.mark.timeout(600)
def test_auto_rate_across_quotas() -> None:
    """The controllers alone, on virtual time against the simulator's token bucket
    (``tests.fakes.simulate``: no process and no clock, so every run gives the same
    figures), at quotas from 1 to 800 calls/s with the simulator's burst, and across a
    quota that falls or rises at 30 s: what the runs over loopback cannot cover in
    minutes. Calls answered in 2 ms, 8 in flight. Windows: 10-40 s (as the loopback runs),
    40-120 s (long after start-up); for a change, 35-50 s and 50-120 s."""
    controllers: dict[str, Callable[[float], PacedController]] = {"auto": RateController, **PEERS}
    steady: dict[str, dict[float, list[tuple[float, float]]]] = {}
    changed: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name, make in controllers.items():
        steady[name] = {
            q: _swept(make, _quota(q), server_burst(q), ((10.0, 40.0), (40.0, 120.0)))
            for q in SWEEP
        }
        changed[name] = {
            f"{a:g}->{b:g}": _swept(make, _quota(a, b), server_burst(a), CHANGE_WINDOWS)
            for a, b in CHANGES
        }
    for name in controllers:
        print(f"\n{name}: quota | 10-40 s used, refused | 40-120 s used, refused")
        for q, ((u1, r1), (u2, r2)) in steady[name].items():
            print(f"  {q:5g} | {u1:.3f} {r1:6.2%} | {u2:.3f} {r2:6.2%}")
        for change, ((u1, r1), (u2, r2)) in changed[name].items():
            print(f"  {change:>9} | {u1:.3f} {r1:6.2%} | {u2:.3f} {r2:6.2%}")
    record(
        "rate_auto_sweep",
        steady={n: {f"{q:g}": [[round(u, 3), round(r, 4)] for u, r in v] for q, v in s.items()}
                for n, s in steady.items()},
        changed={n: {k: [[round(u, 3), round(r, 4)] for u, r in v] for k, v in s.items()}
                 for n, s in changed.items()},
    )  # fmt: skip
    # Long after start-up: issue 7's goals from 5 calls/s up. Under that, a refused call
    # is 0.4 % or more of those in the window, and a probe now and then costs one.
    for quota, (_, (used, refused)) in steady["auto"].items():
        assert used >= (0.95 if quota >= 5 else 0.9), quota
        assert refused <= (0.02 if quota >= 5 else 0.04), quota


MATRIX_SECONDS = float(os.environ.get("BENCH_MATRIX_SECONDS", "25"))


def _cell_seconds(quota: float) -> float:
    """How long a cell of the matrix runs (measured from 10 s on). Under 20 calls/s, 40 s,
    the window the controller's own cells on virtual time measure (10-40 s): 15 s at 5
    calls/s hold 75 calls, so the probe a stable quota needs now and then (one refusal)
    is 1.3 % of them, and two are over the goal's 2 %. ``BENCH_MATRIX_SECONDS`` sets every
    cell's length."""
    if "BENCH_MATRIX_SECONDS" in os.environ:
        return MATRIX_SECONDS
    return 40.0 if quota < 20 else MATRIX_SECONDS


ORACLE = (0.90, 0.95)
"""The oracle's rates, as shares of the quota: a pacer that knows the answer."""


def _oracle_seconds(quota: float) -> float:
    """How long each oracle runs (measured from 1 s on): 7 s hold 31 calls at 5/s."""
    return 8.0 if quota < 20 else 5.0


def _cell_name(quota: float, burst: int, latency_ms: float, concurrency: int) -> str:
    return f"q{quota:g}-b{burst}-{latency_ms:g}ms-c{concurrency}"


def _matrix(cells: str) -> tuple[tuple[float, int, float, int], ...]:
    """Issue 23's matrix, or the cells ``BENCH_MATRIX_CELLS`` names (comma-separated, as
    ``q50-b1-300ms-c32``; the whole matrix takes about 40 minutes)."""
    every = tuple(itertools.product((5.0, 50.0, 500.0), (1, 2, 10), (5.0, 50.0, 300.0), (8, 32)))
    if not cells.strip():
        return every
    wanted = {name.strip() for name in cells.split(",") if name.strip()}
    known = {_cell_name(*cell) for cell in every}
    if wanted - known:
        raise ValueError(f"BENCH_MATRIX_CELLS: no such cell {sorted(wanted - known)}")
    return tuple(cell for cell in every if _cell_name(*cell) in wanted)


MATRIX = _matrix(os.environ.get("BENCH_MATRIX_CELLS", ""))
"""Issue 23's matrix: quota (calls/s), gateway burst, mean latency (ms), calls in flight."""


def _short(times: list[float], interval: float) -> float:
    """The share of consecutive times (sorted) closer together than ``interval``."""
    ordered = sorted(times)
    gaps = [b - a for a, b in itertools.pairwise(ordered)]
    return sum(gap < interval for gap in gaps) / max(1, len(gaps))


@dataclass(frozen=True, slots=True)
class Paced:
    """One run's figures: the share of what can be reached that was accepted, the share
    throttled, and of the calls in the window, how many followed the one before closer
    than 1/quota as written by us (``sent_short``) and as the gateway checked them
    (``seen_short``)."""

    used: float
    throttled: float
    sent_short: float
    seen_short: float
    trace: Trace
    refused_gaps: tuple[float, ...] = ()  # ms from the accepted call before, as checked

    def figures(self) -> dict[str, float]:
        return {"used": round(self.used, 3), "throttled": round(self.throttled, 4),
                "sent_short": round(self.sent_short, 4),
                "seen_short": round(self.seen_short, 4)}  # fmt: skip

    def met(self) -> bool:
        return self.used >= 0.90 and self.throttled <= 0.02


@dataclass(frozen=True, slots=True)
class Cell:
    quota: float
    concurrency: int
    latency_ms: float

    @property
    def reachable(self) -> float:
        """The quota, or calls in flight ÷ latency where that is less."""
        return min(self.quota, self.concurrency / (self.latency_ms / 1000.0))

    def oracle(self, share: float) -> float:
        """The oracle's pace: ``share`` of the gateway's quota, also where the places bind
        (what can be reached is less): paced at a share of what 8 places carry at 300 ms,
        it loses every slot that comes while all of them are out (over loopback 0.75 and
        0.80 of 26.7 calls/s at 0.90 and 0.95 of it; on virtual time a steady 45 calls/s,
        0.9 of a quota of 50, carries a median 0.97 of it over 10 seeds, none refused)."""
        return share * self.quota


def _paced(
    sim: Any,
    cell: Cell,
    ids: list[str],
    make: Callable[[Clock], RateLimiter],
    *,
    seconds: float,
    measure_from: float,
) -> Paced:
    """One run on ``sim``, its bucket made fresh and full first, measured from
    ``measure_from`` seconds on."""
    sim.set_quota(cell.quota)
    sim.arrivals()  # drop what earlier runs left

    async def go() -> Trace:
        return await drive(sim.url, ids, make, duration=seconds, concurrency=cell.concurrency,
                           batch_size=1)  # fmt: skip

    trace = anyio.run(go)
    seen = sim.arrivals()
    ok, throttled, _ = trace.window(measure_from, seconds)
    t0 = trace.t0 + measure_from
    return Paced(
        used=ok / ((seconds - measure_from) * cell.reachable),
        throttled=throttled / max(1, ok + throttled),
        sent_short=_short([w for w in trace.writes if w >= t0], 1.0 / cell.quota),
        seen_short=_short([c for c in seen.checked if c >= t0], 1.0 / cell.quota),
        trace=trace,
        refused_gaps=_refused_gaps(seen, t0),
    )


def _refused_gaps(seen: Arrivals, t0: float) -> tuple[float, ...]:
    """For each call refused from ``t0`` on, how long after the accepted call before it the
    gateway checked it, in ms: at a burst of 1, just under 1/quota for a probe refused at
    the quota, much less for a pace well past it."""
    gaps, last = [], -math.inf
    for checked, accepted in zip(seen.checked, seen.accepted, strict=True):
        if accepted:
            last = checked
        elif checked >= t0 and last > -math.inf:
            gaps.append(round((checked - last) * 1000.0, 1))
    return tuple(gaps)


@pytest.mark.timeout(sum(_cell_seconds(quota) + 40 for quota, *_ in MATRIX) + 120)
def test_auto_rate_matrix_over_real_http(tmp_path: Path) -> None:
    """``--rate auto`` across issue 23's matrix over loopback, once per cell (a single run:
    54 cells take ~40 min), the simulator in its own process with latency drawn
    exponential around the mean. Per cell: calls accepted per second from 10 s on, over
    what can be reached (the quota, or calls in flight over the latency if less), and the
    share throttled. Beside it, on the same simulator, the oracle: an even pacer told the
    quota, at 0.90 and 0.95 of it (``harness.EvenPacer``, burst 1, no adaptation; where the
    places bind it too is measured against what they can carry: ``Cell.oracle``),
    measured from 1 s on: where even it is throttled more than 2 %, the cell's goal cannot be
    reached on this host at this load, and auto ÷ oracle, in the same minute, is robust to
    the load. The machine's load average is recorded beside the figures. Draws
    ``docs/rate-auto-matrix.png``."""
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    traces: dict[tuple[float, int, float, int], Trace] = {}
    for quota, burst, latency_ms, concurrency in MATRIX:
        cell = Cell(quota, concurrency, latency_ms)
        oracle_s = _oracle_seconds(quota)
        seconds = _cell_seconds(quota)
        auto_ids = int(quota * seconds * 1.3) + 500
        oracle_ids = int(cell.reachable * oracle_s * 1.3) + 100
        with simulator(tmp_path, jobs=auto_ids + len(ORACLE) * oracle_ids, quota=quota,
                       burst=burst, latency_ms=latency_ms) as sim:  # fmt: skip
            auto = _paced(sim, cell, sim.ids[:auto_ids], lambda clock: _limiter("auto", clock),
                          seconds=seconds, measure_from=10.0)  # fmt: skip
            oracles = [
                _paced(sim, cell, sim.ids[auto_ids + n * oracle_ids :][:oracle_ids],
                       functools.partial(EvenPacer, cell.oracle(share)),
                       seconds=oracle_s, measure_from=1.0)
                for n, share in enumerate(ORACLE)
            ]  # fmt: skip
        traces[quota, burst, latency_ms, concurrency] = auto.trace
        row = {"quota": quota, "burst": burst, "latency_ms": latency_ms,
               "concurrency": concurrency, **auto.figures(),
               **{f"oracle{share:.2f}": o.figures() for share, o in zip(ORACLE, oracles,
                                                                        strict=True)},
               "auto_over_oracle": round(auto.used / max(1e-9, oracles[0].used), 3),
               "met": auto.met(), "oracle_within_2pc": oracles[0].throttled <= 0.02,
               "seconds": seconds, "load": os.getloadavg()[0]}  # fmt: skip
        rows.append(row)
        record("rate_auto_matrix", **row)
    load_after = os.getloadavg()
    record("rate_auto_matrix_summary", cells=len(rows), met=sum(r["met"] for r in rows),
           oracle_090_within_2pc=sum(r["oracle_within_2pc"] for r in rows),
           load_before=load_before, load_after=load_after, machine=machine())  # fmt: skip
    _draw_matrix(traces, load_before, load_after)


FIVE_BURST_ONE = tuple(cell for cell in MATRIX if cell[:2] == (5.0, 1))
"""The matrix's six cells at 5 calls/s and a burst of 1, where a window of 147 calls holds
two refusals within the budget and a third is over it."""


@pytest.mark.timeout(repeats(2) * len(FIVE_BURST_ONE) * 80 + 120)
def test_auto_at_five_calls_a_second_burst_one_over_real_http(tmp_path: Path) -> None:
    """The six q5-b1 cells, ``--rate auto`` alone (no oracle), ``BENCH_REPEATS`` runs each
    (2), 40 s a run measured from 10 s, as ``test_auto_rate_matrix_over_real_http`` runs
    them. Per run: the share of the quota used, the share throttled, and for each refusal
    how long after the accepted call before it the simulator checked it (a probe refused at
    the quota: 196-200 ms). Two controllers compare under one load when this runs from two
    worktrees, a cell at a time each (``BENCH_MATRIX_CELLS`` picks the cell)."""
    rows = []
    for run in range(repeats(2)):
        for quota, burst, latency_ms, concurrency in FIVE_BURST_ONE:
            cell = Cell(quota, concurrency, latency_ms)
            ids = int(quota * 40.0 * 1.3) + 500
            with simulator(tmp_path, jobs=ids, quota=quota, burst=burst,
                           latency_ms=latency_ms) as sim:  # fmt: skip
                auto = _paced(sim, cell, sim.ids, lambda clock: _limiter("auto", clock),
                              seconds=40.0, measure_from=10.0)  # fmt: skip
            row = {"cell": _cell_name(quota, burst, latency_ms, concurrency), "run": run,
                   "used": round(auto.used, 3), "throttled": round(auto.throttled, 4),
                   "refused_gaps_ms": list(auto.refused_gaps), "met": auto.met(),
                   "load": os.getloadavg()[0]}  # fmt: skip
            rows.append(row)
            record("rate_auto_q5_burst_one", **row)
    record("rate_auto_q5_burst_one_summary", runs=len(rows), met=sum(r["met"] for r in rows),
           machine=machine())  # fmt: skip


def _draw_matrix(
    traces: dict[tuple[float, int, float, int], Trace],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> None:
    matplotlib = pytest.importorskip("matplotlib")  # a benchmark-only dependency
    matplotlib.use("Agg")
    plt = pytest.importorskip("matplotlib.pyplot")
    quotas = sorted({q for q, *_ in traces})
    bursts = sorted({b for _, b, *_ in traces})
    fig, axes = plt.subplots(len(bursts), len(quotas), figsize=(12, 8.5), sharex=True,
                             sharey=True, squeeze=False)  # fmt: skip
    for (quota, burst, latency_ms, concurrency), trace in traces.items():
        ax = axes[bursts.index(burst)][quotas.index(quota)]
        reachable = min(quota, concurrency / (latency_ms / 1000.0))
        seconds = trace.per_second(_cell_seconds(quota))
        ax.plot([i + 0.5 for i in range(len(seconds))], [ok / reachable for ok, _ in seconds],
                lw=1, alpha=0.8, label=f"{latency_ms:g} ms, {concurrency} in flight")  # fmt: skip
    for row, burst in enumerate(bursts):
        for col, quota in enumerate(quotas):
            ax = axes[row][col]
            ax.axhline(0.9, color="black", ls="--", lw=0.8)
            ax.axvline(10.0, color="grey", ls=":", lw=0.8)
            ax.set_ylim(0, 1.3)
            ax.set_title(f"quota {quota:g}/s, gateway burst {burst}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, loc="lower right")
    for ax in axes[-1]:
        ax.set_xlabel("seconds since start")
    for row in axes:
        row[0].set_ylabel("accepted ÷ reachable")
    fig.suptitle(
        "--rate auto over loopback, accepted calls/s per second ÷ what can be reached; "
        f"load average {load_before[0]:.1f} → {load_after[0]:.1f} on {os.cpu_count()} CPUs",
        fontsize=10,
    )
    fig.tight_layout()
    out = DOCS / "rate-auto-matrix.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)


JITTER_SECONDS = 6.0


@contextmanager
def _cpu_hogs(processes: int) -> Iterator[None]:
    """``processes`` busy loops in processes of their own for the ``with`` block: load of
    our own making, killed after."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _ms(values: list[float]) -> list[float]:
    """p50, p90 and p99 of ``values`` (seconds), in milliseconds."""
    return [round(v * 1000, 3) for v in percentiles(values, 50, 90, 99)]


def _gaps(times: list[float], interval: float) -> dict[str, float]:
    """Consecutive gaps over ``interval``: p1, p10 and p50, and the share under 1."""
    ordered = sorted(times)
    gaps = [(b - a) / interval for a, b in itertools.pairwise(ordered)]
    p1, p10, p50 = percentiles(gaps, 1, 10, 50)
    short = sum(g < 1.0 for g in gaps) / max(1, len(gaps))
    return {
        "p1": round(p1, 3),
        "p10": round(p10, 3),
        "p50": round(p50, 3),
        "short": round(short, 4),
    }


def _lags(earlier: list[float], later: list[float]) -> list[float]:
    """``later[i] - earlier[i]`` with both sorted: each call's step from one to the other
    (calls keep their order on loopback; the last few of a run, cancelled, are left out)."""
    pairs = zip(sorted(earlier), sorted(later), strict=False)
    return [b - a for a, b in pairs]


def _jitter(sim: Any, quota: float, apart: bool) -> dict[str, Any]:
    pacers: list[EvenPacer] = []

    def make(clock: Clock) -> RateLimiter:
        pacers.append(EvenPacer(0.9 * quota, clock, apart=apart))
        return pacers[-1]

    sim.set_quota(quota)
    sim.arrivals()
    queued = (sim.run_queue_seconds(), run_queue_seconds())
    middle = len(sim.ids) // 2
    half = {False: sim.ids[:middle], True: sim.ids[middle:]}

    async def go() -> Trace:
        return await drive(sim.url, half[apart], make,
                           duration=JITTER_SECONDS, concurrency=8, batch_size=1)  # fmt: skip

    trace = anyio.run(go)
    seen = sim.arrivals()
    sim_queued = sim.run_queue_seconds() - queued[0]
    our_queued = run_queue_seconds() - queued[1]
    pacer = pacers[0]
    ok, throttled, _ = trace.window(1.0, JITTER_SECONDS)
    gateway = 1.0 / quota
    return {
        "throttled": round(throttled / max(1, ok + throttled), 4),
        "late_ms": _ms(_lags(pacer.slots, pacer.starts)),
        "start_to_write_ms": _ms(_lags(pacer.starts, trace.writes)),
        "write_to_handler_ms": _ms(_lags(trace.writes, seen.arrived)),
        "handler_to_check_ms": _ms(
            [c - a for a, c in zip(seen.arrived, seen.checked, strict=True)]
        ),
        "starts_gaps": _gaps(pacer.starts, gateway),
        "writes_gaps": _gaps(trace.writes, gateway),
        "checked_gaps": _gaps(seen.checked, gateway),
        # the share of the run each process spent ready to run but waiting for a CPU
        "sim_run_queue": round(sim_queued / JITTER_SECONDS, 4),
        "our_run_queue": round(our_queued / JITTER_SECONDS, 4),
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("load", ["quiet", "hogs"])
@pytest.mark.parametrize("quota", [50.0, 500.0])
def test_where_the_jitter_comes_from(quota: float, load: str, tmp_path: Path) -> None:
    """The oracle (an even pacer at 0.9 of the quota, burst 1) against a burst-1 gateway at
    5 ms, 8 calls in flight, with GCRA alone and with ``start_apart``; quiet (the machine's
    own load) and under as many CPU hogs of our own as there are CPUs. Per call, on the one
    monotonic clock of the host: how late the pacer's start was after its slot, its
    start to its bytes written (client), written to the simulator's handler (kernel and
    the simulator's loop), handler to the quota check (the simulator's own work); and the
    gaps between consecutive starts, writes and quota checks over 1/quota (a gap under 1
    is a refusal at burst 1)."""
    with _cpu_hogs((os.cpu_count() or 1) if load == "hogs" else 0):
        load_before = os.getloadavg()[0]
        with simulator(tmp_path, jobs=int(quota * JITTER_SECONDS * 3) + 200, quota=quota,
                       burst=1, latency_ms=5.0) as sim:  # fmt: skip
            for apart in (False, True):
                record("rate_jitter", quota=quota, load=load, apart=apart,
                       **_jitter(sim, quota, apart), load_avg=load_before)  # fmt: skip


APART_CELLS = _matrix(
    os.environ.get(
        "BENCH_APART_CELLS",
        "q5-b1-50ms-c8,q50-b1-5ms-c8,q50-b1-50ms-c32,q50-b1-300ms-c32,q500-b1-5ms-c32,"
        "q500-b1-50ms-c8",
    )
)
"""The burst-1 cells ``test_the_pacing_rule_on_burst_one_gateways`` runs."""


async def _gcra_alone(clock: Clock, bucket: Any, last: Callable[[], float]) -> float:
    """``start_apart`` as it was not: a start on its slot, however late the one before."""
    return clock.now()


@pytest.mark.timeout(len(APART_CELLS) * 2 * (MATRIX_SECONDS + 20) + 120)
def test_the_pacing_rule_on_burst_one_gateways(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--rate auto`` and the oracle at 0.90 on burst-1 cells, each with ``start_apart`` and
    with GCRA alone (its slot however late the call before went), one after the other on
    the same simulator: what the rule changes, in the same minute."""
    load_before = os.getloadavg()
    for quota, burst, latency_ms, concurrency in APART_CELLS:
        cell = Cell(quota, concurrency, latency_ms)
        oracle_s = _oracle_seconds(quota)
        auto_ids = int(quota * MATRIX_SECONDS * 1.3) + 500
        oracle_ids = int(cell.reachable * oracle_s * 1.3) + 100
        each = auto_ids + oracle_ids
        with simulator(tmp_path, jobs=2 * each, quota=quota, burst=burst,
                       latency_ms=latency_ms) as sim:  # fmt: skip
            row: dict[str, Any] = {}
            for n, apart in enumerate((True, False)):
                ids = sim.ids[n * each : (n + 1) * each]
                with monkeypatch.context() as patch:
                    if not apart:
                        patch.setattr("worker.pacing.adaptive.start_apart", _gcra_alone)
                    auto = _paced(sim, cell, ids[:auto_ids], lambda c: _limiter("auto", c),
                                  seconds=MATRIX_SECONDS, measure_from=10.0)  # fmt: skip
                oracle = _paced(sim, cell, ids[auto_ids:],
                                functools.partial(EvenPacer, cell.oracle(0.9), apart=apart),
                                seconds=oracle_s, measure_from=1.0)  # fmt: skip
                name = "apart" if apart else "gcra"
                row[f"auto_{name}"] = auto.figures()
                row[f"oracle0.90_{name}"] = oracle.figures()
        record("rate_pacing_rule", cell=_cell_name(quota, burst, latency_ms, concurrency), **row,
               load=os.getloadavg()[0])  # fmt: skip
    record("rate_pacing_rule_summary", load_before=load_before, load_after=os.getloadavg(),
           machine=machine())  # fmt: skip
