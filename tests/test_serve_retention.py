"""What serve keeps in Redis: the ids stream trimmed below what every group still needs, the
outcomes and dead letters by age and count, and a lost group created again where it stood.

Real Redis under the test's own key prefix; the service through ``serve`` in-process, two
replicas on one simulator where the point is sharing one stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from tests.conftest import REDIS_URL
from tests.e2e import until
from worker.commands.serve import serve
from worker.service.layout import Retention, StreamLayout
from worker.service.retention import Keeper
from worker.settings import Settings
from worker.simulator import Simulator, SimulatorConfig, run_simulator

pytestmark = pytest.mark.usefixtures("clean_env")


async def _ids(client: aioredis.Redis, key: str) -> list[str]:
    rows: Any = await client.xrange(key)
    return [entry_id.decode() for entry_id, _ in rows]


async def _read(client: aioredis.Redis, stream: str, group: str, count: int) -> list[str]:
    reply: Any = await client.xreadgroup(group, "c", {stream: ">"}, count=count)
    return [entry_id.decode() for entry_id, _ in reply[0][1]] if reply else []


# -- the retention pass, against real Redis -------------------------------------------------


@pytest.mark.anyio
async def test_the_ids_stream_is_trimmed_below_what_the_slowest_group_still_needs(
    redis_prefix: str, redis_client: Any
) -> None:
    client = redis_client
    """Two groups: ours acks 8 of 10, the other read 5 and acked 2. Nothing the other group
    has pending or not read goes, and our position is the last entry we acked in order."""
    layout = StreamLayout(redis_prefix + "ids", "ours")
    written = [(await client.xadd(layout.stream, {"id": f"j{n}"})).decode() for n in range(10)]
    await client.xgroup_create(layout.stream, "ours", id="0")
    await client.xgroup_create(layout.stream, "other", id="0")
    keeper = Keeper(client, layout, Retention())
    assert (await keeper.trim()).ids == 0  # neither group has read anything
    ours = await _read(client, layout.stream, "ours", 10)
    await client.xack(layout.stream, "ours", *ours[:6], *ours[7:9])  # 6 and 9 left pending
    other = await _read(client, layout.stream, "other", 5)
    await client.xack(layout.stream, "other", other[0], other[1], other[3])
    trimmed = await keeper.trim()
    assert trimmed.ids == 2  # below the other group's oldest pending (entry 2)
    assert await _ids(client, layout.stream) == written[2:]
    assert trimmed.position == written[5]  # ours: everything up to entry 5 is done
    await client.xack(layout.stream, "other", other[2], other[4])
    await keeper.trim()
    assert await _ids(client, layout.stream) == written[4:]  # entry 4 was the last delivered
    assert await client.hget(layout.position, "ours") == written[5].encode()


@pytest.mark.anyio
async def test_a_group_that_has_read_nothing_keeps_every_entry(
    redis_prefix: str, redis_client: Any
) -> None:
    client = redis_client
    """A second group created at 0 after ours finished (an audit consumer): nothing goes."""
    layout = StreamLayout(redis_prefix + "ids", "ours")
    for n in range(5):
        await client.xadd(layout.stream, {"id": f"j{n}"})
    await client.xgroup_create(layout.stream, "ours", id="0")
    await client.xack(layout.stream, "ours", *await _read(client, layout.stream, "ours", 5))
    await client.xgroup_create(layout.stream, "late", id="0")
    keeper = Keeper(client, layout, Retention())
    await keeper.trim()
    assert len(await _ids(client, layout.stream)) == 5
    await client.xgroup_destroy(layout.stream, "late")
    await keeper.trim()
    assert len(await _ids(client, layout.stream)) == 1  # the last delivered entry stays


@pytest.mark.anyio
async def test_outcomes_and_dead_letters_go_by_age_and_by_count(
    redis_prefix: str, redis_client: Any
) -> None:
    client = redis_client
    """Entries older than the age limit are trimmed by the pass; the count cap holds on
    every write (approximately: Redis trims whole nodes of 100 entries)."""
    from worker.service.consumer import StreamConsumer

    layout = StreamLayout(redis_prefix + "ids", "ours")
    now_ms = int(time.time() * 1000)
    day = 24 * 3600 * 1000
    for key in (layout.outcomes, layout.dead):
        for age_days in (9, 8, 2, 0):
            await client.xadd(key, {"k": "v"}, id=f"{now_ms - age_days * day}-0")
    retention = Retention(outcomes_max_age_s=7 * 86400, dead_max_age_s=3 * 86400,
                          outcomes_max_len=200)  # fmt: skip
    trimmed = await Keeper(client, layout, retention).trim()
    assert (trimmed.outcomes, trimmed.dead) == (2, 2)
    assert await client.xlen(layout.outcomes) == 2 and await client.xlen(layout.dead) == 2
    consumer = StreamConsumer(client, layout, "c", retention=retention)
    await consumer.write_outcomes([{"job_id": f"j{n}"} for n in range(1000)])
    assert 200 <= await client.xlen(layout.outcomes) < 300


@pytest.mark.anyio
async def test_consumer_names_idle_with_nothing_pending_leave_the_group(
    redis_prefix: str, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica killed, or leaving with entries it handed over, cannot remove its own name;
    pods get new names, so the group's consumers grew with every rollout. A name idle past
    CONSUMER_IDLE_S with nothing pending goes; one with entries pending stays."""
    from worker.service import retention

    client = redis_client
    monkeypatch.setattr(retention, "CONSUMER_IDLE_S", 1.0)
    layout = StreamLayout(redis_prefix + "ids", "ours")
    for n in range(3):
        await client.xadd(layout.stream, {"id": f"j{n}"})
    await client.xgroup_create(layout.stream, "ours", id="0")
    gone: Any = await client.xreadgroup("ours", "gone", {layout.stream: ">"}, count=1)
    await client.xack(layout.stream, "ours", gone[0][1][0][0])
    await client.xreadgroup("ours", "holding", {layout.stream: ">"}, count=1)
    await anyio.sleep(1.3)  # Redis's own idle clock: past the limit, with room to spare
    await client.xreadgroup("ours", "live", {layout.stream: ">"}, count=1)
    trimmed = await Keeper(client, layout, Retention()).trim()
    consumers: Any = await client.xinfo_consumers(layout.stream, "ours")
    assert trimmed.consumers == 1
    assert sorted(c["name"].decode() for c in consumers) == ["holding", "live"]


