"""Periodic progress in the logs (``worker.stats``): the window's arithmetic, and ``run.stats``
from a real run whose output is not a terminal. serve's ``serve.stats`` is pinned in
``tests/test_serve.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import orjson
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.e2e import reaper, reaper_env, write_ids
from worker.simulator import FaultConfig, SimulatorConfig, run_simulator


def test_a_stats_window_says_what_each_interval_added_and_the_totals() -> None:
    from worker.stats import StatsWindow

    window = StatsWindow(100.0, {"deleted": 5})
    first = window.close(160.0, {"deleted": 65, "absent": 3})
    assert (first["deleted"], first["absent"], first["failed"]) == (60, 3, 0)
    assert (first["deleted_total"], first["ids"], first["ids_total"]) == (65, 63, 68)
    assert (first["ids_per_s"], first["interval_s"], first["elapsed_s"]) == (1.05, 60.0, 60.0)
    second = window.close(220.0, {"deleted": 65, "absent": 3})
    assert (second["ids"], second["ids_per_s"], second["elapsed_s"]) == (0, 0.0, 120.0)


@pytest.mark.parametrize(
    ("ids", "seconds", "said"),
    [(1, 250.0, 0.004), (1, 3600.0, 0.000278), (2, 3.0, 0.667), (12345, 1000.0, 12.345)],
)
def test_an_interval_s_rate_keeps_its_significant_figures(
    ids: int, seconds: float, said: float
) -> None:
    """Two decimals made one id in 250 s ``0.0`` ids/s, as if the run had stalled, and cut
    12.345 to 12.35: the interval's rate is said as run.summary's is (three decimals, and
    three significant figures under 1)."""
    from worker.stats import StatsWindow

    window = StatsWindow(0.0)
    assert window.close(seconds, {"deleted": ids})["ids_per_s"] == said


@pytest.mark.anyio
async def test_a_run_without_a_terminal_says_where_it_stands_every_stats_interval(
    tmp_path: Path,
) -> None:
    """A CronJob's log showed one line per id and never where the run stood: run.stats now
    says it every --stats-interval seconds (the ids by outcome, ids/s, the limiter's rate)."""
    config = SimulatorConfig(jobs=48, faults=FaultConfig(latency_ms=100, latency_jitter=False))
    async with run_simulator(config) as sim:
        ids = sim.job_ids()
        source = write_ids(tmp_path / "ids.txt", [*ids[:40], "not an id!"])
        done = await reaper(
            ["run", "-i", str(source), "--yes", "--batch-size", "2", "--concurrency", "1",
             "--rate", "50", "--stats-interval", "0.2"],
            reaper_env(sim.url),
        )  # fmt: skip
        # Jobs of its own (ids the first run deleted are each read again, absent: 4 s here),
        # one a call: 0.8 s in which any interval under it would have been said.
        rest = write_ids(tmp_path / "rest.txt", ids[40:])
        quiet = await reaper(
            ["run", "-i", str(rest), "--yes", "--batch-size", "1", "--concurrency", "1",
             "--stats-interval", "0"],
            reaper_env(sim.url),
        )  # fmt: skip
    assert done.code == 1  # the invalid line
    said = done.events("run.stats")
    assert len(said) >= 3
    assert all(e["rate"] == 50.0 for e in said)
    assert [e["deleted_total"] for e in said] == sorted(e["deleted_total"] for e in said)
    assert sum(e["deleted"] for e in said) == said[-1]["deleted_total"] <= 40
    assert said[-1]["read"] <= 41 and said[-1]["rejected_total"] <= 1
    assert quiet.events("run.stats") == []


@pytest.mark.anyio
@pytest.mark.parametrize(("rate", "starts_at"), [("50", 50.0), ("auto", 2.0)])
async def test_run_stats_say_the_rate_the_limiter_starts_at_before_any_call(
    rate: str, starts_at: float
) -> None:
    """Before any call (its input a pipe still quiet) run.stats says the rate the limiter
    starts at: the fixed --rate, or where --rate auto begins. serve's said 0 until its
    first call made a limiter; run's default lane (and limiter) is made before the first
    stats line, so it never did: this pins it, the same ``Lanes.rate`` serving both."""
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        args = ["run", "-i", "-", "--yes", "--rate", rate, "--stats-interval", "0.1"]
        process = await anyio.open_process(
            [sys.executable, "-m", "worker", *args], env=reaper_env(sim.url)
        )
        async with process:
            assert process.stdin is not None and process.stdout is not None
            lines = BufferedByteReceiveStream(process.stdout)
            said: list[dict[str, object]] = []
            with anyio.fail_after(30):
                while len(said) < 2:  # the input is still open, with no id in it
                    event = orjson.loads(await lines.receive_until(b"\n", 1 << 20))
                    if event["event"] == "run.stats":
                        said.append(event)
            assert sim.stats.calls == 0
            await process.stdin.aclose()  # the input ends: nothing to do
            with anyio.fail_after(30):
                assert await process.wait() == 0
    assert [e["rate"] for e in said] == [starts_at, starts_at]
