"""A region's project id, looked up in IAM (``worker.api.projects``), over real HTTP.

The simulator answers IAM's project list as IAM does; the official SDK, asked to find the
project id from the same simulator, must find the same one (or fail where we fail).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import anyio
import anyio.to_thread
import pytest
from aiohttp import web

from tests.e2e import SIM_AK, SIM_SK, reaper, reaper_env, serve_app, write_ids
from worker.api.credentials import Credentials, CredentialSource, StaticCredentials
from worker.api.projects import (
    GLOBAL_IAM_ENDPOINT,
    LIST_PERMISSION,
    FoundProject,
    IamNotThere,
    IamRefused,
    IamUnavailable,
    ProjectAmbiguous,
    ProjectCache,
    ProjectLookupFailed,
    ProjectNotFound,
    iam_endpoint_for,
    lookup_project,
)
from worker.api.session import make_session
from worker.errors import AuthError, ConfigError, TransientError
from worker.settings import REGIONS
from worker.simulator import Simulator, SimulatorConfig, run_simulator

pytestmark = pytest.mark.anyio

KEYS = StaticCredentials(Credentials(SIM_AK, SIM_SK))
KNOWN = (("cn-south-1", "south-project"), ("cn-east-3", "east-a"), ("cn-east-3", "east-b"))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with make_session(concurrency=4, connect_timeout=2, read_timeout=5) as http:
        yield http


class Sleeps:
    """The back-off a look-up asked for, never slept: tests do not wait on the clock."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)


_E = TypeVar("_E", bound=ProjectLookupFailed)


async def failed_lookup(
    session: aiohttp.ClientSession,
    kind: type[_E],
    region: str,
    keys: CredentialSource = KEYS,
    **config: Any,
) -> tuple[_E, Simulator]:
    """The ``kind`` of failure a look-up of ``region`` in a simulator of ``config`` raises
    (any other, or none, fails the test), and that simulator, stopped."""
    async with run_simulator(SimulatorConfig(jobs=0, **config)) as sim:
        with pytest.raises(kind) as caught:
            await lookup_project(
                session=session, credentials=keys, region=region, iam_endpoint=sim.url
            )
    return caught.value, sim


# -- the IAM endpoint, as the SDK picks it ---------------------------------------------------------


