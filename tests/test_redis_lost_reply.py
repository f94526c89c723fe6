"""A Redis that stalls (frozen, swapping, a long fork, ``DEBUG SLEEP``) past the client's
timeout, or a connection cut after a command went out: Redis may still apply the command
and only the reply is lost. For a read of the stream that is a delivery serve never sees:
the entries are pending under its name, and nothing of it holds them. A private
``redis-server`` per test (``DEBUG`` enabled on it to stall it on cue), the real ``serve``
in a subprocess, the simulator as the API.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import redis.asyncio as aioredis

from tests.e2e import Served, deletes_sent, redis_errors_of, serving, stopped, until
from tests.test_redis_auth import REDIS_SERVER, redis_server
from worker.service.consumer import _ACK, _BURY
from worker.simulator import FaultConfig, SimulatorConfig, run_simulator
from worker.types import ANSWER_LOST

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("clean_env"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server"),
]
STREAM = "devserver-reaper:ids"
REDIS_TIMEOUT = ("--redis-timeout", "2")
"""serve's Redis timeout shortened to its 1 s block and 2 s: a stall outlasting the 11 s of
the default held the test 15 s."""
STALL_S = 4.5
"""Longer than serve's Redis timeout (its 1 s block and the 2 s above): its calls give up."""


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
        serving(
            sim,
            f"redis://127.0.0.1:{port}/0",
            errors,
            "--reclaim-after",
            "60",
            *REDIS_TIMEOUT,
        ) as served,
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


class _CutAfter:
    """A TCP relay to the Redis on ``port`` that, the first time a command naming ``sha``
    (a script's) goes through, lets Redis run it and cuts the connection before its reply
    comes back: a command applied whose answer was lost."""

    def __init__(self, port: int, sha: str) -> None:
        self._port = port
        self._sha = sha.encode()
        self.cut = 0

    async def serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        await listener.serve(self._relay)

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        server = await anyio.connect_tcp("127.0.0.1", self._port)
        drop = anyio.Event()

        async def up() -> None:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                                     anyio.ClosedResourceError):  # fmt: skip
                async for chunk in client:
                    if not self.cut and self._sha in chunk:
                        self.cut += 1
                        drop.set()
                    await server.send(chunk)

        async def down() -> None:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                                     anyio.ClosedResourceError):  # fmt: skip
                async for chunk in server:
                    if drop.is_set():  # the reply of the command: gone, and the line cut
                        await client.aclose()
                        await server.aclose()
                        return
                    await client.send(chunk)

        async with client, server, anyio.create_task_group() as group:
            group.start_soon(up)
            await down()
            group.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.parametrize("script", [_ACK, _BURY], ids=["ack", "dead-letter"])
async def test_an_ack_applied_whose_answer_was_lost_is_not_said_taken_over(
    tmp_path: Path, script: str
) -> None:
    """The connection cut after Redis acknowledged an entry (or dead-lettered one naming an
    invalid id), before the reply came: it was tried again, found the entry acknowledged
    since it was delivered, and took it for another replica's (``serve.entry_taken_over``:
    'left to the replica that took it over', of an entry no other replica ever held),
    neither counted acknowledged nor said dead-lettered. Now an entry found acknowledged
    after its own try's reply was lost is counted acknowledged, nothing said of a taker."""
    errors = tmp_path / "serve.err"
    sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
    async with (
        redis_server(tmp_path, []) as port,
        run_simulator(SimulatorConfig(jobs=3)) as sim,
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as relays,
    ):
        relay = _CutAfter(port, sha)
        relays.start_soon(relay.serve, listener)
        relayed = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
        via = f"redis://127.0.0.1:{relayed}/0"
        async with (
            serving(sim, via, errors, "--batch-size", "1") as served,
            aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0") as admin,
        ):
            jobs = sim.job_ids()
            assert await admin.script_load(script) == sha  # run at once: no NOSCRIPT to cut
            for job_id in jobs:
                await admin.xadd(STREAM, {"id": job_id})
            await admin.xadd(STREAM, {"id": "not an id"})  # dead-lettered, its row rejected

            async def settled() -> bool:
                info: Any = await admin.xpending(STREAM, "devserver-reaper")
                done = not sim.job_ids() and int(info["pending"]) == 0
                # and the invalid entry's settling said (found acknowledged by its first
                # try, it may still be trying again: a stop would cut that short)
                said = served.named("serve.dead_lettered") or served.named("serve.entry_taken_over")
                return (done and bool(said)) or served.process.returncode is not None

            await until(settled)
            assert served.process.returncode is None, errors.read_text()
            code = await stopped(served)
            rows: Any = await admin.xrange(STREAM + ":outcomes")
            dead = await admin.xlen(STREAM + ":dead")
        relays.cancel_scope.cancel()
    assert code == 0, errors.read_text()
    assert relay.cut == 1  # a reply was lost
    assert "Traceback" not in errors.read_text()
    assert served.named("serve.redis_unreachable")[0]["operation"] == "ack"  # settling
    assert served.named("serve.entry_taken_over") == []
    assert len(served.named("serve.dead_lettered")) == dead == 1
    (summary,) = served.named("serve.stopped")
    assert summary["acked"] == len(jobs) + 1
    said = Counter((r[b"job_id"].decode(), r[b"outcome"].decode()) for _, r in rows)
    assert said == Counter([*((job_id, "deleted") for job_id in jobs), ("not an id", "rejected")])


