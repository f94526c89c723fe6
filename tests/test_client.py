"""The API client over real HTTP on loopback, against a scripted fake of the jobs API.

Each test programs the fake's answers (status, headers, body, a dropped connection, a
hang past the read timeout, a body cut short) and pins what the client makes of them:
the signed request the server receives, the records parsed, or the error class and fields.
"""

from __future__ import annotations

import socket
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import anyio
import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from worker.api.client import (
    USER_AGENT,
    ApiClient,
    JobPage,
    ProbeResult,
    make_session,
    parse_retry_after,
)
from worker.api.credentials import Credentials, StaticCredentials
from worker.api.session import SHOW_HEADROOM
from worker.api.signer import parse_authorization, parse_sdk_date, verify
from worker.errors import (
    AMBIGUOUS,
    ApiError,
    ApiTimeout,
    AuthError,
    ClientError,
    MalformedResponse,
    NetworkError,
    NoSuchApi,
    NotFound,
    ServerError,
    ThrottledError,
)
from worker.simulator import FaultConfig, Simulator, SimulatorConfig, run_simulator
from worker.types import DeleteResult

AK = "AKFAKEACCESSKEY0001"
SK = "sk-very-secret-0123456789abcdefSECRET"
TOKEN = "token-temporary-SECURITYTOKENVALUE-xyz"
PROJECT = "proj-0123"
JOBS_PATH = f"/v1/{PROJECT}/dev-servers/jobs"
T0 = datetime(2025, 6, 10, 6, 20, 20, tzinfo=UTC)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- the scripted fake API ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the fake received it."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: CIMultiDict[str]
    body: bytes
    peer: tuple[str, int]

    def verifies(self, sk: str = SK) -> bool:
        return verify(
            method=self.method,
            path=self.path,
            query=self.query,
            headers=self.headers,
            body=self.body,
            authorization=parse_authorization(self.headers["Authorization"]),
            sk=sk,
        )


class FakeApi:
    """Answers each request with the next scripted handler (the default when none is left)."""

    def __init__(self) -> None:
        self.script: deque[Handler] = deque()
        self.default: Handler = reply(200, {"data": []})
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.peak = 0
        self.release = anyio.Event()
        self.url = ""

    def then(self, *handlers: Handler) -> FakeApi:
        self.script.extend(handlers)
        return self

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(
            Seen(
                method=request.method,
                path=request.rel_url.raw_path,
                query=tuple(request.query.items()),
                headers=CIMultiDict(request.headers),
                body=body,
                peer=tuple(peer) if peer else ("", 0),
            )
        )
        handler = self.script.popleft() if self.script else self.default
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1


def reply(
    status: int,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    request_id: str | None = "req-0001",
) -> Handler:
    """A complete answer: JSON ``body`` (or ``raw`` bytes), with an ``X-Request-Id``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        out = dict(headers or {})
        if request_id is not None:
            out.setdefault("X-Request-Id", request_id)
        payload = raw if raw is not None else orjson.dumps(body) if body is not None else b""
        if raw is None and body is not None:
            out.setdefault("Content-Type", "application/json")
        return web.Response(status=status, body=payload, headers=out)

    return handler


def hang(fake: FakeApi) -> Handler:
    """Never answer (until the test ends): the client's read timeout must fire."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await fake.release.wait()
        return web.Response(body=b'{"data":[]}', content_type="application/json")

    return handler