def test_the_iam_endpoint_of_a_region_is_the_sdks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every region the tool knows, and the SDK's own IAM table: the same URL as the SDK's
    ``IamHelper`` (its override variable unset), the global one where it has none."""
    from huaweicloudsdkcore.auth import endpoint as sdk_endpoints
    from huaweicloudsdkcore.auth.internal import IamHelper

    monkeypatch.delenv("HUAWEICLOUD_SDK_IAM_ENDPOINT", raising=False)
    table = vars(sdk_endpoints)["__IAM_ENDPOINT_DICT"]
    for region in {*REGIONS, *table, "xx-nowhere-1"}:
        assert iam_endpoint_for(region) == IamHelper.get_iam_endpoint(region), region
    assert iam_endpoint_for("ap-southeast-1") == "https://iam.ap-southeast-1.myhuaweicloud.com"
    assert iam_endpoint_for("cn-north-11") == GLOBAL_IAM_ENDPOINT


# -- answers of the simulator's IAM ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("region", "project"), [("cn-north-4", "demo-project"), ("cn-south-1", "south-project")]
)
async def test_a_region_resolves_to_the_one_project_iam_names_after_it(
    session: aiohttp.ClientSession, region: str, project: str
) -> None:
    async with run_simulator(SimulatorConfig(jobs=0, iam_projects=KNOWN)) as sim:
        found = await lookup_project(
            session=session, credentials=KEYS, region=region, iam_endpoint=sim.url + "/"
        )
        assert sim.stats.iam_calls == 1
        assert sim.stats.calls == 0  # IAM is another service: not the jobs API's quota
        assert sim.stats.signature_failures == 0
    assert (found.project_id, found.region, found.iam_endpoint) == (project, region, sim.url)
    assert found.trace_id


async def test_no_project_of_that_name_is_a_config_error_that_says_what_to_do(
    session: aiohttp.ClientSession,
) -> None:
    error, _ = await failed_lookup(session, ProjectNotFound, "cn-west-9", iam_projects=KNOWN)
    assert isinstance(error, ConfigError)  # exit 78
    assert "IAM has no project named cn-west-9 for these keys" in str(error)
    assert "X-IAM-Trace-Id" in str(error)
    assert "--project-id" in error.fix and "--region" in error.fix


async def test_two_projects_of_one_name_are_refused_naming_both(
    session: aiohttp.ClientSession,
) -> None:
    error, _ = await failed_lookup(session, ProjectAmbiguous, "cn-east-3", iam_projects=KNOWN)
    assert isinstance(error, ConfigError)
    assert "IAM has 2 projects named cn-east-3 (east-a, east-b;" in str(error)


async def test_keys_without_the_iam_permission_are_told_which_permission(
    session: aiohttp.ClientSession,
) -> None:
    error, sim = await failed_lookup(session, IamRefused, "cn-north-4", iam_forbidden=True)
    assert sim.stats.iam_calls == 1  # a refusal is not tried again
    assert isinstance(error, AuthError) and error.http_status == 403  # exit 77
    assert f"the keys lack the permission {LIST_PERMISSION}" in str(error)
    assert "region cn-north-4" in str(error)
    assert LIST_PERMISSION in error.fix and "--project-id" in error.fix


async def test_keys_iam_does_not_accept_are_refused_and_never_echoed(
    session: aiohttp.ClientSession,
) -> None:
    canary = "canary-iam-secret-7Q"
    keys = StaticCredentials(Credentials(SIM_AK, canary))
    error, _ = await failed_lookup(session, IamRefused, "cn-north-4", keys=keys)
    assert error.http_status == 401
    assert "IAM refused the keys" in str(error)
    assert canary not in str(error) + error.fix


async def test_iam_that_does_not_answer_is_unavailable_after_three_attempts(
    session: aiohttp.ClientSession,
) -> None:
    sleeps = Sleeps()
    with pytest.raises(IamUnavailable) as caught:
        await lookup_project(
            session=session, credentials=KEYS, region="cn-north-4",
            iam_endpoint=nobody_listens(), sleep=sleeps,
        )  # fmt: skip
    assert isinstance(caught.value, TransientError)  # exit 69
    assert "3 attempts" in str(caught.value) and "cannot connect" in str(caught.value).lower()
    assert sleeps.asked == [0.5, 1.0]


# -- answers no simulator gives: a small IAM of the test's own ------------------------------------


class ScriptedIam:
    """A handler of IAM's project list that gives ``answers`` in turn, the last one again
    and again, and counts the calls."""

    def __init__(self, *answers: web.Response) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def listing(*projects: tuple[str, str]) -> web.Response:
    body = {"projects": [{"name": name, "id": pid} for name, pid in projects]}
    return web.json_response(body, headers={"X-IAM-Trace-Id": "trace-1"})


async def look_up_from(
    session: aiohttp.ClientSession,
    handler: ScriptedIam,
    credentials: CredentialSource = KEYS,
    **kw: Any,
) -> FoundProject:
    """The project of cn-north-4, looked up in the IAM ``handler`` serves on loopback."""
    app = web.Application()
    app.router.add_get("/v3/projects", handler.handle)
    async with serve_app(app) as url:
        return await lookup_project(
            session=session, credentials=credentials, region="cn-north-4", iam_endpoint=url,
            **kw,
        )  # fmt: skip


async def test_a_throttled_or_failing_iam_is_asked_again_as_it_says(
    session: aiohttp.ClientSession,
) -> None:
    handler = ScriptedIam(
        web.json_response({"error_msg": "slow down"}, status=429, headers={"Retry-After": "3"}),
        web.Response(status=503, text="busy"),
        listing(("cn-north-4", "p-1")),
    )
    sleeps = Sleeps()
    found = await look_up_from(session, handler, sleep=sleeps)
    assert found.project_id == "p-1"
    assert handler.calls == 3
    assert sleeps.asked == [3.0, 1.0]  # IAM's Retry-After, then the back-off's second step


async def test_a_project_of_another_name_is_never_taken(session: aiohttp.ClientSession) -> None:
    """An IAM (or a proxy) that ignored ``?name=`` must not hand us some other project; the
    SDK takes the first project it gets whatever its name."""
    with pytest.raises(ProjectNotFound):
        await look_up_from(session, ScriptedIam(listing(("cn-south-1", "south"))))
    found = await look_up_from(
        session, ScriptedIam(listing(("cn-south-1", "south"), ("cn-north-4", "north")))
    )
    assert found.project_id == "north"


@pytest.mark.parametrize(
    "answer",
    [
        web.Response(status=404, text="<html>no</html>", content_type="text/html"),
        web.Response(status=200, text="<html>welcome</html>", content_type="text/html"),
        web.json_response({"projects": [{"name": "cn-north-4", "id": "has space"}]}),
    ],
    ids=["404", "html", "bad-id"],
)
async def test_what_is_not_iams_project_list_is_a_config_error(
    session: aiohttp.ClientSession, answer: web.Response
) -> None:
    handler = ScriptedIam(answer)
    with pytest.raises(IamNotThere) as caught:
        await look_up_from(session, handler)
    assert handler.calls == 1  # not asked again: it will not change its mind
    assert isinstance(caught.value, ConfigError)
    assert "iam_endpoint" in caught.value.fix


# -- the process's cache ---------------------------------------------------------------------------


async def test_the_cache_asks_iam_once_per_region_even_when_asked_at_once(
    session: aiohttp.ClientSession,
) -> None:
    cache = ProjectCache()
    async with run_simulator(SimulatorConfig(jobs=0, iam_projects=KNOWN)) as sim:
        found: list[str] = []

        async def resolve(region: str) -> None:
            got = await cache.resolve(
                session=session, credentials=KEYS, region=region, iam_endpoint=sim.url
            )
            found.append(got.project_id)

        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(resolve, "cn-north-4")
        await resolve("cn-south-1")
        await resolve("cn-north-4")
        assert sim.stats.iam_calls == 2
    assert sorted(found) == ["demo-project"] * 6 + ["south-project"]
    assert cache.get("cn-north-4", sim.url + "/") is not None
    assert cache.get("cn-north-4") is None  # another IAM endpoint: another answer
    assert repr(cache) == (
        "ProjectCache(lookups=2, known={cn-north-4=demo-project, cn-south-1=south-project})"
    )


async def test_the_cache_keys_an_iam_endpoint_by_its_one_normal_form(
    session: aiohttp.ClientSession,
) -> None:
    """An IAM endpoint spelt with its scheme in capitals or a trailing slash is the same
    endpoint (``normal_endpoint``, as settings, lines and plans compare it): one IAM call,
    one answer, whichever spelling asks or reads it."""
    cache = ProjectCache()
    async with run_simulator(SimulatorConfig(jobs=0)) as sim:
        shouted = sim.url.replace("http://", "HTTP://") + "/"
        for spelt in (sim.url, shouted, f" {shouted} "):
            found = await cache.resolve(
                session=session, credentials=KEYS, region="cn-north-4", iam_endpoint=spelt
            )
            assert found.project_id == "demo-project"
        assert sim.stats.iam_calls == 1
    for spelt in (sim.url, shouted):
        assert cache.get("cn-north-4", spelt) == found
        assert cache.get("cn-north-4", spelt, SIM_AK) == found
    assert cache.lookups == 1


async def test_a_failed_look_up_is_not_kept(session: aiohttp.ClientSession) -> None:
    cache = ProjectCache()
    handler = ScriptedIam(
        web.json_response({"error": {"code": 403, "message": "no"}}, status=403),
        listing(("cn-north-4", "p-2")),
    )
    app = web.Application()
    app.router.add_get("/v3/projects", handler.handle)
    async with serve_app(app) as url:
        kw = {"session": session, "credentials": KEYS, "region": "cn-north-4", "iam_endpoint": url}
        with pytest.raises(IamRefused):
            await cache.resolve(**kw)  # type: ignore[arg-type]
        assert (await cache.resolve(**kw)).project_id == "p-2"  # type: ignore[arg-type]
    assert handler.calls == 2


async def test_the_cache_is_kept_per_access_key_which_it_never_shows(
    session: aiohttp.ClientSession,
) -> None:
    """Another account's keys see other projects: an answer found with one access key is
    not another key's (the SDK keys its cache by access key and region too)."""
    cache = ProjectCache()
    other = StaticCredentials(Credentials("AKOTHERACCOUNT000001", "other-secret-key"))
    handler = ScriptedIam(listing(("cn-north-4", "p-mine")), listing(("cn-north-4", "p-theirs")))
    app = web.Application()
    app.router.add_get("/v3/projects", handler.handle)
    async with serve_app(app) as url:

        async def resolve(keys: CredentialSource) -> str:
            found = await cache.resolve(session=session, credentials=keys, region="cn-north-4",
                                        iam_endpoint=url)  # fmt: skip
            return found.project_id

        assert [await resolve(KEYS), await resolve(other), await resolve(KEYS),
                await resolve(other)] == ["p-mine", "p-theirs", "p-mine", "p-theirs"]  # fmt: skip
    assert handler.calls == 2
    found = cache.get("cn-north-4", url, (await KEYS.current()).ak)
    assert found is not None and found.project_id == "p-mine"
    assert cache.get("cn-north-4", url, "AKNEVERSEEN") is None
    assert "AK" not in repr(cache) and "OTHER" not in repr(cache)


