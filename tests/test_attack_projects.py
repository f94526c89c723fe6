"""Attacks on many projects and regions through the real path: two simulator processes
holding the *same* job ids (one seed) under two projects, real Redis, the real ``enqueue``
and ``serve``. An id deleted in a project it was not named for shows in that simulator's
deleted set."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import redis.asyncio as aioredis

from tests.benchmarks.harness import SimProcess, simulator
from tests.conftest import REDIS_URL
from tests.test_multiregion import _env as run_env
from tests.test_serve_regions import GROUP, Region, enqueue, rows, serving, until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]


@contextmanager
def home_and_away(tmp: Path) -> Iterator[tuple[SimProcess, SimProcess]]:
    """Two simulator processes, ``proj-home`` and ``proj-away`` in two regions, holding the
    same ten ids (one seed): an id sent to the wrong one shows in its deleted set."""
    with (
        simulator(tmp, jobs=10, project="proj-home", seed=3) as home,
        simulator(tmp, jobs=10, project="proj-away", seed=3, region="cn-east-3") as away,
    ):
        assert home.ids == away.ids
        yield home, away


async def served_until_settled(
    client: aioredis.Redis, stream: str, home: Region, tmp: Path, outcomes: int, *flags: str
) -> None:
    """``serve`` with ``home`` as its default until ``outcomes`` outcome rows are written
    and no entry is pending, then stopped."""
    async with serving(stream, home, tmp, *flags):

        async def settled() -> bool:
            info: Any = await client.xpending(stream, GROUP)
            done = await rows(client, stream + ":outcomes")
            return len(done) == outcomes and int(info["pending"]) == 0

        await until(settled)


def twins(tmp: Path) -> tuple[Region, Region]:
    """Two regions, one project each, holding the same ids (one seed)."""
    north = Region("project-a", "cn-north-4", 5, tmp)
    south = Region("project-b", "cn-south-1", 5, tmp)
    north.start()
    try:
        south.start()
    except BaseException:
        north.stop()
        raise
    assert north.ids == south.ids
    return north, south


@pytest.mark.anyio
async def test_serve_refuses_plain_entries_when_allowed_projects_leaves_out_the_default(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """allowed_projects names project-b only: an entry naming nothing would go to the
    default project-a, which the list leaves out; it is dead-lettered, nothing deleted in
    project-a (serve.md: "a list that leaves out the default project refuses the entries
    that name none too")."""
    stream = redis_prefix + "ids"
    north, south = twins(tmp_path)
    try:
        ids = north.ids[:4]
        place = {"project_id": south.project, "region": south.region, "endpoint": south.url}
        lines: list[dict[str, str]] = [{"id": i} for i in ids]
        lines += [{"id": i, **place} for i in north.ids[10:12]]
        await enqueue(stream, tmp_path, lines)
        await served_until_settled(
            redis_client, stream, north, tmp_path, 6, "--allowed-projects", "project-b"
        )
        assert (await north.control("deleted"))["ids"] == []
        assert sorted((await south.control("deleted"))["ids"]) == sorted(north.ids[10:12])
        outcomes = {r["job_id"]: r for r in await rows(redis_client, stream + ":outcomes")}
        assert {outcomes[i]["outcome"] for i in ids} == {"rejected"}
        assert {outcomes[i]["error_msg"] for i in ids} == {
            "project project-a is not in allowed_projects"
        }
        dead = await rows(redis_client, stream + ":dead")
        assert len(dead) == 4
    finally:
        north.stop()
        south.stop()


def _run(tmp: Path, home_url: str, source: Path) -> tuple[int, list[dict[str, Any]], str]:
    done = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--input", str(source), "--yes",
         "--batch-size", "5", "--rate", "200", "--max-attempts", "2"],
        env=run_env(home_url), capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    events = [orjson.loads(line) for line in done.stdout.splitlines() if line.startswith(b"{")]
    return done.returncode, events, done.stderr.decode()


