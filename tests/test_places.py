"""``--concurrency`` is the most calls on the wire at once: the real command against an
independent fake of the API (``tests.gateway``) over loopback HTTP, which counts the calls
it holds at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from tests.e2e import reaper, reaper_env, results, write_ids
from tests.gateway import Gateway, serve_gateway

pytestmark = pytest.mark.anyio

PLACES = 4
JOBS = 600


class Parking(Gateway):
    """Answers the first DELETE of a batch (``refuse`` of them, one at a time) with a 429
    and ``Retry-After: 1``; while that batch is away (its worker asleep on the Retry-After),
    holds every other DELETE until ``PLACES`` of them are out at once, or the refused batch
    comes back. ``most``: the most DELETEs out at once; ``most_parked``: the most while a
    refused batch was away."""

    def __init__(self, count: int, refuse: int) -> None:
        fresh = Gateway.with_jobs(count)
        super().__init__(jobs=fresh.jobs)
        self.refuse = refuse
        self.refused: list[str] = []
        self.away: str | None = None
        self.out = self.most = self.most_parked = 0
        self._changed = asyncio.Condition()

    async def delete(self, request: web.Request) -> web.StreamResponse:
        ids = list(orjson.loads(await request.read())["job_ids"])
        async with self._changed:
            self.out += 1
            self.most = max(self.most, self.out)
            self._changed.notify_all()
        try:
            if self.away is None and len(self.refused) < self.refuse:
                self.away = ids[0]
                self.refused.append(ids[0])
                return web.json_response(
                    {"error_code": "APIGW.0308", "error_msg": "throttled"},
                    status=429, headers={"Retry-After": "1"},
                )  # fmt: skip
            async with self._changed:
                if self.away == ids[0]:
                    self.away = None  # back from its sleep: nobody holds the others now
                    self._changed.notify_all()
                if self.away is not None:
                    self.most_parked = max(self.most_parked, self.out)
                await self._changed.wait_for(lambda: self.away is None or self.out >= PLACES)
                if self.away is not None:
                    self.most_parked = max(self.most_parked, self.out)
            return await super().delete(request)
        finally:
            async with self._changed:
                self.out -= 1
                self._changed.notify_all()


def _named(path: Path, ids: list[str], url: str) -> Path:
    """Each id on a line naming its project and endpoint (a target: the run's fair share
    between endpoints applies), all of them the one endpoint."""
    lines = (orjson.dumps({"id": i, "project_id": "other-project", "endpoint": url}) for i in ids)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("named", [False, True], ids=["plain", "named-target"])
async def test_a_call_asleep_on_retry_after_leaves_its_place_on_the_wire_to_the_others(
    tmp_path: Path, named: bool
) -> None:
    """``--concurrency 4``: never more than 4 DELETEs out at once, and while a refused
    batch's worker sleeps its ``Retry-After`` the others still have 4 out (the fake holds
    them until 4 are, or the refused batch comes back). Every id ends deleted, once. (The
    old code kept the sleeping worker's place among the 4: 3 out while it slept.)

    The same when every line names its target (``named-target``): one endpoint alone has
    every place, and a batch of it asleep holds none of its share. (The old code shared the
    dispatchers, not the places, between endpoints, never all of them to one, and counted a
    batch asleep in its endpoint's share: 3 out at most, 2 while one slept.)"""
    gateway = Parking(JOBS, refuse=3)
    async with serve_gateway(gateway) as url:
        if named:
            src = _named(tmp_path / "ids.jsonl", gateway.job_ids(), url)
        else:
            src = write_ids(tmp_path / "ids.txt", gateway.job_ids())
        out = tmp_path / "results.jsonl"
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--results", str(out), "--batch-size", "5",
             "--concurrency", str(PLACES), "--rate", "1000", "--burst", "50"],
            reaper_env(url),
        )  # fmt: skip
    assert done.code == 0, done.stderr
    rows = results(out)
    assert {row["outcome"] for row in rows} == {"deleted"} and len(rows) == JOBS
    assert max(gateway.delete_counts.values()) == 1 and not gateway.jobs
    assert gateway.refused and done.summary()["retries"] == len(gateway.refused)
    assert gateway.most <= PLACES
    assert gateway.most_parked == PLACES, (gateway.most_parked, gateway.most)
