"""serve for many projects and regions, as it runs: two ``devserver-reaper simulate``
processes (two regions, each one project), real Redis, ids put on the stream by
``enqueue``'s code from JSON Lines naming their project and region (the command itself in
the first test, in-process in the others: its start-up cost more than their work), and a
real ``serve`` subprocess.

What is pinned: each entry's ids go to its own project at its own endpoint (each simulator
knows one project id, and 404s any other in the path); an entry naming a project outside
``allowed_projects`` is dead-lettered with the reason and nothing is sent for it; one
region stopped leaves the other served and its own entries pending (not acknowledged, no
outcome), then served when it comes back; and the metrics' project and region labels are
bounded by the settings, however many an entry names.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from tests.benchmarks import harness
from tests.conftest import REDIS_URL
from tests.e2e import Served, collect
from tests.e2e import until as until  # the one poll, for the modules importing it here
from tests.test_serve_e2e import enqueue_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]

AK, SK = "AKSIMREGIONS0000000A", "sim-regions-secret-key"
GROUP = "reapers"


@dataclass
class Region:
    """One simulator process: one project in one region."""

    project: str
    region: str
    seed: int
    tmp: Path
    url: str = ""
    ids: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    flags: tuple[str, ...] = ()

    def start(self, port: int = 0) -> None:
        self.launch(port)
        self.listening()

    def launch(self, port: int = 0) -> None:
        """Start the process; :meth:`listening` waits for it (two start side by side)."""
        ids_file = self.tmp / f"{self.project}-ids.txt"
        args = [sys.executable, "-m", "worker", "simulate", "--port", str(port), "--jobs", "40",
                "--seed", str(self.seed), "--project-id", self.project, "--region", self.region,
                "--ak", AK, "--sk", SK, "--ids-file", str(ids_file), *self.flags]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=harness.clean_env(),
        )

    def listening(self) -> None:
        """Until the process says where it listens; its URL and job ids then."""
        assert self.proc is not None and self.proc.stdout is not None
        ids_file = self.tmp / f"{self.project}-ids.txt"
        line = self.proc.stdout.readline()
        assert "listening on" in line, line
        self.url = line.split("listening on ", 1)[1].split()[0]
        self.ids = ids_file.read_text().split()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def control(self, what: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/_sim/{what}") as r:
            return await r.json()  # type: ignore[no-any-return]


@contextmanager
def regions(tmp: Path, *south_flags: str) -> Iterator[tuple[Region, Region]]:
    """Two simulators; ``south_flags`` for project-b's, which answers IAM in the tests of
    entries naming a region without its project id."""
    north = Region("project-a", "cn-north-4", 1, tmp)
    south = Region("project-b", "cn-south-1", 2, tmp, flags=south_flags)
    try:
        north.launch()
        south.launch()
        north.listening()
        south.listening()
        yield north, south
    finally:
        north.stop()
        south.stop()


class Serve(Served):
    async def metrics(self) -> str:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.port}/metrics") as r,
        ):
            return await r.text()

    async def ready(self) -> int:
        """The status of its ``/readyz``."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.port}/readyz") as r,
        ):
            return r.status


@asynccontextmanager
async def serving(stream: str, home: Region, tmp: Path, *flags: str) -> AsyncIterator[Serve]:
    """``serve`` with ``home`` as its default target, until the block ends (SIGTERM)."""
    command = [sys.executable, "-m", "worker", "serve", "--endpoint", home.url,
               "--project-id", home.project, "--region", home.region, "--ak", AK,
               "--stream", stream, "--group", GROUP, "--consumer", "r1",
               "--redis-url", REDIS_URL, "--http-port", "0", "--http-host", "127.0.0.1",
               "--log-format", "json", "--reclaim-after", "1", "--max-deliveries", "1000",
               "--max-attempts", "2", "--connect-timeout", "1", "--read-timeout", "2",
               "--batch-size", "5", *flags]  # fmt: skip
    with (tmp / "serve.err").open("wb") as errors:
        process = await anyio.open_process(
            command, env=harness.clean_env() | {"REAPER_SK": SK}, stderr=errors
        )
    serve = Serve(process)
    async with anyio.create_task_group() as group:
        group.start_soon(collect, serve)
        try:
            with anyio.fail_after(20):
                await serve.started.wait()
            yield serve
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    with anyio.move_on_after(20):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.aclose()


