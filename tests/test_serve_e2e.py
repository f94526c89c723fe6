"""serve as it runs in production: real ``python -m worker serve`` processes, real Redis,
the simulator on loopback (in this process, so the test reads its truth directly).

Nothing here sleeps to let something happen: each test waits for a state (ids deleted,
nothing pending, an event printed) with a deadline, and asserts on counts and events.
"""

from __future__ import annotations

import contextlib
import io
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import orjson
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from tests.benchmarks import harness
from tests.conftest import REDIS_URL
from tests.e2e import Served, collect
from tests.e2e import until as until  # the one poll, for the modules importing it here
from worker.commands.enqueue import enqueue as enqueue_ids
from worker.settings import Settings
from worker.simulator import FaultConfig, Simulator, SimulatorConfig, run_simulator

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]

GROUP = "reapers"
STARTUP_BOUND_S = 150
"""How long a replica may take to say ``serve.started``: generous, for a machine whose two
cores are shared by a dozen processes (importing the service there took over 20 s). A
replica that exits first fails the wait at once, naming its exit code and stderr."""
SEVERAL = pytest.mark.timeout(STARTUP_BOUND_S + 180)
"""For tests that start several replicas: their start-up may take most of the bound, and
the work after it its own share."""


@dataclass
class Replica(Served):
    name: str = ""


async def enqueue_file(source: Path, stream: str) -> dict[str, Any]:
    """``enqueue --input SOURCE --stream STREAM`` run by the command's own code (the file
    read, the ids checked, the entries written) in this process, not a second interpreter
    (~1 s of CPU on imports): what serve reads is what the command writes (the command as
    a process is tests/test_enqueue.py's). Its summary line, ``events`` added: what it
    said, each id it rejected among them; it exits 0, or 1 for some rejected."""
    settings = Settings(redis_url=REDIS_URL, stream=stream)
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    with capture_logs() as events, contextlib.redirect_stdout(out):
        code = await enqueue_ids(str(source), "auto", settings, None)
    out.flush()
    assert code in (0, 1), (code, events)
    summary: dict[str, Any] = orjson.loads(out.buffer.getvalue().splitlines()[-1])
    return summary | {"events": events}


@dataclass
class Queue:
    sim: Simulator
    redis: aioredis.Redis
    stream: str
    tmp: Path
    group: anyio.abc.TaskGroup
    replicas: list[Replica] = field(default_factory=list)

    async def enqueue(self, ids: list[str]) -> None:
        """Through the ``enqueue`` command's own code (``enqueue_file``)."""
        source = self.tmp / "ids.txt"
        source.write_text("".join(f"{i}\n" for i in ids))
        summary = await enqueue_file(source, self.stream)
        assert summary["enqueued"] == sum(1 for i in ids if " " not in i), summary

    async def start(self, name: str, *flags: str) -> Replica:
        command = [
            sys.executable, "-m", "worker", "serve",
            "--endpoint", self.sim.url, "--project-id", self.sim.config.project_id,
            "--ak", self.sim.config.ak, "--stream", self.stream, "--group", GROUP,
            "--consumer", name, "--redis-url", REDIS_URL, "--http-port", "0",
            "--log-format", "json", *flags,
        ]  # fmt: skip
        return await self.launch(name, command, {"REAPER_SK": self.sim.config.sk})

    async def start_all(self, names: tuple[str, ...], *flags: str) -> dict[str, Replica]:
        """Replicas ``names`` started together, each with ``flags``; by name."""
        async with anyio.create_task_group() as starting:
            for name in names:
                starting.start_soon(self.start, name, *flags)
        return {r.name: r for r in self.replicas if r.name in names}

    async def launch(self, name: str, command: list[str], env: dict[str, str]) -> Replica:
        """Start ``command`` (a ``serve``), with ``env`` beside a clean environment, as
        replica ``name``; return once it has said ``serve.started``."""
        with (self.tmp / f"{name}.err").open("wb") as errors:
            process = await anyio.open_process(
                command, env=harness.clean_env() | env, stderr=errors
            )
        replica = Replica(process, name=name)
        self.replicas.append(replica)
        self.group.start_soon(collect, replica)
        await self.wait_started(replica)
        return replica

    async def wait_started(self, replica: Replica) -> None:
        """Until ``replica`` says ``serve.started``; it exiting first fails at once."""
        with anyio.fail_after(STARTUP_BOUND_S):
            while not replica.started.is_set():
                code = replica.process.returncode
                if code is not None:
                    said = (self.tmp / f"{replica.name}.err").read_text(errors="replace")
                    pytest.fail(
                        f"{replica.name} exited {code} before serve.started:\n{said[-2000:]}"
                    )
                with anyio.move_on_after(0.2):
                    await replica.started.wait()

    async def pending(self, consumer: str | None = None) -> int:
        info: Any = await self.redis.xpending(self.stream, GROUP)
        if consumer is None:
            return int(info["pending"])
        by_name = {c["name"].decode(): int(c["pending"]) for c in info["consumers"]}
        return by_name.get(consumer, 0)

    async def entries_read(self) -> int:
        groups: Any = await self.redis.xinfo_groups(self.stream)
        return int(next(g for g in groups if g["name"].decode() == GROUP)["entries-read"] or 0)

    async def stream_rows(self, key: str) -> list[dict[str, str]]:
        rows: Any = await self.redis.xrange(key)
        return [{k.decode(): v.decode() for k, v in f.items()} | {"_id": i.decode()}
                for i, f in rows]  # fmt: skip

    async def stop_all(self) -> None:
        for replica in self.replicas:
            if replica.process.returncode is None:
                replica.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            for replica in self.replicas:
                await replica.process.wait()


