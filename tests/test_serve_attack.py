"""Attacks on serve's outcomes from angles its own tests did not take (the session of
2026-12-07): each test names the invariant it holds serve to. Real ``serve`` processes,
real Redis, the simulator in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from tests.e2e import serve_app, until
from tests.test_serve_e2e import GROUP, Queue, queue
from tests.test_serve_sent import _start_via, held_answers
from tests.test_serve_takeover import _StagedApi
from worker.service.layout import StreamLayout
from worker.simulator import SimulatorConfig
from worker.types import ANSWER_LOST

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]


async def _first_delivered_to_c1(q: Any, url: str, job_id: str, deliveries: int) -> tuple[str, Any]:
    """An entry naming ``job_id`` put on ``q``'s stream, and ``c1``, a serve calling the API
    at ``url`` that takes entries over after 1 s and gives one up past ``deliveries``: the
    entry's id and the replica."""
    await q.redis.xgroup_create(q.stream, GROUP, "0", mkstream=True)
    added: Any = await q.redis.xadd(q.stream, {"id": job_id})
    c1 = await _start_via(q, url, "c1", "--max-deliveries", str(deliveries), "--reclaim-after",
                          "1", "--batch-size", "1", "--rate", "100")  # fmt: skip
    return added.decode(), c1


async def _given_up_after_a_dead_holder_sent_x(
    q: Queue, deliveries: int
) -> tuple[str, str, Any, list[dict[str, str]]]:
    """E names x and y (``q``'s two jobs). Its holder c0 noted x sent, its DELETE removed
    the job, and c0 died before the answer; E was delivered ``deliveries`` times so (every
    holder dying). c1 (``--max-deliveries 1``) reads E once more and gives it up. Returns
    x, y, E, c1 and the outcome rows, once nothing is pending."""
    x, y = q.sim.job_ids()
    q.sim.store.delete([x])  # by the DELETE c0 died with
    layout = StreamLayout(q.stream, GROUP)
    await q.redis.xgroup_create(q.stream, GROUP, "0", mkstream=True)
    added: Any = await q.redis.xadd(q.stream, {"ids": f'["{x}", "{y}"]'})
    entry = added.decode()
    await q.redis.xreadgroup(GROUP, "c0", {q.stream: ">"})  # delivery 1, c0's
    await q.redis.set(layout.sending(entry), f"+{x}\n", ex=600)
    for _ in range(deliveries - 1):  # its holders died too
        await q.redis.xclaim(q.stream, GROUP, "c0", 0, [entry])
    c1 = await q.start("c1", "--max-deliveries", "1", "--reclaim-after", "1",
                       "--batch-size", "1", "--rate", "100")  # fmt: skip

    async def settled() -> bool:
        return await q.pending() == 0

    await until(settled, 60)
    rows = await q.stream_rows(q.stream + ":outcomes")
    await q.stop_all()
    assert [e["entry"] for e in c1.named("serve.dead_lettered")] == [entry]
    return x, y, c1, rows


async def _released_once_c1_holds_both(
    q: Queue, api: _StagedApi, held: int = 2
) -> list[dict[str, str]]:
    """Once c1 holds both entries of ``q`` (``held`` of them), ``api``'s held answers
    released; the outcome rows once nothing is pending (the replicas stopped)."""

    async def both_held() -> bool:
        return await q.pending("c1") == held

    await until(both_held, 30)
    api.release.set()

    async def settled() -> bool:
        return await q.pending() == 0

    await until(settled, 60)
    rows = await q.stream_rows(q.stream + ":outcomes")
    await q.stop_all()
    return rows