def test_run_a_line_naming_its_project_under_another_spelling_is_rejected_not_sent_home(
    tmp_path: Path,
) -> None:
    """``PROJECT_ID`` or ``projectId`` in a JSON line is not the ``project_id`` field: read
    as it was, the key was ignored and the id deleted in the default project, which the
    line did not name (the other project holds the same id: one seed). Now the line is
    rejected with the field's right name, and neither project is sent it."""
    with home_and_away(tmp_path) as (home, away):
        ids = home.ids
        lines = [
            {"id": ids[0], "PROJECT_ID": "proj-away"},
            {"id": ids[1], "projectId": "proj-away", "Endpoint": away.url},
            {"id": ids[2]},
        ]
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        code, events, _ = _run(tmp_path, home.url, source)
        assert home.control("/_sim/deleted")["ids"] == [ids[2]]
        assert away.control("/_sim/deleted")["ids"] == []
        assert code == 1
        rejected = {e["line"]: e["reason"] for e in events if e.get("event") == "job.rejected"}
        assert rejected == {
            1: "names 'PROJECT_ID', which is not read: the field is 'project_id'",
            2: "names 'projectId', which is not read: the field is 'project_id'",
        }


@pytest.mark.parametrize(
    "header",
    [
        "id,project_id,PROJECT_ID",
        "id,projectId",
        "id,ID,project_id",
        "id,project id",
        "id,Project ID",
        "ID,Job ID",
    ],
)
def test_run_a_csv_header_naming_a_field_twice_or_misspelled_is_refused_before_a_call(
    tmp_path: Path, header: str
) -> None:
    """A header with ``project_id`` twice (in any case) left the row's first column to
    win, silently; ``projectId`` was ignored, every row going to the default project; a
    second ``id`` column was never read; a spreadsheet's ``Project ID`` (a space) was ignored
    too, and ``Job ID`` beside ``ID`` was a second id column nobody read. Each is refused
    (64) with nothing sent."""
    with simulator(tmp_path, jobs=4, project="proj-home", seed=3) as home:
        ids = home.ids
        body = "".join(f"{ids[n]},proj-away,proj-home\n" for n in range(2))
        source = tmp_path / "in.csv"
        source.write_text(f"{header}\n{body}")
        code, events, err = _run(tmp_path, home.url, source)
        said = err + "".join(str(e) for e in events)
        assert (code, home.stats()["calls"]) == (64, 0), said
        assert "the CSV header" in said and "Traceback" not in said