# -- the official SDK, against the same simulator -------------------------------------------------


@pytest.mark.parametrize("region", ["cn-north-4", "cn-south-1", "cn-east-3", "cn-west-9"])
async def test_the_official_sdk_finds_the_same_project_or_fails_where_we_fail(
    session: aiohttp.ClientSession, region: str
) -> None:
    """The SDK's ``BasicCredentials`` without a project id, built into a ModelArts client for
    ``region``, asks the simulator's IAM (its signature checked) and takes what it says."""
    async with run_simulator(SimulatorConfig(jobs=0, iam_projects=KNOWN)) as sim:
        sdk = await anyio.to_thread.run_sync(sdk_project_id, sim.url, region)
        try:
            ours: str | None = (
                await lookup_project(
                    session=session, credentials=KEYS, region=region, iam_endpoint=sim.url
                )
            ).project_id
        except ConfigError:
            ours = None
        assert sim.stats.signature_failures == 0
        assert sim.stats.iam_calls == 2
    assert ours == sdk
    assert (sdk is None) == (region in ("cn-east-3", "cn-west-9"))


def sdk_project_id(url: str, region: str) -> str | None:
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.exceptions.exceptions import SdkException
    from huaweicloudsdkcore.http.http_config import HttpConfig
    from huaweicloudsdkcore.region.region import Region
    from huaweicloudsdkmodelarts.v1 import ModelArtsClient

    BasicCredentials._CACHE.clear()  # the SDK keeps answers per AK and region, class-wide
    credentials = BasicCredentials(SIM_AK, SIM_SK).with_iam_endpoint(url)
    builder = (
        ModelArtsClient.new_builder()
        .with_http_config(HttpConfig.get_default_config())
        .with_credentials(credentials)
        .with_region(Region(region, url))
    )
    try:
        builder.build()
    except SdkException:
        return None
    project: str = credentials.project_id
    return project