@pytest.mark.anyio
async def test_an_entry_given_up_does_not_call_a_job_its_own_dead_holder_deleted_failed(
    redis_prefix: str, tmp_path: Path
) -> None:
    """Entry E names x. Its holder c0 noted x sent, its DELETE removed the job, and c0
    died before the answer (a crash loop: every holder dies so). E is read again past
    ``--max-deliveries`` and given up: its ids end ``failed`` with the last error. x was
    deleted by E's own call: ``failed`` says the job is still there, an untrue outcome;
    the note's doubt makes it ``deleted``, unconfirmed (``answer_lost``), as any later
    delivery would have said, and only the ids nobody sent end ``failed``."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=2)) as q:
        x, y, c1, rows = await _given_up_after_a_dead_holder_sent_x(q, 1)
    assert sorted(
        (r["job_id"], r["outcome"], r["error_msg"]) for r in rows if r["job_id"] == x
    ) == [(x, "deleted", "answer_lost")]
    assert [r["outcome"] for r in rows if r["job_id"] == y] == ["failed"]
    assert c1.named("job.failed") and all(e["job_id"] == y for e in c1.named("job.failed"))


@pytest.mark.anyio
async def test_an_entry_given_up_while_its_id_is_on_the_wire_for_another_gets_its_row(
    redis_prefix: str, tmp_path: Path
) -> None:
    """F names x and c1's DELETE of it is on the wire (its answer held) when c1 takes over
    E, which names x too and is past ``--max-deliveries``. E is given up, but not its x:
    another entry is on it. E was dead-lettered with no row for x at all (the answer's row
    names the entries waiting on x, and E never was one); now E waits on that call and its
    row names both."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=1)) as q:
        (x,) = q.sim.job_ids()
        release = anyio.Event()
        async with held_answers(q.sim.url, release) as url:
            fresh, c1 = await _first_delivered_to_c1(q, url, x, 1)

            async def on_the_wire() -> bool:
                return x in q.sim.deleted

            await until(on_the_wire)
            async with q.redis.pipeline(transaction=True) as pipe:  # c1's blocked read
                pipe.xadd(q.stream, {"id": x})  # is served after the EXEC: c0 reads it
                pipe.xreadgroup(GROUP, "c0", {q.stream: ">"})  # delivery 1, c0's
                added, _ = await pipe.execute()
            given_up = added.decode()

            async def dead() -> bool:
                return bool(c1.named("serve.dead_lettered")) or len(c1.named("job.failed")) > 0

            async def claimed() -> bool:  # c1 took it over: its delivery past the limit
                info: Any = await q.redis.xpending_range(q.stream, GROUP, given_up, given_up, 1)
                return (
                    bool(info)
                    and int(info[0]["times_delivered"]) >= 2
                    and (info[0]["consumer"] in (b"c1", "c1"))
                )

            await until(claimed, 30)
            # the old code dead-lettered it within milliseconds of the claim; the fix waits on
            # x's call, which is held until released
            with anyio.move_on_after(3):
                await until(dead, 3)
            release.set()

            async def settled() -> bool:
                return await q.pending() == 0

            await until(settled, 60)
            rows = await q.stream_rows(q.stream + ":outcomes")
            await q.stop_all()
    named = sorted(e for r in rows for e in r["entry"].split(","))
    assert named == sorted([fresh, given_up])
    assert [r["outcome"] for r in rows] == ["deleted"]


