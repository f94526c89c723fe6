"""serve killed (or cut short by a second SIGTERM) with a DELETE on the wire: the jobs that
call removed end ``deleted`` (unconfirmed, ``answer_lost``) when their entries are delivered
again, never ``absent``; and the note that makes it so is written before the call or the
call waits (docs/serve.md, "A replica dies mid-call").

Real ``serve`` subprocesses, real Redis, the simulator in this process. The simulator
applies a DELETE as it arrives and holds its answer for a minute, so the test knows the call
is on the wire (the jobs are gone in the simulator) before it kills the replica: a
condition, not a sleep.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.conftest import REDIS_URL
from tests.e2e import serve_app, until
from tests.test_serve import RedisProxy
from tests.test_serve_e2e import Queue, Replica, queue
from worker.clock import MonotonicClock
from worker.outcomes.events import EventLog
from worker.service.consumer import StreamConsumer, sent_ids
from worker.service.inflight import InFlight
from worker.service.journal import ServeJournal
from worker.service.layout import StreamLayout, decode_entry
from worker.service.metrics import ServiceMetrics
from worker.service.outage import Outage
from worker.simulator import FaultConfig, SimulatorConfig
from worker.types import Outcome, Result

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]

HELD = FaultConfig(latency_ms=60_000, latency_jitter=False)
FLAGS = ("--batch-size", "5", "--concurrency", "2", "--rate", "100", "--reclaim-after", "1")
JOINED = ("--batch-size", "1", "--rate", "100", "--reclaim-after", "1")


async def _cut_mid_call(q: Queue, victim: Replica, how: str) -> None:
    """Wait until both DELETEs are applied in the simulator (their answers held), then end
    ``victim`` as ``how`` says."""

    async def on_the_wire() -> bool:
        return len(q.sim.deleted) == 10 and q.sim.stats.in_flight == 2

    await until(on_the_wire)
    if how == "kill":
        victim.process.kill()
    else:  # a second SIGTERM: no grace, the calls on the wire cancelled
        victim.process.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            return bool(victim.named("serve.draining"))

        await until(draining)
        victim.process.send_signal(signal.SIGTERM)
    with anyio.fail_after(15):
        await victim.process.wait()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("how", "heir"),
    [("kill", "other"), ("kill", "victim"), ("sigterm-twice", "other")],
    ids=["kill9-reclaimed", "kill9-restarted", "sigterm-twice-handed-over"],
)
async def test_jobs_a_replica_died_deleting_end_deleted_unconfirmed_never_absent(
    redis_prefix: str, tmp_path: Path, how: str, heir: str
) -> None:
    """The heir (another replica reclaiming, or the same name restarted) finds the jobs
    gone: each ends ``deleted`` with ``confirmed: false`` and ``reason: answer_lost``, none
    ``absent``; the simulator applied each DELETE once; nothing is left pending."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=10, faults=HELD)) as q:
        ids = q.sim.job_ids()
        await q.enqueue(ids)
        victim = await q.start("victim", *FLAGS)
        await _cut_mid_call(q, victim, how)
        q.sim.set_faults(FaultConfig())  # the heir's calls are answered at once
        successor = await q.start(heir, *FLAGS)

        async def settled() -> bool:
            return len(successor.named("job.deleted") + successor.named("job.absent")) >= 10

        await until(settled)

        async def nothing_pending() -> bool:
            return await q.pending() == 0

        await until(nothing_pending, 10)
        rows = await q.stream_rows(q.stream + ":outcomes")
        notes: list[Any] = await q.redis.keys(q.stream + ":sending:*")
        await q.stop_all()
    assert successor.named("job.absent") == []
    deleted = successor.named("job.deleted")
    assert sorted(e["job_id"] for e in deleted) == sorted(ids)
    assert {e["confirmed"] for e in deleted} == {False}
    assert {r["job_id"]: (r["outcome"], r["error_msg"]) for r in rows} == dict.fromkeys(
        ids, ("deleted", "answer_lost")
    )
    assert set(q.sim.delete_counts.values()) == {1} and set(q.sim.deleted) == set(ids)
    assert notes == []  # every entry acked, its note with it


