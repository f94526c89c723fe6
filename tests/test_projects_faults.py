"""The look-up of a region's project in IAM (``worker.api.projects``) against what no IAM
should answer, over real HTTP on loopback: a file instead of the list, an answer that
trickles in, a project without a name, TLS asked of a plain HTTP server.
"""

from __future__ import annotations

import ssl
from typing import cast

import aiohttp
import anyio
import pytest
import trustme
from aiohttp import web

from tests.e2e import reaper, serve_app
from tests.test_projects import KEYS, ScriptedIam, by_region, listing, look_up_from
from tests.test_projects import session as session  # the fixture
from worker.api.credentials import Credentials, StaticCredentials
from worker.api.projects import (
    MAX_ANSWER_BYTES,
    IamNotThere,
    IamUnavailable,
    ProjectLookupFailed,
    ProjectNotFound,
    lookup_project,
)

pytestmark = pytest.mark.anyio


class Streamed:
    """A 200 whose JSON body is written ``chunk`` by ``chunk``, ``pause`` s apart, the
    region's project at its very end; counts what it managed to write."""

    def __init__(self, chunks: int, chunk: bytes, pause: float = 0.0) -> None:
        self.chunks, self.chunk, self.pause = chunks, chunk, pause
        self.calls = 0
        self.written = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            await response.write(b'{"projects": [')
            for _ in range(self.chunks):
                await response.write(self.chunk)
                self.written += len(self.chunk)
                await anyio.sleep(self.pause)
            await response.write(b'{"name": "cn-north-4", "id": "found-at-the-end"}]}')
        except (ConnectionError, RuntimeError):  # the client stopped reading and left
            pass
        return response


def as_handler(streamed: Streamed) -> ScriptedIam:
    """``look_up_from`` only calls ``handle``: a ``Streamed`` serves as well."""
    return cast(ScriptedIam, streamed)


async def test_an_answer_larger_than_a_project_list_is_not_read_whole(
    session: aiohttp.ClientSession,
) -> None:
    """A URL that serves a large file (here 8 MiB of projects of other names, the region's
    at the end) is not IAM's project list: refused as such (78) once a MiB is read, not read
    to the end (400 MB took 9 GB of memory and a minute)."""
    chunk = b'{"name": "elsewhere", "id": "x"},' * 2048  # 64 KiB
    handler = Streamed(128, chunk)
    with pytest.raises(IamNotThere) as caught:
        await look_up_from(session, as_handler(handler))
    assert f"larger than {MAX_ANSWER_BYTES} bytes" in str(caught.value)
    assert handler.calls == 1  # not asked again: it will not change its mind
    assert handler.written < 4 * MAX_ANSWER_BYTES, handler.written

    sized = ScriptedIam(web.json_response({"projects": [], "pad": "x" * MAX_ANSWER_BYTES}))
    with pytest.raises(IamNotThere, match="larger than"):  # its Content-Length says so
        await look_up_from(session, sized)


async def test_an_answer_that_trickles_in_is_given_up_after_each_attempts_time(
    session: aiohttp.ClientSession,
) -> None:
    """A byte every 50 ms never trips the session's read timeout (between two reads), so
    the look-up held the command before it began, for ever, saying nothing. Each attempt now
    has its whole answer within ``attempt_s``; after the attempts, IAM is unavailable
    (69)."""
    handler = Streamed(10_000, b" ", pause=0.05)
    with anyio.fail_after(30):  # the old look-up never returns
        with pytest.raises(IamUnavailable) as caught:
            await look_up_from(
                session, as_handler(handler), attempts=2, attempt_s=0.5,
                sleep=lambda s: anyio.sleep(0),
            )  # fmt: skip
    assert handler.calls == 2
    assert "no whole answer within 0.5 s" in str(caught.value)


async def test_a_project_without_a_name_is_not_the_regions(session: aiohttp.ClientSession) -> None:
    """Only a project named after the region is the region's: one without a name (a proxy's
    list, an IAM that ignored ``?name=``) was taken as it."""
    nameless = web.json_response({"projects": [{"id": "nameless"}]})
    with pytest.raises(ProjectNotFound):
        await look_up_from(session, ScriptedIam(nameless))
    both = web.json_response(
        {"projects": [{"id": "nameless"}, {"name": "cn-north-4", "id": "named"}]}
    )
    found = await look_up_from(session, ScriptedIam(both))
    assert found.project_id == "named"