@asynccontextmanager
async def queue(prefix: str, tmp: Path, config: SimulatorConfig) -> AsyncIterator[Queue]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        async with run_simulator(config) as sim, anyio.create_task_group() as group:
            q = Queue(sim, client, prefix + "ids", tmp, group)
            try:
                yield q
            finally:
                with anyio.CancelScope(shield=True):
                    for replica in q.replicas:
                        if replica.process.returncode is None:
                            replica.process.kill()
                            await replica.process.wait()
                        await replica.process.aclose()
    finally:
        await client.aclose()


def _at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))


@pytest.mark.anyio
@SEVERAL
async def test_three_replicas_share_one_stream_and_one_quota(
    redis_prefix: str, tmp_path: Path
) -> None:
    """Each replica is told --rate 20 and the API allows 22/s: together they keep to it
    (the limit is shared), every id is deleted once, and every entry is acknowledged."""
    config = SimulatorConfig(jobs=3000, quota=22, burst=3)
    async with queue(redis_prefix, tmp_path, config) as q:
        ids = q.sim.job_ids()
        flags = ("--rate", "20", "--burst", "1", "--batch-size", "20", "--concurrency", "4")
        await q.start_all(("r1", "r2", "r3"), *flags)
        await q.enqueue(ids)  # once all are up: a slow start-up leaves none out

        async def all_deleted() -> bool:
            return len(q.sim.deleted) == len(ids)

        async def nothing_pending() -> bool:
            return await q.pending() == 0

        await until(all_deleted)
        await until(nothing_pending, 10)
        await q.stop_all()
        outcomes = await q.stream_rows(q.stream + ":outcomes")
    assert [r.process.returncode for r in q.replicas] == [0, 0, 0]
    assert set(q.sim.delete_counts) == set(ids)
    assert max(q.sim.sent_counts.values()) == 1  # no id was sent twice by anyone
    stats = q.sim.stats
    assert stats.throttled <= 0.02 * stats.calls, stats
    assert sorted(r["job_id"] for r in outcomes if r["outcome"] == "deleted") == sorted(ids)
    stopped = [r.named("serve.stopped")[0] for r in q.replicas]
    assert sum(s["acked"] for s in stopped) == len(ids)
    assert sum(1 for s in stopped if s["batches"] > 0) >= 2  # the work was shared


