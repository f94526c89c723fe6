"""Issue 21's soak: 1,000,000 ids through two ``serve`` replicas; what Redis holds after.

Run on demand (not part of the default suite):

    uv run pytest -m benchmark tests/benchmarks/bench_serve_soak.py -s

``SOAK_IDS`` (default 1,000,000) sets the number of ids, ``SOAK_WAVE`` (default 100,000)
how many are enqueued at a time. Everything is the real path: a ``redis-server`` of its own
on a free port (so ``used_memory`` is this run's alone), the simulator on loopback at a
quota far above the replicas' rate, the real ``enqueue`` command, and two ``serve``
processes sharing one group. The outcomes stream is capped at ``OUTCOMES_CAP`` entries
(``--outcomes-max-len``); the ids in the simulator are added wave by wave, so its memory
stays small too.

What it checks: the ids stream ends with at most 1,000 entries, and Redis ``used_memory``
at the end is within what the outcomes and dead-letter streams hold (``MEMORY USAGE``)
plus ``SLACK_MB`` over the empty server's. Without trimming, the ids stream alone held one
entry per id (issue 21: 100,000 ids took Redis from 5.6 to 24.5 MB).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.benchmarks.harness import clean_env, enqueue, stop_replicas
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = pytest.mark.benchmark

IDS = int(os.environ.get("SOAK_IDS", "1000000"))
WAVE = int(os.environ.get("SOAK_WAVE", "100000"))
OUTCOMES_CAP = 100_000
SLACK_MB = 2.0
STREAM = "soak:ids"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A ``redis-server`` of this benchmark's own, no persistence."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("no redis-server on this machine")
    port = _free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(10)


def _mb(n: float) -> float:
    return n / (1024 * 1024)


@pytest.mark.timeout(7200)
@pytest.mark.anyio
async def test_a_million_ids_through_two_replicas_leave_redis_bounded(
    redis_url: str, tmp_path: Path
) -> None:
    import anyio

    client = redis.Redis.from_url(redis_url)
    client.memory_purge()
    empty = int(client.info("memory")["used_memory"])
    config = SimulatorConfig(jobs=0, quota=100_000, burst=1000)
    replicas: list[subprocess.Popen[bytes]] = []
    started = time.perf_counter()
    async with run_simulator(config) as sim:
        flags = [
            "--endpoint", sim.url, "--project-id", sim.config.project_id, "--ak", sim.config.ak,
            "--stream", STREAM, "--group", "reapers", "--redis-url", redis_url,
            "--http-port", "0", "--log-format", "json", "--rate", "5000", "--burst", "100",
            "--batch-size", "100", "--concurrency", "8",
            "--outcomes-max-len", str(OUTCOMES_CAP),
        ]  # fmt: skip
        env = clean_env() | {"REAPER_SK": sim.config.sk}
        for name in ("soak-1", "soak-2"):
            command = [sys.executable, "-m", "worker", "serve", "--consumer", name, *flags]
            with open(tmp_path / f"{name}.log", "wb") as log:
                replica = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
            replicas.append(replica)
        longest = 0
        try:
            done = 0
            while done < IDS:
                n = min(WAVE, IDS - done)
                ids = sim.add_jobs(n)
                await enqueue(tmp_path / "wave.txt", ids, stream=STREAM, redis_url=redis_url)
                done += n
                while len(sim.deleted) < done:
                    longest = max(longest, int(client.xlen(STREAM)))
                    assert all(r.poll() is None for r in replicas), "a replica died"
                    await anyio.sleep(0.5)
            with anyio.fail_after(60):
                while int(client.xpending(STREAM, "reapers")["pending"]) > 0:
                    await anyio.sleep(0.2)
                await anyio.sleep(2.0)  # a retention pass after the last ack
        finally:
            await stop_replicas(replicas)
        elapsed = time.perf_counter() - started
        deleted, sent_twice = len(sim.deleted), sum(c > 1 for c in sim.sent_counts.values())
    client.memory_purge()
    used = int(client.info("memory")["used_memory"])
    left = int(client.xlen(STREAM))
    outcomes_len = int(client.xlen(STREAM + ":outcomes"))
    kept = sum(int(client.memory_usage(k, samples=0) or 0)
               for k in (STREAM + ":outcomes", STREAM + ":dead"))  # fmt: skip
    ids_bytes = int(client.memory_usage(STREAM, samples=0) or 0)
    client.close()
    print(
        f"\nids: {IDS:,} through 2 replicas in {elapsed:,.0f} s ({IDS / elapsed:,.0f} ids/s)"
        f"\nids stream: at most {longest:,} entries while running, {left:,} at the end "
        f"({_mb(ids_bytes):.3f} MB)"
        f"\noutcomes stream: {outcomes_len:,} entries (cap {OUTCOMES_CAP:,}); outcomes + dead "
        f"letters hold {_mb(kept):.1f} MB"
        f"\nused_memory: {_mb(empty):.1f} MB empty, {_mb(used):.1f} MB at the end; "
        f"{_mb(used - empty - kept):+.2f} MB beyond the capped streams"
        f"\nreplica exit codes: {[r.returncode for r in replicas]}; ids sent twice: {sent_twice}"
    )
    assert deleted == IDS
    assert [r.returncode for r in replicas] == [0, 0]
    assert left <= 1000
    assert outcomes_len <= OUTCOMES_CAP + 200  # XADD MAXLEN ~ trims whole nodes of 100
    assert used <= empty + kept + SLACK_MB * 1024 * 1024
