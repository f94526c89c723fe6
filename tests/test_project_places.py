"""A job is its project and id (issue 25's leftovers), through the real path: ``run`` and
``serve`` in processes of their own against ``devserver-reaper simulate`` (its IAM too),
``serve`` over real Redis with entries put there by the real ``enqueue``.

What is pinned: a line naming the default project at another region (or endpoint) is
rejected with the reason, never a second target, so an id is not sent twice (once
``deleted``, once ``absent``) nor deleted under a region its calls never went to; a line
naming another region at the settings' own endpoint without a project id is that region's
project (IAM's answer), never the default project relabelled."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import redis.asyncio as aioredis

from tests.benchmarks import harness
from tests.test_serve_regions import AK, SK, Region, enqueue, rows, serving, until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env"), pytest.mark.timeout(120)]

ELSEWHERE = "names project project-a at region cn-east-3, {url}, but the settings have it at " \
            "region cn-north-4, {url}: a project is in one region, and its ids are not sent " \
            "to two places"  # fmt: skip


def _env(home: Region, *, iam: Region) -> dict[str, str]:
    """run's environment: ``home``'s project the default, IAM asked at ``iam``."""
    return harness.clean_env() | {
        "REAPER_ENDPOINT": home.url, "REAPER_PROJECT_ID": home.project,
        "REAPER_REGION": home.region, "REAPER_IAM_ENDPOINT": iam.url,
        "REAPER_AK": AK, "REAPER_SK": SK, "REAPER_LOG_FORMAT": "json",
    }  # fmt: skip


def _lines(north: Region) -> list[dict[str, str]]:
    """An id plain, then again naming the default project at another region (the
    settings' endpoint); another id named so alone; a third naming that region only."""
    a, b, c = north.ids[:3]
    away = {"region": "cn-east-3", "endpoint": north.url}
    return [{"id": a}, {"id": a, "project_id": "project-a", **away},
            {"id": b, "project_id": "project-a", **away}, {"id": c, **away}]  # fmt: skip


@pytest.mark.anyio
async def test_run_sends_a_job_once_and_rejects_its_project_named_at_another_region(
    tmp_path: Path,
) -> None:
    north = Region("project-a", "cn-north-4", 1, tmp_path,
                   flags=("--iam-project", "cn-east-3=project-e"))  # fmt: skip
    north.start()
    try:
        a, b, c = north.ids[:3]
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in _lines(north)))
        results = tmp_path / "results.jsonl"
        env = _env(north, iam=north)
        done = await anyio.run_process(
            [sys.executable, "-m", "worker", "run", "--input", str(source), "--yes",
             "--results", str(results), "--max-attempts", "1", "--batch-size", "1"],
            env=env, check=False,
        )  # fmt: skip
        deleted = (await north.control("deleted"))["ids"]
        jobs = set((await north.control("jobs"))["ids"])
    finally:
        north.stop()
    by_line: dict[str, list[dict[str, Any]]] = {}
    for row in map(orjson.loads, results.read_bytes().splitlines()):
        by_line.setdefault(row["job_id"], []).append(row)
    assert deleted == [a], done.stdout.decode()[-3000:]
    assert b in jobs and c in jobs
    reason = ELSEWHERE.format(url=north.url)
    assert sorted((r["outcome"], r.get("reason") or "") for r in by_line[a]) == [
        ("deleted", ""), ("rejected", reason)
    ]  # fmt: skip
    assert [(r["outcome"], r.get("reason")) for r in by_line[b]] == [("rejected", reason)]
    # c's region has a project of its own (IAM's answer), which this simulator does not
    # serve: refused there, c stays, never deleted under the default project's name.
    assert all(r["outcome"] != "deleted" for r in by_line.get(c, []))
    assert done.returncode == 78, done.stderr.decode()[-2000:]


@pytest.mark.anyio
async def test_serve_sends_a_job_once_and_dead_letters_its_project_named_at_another_region(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    stream = redis_prefix + "ids"
    north = Region("project-a", "cn-north-4", 1, tmp_path,
                   flags=("--iam-project", "cn-east-3=project-e"))  # fmt: skip
    north.start()
    try:
        a, b, c = north.ids[:3]
        lines = _lines(north)
        await enqueue(stream, tmp_path, lines[:1])
        await enqueue(stream, tmp_path, lines[1:])
        async with serving(stream, north, tmp_path, "--iam-endpoint", north.url):

            async def settled() -> bool:
                info: Any = await redis_client.xpending(stream, "reapers")
                done = await rows(redis_client, stream + ":outcomes")
                return len(done) == 4 and int(info["pending"]) == 0

            await until(settled)
        deleted = (await north.control("deleted"))["ids"]
        jobs = set((await north.control("jobs"))["ids"])
    finally:
        north.stop()
    outcomes = await rows(redis_client, stream + ":outcomes")
    reason = ELSEWHERE.format(url=north.url)
    assert deleted == [a]
    assert b in jobs and c in jobs
    assert sorted((r["job_id"], r["outcome"], r.get("error_msg")) for r in outcomes) == sorted(
        [(a, "deleted", ""), (a, "rejected", reason), (b, "rejected", reason),
         (c, "rejected", "project project-e is not in allowed_projects")]
    )  # fmt: skip
    dead = await rows(redis_client, stream + ":dead")
    assert sorted(d["reason"] for d in dead) == sorted(
        [reason, reason, "project project-e is not in allowed_projects"]
    )


@pytest.mark.anyio
async def test_run_says_project_resolved_for_a_lines_region_as_serve_does(tmp_path: Path) -> None:
    """One door for a region's project: run's look-up of a line's region says
    ``project.resolved`` (once) as serve's and the settings' own do."""
    north = Region("project-a", "cn-north-4", 1, tmp_path)
    east = Region("project-e", "cn-east-3", 2, tmp_path)
    north.start()
    east.start()
    try:
        source = tmp_path / "in.jsonl"
        lines = [{"id": i, "region": "cn-east-3", "endpoint": east.url} for i in east.ids[:3]]
        source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        env = _env(north, iam=east)
        done = await anyio.run_process(
            [sys.executable, "-m", "worker", "run", "--input", str(source), "--yes"],
            env=env, check=False,
        )  # fmt: skip
        deleted = (await east.control("deleted"))["ids"]
    finally:
        north.stop()
        east.stop()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert sorted(deleted) == sorted(east.ids[:3])
    events = [orjson.loads(line) for line in done.stdout.splitlines() if line.startswith(b"{")]
    resolved = [e for e in events if e["event"] == "project.resolved"]
    assert [(e["region"], e["project_id"], e["iam_endpoint"]) for e in resolved] == [
        ("cn-east-3", "project-e", east.url)
    ]