@pytest.mark.anyio
@SEVERAL
async def test_three_replicas_on_auto_run_one_estimate_kept_in_redis(
    redis_prefix: str, tmp_path: Path
) -> None:
    """--rate auto in three replicas against a gateway quota they are not told: one of them
    takes the lease and runs the fleet's controller (one ``rate.leader`` in all), the others
    pace at the rate it stores in Redis, and the estimate stays there for the next leader.
    (Each replica used to run a controller of its own on a third of the answers.)

    Not which phase the estimate is in: a probe that finds the quota risen goes back to
    start-up (``_escalate``), and how far the controller got depends on the machine's load.
    What holds on any machine: a state is stored, a new leader would adopt it
    (``sane_state``), and it is learnt, not start-up's 2 calls/s (at that rate the 200
    calls would take 100 s, past the wait)."""
    from worker.pacing.controller import AdaptiveConfig
    from worker.pacing.fleet import decode_state, sane_state
    from worker.pacing.shared import FleetKeys

    config = SimulatorConfig(jobs=400, quota=40, burst=2)
    async with queue(redis_prefix, tmp_path, config) as q:
        ids = q.sim.job_ids()
        flags = ("--rate", "auto", "--batch-size", "2", "--concurrency", "4")
        await q.start_all(("r1", "r2", "r3"), *flags)
        await q.enqueue(ids)  # once all are up: a slow start-up leaves none out

        async def all_deleted() -> bool:
            return len(q.sim.deleted) == len(ids)

        await until(all_deleted, 60)
        keys = FleetKeys.of(q.stream + ":ratelimit")
        stored: Any = await q.redis.hget(keys.pace, "state")
        seconds, micros = await q.redis.time()
        await q.stop_all()
    assert [r.process.returncode for r in q.replicas] == [0, 0, 0]
    assert max(q.sim.sent_counts.values()) == 1
    leaders = [e for r in q.replicas for e in r.named("rate.leader")]
    assert len(leaders) == 1, leaders
    assert stored, "the leader stored no estimate"
    pacing = AdaptiveConfig()
    state = sane_state(decode_state(stored.decode()), pacing, seconds + micros / 1e6)
    assert state is not None, stored  # a new leader would start from scratch
    assert pacing.initial_rate < state.rate <= pacing.max_rate, state
    assert sum(1 for r in q.replicas if r.named("serve.stopped")[0]["batches"] > 0) >= 2


@pytest.mark.anyio
@SEVERAL
async def test_the_leader_killed_is_replaced_from_the_estimate_it_stored(
    redis_prefix: str, tmp_path: Path
) -> None:
    """kill -9 the replica that runs the fleet's controller: once its lease lapses another
    replica takes it over from the state stored in Redis (``restored``), the work goes on,
    and every id is still deleted exactly once."""
    config = SimulatorConfig(jobs=400, quota=50, burst=2)
    async with queue(redis_prefix, tmp_path, config) as q:
        ids = q.sim.job_ids()
        flags = ("--rate", "auto", "--batch-size", "1", "--concurrency", "4",
                 "--reclaim-after", "1")  # fmt: skip
        await q.start_all(("r1", "r2", "r3"), *flags)
        await q.enqueue(ids)  # once all are up: a slow start-up leaves none out

        async def learnt() -> bool:  # a leader, and calls well past start-up's
            return any(r.named("rate.leader") for r in q.replicas) and len(q.sim.deleted) >= 250

        await until(learnt, 60)
        (leader,) = [r for r in q.replicas if r.named("rate.leader")]
        leader.process.kill()  # SIGKILL: its lease is left to lapse
        await leader.process.wait()
        survivors = [r for r in q.replicas if r is not leader]

        async def taken_over() -> bool:
            return any(r.named("rate.leader") for r in survivors)

        await until(taken_over, 20)

        async def all_deleted() -> bool:
            return len(q.sim.deleted) == len(ids)

        await until(all_deleted, 90)
        await q.stop_all()
    (successor,) = [e for r in survivors for e in r.named("rate.leader")]
    assert successor["restored"] is True
    assert successor["rate"] > 10.0  # the fleet's rate, not start-up's 2 calls/s
    assert max(q.sim.delete_counts.values()) == 1
    assert [r.process.returncode for r in survivors] == [0, 0]


