"""A fake of the DevServer jobs API written apart from ``worker.simulator``, so that tests do
not share the simulator's idea of how the API fails. It answers DELETEs as a real gateway
in trouble might: applied and then the connection reset, a 5xx, a body cut short or
dripped slowly; a 200 that lists only some of the jobs, or jobs nobody asked for; a 404 as
an HTML page, with a gateway code, or naming one id of a batch. Nothing is signed or checked:
it records what it deleted, which is all the tests ask of it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.e2e import serve_app

NO_SUCH_JOB = "ModelArts.6404"
"""A service code for a job that does not exist (the number is ours; the prefix is what
the client reads)."""

Script = Callable[[int, Sequence[str]], str]
"""How the ``n``-th DELETE (from 1) of these ids is answered: one of the behaviours of
:meth:`Gateway.delete`."""


def always(behaviour: str) -> Script:
    return lambda _call, _ids: behaviour


@dataclass
class Gateway:
    jobs: dict[str, dict[str, Any]]
    script: Script = field(default=always("ok"))
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    deleted: set[str] = field(default_factory=set)
    delete_counts: Counter[str] = field(default_factory=Counter)
    asked: set[str] = field(default_factory=set)  # every id a DELETE named
    # The show call of a key answers with the record of its value (a cache keyed wrongly).
    shows: dict[str, str] = field(default_factory=dict)
    unlisted: set[str] = field(default_factory=set)  # ids the listing's index has not caught up to
    delete_calls: int = 0
    calls: int = 0

    @classmethod
    def with_jobs(cls, count: int, *, prefix: str = "job", **kw: Any) -> Gateway:
        ids = [f"{prefix}-{n:04d}" for n in range(count)]
        jobs = {
            job_id: {"id": job_id, "name": job_id, "type": "COMMON", "status": "FINISHED",
                     "create_at": 1749536420547}
            for job_id in ids
        }  # fmt: skip
        return cls(jobs=jobs, **kw)

    def job_ids(self) -> list[str]:
        return sorted(self.jobs)

    def _apply(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        removed = []
        for job_id in ids:
            record = self.jobs.pop(job_id, None)
            if record is not None:
                removed.append(record)
                self.deleted.add(job_id)
                self.delete_counts[job_id] += 1
        return removed

    async def counted(self, request: web.Request) -> list[str]:
        """A DELETE counted, and the ids it asks for (recorded in ``asked``)."""
        self.calls += 1
        self.delete_calls += 1
        ids = list(orjson.loads(await request.read())["job_ids"])
        self.asked.update(ids)
        return ids

    async def delete(self, request: web.Request) -> web.StreamResponse:
        ids = await self.counted(request)
        call = self.delete_calls
        behaviour = self.script(call, ids)
        if behaviour.startswith("late-"):  # answered once the next DELETE is on the wire
            behaviour = behaviour.removeprefix("late-")
            while self.delete_calls == call:
                await asyncio.sleep(0.01)
        if behaviour == "unavailable":  # nothing applied
            return _error(503, "ModelArts.0503", "The backend service is unavailable")
        if behaviour == "hold_unavailable":  # nothing applied; a 503 once the test lets it go
            await self.hold.wait()
            return _error(503, "ModelArts.0503", "The backend service is unavailable")
        if behaviour == "401":
            return _error(401, "APIGW.0301", "Incorrect IAM authentication information")
        if behaviour == "html404":
            return web.Response(status=404, text="<html><body>Not Found</body></html>",
                                content_type="text/html")  # fmt: skip
        if behaviour == "apigw404":
            return _error(404, "APIGW.0101", "The API does not exist or has not been published")
        if behaviour == "job404":  # one id of the batch does not exist: nothing applied
            missing = next((i for i in ids if i not in self.jobs), ids[0])
            return _error(404, NO_SUCH_JOB, f"job {missing} does not exist")
        if behaviour == "job404_after":  # the others applied, then the 404 for the missing one
            self._apply(ids)
            missing = next((i for i in ids if i not in self.deleted), ids[0])
            return _error(404, NO_SUCH_JOB, f"job {missing} does not exist")
        removed = self._apply(ids)
        if behaviour == "hold":  # applied; the answer waits until the test lets it go
            await self.hold.wait()
            return _envelope(removed)
        if behaviour == "slow":  # applied; answered a second later
            await asyncio.sleep(1.0)
            return _envelope(removed)
        if behaviour == "partial":
            return _envelope(removed[: len(removed) // 2])
        if behaviour == "paged":  # the first of the deleted, on page 1 of an envelope that
            # says how many there are: the rest on pages nobody asks for
            first = removed[:1]
            return _envelope(first, total=len(removed), pages=max(1, len(removed)))
        if behaviour == "extra":  # records of jobs nobody asked for (not deleted)
            others = [job for job_id, job in self.jobs.items() if job_id not in ids][:3]
            return _envelope(removed + others)
        if behaviour == "hold_error_after":  # applied; a 502, once the test lets it go
            await self.hold.wait()
            return _error(502, "APIGW.0201", "Bad gateway")
        if behaviour == "error_after":
            return _error(502, "APIGW.0201", "Bad gateway")
        if behaviour == "reset_after":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)
        if behaviour in ("cut", "drip"):
            body = orjson.dumps(_page(removed))
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            response.content_length = len(body)
            await response.prepare(request)
            if behaviour == "cut":  # half the body, then the connection goes
                await response.write(body[: len(body) // 2])
                if request.transport is not None:
                    request.transport.close()
                return response
            for start in range(0, len(body), 8):  # a byte-trickle slower than any read timeout
                await response.write(body[start : start + 8])
                await asyncio.sleep(0.5)
            await response.write_eof()
            return response
        return _envelope(removed)

    async def show(self, request: web.Request) -> web.Response:
        self.calls += 1
        job_id = request.match_info["job_id"]
        record = self.jobs.get(self.shows.get(job_id, job_id))
        if record is None:
            return _error(404, NO_SUCH_JOB, "job does not exist")
        return web.json_response(record)

    async def list(self, request: web.Request) -> web.Response:
        self.calls += 1
        wanted = request.query.get("id")
        listed = [job for job in self.jobs.values() if job["id"] not in self.unlisted]
        jobs = [job for job in listed if wanted is None or job["id"] == wanted]
        return _envelope(jobs)


def _page(
    records: Sequence[dict[str, Any]], *, total: int | None = None, pages: int = 1
) -> dict[str, Any]:
    return {"current": 1, "data": list(records), "pages": pages, "size": len(records),
            "total": len(records) if total is None else total}  # fmt: skip


def _envelope(
    records: Sequence[dict[str, Any]], *, total: int | None = None, pages: int = 1
) -> web.Response:
    page = _page(records, total=total, pages=pages)
    return web.json_response(page, dumps=lambda v: orjson.dumps(v).decode())


def _error(status: int, code: str, msg: str) -> web.Response:
    return web.json_response({"error_code": code, "error_msg": msg}, status=status)


@asynccontextmanager
async def serve_gateway(gateway: Gateway) -> AsyncIterator[str]:
    """The fake on a free loopback port; yields its base URL."""
    app = web.Application()
    app.router.add_delete("/v1/{project}/dev-servers/jobs", gateway.delete)
    app.router.add_get("/v1/{project}/dev-servers/jobs", gateway.list)
    app.router.add_get("/v1/{project}/dev-servers/jobs/{job_id}", gateway.show)
    async with serve_app(app) as url:
        try:
            yield url
        finally:  # a held call answers now: the server's shutdown waits for its handlers
            gateway.hold.set()
