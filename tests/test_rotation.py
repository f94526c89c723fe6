"""A rotated Secret reaches a running ``serve`` (issue 24, point 4): the real ``serve`` process
reads its keys from files mounted as the kubelet mounts a Secret; the simulator's keys and the
files change together, as an operator rotating the keys does; the replica keeps deleting
without a restart, and says which files it read again."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL
from tests.e2e import SIM_AK, SIM_SK, mount_secret
from tests.test_serve_e2e import GROUP, Queue, Replica, queue, until
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]


async def start_with_key_files(
    q: Queue, name: str, files: dict[str, Path], prefix: tuple[str, ...] = ()
) -> Replica:
    """A ``serve`` reading its keys from ``files`` only; ``prefix``: what runs it."""
    command = [
        *prefix, sys.executable, "-m", "worker", "serve",
        "--endpoint", q.sim.url, "--project-id", q.sim.config.project_id,
        "--stream", q.stream, "--group", GROUP, "--consumer", name,
        "--redis-url", REDIS_URL, "--http-port", "0", "--log-format", "json",
        "--credential-source", "settings",
    ]  # fmt: skip
    env = {"REAPER_AK_FILE": str(files["ak"]), "REAPER_SK_FILE": str(files["sk"])}
    return await q.launch(name, command, env)


@pytest.mark.anyio
async def test_serve_deletes_with_the_rotated_keys_without_a_restart(
    redis_prefix: str, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    files = mount_secret(secret, ak=SIM_AK, sk=SIM_SK)
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=40)) as q:
        replica = await start_with_key_files(q, "rotating", files)
        ids = q.sim.job_ids()
        await q.enqueue(ids[:20])

        async def deleted(n: int) -> bool:
            return len(q.sim.deleted) == n

        await until(lambda: deleted(20))
        # The operator rotates: the API takes only the new keys, the Secret is updated (with
        # a defaultMode that lets anyone read them: warned about once, as at start).
        q.sim.config = replace(q.sim.config, ak="ROTATEDAK2026", sk="rotated-secret-key")
        mount_secret(secret, mode=0o444, ak="ROTATEDAK2026", sk="rotated-secret-key")
        await q.enqueue(ids[20:])
        await until(lambda: deleted(40))
        await q.stop_all()
    assert replica.process.returncode == 0
    assert q.sim.stats.signature_failures == 0  # the change was seen before any call
    source = replica.named("credentials.source")
    assert [(e["source"], e["asked"]) for e in source] == [("settings", "settings")]
    assert set(source[0]["files"]) == {f"ak_file {files['ak']}", f"sk_file {files['sk']}"}
    reloaded = replica.named("credentials.reloaded")
    assert len(reloaded) == 1
    assert set(reloaded[0]["files"]) == set(source[0]["files"])
    assert replica.named("serve.paused") == []
    exposed = [e["error"] for e in replica.named("settings.key_file_exposed")]
    assert len(exposed) == 2, exposed  # each file once, not at every look after it
    for path, warning in zip(sorted(files.values()), sorted(exposed), strict=True):
        assert warning.startswith(f"{path.name}_file {path} is readable by others (mode 0444)")
        for key in ("ROTATEDAK2026", "rotated-secret-key"):  # nor any part of a key
            assert not any(part in warning for part in (key, key[:4], key[-4:])), warning
    printed = repr(replica.events) + (tmp_path / "rotating.err").read_text()
    assert "rotated-secret-key" not in printed and SIM_SK not in printed


@pytest.mark.anyio
async def test_a_replica_paused_on_old_keys_resumes_as_soon_as_the_secret_catches_up(
    redis_prefix: str, tmp_path: Path
) -> None:
    """The usual order on a cluster: the old key is deleted in IAM first, and the kubelet
    brings the Secret's new files up to a minute later. Meanwhile the API refuses, the files
    have nothing new and the replica pauses, unready (30 s, doubling). When the kubelet swaps
    the files in, the pause ends there (``serve.credentials_changed``, cut short), not 30 s
    later; keys that fail too pause it again for twice as long, and the next swap ends that
    pause as well. No restart (liveness is green, Kubernetes would never give one), and no
    key in the new event, not even a part of one. (It used to wait the whole pause out.)"""
    secret = tmp_path / "secret"
    secret.mkdir()
    files = mount_secret(secret, ak=SIM_AK, sk=SIM_SK)
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=20)) as q:
        replica = await start_with_key_files(q, "late", files)
        q.sim.config = replace(q.sim.config, ak="ROTATEDAK2026", sk="rotated-secret-key")
        await q.enqueue(q.sim.job_ids())

        def said(name: str, n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return len(replica.named(name)) >= n

            return check

        await until(said("serve.paused", 1))
        mount_secret(secret, ak="WRONGAK2026", sk="wrong-secret-key")  # a pair IAM refuses too
        await until(said("serve.paused", 2))
        assert q.sim.deleted == set()
        mount_secret(secret, ak="ROTATEDAK2026", sk="rotated-secret-key")

        async def all_deleted() -> bool:
            return len(q.sim.deleted) == 20

        await until(all_deleted)
        await q.stop_all()
    assert replica.process.returncode == 0
    steps = [e for e in replica.events if e["event"] in (
        "serve.paused", "serve.credentials_changed", "job.deleted")]  # fmt: skip
    kinds = [e["event"] for e in steps]
    assert kinds[:4] == ["serve.paused", "serve.credentials_changed"] * 2, kinds
    assert set(kinds[4:]) == {"job.deleted"} and len(kinds) == 24
    paused, changed = replica.named("serve.paused"), replica.named("serve.credentials_changed")
    assert [e["resume_in_s"] for e in paused] == [30.0, 60.0]  # the doubling goes on
    assert [e["pause_s"] for e in changed] == [30.0, 60.0]
    assert all(e["waited_s"] < e["pause_s"] for e in changed)  # each pause cut short
    assert all(set(e["files"]) == {f"ak_file {files['ak']}", f"sk_file {files['sk']}"}
               for e in changed)  # fmt: skip
    keys = ("WRONGAK2026", "wrong-secret-key", "ROTATEDAK2026", "rotated-secret-key")
    for event in changed:
        text = repr(event)
        assert not any(key[:4] in text for key in keys), event  # not even a prefix
    printed = repr(replica.events) + (tmp_path / "late.err").read_text()
    assert "rotated-secret-key" not in printed and "wrong-secret-key" not in printed


@pytest.mark.anyio
async def test_a_pause_watch_sees_new_keys_not_a_touch_nor_the_same_keys_swapped_in(
    tmp_path: Path,
) -> None:
    """What ends a pause on refused keys (``FileCredentials.rotated``): files that now hold
    other keys than those refused, through the kubelet's swap of ``..data`` or rewritten in
    place. A file touched (its time moved, its content not) or the same keys swapped in
    under a new version directory end nothing; each change is told once; a file caught
    missing is warned about once, not at every look."""
    import os

    from structlog.testing import capture_logs

    from worker.api.credentials import FileCredentials

    secret = tmp_path / "secret"
    secret.mkdir()
    files = mount_secret(secret, ak="OLDAK", sk="old-sk")
    source = FileCredentials({"ak": "OLDAK", "sk": "old-sk", "security_token": None}, files)
    assert source.rotated() == ()  # nothing refused yet: nothing to wait for
    refused = await source.current()
    with capture_logs() as logs:
        assert not await source.refused(refused)  # nothing new: the replica pauses
        assert source.rotated() == ()
        later = os.stat(files["sk"]).st_mtime_ns + 5_000_000_000
        os.utime(files["sk"], ns=(later, later))  # touched
        assert source.rotated() == ()
        mount_secret(secret, ak="OLDAK", sk="old-sk")  # the same keys, a new version
        assert source.rotated() == ()
        mount_secret(secret, ak="OLDAK", sk="new-sk")
        assert source.rotated() == (f"sk_file {files['sk']}",)
        assert source.rotated() == ()  # told once
        assert (await source.current()).sk == "new-sk"  # the next attempt signs with them
        assert not await source.refused(await source.current())  # refused too: pause again
        version = files["ak"].resolve()
        version.unlink()  # caught half rotated
        for _ in range(3):
            assert source.rotated() == ()
        version.write_text("NEWAK")
        version.chmod(0o400)  # as the Secret's files are (others may not read it)
        assert source.rotated() == (f"ak_file {files['ak']}",)
    assert [e["event"] for e in logs] == [
        "credentials.reloaded", "credentials.reload_failed", "credentials.reloaded",
    ]  # fmt: skip
    assert "new-sk" not in repr(logs) and "old-sk" not in repr(logs)


@pytest.mark.anyio
async def test_a_pause_watch_sees_keys_rewritten_in_place_that_stat_cannot_see(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys of the same length rewritten in place within one tick of the file system's
    clock move no size nor time (an AK is always 20 characters): the pause's look reads the
    files too, so it ends at the rewrite instead of waiting out the pause (30 s, up to 10
    min). A half-written file is said once, not at every look; nothing of a key is said."""
    from structlog.testing import capture_logs

    from worker.api import credentials
    from worker.api.credentials import FileCredentials

    monkeypatch.setattr(credentials, "file_identity", lambda path: None)  # stat sees nothing
    ak, sk = tmp_path / "ak", tmp_path / "sk"
    ak.write_text("OLDAKOLDAKOLDAKOLDAK")
    sk.write_text("old-secret-key-0001\n")
    for path in (ak, sk):
        path.chmod(0o600)
    source = FileCredentials(
        {"ak": "OLDAKOLDAKOLDAKOLDAK", "sk": "old-secret-key-0001", "security_token": None},
        {"ak": ak, "sk": sk},
    )
    with capture_logs() as logs:
        assert not await source.refused(await source.current())  # nothing new: a pause
        assert source.rotated() == ()
        sk.write_text("old-secret-key-0001\n")  # the same key written again
        assert source.rotated() == ()
        ak.write_text("NEWAK-HALF-WRITTEN!!")  # not an access key yet
        for _ in range(3):
            assert source.rotated() == ()
        ak.write_text("NEWAKNEWAKNEWAKNEWAK")
        sk.write_text("new-secret-key-0002\n")
        assert source.rotated() == (f"ak_file {ak}", f"sk_file {sk}")
        assert source.rotated() == ()  # told once
        assert (await source.current()).sk == "new-secret-key-0002"
    assert [e["event"] for e in logs] == ["credentials.reload_failed", "credentials.reloaded"]
    said = repr(logs)
    for key in ("OLDAKOLDAKOLDAKOLDAK", "old-secret-key-0001", "NEWAKNEWAKNEWAKNEWAK",
                "new-secret-key-0002", "NEWAK-HALF-WRITTEN!!"):  # fmt: skip
        assert not any(part in said for part in (key, key[:4], key[-4:])), key


