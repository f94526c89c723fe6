"""Issue 23's fleet: three ``serve`` replicas on one stream share one quota.

    uv run pytest -m benchmark tests/benchmarks/bench_fleet.py -s -p no:randomly

Everything is the real path: a ``redis-server`` of its own, the simulator on loopback with a
token-bucket quota (``QUOTA`` calls/s, burst ``BURST``), the real ``enqueue`` command, and
three ``serve`` processes in one group, one id per call. The figures are the simulator's
own counts of the calls it accepted and refused from ``START`` s to ``END`` s after the
replicas started, so they are the fleet's together. Goals: with ``--rate QUOTA`` at least
0.97 of it with at most 1 % throttled (met: one bucket in Redis); with ``--rate auto``, at
least 0.90 with at most 2 %, not met yet (a known gap, marked: the replicas share a bucket
but each runs its own controller on a third of the answers, where one shared estimate is
wanted).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.bench_serve_soak import redis_url  # noqa: F401  (the fixture)
from tests.benchmarks.harness import clean_env, enqueue, machine, record
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = pytest.mark.benchmark

QUOTA = float(os.environ.get("FLEET_QUOTA", "30"))
BURST = 2
START, END = 15.0, 45.0
REPLICAS = 3


async def _fleet(url: str, tmp_path: Path, rate: str) -> tuple[float, float]:
    """(accepted ÷ quota, share throttled) over START-END s for three replicas at ``rate``."""
    import anyio

    stream = f"fleet:{rate}:ids"
    config = SimulatorConfig(jobs=0, quota=QUOTA, burst=BURST)
    replicas: list[subprocess.Popen[bytes]] = []
    async with run_simulator(config) as sim:
        ids = sim.add_jobs(int(QUOTA * END * 1.5) + 100)
        await enqueue(tmp_path / "ids.txt", ids, stream=stream, redis_url=url)
        flags = [
            "--endpoint", sim.url, "--project-id", sim.config.project_id, "--ak", sim.config.ak,
            "--stream", stream, "--group", "fleet", "--redis-url", url,
            "--http-port", "0", "--log-format", "json", "--rate", rate, "--burst", "1",
            "--batch-size", "1", "--concurrency", "8",
        ]  # fmt: skip
        env = clean_env() | {"REAPER_SK": sim.config.sk}
        try:
            for n in range(REPLICAS):
                command = [sys.executable, "-m", "worker", "serve", "--consumer", f"r{n}", *flags]
                with open(tmp_path / f"r{n}-{rate}.log", "wb") as log:
                    replicas.append(
                        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
                    )
            await anyio.sleep(START)
            calls, throttled = sim.stats.calls, sim.stats.throttled
            await anyio.sleep(END - START)
            calls, throttled = sim.stats.calls - calls, sim.stats.throttled - throttled
            assert all(r.poll() is None for r in replicas), "a replica died"
        finally:
            for replica in replicas:
                replica.send_signal(signal.SIGTERM)
            for replica in replicas:
                replica.wait(60)
    accepted = calls - throttled
    return accepted / ((END - START) * QUOTA), throttled / max(1, calls)


@pytest.mark.timeout(600)
@pytest.mark.anyio
@pytest.mark.parametrize(
    "rate",
    [
        "fixed",
        pytest.param("auto", marks=pytest.mark.xfail(strict=True, reason=(
            "no shared estimate yet: each replica's controller sees a third of the refusals "
            "(0.58 of the quota, 14.5 % throttled on 2026-12-06)"))),
    ],
)  # fmt: skip
async def test_three_replicas_share_one_quota(
    redis_url: str,  # noqa: F811  (the fixture)
    tmp_path: Path,
    rate: str,
) -> None:
    load_before = os.getloadavg()
    used, share = await _fleet(redis_url, tmp_path, f"{QUOTA:g}" if rate == "fixed" else "auto")
    record("fleet", rate=rate, quota=QUOTA, burst=BURST, replicas=REPLICAS, window=[START, END],
           used=round(used, 3), throttled=round(share, 4), load_before=load_before,
           load_after=os.getloadavg(), machine=machine())  # fmt: skip
    if rate == "fixed":
        assert used >= 0.97 and share <= 0.01
    else:
        assert used >= 0.90 and share <= 0.02