@pytest.mark.anyio
async def test_the_note_of_ids_sent_waits_for_redis_and_answers_strike_off_only_non_deletions(
    redis_prefix: str,
) -> None:
    """Redis away when a DELETE is about to go out: the note is not skipped, the call waits
    (``sending`` returns only once Redis took it). An answer ``absent`` or ``failed``
    strikes its id off the note; a deletion stays noted until the entry is acked."""
    proxy = RedisProxy(REDIS_URL)
    layout = StreamLayout(redis_prefix + "ids", "reapers")
    clock = MonotonicClock()
    metrics = ServiceMetrics()
    async with anyio.create_task_group() as relay:
        await relay.start(proxy.serve)
        client = aioredis.Redis.from_url(proxy.url, socket_timeout=2)
        direct = aioredis.Redis.from_url(REDIS_URL)
        try:
            consumer = StreamConsumer(client, layout, "c1")
            events = EventLog()
            outage = Outage(events, clock, where="test")
            inflight = InFlight()
            journal = ServeJournal(events=events, metrics=metrics, inflight=inflight,
                                   consumer=consumer, clock=clock, outage=outage,
                                   max_deliveries=3)  # fmt: skip
            fields = {b"ids": b'["job-a", "job-b", "job-c"]'}
            await direct.xgroup_create(layout.stream, layout.group, "0", mkstream=True)
            await direct.xadd(layout.stream, dict[Any, Any](fields), id="1-1")
            await direct.xreadgroup(layout.group, "c1", {layout.stream: ">"})  # pending: c1's
            message = decode_entry("1-1", fields)
            inflight.add(message, 1)
            await proxy.go_away()
            noted = anyio.Event()

            async def send() -> None:
                await journal.sending(["job-a", "job-b", "job-c"], None)
                noted.set()

            relay.start_soon(send)
            with anyio.fail_after(10):
                while outage.failures < 2:
                    await anyio.sleep(0.02)
            assert not noted.is_set()
            assert await direct.get(layout.sending("1-1")) is None
            proxy.cut = False
            with anyio.fail_after(10):
                await noted.wait()
            assert sent_ids(await direct.get(layout.sending("1-1"))) == {"job-a", "job-b", "job-c"}
            assert await direct.ttl(layout.sending("1-1")) > 0
            await journal.finished([Result("job-a", Outcome.DELETED),
                                    Result("job-b", Outcome.ABSENT),
                                    Result("job-c", Outcome.FAILED)])  # fmt: skip
            assert sent_ids(await direct.get(layout.sending("1-1"))) == {"job-a"}
            assert journal.kept == 1  # job-c failed: the entry stays pending, to be tried again
        finally:
            await client.aclose()
            await direct.aclose()
        relay.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.parametrize("call", ["keep_errors", "write_outcomes"])
@pytest.mark.parametrize("errors", [{}, {"1-1": '{"ids": ["job-b"]}'}], ids=["none", "one"])
async def test_ids_handed_back_are_struck_off_their_note_with_or_without_an_error_to_keep(
    redis_prefix: str, call: str, errors: dict[str, str]
) -> None:
    """Last errors and strikes off the notes of ids sent, through ``keep_errors`` or
    ``write_outcomes`` with no outcome rows: one path, the same writes. ``keep_errors``
    returned before the strike when ``errors`` was empty (cd67226) while its copy in
    ``write_outcomes`` did not; now it is that call."""
    layout = StreamLayout(redis_prefix + "ids", "reapers")
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        consumer = StreamConsumer(client, layout, "c1")
        await client.set(layout.sending("1-1"), "+job-a\n+job-b\n", ex=60)
        if call == "keep_errors":
            await consumer.keep_errors(errors, {"1-1": ["job-a"]})
        else:
            await consumer.write_outcomes([], {"1-1": ["job-a"]}, errors)
        assert sent_ids(await client.get(layout.sending("1-1"))) == {"job-b"}
        kept: Any = await client.hgetall(layout.last_error)
        assert {k.decode(): v.decode() for k, v in kept.items()} == errors
        assert await client.exists(layout.outcomes) == 0
    finally:
        await client.delete(layout.sending("1-1"), layout.last_error)
        await client.aclose()


