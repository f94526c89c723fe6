"""serve's HTTP port as an attacker on the network sees it (issue 24, point 7): the real
``serve`` process, listening where ``--http-host`` says, dropping a client that sends its
headers too slowly, refusing oversized headers with a 400, and reporting aiohttp's own errors
as JSON events of its log, never as a plain traceback."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import anyio
import orjson
import pytest

from tests.conftest import REDIS_URL
from tests.e2e import SIM_AK, SIM_SK, stop_and_drain
from worker.service.health import HEADER_TIMEOUT
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]


CLOSE = b"Connection: close\r\n\r\n"
"""The end of a request's headers asking the server to close once it has answered: read to
the end, the answer is whole at once (a connection kept alive stays open for the port's
keep-alive timeout, HEADER_TIMEOUT: 10 s a request)."""


async def _exchange(port: int, request: bytes, host: str = "127.0.0.1") -> bytes:
    async with await anyio.connect_tcp(host, port) as stream:
        await stream.send(request)
        received = b""
        with anyio.move_on_after(10):
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        return received


@pytest.mark.anyio
async def test_the_http_port_listens_where_told_and_holds_its_limits(
    redis_prefix: str, tmp_path: Path
) -> None:
    async with run_simulator(SimulatorConfig(jobs=1)) as sim:
        command = [
            sys.executable, "-m", "worker", "serve", "--endpoint", sim.url,
            "--project-id", sim.config.project_id, "--ak", SIM_AK,
            "--stream", redis_prefix + "ids", "--group", "http-surface", "--consumer", "h1",
            "--redis-url", REDIS_URL, "--http-port", "0", "--http-host", "127.0.0.1",
            "--log-format", "json",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
        errors = tmp_path / "serve.err"
        with errors.open("wb") as err:
            process = await anyio.open_process(command, env=env | {"REAPER_SK": SIM_SK},
                                               stderr=err)  # fmt: skip
        lines: list[bytes] = []
        try:
            assert process.stdout is not None
            buffered = b""
            port = None
            with anyio.fail_after(30):
                while port is None:
                    buffered += await process.stdout.receive()
                    *complete, buffered = buffered.split(b"\n")
                    lines += complete
                    for line in complete:
                        event = orjson.loads(line)
                        if event["event"] == "serve.started":
                            assert event["http_host"] == "127.0.0.1"
                            port = event["http_port"]

            # Only where --http-host says: 127.0.0.2 is this machine too, but not listened on.
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.2", port), timeout=5).close()
            healthy = await _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + CLOSE)
            assert healthy.startswith(b"HTTP/1.1 200")
            # A load balancer's health check set to HEAD: 200 and no body, not 405.
            head = await _exchange(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n" + CLOSE)
            assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n"), head
            # Every series of a scrape is one the metrics define: no _created beside each.
            scrape = await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + CLOSE)
            assert b"devserver_reaper_ids_total" in scrape, scrape[-400:]
            assert b"_created" not in scrape, scrape[-400:]

            # A 20 KB header: refused before any handler, and said in the log as JSON.
            huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Token: " + b"s3cr" * 5000 + b"\r\n\r\n"
            assert (await _exchange(port, huge)).startswith(b"HTTP/1.0 400")

            # One header line a second: dropped after HEADER_TIMEOUT, not kept forever.
            with anyio.fail_after(HEADER_TIMEOUT * 3):
                async with await anyio.connect_tcp("127.0.0.1", port) as slow:
                    await slow.send(b"GET /healthz HTTP/1.1\r\n")
                    dropped = False
                    while not dropped:
                        try:
                            await slow.send(b"X-Slow: 1\r\n")
                            with anyio.move_on_after(1):
                                dropped = await slow.receive() == b""
                        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                            dropped = True
        finally:
            rest = await stop_and_drain(process)
    lines += (buffered + rest).split(b"\n")
    events = [orjson.loads(line) for line in lines if line.strip()]  # every line is JSON
    stderr = errors.read_text()
    assert "Traceback" not in stderr, stderr
    [error] = [e for e in events if e["event"] == "http.error"]
    assert (error["error"], error["status"], error["level"]) == ("LineTooLong", 400, "warning")
    assert b"s3cr" not in orjson.dumps(events)  # the client's bytes are not repeated