@pytest.mark.anyio
async def test_a_key_that_is_not_a_stream_is_a_wrongtype_error_not_a_trim(
    redis_prefix: str, redis_client: Any
) -> None:
    client = redis_client
    import redis.exceptions

    layout = StreamLayout(redis_prefix + "ids", "ours")
    await client.set(layout.stream, "not a stream")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        await Keeper(client, layout, Retention()).trim()
    assert await client.get(layout.stream) == b"not a stream"


# -- replicas sharing one stream -------------------------------------------------------------


@dataclass
class Fleet:
    sim: Simulator
    redis: aioredis.Redis
    layout: StreamLayout
    stop: anyio.Event
    codes: list[int] = field(default_factory=list)
    logs: list[MutableMapping[str, Any]] = field(default_factory=list)

    async def enqueue(self, ids: list[str], chunk: int = 1000) -> None:
        for start in range(0, len(ids), chunk):
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids[start : start + chunk]:
                    pipe.xadd(self.layout.stream, {"id": job_id})
                await pipe.execute()

    async def pending(self) -> int:
        info: Any = await self.redis.xpending(self.layout.stream, self.layout.group)
        return int(info["pending"])

    def events(self, name: str) -> list[MutableMapping[str, Any]]:
        return [e for e in self.logs if e.get("event") == name]


