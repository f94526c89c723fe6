"""Redis out of memory (``maxmemory`` reached, ``noeviction``): it refuses writes with
``OOM`` while it answers everything else; a Redis turned replica (a failover demoting the
primary the URL names) refuses them with ``READONLY``. A service waits either out as it
waits out Redis being away, sending no DELETE meanwhile, and ``enqueue`` says so and exits
69 (try again later); neither prints a traceback. A private ``redis-server`` per test: the
limit is set on it (or it is made a replica of a port where nothing listens: it keeps its
data, refusing writes), not on the shared one.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import redis.asyncio as aioredis
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.e2e import SIM_AK, SIM_SK, redis_errors_of, until
from tests.test_redis_auth import REDIS_SERVER, _free_port, _reaper, redis_server
from worker.simulator import FaultConfig, SimulatorConfig, run_simulator

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("clean_env"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server"),
]
STREAM = "devserver-reaper:ids"


async def _fill(admin: Any) -> None:
    await admin.config_set("maxmemory", "1")


async def _empty(admin: Any) -> None:
    await admin.config_set("maxmemory", "0")


async def _demote(admin: Any) -> None:
    await admin.replicaof("127.0.0.1", _free_port())


async def _promote(admin: Any) -> None:
    await admin.replicaof("NO", "ONE")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("refuse", "accept", "error"),
    [(_fill, _empty, "OutOfMemoryError"), (_demote, _promote, "ReadOnlyError")],
    ids=["out-of-memory", "read-only"],
)
async def test_a_redis_refusing_writes_is_waited_out_by_serve_and_refused_by_enqueue(
    tmp_path: Path,
    refuse: Callable[[Any], Awaitable[None]],
    accept: Callable[[Any], Awaitable[None]],
    error: str,
) -> None:
    """maxmemory reached while serve held batches: the outcome write answered OOM, which
    was a traceback and exit 1 (and a crash loop while Redis stayed full), and enqueue's
    was a traceback too; a replica's READONLY was the same. Now serve says it once, sends
    nothing while writes are refused (the rate limit's token and the note before each
    DELETE are writes), and finishes every id once they are taken again."""
    config = SimulatorConfig(jobs=30, faults=FaultConfig(latency_ms=300, latency_jitter=False))
    async with redis_server(tmp_path, []) as port, run_simulator(config) as sim:
        url = f"redis://127.0.0.1:{port}/0"
        ids = tmp_path / "ids.txt"
        ids.write_text("\n".join(sim.job_ids()) + "\n")
        code, printed = await _reaper("enqueue", "--input", str(ids), "--redis-url", url)
        assert code == 0, printed
        admin = aioredis.Redis.from_url(url)
        command = [sys.executable, "-m", "worker", "serve", "--endpoint", sim.url,
                   "--project-id", sim.config.project_id, "--ak", SIM_AK, "--redis-url", url,
                   "--http-port", "0", "--log-format", "json", "--batch-size", "5",
                   "--concurrency", "2", "--rate", "100"]  # fmt: skip
        errors = tmp_path / "serve.err"
        events: list[dict[str, Any]] = []
        with errors.open("wb") as err:
            process = await anyio.open_process(command, env={"REAPER_SK": SIM_SK} | _env(),
                                               stderr=err)  # fmt: skip

        async def collect() -> None:
            assert process.stdout is not None
            lines = BufferedByteReceiveStream(process.stdout)
            while True:
                try:
                    events.append(orjson.loads(await lines.receive_until(b"\n", 1 << 20)))
                except (anyio.EndOfStream, anyio.IncompleteRead):
                    return

        def said(name: str) -> list[dict[str, Any]]:
            return [e for e in events if e.get("event") == name]

        async def redis_errors() -> float:
            return await redis_errors_of(said("serve.started")[0]["http_port"])

        async def calls_made() -> bool:
            return sim.stats.calls >= 1

        async def out_of_memory_said() -> bool:
            return bool(said("serve.redis_unreachable")) or process.returncode is not None

        async def all_deleted() -> bool:
            info: Any = await admin.xpending(STREAM, "devserver-reaper")
            return not sim.job_ids() and int(info["pending"]) == 0

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(collect)
                await until(calls_made)
                await refuse(admin)
                await until(out_of_memory_said)
                assert process.returncode is None, errors.read_text()
                code, refused = await _reaper("enqueue", "--input", str(ids), "--redis-url", url)

                async def answered() -> bool:  # the calls on the wire when writes stopped
                    return sim.stats.in_flight == 0

                await until(answered)
                calls = sim.stats.calls
                failed = await redis_errors()

                async def refused_again() -> bool:  # it tried its writes again, and again
                    return process.returncode is not None or await redis_errors() >= failed + 3

                await until(refused_again)
                assert process.returncode is None, errors.read_text()
                sent_refused = sim.stats.calls - calls
                await accept(admin)
                await until(all_deleted)
                process.send_signal(signal.SIGTERM)
                with anyio.fail_after(30):
                    await process.wait()
            outcomes: Any = await admin.xrange(STREAM + ":outcomes")
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()
            await admin.aclose()
    assert process.returncode == 0, errors.read_text()
    assert "Traceback" not in errors.read_text()
    assert said("serve.redis_unreachable")[0]["error"] == error
    assert sent_refused == 0  # no DELETE while writes were refused
    assert said("serve.redis_back")
    assert sorted(f[b"job_id"].decode() for _, f in outcomes) == sorted(
        ids.read_text().split()
    )  # each id once: nothing sent again, nothing lost
    assert code == 69 and "Traceback" not in refused and "enqueue.redis_unavailable" in refused


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("REAPER_", "HUAWEICLOUD_"))}


@pytest.mark.anyio
async def test_a_redis_that_may_evict_the_queue_is_said_at_start(tmp_path: Path) -> None:
    """A Redis whose maxmemory-policy is allkeys-* drops any key when full: the ids stream,
    its group, the position, so ids are lost unread with nothing said. serve says so at
    start (it cannot be fixed from here: the platform's Redis setting)."""
    async with redis_server(tmp_path, ["maxmemory 64mb", "maxmemory-policy allkeys-lru"]) as port:
        url = f"redis://127.0.0.1:{port}/0"
        command = [sys.executable, "-m", "worker", "serve", "--endpoint", "http://127.0.0.1:9",
                   "--project-id", "p", "--ak", SIM_AK, "--redis-url", url,
                   "--http-port", "0", "--log-format", "json"]  # fmt: skip
        process = await anyio.open_process(command, env={"REAPER_SK": SIM_SK} | _env())
        said: list[dict[str, Any]] = []
        try:
            assert process.stdout is not None
            lines = BufferedByteReceiveStream(process.stdout)
            with anyio.fail_after(30):
                while not any(e.get("event") == "serve.started" for e in said):
                    said.append(orjson.loads(await lines.receive_until(b"\n", 1 << 20)))
        finally:
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                await process.wait()
            await process.aclose()
    (warned,) = [e for e in said if e.get("event") == "serve.redis_may_evict"]
    assert warned["policy"] == "allkeys-lru" and warned["level"] == "warning"