@pytest.mark.anyio
@SEVERAL
async def test_a_replica_killed_mid_stream_has_its_entries_reclaimed(
    redis_prefix: str, tmp_path: Path
) -> None:
    config = SimulatorConfig(jobs=800, faults=FaultConfig(latency_ms=20))
    async with queue(redis_prefix, tmp_path, config) as q:
        ids = q.sim.job_ids()
        flags = ("--rate", "30", "--batch-size", "10", "--concurrency", "4",
                 "--reclaim-after", "1")  # fmt: skip
        victim = (await q.start_all(("victim", "s1", "s2"), *flags))["victim"]
        await q.enqueue(ids)  # once all are up: a slow start-up leaves none out

        async def victim_mid_work() -> bool:
            return len(q.sim.deleted) >= 100 and await q.pending("victim") > 0

        await until(victim_mid_work)
        held = await q.pending("victim")
        victim.process.kill()  # SIGKILL: no drain, no acks
        await victim.process.wait()
        assert held > 0

        async def all_deleted() -> bool:
            return len(q.sim.deleted) == len(ids)

        async def nothing_pending() -> bool:
            return await q.pending() == 0

        await until(all_deleted)
        await until(nothing_pending, 10)
        await q.stop_all()
    assert set(q.sim.deleted) == set(ids)
    survivors = [r for r in q.replicas if r is not victim]
    assert sum(r.named("serve.stopped")[0]["reclaimed"] for r in survivors) >= 1
    assert [r.process.returncode for r in survivors] == [0, 0]
    assert max(q.sim.delete_counts.values()) == 1


@pytest.mark.anyio
async def test_a_poison_id_is_dead_lettered_after_max_deliveries_while_others_flow(
    redis_prefix: str, tmp_path: Path
) -> None:
    config = SimulatorConfig(jobs=100, reject_ids=frozenset({"poison-1"}))
    async with queue(redis_prefix, tmp_path, config) as q:
        ids = q.sim.job_ids()
        await q.enqueue([*ids[:50], "poison-1", "not valid", *ids[50:]])
        await q.start("r1", "--batch-size", "10", "--rate", "100", "--max-deliveries", "2",
                      "--reclaim-after", "0.3")  # fmt: skip

        async def settled() -> bool:
            dead: Any = await q.redis.xlen(q.stream + ":dead")
            return dead == 1 and await q.pending() == 0 and len(q.sim.deleted) == len(ids)

        await until(settled, 20)
        await q.stop_all()
        dead = await q.stream_rows(q.stream + ":dead")
        outcomes = await q.stream_rows(q.stream + ":outcomes")
    assert set(q.sim.deleted) == set(ids)  # the healthy ids all went through
    (entry,) = dead
    assert "poison-1" in entry["payload"]
    # Refused on the first delivery: kept pending, no outcome yet; refused on the second and
    # last: failed, once (job.failed means it will not be tried again), and dead-lettered.
    assert entry["deliveries"] == "2" and "max_deliveries 2" in entry["reason"]
    assert orjson.loads(entry["last_error"])["http_status"] == 400
    failed = [r for r in outcomes if r["outcome"] == "failed"]
    assert {r["job_id"] for r in failed} == {"poison-1"} and len(failed) == 1
    assert len(q.replicas[0].named("job.failed")) == 1
    assert len(q.replicas[0].named("serve.entry_kept")) == 1
    assert "not valid" not in q.sim.sent_counts  # invalid ids are never sent...
    # ... and enqueue refused it, so it never reached the stream either.
    assert not [r for r in outcomes if r["outcome"] == "rejected"]
    assert q.replicas[0].process.returncode == 0


@pytest.mark.anyio
async def test_sigterm_stops_intake_at_once_and_acks_everything_finished(
    redis_prefix: str, tmp_path: Path
) -> None:
    config = SimulatorConfig(jobs=2000, faults=FaultConfig(latency_ms=300, latency_jitter=False))
    async with queue(redis_prefix, tmp_path, config) as q:
        ids = q.sim.job_ids()
        await q.enqueue(ids)
        replica = await q.start("r1", "--batch-size", "10", "--rate", "100",
                                "--concurrency", "4", "--grace", "5")  # fmt: skip

        async def working() -> bool:
            return len(q.sim.deleted) >= 100

        await until(working)
        replica.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            await replica.process.wait()
        read_after = await q.entries_read()
        pending: Any = await q.redis.xpending_range(q.stream, GROUP, "-", "+", 10_000)
        pending_ids = {p["message_id"].decode() for p in pending}
        outcomes = await q.stream_rows(q.stream + ":outcomes")
    assert replica.process.returncode == 0
    (interrupted,) = replica.named("serve.interrupted")
    (draining,) = replica.named("serve.draining")
    assert (_at(draining) - _at(interrupted)).total_seconds() < 1.0
    (stopped,) = replica.named("serve.stopped")
    assert stopped["read"] == draining["read"]  # nothing was taken in after the signal
    assert read_after - draining["read"] <= 10  # Redis served at most the read it cancelled
    finished_entries = {r["entry"] for r in outcomes}
    assert finished_entries and not finished_entries & pending_ids  # finished => acked
    assert len(q.sim.deleted) < len(ids)  # it really stopped part-way
    assert len(finished_entries) + len(pending_ids) == read_after