@pytest.mark.anyio
async def test_a_refused_call_reads_the_key_files_again_and_goes_once_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key file rewritten in place within one tick of the file system's clock looks
    unchanged to ``stat``: the API's 401 is what makes the source read it again, and the
    refused call (which did nothing on the server) goes once more with the new key. Refused
    keys with nothing new to read are an ``AuthError`` after one attempt, not a loop."""
    import aiohttp

    from worker.api import credentials
    from worker.api.client import ApiClient
    from worker.api.credentials import FileCredentials
    from worker.errors import AuthError

    # Within one tick neither time moves, and no test can put the status change time back
    # (``utime`` moves it): here ``stat`` sees nothing move at all.
    monkeypatch.setattr(credentials, "file_identity", lambda path: None)
    ak, sk = tmp_path / "ak", tmp_path / "sk"
    ak.write_text(SIM_AK)
    sk.write_text(SIM_SK + "\n")
    source = FileCredentials(
        {"ak": SIM_AK, "sk": SIM_SK, "security_token": None}, {"ak": ak, "sk": sk}
    )
    async with run_simulator(SimulatorConfig(jobs=3)) as sim, aiohttp.ClientSession() as http:
        ids = sim.job_ids()
        client = ApiClient(
            session=http, endpoint=sim.url, project_id=sim.config.project_id, credentials=source
        )
        await client.delete_jobs([ids[0]])
        rotated = "rotated-key-015"
        sim.config = replace(sim.config, sk=rotated)
        sk.write_text(rotated + "\n")
        await client.delete_jobs([ids[1]])
        assert sim.deleted == set(ids[:2])
        assert sim.stats.signature_failures == 1
        assert client.outcomes == {"ok": 2, "AuthError": 1}
        assert source.reloads == 1
        sim.config = replace(sim.config, sk="nobody-has-this")
        with pytest.raises(AuthError):
            await client.delete_jobs([ids[2]])
        assert sim.stats.signature_failures == 2  # one attempt: nothing new to try


@pytest.mark.anyio
@pytest.mark.parametrize("in_a_pod", [False, True])
async def test_run_in_auto_exits_69_on_a_metadata_outage_and_78_in_a_pod_without_asking_it(
    in_a_pod: bool, tmp_path: Path
) -> None:
    """No keys anywhere but the node's metadata service, which answers 503: on a VM that is
    an outage (69, the CronJob tries again), not a configuration error (78, which fails the
    Job); in a pod, auto never asks the node's agency at all, and says so (78)."""
    from aiohttp import web

    from tests.e2e import reaper, reaper_env, write_ids

    calls: list[str] = []

    async def outage(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(status=503, text="metadata down")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", outage)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with run_simulator(SimulatorConfig(jobs=3)) as sim:
            env = reaper_env(sim.url, REAPER_METADATA_URL=f"http://127.0.0.1:{port}",
                             HOME=str(tmp_path))  # fmt: skip
            del env["REAPER_AK"], env["REAPER_SK"]
            if in_a_pod:
                env["KUBERNETES_SERVICE_HOST"] = "10.96.0.1"
            ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
            done = await reaper(["run", "-i", str(ids), "--yes"], env)
            assert sim.deleted == set()
    finally:
        await runner.cleanup()
    if in_a_pod:
        assert done.code == 78, done.stderr + done.stdout
        assert "not used by auto inside a Kubernetes pod" in done.stdout
        assert calls == []
    else:
        assert done.code == 69, done.stderr + done.stdout
        assert "HTTP 503" in done.stdout
        assert calls