async def drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without a word."""
    assert request.transport is not None
    request.transport.abort()
    return web.Response(status=200)


async def truncated(request: web.Request) -> web.StreamResponse:
    """Promise 200 bytes of JSON, send 12, close the connection."""
    response = web.StreamResponse(status=200, headers={"X-Request-Id": "req-cut"})
    response.content_type = "application/json"
    response.content_length = 200
    await response.prepare(request)
    await response.write(b'{"data": [{"')
    assert request.transport is not None
    request.transport.close()
    return response


def record(job_id: str, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": job_id,
        "name": f"job-{job_id}",
        "user_name": "alice",
        "description": "",
        "type": "COMMON",
        "status": "DELETED",
        "abnormal_count": 0,
        "create_at": 1749536420547,
        "update_at": "2025-06-10T06:20:21Z",
    }
    base.update(extra)
    return base


def envelope(*records: dict[str, Any], **paging: Any) -> dict[str, Any]:
    return (
        {"current": 1, "pages": 1, "size": len(records), "total": len(records)}
        | paging
        | {"data": list(records)}
    )


class FakeClock:
    """``utcnow`` that moves one second per reading: every signature gets its own date."""

    def __init__(self, start: datetime = T0, step: timedelta = timedelta(seconds=1)) -> None:
        self.now = start
        self.step = step
        self.readings: list[datetime] = []

    def __call__(self) -> datetime:
        current = self.now
        self.readings.append(current)
        self.now += self.step
        return current


class RotatingCredentials:
    """Hands out the next key pair on every ``current()``: proves keys are fetched per attempt."""

    name = "rotating"

    def __init__(self, *keys: Credentials) -> None:
        self.keys = list(keys)
        self.asked = 0

    async def current(self) -> Credentials:
        key = self.keys[min(self.asked, len(self.keys) - 1)]
        self.asked += 1
        return key


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeApi]:
    api = FakeApi()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    api.url = f"http://{host}:{port}"
    try:
        yield api
    finally:
        api.release.set()
        await runner.cleanup()


def static(token: str | None = None) -> StaticCredentials:
    return StaticCredentials(Credentials(ak=AK, sk=SK, security_token=token))


@pytest.fixture
async def client(fake: FakeApi) -> AsyncIterator[ApiClient]:
    async with make_session(concurrency=4, connect_timeout=2, read_timeout=2) as session:
        yield ApiClient(
            session=session,
            endpoint=fake.url,
            project_id=PROJECT,
            credentials=static(TOKEN),
            utcnow=FakeClock(),
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- parse_retry_after -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (format_datetime(T0 + timedelta(seconds=30), usegmt=True), 30.0),
        ("Tue, 10 Jun 2025 06:21:20 GMT", 60.0),
        (format_datetime(T0 - timedelta(hours=1), usegmt=True), 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1e3", None),
        ("inf", None),
        ("Tue, 99 Foo 2025 25:61:61 GMT", None),
    ],
)
def test_parse_retry_after_reads_seconds_and_http_dates_and_refuses_garbage(
    value: str | None, expected: float | None
) -> None:
    assert parse_retry_after(value, T0) == expected


@given(st.integers(min_value=0, max_value=10**9))
def test_parse_retry_after_delay_seconds_round_trip(seconds: int) -> None:
    assert parse_retry_after(str(seconds), T0) == float(seconds)


@given(st.integers(min_value=-(10**6), max_value=10**6))
def test_parse_retry_after_http_date_is_never_negative(offset: int) -> None:
    result = parse_retry_after(format_datetime(T0 + timedelta(seconds=offset), usegmt=True), T0)
    assert result == max(0.0, float(offset))


def test_parse_retry_after_accepts_a_naive_now_as_utc() -> None:
    naive = T0.replace(tzinfo=None)
    assert parse_retry_after(format_datetime(T0 + timedelta(seconds=5), usegmt=True), naive) == 5


# -- the happy paths and what goes on the wire ---------------------------------------------


@pytest.mark.anyio
async def test_a_cookie_the_server_sets_is_never_sent_back(fake: FakeApi) -> None:
    """Nothing goes out that the signer did not see: a gateway's or a proxy's cookie would
    ride along, unsigned, on every later call. By host name, since aiohttp's default jar
    ignores cookies from a bare IP address (and would hide the bug here)."""
    fake.then(reply(200, envelope(), headers={"Set-Cookie": "lb=node-7; Path=/"}))
    endpoint = fake.url.replace("127.0.0.1", "localhost")
    async with make_session(concurrency=1, connect_timeout=2, read_timeout=2) as session:
        client = ApiClient(
            session=session, endpoint=endpoint, project_id=PROJECT, credentials=static(TOKEN)
        )
        await client.list_jobs()
        await client.list_jobs()
    first, second = fake.seen
    assert "Cookie" not in first.headers and "Cookie" not in second.headers
    assert second.verifies()


@pytest.mark.anyio
async def test_delete_sends_compact_signed_json_and_returns_the_records(
    fake: FakeApi, client: ApiClient
) -> None:
    fake.then(reply(200, envelope(record("a"), record("b", create_at="1749536420000"))))

    result = await client.delete_jobs(["a", "b"])

    assert isinstance(result, DeleteResult)
    assert [r.id for r in result.records] == ["a", "b"]
    assert result.records[0].create_at == datetime(2025, 6, 10, 6, 20, 20, 547000, tzinfo=UTC)
    assert result.records[1].create_at == datetime(2025, 6, 10, 6, 20, 20, tzinfo=UTC)
    assert result.records[0].update_at == datetime(2025, 6, 10, 6, 20, 21, tzinfo=UTC)
    assert (result.request_id, result.http_status) == ("req-0001", 200)

    [seen] = fake.seen
    assert (seen.method, seen.path, seen.query) == ("DELETE", JOBS_PATH, ())
    assert seen.body == b'{"job_ids":["a","b"]}'
    assert seen.headers["Content-Type"] == "application/json;charset=utf-8"
    assert seen.headers["X-Project-Id"] == PROJECT
    assert seen.headers["User-Agent"] == USER_AGENT
    assert seen.headers["X-Security-Token"] == TOKEN
    assert seen.headers["Host"] == fake.url.removeprefix("http://")
    assert "Accept-Encoding" not in seen.headers
    auth = parse_authorization(seen.headers["Authorization"])
    assert auth.access_key == AK
    assert set(auth.signed_headers) == {
        "content-type",
        "host",
        "user-agent",
        "x-project-id",
        "x-sdk-date",
        "x-security-token",
    }
    assert seen.verifies(SK)
    assert not seen.verifies("another-secret-key")


def test_user_agent_names_the_tool_aiohttp_and_python() -> None:
    import sys

    import aiohttp

    import worker

    assert USER_AGENT.startswith(f"devserver-reaper/{worker.__version__} ")
    assert f"aiohttp/{aiohttp.__version__}" in USER_AGENT
    assert f"python/{sys.version_info.major}.{sys.version_info.minor})" in USER_AGENT


@pytest.mark.anyio
async def test_every_attempt_is_signed_afresh_with_the_keys_current_at_that_moment(
    fake: FakeApi,
) -> None:
    keys = RotatingCredentials(
        Credentials(ak="AK-FIRST", sk="sk-first"),
        Credentials(ak="AK-SECOND", sk="sk-second", security_token="tok-second"),
    )
    clock = FakeClock()
    fake.then(reply(503, {"error_code": "X", "error_msg": "busy"}), reply(200, envelope()))
    async with make_session(concurrency=1, connect_timeout=2, read_timeout=2) as session:
        client = ApiClient(
            session=session, endpoint=fake.url, project_id=PROJECT, credentials=keys, utcnow=clock
        )
        with pytest.raises(ServerError):
            await client.delete_jobs(["a"])
        await client.delete_jobs(["a"])

    assert keys.asked == 2
    first, second = fake.seen
    assert parse_authorization(first.headers["Authorization"]).access_key == "AK-FIRST"
    assert parse_authorization(second.headers["Authorization"]).access_key == "AK-SECOND"
    assert "X-Security-Token" not in first.headers
    assert second.headers["X-Security-Token"] == "tok-second"
    assert first.verifies("sk-first")
    assert second.verifies("sk-second")
    dates = [parse_sdk_date(s.headers["X-Sdk-Date"]) for s in fake.seen]
    assert dates[0] != dates[1]
    assert set(dates) <= set(clock.readings)


@pytest.mark.anyio
async def test_list_sends_filters_as_a_signed_query_and_reads_the_page(
    fake: FakeApi, client: ApiClient
) -> None:
    fake.then(reply(200, envelope(record("j1"), current=2, pages=5, size=1, total="41")))

    page = await client.list_jobs(status="FINISHED", name="nightly run/1", visible=True, size=1)

    assert isinstance(page, JobPage)
    assert [r.id for r in page.records] == ["j1"]
    assert (page.current, page.pages, page.size, page.total) == (2, 5, 1, 41)
    assert page.request_id == "req-0001"
    [seen] = fake.seen
    assert seen.method == "GET"
    assert seen.path == JOBS_PATH
    assert dict(seen.query) == {
        "status": "FINISHED",
        "name": "nightly run/1",
        "visible": "true",
        "size": "1",
    }
    assert "Content-Type" not in seen.headers
    assert seen.body == b""
    assert seen.verifies()


@pytest.mark.anyio
async def test_list_drops_paging_numbers_that_are_not_integers(
    fake: FakeApi, client: ApiClient
) -> None:
    fake.then(reply(200, {"data": [], "current": "first", "pages": True, "total": None}))
    page = await client.list_jobs()
    assert (page.records, page.current, page.pages, page.size, page.total) == (
        (),
        None,
        None,
        None,
        None,
    )


@pytest.mark.anyio
async def test_get_job_returns_the_record_and_quotes_the_id_in_the_path(
    fake: FakeApi, client: ApiClient
) -> None:
    fake.then(reply(200, record("job-1", items=[], tasks=[], template_id="t")))
    job = await client.get_job("job-1")
    assert (job.id, job.status, job.abnormal_count) == ("job-1", "DELETED", 0)
    assert fake.seen[0].path == f"{JOBS_PATH}/job-1"
    assert fake.seen[0].verifies()


@pytest.mark.anyio
async def test_get_job_404_raises_not_found_with_the_server_fields(
    fake: FakeApi, client: ApiClient
) -> None:
    fake.then(
        reply(
            404,
            {"error_code": "ModelArts.4104", "error_msg": "job not found"},
            headers={"X-Request-ID": "req-404"},
            request_id=None,
        )
    )
    with pytest.raises(NotFound) as caught:
        await client.get_job("gone")
    error = caught.value
    assert (error.http_status, error.error_code, error.error_msg, error.request_id) == (
        404,
        "ModelArts.4104",
        "job not found",
        "req-404",
    )
    assert "ModelArts.4104" in str(error)


@pytest.mark.anyio
async def test_a_404_from_the_gateway_is_no_such_api_not_a_missing_job(
    fake: FakeApi, client: ApiClient
) -> None:
    """A wrong project id or endpoint path gets the gateway's 404 (``APIGW.0101``): it says
    nothing about the job, so it must never be read as "absent"."""
    fake.then(reply(404, {"error_code": "APIGW.0101", "error_msg": "The API does not exist"}))
    with pytest.raises(NoSuchApi) as caught:
        await client.get_job("job-1")
    assert not isinstance(caught.value, NotFound)
    assert caught.value.error_code == "APIGW.0101"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [b"<html><body>404 Not Found</body></html>", b"", b'{"code": "Common.0404", "message": "x"}'],
)
async def test_a_404_with_no_modelarts_error_is_no_such_api_on_delete_and_list(
    fake: FakeApi, client: ApiClient, body: bytes
) -> None:
    """A proxy's page, an empty body, another service's code: a 404 that no ModelArts
    error explains says nothing about the jobs, whichever call gets it."""
    fake.then(reply(404, raw=body), reply(404, raw=body))
    with pytest.raises(NoSuchApi) as caught:
        await client.delete_jobs(["job-1"])
    assert "check the endpoint" in str(caught.value)
    with pytest.raises(NoSuchApi):
        await client.list_jobs(id="job-1")


@pytest.mark.anyio
async def test_a_bare_404_on_the_show_call_means_absent_only_once_the_api_has_answered(
    fake: FakeApi, client: ApiClient
) -> None:
    """Before any 2xx, a bare 404 to the show call may be a wrong endpoint's page; after
    one, the path is the API's and the 404 is about the job."""
    page = b"<html>Not Found</html>"
    fake.then(reply(404, raw=page), reply(200, envelope()), reply(404, raw=page))
    with pytest.raises(NoSuchApi):
        await client.get_job("job-1")
    await client.list_jobs(id="job-1")
    with pytest.raises(NotFound):
        await client.get_job("job-1")


