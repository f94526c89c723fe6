"""A rotated Secret reaches a running ``serve`` (issue 24, point 4): the real ``serve`` process
reads its keys from files mounted as the kubelet mounts a Secret; the simulator's keys and the
files change together, as an operator rotating the keys does; the replica keeps deleting
without a restart, and says which files it read again."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL
from tests.e2e import SIM_AK, SIM_SK, mount_secret
from tests.test_serve_e2e import GROUP, Queue, Replica, queue, until
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]


async def start_with_key_files(q: Queue, name: str, files: dict[str, Path]) -> Replica:
    command = [
        sys.executable, "-m", "worker", "serve",
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
        # The operator rotates: the API takes only the new keys, the Secret is updated.
        q.sim.config = replace(q.sim.config, ak="ROTATEDAK2026", sk="rotated-secret-key")
        mount_secret(secret, ak="ROTATEDAK2026", sk="rotated-secret-key")
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
    printed = repr(replica.events) + (tmp_path / "rotating.err").read_text()
    assert "rotated-secret-key" not in printed and SIM_SK not in printed


@pytest.mark.anyio
async def test_a_replica_paused_on_old_keys_resumes_when_the_secret_catches_up(
    redis_prefix: str, tmp_path: Path
) -> None:
    """The usual order on a cluster: the old key is deleted in IAM first, and the kubelet
    brings the Secret's new files up to a minute later. Meanwhile the API refuses, the files
    have nothing new and the replica pauses, unready; when the files change it must take
    them and go on, with no restart (liveness is green, Kubernetes would never give one)."""
    secret = tmp_path / "secret"
    secret.mkdir()
    files = mount_secret(secret, ak=SIM_AK, sk=SIM_SK)
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=20)) as q:
        replica = await start_with_key_files(q, "late", files)
        q.sim.config = replace(q.sim.config, ak="ROTATEDAK2026", sk="rotated-secret-key")
        await q.enqueue(q.sim.job_ids())

        async def paused() -> bool:
            return bool(replica.named("serve.paused"))

        await until(paused)
        assert q.sim.deleted == set()
        mount_secret(secret, ak="ROTATEDAK2026", sk="rotated-secret-key")

        async def all_deleted() -> bool:
            return len(q.sim.deleted) == 20

        await until(all_deleted, timeout=60)
        await q.stop_all()
    assert replica.process.returncode == 0
    assert replica.named("credentials.reloaded")


@pytest.mark.anyio
async def test_a_refused_call_reads_the_key_files_again_and_goes_once_more(
    tmp_path: Path,
) -> None:
    """A key file rewritten in place within one timestamp looks unchanged to ``stat``: the
    API's 401 is what makes the source read it again, and the refused call (which did
    nothing on the server) goes once more with the new key. Refused keys with nothing new
    to read are an ``AuthError`` after one attempt, not a loop."""
    import os

    import aiohttp

    from worker.api.client import ApiClient
    from worker.api.credentials import FileCredentials
    from worker.errors import AuthError

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
        stamp = os.stat(sk).st_mtime_ns
        rotated = "rotated-key-015"
        assert len(rotated) == len(SIM_SK)  # same size, same inode, same time: stat is blind
        sim.config = replace(sim.config, sk=rotated)
        sk.write_text(rotated + "\n")
        os.utime(sk, ns=(stamp, stamp))
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