@pytest.mark.anyio
async def test_an_entry_naming_an_id_already_on_the_wire_is_noted_too_and_never_ends_it_absent(
    redis_prefix: str, tmp_path: Path
) -> None:
    """Entry A's DELETE of job x is on the wire when entry B, naming x too, is admitted (it
    waits on A's call, sending nothing): B is noted as having x sent. Killed there, the
    replica leaves A and B pending; the heir settles A first (x ``deleted``, unconfirmed),
    then B apart from it: its note says x was sent, so the 404 it meets is ``deleted``
    again, not ``absent`` (the note was A's alone, and B called x absent)."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=2, faults=HELD)) as q:
        x, y = q.sim.job_ids()
        added: Any = await q.redis.xadd(q.stream, {"id": x})
        first = added.decode()
        victim = await q.start("victim", "--batch-size", "1", "--concurrency", "2",
                               "--rate", "100", "--reclaim-after", "1")  # fmt: skip

        async def x_on_the_wire() -> bool:
            return x in q.sim.deleted and q.sim.stats.in_flight == 1

        await until(x_on_the_wire)
        later: Any = await q.redis.xadd(q.stream, {"id": x})
        await q.redis.xadd(q.stream, {"id": y})  # read after B: sent once B is admitted

        async def y_on_the_wire() -> bool:
            return y in q.sim.deleted and q.sim.stats.in_flight == 2

        await until(y_on_the_wire)
        victim.process.kill()
        await victim.process.wait()
        q.sim.set_faults(FaultConfig())
        # B held elsewhere (a replica still alive) until the heir has settled A, so that B
        # is delivered apart from it, as another replica's reclaim would.
        await q.redis.xclaim(q.stream, "reapers", "parked", 0, [later], justid=True)
        a_settled = anyio.Event()

        async def park_b() -> None:
            while not a_settled.is_set():
                await q.redis.xclaim(q.stream, "reapers", "parked", 0, [later], justid=True)
                with anyio.move_on_after(0.2):
                    await a_settled.wait()

        q.group.start_soon(park_b)
        heir = await q.start("heir", "--batch-size", "1", "--rate", "100",
                             "--reclaim-after", "1")  # fmt: skip

        async def a_done() -> bool:
            rows = await q.stream_rows(q.stream + ":outcomes")
            return any(r["entry"] == first for r in rows)

        await until(a_done)
        a_settled.set()

        async def nothing_pending() -> bool:
            return await q.pending() == 0 and len(heir.named("job.deleted")
                                                  + heir.named("job.absent")) >= 3  # fmt: skip

        await until(nothing_pending)
        rows = await q.stream_rows(q.stream + ":outcomes")
        await q.stop_all()
    assert heir.named("job.absent") == []
    assert sorted((r["job_id"], r["outcome"], r["error_msg"]) for r in rows) == sorted(
        [(x, "deleted", "answer_lost"), (x, "deleted", "answer_lost"),
         (y, "deleted", "answer_lost")]
    )  # fmt: skip
    assert q.sim.delete_counts == {x: 1, y: 1}


@asynccontextmanager
async def held_answers(
    upstream: str, release: anyio.Event, refuse: int | None = None
) -> AsyncIterator[str]:
    """A proxy in front of the simulator at ``upstream`` that forwards each call at once
    (a DELETE is applied) and holds every DELETE's answer until ``release`` is set; with
    ``refuse``, a DELETE is then answered that status instead (the API's refusal)."""

    async def forward(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession(auto_decompress=False) as http, http.request(
            request.method, upstream + request.path_qs, data=await request.read(),
            headers={k: v for k, v in request.headers.items() if k.lower() != "content-length"},
        ) as answer:  # fmt: skip
            body = await answer.read()
            status, kind = answer.status, answer.headers.get("Content-Type")
        if request.method == "DELETE":
            await release.wait()
            if refuse is not None:
                said = {"error_code": "ModelArts.0503", "error_msg": "service unavailable"}
                return web.json_response(said, status=refuse)
        return web.Response(status=status, body=body, headers={"Content-Type": kind or ""})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    async with serve_app(app) as url:
        yield url


async def _start_via(q: Queue, url: str, name: str, *flags: str) -> Replica:
    """A ``serve`` of ``q``'s stream, consumer ``name``, calling the API at ``url``."""
    command = [sys.executable, "-m", "worker", "serve", "--endpoint", url,
               "--project-id", q.sim.config.project_id, "--ak", q.sim.config.ak,
               "--stream", q.stream, "--group", "reapers", "--consumer", name,
               "--redis-url", REDIS_URL, "--http-port", "0", "--log-format", "json",
               *flags]  # fmt: skip
    return await q.launch(name, command, {"REAPER_SK": q.sim.config.sk})


async def _b_joins_a_call(q: Queue, url: str, *flags: str, gone: bool = True) -> Replica:
    """x (``q``'s one job) gone by the DELETE c0 died with (with ``gone``; else that DELETE
    was not applied): B (1-1, c0's) names it and its note says so; A (2-1) names it too. c1
    (``serve`` via ``url``, ``flags``) sends x for A and, once that DELETE is out, takes B
    over (kept fresh under c0 until then): B joins A's call, and is noted so. Returns c1."""
    (x,) = q.sim.job_ids()
    if gone:
        q.sim.store.delete([x])  # by the DELETE c0 died with
    layout = StreamLayout(q.stream, "reapers")
    await q.redis.xgroup_create(q.stream, "reapers", "0", mkstream=True)
    await q.redis.xadd(q.stream, {"id": x}, id="1-1")
    await q.redis.xreadgroup("reapers", "c0", {q.stream: ">"})  # B: c0's, delivered once
    await q.redis.set(layout.sending("1-1"), f"+{x}\n", ex=600)
    await q.redis.xadd(q.stream, {"id": x}, id="2-1")
    a_on_the_wire = anyio.Event()

    async def park_b() -> None:  # B kept fresh under c0 until A's DELETE is out
        while not a_on_the_wire.is_set():
            await q.redis.xclaim(q.stream, "reapers", "c0", 0, ["1-1"], justid=True)
            with anyio.move_on_after(0.2):
                await a_on_the_wire.wait()

    q.group.start_soon(park_b)
    c1 = await _start_via(q, url, "c1", *flags)

    async def a_sent() -> bool:  # noted just before its DELETE goes out
        return x in sent_ids(await q.redis.get(layout.sending("2-1")))

    await until(a_sent)
    a_on_the_wire.set()

    async def b_joined() -> bool:  # taken by c1 and noted as joining A's call
        note: Any = await q.redis.get(layout.sending("1-1"))
        return note is not None and note.decode().count(f"+{x}\n") == 2

    await until(b_joined)
    return c1


async def _b_delivered_again(
    q: Queue, c1: Replica, name: str, flags: Sequence[str]
) -> tuple[frozenset[str], Replica, list[dict[str, str]]]:
    """Once c1 (signalled) has ended: B's (1-1) note of ids sent, then a replica ``name``
    (``flags``) that delivers the entries left pending again, and the outcome rows once
    none is pending."""
    with anyio.fail_after(30):
        await c1.process.wait()
    note = sent_ids(await q.redis.get(StreamLayout(q.stream, "reapers").sending("1-1")))
    again = await q.start(name, *flags)

    async def settled() -> bool:
        return await q.pending() == 0

    await until(settled)
    rows = await q.stream_rows(q.stream + ":outcomes")
    await q.stop_all()
    return note, again, rows


@asynccontextmanager
async def _joined_and_answered(q: Queue) -> AsyncIterator[Replica]:
    """``_b_joins_a_call`` through a proxy holding A's answer, which is then let through:
    yields c1 once both entries are settled (the proxy still up)."""
    release = anyio.Event()
    async with held_answers(q.sim.url, release) as url:
        c1 = await _b_joins_a_call(q, url, *JOINED)
        release.set()

        async def settled() -> bool:
            return await q.pending() == 0

        await until(settled)
        yield c1


def _b_ends_deleted(rows: list[dict[str, str]], x: str) -> None:
    """B (1-1) brought x as sent by the DELETE c0 died with: its one row is ``deleted``,
    unconfirmed, never ``absent``. A (2-1) named x after it was gone: joined with B its
    row is B's; delivered apart from B (the next replica may reclaim them one at a time),
    after B's outcome, it meets a 404 as any later entry does, ``absent``, its call having
    applied nothing. One row per entry either way."""
    by_entry = {entry: (r["job_id"], r["outcome"], r["error_msg"])
                for r in rows for entry in r["entry"].split(",")}  # fmt: skip
    assert sum(len(r["entry"].split(",")) for r in rows) == len(by_entry) == 2, rows
    assert by_entry["1-1"] == (x, "deleted", "answer_lost"), rows
    assert by_entry["2-1"] in {(x, "deleted", "answer_lost"), (x, "absent", "job not found")}


@pytest.mark.anyio
async def test_a_batch_stopped_before_it_was_sent_keeps_the_doubt_an_earlier_delivery_left(
    redis_prefix: str, tmp_path: Path
) -> None:
    """c1 died with a DELETE of x on the wire (x gone, its entry's note says so). Restarted,
    it reads its entries again, y's first: y's DELETE holds the one dispatcher and x's
    batch waits behind it. c1 is stopped; y's answer comes, and x's batch, taken up only
    now, is handed back unsent. It keeps x on the note: it struck x off, as an answer
    saying x was not gone by us would, so the next start called x ``absent``; now it finds
    x gone and says ``deleted``, unconfirmed."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=2)) as q:
        y, x = q.sim.job_ids()
        q.sim.store.delete([x])  # by the DELETE c1 died with
        layout = StreamLayout(q.stream, "reapers")
        await q.redis.xgroup_create(q.stream, "reapers", "0", mkstream=True)
        await q.redis.xadd(q.stream, {"id": y}, id="1-1")
        await q.redis.xadd(q.stream, {"id": x}, id="2-1")
        await q.redis.xreadgroup("reapers", "c1", {q.stream: ">"})  # c1's, delivered once
        await q.redis.set(layout.sending("2-1"), f"+{x}\n", ex=600)
        flags = ("--batch-size", "1", "--concurrency", "1", "--grace", "60", "--rate", "100")
        release = anyio.Event()
        async with held_answers(q.sim.url, release) as url:
            first = await _start_via(q, url, "c1", *flags)

            async def x_waits_behind_y() -> bool:  # both batches made, y's on the wire
                metrics = f"http://127.0.0.1:{first.port}/metrics"
                async with aiohttp.ClientSession() as http, http.get(metrics) as answer:
                    made = "devserver_reaper_batch_size_count 2.0" in await answer.text()
                return made and y in q.sim.deleted

            await until(x_waits_behind_y)
            first.process.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                return bool(first.named("serve.draining"))

            await until(draining)
            release.set()  # y answered: the dispatcher takes x's batch, the service stopping
            with anyio.fail_after(30):
                await first.process.wait()
        note = sent_ids(await q.redis.get(layout.sending("2-1")))
        second = await q.start("c1", *flags)

        async def settled() -> bool:
            ended = second.named("job.deleted") + second.named("job.absent")
            return len(ended) == 1 and await q.pending() == 0

        await until(settled)
        await q.stop_all()
    assert first.process.returncode == 0
    assert [e["job_id"] for e in first.named("job.deleted")] == [y]
    assert x in note
    assert second.named("job.absent") == []
    assert [(e["job_id"], e["confirmed"]) for e in second.named("job.deleted")] == [(x, False)]


@pytest.mark.anyio
async def test_an_entry_killed_between_its_batches_gets_no_second_outcome_for_ids_done(
    redis_prefix: str, tmp_path: Path
) -> None:
    """One entry of 40 ids, sent 5 at a time one call after another; the replica is killed
    (SIGKILL) once some batches' outcomes are written but the entry is not acknowledged.
    Restarted, it re-reads the entry: the ids whose outcome was written are not sent or
    written again (each id of the entry has exactly one outcome row). On the old code the
    whole entry was sent again and those ids got a second row (``deleted``, unconfirmed,
    or ``absent``, whichever the note said: the last one counts)."""
    config = SimulatorConfig(jobs=40, faults=FaultConfig(latency_ms=150, latency_jitter=False))
    async with queue(redis_prefix, tmp_path, config) as q:
        ids = q.sim.job_ids()
        await q.redis.xgroup_create(q.stream, "reapers", "0", mkstream=True)
        await q.redis.xadd(q.stream, {"ids": orjson.dumps(ids)}, id="1-1")
        flags = ("--batch-size", "5", "--concurrency", "1", "--rate", "100")
        first = await q.start("c1", *flags)

        async def some_outcomes_written() -> bool:
            return int(await q.redis.xlen(q.stream + ":outcomes")) >= 5

        await until(some_outcomes_written)
        first.process.kill()
        await first.process.wait()
        written = {r["job_id"] for r in await q.stream_rows(q.stream + ":outcomes")}
        assert await q.pending() == 1 and len(written) < len(ids)  # killed mid-entry
        second = await q.start("c1", *flags)

        async def settled() -> bool:
            return await q.pending() == 0

        await until(settled)
        await q.stop_all()
        rows = await q.stream_rows(q.stream + ":outcomes")
    by_id: dict[str, list[str]] = {}
    for row in rows:
        by_id.setdefault(row["job_id"], []).append(row["outcome"])
    assert {i: o for i, o in by_id.items() if len(o) != 1} == {}
    assert set(by_id) == set(ids) == set(q.sim.deleted)
    assert not {e["job_id"] for e in second.named("job.deleted")} & written
    assert second.named("job.absent") == []


class _LosesExecReply(RedisProxy):
    """A relay to the real Redis that, once armed, forwards one ``EXEC`` and closes the
    connection instead of relaying Redis's reply: the transaction is applied, its answer
    lost, as when Redis dies (or the network cuts) between the two."""

    def __init__(self) -> None:
        super().__init__(REDIS_URL)
        self.armed = False
        self.lost = 0

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        upstream = await anyio.connect_tcp(self._host, self._port)
        dropping = False

        async def requests() -> None:
            nonlocal dropping
            async for chunk in client:
                if self.armed and b"EXEC" in chunk:
                    self.armed, dropping = False, True
                await upstream.send(chunk)

        async def replies() -> None:
            said = b""
            async for chunk in upstream:
                if not dropping:
                    await client.send(chunk)
                    continue
                said += chunk  # the transaction's replies: once EXEC's array came, cut
                if said.startswith(b"*") or b"\r\n*" in said:
                    self.lost += 1
                    break

        async with client, upstream, anyio.create_task_group() as group:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                                     anyio.ClosedResourceError, OSError):  # fmt: skip
                group.start_soon(requests)
                await replies()
            group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_outcome_rows_whose_transaction_reply_was_lost_are_not_written_twice(
    redis_prefix: str,
) -> None:
    """Redis applies the transaction writing outcome rows but its reply never arrives (the
    relay closes the connection): the write is tried again once Redis answers, and finds it
    was applied. On the old code the retry wrote every row a second time (in a chaos run
    with Redis killed 7 times under 3 replicas, 30 (entry, id) pairs had two rows)."""
    layout = StreamLayout(redis_prefix + "ids", "reapers")
    relay = _LosesExecReply()
    direct = aioredis.Redis.from_url(REDIS_URL)
    async with anyio.create_task_group() as group:
        await group.start(relay.serve)
        client = aioredis.Redis.from_url(relay.url)
        try:
            consumer = StreamConsumer(client, layout, "c1")
            outage = Outage(EventLog(), MonotonicClock(), where="test")
            rows = [{"job_id": f"job-{i}", "outcome": "deleted", "batch_id": "b1",
                     "entry": "1-1"} for i in range(3)]  # fmt: skip
            relay.armed = True
            await outage.persist(lambda: consumer.write_outcomes(rows), what="outcomes")
            assert relay.lost == 1 and outage.failures >= 1  # the reply was lost, retried
            written: Any = await direct.xrange(layout.outcomes)
            assert [f[b"job_id"].decode() for _, f in written] == ["job-0", "job-1", "job-2"]
            later = [{"job_id": "job-9", "outcome": "absent", "batch_id": "b2", "entry": "2-1"}]
            await consumer.write_outcomes(later)  # deletes the key the first one left
            left = [k async for k in direct.scan_iter(layout.stream + ":written:*")]
            assert len(left) == 1
        finally:
            await client.aclose()
            await direct.aclose()
        group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_entry_joining_an_id_on_the_wire_keeps_its_doubt_for_the_answer(
    redis_prefix: str, tmp_path: Path
) -> None:
    """B (1-1) names x; c0 died with a DELETE of x on the wire (x gone, B's note says so).
    A (2-1), naming x too, is read by c1, whose DELETE of x is on the wire (its answer
    held) when c1 takes B over: B joins A's call and sends nothing. The call finds x gone.
    B's doubt was attached only to a batch cut for it, and none is: x ended ``absent``
    (for A and B), though our fleet deleted it; it ends ``deleted``, unconfirmed."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=1)) as q:
        (x,) = q.sim.job_ids()
        async with _joined_and_answered(q) as c1:
            rows = await q.stream_rows(q.stream + ":outcomes")
            await q.stop_all()
    assert c1.named("job.absent") == []
    assert [(e["job_id"], e["confirmed"]) for e in c1.named("job.deleted")] == [(x, False)]
    assert [(r["job_id"], r["outcome"], r["error_msg"], r["entry"]) for r in rows] == [
        (x, "deleted", "answer_lost", "2-1,1-1")
    ]


@asynccontextmanager
async def _b_joins_a_refused_call(
    redis_prefix: str, tmp_path: Path, status: int, *extra: str
) -> AsyncIterator[tuple[Queue, Replica, StreamLayout, str]]:
    """``_b_joins_a_call`` (c1 started with ``JOINED`` and ``extra``) through a proxy that
    answers A's DELETE, applied, ``status`` once let go: yields the queue, c1, the stream's
    layout and x (its one job), the call's answer released."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=1)) as q:
        (x,) = q.sim.job_ids()
        release = anyio.Event()
        async with held_answers(q.sim.url, release, refuse=status) as url:
            c1 = await _b_joins_a_call(q, url, *JOINED, *extra)
            release.set()
            yield q, c1, StreamLayout(q.stream, "reapers"), x


@pytest.mark.anyio
async def test_an_answer_refusing_a_joined_call_keeps_the_doubt_the_joining_entry_brought(
    redis_prefix: str, tmp_path: Path
) -> None:
    """B (1-1) names x; c0 died with a DELETE of x on the wire (x gone, B's note says so).
    c1's DELETE of x for A (2-1) is on the wire when c1 takes B over: B joins it. The call
    is answered 503 (one attempt allowed): A's batch is handed back, x struck off A's note
    as not gone by that call, not off B's, which names it for c0's DELETE: B's next
    delivery ends x ``deleted``, unconfirmed, never ``absent``."""
    refused = _b_joins_a_refused_call(redis_prefix, tmp_path, 503, "--max-attempts", "1")
    async with refused as (q, c1, layout, x):

        async def handed_back() -> bool:  # both entries keep why, left pending
            return len(await q.redis.hkeys(layout.last_error)) == 2

        await until(handed_back)
        c1.process.send_signal(signal.SIGTERM)
        note, again, rows = await _b_delivered_again(q, c1, "c1", JOINED)
    assert c1.named("serve.api_unavailable") != []
    assert x in note
    assert [(e["job_id"], e["confirmed"]) for e in again.named("job.deleted")] == [(x, False)]
    _b_ends_deleted(rows, x)


@pytest.mark.anyio
async def test_a_429_to_a_joined_call_keeps_the_doubt_the_joining_entry_brought_past_a_kill(
    redis_prefix: str, tmp_path: Path
) -> None:
    """B (1-1) names x; c0 died with a DELETE of x on the wire (x gone, B's note says so).
    c1's DELETE of x for A (2-1) is on the wire when c1 takes B over: B joins it. The call
    is answered 429: x is struck off A's note (that call applied nothing), not off B's,
    which names it for c0's DELETE. c1 killed as it sleeps the 429 out, B's next delivery
    ends x ``deleted``, unconfirmed, never ``absent`` (a deletion of ours)."""
    async with _b_joins_a_refused_call(redis_prefix, tmp_path, 429) as (q, c1, layout, x):

        async def struck() -> bool:  # A's strike, written with any of B's
            return x not in sent_ids(await q.redis.get(layout.sending("2-1")))

        await until(struck)
        c1.process.kill()
        note, again, rows = await _b_delivered_again(q, c1, "c2", JOINED)
    _b_ends_deleted(rows, x)
    assert [(e["job_id"], e["confirmed"]) for e in again.named("job.deleted")] == [(x, False)]
    assert x in note


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["kill9", "api-unavailable"])
async def test_an_id_rejected_at_admission_gets_one_row_however_often_its_entry_is_delivered(
    redis_prefix: str, tmp_path: Path, how: str
) -> None:
    """One entry naming x and an invalid id: the rejection's row is written when the entry
    is admitted, x is sent. The entry is then delivered again before it is acknowledged:
    its replica killed with x on the wire (``kill9``), or x's call refused 503 through its
    one attempt, the entry left pending and reclaimed (``api-unavailable``). The second
    delivery wrote the rejection's row again: its entry had no note of it (a note was only
    ever added to, never made, by the write of rows) and no id done besides."""
    faults = HELD if how == "kill9" else FaultConfig(unavailable=1.0)
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=1, faults=faults)) as q:
        (x,) = q.sim.job_ids()
        await q.redis.xadd(q.stream, {"ids": orjson.dumps(["bad id!", x])})
        flags = ("--batch-size", "1", "--rate", "100", "--reclaim-after", "1")
        first = await q.start("c1", *flags, "--max-attempts", "1")

        async def rejected_and_sent() -> bool:
            rows = await q.stream_rows(q.stream + ":outcomes")
            return bool(rows) and q.sim.stats.delete_calls >= 1

        await until(rejected_and_sent)
        if how == "kill9":
            first.process.kill()
            await first.process.wait()
            q.sim.set_faults(FaultConfig())
            heir = await q.start("c1", *flags)
        else:

            async def kept() -> bool:
                return bool(first.named("serve.api_unavailable"))

            await until(kept)
            q.sim.set_faults(FaultConfig())  # its reclaim, a second later, sends x again
            heir = first

        async def settled() -> bool:
            return await q.pending() == 0

        await until(settled, 60)
        rows = await q.stream_rows(q.stream + ":outcomes")
        notes: list[Any] = await q.redis.keys(q.stream + ":sending:*")
        await q.stop_all()
    assert sorted((r["job_id"], r["outcome"]) for r in rows) == sorted(
        [("bad id!", "rejected"), (x, "deleted")]
    )
    assert len(heir.named("job.deleted")) == 1
    assert notes == []


@pytest.mark.anyio
async def test_a_doubt_joined_and_answered_is_not_carried_to_a_later_entry_of_the_id(
    redis_prefix: str, tmp_path: Path
) -> None:
    """B's doubt of x (c0 died with a DELETE of x on the wire) is answered when A's call,
    which B joined, finds x gone: ``deleted``, unconfirmed, for both. A fresh entry C
    naming x comes later: nothing any delivery of C sent, so the 404 it meets is
    ``absent``, as it would be in a replica that had not met B. The service kept B's doubt
    in a set of its own for the rest of the round (no batch of B's ever took it) and
    pinned it on C's batch: C ended ``deleted``, unconfirmed, ``answer_lost``."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=1)) as q:
        (x,) = q.sim.job_ids()
        async with _joined_and_answered(q) as c1:
            added: Any = await q.redis.xadd(q.stream, {"id": x})
            fresh = added.decode()

            async def fresh_settled() -> bool:
                return (
                    await q.pending() == 0 and len(await q.stream_rows(q.stream + ":outcomes")) == 2
                )

            await until(fresh_settled)
            rows = await q.stream_rows(q.stream + ":outcomes")
            await q.stop_all()
    assert [(e["job_id"], e["confirmed"]) for e in c1.named("job.deleted")] == [(x, False)]
    assert [e["job_id"] for e in c1.named("job.absent")] == [x]
    assert [(r["job_id"], r["outcome"], r["entry"]) for r in rows] == [
        (x, "deleted", "2-1,1-1"), (x, "absent", fresh)
    ]  # fmt: skip


@asynccontextmanager
async def unavailable_after(upstream: str, release: anyio.Event) -> AsyncIterator[str]:
    """A proxy in front of the simulator at ``upstream``: every DELETE waits for
    ``release`` and is then answered 503 with ``Retry-After: 2``, never applied; the other
    calls (the guard's show calls) are forwarded."""

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "DELETE":
            await release.wait()
            said = {"error_code": "ModelArts.0503", "error_msg": "service unavailable"}
            return web.json_response(said, status=503, headers={"Retry-After": "2"})
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as http,
            http.request(
                request.method, upstream + request.path_qs, data=body, headers=headers
            ) as answer,
        ):
            said_back, kind, status = (
                await answer.read(),
                answer.headers.get("Content-Type"),
                answer.status,
            )
        return web.Response(status=status, body=said_back, headers={"Content-Type": kind or ""})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    async with serve_app(app) as url:
        yield url


@pytest.mark.anyio
async def test_a_joined_call_whose_id_ends_skipped_leaves_one_true_row_for_both_entries(
    redis_prefix: str, tmp_path: Path
) -> None:
    """B (1-1) names x, and its note says c0 sent x before dying (not applied: x still
    exists). c1 checks x (a protection makes it read each job before its DELETE), sends it
    for A (2-1), and B joins that call. The API answers 503 with a Retry-After longer than
    a check holds (``--recheck-max-age 1``): each retry finds its check expired, x is read
    again (still there) and sent again, until the guard gives up on it: ``skipped``
    (``stale_check``). The answer strikes x off B's note (``finished`` strikes any outcome
    but ``deleted``), which is what B's doubt asked: x was read, there, after c0's call. It
    is one row naming A and B, written in the transaction that marks x done on B's note
    (``=x``), so no delivery of B sends x again or calls it ``absent``."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=1)) as q:
        (x,) = q.sim.job_ids()
        release = anyio.Event()
        async with unavailable_after(q.sim.url, release) as url:
            c1 = await _b_joins_a_call(q, url, "--batch-size", "1", "--rate", "100",
                                       "--reclaim-after", "1", "--protected-types", "NOPE",
                                       "--recheck-max-age", "1", gone=False)  # fmt: skip
            release.set()

            async def settled() -> bool:
                return await q.pending() == 0

            await until(settled, 90)
            rows = await q.stream_rows(q.stream + ":outcomes")
            notes: list[Any] = await q.redis.keys(q.stream + ":sending:*")
            await q.stop_all()
    assert [(e["job_id"], e["reason"]) for e in c1.named("job.skipped")] == [(x, "stale_check")]
    assert c1.named("job.absent") == [] and c1.named("job.deleted") == []
    assert [(r["job_id"], r["outcome"], r["entry"]) for r in rows] == [(x, "skipped", "2-1,1-1")]
    assert x not in q.sim.deleted and notes == []


@pytest.mark.anyio
async def test_an_entry_is_acked_only_after_every_row_naming_it_is_written(
    redis_prefix: str,
) -> None:
    """Two ids of one entry answered by two dispatchers at once, the first one's write slow
    to reach Redis (a connection still being made): the second's write and the entry's ack
    went out past it, so Redis took the ack first and the first row, checked against an
    entry no longer pending, was dropped: an id acked with no outcome (met by serve_attack's
    give-up looks, one run in about eight). The ack now waits for every write naming it."""
    layout = StreamLayout(redis_prefix + "ids", "reapers")
    client = aioredis.Redis.from_url(REDIS_URL)
    release, b_written = anyio.Event(), anyio.Event()
    said: list[str] = []

    class SlowFirst(StreamConsumer):
        async def write_outcomes(self, rows: Any, unmark: Any = None, errors: Any = None) -> Any:
            first = any(r["job_id"] == "job-a" for r in rows)
            if first:
                await release.wait()
            lost = await super().write_outcomes(rows, unmark, errors)
            said.append("a written" if first else "b written")
            if not first:
                b_written.set()
            return lost

        async def finish(self, finished: Any) -> Any:
            said.append("ack")
            return await super().finish(finished)

    try:
        consumer = SlowFirst(client, layout, "c1")
        events, clock, inflight = EventLog(), MonotonicClock(), InFlight()
        journal = ServeJournal(events=events, metrics=ServiceMetrics(), inflight=inflight,
                               consumer=consumer, clock=clock,
                               outage=Outage(events, clock, where="test"),
                               max_deliveries=3)  # fmt: skip
        fields = {b"ids": b'["job-a", "job-b"]'}
        await client.xgroup_create(layout.stream, layout.group, "0", mkstream=True)
        await client.xadd(layout.stream, dict[Any, Any](fields), id="1-1")
        await client.xreadgroup(layout.group, "c1", {layout.stream: ">"})
        inflight.add(decode_entry("1-1", fields), 1)
        async with anyio.create_task_group() as group:
            group.start_soon(journal.finished, [Result("job-a", Outcome.DELETED)])
            group.start_soon(journal.finished, [Result("job-b", Outcome.DELETED)])
            with anyio.fail_after(10):
                await b_written.wait()  # the old code had called its ack by then
            release.set()
        rows: Any = await client.xrange(layout.outcomes)
        pending: Any = await client.xpending(layout.stream, layout.group)
    finally:
        await client.aclose()
    assert said == ["b written", "a written", "ack"]
    assert sorted(row[b"job_id"] for _, row in rows) == [b"job-a", b"job-b"]
    assert int(pending["pending"]) == 0
