"""``--max-deletions`` through the real path: the command in a process of its own against an
independent fake of the API (``tests.gateway``) over loopback HTTP. What a batch takes of the
cap and does not send (its jobs' check expired, their re-check found them gone) comes back,
and an id is skipped for the cap only once the cap is really reached."""

from __future__ import annotations

import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from aiohttp import web

from tests.e2e import (
    Finished,
    read_all,
    reaper,
    reaper_env,
    results,
    start_reaper,
    until,
    write_ids,
)
from tests.gateway import Gateway, serve_gateway

pytestmark = pytest.mark.anyio

CAP = 10
JOBS = 30
BATCH = 5


@dataclass
class GoneWhileAsleep(Gateway):
    """The first DELETE is answered 429 with ``Retry-After: 2``, and its jobs are deleted by
    someone else meanwhile: its batch sleeps past its jobs' check (``--recheck-max-age 1``),
    reads them again, and finds them gone (``gone``)."""

    gone: list[str] = field(default_factory=list)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        if self.delete_calls:
            return await super().delete(request)
        ids = await self.counted(request)
        self.gone = [i for i in ids if self.jobs.pop(i, None) is not None]
        return web.json_response(
            {"error_code": "APIGW.0308", "error_msg": "throttled"},
            status=429, headers={"Retry-After": "2"},
        )  # fmt: skip


async def test_a_share_of_the_cap_a_batch_gives_back_goes_to_ids_not_yet_skipped(
    tmp_path: Path,
) -> None:
    """``--max-deletions 10`` over 30 ids in batches of 5, each job read before its DELETE:
    the first batch's DELETE is refused (429) and its jobs go meanwhile, so it gives back
    its 5 shares after its re-check; another batch's 5 took the rest of the cap. The 5
    given back delete 5 more ids: exactly 10 deleted (as many as the cap, there being 25
    deletable), the 5 gone ``absent``, and only the 15 past the cap ``skipped``. (The old
    code skipped every batch that asked while the first held its shares: 5 deleted.)"""
    gateway = GoneWhileAsleep(jobs=Gateway.with_jobs(JOBS).jobs)
    async with serve_gateway(gateway) as url:
        src = write_ids(tmp_path / "ids.txt", gateway.job_ids())
        out = tmp_path / "results.jsonl"
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--results", str(out), "--batch-size", str(BATCH),
             "--concurrency", "2", "--rate", "1000", "--burst", "50", "--max-deletions",
             str(CAP), "--protected-statuses", "HELD", "--recheck-max-age", "1"],
            reaper_env(url),
        )  # fmt: skip
    rows = results(out)
    outcomes = Counter(row["outcome"] for row in rows)
    assert len(rows) == JOBS and len({row["job_id"] for row in rows}) == JOBS, done.stderr
    assert gateway.gone and done.summary()["checks"]["expired"] == len(gateway.gone)
    assert len(gateway.deleted) == CAP and max(gateway.delete_counts.values()) == 1
    assert outcomes == {"deleted": CAP, "absent": BATCH, "skipped": JOBS - BATCH - CAP}, rows
    assert {row["reason"] for row in rows if row["outcome"] == "skipped"} == {"max_deletions"}
    assert done.code == 1, done.stderr  # left undone on purpose: the cap


@dataclass
class Refusing(Gateway):
    """Every DELETE is answered 429 with a ``Retry-After`` longer than the test while
    ``refusing``: nothing is applied, and the run's batches sleep on it until stopped."""

    refusing: bool = True

    async def delete(self, request: web.Request) -> web.StreamResponse:
        if not self.refusing:
            return await super().delete(request)
        await self.counted(request)
        return web.json_response(
            {"error_code": "APIGW.0308", "error_msg": "throttled"},
            status=429, headers={"Retry-After": "50"},
        )  # fmt: skip


async def test_a_stop_gives_back_the_cap_of_ids_answered_not_applied(tmp_path: Path) -> None:
    """``--max-deletions 10``: two batches of 5 take the cap, each DELETE answered 429 (not
    applied), and the run is stopped (SIGTERM) while they sleep on its ``Retry-After``.
    Nothing was deleted, so ``max_deletions_left`` is 10, as the ledger counts it: the next
    run on it deletes 10. (The old code left the shares of a cancelled batch taken: 0 left,
    while the ledger's next run had the 10.)"""
    gateway = Refusing(jobs=Gateway.with_jobs(JOBS).jobs)
    ledger = tmp_path / "ledger.db"
    async with serve_gateway(gateway) as url:
        src = write_ids(tmp_path / "ids.txt", gateway.job_ids())
        args = ["run", "-i", str(src), "--yes", "--batch-size", str(BATCH), "--concurrency", "2",
                "--rate", "1000", "--burst", "50", "--max-deletions", str(CAP), "--ledger",
                str(ledger)]  # fmt: skip
        env = reaper_env(url)
        async with await start_reaper(args, env) as process:
            await until(lambda: _true(gateway.delete_calls >= CAP // BATCH))
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                stdout, stderr = await read_all(process)
        assert process.returncode == 75, stderr
        stopped = Finished(75, stdout, stderr)
        assert stopped.summary()["max_deletions_left"] == CAP, stdout
        assert not gateway.deleted and len(gateway.asked) == CAP
        gateway.refusing = False
        again = await reaper(args, env)
    assert again.summary()["deleted"] == CAP and again.summary()["max_deletions_left"] == 0


async def _true(value: bool) -> bool:
    return value
