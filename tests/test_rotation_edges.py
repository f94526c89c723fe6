"""Rotating keys the ways operators and tools really do it, against a real ``serve`` (or
``run``) process, the simulator on loopback and real Redis: what the kubelet's plain swap
(tests/test_rotation.py) does not show. Each test is one case found wrong by trying it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from tests.e2e import SIM_AK, SIM_SK, mount_secret, reaper, reaper_env, write_ids
from tests.test_rotation import start_with_key_files
from tests.test_serve_e2e import Queue, Replica, queue, until
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]


NEW_AK, NEW_SK = "ROTATEDAK2026", "rotated-secret-key"
THIRD_AK, THIRD_SK = "THIRDAK2027", "third-secret-key"


def said(replica: Replica, name: str, n: int = 1) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(replica.named(name)) >= n

    return check


def deleted(q: Queue, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(q.sim.deleted) >= n

    return check


@pytest.mark.anyio
async def test_key_files_written_with_a_byte_order_mark_sign_with_the_key_not_the_mark(
    tmp_path: Path,
) -> None:
    """Key files saved by Notepad or PowerShell's ``Set-Content -Encoding UTF8`` start with
    a byte-order mark. It was kept as part of the key: the access key was refused as "not
    an access key" (78) and a secret key signed wrong, the API's 401 blaming the keys (77).
    The mark is not part of a key, as it is not part of an input or a rules file."""
    async with run_simulator(SimulatorConfig(jobs=4)) as sim:
        ids = sim.job_ids()
        for n, name in enumerate(("ak", "sk")):
            ak, sk = tmp_path / f"ak{n}", tmp_path / f"sk{n}"
            ak.write_bytes(("\ufeff" if name == "ak" else "").encode() + SIM_AK.encode())
            sk.write_bytes(("\ufeff" if name == "sk" else "").encode() + SIM_SK.encode() + b"\r\n")
            for path in (ak, sk):
                path.chmod(0o600)
            env = reaper_env(sim.url, REAPER_AK_FILE=str(ak), REAPER_SK_FILE=str(sk))
            del env["REAPER_AK"], env["REAPER_SK"]
            source = write_ids(tmp_path / f"ids{n}.txt", ids[n * 2 : n * 2 + 2])
            done = await reaper(["run", "-i", str(source), "--yes"], env)
            assert done.code == 0, (name, done.stdout[-2000:], done.stderr[-2000:])
        assert sim.deleted == set(ids)
        assert sim.stats.signature_failures == 0


@pytest.mark.anyio
@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="root reads any file: setpriv is needed to drop that",
)
async def test_new_key_files_caught_unreadable_end_the_pause_once_they_are_made_readable(
    redis_prefix: str, tmp_path: Path
) -> None:
    """New keys swapped in with a mode nobody can read (a wrong ``defaultMode``, a tool's
    ``chmod``), then made readable with nothing else changed: ``chmod`` moves no size nor
    time, so the files looked as they did when their read failed and the pause was waited
    out (30 s, up to 10 min) before one more DELETE was signed with the refused keys. Now
    the pause ends at the ``chmod``, and no call goes with the old keys after it."""
    secret = tmp_path / "secret"
    secret.mkdir()
    files = mount_secret(secret, ak=SIM_AK, sk=SIM_SK)
    # As root the files would be read whatever their mode: serve runs without that power.
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=10)) as q:
        replica = await start_with_key_files(q, "unreadable", files, prefix)
        q.sim.config = replace(q.sim.config, ak=NEW_AK, sk=NEW_SK)
        await q.enqueue(q.sim.job_ids())
        await until(said(replica, "serve.paused"))
        version = secret / "..unreadable"  # the kubelet's swap, of files no one may read
        version.mkdir()
        for name, key in (("ak", NEW_AK), ("sk", NEW_SK)):
            (version / name).write_text(key + "\n")
            (version / name).chmod(0)
        (secret / "..data_tmp").symlink_to(version.name)
        (secret / "..data_tmp").replace(secret / "..data")
        await until(said(replica, "credentials.reload_failed"))
        for name in ("ak", "sk"):
            (version / name).chmod(0o400)
        await until(deleted(q, 10))
        await q.stop_all()
    assert replica.process.returncode == 0
    changed = replica.named("serve.credentials_changed")
    assert len(changed) == 1 and changed[0]["waited_s"] < changed[0]["pause_s"]
    assert q.sim.stats.signature_failures == 1  # the refusal that paused it, no other


@pytest.mark.anyio
async def test_a_refusal_after_the_rotated_keys_worked_pauses_30_s_not_twice_the_last_pause(
    redis_prefix: str, tmp_path: Path
) -> None:
    """The pause doubles while the keys stay refused; once new keys have worked, a later
    refusal (the next rotation, months on) is a new one and pauses 30 s again. It went on
    doubling for the life of the process: each rotation done in the usual order (IAM first)
    left every later pause twice as long, ten minutes after a few, with ``resume_in_s``
    saying so, and a 403 fixed in IAM (no file changes) was waited out that long."""
    secret = tmp_path / "secret"
    secret.mkdir()
    files = mount_secret(secret, ak=SIM_AK, sk=SIM_SK)
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=30)) as q:
        replica = await start_with_key_files(q, "again", files)
        ids = q.sim.job_ids()
        for n, (ak, sk) in enumerate(((NEW_AK, NEW_SK), (THIRD_AK, THIRD_SK)), start=1):
            q.sim.config = replace(q.sim.config, ak=ak, sk=sk)  # IAM first
            await q.enqueue(ids[(n - 1) * 10 : n * 10])
            await until(said(replica, "serve.paused", n))
            mount_secret(secret, ak=ak, sk=sk)  # then the Secret
            await until(deleted(q, n * 10))
        await q.stop_all()
    assert replica.process.returncode == 0
    paused = replica.named("serve.paused")
    assert [e["resume_in_s"] for e in paused] == [30.0, 30.0]
    assert len(replica.named("serve.credentials_changed")) == 2