@pytest.mark.anyio
async def test_an_entry_on_its_last_delivery_gets_a_row_for_an_id_that_fails_for_another_too(
    redis_prefix: str, tmp_path: Path
) -> None:
    """E (on its last delivery) and F (on its first) both wait on x, which the API refuses
    (400). A failure is final only on the last delivery its entries are allowed, and F may
    try again: no row was written, and E was dead-lettered with none for x at all; F's row,
    on its own last delivery, named F only. Now E's row is written (naming E) when E is
    dead-lettered, and F's when F is."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=1)) as q:
        (x,) = q.sim.job_ids()
        api = _StagedApi(q.sim.url, {x})
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", api.handle)
        async with serve_app(app) as url:
            fresh, c1 = await _first_delivered_to_c1(q, url, x, 2)

            async def on_the_wire() -> bool:
                return api.held == 1

            await until(on_the_wire)
            async with q.redis.pipeline(transaction=True) as pipe:  # c1's blocked read
                pipe.xadd(q.stream, {"id": x})  # is served after the EXEC: c0 reads it
                pipe.xreadgroup(GROUP, "c0", {q.stream: ">"})  # delivery 1, c0's
                added, _ = await pipe.execute()
            last = added.decode()

            rows = await _released_once_c1_holds_both(q, api)  # E's delivery 2, the last
    assert sorted(e["entry"] for e in c1.named("serve.dead_lettered")) == sorted([fresh, last])
    assert sorted((r["entry"], r["outcome"]) for r in rows) == sorted(
        [(fresh, "failed"), (last, "failed")]
    )


@pytest.mark.anyio
async def test_an_entry_given_up_unsent_reads_its_jobs_and_calls_one_another_deleted_absent(
    redis_prefix: str, tmp_path: Path
) -> None:
    """F names x; c1 deletes it. E names x and y; its holder c0 died before sending either,
    and E is read again past ``--max-deliveries``. Given up, its ids ended ``failed`` with
    no call at all: ``failed`` says the job is still there, but F's call had deleted x. Now
    E's unsent ids get one last look, a show call that deletes nothing: x, gone, ends
    ``absent``; y, still there, ``failed``; no DELETE goes out past the limit."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=2)) as q:
        x, y = q.sim.job_ids()
        await q.redis.xgroup_create(q.stream, GROUP, "0", mkstream=True)
        c1 = await q.start("c1", "--max-deliveries", "1", "--reclaim-after", "1",
                           "--batch-size", "1", "--rate", "100")  # fmt: skip
        added: Any = await q.redis.xadd(q.stream, {"id": x})
        fresh = added.decode()

        async def settled() -> bool:
            return x in q.sim.deleted and await q.pending() == 0

        await until(settled, 60)
        async with q.redis.pipeline(transaction=True) as pipe:  # c1's blocked read
            pipe.xadd(q.stream, {"ids": f'["{x}", "{y}"]'})  # is served after the EXEC:
            pipe.xreadgroup(GROUP, "c0", {q.stream: ">"})  # c0 reads it (delivery 1) and dies
            added, _ = await pipe.execute()
        given_up = added.decode()
        await until(settled, 60)
        rows = await q.stream_rows(q.stream + ":outcomes")
        await q.stop_all()
    assert [e["entry"] for e in c1.named("serve.dead_lettered")] == [given_up]
    assert sorted((r["job_id"], r["outcome"], r["entry"]) for r in rows) == sorted(
        [(x, "deleted", fresh), (x, "absent", given_up), (y, "failed", given_up)]
    )
    assert q.sim.deleted == {x} and q.sim.sent_counts == {x: 1}  # no DELETE past the limit