@pytest.mark.anyio
async def test_entries_in_progress_longer_than_reclaim_after_are_not_taken_over(
    redis_prefix: str, tmp_path: Path
) -> None:
    """Every call takes 1.5 s and reclaim_after is 0.5 s: the replica doing the work keeps
    its entries fresh, so the other never takes them over and sends them again (each was
    deleted by one and found absent by the other, two outcomes for one id)."""
    faults = FaultConfig(latency_ms=1500, latency_jitter=False)
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=30, faults=faults)) as q:
        ids = q.sim.job_ids()
        await q.enqueue(ids)
        flags = ("--batch-size", "5", "--concurrency", "2", "--rate", "100",
                 "--reclaim-after", "0.5")  # fmt: skip
        await q.start("r1", *flags)
        await q.start("r2", *flags)

        async def settled() -> bool:
            return len(q.sim.deleted) == len(ids) and await q.pending() == 0

        await until(settled, 40)
        await q.stop_all()
        outcomes = await q.stream_rows(q.stream + ":outcomes")
    assert max(q.sim.sent_counts.values()) == 1  # no id was sent twice
    assert sorted(r["job_id"] for r in outcomes) == sorted(ids)
    assert {r["outcome"] for r in outcomes} == {"deleted"}


@pytest.mark.anyio
async def test_a_crash_looping_replica_counts_no_delivery_per_restart(
    redis_prefix: str, tmp_path: Path
) -> None:
    """Killed with its entries in flight, four times over, with --max-deliveries 2: each
    start read its own entries again with XREADGROUP ... 0, which counted a delivery, so
    healthy ids were dead-lettered (job.failed) after two restarts. They are not now."""
    config = SimulatorConfig(jobs=10, faults=FaultConfig(latency_ms=1500, latency_jitter=False))
    async with queue(redis_prefix, tmp_path, config) as q:
        ids = q.sim.job_ids()
        await q.enqueue(ids)
        flags = ("--batch-size", "5", "--concurrency", "2", "--rate", "100",
                 "--max-deliveries", "2")  # fmt: skip
        for _ in range(4):
            calls = q.sim.stats.calls
            replica = await q.start("looping", *flags)

            async def both_batches_sent(before: int = calls) -> bool:
                return q.sim.stats.calls >= before + 2

            await until(both_batches_sent)
            replica.process.kill()
            await replica.process.wait()
        pending: Any = await q.redis.xpending_range(q.stream, GROUP, "-", "+", 100)
        assert len(pending) == len(ids)  # one entry per id, each still delivered once
        assert {p["times_delivered"] for p in pending} == {1}
        last = await q.start("looping", *flags)

        async def settled() -> bool:
            return await q.pending() == 0

        await until(settled)
        await q.stop_all()
        dead: Any = await q.redis.xlen(q.stream + ":dead")
    assert dead == 0
    assert not last.named("job.failed") and not last.named("serve.dead_lettered")
    assert set(q.sim.deleted) == set(ids)


