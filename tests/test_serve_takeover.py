"""A replica frozen (SIGSTOP: a VM paused, a long stall) with batches waiting to be sent,
its entries taken over meanwhile by another replica that finishes and acknowledges them,
then woken (SIGCONT): it must not send those batches. The taker deleted the jobs; a DELETE
from the woken one finds them gone and would call them ``absent``, a job this fleet
deleted (docs/serve.md, "A replica that dies mid-call"; the invariant in docs/design.md).

Real ``serve`` subprocesses, real Redis, the simulator in this process.
"""

from __future__ import annotations

import signal
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
from tests.test_serve_e2e import GROUP, SEVERAL, queue
from tests.test_serve_sent import _start_via
from worker.service.consumer import StreamConsumer, sent_ids
from worker.service.layout import StreamLayout
from worker.simulator import FaultConfig, SimulatorConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]


@pytest.mark.anyio
@SEVERAL
async def test_a_replica_woken_after_its_entries_were_taken_over_sends_none_of_them(
    redis_prefix: str, tmp_path: Path
) -> None:
    """The frozen replica held entries whose DELETE had not gone out; the taker deleted
    their jobs and acknowledged them. Woken, the frozen one sends none of them again
    (each id sent once), and no id ends ``absent``; it says which it let go."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=40)) as q:
        ids = q.sim.job_ids()
        slow = await q.start("slow", "--rate", "2", "--burst", "1", "--batch-size", "1",
                             "--concurrency", "4", "--reclaim-after", "1")  # fmt: skip
        await q.enqueue(ids)

        async def holding() -> bool:  # some sent, more read and waiting for their turn
            return len(q.sim.deleted) >= 2 and await q.pending("slow") >= 4

        await until(holding)
        slow.process.send_signal(signal.SIGSTOP)
        try:
            held = await q.pending("slow")
            taker = await q.start("taker", "--rate", "50", "--batch-size", "5",
                                  "--reclaim-after", "1")  # fmt: skip

            async def all_done() -> bool:
                return len(q.sim.deleted) == len(ids) and await q.pending() == 0

            await until(all_done, 60)
        finally:
            slow.process.send_signal(signal.SIGCONT)

        async def woken() -> bool:  # its batches waiting for a token were let go, or sent
            return bool(slow.named("serve.taken_over") or slow.named("job.absent"))

        await until(woken, 60)
        await q.stop_all()
        rows = await q.stream_rows(q.stream + ":outcomes")
    assert held >= 3
    assert [r.process.returncode for r in q.replicas] == [0, 0]
    assert slow.named("job.absent") == [] and taker.named("job.absent") == []
    assert [r for r in rows if r["outcome"] != "deleted"] == []
    assert max(q.sim.sent_counts.values()) == 1
    assert set(q.sim.deleted) == set(ids)


async def _taken_over(client: aioredis.Redis, layout: StreamLayout) -> None:
    """Entries 1-1, 2-1 and 3-1 delivered to c1; 2-1 then taken over by c2, 3-1 acked."""
    await client.xgroup_create(layout.stream, layout.group, "0", mkstream=True)
    for entry in ("1-1", "2-1", "3-1"):
        await client.xadd(layout.stream, {"id": f"job-{entry}"}, id=entry)
    await client.xreadgroup(layout.group, "c1", {layout.stream: ">"})
    await client.xclaim(layout.stream, layout.group, "c2", 0, ["2-1"], justid=True)
    await client.xack(layout.stream, layout.group, "3-1")


@pytest.mark.anyio
async def test_the_note_before_a_delete_is_written_only_for_entries_still_ours(
    redis_prefix: str,
) -> None:
    """``mark_sending`` notes nothing, and names the entries, when one of them is pending
    under another consumer (taken over) or delivered and no longer pending (acknowledged
    by the taker); with all of them still ours it notes each. An entry the group never
    delivered (the stream or the group deleted and made again below it), or no group at
    all, is nobody else's: noted, and sent as before (the service makes the group again)."""
    layout = StreamLayout(redis_prefix + "ids", "reapers")
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await _taken_over(client, layout)
        mine = StreamConsumer(client, layout, "c1")
        lost = await mine.mark_sending({"1-1": ["job-1-1"], "2-1": ["job-2-1"]})
        assert lost == {"2-1"}
        assert await mine.mark_sending({"1-1": ["job-1-1"], "3-1": ["job-3-1"]}) == {"3-1"}
        assert await client.exists(*(layout.sending(e) for e in ("1-1", "2-1", "3-1"))) == 0
        assert await mine.mark_sending({"1-1": ["job-1-1"]}) == frozenset()
        assert sent_ids(await client.get(layout.sending("1-1"))) == {"job-1-1"}
        theirs = StreamConsumer(client, layout, "c2")
        assert await theirs.mark_sending({"2-1": ["job-2-1"]}) == frozenset()
        await client.xgroup_destroy(layout.stream, layout.group)
        assert await mine.mark_sending({"3-1": ["job-3-1"]}) == frozenset()  # no group
        await client.xgroup_create(layout.stream, layout.group, "2-1")  # made again below
        assert await mine.mark_sending({"3-1": ["job-3-1"]}) == frozenset()
        assert sent_ids(await client.get(layout.sending("3-1"))) == {"job-3-1"}
    finally:
        await client.aclose()


