"""A Redis that stalls (frozen, swapping, a long fork, ``DEBUG SLEEP``) past the client's
timeout, or a connection cut after a command went out: Redis may still apply the command
and only the reply is lost. For a read of the stream that is a delivery serve never sees:
the entries are pending under its name, and nothing of it holds them. A private
``redis-server`` per test (``DEBUG`` enabled on it to stall it on cue), the real ``serve``
in a subprocess, the simulator as the API.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.e2e import serving, stopped, until
from tests.test_redis_auth import REDIS_SERVER, redis_server
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("clean_env"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server"),
]
STREAM = "devserver-reaper:ids"
STALL_S = 12.5
"""Longer than serve's Redis timeout (its 1 s block and a 10 s margin): its calls give up."""


def _reading(client: dict[str, Any]) -> bool:
    """A connection blocked in ``XREADGROUP``: serve waiting for new entries."""
    return bool(client.get("cmd") == "xreadgroup" and "b" in client.get("flags", ""))


async def _blocked_read(admin: aioredis.Redis) -> bool:
    return any(_reading(c) for c in await admin.client_list())


@pytest.mark.anyio
async def test_entries_a_read_delivered_unheard_are_read_again_not_left_to_the_reclaim(
    tmp_path: Path,
) -> None:
    """Ids enqueued as Redis stalls: the read serve had waiting is answered into its pending
    list after serve gave up on it (timeout). They lay there, unseen, until the reclaim
    took them ``--reclaim-after`` later (300 s by default) and counted them a second
    delivery. Now a read that failed for want of Redis is followed by a look at the
    replica's own pending entries (no delivery counted): they are deleted at once, none
    reclaimed."""
    errors = tmp_path / "serve.err"
    async with (
        redis_server(tmp_path, ["enable-debug-command local"]) as port,
        run_simulator(SimulatorConfig(jobs=10)) as sim,
        serving(sim, f"redis://127.0.0.1:{port}/0", errors, "--reclaim-after", "60") as served,
        aioredis.Redis.from_url(
            f"redis://127.0.0.1:{port}/0", socket_timeout=STALL_S + 30
        ) as admin,
    ):
        jobs = sim.job_ids()

        async def all_deleted() -> bool:
            return not sim.job_ids() or served.process.returncode is not None

        await until(partial(_blocked_read, admin))
        # The ids arrive as serve's read waits, then Redis stalls before it writes that
        # read's answer (and before any read sent meanwhile is answered).
        async with admin.pipeline(transaction=False) as pipe:
            pipe.client_list()
            for job_id in jobs:
                pipe.xadd(STREAM, {"id": job_id})
            pipe.execute_command("DEBUG", "SLEEP", str(STALL_S))
            clients, *_ = await pipe.execute()
        assert any(_reading(c) for c in clients)  # answered into serve's read
        await until(all_deleted, timeout=180)
        assert served.process.returncode is None, errors.read_text()
        code = await stopped(served)
        rows: Any = await admin.xrange(STREAM + ":outcomes")
    assert code == 0, errors.read_text()
    assert "Traceback" not in errors.read_text()
    (lost,) = served.named("serve.redis_unreachable")
    assert lost["operation"] == "read" and lost["error"] == "TimeoutError"  # the read unheard
    (summary,) = served.named("serve.stopped")
    assert summary["reclaimed"] == 0  # read again as its own, not left to the reclaim
    assert summary["acked"] == len(jobs)
    said = Counter((r[b"job_id"].decode(), r[b"outcome"].decode()) for _, r in rows)
    assert said == Counter((job_id, "deleted") for job_id in jobs)  # each once, deleted