# -- helpers ---------------------------------------------------------------------------------------


def nobody_listens() -> str:
    """A loopback URL whose port was free a moment ago: connections to it are refused."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- the commands, in a subprocess, with a region and no project id -------------------------------


def by_region(url: str, region: str = "cn-north-4", **extra: str) -> dict[str, str]:
    """The CLI's environment with no project id anywhere: a region, and IAM at ``url``."""
    env = reaper_env(url, REAPER_REGION=region, REAPER_IAM_ENDPOINT=url, **extra)
    del env["REAPER_PROJECT_ID"]
    return env


async def test_check_says_where_the_project_came_from() -> None:
    async with run_simulator(SimulatorConfig(jobs=1)) as sim:
        looked_up = await reaper(["check"], by_region(sim.url))
        assert sim.stats.iam_calls == 1
        given = await reaper(["check"], reaper_env(sim.url))
        assert sim.stats.iam_calls == 1  # a project id set: IAM is not asked
    assert looked_up.code == 0, looked_up.stdout + looked_up.stderr
    assert (
        f"project      demo-project (from IAM {sim.url}: the project named cn-north-4)\n"
        in looked_up.stdout
    )
    assert "result       OK" in looked_up.stdout
    assert [e["project_id"] for e in looked_up.events("project.resolved")] == []  # stderr's
    assert given.code == 0 and "project      demo-project (from settings)\n" in given.stdout