@pytest.mark.anyio
async def test_endpoint_with_a_path_prefix_and_trailing_slash_is_honoured(fake: FakeApi) -> None:
    async with make_session(concurrency=1, connect_timeout=2, read_timeout=2) as session:
        client = ApiClient(
            session=session,
            endpoint=fake.url + "/gateway/",
            project_id=PROJECT,
            credentials=static(),
        )
        await client.list_jobs()
    assert fake.seen[0].path == f"/gateway{JOBS_PATH}"
    assert fake.seen[0].verifies()


@pytest.mark.anyio
async def test_probe_lists_an_id_that_matches_nothing_and_reports_clock_skew(
    fake: FakeApi,
) -> None:
    server_now = T0 + timedelta(minutes=3)
    fake.then(reply(200, envelope(), headers={"Date": format_datetime(server_now, usegmt=True)}))
    clock = FakeClock(step=timedelta(0))  # frozen: skew is exact
    async with make_session(concurrency=1, connect_timeout=2, read_timeout=2) as session:
        client = ApiClient(
            session=session,
            endpoint=fake.url,
            project_id=PROJECT,
            credentials=static(),
            utcnow=clock,
        )
        result = await client.probe()

    assert result == ProbeResult(
        request_id="req-0001", http_status=200, server_date=server_now, skew_s=180.0
    )
    [seen] = fake.seen
    assert (seen.method, seen.query) == ("GET", (("id", "devserver-reaper-check"),))
    assert seen.verifies()


