"""A ``rediss://`` Redis whose certificate is refused is said so, not "does not answer": a
real redis-server serving TLS on a free loopback port, with a certificate of a test CA."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.e2e import reaper, reaper_env, until, write_ids
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("clean_env")]

PASSWORD = "tls-test-s3cret"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server answering TLS alone on a free port (its password ``PASSWORD``), and
    the PEM file of the CA that signed its certificate; skipped where it has no TLS."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("no redis-server")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, ca_pem = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    port = _free_port()
    process = subprocess.Popen(
        [server, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-auth-clients", "no", "--requirepass", PASSWORD,
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield port, ca_pem
    finally:
        process.terminate()
        process.wait(30)


async def test_a_redis_whose_certificate_is_refused_is_said_so_without_its_password(
    tls_redis: tuple[int, Path], tmp_path: Path
) -> None:
    """``enqueue`` to a ``rediss://`` Redis with a certificate of a CA not trusted here: 69,
    "the TLS certificate of Redis at rediss://127.0.0.1:PORT/0 ... was refused (self-signed
    ...)" (it said "does not answer (ConnectionError)", and a person was told to check that
    Redis runs). The URL's password is never printed; with the CA given as the fix now says
    (``?ssl_ca_certs=``), the ids go on the stream."""
    port, ca_pem = tls_redis

    async def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    await until(listening)
    ids = write_ids(tmp_path / "ids.txt", ["job-1"])
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"
    args = ["enqueue", "--input", str(ids), "--stream", "tls-test:ids"]
    refused = await reaper(args, reaper_env("http://127.0.0.1:9", REAPER_REDIS_URL=url))
    said = refused.stdout + refused.stderr
    assert refused.code == 69, said
    assert f"the TLS certificate of Redis at rediss://127.0.0.1:{port}/0" in said, said
    assert "was refused (" in said and "does not answer" not in said, said
    assert PASSWORD not in said
    trusted = f"{url}?ssl_ca_certs={ca_pem}"
    done = await reaper(args, reaper_env("http://127.0.0.1:9", REAPER_REDIS_URL=trusted))
    assert done.code == 0, done.stdout + done.stderr
    assert '"enqueued":1' in done.stdout


async def test_serve_says_a_refused_redis_certificate_at_once_without_retrying(
    tls_redis: tuple[int, Path],
) -> None:
    """``serve`` at a ``rediss://`` Redis whose certificate is refused: 69 at its first PING,
    saying the certificate was refused and how to trust its CA, as enqueue does. It tried
    again for 30 s (one "serve.redis_unreachable" after another) and then said "Redis
    unavailable", as of a Redis that does not run. The password is never printed."""
    port, _ = tls_redis

    async def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    await until(listening)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"
    async with run_simulator(SimulatorConfig(jobs=1)) as sim:
        args = ["serve", "--stream", "tls-test:ids", "--consumer", "c1", "--http-port", "0",
                "--http-host", "127.0.0.1"]  # fmt: skip
        done = await reaper(args, reaper_env(sim.url, REAPER_REDIS_URL=url))
        assert sim.stats.calls == 0
    said = done.stdout + done.stderr
    assert done.code == 69, said[-3000:]
    assert f"the TLS certificate of Redis at rediss://127.0.0.1:{port}/0" in said, said[-3000:]
    assert "was refused (" in said and "ssl_ca_certs=" in said, said[-3000:]
    assert "redis_unreachable" not in said and "redis_unavailable" not in said, said[-3000:]
    assert PASSWORD not in said and "Traceback" not in said