@pytest.mark.parametrize(
    ("config", "region", "code", "said"),
    [
        (SimulatorConfig(jobs=1, iam_forbidden=True), "cn-north-4", 77,
         "result       IAM REFUSED: IAM refused to list the projects"),
        (SimulatorConfig(jobs=1), "cn-west-9", 78,
         "result       PROJECT NOT FOUND: IAM has no project named cn-west-9"),
        (SimulatorConfig(jobs=1, iam_projects=KNOWN), "cn-east-3", 78,
         "result       PROJECT AMBIGUOUS: IAM has 2 projects named cn-east-3 (east-a, east-b;"),
    ],
    ids=["forbidden", "no-such-project", "two-projects"],
)  # fmt: skip
async def test_check_names_what_iam_said_and_the_fix(
    config: SimulatorConfig, region: str, code: int, said: str
) -> None:
    async with run_simulator(config) as sim:
        done = await reaper(["check"], by_region(sim.url, region))
        assert sim.stats.calls == 0  # the jobs API is not called without a project
    assert done.code == code, done.stdout + done.stderr
    result, fix = done.stdout.splitlines()
    assert result.startswith(said)
    assert fix.startswith("fix          ")
    assert "REAPER_PROJECT_ID" in fix


async def test_run_by_region_deletes_in_the_project_iam_names(tmp_path: Path) -> None:
    ledger = tmp_path / "run.db"
    async with run_simulator(SimulatorConfig(jobs=30, region="cn-south-1")) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        args = ["run", "-i", str(ids), "--yes", "--ledger", str(ledger)]
        done = await reaper(args, by_region(sim.url, "cn-south-1"))
        assert done.code == 0, done.stderr
        assert sim.job_ids() == []
        assert sim.stats.iam_calls == 1  # once a process, for the prompt, ledger and client
        again = await reaper(args, reaper_env(sim.url))  # the same ledger, the id given
    assert [e["project_id"] for e in done.events("project.resolved")] == ["demo-project"]
    assert done.events("run.started")[0]["project_id"] == "demo-project"
    assert done.summary()["deleted"] == 30
    assert again.code == 0, again.stderr  # the ledger was bound to the id IAM gave


async def test_on_a_terminal_a_look_up_that_takes_a_while_says_so_then_the_line_goes(
    tmp_path: Path,
) -> None:
    """A person at a terminal sees why nothing happens while IAM is asked: the simulator
    (its IAM too) runs on this test's event loop, which waiting for the line holds, so IAM
    cannot answer before the line is shown; once it has, the line is erased."""
    from tests.tty import Terminal

    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        term = Terminal(["run", "-i", str(ids), "--yes"], by_region(sim.url))
        said = f"looking up the project of region cn-north-4 in IAM ({sim.url})…"
        term.expect_on_screen(said)  # holds the loop: IAM has not answered
        code = await anyio.to_thread.run_sync(term.wait)
        assert sim.job_ids() == []
    assert code == 0, term.screen_text()
    assert not any(said in line for line in term.lines())  # erased, not left above


async def test_a_dry_run_of_ids_asks_iam_nothing(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(["run", "-i", str(ids), "--dry-run"], by_region(sim.url))
        assert (sim.stats.iam_calls, sim.stats.calls) == (0, 0)
    assert done.code == 0, done.stderr


@pytest.mark.parametrize(
    "command", [["run", "-i", "IDS", "--yes"], ["discover", "--all"], ["serve"]]
)
async def test_a_region_iam_knows_no_project_of_stops_before_any_call(
    tmp_path: Path, command: list[str]
) -> None:
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        args = [str(ids) if arg == "IDS" else arg for arg in command]
        done = await reaper(args, by_region(sim.url, "cn-west-9", REAPER_HTTP_PORT="0"))
        assert sim.stats.calls == 0
        assert sim.stats.iam_calls == 1
    assert done.code == 78, done.stdout + done.stderr
    assert "IAM has no project named cn-west-9" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


async def test_discover_by_region_lists_the_project_iam_names(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=7)) as sim:
        done = await reaper(["discover", "--all", "-o", "ids"], by_region(sim.url))
        assert sim.stats.iam_calls == 1
    assert done.code == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(sim.job_ids())
    summary = [line for line in done.stderr.splitlines() if "discover.summary" in line]
    assert '"project_id":"demo-project"' in summary[0]


