"""Redis as production runs it (issue 24, point 8): a password (``requirepass``), an ACL user
with only the rights docs/security.md gives the worker, and TLS (``rediss://``). Each test
starts its own ``redis-server`` and puts the real ``enqueue`` and ``serve`` through it; the
simulator is the API. The password never shows in anything they print."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import orjson
import pytest
import trustme
from redis import asyncio as aioredis

from tests.e2e import SIM_AK, SIM_SK, stop_and_drain
from worker.simulator import SimulatorConfig, run_simulator

REDIS_SERVER = shutil.which("redis-server")
ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "pw-CANARY-5f2a9c"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("clean_env"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def redis_server(
    folder: Path, config: Sequence[str], *, tls: bool = False, port: int | None = None
) -> AsyncIterator[int]:
    """A private redis-server configured by ``config`` lines, on ``port`` (a free one when
    None; TLS-only when ``tls``), for the length of the block."""
    port = _free_port() if port is None else port
    listen = ["port 0", f"tls-port {port}"] if tls else [f"port {port}"]
    conf = folder / "redis.conf"
    conf.write_text("\n".join(["bind 127.0.0.1", *listen, 'save ""', "appendonly no",
                               f"dir {folder}", *config]) + "\n")  # fmt: skip
    assert REDIS_SERVER is not None
    process = await anyio.open_process([REDIS_SERVER, str(conf)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        with anyio.fail_after(10):
            while True:
                try:
                    probe = await anyio.connect_tcp("127.0.0.1", port)
                    await probe.aclose()
                    break
                except OSError:
                    await anyio.sleep(0.05)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have refused its config
            process.kill()
        await process.wait()
        await process.aclose()


def worker_acl() -> str:
    """The ACL line docs/security.md gives for the worker, as the operator copies it."""
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    found = re.findall(r"^ *user devserver-reaper .*$", text, re.M)
    lines: list[str] = [line.strip() for line in found]
    assert len(lines) == 1, "docs/security.md gives one ACL line for the worker"
    return lines[0]


async def _reaper(*args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REAPER_", "HUAWEICLOUD_"))}
    done = await anyio.run_process([sys.executable, "-m", "worker", *args],
                                   env=env | {"REAPER_SK": SIM_SK}, check=False)  # fmt: skip
    return done.returncode, done.stdout.decode() + done.stderr.decode()


async def delete_through(
    url: str, tmp_path: Path, *, quota: float = 0.0, serve_args: Sequence[str] = ()
) -> str:
    """Enqueue a simulator's jobs through ``url`` and let one ``serve`` (given
    ``serve_args``) delete them all, the simulator allowing ``quota`` calls/s (0: any);
    returns everything both printed."""
    async with run_simulator(SimulatorConfig(jobs=30, quota=quota)) as sim:
        ids = tmp_path / "ids.txt"
        ids.write_text("\n".join(sim.job_ids()) + "\n")
        stream = ["--stream", "devserver-reaper:ids"]
        code, printed = await _reaper("enqueue", "--input", str(ids), "--redis-url", url, *stream)
        assert code == 0, printed
        env = {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}
        command = [sys.executable, "-m", "worker", "serve", "--endpoint", sim.url,
                   "--project-id", sim.config.project_id, "--ak", SIM_AK, "--redis-url", url,
                   *stream, "--http-port", "0", "--log-format", "json", *serve_args]  # fmt: skip
        errors = tmp_path / "serve.err"
        with errors.open("wb") as err:
            process = await anyio.open_process(command, env=env | {"REAPER_SK": SIM_SK},
                                               stderr=err)  # fmt: skip
        try:
            with anyio.fail_after(60):
                while sim.job_ids() and process.returncode is None:
                    await anyio.sleep(0.05)
        finally:
            out = await stop_and_drain(process)
        assert process.returncode == 0, errors.read_text()
        stopped = [e for e in map(orjson.loads, out.splitlines()) if e["event"] == "serve.stopped"]
        assert stopped and stopped[0]["acked"] == 30
        return printed + out.decode() + errors.read_text()


@pytest.mark.anyio
async def test_a_password_protected_redis_is_used_and_its_password_never_printed(
    tmp_path: Path,
) -> None:
    async with redis_server(tmp_path, [f"requirepass {PASSWORD}"]) as port:
        printed = await delete_through(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", tmp_path)
        assert PASSWORD not in printed
        wrong_url = f"redis://:wrong-{PASSWORD}@127.0.0.1:{port}/0"
        code, wrong = await _reaper(
            "enqueue", "--input", str(tmp_path / "ids.txt"), "--redis-url", wrong_url
        )
        assert code == 78, wrong  # refused: a setting to fix, not an outage to wait out
        assert PASSWORD not in wrong


@pytest.mark.anyio
async def test_the_acl_user_the_docs_give_the_worker_is_enough_to_enqueue_and_serve(
    tmp_path: Path,
) -> None:
    """The default user is off; the worker's user may touch only its own keys and only the
    commands the line in docs/security.md allows, and that is all enqueue and serve need."""
    acl = worker_acl().replace(">CHANGE-ME", f">{PASSWORD}")
    async with redis_server(tmp_path, [acl, "user default off"]) as port:
        url = f"redis://devserver-reaper:{PASSWORD}@127.0.0.1:{port}/0"
        printed = await delete_through(url, tmp_path)
        assert PASSWORD not in printed
        assert "NOPERM" not in printed
        code, refused = await _reaper("enqueue", "--input", str(tmp_path / "ids.txt"),
                                      "--redis-url", url, "--stream", "other-team:ids")  # fmt: skip
        assert code == 78, refused  # another's keys: not this user's, a setting to fix
        assert "may not do what the worker needs" in refused and "Traceback" not in refused


ADMIN = "user reaper-test-admin on >admin-pw ~* &* +@all"
"""A user of the test's own beside the worker's, to read what the ACL refused (``ACL LOG``)."""

_SCRIPT_CALL = re.compile(r"redis\.p?call\('([A-Z]+)'(?:, '([A-Z]+)')?")


def script_commands() -> set[str]:
    """Every command (``xgroup|create`` for a subcommand) the worker's Lua scripts call."""
    found: set[str] = set()
    for path in (ROOT / "worker").rglob("*.py"):
        for command, sub in _SCRIPT_CALL.findall(path.read_text(encoding="utf-8")):
            found.add(f"{command}|{sub}".lower() if sub else command.lower())
    return found