@pytest.mark.anyio
async def test_serve_an_entry_naming_its_project_under_another_spelling_is_dead_lettered(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """A producer writing ``PROJECT_ID`` on the stream meant project-b: the field was
    ignored and the id deleted in the default project-a. It is dead-lettered now."""
    stream = redis_prefix + "ids"
    north, south = twins(tmp_path)
    try:
        stray = north.ids[0]
        await redis_client.xadd(stream, {"id": stray, "PROJECT_ID": "project-b"})
        await redis_client.xadd(stream, {"id": north.ids[1]})
        await served_until_settled(
            redis_client, stream, north, tmp_path, 2, "--allowed-projects", "project-a,project-b"
        )
        assert (await north.control("deleted"))["ids"] == [north.ids[1]]
        assert (await south.control("deleted"))["ids"] == []
        dead = await rows(redis_client, stream + ":dead")
        assert [d["reason"] for d in dead] == [
            "names 'PROJECT_ID', which is not read: the field is 'project_id'"
        ]
    finally:
        north.stop()
        south.stop()


def test_discover_refuses_one_project_named_at_two_endpoints(tmp_path: Path) -> None:
    """One project reached through two endpoints (here 127.0.0.1 and localhost: a public
    and a private endpoint in the cloud) was scanned twice into one plan: its jobs listed
    twice and counted twice against max_fraction, and ``run --plan`` then refused the plan
    as altered. Refused (64) before any listing, no plan written."""
    with simulator(tmp_path, jobs=10, project="proj-home", seed=3) as home:
        other = home.url.replace("127.0.0.1", "localhost")
        plan = tmp_path / "p.plan"
        done = subprocess.run(
            [sys.executable, "-m", "worker", "discover", "--project", f"proj-home@{home.url}",
             "--project", f"proj-home@{other}", "--all", "--plan", str(plan)],
            env=run_env(home.url), capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        said = (done.stdout + done.stderr).decode()
        assert (done.returncode, plan.exists(), home.stats()["calls"]) == (64, False, 0), said
        assert "project proj-home is named twice" in said and "Traceback" not in said


@pytest.mark.anyio
async def test_a_line_whose_endpoint_is_another_regions_is_rejected_not_mislabelled(
    redis_prefix: str, tmp_path: Path
) -> None:
    """A line naming region cn-north-4 and the public endpoint of cn-south-1 was sent to
    cn-south-1 while its outcome named cn-north-4 (the endpoint wins, the region is a
    label). The real ``enqueue`` now rejects it with both regions named, and puts nothing
    on the stream; a private or loopback endpoint says nothing of its region and passes."""
    stream = redis_prefix + "ids"
    source = tmp_path / "in.jsonl"
    lines = [
        {"id": "job-1", "project_id": "p", "region": "cn-north-4",
         "endpoint": "https://modelarts.cn-south-1.myhuaweicloud.com"},
        {"id": "job-2", "project_id": "p", "region": "cn-north-4",
         "endpoint": "https://modelarts.cn-north-4.myhuaweicloud.com/"},
        {"id": "job-3", "project_id": "p", "region": "cn-south-1",
         "endpoint": "http://127.0.0.1:9"},
    ]  # fmt: skip
    source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    done = await anyio.run_process(
        [sys.executable, "-m", "worker", "enqueue", "--input", str(source), "--stream", stream,
         "--redis-url", REDIS_URL, "--log-format", "json"],
        env=run_env("http://127.0.0.1:9"), check=False,
    )  # fmt: skip
    said = (done.stdout + done.stderr).decode()
    summary = orjson.loads(done.stdout.splitlines()[-1])
    assert (summary["enqueued"], summary["rejected"]) == (2, 1), said
    assert (
        "endpoint https://modelarts.cn-south-1.myhuaweicloud.com is region cn-south-1's, "
        "not region cn-north-4's"
    ) in said


def _schema(ledger: Path) -> str:
    with sqlite3.connect(ledger) as conn:
        (value,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return str(value)


def test_a_ledger_whose_lines_named_projects_is_one_older_code_refuses(tmp_path: Path) -> None:
    """Code from before many projects (03e2d18) resumed a ledger of mixed projects as its
    own: it re-sent project B's open ids to its default project A (tried by hand: 6 ids
    sent to A). It checks schema_version, so such a ledger now says 2 (03e2d18 then exits
    78, nothing sent, tried by hand); one project's ledger stays 1, which it still opens.
    Today's code resumes both."""
    with (
        simulator(tmp_path, jobs=6, project="proj-home", seed=3) as home,
        simulator(tmp_path, jobs=6, project="proj-away", seed=4, region="cn-east-3") as away,
    ):
        plain = tmp_path / "plain.txt"
        plain.write_text("\n".join(home.ids[:3]) + "\n")
        mixed = tmp_path / "mixed.jsonl"
        lines = [{"id": home.ids[3]}]
        lines += [{"id": i, "project_id": "proj-away", "endpoint": away.url} for i in away.ids]
        mixed.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        for source, ledger, version in ((plain, "one.db", "1"), (mixed, "two.db", "2")):
            for _ in range(2):  # made, then resumed by today's code
                done = subprocess.run(
                    [sys.executable, "-m", "worker", "run", "--input", str(source), "--yes",
                     "--ledger", str(tmp_path / ledger)],
                    env=run_env(home.url), capture_output=True, timeout=120, check=False,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr.decode()[-800:]
            assert _schema(tmp_path / ledger) == version
        assert len(away.control("/_sim/deleted")["ids"]) == 6