# -- where the IAM endpoint is set ----------------------------------------------------------------


@pytest.mark.usefixtures("clean_env")
def test_the_sdks_iam_variable_is_read_below_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import wiring
    from worker.settings import load_settings

    monkeypatch.setenv("HUAWEICLOUD_SDK_IAM_ENDPOINT", "https://iam.example.com/")
    assert wiring.iam_endpoint(load_settings()) == "https://iam.example.com"
    monkeypatch.setenv("REAPER_IAM_ENDPOINT", "https://iam.cn-north-4.myhuaweicloud.com")
    assert load_settings().iam_endpoint == "https://iam.cn-north-4.myhuaweicloud.com"
    assert load_settings(iam_endpoint="http://127.0.0.1:9").iam_endpoint == "http://127.0.0.1:9"


@pytest.mark.usefixtures("clean_env")
def test_an_iam_endpoint_our_keys_would_be_signed_to_in_clear_is_refused() -> None:
    from worker.settings import load_settings

    with pytest.raises(ConfigError) as caught:
        load_settings(iam_endpoint="http://iam.example.com")
    assert str(caught.value) == (
        "--iam-endpoint plain http:// is accepted only for loopback hosts; use https://"
    )
    with pytest.raises(ConfigError, match=r"such as https://iam\.cn-north-4"):
        load_settings(iam_endpoint="iam.example.com")


@pytest.mark.usefixtures("clean_env")
def test_the_profiles_iam_endpoint_is_used_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK reads ``iam_endpoint`` from the profile's ``[basic]`` too; a setting wins."""
    from worker import wiring
    from worker.settings import load_settings

    profile = tmp_path / "credentials"
    monkeypatch.setenv("HUAWEICLOUD_SDK_CREDENTIALS_FILE", str(profile))
    profile.write_text("[basic]\nak = DEMOAK\nsk = x\niam_endpoint = https://iam.corp.example/\n")
    assert wiring.iam_endpoint(load_settings()) == "https://iam.corp.example"
    assert wiring.iam_endpoint(load_settings(iam_endpoint="https://iam.b.example")) == (
        "https://iam.b.example"
    )
    profile.write_text("[basic]\nak = DEMOAK\nsk = x\niam_endpoint = http://iam.corp.example\n")
    with pytest.raises(ConfigError, match=rf"profile {profile}: iam_endpoint plain http://"):
        wiring.iam_endpoint(load_settings())
    profile.write_text("[basic]\nak = DEMOAK\nsk = x\niam_endpoint = iam.corp.example\n")
    with pytest.raises(ConfigError, match=r"iam_endpoint must be .* such as https://iam\.cn-"):
        wiring.iam_endpoint(load_settings())  # IAM's example, not the ModelArts API's


@pytest.mark.usefixtures("clean_env")
def test_without_a_project_or_a_region_the_error_names_both() -> None:
    from worker import wiring
    from worker.settings import load_settings

    with pytest.raises(ConfigError) as caught:
        wiring.project_id(load_settings(endpoint="http://127.0.0.1:9"))
    assert str(caught.value) == (
        "missing settings: --project-id (or REAPER_PROJECT_ID), or --region with keys to look "
        "it up in IAM"
    )


async def test_simulate_refuses_an_iam_project_that_is_not_name_equals_id() -> None:
    done = await reaper(["simulate", "--port", "0", "--iam-project", "cn-south-1"], {})
    assert done.code == 64
    assert "--iam-project 'cn-south-1': give NAME=ID" in done.stderr


async def test_check_says_when_the_project_came_from_the_profile(tmp_path: Path) -> None:
    profile = tmp_path / "credentials"
    profile.write_text("[basic]\nproject_id = demo-project\n")
    async with run_simulator(SimulatorConfig(jobs=1)) as sim:
        env = by_region(sim.url, HUAWEICLOUD_SDK_CREDENTIALS_FILE=str(profile))
        done = await reaper(["check"], env)
        assert sim.stats.iam_calls == 0  # the profile names it: IAM is not asked
    assert done.code == 0, done.stdout + done.stderr
    assert f"project      demo-project (from profile {profile})\n" in done.stdout