@pytest.mark.anyio
async def test_probe_without_a_date_header_reports_no_skew(
    fake: FakeApi, client: ApiClient
) -> None:
    async def no_date(request: web.Request) -> web.StreamResponse:
        response = web.Response(body=b'{"data":[]}', content_type="application/json")
        response.headers["Date"] = "not a date"
        return response

    fake.then(no_date)
    result = await client.probe()
    assert (result.server_date, result.skew_s, result.http_status) == (None, None, 200)


@pytest.mark.anyio
async def test_probe_raises_auth_error_on_401(fake: FakeApi, client: ApiClient) -> None:
    fake.then(reply(401, {"error_code": "APIGW.0301", "error_msg": "Incorrect IAM auth info"}))
    with pytest.raises(AuthError):
        await client.probe()


# -- status classification --------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, ClientError),
        (401, AuthError),
        (403, AuthError),
        (404, NotFound),
        (409, ClientError),
        (413, ClientError),
        (429, ThrottledError),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
        (504, ServerError),
        (507, ServerError),
        (302, ClientError),
    ],
)
@pytest.mark.anyio
async def test_each_status_becomes_its_error_class_with_the_server_fields(
    fake: FakeApi, client: ApiClient, status: int, error_type: type[ApiError]
) -> None:
    fake.then(
        reply(
            status,
            {"error_code": f"ModelArts.{status}", "error_msg": f"said {status}"},
            headers={"Location": "http://127.0.0.1:9/elsewhere"},
            request_id=f"req-{status}",
        )
    )
    with pytest.raises(ApiError) as caught:
        await client.delete_jobs(["a"])
    error = caught.value
    assert type(error) is error_type
    assert error.http_status == status
    assert error.error_code == f"ModelArts.{status}"
    assert error.error_msg == f"said {status}"
    assert error.request_id == f"req-{status}"
    assert len(fake.seen) == 1  # a redirect is never followed