@pytest.mark.anyio
@SEVERAL
async def test_a_replica_woken_to_its_answer_does_not_ack_an_entry_its_taker_still_works_on(
    redis_prefix: str, tmp_path: Path
) -> None:
    """Frozen with its DELETE on the wire, the slow replica has its entry taken over; the
    taker's own DELETE of it is still on the wire when the slow one wakes and reads its
    answer. It writes its outcome but leaves the entry to the taker
    (``serve.entry_taken_over``): it used to acknowledge it, under the taker's feet, so an
    id failing there could never be tried again, and its last error and note went with it."""
    answered_soon = FaultConfig(latency_ms=3000, latency_jitter=False)
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=1, faults=answered_soon)) as q:
        (job,) = q.sim.job_ids()
        added: Any = await q.redis.xadd(q.stream, {"id": job})
        entry = added.decode()
        slow = await q.start("slow", "--reclaim-after", "1", "--read-timeout", "300")

        async def on_the_wire() -> bool:
            return job in q.sim.deleted and q.sim.stats.in_flight == 1

        await until(on_the_wire)
        slow.process.send_signal(signal.SIGSTOP)
        try:
            q.sim.set_faults(FaultConfig(latency_ms=600_000, latency_jitter=False))
            await q.start("taker", "--reclaim-after", "1")

            async def taker_sending() -> bool:  # the slow one's answer is due (not read)
                calls = q.sim.stats.delete_calls
                return calls == 2 and q.sim.stats.in_flight == 1 and await q.pending("taker") == 1

            await until(taker_sending, 60)
        finally:
            slow.process.send_signal(signal.SIGCONT)

        async def slow_settled() -> bool:
            return bool(slow.named("serve.entry_taken_over")) or await q.pending() == 0

        await until(slow_settled, 60)
        still_the_takers = await q.pending("taker")
        note: Any = await q.redis.get(StreamLayout(q.stream, "reapers").sending(entry))
    assert [e["job_id"] for e in slow.named("job.deleted")] == [job]
    assert [e["entry"] for e in slow.named("serve.entry_taken_over")] == [entry]
    assert still_the_takers == 1
    assert note is not None and job in sent_ids(note)


@pytest.mark.anyio
async def test_outcomes_of_entries_taken_over_are_left_to_the_taker(redis_prefix: str) -> None:
    """A replica that stalled past ``reclaim_after`` hears back and writes its outcomes:
    rows, last errors and note lines of entries now pending under another consumer, or
    acknowledged by it, are not written; those of its own entries are, and a row naming
    one of each too, naming its own only. In a chaos run (3 replicas, Redis killed and
    restarted) the stale replica's ``absent`` for jobs its taker had deleted came after
    the taker's ``deleted`` and had the last word; on the old code every row here is
    written (fails), and before the row was narrowed it still named the taken entry."""
    layout = StreamLayout(redis_prefix + "ids", "reapers")
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await _taken_over(client, layout)
        for entry in ("1-1", "2-1", "3-1"):
            await client.set(layout.sending(entry), f"+job-{entry}\n", ex=60)
        mine = StreamConsumer(client, layout, "c1")
        rows = [{"job_id": f"job-{e}", "outcome": "absent", "batch_id": "b1", "entry": e}
                for e in ("1-1", "2-1", "3-1", "1-1,2-1")]  # fmt: skip
        await mine.write_outcomes(
            rows, {e: [f"job-{e}"] for e in ("1-1", "2-1")}, {"1-1": "e1", "2-1": "e2"}
        )
        written: Any = await client.xrange(layout.outcomes)
        assert [f[b"entry"].decode() for _, f in written] == ["1-1", "1-1"]
        kept: Any = await client.hgetall(layout.last_error)
        assert kept == {b"1-1": b"e1"}
        assert sent_ids(await client.get(layout.sending("1-1"))) == frozenset()
        assert sent_ids(await client.get(layout.sending("2-1"))) == {"job-2-1"}
        assert await client.get(layout.sending("3-1")) == b"+job-3-1\n"
    finally:
        await client.aclose()