@asynccontextmanager
async def fleet(
    prefix: str, config: SimulatorConfig, names: tuple[str, ...], **overrides: Any
) -> AsyncIterator[Fleet]:
    """``names`` replicas of ``serve`` in this process, on one simulator and one stream."""
    async with run_simulator(config) as sim:
        client = aioredis.Redis.from_url(REDIS_URL)
        layout = StreamLayout(prefix + "ids", "reapers")
        state = Fleet(sim, client, layout, anyio.Event())

        async def replica(name: str, ready: anyio.Event) -> None:
            values: dict[str, Any] = {
                "endpoint": sim.url, "project_id": sim.config.project_id, "ak": sim.config.ak,
                "sk": sim.config.sk, "stream": layout.stream, "group": layout.group,
                "consumer": name, "http_port": 0, "rate": 1000.0, "burst": 20,
                "batch_size": 100, "concurrency": 4, "grace": 2.0,
            } | overrides  # fmt: skip
            code = await serve(Settings(**values), sim.url, stop=state.stop,
                               on_ready=lambda _: ready.set(), http_host="127.0.0.1")  # fmt: skip
            state.codes.append(code)

        try:
            with capture_logs() as logs:
                state.logs = logs
                async with anyio.create_task_group() as group:
                    for name in names:
                        ready = anyio.Event()
                        group.start_soon(replica, name, ready)
                        with anyio.fail_after(10):
                            await ready.wait()
                    yield state
                    state.stop.set()
        finally:
            await client.aclose()


@pytest.mark.anyio
async def test_two_thousand_ids_through_two_replicas_leave_the_ids_stream_short(
    redis_prefix: str,
) -> None:
    """Every acknowledged entry used to stay in the stream for good (100,000 ids: 100,000
    entries, 5.6 to 24.5 MB of Redis). Now at most 1,000 entries remain, and a second group
    that has read nothing keeps every entry it has not read. Two thousand ids are twice the
    bound: a stream never trimmed keeps all of them (it was twenty thousand, ten times the
    time for the same proof)."""
    async with fleet(redis_prefix, SimulatorConfig(jobs=2_000), ("r1", "r2")) as f:
        ids = f.sim.job_ids()
        await f.enqueue(ids)

        async def settled() -> bool:
            return len(f.sim.deleted) == len(ids) and await f.pending() == 0

        await until(settled, 120)

        async def short() -> bool:
            return int(await f.redis.xlen(f.layout.stream)) <= 1000

        await until(short, 10)
        await f.redis.xgroup_create(f.layout.stream, "audit", id="$")
        await f.enqueue(["late-1", "late-2"])
        await until(lambda: _zero_pending_with(f, 0), 10)
        last: Any = await f.redis.xrevrange(f.layout.stream, count=1)

        async def passed() -> bool:  # a retention pass since the last ack: it kept our place
            return bool(await f.redis.hget(f.layout.position, f.layout.group) == last[0][0])

        await until(passed, 10)  # and both late entries stay for "audit"
        left = await _ids(f.redis, f.layout.stream)
        fields: Any = [await f.redis.xrange(f.layout.stream, e, e) for e in left[-2:]]
    assert f.codes == [0, 0]
    assert max(f.sim.sent_counts.values()) == 1
    assert len(left) <= 1000
    assert [row[0][1][b"id"] for row in fields] == [b"late-1", b"late-2"]


async def _zero_pending_with(f: Fleet, expected: int) -> bool:
    return await f.pending() == expected and len(f.events("job.absent")) >= 2