@pytest.mark.anyio
async def test_429_carries_retry_after_in_seconds_or_as_an_http_date(
    fake: FakeApi, client: ApiClient
) -> None:
    throttled = {"error_code": "APIGW.0308", "error_msg": "throttled"}
    # The client's clock reads T0, T0+1s, ...: one reading to sign, one to parse the date.
    fake.then(
        reply(429, throttled, headers={"Retry-After": "7"}),
        reply(429, throttled, headers={"Retry-After": "Tue, 10 Jun 2025 06:20:45 GMT"}),
        reply(429, throttled, headers={"Retry-After": "whenever"}),
        reply(429, throttled),
    )
    hints = []
    for _ in range(4):
        with pytest.raises(ThrottledError) as caught:
            await client.delete_jobs(["a"])
        assert caught.value.error_code == "APIGW.0308"
        hints.append(caught.value.retry_after)
    assert hints == [7.0, 22.0, None, None]


@pytest.mark.parametrize(
    ("body", "code", "msg"),
    [
        ({"error_code": "E1", "error_msg": "snake"}, "E1", "snake"),
        ({"errorCode": "E2", "errorMsg": "camel"}, "E2", "camel"),
        ({"code": "E3", "message": "plain"}, "E3", "plain"),
        ({"error": {"code": "E4", "message": "nested"}}, "E4", "nested"),
        ({"error_code": 1234}, "1234", None),
        ({"unrelated": True}, None, '{"unrelated":true}'),
    ],
)
@pytest.mark.anyio
async def test_error_fields_are_read_from_any_key_spelling(
    fake: FakeApi, client: ApiClient, body: Any, code: str | None, msg: str | None
) -> None:
    fake.then(reply(400, body))
    with pytest.raises(ClientError) as caught:
        await client.delete_jobs(["a"])
    assert (caught.value.error_code, caught.value.error_msg) == (code, msg)


@pytest.mark.anyio
async def test_a_non_json_error_body_gives_its_first_200_characters_sanitised(
    fake: FakeApi, client: ApiClient
) -> None:
    html = b"<html>\x1b[31m\r\nBad\tGateway\x00" + b"x" * 500 + b"</html>"
    fake.then(reply(502, raw=html, headers={"Content-Type": "text/html"}))
    with pytest.raises(ServerError) as caught:
        await client.delete_jobs(["a"])
    msg = caught.value.error_msg
    assert msg is not None
    assert msg.startswith("<html>")
    assert "Bad Gateway" in msg
    assert len(msg) <= 200
    assert not any(ch in msg for ch in "\x1b\r\n\t\x00")
    assert caught.value.error_code is None


@pytest.mark.anyio
async def test_an_empty_error_body_falls_back_to_the_reason_phrase(
    fake: FakeApi, client: ApiClient
) -> None:
    fake.then(reply(503, request_id=None))
    with pytest.raises(ServerError) as caught:
        await client.delete_jobs(["a"])
    assert (caught.value.error_msg, caught.value.request_id) == ("Service Unavailable", None)


