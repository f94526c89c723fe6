"""Attacks on many projects and regions through the real path: two simulator processes
holding the *same* job ids (one seed) under two projects, real Redis, the real ``enqueue``
and ``serve``. An id deleted in a project it was not named for shows in that simulator's
deleted set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.test_serve_regions import GROUP, Region, enqueue, rows, serving, until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env"), pytest.mark.anyio]


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
        async with serving(stream, north, tmp_path, "--allowed-projects", "project-b"):

            async def settled() -> bool:
                info: Any = await redis_client.xpending(stream, GROUP)
                done = await rows(redis_client, stream + ":outcomes")
                return len(done) == 6 and int(info["pending"]) == 0

            await until(settled)
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
