"""A Redis that comes back without the queue (restarted with no persistence, flushed, failed
over to a replica that had not got the keys): the ids stream, its group, the position kept
for the group, the notes of ids sent and the outcomes are all gone. ``serve`` cannot bring
back the ids enqueued and not read; it must say so plainly, finish what it holds, and serve
what is enqueued from then on. A private ``redis-server``, restarted empty on its port; the
real ``serve`` in a subprocess; the simulator as the API.
"""

from __future__ import annotations

import signal
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.e2e import deletes_sent, serving, stopped, until
from tests.test_redis_auth import REDIS_SERVER, _free_port, _reaper, redis_server
from worker.simulator import FaultConfig, SimulatorConfig, run_simulator

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("clean_env"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server"),
]
STREAM = "devserver-reaper:ids"


@pytest.mark.anyio
async def test_a_redis_back_without_the_queue_is_said_plainly_and_new_ids_are_served(
    tmp_path: Path,
) -> None:
    """The group destroyed by hand, its position kept: made again there, and nothing lost
    (``serve.group_recreated`` alone). Then Redis restarted empty: the group and its kept
    position are both gone, which said only ``serve.group_recreated`` ('replays the whole
    stream'), a warning that read as routine while every id enqueued and not read was
    lost. Now ``serve.queue_lost`` (an error) says what is gone and that those ids must be
    enqueued again; ids enqueued after it are deleted, each with one outcome."""
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    errors = tmp_path / "serve.err"
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(run_simulator(SimulatorConfig(jobs=15)))
        jobs = sim.job_ids()
        first = await stack.enter_async_context(AsyncExitStack())
        (tmp_path / "1").mkdir()
        await first.enter_async_context(redis_server(tmp_path / "1", [], port=port))
        served = await stack.enter_async_context(serving(sim, url, errors))

        async def enqueue(ids: list[str]) -> None:
            listed = tmp_path / "ids.txt"
            listed.write_text("\n".join(ids) + "\n")
            code, printed = await _reaper("enqueue", "--input", str(listed), "--redis-url", url)
            assert code == 0, printed

        def gone(ids: list[str]) -> Any:
            async def check() -> bool:
                left = set(sim.job_ids())
                return not left.intersection(ids) or served.process.returncode is not None

            return check

        def said(name: str, count: int) -> Any:
            async def check() -> bool:
                return len(served.named(name)) >= count or served.process.returncode is not None

            return check

        admin = aioredis.Redis.from_url(url)
        await enqueue(jobs[:5])
        await until(gone(jobs[:5]))

        async def position_kept() -> bool:
            return bool(await admin.exists(STREAM + ":position"))

        await until(position_kept)
        await admin.xgroup_destroy(STREAM, "devserver-reaper")
        await until(said("serve.group_recreated", 1))
        await enqueue(jobs[5:10])
        await until(gone(jobs[5:10]))

        async def recorded() -> bool:  # their rows written and entries acked, in this Redis
            info: Any = await admin.xpending(STREAM, "devserver-reaper")
            return int(info["pending"]) == 0 and await admin.xlen(STREAM + ":outcomes") == 10

        await until(recorded)
        await admin.aclose()
        await first.aclose()  # Redis stops, and comes back with nothing
        (tmp_path / "2").mkdir()
        await stack.enter_async_context(redis_server(tmp_path / "2", [], port=port))
        await until(said("serve.group_recreated", 2))
        await enqueue(jobs[10:])
        await until(gone(jobs[10:]))
        assert served.process.returncode is None, errors.read_text()
        code = await stopped(served)
        admin = await stack.enter_async_context(aioredis.Redis.from_url(url))
        rows: Any = await admin.xrange(STREAM + ":outcomes")
    assert code == 0, errors.read_text()
    assert "Traceback" not in errors.read_text()
    (lost,) = served.named("serve.queue_lost")  # the restart, not the destroyed group
    assert lost["level"] == "error" and lost["stream"] == STREAM
    assert "enqueue them again" in lost["error"]
    recreated = served.named("serve.group_recreated")
    assert [e["replays"] for e in recreated] == ["pending and unread entries", "the whole stream"]
    said_rows = Counter((r[b"job_id"].decode(), r[b"outcome"].decode()) for _, r in rows)
    assert said_rows == Counter((job_id, "deleted") for job_id in jobs[10:])  # the new Redis's


@pytest.mark.anyio
async def test_entries_a_rewound_group_hands_a_second_replica_are_not_called_absent(
    tmp_path: Path,
) -> None:
    """The group's delivery state goes back while replica ``a`` has the entries' DELETE on
    the wire (``XGROUP SETID``, a Redis restored or failed over to a replica behind it):
    replica ``b`` reads them as new entries and sends them too. ``a``'s call deleted the
    jobs; ``b``'s met a 404 and wrote ``absent``, the only row (``a``'s rows were kept out:
    the entries were ``b``'s by then), a deletion of ours called absent. ``a``'s note of ids
    sent was there all along: now it is read for new entries too, and the jobs end
    ``deleted``, unconfirmed, one row each."""
    config = SimulatorConfig(jobs=4, faults=FaultConfig(latency_ms=1500, latency_jitter=False))
    async with AsyncExitStack() as stack:
        port = await stack.enter_async_context(redis_server(tmp_path, []))
        url = f"redis://127.0.0.1:{port}/0"
        sim = await stack.enter_async_context(run_simulator(config))
        admin = await stack.enter_async_context(aioredis.Redis.from_url(url))
        a = await stack.enter_async_context(serving(sim, url, tmp_path / "a.err", consumer="a"))
        jobs = sim.job_ids()
        for job_id in jobs:
            await admin.xadd(STREAM, {"id": job_id})
        await until(deletes_sent(sim, 1))  # a's call on the wire
        a.process.send_signal(signal.SIGSTOP)  # reading nothing more meanwhile
        try:
            await admin.xgroup_setid(STREAM, "devserver-reaper", "0")
            b = await stack.enter_async_context(serving(sim, url, tmp_path / "b.err", consumer="b"))
            await until(deletes_sent(sim, 2))  # b's call too
        finally:
            a.process.send_signal(signal.SIGCONT)

        async def settled() -> bool:
            info: Any = await admin.xpending(STREAM, "devserver-reaper")
            return int(info["pending"]) == 0 and not sim.job_ids()

        await until(settled)
        codes = [await stopped(a), await stopped(b)]
        rows: Any = await admin.xrange(STREAM + ":outcomes")
    assert codes == [0, 0]
    said = Counter((r[b"job_id"].decode(), r[b"outcome"].decode()) for _, r in rows)
    assert said == Counter((job_id, "deleted") for job_id in jobs)  # one row each, none absent