# -- malformed 200s ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"<html>ok</html>", "not JSON"),
        (b'{"data": [{"id": "a"}', "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"data": {"id": "a"}}', "'data' is not a list"),
        (b'{"current": 1}', "'data' is not a list"),
        (b'{"data": ["a"]}', "job record 0 is not an object"),
        (b'{"data": [{"name": "no id"}]}', "field 'id'"),
        (b'{"data": [{"id": ""}]}', "field 'id'"),
        (b'{"data": [{"id": "a"}, {"id": "b", "create_at": "yesterday"}]}', "field 'create_at'"),
        (b'{"data": [{"id": "a", "update_at": [1]}]}', "field 'update_at'"),
        (b'{"data": [{"id": "a", "update_at": 99999999999999999}]}', "field 'update_at'"),
        (b'{"data": [{"id": "a", "abnormal_count": "3"}]}', "field 'abnormal_count'"),
        (b"", "not JSON"),
    ],
)
@pytest.mark.anyio
async def test_a_200_that_is_not_the_documented_json_is_malformed(
    fake: FakeApi, client: ApiClient, raw: bytes, says: str
) -> None:
    fake.then(reply(200, raw=raw, headers={"Content-Type": "application/json"}))
    with pytest.raises(MalformedResponse) as caught:
        await client.delete_jobs(["a"])
    error = caught.value
    assert says in str(error)
    assert (error.http_status, error.request_id) == (200, "req-0001")
    assert client.outcomes == {"MalformedResponse": 1}


@pytest.mark.anyio
async def test_get_job_with_a_body_that_is_not_a_record_is_malformed(
    fake: FakeApi, client: ApiClient
) -> None:
    fake.then(reply(200, {"items": []}))
    with pytest.raises(MalformedResponse, match="field 'id'"):
        await client.get_job("a")


# -- transport failures --------------------------------------------------------------------


@pytest.mark.anyio
async def test_connection_refused_is_a_network_error() -> None:
    async with make_session(concurrency=1, connect_timeout=2, read_timeout=2) as session:
        client = ApiClient(
            session=session,
            endpoint=f"http://127.0.0.1:{free_port()}",
            project_id=PROJECT,
            credentials=static(TOKEN),
        )
        with pytest.raises(NetworkError) as caught:
            await client.delete_jobs(["a"])
    assert type(caught.value) is NetworkError
    assert caught.value.http_status is None
    assert client.outcomes == {"NetworkError": 1}


@pytest.mark.anyio
async def test_a_dropped_connection_is_a_network_error(fake: FakeApi, client: ApiClient) -> None:
    fake.then(drop)
    with pytest.raises(NetworkError) as caught:
        await client.delete_jobs(["a"])
    assert type(caught.value) is NetworkError
    assert "ServerDisconnectedError" in str(caught.value)
    # One attempt on the wire: aiohttp's silent resend of idempotent requests is off.
    assert len(fake.seen) == 1


@pytest.mark.anyio
async def test_a_body_cut_short_of_its_content_length_is_a_network_error_with_the_status(
    fake: FakeApi, client: ApiClient
) -> None:
    fake.then(truncated)
    with pytest.raises(NetworkError) as caught:
        await client.delete_jobs(["a"])
    error = caught.value
    assert type(error) is NetworkError
    assert (error.http_status, error.request_id) == (200, "req-cut")
    assert "ClientPayloadError" in str(error)


@pytest.mark.anyio
async def test_no_answer_within_the_read_timeout_is_an_api_timeout(fake: FakeApi) -> None:
    fake.then(hang(fake))
    async with make_session(concurrency=1, connect_timeout=2, read_timeout=0.2) as session:
        client = ApiClient(
            session=session, endpoint=fake.url, project_id=PROJECT, credentials=static()
        )
        with anyio.fail_after(10), pytest.raises(ApiTimeout) as caught:
            await client.delete_jobs(["a"])
    assert isinstance(caught.value, NetworkError)
    assert caught.value.http_status is None
    assert client.outcomes == {"ApiTimeout": 1}


def test_ambiguous_failures_are_exactly_the_ones_after_which_a_delete_may_have_applied() -> None:
    # The client raises these for 5xx, broken connections and bad 200s; the dispatcher must
    # reconcile them, so they must stay in AMBIGUOUS.
    for error_type in (ServerError, NetworkError, ApiTimeout, MalformedResponse):
        assert issubclass(error_type, AMBIGUOUS)


