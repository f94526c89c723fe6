"""Where keys come from, in what order, and how temporary keys are renewed.

Every credential service here is a real aiohttp server on 127.0.0.1 that counts its calls; time
is a fake clock the tests move by hand.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import anyio
import pytest
from aiohttp import web

from tests.e2e import mount_secret
from worker.api.credentials import (
    Credentials,
    CredentialSource,
    CredentialsRefused,
    CredentialsUnavailable,
    RefreshingCredentials,
    StaticCredentials,
    read_profile,
    resolve_credentials,
)
from worker.errors import AuthError, ConfigError, TransientError

SK_CANARY = "CANARY-SK-7f3a"
TOKEN_CANARY = "CANARY-TOKEN-91bd"
POD_TOKEN_CANARY = "CANARY-POD-JWT-55e1"
T0 = datetime(2021, 5, 17, 3, 0, tzinfo=UTC)  # long past: a test on the wall clock fails


class FakeClock:
    """The injected ``utcnow``: moves only when a test moves it."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class FakeCredentialService:
    """ECS metadata and CCE pod identity in one loopback server, recording every call."""

    clock: FakeClock
    lifetime: timedelta = timedelta(hours=1)
    delay: float = 0.0
    key_status: int = 200  # what GET securitykey and POST pod identity answer
    hang: bool = False
    session_token: str = "session-token-1"
    calls: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    issued: int = 0
    url: str = ""
    release: anyio.Event = field(default_factory=anyio.Event)

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.calls if (m, p) == (method, path))

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.calls.append((request.method, request.path, dict(request.headers)))
        if self.hang:
            await self.release.wait()
        if self.delay:
            await anyio.sleep(self.delay)
        if request.path == "/meta-data/latest/api/token":
            return web.Response(text=self.session_token)
        if (
            request.path == "/openstack/latest/securitykey"
            and request.headers.get("X-Metadata-Token") != self.session_token
        ):
            return web.Response(status=401, text="token expired")
        if self.key_status != 200:
            return web.json_response({"error": SK_CANARY}, status=self.key_status)
        self.issued += 1
        expires = self.clock.now + self.lifetime
        body = {
            "access": f"TEMPAK{self.issued}",
            "secret": f"{SK_CANARY}-{self.issued}",
            "securitytoken": f"{TOKEN_CANARY}-{self.issued}",
            "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        key = "credential" if request.path.startswith("/openstack") else "credentials"
        return web.json_response({key: body})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def service(clock: FakeClock) -> AsyncIterator[FakeCredentialService]:
    fake = FakeCredentialService(clock)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake._answer)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        fake.release.set()
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL where nothing listens: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def write_profile(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


def no_secrets(text: str) -> None:
    for canary in (SK_CANARY, TOKEN_CANARY, POD_TOKEN_CANARY):
        assert canary not in text, f"{canary} leaked into {text!r}"


# -- order and precedence ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_settings_keys_win_over_environment_profile_and_services(
    tmp_path: Path, service: FakeCredentialService, session: aiohttp.ClientSession
) -> None:
    token_file = tmp_path / "pod-token"
    token_file.write_text(POD_TOKEN_CANARY)
    environ = {
        "HUAWEICLOUD_SDK_AK": "ENVAK",
        "HUAWEICLOUD_SDK_SK": "env-sk",
        "HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(
            write_profile(tmp_path / "profile", "[basic]\nak = PROFAK\nsk = prof-sk\n")
        ),
        "HC_CONTAINER_CREDENTIALS_FULL_URI": service.url + "/pod",
        "HC_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
    }
    source = await resolve_credentials(
        ak="SETAK", sk=SK_CANARY, security_token=None, environ=environ, session=session,
        metadata_url=service.url,
    )  # fmt: skip
    assert source.name == "settings"
    assert await source.current() == Credentials("SETAK", SK_CANARY)
    assert service.calls == []