@pytest.mark.anyio
async def test_a_draining_replica_hands_its_pending_entries_over_within_seconds(
    redis_prefix: str, tmp_path: Path
) -> None:
    """SIGTERM to a replica holding entries it has not started: they waited reclaim_after
    (300 s by default) before the other replica took them. They are marked idle on the way
    out, so the other takes them at its next look; a replica leaving with nothing pending
    takes its consumer name out of the group."""
    config = SimulatorConfig(jobs=40, faults=FaultConfig(latency_ms=200, latency_jitter=False))
    async with queue(redis_prefix, tmp_path, config) as q:
        ids = q.sim.job_ids()
        await q.enqueue(ids)
        first = await q.start("first", "--batch-size", "2", "--concurrency", "1",
                              "--rate", "100", "--grace", "1")  # fmt: skip

        async def holding() -> bool:
            return await q.pending("first") >= 4

        await until(holding)
        first.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):
            await first.process.wait()
        (handed,) = first.named("serve.handed_over")
        assert handed["entries"] >= 2 and handed["consumer_removed"] is False
        second = await q.start("second", "--batch-size", "10", "--rate", "100")

        async def settled() -> bool:
            return len(q.sim.deleted) == len(ids) and await q.pending() == 0

        await until(settled, 30)  # reclaim_after is 300 s
        await q.stop_all()
        consumers: Any = await q.redis.xinfo_consumers(q.stream, GROUP)
    assert second.named("serve.stopped")[0]["reclaimed"] >= handed["entries"]
    (left,) = second.named("serve.handed_over")
    assert (left["entries"], left["consumer_removed"]) == (0, True)
    assert "second" not in {c["name"].decode() for c in consumers}


@pytest.mark.anyio
async def test_a_second_sigterm_cuts_the_grace_period_short(
    redis_prefix: str, tmp_path: Path
) -> None:
    """Calls taking 20 s and a minute of grace: a first SIGTERM waits for them, a second
    ends the replica at once (run did so; serve waited the whole grace), the entries left
    pending and handed over."""
    faults = FaultConfig(latency_ms=20_000, latency_jitter=False)
    async with queue(redis_prefix, tmp_path, SimulatorConfig(jobs=10, faults=faults)) as q:
        await q.enqueue(q.sim.job_ids())
        replica = await q.start("r1", "--batch-size", "5", "--concurrency", "2",
                                "--rate", "100", "--grace", "60")  # fmt: skip

        async def on_the_wire() -> bool:
            return q.sim.stats.calls >= 2

        await until(on_the_wire)
        replica.process.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            return bool(replica.named("serve.draining"))

        await until(draining)
        replica.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(15):  # far less than the grace period
            await replica.process.wait()
        pending = await q.pending()
    assert replica.process.returncode == 0
    assert [e["immediate"] for e in replica.named("serve.interrupted")] == [False, True]
    assert pending == 10
    assert replica.named("serve.handed_over")[0]["entries"] == 10


@pytest.mark.anyio
async def test_entries_handed_over_through_a_rolling_update_count_no_delivery_per_hop(
    redis_prefix: str, tmp_path: Path
) -> None:
    """Replicas drained one after another (a rolling update while the rate limit holds a
    backlog): each hand-over's XAUTOCLAIM counted a delivery, so with --max-deliveries 2
    entries never sent were dead-lettered and their ids ended failed after two hops. A
    hand-over gives the delivery back (XCLAIM ... RETRYCOUNT): no hop counts."""
    config = SimulatorConfig(jobs=40, faults=FaultConfig(latency_ms=200, latency_jitter=False))
    async with queue(redis_prefix, tmp_path, config) as q:
        ids = q.sim.job_ids()
        await q.enqueue(ids)
        slow = ("--batch-size", "2", "--concurrency", "1", "--rate", "2", "--grace", "1",
                "--max-deliveries", "2")  # fmt: skip
        for hop in range(3):
            replica = await q.start(f"hop{hop}", *slow)

            async def holding(name: str = replica.name) -> bool:
                return await q.pending(name) >= 4

            await until(holding)
            replica.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(15):
                await replica.process.wait()
        await q.start("last", "--batch-size", "10", "--rate", "100", "--max-deliveries", "2")

        async def settled() -> bool:
            return await q.pending() == 0 and await q.entries_read() == len(ids)

        await until(settled, 30)
        await q.stop_all()
        dead: Any = await q.redis.xlen(q.stream + ":dead")
    failed = [e["job_id"] for r in q.replicas for e in r.named("job.failed")]
    assert (dead, failed) == (0, [])
    assert set(q.sim.deleted) == set(ids)