# -- connections -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_connections_are_reused_after_success_and_after_an_error_body(
    fake: FakeApi,
) -> None:
    fake.then(
        reply(200, envelope(record("a"))),
        reply(500, {"error_code": "E", "error_msg": "x" * 5000}),
        reply(404, raw=b"nope"),
        reply(200, envelope()),
    )
    async with make_session(concurrency=1, connect_timeout=2, read_timeout=2) as session:
        client = ApiClient(
            session=session, endpoint=fake.url, project_id=PROJECT, credentials=static()
        )
        await client.delete_jobs(["a"])
        with pytest.raises(ServerError):
            await client.delete_jobs(["a"])
        with pytest.raises(NotFound):
            await client.get_job("a")
        await client.list_jobs()
    assert len(fake.seen) == 4
    assert len({seen.peer for seen in fake.seen}) == 1


@pytest.mark.anyio
async def test_the_connector_never_opens_more_than_concurrency_plus_headroom(
    fake: FakeApi,
) -> None:
    concurrency = 2
    limit = concurrency + SHOW_HEADROOM
    fake.default = hang(fake)
    async with make_session(concurrency=concurrency, connect_timeout=2, read_timeout=10) as session:
        assert session.connector is not None
        assert session.connector.limit == limit
        client = ApiClient(
            session=session, endpoint=fake.url, project_id=PROJECT, credentials=static()
        )
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for index in range(limit * 3):
                    tg.start_soon(client.delete_jobs, [f"id-{index}"])
                while fake.in_flight < limit:
                    await anyio.sleep(0.01)
                # Give any request over the limit every chance to arrive before looking.
                await anyio.sleep(0.2)
                assert fake.in_flight == limit
                fake.release.set()
    assert fake.peak == limit
    assert len(fake.seen) == limit * 3
    assert client.outcomes == {"ok": limit * 3}


# -- secrets and repr ----------------------------------------------------------------------


async def echo(request: web.Request) -> web.StreamResponse:
    """An error body that echoes the request's headers, keys and all."""
    said = f"{request.headers.get('Authorization')} {SK} {TOKEN} {AK}"
    return await reply(403, {"error_code": "APIGW.0305", "error_msg": said[:150]})(request)


async def echo_text(request: web.Request) -> web.StreamResponse:
    text = f"denied {AK} {SK} {TOKEN}"
    return web.Response(status=401, text=text, headers={"X-Request-Id": f"id-{AK}"})


@pytest.mark.parametrize(
    "handler_name", ["echo", "echo_text", "drop", "truncated", "malformed", "throttled"]
)
@pytest.mark.anyio
async def test_keys_never_appear_in_any_error_or_repr(
    fake: FakeApi, client: ApiClient, handler_name: str
) -> None:
    handlers: dict[str, Handler] = {
        "echo": echo,
        "echo_text": echo_text,
        "drop": drop,
        "truncated": truncated,
        "malformed": reply(200, raw=f'{{"data": [{{"id": "{SK}", "create_at": "x"}}]}}'.encode()),
        "throttled": reply(429, {"code": AK, "message": SK}),
    }
    fake.then(handlers[handler_name])
    with pytest.raises(ApiError) as caught:
        await client.delete_jobs(["a"])
    error = caught.value
    texts = [
        str(error),
        repr(error),
        repr(client),
        "".join(traceback.format_exception(error)),
        *(str(getattr(error, name)) for name in ("error_code", "error_msg", "request_id")),
    ]
    for text in texts:
        for secret in (AK, SK, TOKEN):
            assert secret not in text
    # Nothing chained: aiohttp's exceptions hold the request and its Authorization header.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


@pytest.mark.anyio
async def test_repr_shows_endpoint_project_and_calls_by_outcome(
    fake: FakeApi, client: ApiClient
) -> None:
    fake.then(reply(200, envelope()), reply(429, {}), reply(429, {}), reply(404, {}))
    await client.delete_jobs(["a"])
    for _ in range(2):
        with pytest.raises(ThrottledError):
            await client.delete_jobs(["a"])
    with pytest.raises(NotFound):
        await client.get_job("a")
    assert client.calls == 4
    assert repr(client) == (
        f"ApiClient(endpoint={fake.url!r}, project={PROJECT!r}, calls=4, "
        "outcomes={NotFound=1, ThrottledError=2, ok=1})"
    )