async def enqueue(stream: str, tmp: Path, lines: list[dict[str, str]]) -> dict[str, Any]:
    """Through the ``enqueue`` command's own code, from a JSON Lines file, every line taken."""
    source = tmp / f"in-{len(list(tmp.glob('in-*')))}.jsonl"
    source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    summary = await enqueue_file(source, stream)
    assert summary["rejected"] == 0, summary
    return summary


async def put(stream: str, tmp: Path, lines: list[dict[str, str]]) -> None:
    """Through ``enqueue``'s own code from a JSON Lines file, in this process: what the
    command does but its start-up (a second or more of imports per call, under load
    several). :func:`enqueue` runs the command itself."""
    from worker.commands.enqueue import enqueue as enqueue_lines
    from worker.settings import Settings

    source = tmp / f"in-{len(list(tmp.glob('in-*')))}.jsonl"
    source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    settings = Settings(stream=stream, redis_url=REDIS_URL)
    assert await enqueue_lines(str(source), "jsonl", settings, None) == 0


async def pending(client: aioredis.Redis, stream: str) -> int:
    info: Any = await client.xpending(stream, GROUP)
    return int(info["pending"])


async def served_around(
    client: aioredis.Redis, stream: str, tmp: Path, north: Region, lines: list[dict[str, str]],
    served: int,
) -> None:  # fmt: skip
    """The first ``served`` of ``north``'s ids enqueued, ``lines`` (of a region that cannot
    be served now) after its first 5, so the later ones must pass it: waits for them all
    deleted and acknowledged with ``lines`` pending, then checks they alone have outcomes."""
    ids = north.ids[:served]
    await put(stream, tmp, [{"id": i} for i in ids[:5]])
    await put(stream, tmp, lines)
    await put(stream, tmp, [{"id": i} for i in ids[5:]])

    async def north_done() -> bool:  # deleted, and their entries acknowledged
        deleted = len((await north.control("deleted"))["ids"]) == len(ids)
        return deleted and await pending(client, stream) == len(lines)

    await until(north_done)
    outcomes = await rows(client, stream + ":outcomes")
    assert sorted(r["job_id"] for r in outcomes) == sorted(ids)


async def rows(client: aioredis.Redis, key: str) -> list[dict[str, str]]:
    found: Any = await client.xrange(key)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in found]


async def settled(client: aioredis.Redis, stream: str, outcomes: int) -> bool:
    """Whether ``stream``'s group has nothing pending and its outcomes stream holds
    ``outcomes`` rows: every entry served and acknowledged."""
    info: Any = await client.xpending(stream, GROUP)
    return len(await rows(client, stream + ":outcomes")) == outcomes and not int(info["pending"])


def named(region: Region, ids: list[str], **extra: str) -> list[dict[str, str]]:
    """JSON Lines naming ``region``'s project, region and endpoint beside each id."""
    place = {"project_id": region.project, "region": region.region, "endpoint": region.url}
    return [{"id": i, **place, **extra} for i in ids]