async def test_an_https_iam_endpoint_that_answers_plain_http_is_told_so(
    session: aiohttp.ClientSession,
) -> None:
    """TLS asked of a plain HTTP server: the fix names the wrong scheme or port, not a CA
    bundle (no certificate was ever seen)."""
    app = web.Application()
    app.router.add_get("/v3/projects", ScriptedIam(listing(("cn-north-4", "p"))).handle)
    async with serve_app(app) as url:
        with pytest.raises(IamUnavailable) as caught:
            await lookup_project(
                session=session,
                credentials=KEYS, region="cn-north-4",
                iam_endpoint=url.replace("http://", "https://"),
            )  # fmt: skip
    assert "plain HTTP" in caught.value.fix, caught.value.fix
    assert "--ca-bundle" not in caught.value.fix


async def test_check_calls_an_answer_that_is_not_iams_list_not_iam() -> None:
    """``check`` with ``iam_endpoint`` at a web page: the heading says the endpoint is not
    IAM (it said PROJECT NOT FOUND, as if IAM had answered and knew no such project)."""
    app = web.Application()
    page = web.Response(text="<html>welcome</html>", content_type="text/html")
    app.router.add_get("/v3/projects", ScriptedIam(page).handle)
    async with serve_app(app) as url:
        done = await reaper(["check"], by_region(url))
    assert done.code == 78, done.stdout + done.stderr
    result, fix = done.stdout.splitlines()
    assert result.startswith("result       NOT IAM: "), result
    assert "not IAM's project list" in result and "iam_endpoint" in fix


async def test_a_trace_id_that_echoes_the_request_never_carries_our_keys_out(
    session: aiohttp.ClientSession,
) -> None:
    """IAM's ``X-IAM-Trace-Id`` is server text like any other: one that echoes what we sent
    (the ``X-Security-Token`` of temporary keys, the access key in ``Authorization``) went
    into the error, ``run.config_error`` and ``project.resolved`` as it came."""
    token, sk, ak = "TOKEN-canary-4711", "SK-canary-4711", "AKcanary4711"
    keys = StaticCredentials(Credentials(ak, sk, token))

    def echo(answer: web.Response) -> ScriptedIam:
        async def handle(request: web.Request) -> web.Response:
            sent = f"token={request.headers.get('X-Security-Token')}; sk={sk}; " + "; ".join(
                f"{k}={v}" for k, v in request.headers.items()
            )
            answer.headers["X-IAM-Trace-Id"] = sent
            return answer

        handler = ScriptedIam(answer)
        handler.handle = handle  # type: ignore[method-assign]
        return handler

    async def look_up(handler: ScriptedIam) -> tuple[str, ...]:
        try:
            found = await look_up_from(session, handler, keys)
        except ProjectLookupFailed as exc:
            return (str(exc), exc.fix)
        return (found.project_id, found.trace_id or "")

    for answer in (
        web.Response(text="<html>welcome</html>", content_type="text/html"),
        web.json_response({"projects": [{"name": "cn-north-4", "id": "p-1"}]}),
    ):
        said = " ".join(await look_up(echo(answer)))
        assert "token=" in said and "sk=" in said, said  # the echo is there, scrubbed
        for secret in (token, sk, ak):
            assert secret not in said, said


async def test_an_http_iam_endpoint_at_a_tls_port_is_told_to_use_https(
    session: aiohttp.ClientSession,
) -> None:
    """Plain HTTP asked of a TLS server gets no answer at all (the server hangs up): the
    look-up said "run again later"; the port speaks TLS, so the fix names the scheme."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    iam = ScriptedIam(listing(("cn-north-4", "p")))
    app = web.Application()
    app.router.add_get("/v3/projects", iam.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with pytest.raises(IamUnavailable) as caught:
            await lookup_project(session=session, credentials=KEYS, region="cn-north-4",
                                 iam_endpoint=f"http://127.0.0.1:{port}",
                                 sleep=lambda s: anyio.sleep(0))  # fmt: skip
    finally:
        await runner.cleanup()
    assert str(caught.value).endswith("the server speaks TLS (is the endpoint https://?)")
    assert caught.value.fix.startswith(
        f"check iam_endpoint (REAPER_IAM_ENDPOINT): http://127.0.0.1:{port} answers in TLS, "
        "not plain HTTP (use https://)"
    ), caught.value.fix
    assert "later" not in caught.value.fix
    assert iam.calls == 0  # nothing IAM could read reached it


async def test_an_http_iam_endpoint_that_is_not_listening_is_still_asked_again_later(
    session: aiohttp.ClientSession,
) -> None:
    with pytest.raises(IamUnavailable) as caught:
        await lookup_project(session=session, credentials=KEYS, region="cn-north-4",
                             iam_endpoint="http://127.0.0.1:9",
                             sleep=lambda s: anyio.sleep(0))  # fmt: skip
    assert caught.value.fix.startswith("run again later"), caught.value.fix
