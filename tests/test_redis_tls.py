"""A ``rediss://`` Redis whose certificate is refused is said so, not "does not answer": a
real redis-server serving TLS on a free loopback port, with a certificate of a test CA."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from tests.e2e import Served, reaper, reaper_env, redis_errors_of, serving, until, write_ids
from tests.test_redis_auth import REDIS_SERVER, _free_port, redis_server
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.usefixtures("clean_env"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server"),
]

PASSWORD = "tls-test-s3cret"


def _tls(folder: Path, ca: trustme.CA) -> list[str]:
    """``redis_server`` lines: TLS with a certificate ``ca`` signed, the password
    ``PASSWORD``."""
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = folder / "cert.pem", folder / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return [f"tls-cert-file {cert}", f"tls-key-file {key}", "tls-auth-clients no",
            f"requirepass {PASSWORD}"]  # fmt: skip


@pytest.fixture
async def tls_redis(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    """A redis-server answering TLS alone on a free port (its password ``PASSWORD``), and
    the PEM file of the CA that signed its certificate."""
    ca = trustme.CA()
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    async with redis_server(tmp_path, _tls(tmp_path, ca), tls=True) as port:
        yield port, ca_pem


async def test_a_redis_whose_certificate_is_refused_is_said_so_without_its_password(
    tls_redis: tuple[int, Path], tmp_path: Path
) -> None:
    """``enqueue`` to a ``rediss://`` Redis with a certificate of a CA not trusted here: 69,
    "the TLS certificate of Redis at rediss://127.0.0.1:PORT/0 ... was refused (self-signed
    ...)" (it said "does not answer (ConnectionError)", and a person was told to check that
    Redis runs). The URL's password is never printed; with the CA given as the fix now says
    (``?ssl_ca_certs=``), the ids go on the stream."""
    port, ca_pem = tls_redis
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


async def test_serve_says_a_redis_certificate_refused_once_it_ran_not_that_redis_is_away(
    tmp_path: Path,
) -> None:
    """``serve`` running on a ``rediss://`` Redis whose certificate it trusts; that Redis
    comes back with a certificate of another CA (a rotation half done): serve waits, as for
    a Redis away, and says the certificate is refused and how to trust its CA (event
    ``serve.redis_certificate_refused``). It said ``serve.redis_unreachable``,
    ``ConnectionError`` once, then nothing while every call was refused for the certificate:
    a Redis that runs, read as down. The password is never printed."""
    trusted, other = trustme.CA(), trustme.CA()
    ca_pem = tmp_path / "ca.pem"
    trusted.cert_pem.write_to_path(str(ca_pem))
    port = _free_port()
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    async with contextlib.AsyncExitStack() as redis:
        await redis.enter_async_context(redis_server(first, _tls(first, trusted), tls=True,
                                                     port=port))  # fmt: skip
        url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca_pem}"
        async with (
            run_simulator(SimulatorConfig(jobs=1)) as sim,
            serving(sim, url, tmp_path / "serve.err", "--stream", "tls-test:ids") as served,
        ):
            await redis.aclose()
            await redis.enter_async_context(redis_server(second, _tls(second, other), tls=True,
                                                         port=port))  # fmt: skip

            async def refused_again() -> bool:  # calls refused since the second came up
                return await redis_errors_of(served.port) >= 3

            await until(refused_again)
            await until(lambda: _said(served, "serve.redis_certificate_refused"), timeout=30)
            said = served.named("serve.redis_certificate_refused")
            errors = (tmp_path / "serve.err").read_text()
    assert len(said) == 1, served.events[-5:]
    assert f"the TLS certificate of Redis at rediss://127.0.0.1:{port}/0" in said[0]["error"]
    assert "was refused (" in said[0]["error"], said
    assert PASSWORD not in str(served.events) + errors and "Traceback" not in errors


async def _said(served: Served, event: str) -> bool:
    return bool(served.named(event))