@pytest.mark.anyio
async def test_entries_of_two_projects_go_to_their_own_regions_and_another_is_dead_lettered(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Plain ids go to the default project, ids naming project-b to project-b's simulator
    (which 404s any other project in the path: a deletion there is proof of the path); an
    entry naming a project outside allowed_projects is dead-lettered with the reason, its
    job untouched, and no call goes out for it."""
    stream = redis_prefix + "ids"
    with regions(tmp_path) as (north, south):
        plain = north.ids[:8]
        theirs = south.ids[:8]
        kept = south.ids[8]  # named for a project serve may not touch
        lines = [{"id": i} for i in plain] + named(south, theirs)
        lines += [{"id": kept, "project_id": "project-z", "endpoint": south.url}]
        summary = await enqueue(stream, tmp_path, lines)
        assert summary["enqueued"] == 17
        entry: Any = await redis_client.xrange(stream, count=20)
        assert {k.decode(): v.decode() for k, v in entry[8][1].items()} == {
            "id": theirs[0], "project_id": "project-b", "region": "cn-south-1",
            "endpoint": south.url,
        }  # fmt: skip
        async with serving(stream, north, tmp_path, "--allowed-projects",
                           "project-a,project-b") as serve:  # fmt: skip
            await until(partial(settled, redis_client, stream, 17))
            text = await serve.metrics()

        outcomes = {r["job_id"]: r for r in await rows(redis_client, stream + ":outcomes")}
        assert {outcomes[i]["outcome"] for i in plain + theirs} == {"deleted"}
        assert all("project_id" not in outcomes[i] for i in plain)  # as one project's were
        assert {(outcomes[i]["project_id"], outcomes[i]["region"]) for i in theirs} == {
            ("project-b", "cn-south-1")
        }
        assert sorted((await north.control("deleted"))["ids"]) == sorted(plain)
        assert sorted((await south.control("deleted"))["ids"]) == sorted(theirs)
        assert kept in (await south.control("jobs"))["ids"]

        refused = outcomes[kept]
        assert refused["outcome"] == "rejected"
        assert refused["error_msg"] == "project project-z is not in allowed_projects"
        dead = await rows(redis_client, stream + ":dead")
        assert [d["reason"] for d in dead] == ["project project-z is not in allowed_projects"]
        assert orjson.loads(dead[0]["payload"])["id"] == kept
        warned = serve.named("serve.dead_lettered")
        assert [w["reason"] for w in warned] == [dead[0]["reason"]]
        events = {e["job_id"]: e for e in serve.events if e.get("event") == "job.deleted"}
        assert {events[i]["project_id"] for i in theirs} == {"project-b"}
        assert all("project_id" not in events[i] for i in plain)

        # Every call project-b's simulator had was counted under project-b: none for z.
        calls = _samples(text, "devserver_reaper_api_calls_total")
        to_south = sum(v for labels, v in calls if labels["project_id"] == "project-b")
        assert to_south == (await south.control("stats"))["calls"] > 0
        assert not [labels for labels, v in calls if labels["project_id"] not in
                    ("project-a", "project-b")]  # fmt: skip
        dead_by = {lb["reason"]: v for lb, v in
                   _samples(text, "devserver_reaper_dead_lettered_total")}  # fmt: skip
        assert dead_by["target"] == 1


@pytest.mark.anyio
async def test_a_stopped_region_leaves_the_other_served_and_its_own_entries_pending(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """project-b's simulator killed: project-a's entries are still deleted while
    project-b's stay pending, acknowledged by no one and given no outcome (not absent, not
    failed); project-b's simulator back on its port, they are deleted at once: its probe is
    answered and what was handed back is read again, not left for a reclaim (300 s)."""
    stream = redis_prefix + "ids"
    with regions(tmp_path) as (north, south):
        async with serving(stream, north, tmp_path, "--allowed-projects",
                           "project-a,project-b", "--reclaim-after", "300") as serve:  # fmt: skip
            port = south.port
            south.stop()
            waiting = south.ids[:10]
            # project-b's between project-a's: the later ones must pass a region that is down.
            await served_around(redis_client, stream, tmp_path, north, named(south, waiting), 20)

            async def said() -> bool:  # its batch may still be spending its attempts
                return bool(serve.named("serve.region_paused"))

            await until(said)
            paused = serve.named("serve.region_paused")
            assert [(p["project_id"], p["region"]) for p in paused] == [("project-b", "cn-south-1")]
            down = {
                (lb["project_id"], lb["region"]): v
                for lb, v in _samples(await serve.metrics(), "devserver_reaper_api_down")
            }
            assert down[("project-b", "cn-south-1")] == 1
            assert down[("project-a", "cn-north-4")] == 0
            assert await serve.ready() == 200  # still doing work: one region's outage is not ours

            south.start(port)

            async def south_done() -> bool:
                return await pending(redis_client, stream) == 0

            await until(south_done, timeout=50)  # the breaker's cool-down is 30 s at most
            last = {r["job_id"]: r for r in await rows(redis_client, stream + ":outcomes")}
            assert {last[i]["outcome"] for i in waiting} == {"deleted"}
            assert sorted((await south.control("deleted"))["ids"]) == sorted(waiting)
            assert serve.named("serve.region_resumed")


@pytest.mark.anyio
async def test_an_allowed_project_named_at_the_wrong_region_fails_alone_the_replica_stays_ready(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """project-c is allowed but named at project-b's endpoint, whose gateway 404s it: its
    entry ends failed and dead-lettered after max_deliveries with the 404, while the other
    projects' entries are deleted and /readyz stays 200 (a producer's mistake must not stop
    the others; on the old code the whole replica paused, unready)."""
    stream = redis_prefix + "ids"
    with regions(tmp_path) as (north, south):
        allowed = "project-a,project-b,project-c"
        async with serving(stream, north, tmp_path, "--allowed-projects", allowed,
                           "--max-deliveries", "2") as serve:  # fmt: skip
            stray = south.ids[30]
            lines = [{"id": stray, "project_id": "project-c", "endpoint": south.url}]
            lines += named(south, south.ids[:5]) + [{"id": i} for i in north.ids[:5]]
            await put(stream, tmp_path, lines)

            await until(partial(settled, redis_client, stream, 11), timeout=60)
            assert await serve.ready() == 200
        assert not serve.named("serve.paused")
        outcomes = {r["job_id"]: r for r in await rows(redis_client, stream + ":outcomes")}
        assert {outcomes[i]["outcome"] for i in south.ids[:5] + north.ids[:5]} == {"deleted"}
        failed = outcomes[stray]
        assert (failed["outcome"], failed["http_status"], failed["project_id"]) == (
            "failed", "404", "project-c"
        )  # fmt: skip
        dead = await rows(redis_client, stream + ":dead")
        assert len(dead) == 1 and orjson.loads(dead[0]["payload"])["id"] == stray
        assert stray in (await south.control("jobs"))["ids"]


@pytest.mark.anyio
async def test_a_thousand_projects_and_a_hundred_regions_named_by_entries_add_no_series(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """The project_id and region labels take values from the settings only: entries naming
    1,000 projects serve may not touch, and 100 regions of an allowed one, leave /metrics
    with the series of the two configured projects (regions outside the known ones are
    'other')."""
    stream = redis_prefix + "ids"
    with regions(tmp_path) as (north, south):
        async with serving(stream, north, tmp_path, "--allowed-projects", "project-a,project-b",
                           "--rate", "200", "--burst", "20") as serve:  # fmt: skip
            before = await serve.metrics()
            lines = [{"id": f"job-{n}", "project_id": f"stranger-{n}", "endpoint": south.url}
                     for n in range(1000)]  # fmt: skip
            lines += [{"id": south.ids[n % 40], "project_id": "project-b",
                       "region": f"zz-nowhere{n}", "endpoint": south.url}
                      for n in range(100)]  # fmt: skip
            await put(stream, tmp_path, lines)

            async def settled() -> bool:
                info: Any = await redis_client.xpending(stream, GROUP)
                groups: Any = await redis_client.xinfo_groups(stream)
                return int(info["pending"]) == 0 and int(groups[0]["entries-read"] or 0) == 1100

            await until(settled, timeout=90)
            after = await serve.metrics()
        values = _label_values(after)
        assert values["project_id"] <= {"project-a", "project-b", ""}
        assert values["region"] <= {"cn-north-4", "other", ""}
        assert "other" in values["region"]  # the zz- regions were served, under one label
        grown = _series(after) - _series(before)
        # project-b met under one region label: its 4 outcomes but rejected, 3 calls by 8
        # status classes, throttled and api_down.
        assert len(grown) == 4 + 3 * 8 + 1 + 1, sorted(grown)
        assert {(dict(labels)["project_id"], dict(labels)["region"]) for _, labels in grown} == {
            ("project-b", "other")
        }


def by_region(region: Region, ids: list[str], name: str = "") -> list[dict[str, str]]:
    """JSON Lines naming a region (``name``, else ``region``'s) and its endpoint, but no
    project id: serve asks IAM for it."""
    return [{"id": i, "region": name or region.region, "endpoint": region.url} for i in ids]


@pytest.mark.anyio
async def test_an_entry_naming_a_region_alone_gets_its_project_from_iam_once_held_to_the_allowed(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Entries naming cn-south-1 and no project id are deleted in project-b, the project
    IAM (project-b's simulator) names after it, with one IAM call for all of them; an entry
    naming a region IAM has no project of is dead-lettered with IAM's answer, and one whose
    region's project is not in allowed_projects with that reason; nothing is sent for them,
    and the default project's entries are deleted meanwhile. (The old code dead-lettered
    every entry naming a region alone.)"""
    stream = redis_prefix + "ids"
    with regions(tmp_path, "--iam-project", "cn-east-9=project-z") as (north, south):
        async with serving(stream, north, tmp_path, "--allowed-projects", "project-a,project-b",
                           "--iam-endpoint", south.url) as serve:  # fmt: skip
            found = south.ids[:10]
            plain = north.ids[:5]
            nowhere, stranger = south.ids[20], south.ids[21]
            await put(stream, tmp_path, by_region(south, found[:5]) + [{"id": i} for i in plain])
            lines = by_region(south, found[5:]) + by_region(south, [nowhere], "cn-east-3")
            await put(stream, tmp_path, lines + by_region(south, [stranger], "cn-east-9"))

            await until(partial(settled, redis_client, stream, 17))
        outcomes = {r["job_id"]: r for r in await rows(redis_client, stream + ":outcomes")}
        assert {outcomes[i]["outcome"] for i in found + plain} == {"deleted"}
        assert {(outcomes[i]["project_id"], outcomes[i]["region"]) for i in found} == {
            ("project-b", "cn-south-1")
        }
        assert sorted((await south.control("deleted"))["ids"]) == sorted(found)
        assert sorted((await north.control("deleted"))["ids"]) == sorted(plain)
        stats = await south.control("stats")
        assert stats["iam_calls"] == 3  # cn-south-1 once for its 10 entries, and the two others
        jobs = (await south.control("jobs"))["ids"]
        assert nowhere in jobs and stranger in jobs
        dead = {orjson.loads(d["payload"])["id"]: d["reason"]
                for d in await rows(redis_client, stream + ":dead")}  # fmt: skip
        assert dead[stranger] == "project project-z is not in allowed_projects"
        assert dead[nowhere].startswith("the project of region cn-east-3 was not found in IAM")
        assert "IAM has no project named cn-east-3" in dead[nowhere]
        assert len(dead) == 2
        assert outcomes[nowhere]["outcome"] == outcomes[stranger]["outcome"] == "rejected"
        failed = serve.named("serve.project_lookup_failed")
        assert [(f["region"], f["entries"]) for f in failed] == [("cn-east-3", "dead-lettered")]


@pytest.mark.anyio
async def test_iam_refusing_the_project_list_dead_letters_naming_the_permission_others_go_on(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """IAM answers 403: the entry naming a region alone is dead-lettered with the reason,
    which names the permission to grant; the replica is not paused and stays ready, and
    the other entries are deleted."""
    stream = redis_prefix + "ids"
    with regions(tmp_path, "--iam-forbidden") as (north, south):
        async with serving(stream, north, tmp_path, "--allowed-projects", "project-a,project-b",
                           "--iam-endpoint", south.url) as serve:  # fmt: skip
            refused = south.ids[:2]
            lines = by_region(south, refused) + named(south, south.ids[2:5])
            await put(stream, tmp_path, lines + [{"id": i} for i in north.ids[:5]])

            await until(partial(settled, redis_client, stream, 10))
            assert await serve.ready() == 200
        outcomes = {r["job_id"]: r for r in await rows(redis_client, stream + ":outcomes")}
        assert {outcomes[i]["outcome"] for i in south.ids[2:5] + north.ids[:5]} == {"deleted"}
        assert {outcomes[i]["outcome"] for i in refused} == {"rejected"}
        dead = await rows(redis_client, stream + ":dead")
        assert len(dead) == 2
        assert all("iam:projects:listProjects" in d["reason"] for d in dead), dead
        assert not serve.named("serve.paused")
        assert sorted((await south.control("deleted"))["ids"]) == sorted(south.ids[2:5])


@pytest.mark.anyio
async def test_iam_unreachable_leaves_the_region_pending_not_the_others_then_serves_it(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """IAM (project-b's simulator) is down: the entries naming cn-south-1 alone stay
    pending, no outcome, never dead-lettered, while the default project's are deleted; IAM
    back on its port, they are looked up again and deleted in project-b."""
    stream = redis_prefix + "ids"
    with regions(tmp_path) as (north, south):
        port = south.port
        async with serving(stream, north, tmp_path, "--allowed-projects", "project-a,project-b",
                           "--iam-endpoint", south.url) as serve:  # fmt: skip
            south.stop()
            waiting = south.ids[:6]
            await served_around(
                redis_client, stream, tmp_path, north, by_region(south, waiting), 10
            )
            assert not await rows(redis_client, stream + ":dead")

            async def said() -> bool:  # IAM is asked beside the intake: its failure may
                return bool(serve.named("serve.project_lookup_failed"))  # come after

            await until(said)
            failed = serve.named("serve.project_lookup_failed")
            assert {(f["region"], f["entries"]) for f in failed} == {
                ("cn-south-1", "left pending, read again later")
            }
            assert await pending(redis_client, stream) == len(waiting)  # still, none taken

            south.start(port)

            async def south_done() -> bool:
                return await pending(redis_client, stream) == 0

            await until(south_done)
            last = {r["job_id"]: r for r in await rows(redis_client, stream + ":outcomes")}
            assert {last[i]["outcome"] for i in waiting} == {"deleted"}
            assert {last[i]["project_id"] for i in waiting} == {"project-b"}
            assert sorted((await south.control("deleted"))["ids"]) == sorted(waiting)
            assert not await rows(redis_client, stream + ":dead")


@asynccontextmanager
async def hanging() -> AsyncIterator[str]:
    """A region whose API accepts connections and never answers: each call lasts its read
    timeout. Yields its URL."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 (anyio's)

    async def hold(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, hold)
        yield f"http://127.0.0.1:{port}"
        group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_hanging_region_holds_its_share_of_the_dispatchers_while_the_others_are_served(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """project-b's region hangs (each call lasts the read timeout): its batches, read
    first, hold one of the two dispatchers, never both, so project-a's entries are all
    deleted before project-b's first batch has spent its attempts; its entries stay
    pending, none with an outcome. (The old code gave project-b's batches both
    dispatchers: none of project-a's was deleted before.)"""
    stream = redis_prefix + "ids"
    with regions(tmp_path) as (north, _south):
        async with hanging() as url, serving(
            stream, north, tmp_path, "--allowed-projects", "project-a,project-b",
            "--concurrency", "2", "--read-timeout", "3", "--reclaim-after", "300",
        ) as serve:  # fmt: skip
            stuck = [f"job-{n}" for n in range(20)]
            served = north.ids[:10]
            place = {"project_id": "project-b", "region": "cn-south-1", "endpoint": url}
            await put(stream, tmp_path, [{"id": i, **place} for i in stuck]
                          + [{"id": i} for i in served])  # fmt: skip

            gave_out = ("serve.api_unavailable", "serve.region_paused")

            def ended() -> list[dict[str, Any]]:
                return [e for e in serve.events if e.get("event") in gave_out]

            async def stuck_ended() -> bool:
                return bool(ended())

            await until(stuck_ended, timeout=60)
            first = serve.events.index(ended()[0])
            before = {e["job_id"] for e in serve.events[:first] if e.get("event") == "job.deleted"}
            assert before == set(served)
            info: Any = await redis_client.xpending(stream, GROUP)
            assert int(info["pending"]) == len(stuck)
        outcomes = {r["job_id"] for r in await rows(redis_client, stream + ":outcomes")}
        assert outcomes == set(served)
        info = await redis_client.xpending(stream, GROUP)
        assert int(info["pending"]) == len(stuck)


@dataclass
class Gate:
    """A TCP front whose connections are accepted and held, nothing passed on, until
    ``opened`` is set (``held`` counts them); then each is piped to the port behind."""

    opened: anyio.Event = field(default_factory=anyio.Event)
    held: int = 0


@asynccontextmanager
async def gated(port: int) -> AsyncIterator[tuple[str, Gate]]:
    """A :class:`Gate` in front of ``127.0.0.1:port``; yields its URL and the gate."""
    gate = Gate()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    front = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 (anyio's)

    async def pipe(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            async for chunk in source:
                await sink.send(chunk)
            await sink.send_eof()

    async def hold(client: anyio.abc.SocketStream) -> None:
        async with client:
            gate.held += 1
            await gate.opened.wait()
            upstream = await anyio.connect_tcp("127.0.0.1", port)
            async with upstream, anyio.create_task_group() as group:
                group.start_soon(pipe, client, upstream)
                await pipe(upstream, client)

    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, hold)
        yield f"http://127.0.0.1:{front}", gate
        group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_entry_handed_back_while_its_other_batch_probes_gets_one_outcome_per_id(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """One entry of ten project-b ids (two batches of five) while project-b's region is
    down and both dispatchers are taken: its first batch fails and becomes the region's
    probe, its second is handed back when a dispatcher frees up (the default project's
    call, held at a gate, is let through). The region back, the probe deletes its five
    and the entry, read again, sends only the other five: every id one outcome, deleted,
    each row naming the entry. (The old code forgot the entry at the hand-back: the
    probe's rows named no entry and its next delivery sent all ten again, five of them
    ending absent.)"""
    stream = redis_prefix + "ids"
    with regions(tmp_path) as (north, south):
        async with gated(north.port) as (front, gate), serving(
            stream, north, tmp_path, "--allowed-projects", "project-a,project-b",
            "--endpoint", front, "--concurrency", "2", "--read-timeout", "60",
            "--reclaim-after", "300",
        ) as serve:  # fmt: skip
            await put(stream, tmp_path, [{"id": north.ids[0]}])

            async def north_held() -> bool:
                return gate.held > 0

            await until(north_held)  # one dispatcher waits on the default project's call
            port = south.port
            south.stop()
            ids = south.ids[:10]
            place = {"project_id": south.project, "region": south.region, "endpoint": south.url}
            fields: dict[Any, Any] = {"ids": orjson.dumps(ids).decode(), **place}
            added: Any = await redis_client.xadd(stream, fields)
            entry = added.decode()

            async def paused() -> bool:
                return bool(serve.named("serve.region_paused"))

            await until(paused)  # its first batch is the probe, its second waits
            gate.opened.set()

            async def handed_back() -> bool:
                return bool(await redis_client.hexists(stream + ":lasterror", entry))

            await until(handed_back)
            south.start(port)

            async def settled() -> bool:
                return await pending(redis_client, stream) == 0

            await until(settled, timeout=60)  # the breaker's cool-down is 30 s at most
        found = await rows(redis_client, stream + ":outcomes")
        mine = [r for r in found if r["job_id"] in ids]
        assert sorted(r["job_id"] for r in mine) == sorted(ids), mine
        assert {(r["outcome"], r["entry"]) for r in mine} == {("deleted", entry)}
        assert sorted((await south.control("deleted"))["ids"]) == sorted(ids)
        assert serve.named("serve.region_resumed")


@pytest.mark.anyio
async def test_iam_that_never_answers_does_not_hold_the_other_entries(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """IAM accepts the connection and never answers (each attempt lasts its timeout, three
    of them): the entries naming cn-south-1 alone wait for it, pending, while the default
    project's entries, enqueued after them, are all deleted before IAM's call gives out
    (no serve.project_lookup_failed yet). (The old code asked IAM inside the intake: it
    read nothing more until IAM's attempts were spent.)"""
    stream = redis_prefix + "ids"
    with regions(tmp_path) as (north, south):
        async with gated(south.port) as (iam, gate), serving(
            stream, north, tmp_path, "--allowed-projects", "project-a,project-b",
            "--iam-endpoint", iam, "--read-timeout", "60",
        ) as serve:  # fmt: skip
            waiting = south.ids[:3]
            plain = north.ids[:10]
            await put(stream, tmp_path, by_region(south, waiting) + [{"id": i} for i in plain])

            async def north_done() -> bool:
                # deleted as the simulator saw it, and acked: the simulator sees a batch's
                # deletions before serve writes their rows and acks (5 pending for 3 once,
                # CI at load ~1.5); only the entries waiting for IAM stay pending
                deleted = len((await north.control("deleted"))["ids"]) == len(plain)
                return deleted and await pending(redis_client, stream) == len(waiting)

            await until(north_done)
            assert gate.held == 1  # IAM was asked once, and holds the call
            assert not serve.named("serve.project_lookup_failed")  # it has not given out
            outcomes = await rows(redis_client, stream + ":outcomes")
            assert sorted(r["job_id"] for r in outcomes) == sorted(plain)
        assert not (await south.control("deleted"))["ids"]


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def _series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")  # a counter's start time, one per series
    }


def _label_values(text: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {"project_id": set(), "region": set()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name in found:
                if name in sample.labels:
                    found[name].add(sample.labels[name])
    return found


@pytest.mark.anyio
async def test_a_doubt_noted_for_one_projects_job_stays_with_it_not_another_of_that_id(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """One job id in two projects: the entry naming it in project-b was on the wire when its
    replica died (its note names the id; project-b's job is gone by that DELETE), the entry
    naming it in the default project never was. The doubt is project-b's: its id ends
    deleted unconfirmed (answer_lost), the default one deleted with its record. A doubt kept
    by the id alone went with the batch cut first, the default one here, and project-b's
    deletion was called absent."""
    stream = redis_prefix + "ids"
    with regions(tmp_path) as (north, south):
        shared = north.ids[0]  # project-b holds no job of this id: the dead replica's DELETE
        await put(stream, tmp_path, [{"id": shared}])  # the default project's, first
        await put(stream, tmp_path, named(south, [shared]))
        await redis_client.xgroup_create(stream, GROUP, id="0")
        read: Any = await redis_client.xreadgroup(GROUP, "died", {stream: ">"})
        _, away_entry = (entry_id.decode() for entry_id, _ in read[0][1])
        await redis_client.set(f"{stream}:sending:{away_entry}", f"+{shared}\n")
        async with serving(stream, north, tmp_path, "--allowed-projects",
                           "project-a,project-b"):  # fmt: skip

            async def settled() -> bool:
                done = await rows(redis_client, stream + ":outcomes")
                return len(done) == 2 and await pending(redis_client, stream) == 0

            await until(settled)
        outcomes = {r.get("project_id", "default"): r
                    for r in await rows(redis_client, stream + ":outcomes")}  # fmt: skip
        assert set(outcomes) == {"default", "project-b"}
        assert outcomes["default"]["outcome"] == "deleted"
        assert outcomes["default"]["error_msg"] == ""  # its answer listed it
        assert outcomes["project-b"]["outcome"] == "deleted", outcomes  # never absent
        assert outcomes["project-b"]["error_msg"] == "answer_lost"
        assert (await north.control("deleted"))["ids"] == [shared]
        assert (await south.control("stats"))["deletions"] == 0