@pytest.mark.anyio
async def test_an_entry_given_up_past_its_last_call_says_an_id_sent_unheard_may_be_gone(
    redis_prefix: str, tmp_path: Path
) -> None:
    """E names x and y; a holder's DELETE of x removed the job and died unanswered (its note
    says ``+x``), and E's delivery just past ``--max-deliveries`` died too (the chaos run's
    seed 11, ``--max-deliveries 2``: three jobs ``failed`` that the simulator deleted once
    each). Read once more, E is given up with no call at all, and x ended ``failed`` with
    the last error, saying the job is there. Its note says an earlier call may have
    deleted it: x's row says so (``answer_lost``), y's (never sent) does not."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=2)) as q:
        x, y, _, rows = await _given_up_after_a_dead_holder_sent_x(q, 2)
    assert q.sim.sent_counts == {x: 1}  # c0's: nothing is sent past the last call
    said = {r["job_id"]: (r["outcome"], r["error_msg"]) for r in rows}
    assert sorted(said) == sorted([x, y]) and len(rows) == 2
    assert said[x][0] == "failed" and ANSWER_LOST in said[x][1]
    assert said[y][0] == "failed" and ANSWER_LOST not in said[y][1]


@pytest.mark.anyio
async def test_a_fresh_entry_naming_a_job_being_looked_at_has_it_deleted(
    redis_prefix: str, tmp_path: Path
) -> None:
    """E names x; its holder c0 died before sending it, and c1 reads E past
    ``--max-deliveries`` (1): x gets a look, a show call that deletes nothing. F, fresh,
    names x while that look is out. F asked for x deleted and may send a DELETE: the look's
    answer (still there) is not F's, and x is deleted for F."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=1)) as q:
        (x,) = q.sim.job_ids()
        api = _StagedApi(q.sim.url, set())
        api.mode = "hold looks"
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", api.handle)
        async with serve_app(app) as url:
            await q.redis.xgroup_create(q.stream, GROUP, "0", mkstream=True)
            added: Any = await q.redis.xadd(q.stream, {"id": x})
            given_up = added.decode()
            await q.redis.xreadgroup(GROUP, "c0", {q.stream: ">"})  # delivery 1, c0's
            c1 = await _start_via(q, url, "c1", "--max-deliveries", "1", "--reclaim-after",
                                  "1", "--batch-size", "1", "--rate", "100")  # fmt: skip

            async def looking() -> bool:
                return api.held == 1

            await until(looking, 30)
            added = await q.redis.xadd(q.stream, {"id": x})
            fresh = added.decode()
            rows = await _released_once_c1_holds_both(q, api)
    assert [e["entry"] for e in c1.named("serve.dead_lettered")] == [given_up]
    assert sorted((r["job_id"], r["outcome"], r["entry"]) for r in rows) == [
        (x, "deleted", f"{given_up},{fresh}")
    ]
    assert q.sim.sent_counts == {x: 1}


@pytest.mark.anyio
async def test_a_fresh_entry_naming_a_job_a_look_has_answered_sends_it_once(
    redis_prefix: str, tmp_path: Path
) -> None:
    """E names x and y and is given up past ``--max-deliveries`` (1): its look reads x
    (there: ``failed``), then y, whose answer is held. F names x meanwhile: x has no
    entry waiting, so F's own DELETE goes out (its answer held). The look then ends. Only
    the ids whose look's answer was not their entries' are sent after it: x was sent
    again as well (two DELETEs, and a row naming no entry; the chaos run's seed 13)."""
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=2)) as q:
        x, y = q.sim.job_ids()
        api = _StagedApi(q.sim.url, set(), looks_held=frozenset({y}))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", api.handle)
        async with serve_app(app) as url:
            await q.redis.xgroup_create(q.stream, GROUP, "0", mkstream=True)
            added: Any = await q.redis.xadd(q.stream, {"ids": f'["{x}", "{y}"]'})
            given_up = added.decode()
            await q.redis.xreadgroup(GROUP, "c0", {q.stream: ">"})  # delivery 1, c0's
            c1 = await _start_via(q, url, "c1", "--max-deliveries", "1", "--reclaim-after",
                                  "1", "--batch-size", "2", "--rate", "100")  # fmt: skip

            async def x_looked_at() -> bool:
                return bool(c1.named("job.failed"))

            await until(x_looked_at, 30)
            added = await q.redis.xadd(q.stream, {"id": x})
            fresh = added.decode()

            async def sent_for_fresh() -> bool:
                return api.held == 1

            await until(sent_for_fresh, 30)
            api.looked.set()

            async def looked() -> bool:
                return bool(c1.named("serve.dead_lettered"))

            await until(looked, 30)
            rows = await _released_once_c1_holds_both(q, api, held=1)
    assert [r["entry"] for r in rows if r["job_id"] == x] == [given_up, fresh]
    assert q.sim.sent_counts == {x: 1} and api.held == 1  # one DELETE, F's