class _StagedApi:
    """A proxy in front of the simulator at ``upstream`` whose DELETEs go as ``mode`` says:
    ``hold``: each is forwarded (applied) and its answer held until ``release`` is set, but
    one naming a job of ``refused`` is not forwarded and is answered 400 (the API refusing
    that id); ``unavailable``: answered 503 at once, not forwarded; ``pass``: forwarded and
    answered as the simulator answers; ``hold looks``: DELETEs pass, and each show call
    (a look) is forwarded and its answer held until ``release``. Other calls are always
    forwarded, but a show call of a job of ``looks_held``, whose answer is held until
    ``looked`` is set, in any mode."""

    def __init__(
        self, upstream: str, refused: set[str], looks_held: frozenset[str] = frozenset()
    ) -> None:
        self.upstream = upstream
        self.refused = refused
        self.looks_held = looks_held
        self.mode = "hold"
        self.held = 0
        self.release = anyio.Event()
        self.looked = anyio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "GET" and request.path.rsplit("/", 1)[-1] in self.looks_held:
            answer = await self._forward(request, body)
            await self.looked.wait()
            return answer
        if request.method == "DELETE" and self.mode == "unavailable":
            said = {"error_code": "ModelArts.0503", "error_msg": "service unavailable"}
            return web.json_response(said, status=503)
        if request.method == "DELETE" and self.mode == "hold":
            named = set(orjson.loads(body).get("job_ids", ()))
            self.held += 1
            if named & self.refused:
                await self.release.wait()
                said = {"error_code": "ModelArts.6101", "error_msg": "job cannot be deleted"}
                return web.json_response(said, status=400)
            answer = await self._forward(request, body)
            await self.release.wait()
            return answer
        if request.method == "GET" and self.mode == "hold looks":
            self.held += 1
            answer = await self._forward(request, body)
            await self.release.wait()
            return answer
        return await self._forward(request, body)

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as http,
            http.request(
                request.method, self.upstream + request.path_qs, data=body, headers=headers
            ) as answer,
        ):
            said, kind = await answer.read(), answer.headers.get("Content-Type")
            status = answer.status
        return web.Response(status=status, body=said, headers={"Content-Type": kind or ""})


@pytest.mark.anyio
@SEVERAL
async def test_a_stale_replica_refused_an_id_does_not_overwrite_the_takers_last_error(
    redis_prefix: str, tmp_path: Path
) -> None:
    """Entry E names a and b. The slow replica's DELETEs of both are on the wire (a
    applied, b about to be refused) when it freezes; the taker takes E over, meets the API
    unavailable, and keeps E pending with its own last error (a and b unsure, none done).
    The slow one wakes to its answers: a deleted (its row not written: E is not its own),
    b refused. It wrote its last error with no owner check, naming a done, over the
    taker's: E's next delivery sent only b, and a, deleted by our fleet, had no outcome
    at all. Now it leaves E to the taker (``serve.entry_taken_over``), and every id of E
    gets one row."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=2)) as q:
        a, b = q.sim.job_ids()
        api = _StagedApi(q.sim.url, {b})
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", api.handle)
        async with serve_app(app) as url:
            layout = StreamLayout(q.stream, GROUP)
            added: Any = await q.redis.xadd(q.stream, {"ids": orjson.dumps([a, b])})
            entry = added.decode()
            slow = await _start_via(q, url, "slow", "--batch-size", "1", "--concurrency", "2",
                                    "--rate", "100", "--reclaim-after", "600",
                                    "--read-timeout", "300")  # fmt: skip

            async def both_on_the_wire() -> bool:
                return api.held == 2 and a in q.sim.deleted

            await until(both_on_the_wire)
            slow.process.send_signal(signal.SIGSTOP)
            try:
                api.mode = "unavailable"
                taker = await _start_via(q, url, "taker", "--batch-size", "1", "--rate", "100",
                                         "--reclaim-after", "1", "--max-attempts", "1")  # fmt: skip

                async def kept_by_the_taker() -> bool:
                    said: Any = await q.redis.hget(layout.last_error, entry)
                    return said is not None and await q.pending("taker") == 1

                await until(kept_by_the_taker, 60)
                taker.process.send_signal(signal.SIGTERM)
                with anyio.fail_after(30):
                    await taker.process.wait()
                takers: Any = await q.redis.hget(layout.last_error, entry)
            finally:
                slow.process.send_signal(signal.SIGCONT)
            api.release.set()

            async def slow_settled() -> bool:
                return bool(slow.named("serve.entry_taken_over") or slow.named("serve.entry_kept"))

            await until(slow_settled, 60)
            slow.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                await slow.process.wait()
            after_slow: Any = await q.redis.hget(layout.last_error, entry)
            api.mode = "pass"
            heir = await _start_via(q, url, "taker", "--batch-size", "1", "--rate", "100",
                                    "--reclaim-after", "600")  # fmt: skip

            async def settled() -> bool:
                return await q.pending() == 0

            await until(settled, 60)
            rows = await q.stream_rows(q.stream + ":outcomes")
            left: Any = await q.redis.hgetall(layout.last_error)
            await q.stop_all()
    assert [e["entry"] for e in slow.named("serve.entry_taken_over")] == [entry]
    assert slow.named("serve.entry_kept") == []
    assert after_slow == takers
    assert heir.named("job.absent") == []
    assert sorted((r["job_id"], r["outcome"]) for r in rows) == sorted(
        [(a, "deleted"), (b, "deleted")]
    )
    assert left == {}