@pytest.mark.anyio
async def test_a_password_changed_on_redis_mid_run_is_said_as_such_and_nothing_sent(
    tmp_path: Path,
) -> None:
    """The Redis password rotated on the server (and the connections dropped) while serve
    runs: every call after is refused (``WRONGPASS``). It said ``serve.redis_unreachable``
    (``ConnectionError``) and then nothing, while Redis answered all along: the operator
    went looking for a Redis that was up. Now ``serve.redis_refused`` says Redis refuses
    the user or password, once; no DELETE goes out meanwhile, and neither password shows."""
    old, new = "old-pw-CANARY-31", "new-pw-CANARY-47"
    errors = tmp_path / "serve.err"
    async with (
        redis_server(tmp_path, [f"requirepass {old}"]) as port,
        run_simulator(SimulatorConfig(jobs=40)) as sim,
        serving(
            sim, f"redis://:{old}@127.0.0.1:{port}/0", errors, "--rate", "4", "--batch-size", "1"
        ) as served,  # fmt: skip
        aioredis.Redis.from_url(f"redis://:{old}@127.0.0.1:{port}/0") as admin,
    ):
        for job_id in sim.job_ids():
            await admin.xadd(STREAM, {"id": job_id})
        await until(deletes_sent(sim, 2))
        await admin.config_set("requirepass", new)
        await admin.client_kill_filter(_type="normal", skipme=True)

        async def retried() -> bool:  # the calls refused again, and again
            return await _redis_errors(served) >= 5 or served.process.returncode is not None

        await until(retried)
        calls = sim.stats.delete_calls
        await until(partial(_more_redis_errors, served, await _redis_errors(served) + 3))
        sent_refused = sim.stats.delete_calls - calls
        code = await stopped(served)
    printed = errors.read_text() + str(served.events)
    assert code == 0, errors.read_text()
    assert "Traceback" not in printed
    assert old not in printed and new not in printed
    (said,) = served.named("serve.redis_refused")
    assert "password" in said["error"] and said["level"] == "error"
    assert sent_refused == 0


async def _redis_errors(served: Served) -> float:
    return await redis_errors_of(served.port)


async def _more_redis_errors(served: Served, than: float) -> bool:
    return await _redis_errors(served) >= than or served.process.returncode is not None


@pytest.mark.anyio
async def test_outcomes_redis_never_took_before_a_stop_are_counted_left_pending(
    tmp_path: Path,
) -> None:
    """SIGTERM while Redis stalls, the DELETE answered: the outcome rows wait for Redis
    until the drain's deadline (``--grace`` + 5 s) and are given up, their entries left
    pending. ``serve.stopped`` said ``left_pending: 0`` and nothing said the rows were not
    written (the log had said the jobs ``deleted``). Now ``serve.outcomes_unwritten`` says
    so and ``left_pending`` counts them; the next replica ends them ``deleted``,
    unconfirmed (its note of ids sent), one row each."""
    errors = tmp_path / "serve.err"
    # The DELETE is answered 1 s after it went out, within the 2 s of grace; the drain's
    # deadline is 2 + 5 s after the SIGTERM, and Redis sleeps 12 s from then: past it with
    # 5 s to spare (a longer stall or grace only waits longer).
    config = SimulatorConfig(jobs=3, faults=FaultConfig(latency_ms=1000, latency_jitter=False))
    async with (
        redis_server(tmp_path, ["enable-debug-command local"]) as port,
        run_simulator(config) as sim,
        aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=60) as admin,
        anyio.create_task_group() as group,
    ):
        url = f"redis://127.0.0.1:{port}/0"
        jobs = sim.job_ids()
        async with serving(sim, url, errors, "--grace", "2") as served:
            for job_id in jobs:
                await admin.xadd(STREAM, {"id": job_id})
            await until(deletes_sent(sim, 1))
            group.start_soon(admin.execute_command, "DEBUG", "SLEEP", "12")
            served.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(60):
                code = await served.process.wait()
        async with serving(sim, url, tmp_path / "b.err", "--reclaim-after", "1",
                           consumer="b") as taker:  # fmt: skip

            async def settled() -> bool:
                info: Any = await admin.xpending(STREAM, "devserver-reaper")
                return int(info["pending"]) == 0

            await until(settled)
            assert await stopped(taker) == 0
        rows: Any = await admin.xrange(STREAM + ":outcomes")
    assert code == 0, errors.read_text()
    (unwritten,) = served.named("serve.outcomes_unwritten")
    assert unwritten["ids"] == len(jobs)
    (summary,) = served.named("serve.stopped")
    assert summary["left_pending"] == unwritten["entries"] == len(jobs)
    said = Counter((r[b"job_id"].decode(), r[b"error_msg"].decode()) for _, r in rows)
    assert said == Counter((job_id, ANSWER_LOST) for job_id in jobs)
