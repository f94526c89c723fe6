"""Rotating keys the ways operators and tools really do it, against a real ``serve`` (or
``run``) process, the simulator on loopback and real Redis: what the kubelet's plain swap
(tests/test_rotation.py) does not show. Each test is one case found wrong by trying it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import SIM_AK, SIM_SK, reaper, reaper_env, write_ids
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]


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