@pytest.mark.anyio
async def test_sources_are_tried_in_the_sdk_order_each_one_shadowing_the_next(
    tmp_path: Path, service: FakeCredentialService, session: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:  # fmt: skip
    """With every source present, take the first away one at a time: the next one answers."""
    token_file = tmp_path / "pod-token"
    token_file.write_text(POD_TOKEN_CANARY)
    profile = write_profile(tmp_path / "profile", "[basic]\nak = PROFAK\nsk = prof-sk\n")
    layers: list[tuple[str, dict[str, str]]] = [
        ("environment", {"HUAWEICLOUD_SDK_AK": "ENVAK", "HUAWEICLOUD_SDK_SK": "env-sk"}),
        ("profile", {"HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(profile)}),
        ("pod-identity", {
            "HC_CONTAINER_CREDENTIALS_FULL_URI": service.url + "/pod",
            "HC_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
        }),
    ]  # fmt: skip
    expected_ak = {"environment": "ENVAK", "profile": "PROFAK"}
    names = []
    for skip in range(len(layers) + 1):
        environ = {"HOME": str(tmp_path / "empty-home")}
        for _, values in layers[skip:]:
            environ.update(values)
        source = await resolve_credentials(
            ak=None, sk=None, security_token=None, environ=environ, session=session,
            metadata_url=service.url, utcnow=clock,
        )  # fmt: skip
        names.append(source.name)
        keys = await source.current()
        assert keys.ak == expected_ak.get(source.name, f"TEMPAK{service.issued}")
    assert names == ["environment", "profile", "pod-identity", "metadata"]
    assert service.count("POST", "/pod") == 1
    assert service.count("GET", "/openstack/latest/securitykey") == 1


@pytest.mark.anyio
async def test_environment_keys_come_before_the_profile(
    tmp_path: Path, service: FakeCredentialService, session: aiohttp.ClientSession
) -> None:
    environ = {
        "HUAWEICLOUD_SDK_AK": "ENVAK",
        "HUAWEICLOUD_SDK_SK": SK_CANARY,
        "HUAWEICLOUD_SDK_SECURITY_TOKEN": TOKEN_CANARY,
        "HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(
            write_profile(tmp_path / "profile", "[basic]\nak = PROFAK\nsk = prof-sk\n")
        ),
    }
    source = await resolve_credentials(
        ak=None, sk=None, security_token=None, environ=environ, session=session,
        metadata_url=service.url,
    )  # fmt: skip
    assert source.name == "environment"
    assert await source.current() == Credentials("ENVAK", SK_CANARY, TOKEN_CANARY)
    assert service.calls == []


@pytest.mark.anyio
async def test_profile_named_by_env_var_is_read_with_its_project_id_and_token(
    tmp_path: Path, service: FakeCredentialService, session: aiohttp.ClientSession
) -> None:
    path = write_profile(
        tmp_path / "creds.ini",
        "[other]\nak = NOPE\nsk = nope\n\n[basic]\nak = PROFAK\n"
        f"sk = {SK_CANARY}\nproject_id = proj-123\nsecurity_token = {TOKEN_CANARY}\n",
    )
    environ = {"HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(path), "HOME": str(tmp_path / "nohome")}
    source = await resolve_credentials(
        ak=None, sk=None, security_token=None, environ=environ, session=session,
        metadata_url=service.url,
    )  # fmt: skip
    assert source.name == "profile"
    assert await source.current() == Credentials("PROFAK", SK_CANARY, TOKEN_CANARY)
    profile = read_profile(environ)
    assert profile is not None
    assert profile.project_id == "proj-123"
    no_secrets(repr(profile))
    assert service.calls == []


@pytest.mark.anyio
async def test_profile_is_found_in_home_by_default(
    tmp_path: Path, session: aiohttp.ClientSession, closed_port_url: str
) -> None:
    write_profile(tmp_path / ".huaweicloud" / "credentials", "[basic]\nak = HOMEAK\nsk = s\n")
    source = await resolve_credentials(
        ak=None, sk=None, security_token=None, environ={"HOME": str(tmp_path)}, session=session,
        metadata_url=closed_port_url,
    )  # fmt: skip
    assert source.name == "profile"
    assert (await source.current()).ak == "HOMEAK"


@pytest.mark.anyio
async def test_profile_without_basic_section_falls_through_to_metadata(
    tmp_path: Path, service: FakeCredentialService, session: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:  # fmt: skip
    path = write_profile(tmp_path / "creds.ini", "[global]\nak = GLOBALAK\nsk = g\n")
    source = await resolve_credentials(
        ak=None, sk=None, security_token=None, session=session, metadata_url=service.url,
        environ={"HUAWEICLOUD_SDK_CREDENTIALS_FILE": str(path)}, utcnow=clock,
    )  # fmt: skip
    assert source.name == "metadata"
    assert (await source.current()).ak == "TEMPAK1"


@pytest.mark.anyio
async def test_pod_identity_posts_the_token_file_and_comes_before_metadata(
    tmp_path: Path, service: FakeCredentialService, session: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:  # fmt: skip
    token_file = tmp_path / "token"
    token_file.write_text(POD_TOKEN_CANARY + "\n")
    environ = {
        "HOME": str(tmp_path),
        "HC_CONTAINER_CREDENTIALS_FULL_URI": service.url + "/v1/pod-credentials",
        "HC_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
    }
    source = await resolve_credentials(
        ak=None, sk=None, security_token=None, environ=environ, session=session,
        metadata_url=service.url, utcnow=clock,
    )  # fmt: skip
    assert source.name == "pod-identity"
    keys = await source.current()
    assert keys == Credentials(
        "TEMPAK1", f"{SK_CANARY}-1", f"{TOKEN_CANARY}-1", T0 + timedelta(hours=1)
    )
    [(method, path, headers)] = service.calls
    assert (method, path) == ("POST", "/v1/pod-credentials")
    assert headers["Authorization"] == POD_TOKEN_CANARY
    no_secrets(repr(source))


@pytest.mark.anyio
async def test_pod_identity_refusal_is_an_auth_error_without_the_token(
    tmp_path: Path, service: FakeCredentialService, session: aiohttp.ClientSession
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(POD_TOKEN_CANARY)
    service.key_status = 401
    with pytest.raises(CredentialsRefused) as caught:
        await resolve_credentials(
            ak=None, sk=None, security_token=None, session=session, metadata_url=service.url,
            environ={
                "HC_CONTAINER_CREDENTIALS_FULL_URI": service.url + "/pod",
                "HC_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
            },
        )  # fmt: skip
    assert isinstance(caught.value, AuthError)
    assert caught.value.http_status == 401
    no_secrets(str(caught.value) + repr(caught.value))


@pytest.mark.anyio
async def test_metadata_gets_a_session_token_then_the_security_key(
    service: FakeCredentialService, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = await resolve_credentials(
        ak=None, sk=None, security_token=None, environ={}, session=session,
        metadata_url=service.url, source="metadata", utcnow=clock,
    )  # fmt: skip
    assert source.name == "metadata"
    keys = await source.current()
    assert (keys.ak, keys.sk, keys.security_token) == (
        "TEMPAK1", f"{SK_CANARY}-1", f"{TOKEN_CANARY}-1",
    )  # fmt: skip
    assert keys.expires_at == T0 + timedelta(hours=1)
    (put, put_path, put_headers), (get, get_path, get_headers) = service.calls
    assert (put, put_path) == ("PUT", "/meta-data/latest/api/token")
    assert put_headers["X-Metadata-Token-Ttl-Seconds"] == "21600"
    assert (get, get_path) == ("GET", "/openstack/latest/securitykey")
    assert get_headers["X-Metadata-Token"] == "session-token-1"


@pytest.mark.anyio
async def test_metadata_session_token_is_renewed_once_when_the_service_says_401(
    service: FakeCredentialService, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = await resolve_credentials(
        ak=None, sk=None, security_token=None, environ={}, session=session,
        metadata_url=service.url, source="metadata", utcnow=clock,
    )  # fmt: skip
    service.session_token = "session-token-2"  # the old one is no longer accepted
    clock.advance(minutes=21)
    assert (await source.current()).ak == "TEMPAK2"
    assert service.count("PUT", "/meta-data/latest/api/token") == 2
    assert service.count("GET", "/openstack/latest/securitykey") == 3


@pytest.mark.anyio
async def test_metadata_without_an_agency_is_refused_when_asked_for_by_name(
    service: FakeCredentialService, session: aiohttp.ClientSession
) -> None:
    service.key_status = 404
    with pytest.raises(CredentialsRefused, match="agency"):
        await resolve_credentials(
            ak=None, sk=None, security_token=None, environ={}, session=session,
            metadata_url=service.url, source="metadata",
        )  # fmt: skip


# -- misconfiguration -----------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("ak", "sk", "token", "environ", "message"),
    [
        ("SETAK", None, None, {}, "settings"),
        (None, SK_CANARY, None, {}, "settings"),
        (None, None, TOKEN_CANARY, {}, "security token"),
        (None, None, None, {"HUAWEICLOUD_SDK_SK": SK_CANARY}, "HUAWEICLOUD_SDK"),
        (None, None, None, {"HC_CONTAINER_CREDENTIALS_FULL_URI": "http://x/"}, "together"),
    ],
)
async def test_half_configured_source_is_a_config_error_that_names_no_secret(
    ak: str | None, sk: str | None, token: str | None, environ: dict[str, str], message: str,
    session: aiohttp.ClientSession, closed_port_url: str,
) -> None:  # fmt: skip
    with pytest.raises(ConfigError, match=message) as caught:
        await resolve_credentials(
            ak=ak, sk=sk, security_token=token, environ=environ, session=session,
            metadata_url=closed_port_url,
        )  # fmt: skip
    no_secrets(str(caught.value) + repr(caught.value))


@pytest.mark.anyio
async def test_nothing_found_names_every_place_tried(
    tmp_path: Path, session: aiohttp.ClientSession, closed_port_url: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        await resolve_credentials(
            ak=None, sk=None, security_token=None, environ={"HOME": str(tmp_path)},
            session=session, metadata_url=closed_port_url, timeout=0.5,
        )  # fmt: skip
    text = str(caught.value)
    for place in ("settings", "environment", "profile", "pod identity", "ECS metadata"):
        assert place in text
    assert str(tmp_path / ".huaweicloud" / "credentials") in text


@pytest.mark.anyio
async def test_an_explicit_source_looks_nowhere_else(
    tmp_path: Path, service: FakeCredentialService, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(ConfigError, match="profile"):
        await resolve_credentials(
            ak="SETAK", sk="s", security_token=None, session=session, metadata_url=service.url,
            environ={"HOME": str(tmp_path), "HUAWEICLOUD_SDK_AK": "A", "HUAWEICLOUD_SDK_SK": "S"},
            source="profile",
        )  # fmt: skip
    assert service.calls == []


# -- a metadata service that is down fails fast ---------------------------------------------


@pytest.mark.anyio
async def test_metadata_refusing_connections_is_unavailable_when_asked_for(
    session: aiohttp.ClientSession, closed_port_url: str
) -> None:
    with pytest.raises(CredentialsUnavailable, match="cannot connect") as caught:
        await resolve_credentials(
            ak=None, sk=None, security_token=None, environ={}, session=session,
            metadata_url=closed_port_url, source="metadata", timeout=0.5, attempts=2,
        )  # fmt: skip
    assert isinstance(caught.value, TransientError)
    assert "after 2 attempts" in str(caught.value)


@pytest.mark.anyio
async def test_metadata_that_never_answers_gives_up_after_bounded_attempts(
    service: FakeCredentialService, session: aiohttp.ClientSession
) -> None:
    service.hang = True
    with pytest.raises(CredentialsUnavailable, match="no answer within") as caught:
        await resolve_credentials(
            ak=None, sk=None, security_token=None, environ={}, session=session,
            metadata_url=service.url, source="metadata", timeout=0.2, attempts=3,
        )  # fmt: skip
    assert "after 3 attempts" in str(caught.value)
    assert len(service.calls) == 3
    assert {(m, p) for m, p, _ in service.calls} == {("PUT", "/meta-data/latest/api/token")}


@pytest.mark.anyio
async def test_metadata_failing_with_5xx_is_retried_a_bounded_number_of_times(
    service: FakeCredentialService, session: aiohttp.ClientSession
) -> None:
    service.key_status = 503
    with pytest.raises(CredentialsUnavailable, match="HTTP 503"):
        await resolve_credentials(
            ak=None, sk=None, security_token=None, environ={}, session=session,
            metadata_url=service.url, source="metadata", timeout=1, attempts=2,
        )  # fmt: skip
    assert service.count("GET", "/openstack/latest/securitykey") == 2


# -- refreshing ---------------------------------------------------------------------------------


async def metadata_source(
    service: FakeCredentialService, session: aiohttp.ClientSession, clock: FakeClock
) -> RefreshingCredentials:
    source = await resolve_credentials(
        ak=None, sk=None, security_token=None, environ={}, session=session,
        metadata_url=service.url, source="metadata", utcnow=clock, timeout=2,
    )  # fmt: skip
    assert isinstance(source, RefreshingCredentials)
    return source


async def hammer(source: RefreshingCredentials, clock: FakeClock, callers: int) -> list[timedelta]:
    """``callers`` concurrent ``current()`` calls; how long each one's keys had left."""
    left: list[timedelta] = []

    async def one() -> None:
        keys = await source.current()
        assert keys.expires_at is not None
        left.append(keys.expires_at - clock.now)

    async with anyio.create_task_group() as group:
        for _ in range(callers):
            group.start_soon(one)
    assert len(left) == callers
    return left


@pytest.mark.anyio
async def test_keys_past_the_refresh_point_are_renewed_once_for_100_concurrent_callers(
    service: FakeCredentialService, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = await metadata_source(service, session, clock)
    service.delay = 0.05  # the refresh is in flight while the other callers arrive
    clock.advance(minutes=25)  # 35 minutes left: under the 40-minute refresh point
    left = await hammer(source, clock, 100)
    assert service.count("GET", "/openstack/latest/securitykey") == 2  # the first + one refresh
    assert min(left) >= timedelta(seconds=60)
    assert (await source.current()).ak == "TEMPAK2"
    assert source.fetches == 1


@pytest.mark.anyio
async def test_nearly_expired_keys_make_every_caller_wait_for_the_one_refresh(
    service: FakeCredentialService, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = await metadata_source(service, session, clock)
    service.delay = 0.05
    clock.advance(minutes=59, seconds=30)  # 30 s left: too little to sign with
    left = await hammer(source, clock, 100)
    assert service.count("GET", "/openstack/latest/securitykey") == 2
    assert min(left) == timedelta(hours=1)  # every caller got the new keys


@pytest.mark.anyio
async def test_no_caller_ever_gets_keys_about_to_expire_as_time_crosses_refresh_points(
    service: FakeCredentialService, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = await metadata_source(service, session, clock)
    service.delay = 0.01
    for _ in range(60):
        clock.advance(minutes=1)
        left = await hammer(source, clock, 20)
        assert min(left) >= timedelta(seconds=60)
    # Keys live 60 min and are renewed with 40 min left: at minute 21 and minute 42.
    assert source.fetches == 2
    assert service.issued == 3


@pytest.mark.anyio
async def test_a_failed_refresh_keeps_valid_keys_retries_later_and_never_hands_out_expired_ones(
    service: FakeCredentialService, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = await metadata_source(service, session, clock)
    service.key_status = 500
    clock.advance(minutes=30)
    assert (await source.current()).ak == "TEMPAK1"  # refresh failed; old keys still good
    failed_gets = service.count("GET", "/openstack/latest/securitykey")
    assert source.failures == 1
    await source.current()  # within retry_interval: no new attempt
    assert service.count("GET", "/openstack/latest/securitykey") == failed_gets
    clock.advance(seconds=31)
    assert (await source.current()).ak == "TEMPAK1"
    assert source.failures == 2
    clock.now = T0 + timedelta(minutes=59, seconds=1)  # 59 s left: below min_validity
    with pytest.raises(CredentialsUnavailable, match="HTTP 500") as caught:
        await source.current()
    no_secrets(str(caught.value) + repr(caught.value) + repr(source))
    service.key_status = 200
    keys = await source.current()  # the service is back: new keys at once
    assert keys.expires_at == clock.now + timedelta(hours=1)


@pytest.mark.anyio
async def test_concurrent_callers_share_one_failed_refresh_of_expired_keys(
    service: FakeCredentialService, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    source = await metadata_source(service, session, clock)
    service.key_status = 500
    service.delay = 0.02
    clock.advance(hours=2)
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await source.current()
        except CredentialsUnavailable as exc:
            errors.append(exc)

    async with anyio.create_task_group() as group:
        for _ in range(50):
            group.start_soon(one)
    assert len(errors) == 50
    assert source.fetches == 1


@pytest.mark.anyio
async def test_keys_shorter_lived_than_the_refresh_point_are_renewed_halfway_not_every_call(
    clock: FakeClock,
) -> None:
    issued: list[Credentials] = []

    async def fetch() -> Credentials:
        issued.append(
            Credentials(f"AK{len(issued)}", SK_CANARY, None, clock.now + timedelta(minutes=20))
        )
        return issued[-1]

    source = RefreshingCredentials(fetch, name="test", utcnow=clock)
    assert (await source.current()).ak == "AK0"
    for _ in range(10):
        await source.current()
    assert len(issued) == 1
    clock.advance(minutes=11)
    assert (await source.current()).ak == "AK1"


@pytest.mark.anyio
async def test_freshly_fetched_keys_that_are_already_expiring_are_refused(
    service: FakeCredentialService, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    service.lifetime = timedelta(seconds=10)
    with pytest.raises(CredentialsUnavailable, match="expire within"):
        await (await metadata_source(service, session, clock)).current()


# -- no secret in any text ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_repr_and_str_of_sources_keys_and_errors_never_show_secrets(
    service: FakeCredentialService, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    keys = Credentials("AK", SK_CANARY, TOKEN_CANARY, T0)
    static = StaticCredentials(keys)
    refreshing = await metadata_source(service, session, clock)
    await refreshing.current()
    texts = [repr(keys), str(keys), repr(static), str(static), repr(refreshing), str(refreshing)]
    for text in texts:
        no_secrets(text)
    assert "TEMPAK1" in repr(refreshing)
    assert "fetches=0" in repr(refreshing)


def test_parse_of_a_malformed_answer_names_fields_not_values() -> None:
    from worker.api.credentials import parse_temporary

    body = json.dumps({"credential": {"access": "A", "securitytoken": TOKEN_CANARY}}).encode()
    with pytest.raises(CredentialsUnavailable, match="secret, expires_at") as caught:
        parse_temporary(body, "test")
    no_secrets(str(caught.value))


# -- issue 24: one source per pair, checked places, rotation -----------------------------------


@pytest.mark.anyio
async def test_an_sdk_secret_key_is_never_paired_with_an_access_key_from_the_settings(
    session: aiohttp.ClientSession, closed_port_url: str
) -> None:
    """``REAPER_AK`` with ``HUAWEICLOUD_SDK_SK`` was one mismatched pair; now the settings'
    half-pair is an error that says so, and the SDK's half is not looked at."""
    environ = {"HUAWEICLOUD_SDK_SK": SK_CANARY}
    with pytest.raises(ConfigError, match="the AK is set but the SK is not") as caught:
        await resolve_credentials(
            ak="SETAK", sk=None, security_token=None, environ=environ, session=session,
            metadata_url=closed_port_url,
        )  # fmt: skip
    no_secrets(str(caught.value))


@pytest.mark.anyio
async def test_an_sdk_security_token_never_rides_along_on_permanent_keys_from_elsewhere(
    session: aiohttp.ClientSession, closed_port_url: str
) -> None:
    environ = {"HUAWEICLOUD_SDK_SECURITY_TOKEN": TOKEN_CANARY}
    source = await resolve_credentials(
        ak="SETAK", sk="set-sk", security_token=None, environ=environ, session=session,
        metadata_url=closed_port_url,
    )  # fmt: skip
    assert (await source.current()).security_token is None
    environ |= {"HUAWEICLOUD_SDK_AK": "ENVAK", "HUAWEICLOUD_SDK_SK": "env-sk"}
    from_env = await resolve_credentials(
        ak=None, sk=None, security_token=None, environ=environ, session=session,
        metadata_url=closed_port_url,
    )  # fmt: skip
    assert (await from_env.current()).security_token == TOKEN_CANARY  # its own pair's token


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["settings", "env", "profile"])
async def test_an_access_key_not_shaped_like_one_is_refused_before_it_is_sent(
    where: str, tmp_path: Path, session: aiohttp.ClientSession, closed_port_url: str
) -> None:
    """A 40-character secret key (an ``ak_file`` pointed at the SK's file) is no access key."""
    wrong = "k" * 40
    environ = {"HOME": str(tmp_path)}
    ak = sk = None
    if where == "settings":
        ak, sk = wrong, "s"
    elif where == "env":
        environ |= {"HUAWEICLOUD_SDK_AK": wrong, "HUAWEICLOUD_SDK_SK": "s"}
    else:
        write_profile(tmp_path / ".huaweicloud" / "credentials", f"[basic]\nak={wrong}\nsk=s\n")
    with pytest.raises(ConfigError, match="is not an access key") as caught:
        await resolve_credentials(
            ak=ak, sk=sk, security_token=None, environ=environ, session=session,
            metadata_url=closed_port_url,
        )  # fmt: skip
    assert wrong not in str(caught.value)


@pytest.mark.anyio
async def test_a_federated_profile_is_refused_by_name_not_skipped(
    tmp_path: Path, service: FakeCredentialService, session: aiohttp.ClientSession
) -> None:
    write_profile(
        tmp_path / ".huaweicloud" / "credentials",
        "[basic]\nidp_id=my-idp\nid_token_file=/var/run/token\nproject_id=p1\n",
    )
    with pytest.raises(ConfigError, match=r"federated profile \(idp_id, id_token_file\)"):
        await resolve_credentials(
            ak=None, sk=None, security_token=None, environ={"HOME": str(tmp_path)},
            session=session, metadata_url=service.url,
        )  # fmt: skip
    assert service.calls == []  # not skipped on to the node's agency


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("http://attacker.example/creds", False),
        ("http://10.0.0.7/creds", False),
        ("http://user:pw@127.0.0.1:9/creds", False),
        ("CLOSED", True),
        ("https://pod-identity.invalid/creds", True),
    ],
)
async def test_the_pod_token_goes_only_to_link_local_loopback_or_https(
    uri: str, allowed: bool, tmp_path: Path, session: aiohttp.ClientSession,
    closed_port_url: str,
) -> None:  # fmt: skip
    uri = closed_port_url + "/creds" if uri == "CLOSED" else uri
    token = tmp_path / "token"
    token.write_text(POD_TOKEN_CANARY)
    environ = {"HC_CONTAINER_CREDENTIALS_FULL_URI": uri,
               "HC_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token)}  # fmt: skip
    expected = CredentialsUnavailable if allowed else ConfigError  # allowed: nothing listens
    with pytest.raises(expected) as caught:
        await resolve_credentials(
            ak=None, sk=None, security_token=None, environ=environ, session=session,
            source="pod-identity", timeout=0.2, attempts=1,
        )  # fmt: skip
    if not allowed:
        assert re.search("link-local or loopback|user name or password", str(caught.value))
    assert ":pw@" not in str(caught.value)
    no_secrets(str(caught.value))


@pytest.mark.anyio
async def test_auto_inside_a_pod_never_falls_back_to_the_nodes_metadata_agency(
    tmp_path: Path, service: FakeCredentialService, session: aiohttp.ClientSession,
    clock: FakeClock,
) -> None:  # fmt: skip
    environ = {"HOME": str(tmp_path), "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    with pytest.raises(ConfigError, match="not used by auto inside a Kubernetes pod"):
        await resolve_credentials(
            ak=None, sk=None, security_token=None, environ=environ, session=session,
            metadata_url=service.url,
        )  # fmt: skip
    assert service.calls == []
    named = await resolve_credentials(
        ak=None, sk=None, security_token=None, environ=environ, session=session,
        metadata_url=service.url, source="metadata", utcnow=clock,
    )  # fmt: skip
    assert named.name == "metadata"


@pytest.mark.anyio
async def test_a_metadata_outage_in_auto_is_unavailable_69_not_a_config_error_78(
    tmp_path: Path, service: FakeCredentialService, session: aiohttp.ClientSession,
    closed_port_url: str,
) -> None:  # fmt: skip
    """Reached and failing (5xx) is an outage: run again later. Nothing there at all (not on
    ECS) is still one line of "no credentials found"."""
    service.key_status = 503
    with pytest.raises(CredentialsUnavailable, match="HTTP 503"):
        await resolve_credentials(
            ak=None, sk=None, security_token=None, environ={"HOME": str(tmp_path)},
            session=session, metadata_url=service.url, attempts=2,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="no credentials found"):
        await resolve_credentials(
            ak=None, sk=None, security_token=None, environ={"HOME": str(tmp_path)},
            session=session, metadata_url=closed_port_url, attempts=1,
        )  # fmt: skip


async def _from_mounted_secret(
    folder: Path, session: aiohttp.ClientSession, metadata_url: str
) -> tuple[dict[str, Path], CredentialSource]:
    """Keys the settings read from a mounted Secret (OLDAK / old-sk), and their source."""
    files = mount_secret(folder, ak="OLDAK", sk="old-sk")
    source = await resolve_credentials(
        ak="OLDAK", sk="old-sk", security_token=None, environ={}, session=session,
        metadata_url=metadata_url, files=files,
    )  # fmt: skip
    return files, source


@pytest.mark.anyio
async def test_key_files_are_read_again_when_the_secret_rotates_and_when_keys_are_refused(
    tmp_path: Path, session: aiohttp.ClientSession, closed_port_url: str
) -> None:
    from structlog.testing import capture_logs

    from worker.api.credentials import FileCredentials, Reloadable

    files, source = await _from_mounted_secret(tmp_path, session, closed_port_url)
    assert isinstance(source, FileCredentials) and isinstance(source, Reloadable)
    old = await source.current()
    assert (await source.current()) is old  # nothing changed: nothing read
    with capture_logs() as logs:
        mount_secret(tmp_path, ak="NEWAK", sk="new-sk")
        new = await source.current()
        assert (new.ak, new.sk) == ("NEWAK", "new-sk")
        assert await source.refused(old)  # the refused keys are not the ones in force
        assert not await source.refused(new)  # nothing new to be had: do not try again
    reloaded = [e for e in logs if e["event"] == "credentials.reloaded"]
    assert len(reloaded) == 1
    assert reloaded[0]["reason"] == "changed"
    assert set(reloaded[0]["files"]) == {f"ak_file {files['ak']}", f"sk_file {files['sk']}"}
    assert "new-sk" not in repr(logs) + repr(source)


@pytest.mark.anyio
async def test_a_key_file_caught_half_rotated_keeps_the_old_keys_until_it_is_whole(
    tmp_path: Path, session: aiohttp.ClientSession, closed_port_url: str
) -> None:
    from structlog.testing import capture_logs

    files, source = await _from_mounted_secret(tmp_path, session, closed_port_url)
    version = files["sk"].resolve()
    version.chmod(0o600)
    version.write_text("")  # emptied in place
    with capture_logs() as logs:
        kept = await source.current()
    assert kept.sk == "old-sk"
    assert [e["event"] for e in logs] == ["credentials.reload_failed"]
    version.write_text("fixed-sk")
    assert (await source.current()).sk == "fixed-sk"


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://169.254.169.254", True),
        ("http://[fe80::a9fe:a9fe]", True),
        ("http://127.0.0.1:8080", True),
        ("http://localhost", True),
        ("https://metadata.example", True),
        ("http://metadata.example", False),
        ("http://192.168.1.1", False),
        ("ftp://169.254.169.254", False),
        ("https://user:pw@metadata.example", False),
    ],
)
def test_credential_service_urls_are_https_or_link_local_or_loopback(
    url: str, allowed: bool
) -> None:
    from worker.api.secrets import service_url_problem

    assert (service_url_problem(url) is None) == allowed


@pytest.mark.parametrize(
    ("flag", "content", "said"),
    [
        ("--ak-file", SK_CANARY + "x" * 26, "is not an access key: 40 characters"),  # the SK's
        ("--sk-file", f"{SK_CANARY}\nCANARY-SK-TWO-c41e", "holds a control character"),
    ],
    ids=["ak-file-holds-no-access-key", "sk-file-holds-two-lines"],
)
def test_a_key_file_of_the_wrong_content_exits_78_naming_the_file_never_its_content(
    tmp_path: Path, flag: str, content: str, said: str
) -> None:
    """The real CLI: the error names the file given (it named ``ak (REAPER_AK or the config
    file)``, a place the key did not come from), and no part of what the file holds."""
    from tests.test_cli import run_worker

    (tmp_path / "ids.txt").write_text("job-1\n")
    given = tmp_path / "key-file"
    given.write_text(content + "\n")
    given.chmod(0o600)
    pair, key = ("--sk-file", "good-sk-7a1e") if flag == "--ak-file" else ("--ak-file", "A" * 20)
    other = tmp_path / "other-key"
    other.write_text(key)
    other.chmod(0o600)
    done = run_worker("run", "--input", "ids.txt", "--project-id", "p1", "--region",
                      "cn-north-4", "--dry-run", flag, str(given), pair, str(other),
                      cwd=tmp_path)  # fmt: skip
    assert done.returncode == 78, done.stderr
    assert done.stderr.startswith(f"devserver-reaper: {flag} {given} {said}"), done.stderr
    printed = done.stdout + done.stderr
    for line in content.splitlines():
        for part in (line, line[:4], line[-4:]):
            assert part not in printed, part
