"""TLS: certificates are always verified, a private CA is trusted only when configured, and a
refused certificate is a permanent ``TlsError`` after one attempt, never a hang or a retry."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import trustme
from aiohttp import web

from worker.api.client import ApiClient, make_session
from worker.api.credentials import Credentials, StaticCredentials
from worker.api.signer import parse_authorization, verify
from worker.errors import ConfigError, PermanentError, TlsError, TransientError

AK = "AK-TLS-TEST"
SK = "sk-tls-test-secret"
PROJECT = "proj-tls"


@dataclass
class TlsServer:
    port: int
    ca_pem: Path
    requests: int = 0


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_pem(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


async def _serve(cert: trustme.LeafCert, ca_pem: Path) -> AsyncIterator[TlsServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    server = TlsServer(port=0, ca_pem=ca_pem)

    async def handle(request: web.Request) -> web.StreamResponse:
        server.requests += 1
        body = await request.read()
        signed = verify(
            method=request.method,
            path=request.rel_url.raw_path,
            query=tuple(request.query.items()),
            headers=request.headers,
            body=body,
            authorization=parse_authorization(request.headers["Authorization"]),
            sk=SK,
        )
        if not signed:
            return web.json_response({"error_code": "APIGW.0301"}, status=401)
        return web.json_response({"data": [{"id": "tls-job"}]}, headers={"X-Request-Id": "tls"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    server.port = runner.addresses[0][1]
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def tls_server(ca: trustme.CA, ca_pem: Path) -> AsyncIterator[TlsServer]:
    async for server in _serve(ca.issue_cert("localhost", "127.0.0.1"), ca_pem):
        yield server


@pytest.fixture
async def wrong_name_server(ca: trustme.CA, ca_pem: Path) -> AsyncIterator[TlsServer]:
    async for server in _serve(ca.issue_cert("api.example.test"), ca_pem):
        yield server


def credentials() -> StaticCredentials:
    return StaticCredentials(Credentials(ak=AK, sk=SK))


@pytest.mark.anyio
async def test_a_certificate_from_an_unknown_ca_is_a_tls_error_after_one_attempt(
    tls_server: TlsServer,
) -> None:
    async with make_session(concurrency=1, connect_timeout=5, read_timeout=5) as session:
        client = ApiClient(
            session=session,
            endpoint=f"https://localhost:{tls_server.port}",
            project_id=PROJECT,
            credentials=credentials(),
        )
        with anyio.fail_after(10), pytest.raises(TlsError) as caught:
            await client.list_jobs()

    error = caught.value
    assert isinstance(error, PermanentError)
    assert not isinstance(error, TransientError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(error), str(error)
    assert error.http_status is None
    assert client.outcomes == {"TlsError": 1}
    assert tls_server.requests == 0
    for secret in (AK, SK):
        assert secret not in str(error)
        assert secret not in repr(error)


@pytest.mark.anyio
async def test_with_the_ca_bundle_configured_the_same_server_is_trusted(
    tls_server: TlsServer,
) -> None:
    async with make_session(
        concurrency=1, connect_timeout=5, read_timeout=5, ca_bundle=tls_server.ca_pem
    ) as session:
        client = ApiClient(
            session=session,
            endpoint=f"https://localhost:{tls_server.port}",
            project_id=PROJECT,
            credentials=credentials(),
        )
        with anyio.fail_after(10):
            page = await client.list_jobs(id="tls-job")
            deleted = await client.delete_jobs(["tls-job"])

    assert [r.id for r in page.records] == ["tls-job"]
    assert [r.id for r in deleted.records] == ["tls-job"]
    assert deleted.request_id == "tls"
    assert tls_server.requests == 2  # both signed correctly (the server answers 401 otherwise)


@pytest.mark.anyio
async def test_the_ca_bundle_does_not_excuse_a_certificate_for_another_host(
    wrong_name_server: TlsServer,
) -> None:
    async with make_session(
        concurrency=1, connect_timeout=5, read_timeout=5, ca_bundle=wrong_name_server.ca_pem
    ) as session:
        client = ApiClient(
            session=session,
            endpoint=f"https://localhost:{wrong_name_server.port}",
            project_id=PROJECT,
            credentials=credentials(),
        )
        with anyio.fail_after(10), pytest.raises(TlsError):
            await client.delete_jobs(["tls-job"])
    assert wrong_name_server.requests == 0
    assert client.outcomes == {"TlsError": 1}


@pytest.mark.parametrize("content", [None, b"not a certificate\n"])
@pytest.mark.anyio
async def test_a_ca_bundle_that_cannot_be_read_is_a_config_error(
    tmp_path: Path, content: bytes | None
) -> None:
    bundle = tmp_path / "bundle.pem"
    if content is not None:
        bundle.write_bytes(content)
    with pytest.raises(ConfigError, match="ca_bundle"):
        make_session(concurrency=1, connect_timeout=1, read_timeout=1, ca_bundle=bundle)


@pytest.mark.anyio
async def test_a_session_without_a_ca_bundle_reads_no_certificate_store(
    monkeypatch: pytest.MonkeyPatch, ca_pem: Path
) -> None:
    """Without a bundle the session verifies with aiohttp's own context, made once when
    aiohttp is imported (test_a_certificate_from_an_unknown_ca_... shows it verifies): a
    context of its own read the system store again, 20 ms of CPU, for http:// endpoints too.
    With a bundle, one context holds the store and the bundle."""
    made: list[ssl.SSLContext] = []
    create = ssl.create_default_context

    def counted(*args: object, **kwargs: object) -> ssl.SSLContext:
        made.append(create(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(ssl, "create_default_context", counted)
    async with make_session(concurrency=1, connect_timeout=1, read_timeout=1):
        assert made == []
    async with make_session(concurrency=1, connect_timeout=1, read_timeout=1, ca_bundle=ca_pem):
        assert len(made) == 1