@pytest.mark.anyio
async def test_a_destroyed_group_is_created_again_where_it_stood_not_at_the_start(
    redis_prefix: str,
) -> None:
    """XGROUP DESTROY while serve runs: the group was created again at 0 and every entry
    still in the stream was sent again. Now it starts at the kept position: only what came
    after is read, and an event says where it started."""
    async with fleet(redis_prefix, SimulatorConfig(jobs=60), ("r1",)) as f:
        ids = f.sim.job_ids()
        await f.redis.xgroup_create(f.layout.stream, "audit", id="0")  # holds every entry
        await f.enqueue(ids[:50])

        async def done() -> bool:
            kept = await f.redis.hget(f.layout.position, f.layout.group)
            return len(f.sim.deleted) == 50 and await f.pending() == 0 and kept is not None

        await until(done, 30)

        async def kept_at_the_end() -> bool:  # a retention pass after the last ack
            newest: Any = await f.redis.xrevrange(f.layout.stream, count=1)
            return bool(await f.redis.hget(f.layout.position, f.layout.group) == newest[0][0])

        await until(kept_at_the_end, 10)
        await f.redis.xgroup_destroy(f.layout.stream, f.layout.group)
        await f.enqueue(ids[50:])
        await until(lambda: _all_deleted(f, len(ids)), 30)
        await until(lambda: _no_pending(f), 10)
    assert max(f.sim.sent_counts.values()) == 1  # nothing of the first 50 was sent again
    (event,) = f.events("serve.group_recreated")
    assert event["position"] != "0" and event["replays"] == "pending and unread entries"


async def _all_deleted(f: Fleet, n: int) -> bool:
    return len(f.sim.deleted) == n


async def _no_pending(f: Fleet) -> bool:
    return await f.pending() == 0


@pytest.mark.anyio
async def test_a_lost_group_keeps_what_it_had_not_finished_from_the_other_groups_trim(
    redis_prefix: str, redis_client: Any
) -> None:
    """Our group destroyed (or lost to a restore) while an audit group has read everything:
    until a replica makes it again (a paused replica reads nothing for up to ten minutes),
    each pass trimmed below the audit group alone, so the entries our group had pending or
    unread were gone when it was made again at its kept position: work lost. The kept
    position now bounds the trim while the group is away."""
    from worker.service.consumer import StreamConsumer

    client = redis_client
    layout = StreamLayout(redis_prefix + "ids", "ours")
    written = [(await client.xadd(layout.stream, {"id": f"j{n}"})).decode() for n in range(10)]
    await client.xgroup_create(layout.stream, "ours", id="0")
    await client.xgroup_create(layout.stream, "audit", id="0")
    ours = await _read(client, layout.stream, "ours", 5)
    await client.xack(layout.stream, "ours", *ours[:3])  # 3 and 4 pending, 5..9 unread
    await client.xack(layout.stream, "audit", *await _read(client, layout.stream, "audit", 10))
    keeper = Keeper(client, layout, Retention())
    assert (await keeper.trim()).position == written[2]
    await client.xgroup_destroy(layout.stream, "ours")
    await keeper.trim()  # a pass of any replica before ours is made again
    assert (await StreamConsumer(client, layout, "c").ensure_group()).position == written[2]
    again = await _read(client, layout.stream, "ours", 10)
    assert again == written[3:]


@pytest.mark.anyio
async def test_a_kept_position_ahead_of_the_stream_is_not_where_the_group_starts(
    redis_prefix: str, redis_client: Any
) -> None:
    """The stream deleted (cleared by hand, or lost with a restore) while the position stays:
    the group was made again at the kept position, so an entry whose id lies below it (a
    Redis clock behind the old one, after a fail-over) was never read, and nobody was told.
    A position past every entry of the stream belongs to another stream: start at 0."""
    from worker.service.consumer import StreamConsumer

    client = redis_client
    layout = StreamLayout(redis_prefix + "ids", "ours")
    for n in range(3):
        await client.xadd(layout.stream, {"id": f"j{n}"})
    await client.xgroup_create(layout.stream, "ours", id="0")
    await client.xack(layout.stream, "ours", *await _read(client, layout.stream, "ours", 3))
    assert (await Keeper(client, layout, Retention()).trim()).position is not None
    await client.delete(layout.stream)
    behind = (await client.xadd(layout.stream, {"id": "new"}, id="1000-0")).decode()
    assert (await StreamConsumer(client, layout, "c").ensure_group()).position is None
    assert await _read(client, layout.stream, "ours", 10) == [behind]