@pytest.mark.anyio
async def test_delete_refuses_an_empty_batch(client: ApiClient, fake: FakeApi) -> None:
    with pytest.raises(ValueError, match="at least one id"):
        await client.delete_jobs([])
    assert fake.seen == []


def test_make_session_refuses_zero_concurrency() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        make_session(concurrency=0, connect_timeout=1, read_timeout=1)


def test_endpoint_must_be_http_with_a_host() -> None:
    async def build() -> None:
        async with make_session(concurrency=1, connect_timeout=1, read_timeout=1) as session:
            ApiClient(
                session=session, endpoint="ftp://example", project_id=PROJECT, credentials=static()
            )

    with pytest.raises(ValueError, match="endpoint"):
        anyio.run(build)


# -- against the built-in simulator --------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with run_simulator(SimulatorConfig(project_id=PROJECT, ak=AK, sk=SK, jobs=5)) as running:
        yield running


def sim_client(session: Any, sim: Simulator, sk: str = SK) -> ApiClient:
    return ApiClient(
        session=session,
        endpoint=sim.url,
        project_id=PROJECT,
        credentials=StaticCredentials(Credentials(ak=AK, sk=sk)),
    )


@pytest.mark.anyio
async def test_simulator_deletes_lists_shows_and_probes(sim: Simulator) -> None:
    ids = sim.job_ids()
    async with make_session(concurrency=2, connect_timeout=2, read_timeout=5) as session:
        client = sim_client(session, sim)
        shown = await client.get_job(ids[0])
        listed = await client.list_jobs(id=ids[1])
        result = await client.delete_jobs([ids[0], ids[1], "no-such-job"])
        with pytest.raises(NotFound) as gone:
            await client.get_job(ids[0])
        probe = await client.probe()

    assert shown.id == ids[0]
    assert [r.id for r in listed.records] == [ids[1]]
    assert sorted(r.id for r in result.records) == sorted(ids[:2])
    assert all(r.create_at is not None for r in result.records)
    assert result.request_id
    assert sim.deleted == {ids[0], ids[1]}
    assert gone.value.http_status == 404
    assert gone.value.request_id
    assert probe.http_status == 200
    assert probe.skew_s is not None
    assert abs(probe.skew_s) < 60
    assert client.outcomes == {"ok": 4, "NotFound": 1}


@pytest.mark.anyio
async def test_simulator_refuses_a_wrong_secret_key_with_auth_error(sim: Simulator) -> None:
    async with make_session(concurrency=1, connect_timeout=2, read_timeout=5) as session:
        client = sim_client(session, sim, sk="not-the-right-secret")
        with pytest.raises(AuthError) as caught:
            await client.delete_jobs(sim.job_ids()[:1])
    error = caught.value
    assert error.http_status == 401
    assert error.error_code
    assert error.request_id
    assert sim.deleted == set()
    assert "not-the-right-secret" not in repr(error) + str(error)


@pytest.mark.anyio
async def test_simulator_throttling_is_a_throttled_error_with_its_retry_after(
    sim: Simulator,
) -> None:
    sim.set_quota(0.01, burst=1)
    async with make_session(concurrency=1, connect_timeout=2, read_timeout=5) as session:
        client = sim_client(session, sim)
        await client.list_jobs()
        with pytest.raises(ThrottledError) as caught:
            await client.list_jobs()
    assert caught.value.http_status == 429
    assert caught.value.retry_after is not None
    assert caught.value.retry_after > 0


@pytest.mark.parametrize(
    ("fault", "error_type", "applied"),
    [
        ("error_before", ServerError, False),
        ("error_after", ServerError, True),
        ("unavailable", ServerError, False),
        ("reset_before", NetworkError, False),
        ("reset_after", NetworkError, True),
        ("truncated", MalformedResponse, True),
    ],
)
@pytest.mark.anyio
async def test_simulator_faults_become_their_error_classes_in_one_attempt(
    fault: str, error_type: type[ApiError], applied: bool
) -> None:
    probability: dict[str, Any] = {fault: 1.0}
    config = SimulatorConfig(
        project_id=PROJECT, ak=AK, sk=SK, jobs=2, faults=replace(FaultConfig(), **probability)
    )
    async with (
        run_simulator(config) as running,
        make_session(concurrency=1, connect_timeout=2, read_timeout=5) as session,
    ):
        client = sim_client(session, running)
        target = running.job_ids()[:1]
        with pytest.raises(ApiError) as caught:
            await client.delete_jobs(target)
        assert type(caught.value) is error_type
        assert running.stats.delete_calls == 1  # no hidden resend by aiohttp
        assert (running.deleted == set(target)) is applied