_PACER_CALL = re.compile(r"_client\.([a-z]+)\(")


def pacer_commands() -> set[str]:
    """The commands the shared rate limit sends outside its scripts (the look at the count
    of take-backs before a start, 2e42314: an ``HMGET``), which no end-to-end run takes
    unless a start is more than 10 ms after its reservation."""
    found: set[str] = set()
    for path in (ROOT / "worker" / "pacing").glob("*.py"):
        found.update(_PACER_CALL.findall(path.read_text(encoding="utf-8")))
    return found


@asynccontextmanager
async def as_admin(port: int) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=port, username="reaper-test-admin", password="admin-pw")
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_every_command_the_worker_scripts_call_is_one_the_acl_allows(
    tmp_path: Path,
) -> None:
    """A script's branch the end-to-end test never takes (a rate cut's PEXPIRE, the fleet
    leader's list, the rates beside a shared limit) runs under the same ACL in production:
    each command any script calls, and each the shared rate limit sends outside them, is
    tried on the worker's key by ``ACL DRYRUN``."""
    commands = script_commands() | pacer_commands()
    assert {"xack", "pexpire", "hset", "xgroup|delconsumer"} <= commands  # the scripts were read
    assert "hmget" in pacer_commands()  # and the pacer's own commands
    acl = worker_acl().replace(">CHANGE-ME", f">{PASSWORD}")
    refused: dict[str, str] = {}
    async with (
        redis_server(tmp_path, [acl, "user default off", ADMIN]) as port,
        as_admin(port) as admin,
    ):
        for command in sorted(commands):
            ask = admin.execute_command
            info = await ask("COMMAND", "INFO", command)  # type: ignore[no-untyped-call]
            arity = int(info[command]["arity"])
            args = ["devserver-reaper:ids"] * (abs(arity) - 1 - command.count("|"))
            dry = ("ACL", "DRYRUN", "devserver-reaper", *command.split("|"), *args)
            reply = await ask(*dry)  # type: ignore[no-untyped-call]
            if reply != b"OK":
                refused[command] = reply.decode()
    assert not refused, refused


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("serve_args", "slowed_by"),
    [(["--rate", "20", "--burst", "1", "--batch-size", "1"], "rate.slowed"),
     (["--rate", "auto", "--batch-size", "1"], "rate.leader")],
    ids=["fixed-rate-cut", "auto"],
)  # fmt: skip
async def test_serve_under_the_docs_acl_follows_a_quota_with_nothing_refused(
    tmp_path: Path, serve_args: list[str], slowed_by: str
) -> None:
    """Over a quota of 4 calls/s serve is refused and slows down (a fixed rate's cut; the
    auto fleet's leader and its shared state), all under the documented ACL: every job
    deleted, and Redis's ``ACL LOG`` holds no refusal."""
    acl = worker_acl().replace(">CHANGE-ME", f">{PASSWORD}")
    async with redis_server(tmp_path, [acl, "user default off", ADMIN]) as port:
        url = f"redis://devserver-reaper:{PASSWORD}@127.0.0.1:{port}/0"
        printed = await delete_through(url, tmp_path, quota=4, serve_args=serve_args)
        async with as_admin(port) as admin:
            log = await admin.execute_command("ACL", "LOG")  # type: ignore[no-untyped-call]
    # INFO is a courtesy (the eviction policy check) the ACL is meant to refuse: not a right
    # the worker needs, so not one the docs give it.
    denied = [entry for entry in log if entry[b"object"] != b"info"]
    assert log and not denied, log
    names = {e.get("event") for e in map(orjson.loads, printed.splitlines()) if isinstance(e, dict)}
    assert {"batch.retry", slowed_by} <= names, names  # refused, and slowed down
    assert "NOPERM" not in printed


