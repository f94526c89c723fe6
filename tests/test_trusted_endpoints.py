"""Where a line may send the account's signatures: only to an endpoint the settings trust.

Each call carries the access key id, a signature and (temporary credentials) the security
token; a line, stream entry or plan naming ``endpoint: https://any-host`` must not choose
where they go. Trusted: the settings' endpoint, a region's public ModelArts endpoint,
loopback, and ``allowed_endpoints``; any other is refused with the reason, and nothing is
sent there.

The end-to-end tests need an endpoint that is neither loopback nor public yet answers: a
simulator serving TLS (a test CA, given as ``--ca-bundle``) on this machine's own
non-loopback address. Without one they skip.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import trustme
from aiohttp import web

from tests.conftest import REDIS_URL
from tests.e2e import SIM_AK, SIM_PROJECT, SIM_SK, reaper, reaper_env
from worker.settings import Settings
from worker.simulator import Simulator, SimulatorConfig, run_simulator
from worker.simulator.app import build_app
from worker.targets import Address, Target, resolve

pytestmark = pytest.mark.usefixtures("clean_env")

AWAY = "away-project"


# -- the rule ---------------------------------------------------------------------------------


def test_a_line_may_name_the_default_a_public_a_loopback_or_a_listed_endpoint_only() -> None:
    from worker.targets import untrusted  # here: the module's other tests run on older code

    default = Target("home", "https://modelarts.private.example", "cn-north-4")
    listed = ["https://proxy.example:8443"]

    def sent_to(endpoint: str) -> str:
        found = resolve(Address("p2", None, endpoint), default, endpoints=listed)
        return found.endpoint if isinstance(found, Target) else str(found)

    for trusted in (
        "https://modelarts.private.example",  # the settings' own
        "https://modelarts.cn-south-1.myhuaweicloud.com",  # a region's public one
        "https://modelarts.ap-southeast-1.myhuaweicloud.cn",
        "http://127.0.0.1:8443",  # loopback: tests, the simulator
        "https://proxy.example:8443",  # listed
    ):
        assert sent_to(trusted) == trusted
    for other in (
        "https://attacker.example",
        "https://proxy.example",  # another port is another server
        "https://modelarts.cn-south-1.myhuaweicloud.com:8443",  # a public host's other port
        "https://modelarts.cn-south-1.myhuaweicloud.com.attacker.example",
    ):
        assert sent_to(other).startswith(f"endpoint {other} is not one the settings trust")
    # Refused before a project is looked up for it: no IAM call either.
    refused = resolve(Address(None, "cn-east-3", "https://attacker.example"), default)
    assert isinstance(refused, str) and "not one the settings trust" in refused
    assert untrusted("https://x.example", ["https://x.example"]) is None


def test_allowed_endpoints_is_a_list_setting_kept_normalised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    said = Settings(allowed_endpoints="https://A.example:443/, https://b.example:8443")  # type: ignore[arg-type]
    assert said.allowed_endpoints == ["https://a.example", "https://b.example:8443"]
    monkeypatch.setenv("REAPER_ALLOWED_ENDPOINTS", "https://c.example")
    assert Settings().allowed_endpoints == ["https://c.example"]
    assert Settings(endpoint="https://own.example").trusted_endpoints == {
        "https://c.example",
        "https://own.example",
    }
    with pytest.raises(ValueError, match=r"'http://c\.example': each entry plain http://"):
        Settings(allowed_endpoints=["http://c.example"])


# -- through the real path ----------------------------------------------------------------------


def own_address() -> str:
    """An IPv4 address of this machine that is not loopback, else the test skips."""
    found: set[str] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: the route picks the address
            found.add(probe.getsockname()[0])
        except OSError:
            pass
    with suppress(OSError):
        found.update(
            str(a[4][0]) for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        )
    usable = sorted(a for a in found if not a.startswith("127.") and a != "0.0.0.0")
    if not usable:
        pytest.skip("this machine has no address but loopback")
    return str(usable[0])


@dataclass
class Away:
    """A simulator at an endpoint that is neither loopback nor public."""

    sim: Simulator
    url: str
    ca: Path


@asynccontextmanager
async def away_endpoint(
    tmp: Path, jobs: int, ak: str = SIM_AK, sk: str = SIM_SK
) -> AsyncIterator[Away]:
    """A simulator of ``jobs`` jobs serving TLS at this machine's own address, accepting
    the keys ``ak`` and ``sk``."""
    host = own_address()
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(host).configure_cert(context)
    pem = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    config = SimulatorConfig(jobs=jobs, seed=7, project_id=AWAY, region="cn-east-3", ak=ak, sk=sk)
    sim = Simulator(config)
    runner = web.AppRunner(build_app(sim), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0, ssl_context=context)
        await site.start()
        yield Away(sim, f"https://{host}:{runner.addresses[0][1]}", pem)
    finally:
        await runner.cleanup()


def _lines(path: Path, home: list[str], away: list[str], url: str) -> Path:
    rows = [{"id": i} for i in home]
    rows += [{"id": i, "project_id": AWAY, "endpoint": url} for i in away]
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


@pytest.mark.anyio
async def test_run_rejects_a_line_naming_an_untrusted_endpoint_and_sends_it_once_listed(
    tmp_path: Path,
) -> None:
    """Lines naming an https endpoint the settings do not trust end ``rejected`` with the
    reason, and not one call reaches that endpoint (on the code before, its jobs were
    deleted there); the default project's ids are deleted as ever. The same lines with the
    endpoint in ``--allowed-endpoints`` are sent and deleted there."""
    async with (
        run_simulator(SimulatorConfig(jobs=4, seed=1)) as home,
        away_endpoint(tmp_path, jobs=3) as away,
    ):
        mine, theirs = home.job_ids(), away.sim.job_ids()  # before: a deleted job is gone
        source = _lines(tmp_path / "in.jsonl", mine, theirs, away.url)
        env = reaper_env(home.url, REAPER_CA_BUNDLE=str(away.ca))

        async def run(name: str, *flags: str) -> tuple[int, dict[str, dict[str, Any]]]:
            results = tmp_path / f"{name}.jsonl"
            done = await reaper(["run", "--input", str(source), "--yes", "--results",
                                 str(results), "--max-attempts", "1", *flags], env)  # fmt: skip
            rows = [orjson.loads(line) for line in results.read_bytes().splitlines()]
            return done.code, {row["job_id"]: row for row in rows}

        code, rows = await run("refused")
        assert away.sim.stats.calls == 0  # not one signed call went there
        assert code == 1  # some rejected
        reason = (
            f"endpoint {away.url} is not one the settings trust (their endpoint, a region's "
            "public ModelArts endpoint, loopback, or one of allowed_endpoints)"
        )
        for job in theirs:
            assert rows[job]["outcome"] == "rejected"
            assert rows[job]["reason"].startswith(reason), rows[job]
        assert {rows[job]["outcome"] for job in mine} == {"deleted"}

        code, rows = await run("listed", "--allowed-endpoints", away.url)
        assert code == 0
        assert {rows[job]["outcome"] for job in theirs} == {"deleted"}
        assert away.sim.stats.deletions == 3


@pytest.mark.anyio
async def test_run_started_says_the_endpoints_allowed_and_no_secret(tmp_path: Path) -> None:
    """``run.started`` says ``allowed_endpoints`` as kept (normalised), as ``serve.started``
    does: where this run's signed calls may go besides its own endpoint is what an audit of
    the log looks for first. It said nothing of them. No key nor token is in the event."""
    token = "TOKEN-never-said-7f3a"
    async with run_simulator(SimulatorConfig(jobs=2, seed=2)) as sim:
        source = tmp_path / "ids.txt"
        source.write_text("".join(f"{job}\n" for job in sim.job_ids()), encoding="utf-8")
        env = reaper_env(sim.url, REAPER_SECURITY_TOKEN=token)
        listed = "https://A.example:443/, https://b.example:8443"
        done = await reaper(["run", "--input", str(source), "--dry-run",
                             "--allowed-endpoints", listed], env)  # fmt: skip
        plain = await reaper(["run", "--input", str(source), "--dry-run"], env)
    assert done.code == 0 and plain.code == 0, done.stderr + plain.stderr
    (started,) = done.events("run.started")
    assert started["allowed_endpoints"] == ["https://a.example", "https://b.example:8443"]
    assert plain.events("run.started")[0]["allowed_endpoints"] == []
    said = orjson.dumps(started).decode()
    assert SIM_SK not in said and token not in said


@pytest.mark.anyio
async def test_serve_dead_letters_an_entry_naming_an_untrusted_endpoint_and_sends_one_listed(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """An entry written to the stream by anyone (not through enqueue) naming an untrusted
    https endpoint is dead-lettered with the reason (metric reason ``target``), its id
    ``rejected``, nothing sent there; a replica listing the endpoint deletes it there."""
    from tests.test_serve_regions import AK, SK, Region, rows, serving, settled, until

    stream = redis_prefix + "ids"
    home = Region("project-a", "cn-north-4", 1, tmp_path)
    home.start()
    try:
        async with away_endpoint(tmp_path, jobs=2, ak=AK, sk=SK) as away:
            first, second = away.sim.job_ids()
            entry: dict[Any, Any] = {"id": first, "project_id": AWAY, "endpoint": away.url}
            await redis_client.xadd(stream, entry)
            flags = ("--allowed-projects", f"project-a,{AWAY}", "--ca-bundle", str(away.ca))
            async with serving(stream, home, tmp_path, *flags) as serve:
                await until(partial(settled, redis_client, stream, 1))
                text = await serve.metrics()
            assert away.sim.stats.calls == 0
            (outcome,) = await rows(redis_client, stream + ":outcomes")
            assert (outcome["job_id"], outcome["outcome"]) == (first, "rejected")
            assert outcome["error_msg"].startswith(f"endpoint {away.url} is not one the settings")
            (dead,) = await rows(redis_client, stream + ":dead")
            assert dead["reason"] == outcome["error_msg"]
            assert 'devserver_reaper_dead_lettered_total{reason="target"} 1.0' in text

            await redis_client.xadd(stream, {**entry, "id": second})
            listed = (*flags, "--allowed-endpoints", away.url)
            async with serving(stream, home, tmp_path, *listed) as trusting:

                async def deleted() -> bool:
                    return len(await rows(redis_client, stream + ":outcomes")) == 2

                await until(deleted)
            assert trusting.named("serve.started")[0]["allowed_endpoints"] == [away.url]
            assert serve.named("serve.started")[0]["allowed_endpoints"] == []
            last = (await rows(redis_client, stream + ":outcomes"))[-1]
            assert (last["job_id"], last["outcome"]) == (second, "deleted")
            assert away.sim.deleted == {second}
    finally:
        home.stop()


@pytest.mark.anyio
async def test_enqueue_rejects_a_line_naming_an_untrusted_endpoint_before_the_stream(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    stream = redis_prefix + "ids"
    source = tmp_path / "in.jsonl"
    source.write_bytes(
        b'{"id": "a-1"}\n'
        b'{"id": "b-2", "project_id": "p2", "endpoint": "https://attacker.example"}\n'
        b'{"id": "c-3", "project_id": "p3", "endpoint": "https://modelarts.cn-south-1.myhuaweicloud.com"}\n'
        b'{"id": "d-4", "project_id": "p4", "endpoint": "https://proxy.example:8443"}\n'
    )
    env = reaper_env("http://127.0.0.1:9")
    args = ["enqueue", "--input", str(source), "--stream", stream, "--redis-url", REDIS_URL]
    done = await reaper([*args, "--allowed-endpoints", "https://proxy.example:8443"], env)
    assert done.code == 1, done.stderr
    events = [orjson.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    (rejected,) = [e for e in events if e["event"] == "job.rejected"]
    assert (rejected["job_id"], rejected["line"]) == ("b-2", 2)
    assert rejected["reason"].startswith("endpoint https://attacker.example is not one the")
    entries: Any = await redis_client.xrange(stream)
    assert [f[b"id"] for _, f in entries] == [b"a-1", b"c-3", b"d-4"]


@pytest.mark.anyio
async def test_a_plan_naming_an_untrusted_endpoint_is_refused_when_run(tmp_path: Path) -> None:
    """``discover --project ID@URL`` refuses an endpoint the settings do not trust; made with
    it listed, its plan is refused by a run whose settings do not list it (64, nothing sent),
    and applied by one that does."""
    plan = tmp_path / "plan"
    async with (
        run_simulator(SimulatorConfig(jobs=2, seed=1)) as home,
        away_endpoint(tmp_path, jobs=2) as away,
    ):
        env = reaper_env(home.url, REAPER_CA_BUNDLE=str(away.ca))
        spec = ["--all", "--plan", str(plan), "--project", f"{SIM_PROJECT}@{home.url}",
                "--project", f"{AWAY}@{away.url}"]  # fmt: skip
        refused = await reaper(["discover", *spec], env)
        assert refused.code == 64, refused.stderr
        assert f"endpoint {away.url} is not one the settings trust" in refused.stderr
        assert away.sim.stats.calls == 0 and not plan.exists()

        listed = ["--allowed-endpoints", away.url]
        made = await reaper(["discover", *spec, *listed], env)
        assert made.code == 0, made.stderr
        calls = away.sim.stats.calls

        run = ["run", "--plan", str(plan), "--yes"]
        kept = await reaper(run, env)
        assert kept.code == 64, kept.stderr
        assert f"plan names project {AWAY}, but its endpoint {away.url} is not one" in kept.stderr
        assert away.sim.stats.calls == calls and away.sim.stats.deletions == 0

        applied = await reaper([*run, *listed], env)
        assert applied.code == 0, applied.stderr
        assert away.sim.stats.deletions == 2 and home.stats.deletions == 2


# -- endpoints two URL readers read differently ------------------------------------------------

# urlsplit (which the rules on trust read) raises on the first; the HTTP client (yarl) raises
# on the second, which urlsplit reads as loopback.
UNREADABLE = ("http://[127.0.0.1]", "http://[::1]x")


@pytest.mark.anyio
async def test_run_rejects_a_line_naming_an_endpoint_with_an_unreadable_host_and_runs_the_rest(
    tmp_path: Path,
) -> None:
    """A line naming ``http://[127.0.0.1]`` or ``http://[::1]x`` ends ``rejected`` with the
    reason, and the other lines' jobs are deleted. On the code before, the first ended the
    whole input (66, 'ValueError: An IPv4 address cannot be in brackets', no id read), the
    second passed the rules and crashed the run with a traceback when its client was made,
    not one outcome written."""
    async with run_simulator(SimulatorConfig(jobs=4, seed=1)) as home:
        mine = home.job_ids()
        rows = [{"id": i} for i in mine[:2]]
        away = zip(mine[2:], UNREADABLE, strict=True)
        rows += [{"id": i, "project_id": AWAY, "endpoint": url} for i, url in away]
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
        results = tmp_path / "results.jsonl"
        allowed = f"{SIM_PROJECT},{AWAY}"
        done = await reaper(["run", "--input", str(source), "--yes", "--results", str(results),
                             "--allowed-projects", allowed], reaper_env(home.url))  # fmt: skip
        assert "Traceback" not in done.stderr, done.stderr
        assert done.code == 1, done.stderr
        found = [orjson.loads(line) for line in results.read_bytes().splitlines()]
        assert sorted(r["job_id"] for r in found if r["outcome"] == "deleted") == sorted(mine[:2])
        refused = [r for r in found if r["outcome"] == "rejected"]  # a rejected line is named
        assert sorted(r["line"] for r in refused) == [3, 4]  # by its line, not its id alone
        for row in refused:
            assert row["reason"].startswith("endpoint is not a URL with a host that can be read")
        assert home.deleted == set(mine[:2])


@pytest.mark.anyio
async def test_serve_dead_letters_an_entry_naming_an_endpoint_with_an_unreadable_host(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Written straight to the stream, an entry naming ``http://[::1]x`` is dead-lettered with
    the reason and the entry after it deleted. On the code before, serve died of a ValueError
    traceback with both pending: every replica reading the entry again died too."""
    from tests.test_serve_regions import Region, rows, serving, settled, until

    stream = redis_prefix + "ids"
    home = Region("project-a", "cn-north-4", 1, tmp_path)
    home.start()
    try:
        bad, good = home.ids[:2]
        for url in UNREADABLE:
            await redis_client.xadd(stream, {"id": bad, "project_id": AWAY, "endpoint": url})
        await redis_client.xadd(stream, {"id": good})
        async with serving(stream, home, tmp_path, "--allowed-projects", f"project-a,{AWAY}"):
            await until(partial(settled, redis_client, stream, 3))
        outcomes = {
            (row["job_id"], row["outcome"])
            for row in await rows(redis_client, stream + ":outcomes")
        }
        assert outcomes == {(bad, "rejected"), (good, "deleted")}
        dead = await rows(redis_client, stream + ":dead")
        assert len(dead) == 2
        assert all(d["reason"].startswith("endpoint is not a URL with a host") for d in dead), dead
        assert (await home.control("deleted"))["ids"] == [good]
    finally:
        home.stop()
