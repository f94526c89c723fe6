"""serve waiting for Redis at start-up answers its probes: ``/healthz`` 200 (alive: a
Kubernetes liveness or startup probe must not see "connection refused" and restart it),
``/readyz`` 503 naming the Redis it waits for; once a Redis answers on that port, it starts
and turns ready. A real ``serve`` subprocess, and a ``redis-server`` of the test's own,
started on the port serve was given only after serve said it is waiting.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import pytest

from tests.benchmarks import harness
from tests.e2e import Served, collect, reaped, reaper, until
from tests.test_redis_auth import PASSWORD, REDIS_SERVER, _free_port, redis_server
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("clean_env"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server"),
]


async def _probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, await r.json()


@asynccontextmanager
async def _serving(redis_port: int, port: int = 0) -> AsyncIterator[Served]:
    """A ``serve`` subprocess told of a Redis on ``redis_port`` (and of the simulator), its
    events collected; killed at the end if it still runs."""
    async with run_simulator(SimulatorConfig(jobs=1)) as sim, anyio.create_task_group() as tg:
        command = [
            sys.executable, "-m", "worker", "serve", "--endpoint", sim.url,
            "--project-id", sim.config.project_id, "--ak", sim.config.ak,
            "--stream", "startup:ids", "--group", "reapers", "--consumer", "c1",
            "--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--http-port", str(port),
            "--log-format", "json",
        ]  # fmt: skip
        process = await anyio.open_process(
            command, env=harness.clean_env() | {"REAPER_SK": sim.config.sk}
        )
        served = Served(process)
        async with reaped(process):
            tg.start_soon(collect, served)
            yield served


async def _waiting_for_redis(served: Served) -> None:
    """Until its first PING was refused."""

    async def waiting() -> bool:
        return bool(served.named("serve.redis_unreachable"))

    await until(waiting, timeout=20)


@pytest.mark.anyio
async def test_probes_answer_while_it_waits_for_redis_and_it_starts_once_redis_does(
    tmp_path: Path,
) -> None:
    redis_port = _free_port()  # nothing listens here until the test starts its Redis
    port = _free_port()
    async with _serving(redis_port, port) as served:
        process = served.process
        await _waiting_for_redis(served)
        live, _ = await _probe(port, "/healthz")
        ready, body = await _probe(port, "/readyz")
        assert (live, ready) == (200, 503)
        assert served.named("serve.starting")[0]["http_port"] == port
        assert body["ready"] is False and body["redis"] is False
        assert f"127.0.0.1:{redis_port}" in body["starting"]
        async with redis_server(tmp_path, [], port=redis_port):

            async def is_ready() -> bool:
                return (await _probe(port, "/readyz"))[0] == 200

            await until(is_ready, timeout=20)
            assert served.started.is_set()  # serve.started: built, consuming
            assert (await _probe(port, "/healthz"))[0] == 200
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                await process.wait()
    assert process.returncode == 0
    assert served.named("serve.redis_unreachable")[0]["operation"] == "ping"
    assert "serve.redis_back" in {e["event"] for e in served.events}


class _Relay:
    """A TCP relay to a Redis on ``port`` that notes, in order, each connection's opening
    and closing with what its first bytes were: ``tls`` (a handshake) or ``plain``."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.said: list[tuple[str, str]] = []

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))  # noqa: S610
            await listener.serve(self._relay)

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", self.upstream) as upstream:
            try:
                first = await client.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return
            kind = "tls" if first[:1] == b"\x16" else "plain"
            self.said.append(("open", kind))
            await upstream.send(first)

            async def pump(source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream) -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                                         anyio.ClosedResourceError, OSError):  # fmt: skip
                    async for chunk in source:
                        await sink.send(chunk)
                group.cancel_scope.cancel()

            async with anyio.create_task_group() as group:
                group.start_soon(pump, client, upstream)
                group.start_soon(pump, upstream, client)
            self.said.append(("close", kind))


@pytest.mark.anyio
@pytest.mark.parametrize("password", ["", PASSWORD])
async def test_rediss_pointed_at_a_redis_without_tls_says_so_and_exits_78(
    tmp_path: Path, password: str
) -> None:
    """A ``rediss://`` URL naming a plain Redis: the TLS handshake gets no answer. serve
    says what is wrong in the user's words (TLS asked, the Redis speaks without it, use
    redis://) and exits 78 at the first failed PING, where it waited 30 s and exited 69 with
    a bare TimeoutError; the password, with or without one, is never shown. It asks whether
    a plain Redis answers there while its handshake still waits (a relay in front of the
    Redis sees the plain PING come before the TLS connection closes), not once the
    handshake's 5 s timeout has passed."""
    config = [f"requirepass {password}"] if password else []
    async with (
        run_simulator(SimulatorConfig(jobs=1)) as sim,
        redis_server(tmp_path, config) as upstream,
        anyio.create_task_group() as relaying,
    ):
        relay = _Relay(upstream)
        redis_port = await relaying.start(relay.serve)
        user = f":{password}@" if password else ""
        done = await reaper(
            ["serve", "--endpoint", sim.url, "--project-id", sim.config.project_id,
             "--ak", sim.config.ak, "--stream", "tls:ids", "--group", "reapers",
             "--consumer", "c1", "--http-port", "0", "--log-format", "json"],
            harness.clean_env() | {"REAPER_SK": sim.config.sk,
                                   "REAPER_REDIS_URL": f"rediss://{user}127.0.0.1:{redis_port}/0"},
        )  # fmt: skip
        relaying.cancel_scope.cancel()
    said = done.events("serve.config_error")
    assert done.code == 78, done.stderr
    assert len(said) == 1 and done.events("serve.redis_unavailable") == []
    assert f"rediss:// asks for TLS, but the Redis at 127.0.0.1:{redis_port}" in said[0]["error"]
    assert "use redis://" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    assert relay.said.index(("open", "plain")) < relay.said.index(("close", "tls"))


@pytest.mark.anyio
async def test_a_stop_while_it_waits_for_redis_is_said_and_exits_75(tmp_path: Path) -> None:
    """SIGTERM while start-up waits for a Redis that does not answer: ``serve.interrupted``
    and ``serve.stopped`` (nothing read, ``waiting_for: redis``), exit 75 at once; it exited
    75 without a word (the handler for a stop before the command's own took it)."""
    async with _serving(_free_port()) as served:  # nothing listens on that port
        process = served.process
        await _waiting_for_redis(served)
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            await process.wait()
    assert process.returncode == 75
    assert [e["signal"] for e in served.named("serve.interrupted")] == ["SIGTERM"]
    (stopped,) = served.named("serve.stopped")
    assert stopped["waiting_for"] == "redis" and stopped["read"] == 0
    assert served.named("serve.redis_unavailable") == []