@pytest.mark.anyio
async def test_an_acl_short_of_a_right_stops_serve_with_78_and_no_traceback(
    tmp_path: Path,
) -> None:
    full = worker_acl()
    assert " +@hash" in full
    acl = full.replace(">CHANGE-ME", f">{PASSWORD}").replace(" +@hash", "")
    async with redis_server(tmp_path, [acl, "user default off"]) as port:
        url = f"redis://devserver-reaper:{PASSWORD}@127.0.0.1:{port}/0"
        async with run_simulator(SimulatorConfig(jobs=3)) as sim:
            ids = tmp_path / "ids.txt"
            ids.write_text("\n".join(sim.job_ids()) + "\n")
            code, printed = await _reaper("enqueue", "--input", str(ids), "--redis-url", url)
            assert code == 0, printed
            with anyio.fail_after(60):
                code, printed = await _reaper(
                    "serve", "--endpoint", sim.url, "--project-id", sim.config.project_id,
                    "--ak", SIM_AK, "--redis-url", url, "--http-port", "0", "--log-format", "json",
                )  # fmt: skip
    assert code == 78, printed
    assert "Traceback" not in printed
    assert "may not do what the worker needs" in printed
    assert re.search(r"no permissions to run the 'h[a-z]+' command", printed), printed
    assert PASSWORD not in printed


@pytest.mark.anyio
async def test_rediss_with_a_private_ca_works_end_to_end(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    tls = [f"tls-cert-file {cert_pem}", f"tls-key-file {key_pem}", f"tls-ca-cert-file {ca_pem}",
           "tls-auth-clients no", f"requirepass {PASSWORD}"]  # fmt: skip
    async with redis_server(tmp_path, tls, tls=True) as port:
        url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca_pem}"
        printed = await delete_through(url, tmp_path)
        assert PASSWORD not in printed
        other = trustme.CA()
        (tmp_path / "other.pem").write_bytes(other.cert_pem.bytes())
        untrusted = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'other.pem'}"
        code, refused = await _reaper("enqueue", "--input", str(tmp_path / "ids.txt"),
                                      "--redis-url", untrusted)  # fmt: skip
        assert code != 0, refused  # a certificate no trusted CA signed is never accepted
        assert PASSWORD not in refused


@pytest.mark.anyio
@pytest.mark.parametrize("command", ["serve", "run"])
async def test_a_script_the_acl_refuses_mid_run_stops_with_78_and_no_traceback(
    tmp_path: Path, command: str
) -> None:
    """A right missing that only a rate cut's script uses (``PEXPIRE``): serve, or a run
    sharing the rate limit, goes until its first cut, then stops saying what to give the
    user (78), not with a traceback."""
    full = worker_acl()
    assert " +pexpire" in full
    acl = full.replace(">CHANGE-ME", f">{PASSWORD}").replace(" +pexpire", "")
    async with redis_server(tmp_path, [acl, "user default off"]) as port:
        url = f"redis://devserver-reaper:{PASSWORD}@127.0.0.1:{port}/0"
        async with run_simulator(SimulatorConfig(jobs=30, quota=4)) as sim:
            ids = tmp_path / "ids.txt"
            ids.write_text("\n".join(sim.job_ids()) + "\n")
            source = ["--http-port", "0"] if command == "serve" else ["-i", str(ids), "--yes"]
            if command == "serve":
                code, printed = await _reaper("enqueue", "--input", str(ids), "--redis-url", url)
                assert code == 0, printed
            with anyio.fail_after(60):
                code, printed = await _reaper(
                    command, *source, "--endpoint", sim.url, "--project-id", sim.config.project_id,
                    "--ak", SIM_AK, "--redis-url", url, "--log-format", "json",
                    "--rate", "20", "--burst", "1", "--batch-size", "1",
                )  # fmt: skip
    assert code == 78, printed
    assert "Traceback" not in printed
    assert "the Redis user may not do what" in printed
    assert "give it the ACL in docs/security.md" in printed
    assert "The user executing the script can't run this command" in printed
    assert PASSWORD not in printed
