"""Re-checking jobs by listing: paging of every kind, freshness, and runs that check by page."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.e2e import list_endpoint, paced_reader, reaper, reaper_env, results, write_ids
from tests.fakes import FakeClock
from tests.test_dispatcher import FakeApi, Journal
from worker.api.client import JobPage
from worker.batcher import DeletionBudget
from worker.discovery.expiry import ExpiringLimiter, deleting
from worker.discovery.filters import Filters
from worker.discovery.guard import STALE_ROUNDS, Guard, PacedReader, PlanCheck, Protection
from worker.discovery.listing import Pager
from worker.discovery.recheck import ListingRecheck
from worker.dispatcher import Dispatcher
from worker.pacing.bucket import RateLimiter
from worker.pacing.retry import RetryPolicy
from worker.simulator import SimulatorConfig, run_simulator
from worker.types import Batch, DeleteResult, JobRecord, Outcome

FAST = ["--yes", "--rate", "1000", "--burst", "50"]


def _record(n: int) -> dict[str, Any]:
    return {"id": f"job-{n:04d}", "name": f"n{n}", "status": "FINISHED", "type": "COMMON"}


@asynccontextmanager
async def listing_server(n: int, honours: str) -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A list endpoint over ``n`` jobs in pages of 10 that honours ``current`` (``pages``),
    only ``offset``/``limit`` (``offset``), or nothing (``none``: every job, every time;
    ``stuck``: page 1 every time, saying there are more)."""
    jobs = [_record(i) for i in range(n)]
    asked: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        query = dict(request.query)
        asked.append(query)
        if honours == "none":
            return web.json_response({"current": 1, "pages": 1, "total": n, "data": jobs})
        start = 0
        if honours == "pages" and "current" in query:
            start = (int(query["current"]) - 1) * 10
        if honours == "offset" and "offset" in query:
            start = int(query["offset"])
        body: dict[str, Any] = {"data": jobs[start : start + 10], "total": n}
        if honours == "offset":
            body["offset"] = start
        else:
            body.update(current=start // 10 + 1, pages=-(-n // 10), size=10)
        return web.json_response(body)

    async with list_endpoint(handler) as url:
        yield url, asked


async def read_all(pager: Pager) -> list[str]:
    ids: list[str] = []
    start, more = 0, True
    while more:
        page = await pager.read(start)
        ids += [r.id for r in page.records if r.id not in ids]
        start, more = page.end, page.more
    return ids


# -- paging ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("honours", ["pages", "offset"])
async def test_the_pager_reads_every_job_with_current_size_or_offset_limit(honours: str) -> None:
    async with listing_server(35, honours) as (url, asked), paced_reader(url) as reader:
        pager = Pager(reader, {"status": "FINISHED"}, clock=FakeClock())
        assert await read_all(pager) == [f"job-{i:04d}" for i in range(35)]
    assert pager.style == honours and pager.paged
    assert all(q["status"] == "FINISHED" for q in asked)
    # current/size: 4 pages; offset/limit: each later page is asked as a page first, once.
    assert len(asked) == (4 if honours == "pages" else 5)
    if honours == "offset":
        assert [q.get("offset") for q in asked[2:]] == ["10", "20", "30"]


@pytest.mark.anyio
async def test_a_server_that_pages_not_at_all_is_one_page_and_said_so() -> None:
    async with listing_server(25, "none") as (url, asked), paced_reader(url) as reader:
        pager = Pager(reader, {}, clock=FakeClock())
        first = await pager.read(0)
        assert len(first.records) == 25 and not first.more
        assert await read_all(pager) == [f"job-{i:04d}" for i in range(25)]
    assert pager.style == "unknown" and len(asked) == 2  # never asked past its one page


@pytest.mark.anyio
async def test_a_server_that_ignores_both_paging_schemes_ends_the_listing_and_names_it() -> None:
    """It says there are 4 pages but answers page 1 to whatever is asked."""
    async with listing_server(35, "stuck") as (url, asked), paced_reader(url) as reader:
        pager = Pager(reader, {}, clock=FakeClock())
        ids = await read_all(pager)
    assert ids == [f"job-{i:04d}" for i in range(10)]
    assert pager.style == "none" and not pager.paged
    assert pager.ignored is not None and "page 2 was asked for, page 1 came" in pager.ignored
    assert len(asked) == 3


# -- the re-check ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_jobs_are_answered_by_pages_read_just_ahead_of_the_batches() -> None:
    """1,200 jobs asked for in batches of 50, in listing order: 3 list calls of 500, no
    more, and each job handed out once, as listed."""
    async with run_simulator(SimulatorConfig(jobs=1200, seed=3)) as sim:
        clock = FakeClock()
        async with paced_reader(sim.url, clock=clock) as reader:
            recheck = ListingRecheck(reader=reader, queries=[{}], clock=clock, accept_age=30)
            ids = sim.job_ids()
            answered: dict[str, Any] = {}
            pages_after_first = 0
            for start in range(0, len(ids), 50):
                got = await recheck.listed(ids[start : start + 50])
                assert set(got) == set(ids[start : start + 50])
                answered.update(got)
                pages_after_first = pages_after_first or recheck.pages
            assert recheck.pages == 3 and sim.stats.list_calls == 3
            again = await recheck.listed(ids[:5])
        assert pages_after_first == 1  # the first batch read one page, not the listing
        assert sim.stats.show_calls == 0
        assert all(answered[i].record.status == sim.store.jobs[i].status for i in ids)
        # Handed out once: asked for again, they are read again (a new sweep, one page).
        assert set(again) == set(ids[:5]) and recheck.pages == 4 and recheck.sweeps == 2


@pytest.mark.anyio
async def test_a_record_older_than_the_bound_is_read_again_and_a_gone_job_is_not_listed() -> None:
    async with run_simulator(SimulatorConfig(jobs=120, seed=4)) as sim:
        clock = FakeClock()
        ids = sim.job_ids()
        async with paced_reader(sim.url, clock=clock) as reader:
            recheck = ListingRecheck(
                reader=reader, queries=[{}], clock=clock, accept_age=30, page_size=20
            )
            await recheck.listed(ids[:10])  # page 1 read at t=0: ids[10:20] held from it
            sim.set_status(ids[12], "PROCESSING")
            clock.advance(31)
            got = await recheck.listed(ids[10:20])
            assert got[ids[12]].record.status == "PROCESSING"  # read again, not as held
            assert min(f.read_at for f in got.values()) == 31
            sim.store.delete([ids[60]])
            pages = recheck.pages
            got = await recheck.listed([ids[60]])
        assert got == {}  # gone: in no page; the show call says 404
        assert recheck.pages - pages <= 3  # "gap": three pages without it, then give up


@pytest.mark.anyio
async def test_deletes_answered_while_a_page_is_read_do_not_move_the_next_page_past_jobs() -> None:
    """300 jobs in pages of 100. The first 100 pass on to their DELETE; the next 50 are
    asked for, and the page read for them is answered as the listing stood before the 100
    went (as first listed: nothing new), their DELETE landing and answered while it is on
    the wire. The page after it is asked for where the jobs listed next now are (the 100
    gone: the first page), and holds the 50. (Counted as landed before the page was read,
    those 100 put the next read 100 positions on: it skipped the 100 jobs listed next, and
    each of them cost a show call.)"""
    jobs = [_record(i) for i in range(300)]
    ids = [job["id"] for job in jobs]
    landing: list[ListingRecheck] = []  # deletes to land while this page is answered

    async def handler(request: web.Request) -> web.Response:
        start = (int(request.query.get("current", "1")) - 1) * 100
        body = {"data": jobs[start : start + 100], "current": start // 100 + 1,
                "pages": -(-len(jobs) // 100), "size": 100, "total": len(jobs)}  # fmt: skip
        while landing:  # answered after the page was made, before the page's answer
            landing.pop().settled(ids[:100])
            del jobs[:100]
        return web.json_response(body)

    async with list_endpoint(handler) as url:
        clock = FakeClock()
        async with paced_reader(url, clock=clock) as reader:
            recheck = ListingRecheck(
                reader=reader, queries=[{}], clock=clock, accept_age=30, page_size=100
            )
            assert set(await recheck.listed(ids[:100])) == set(ids[:100])
            recheck.passed(ids[:100])
            landing.append(recheck)
            got = await recheck.listed(ids[100:150])
    assert set(got) == set(ids[100:150])


@pytest.mark.anyio
async def test_listing_that_answers_less_than_it_costs_turns_itself_off() -> None:
    """Ids of 20 jobs in a project of 3,000: one page of 50 answers for at most one of them."""
    async with run_simulator(SimulatorConfig(jobs=3000, seed=5)) as sim:
        clock = FakeClock()
        ids = sim.job_ids()[::150]
        warnings: list[str] = []
        async with paced_reader(sim.url, clock=clock) as reader:
            recheck = ListingRecheck(
                reader=reader, queries=[{}], clock=clock, accept_age=30, page_size=50,
                warn=lambda event, **f: warnings.append(event),
            )  # fmt: skip
            for job_id in ids:
                await recheck.listed([job_id])
                clock.advance(40)  # every record stale before the next one is asked for
        assert not recheck.enabled and warnings == ["recheck.listing_off"]
        assert recheck.pages < 2 * len(ids)


# -- runs, end to end --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_run_plan_checks_its_jobs_by_listing_and_still_skips_what_changed(
    tmp_path: Path,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=1500, seed=21)) as sim:
        path = tmp_path / "plan.json"
        done = await reaper(
            ["discover", "--status", "FINISHED", "--plan", str(path)], reaper_env(sim.url)
        )
        assert done.code == 0, done.stderr
        finished = [i for i, j in sim.store.jobs.items() if j.status == "FINISHED"]
        changed, gone = finished[100], finished[200]
        sim.set_status(changed, "PROCESSING")
        sim.store.delete([gone])
        shows_before = sim.stats.show_calls
        out = tmp_path / "results.jsonl"
        done = await reaper(
            ["run", "--plan", str(path), *FAST, "--results", str(out)], reaper_env(sim.url)
        )
        assert done.code == 0, done.stderr
        rows = {row["job_id"]: row for row in results(out)}
        assert (rows[changed]["outcome"], rows[changed]["reason"]) == ("skipped", "plan_mismatch")
        assert rows[gone]["outcome"] == "absent"
        assert changed in sim.store.jobs
        checks = done.summary()["checks"]
        assert checks["by_listing"] >= len(finished) - 2 - 16  # the rest: show calls
        assert sim.stats.show_calls - shows_before == checks["by_show"] <= 18
        assert checks["list_calls"] <= 3 * (len(finished) // 500 + 1)


@pytest.mark.anyio
async def test_protected_statuses_on_a_file_input_are_checked_by_listing(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=1200, seed=8)) as sim:
        ids = sim.job_ids()
        processing = {i for i in ids if sim.store.jobs[i].status == "PROCESSING"}
        assert processing
        out = tmp_path / "results.jsonl"
        done = await reaper(
            ["run", "--input", str(write_ids(tmp_path / "ids.txt", ids)), *FAST,
             "--protected-statuses", "processing", "--results", str(out)],
            reaper_env(sim.url),
        )  # fmt: skip
        assert done.code == 0, done.stderr
        rows = {row["job_id"]: row for row in results(out)}
        assert {i for i, r in rows.items() if r["reason"] == "protected"} == processing
        assert set(sim.store.jobs) == processing
        summary = done.summary()
        assert summary["skipped_by_reason"] == {"protected": len(processing)}
        # Listed, nearly all: a page read while DELETEs land may skip a few jobs (offset
        # paging drifts), read then by a show call each (quiet, at most 20; under CI's load
        # 43 once). Without listing, 1,200.
        assert summary["checks"]["by_show"] == sim.stats.show_calls <= len(ids) // 20
        assert summary["checks"]["by_listing"] >= len(ids) - len(ids) // 20


# -- the bound: no DELETE on a check older than --recheck-max-age -----------------------------


class ScriptedWait:
    """A rate limiter whose n-th ``acquire`` waits ``waits[n]`` seconds of virtual time (the
    last one repeats): a token that comes late, on cue."""

    rate = float("inf")

    def __init__(self, clock: FakeClock, waits: list[float]) -> None:
        self._clock = clock
        self._waits = waits
        self.acquired = 0

    async def acquire(self) -> None:
        wait = self._waits[min(self.acquired, len(self._waits) - 1)]
        self.acquired += 1
        await self._clock.sleep(wait)

    def feedback(self, **_: Any) -> None:
        return None


class StampedApi(FakeApi):
    """``FakeApi`` that notes the virtual time of every show and DELETE call."""

    def __init__(self, jobs: list[str], clock: FakeClock) -> None:
        super().__init__(jobs)
        self.clock = clock
        self.shown_at: dict[str, list[float]] = {}
        self.deleted_at: dict[str, float] = {}

    async def get_job(self, job_id: str) -> JobRecord:
        self.shown_at.setdefault(job_id, []).append(self.clock.now())
        return await super().get_job(job_id)

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult:
        self.deleted_at.update(dict.fromkeys(ids, self.clock.now()))
        return await super().delete_jobs(ids)

    async def list_jobs(self, **query: str | int | bool) -> JobPage:
        raise AssertionError("no guard here lists")


def guarded_dispatcher(
    api: StampedApi,
    clock: FakeClock,
    waits: list[float] | RateLimiter,
    *,
    budget: int | None = None,
    plan: PlanCheck | None = None,
) -> tuple[Guard, Dispatcher, Journal]:
    journal = Journal()
    limiter = ScriptedWait(clock, waits) if isinstance(waits, list) else waits
    dispatcher = Dispatcher(
        transport=api, limiter=limiter,
        policy=RetryPolicy(max_attempts=3, rng=random.Random(1)), journal=journal, clock=clock,
        budget=DeletionBudget(budget), max_attempts=3,
    )  # fmt: skip
    guard = Guard(
        inner=dispatcher, outcomes=journal, protection=Protection.parse(statuses=["FAILED"]),
        reader=PacedReader(api=api, paced=dispatcher.paced), clock=clock, max_age=60, plan=plan,
    )  # fmt: skip
    return guard, dispatcher, journal


def expiring_plan(ids: Sequence[str], expires: float) -> PlanCheck:
    """A plan of ``ids`` as ``StampedApi`` shows them, that expires at ``expires``."""
    reviewed = {i: JobRecord(id=i, status="PROCESSING") for i in ids}
    return PlanCheck(Filters(status="PROCESSING"), reviewed, expires=expires, expires_at="T")


@pytest.mark.anyio
async def test_a_batch_checked_before_its_plan_expired_is_not_sent_after() -> None:
    """The plan expires at t=30. Batch 1 is read and deleted at t=0; batch 2 is read at t=0
    too, but its token comes at t=31: no DELETE goes out on an expired plan, however fresh
    its check (60 s), so its jobs end ``skipped`` (``plan_expired``), unsent; and batch 3,
    whose turn comes after, is not even read."""
    await _batch_two_expires_before_its_delete(FakeClock(), expiring_plan("abcde", 30.0))


async def _batch_two_expires_before_its_delete(clock: FakeClock, plan: PlanCheck) -> None:
    """Three batches of ``plan``'s jobs; the DELETE of the second waits 31 s for its token,
    past the plan's expiry: only the first's goes out, the rest end ``plan_expired``, and
    the third is never read."""
    api = StampedApi(["a", "b", "c", "d", "e"], clock)
    # Tokens: show a, delete a, show b, show c, then 31 s for the DELETE of b and c.
    guard, _, journal = guarded_dispatcher(api, clock, [0, 0, 0, 0, 31, 0], plan=plan)
    await guard.process(Batch("b1", ("a",)))
    await guard.process(Batch("b2", ("b", "c")))
    await guard.process(Batch("b3", ("d", "e")))
    assert api.delete_calls == [("a",)]
    assert {(r.job_id, r.outcome, r.reason) for r in journal.results} == {
        ("a", Outcome.DELETED, None),
        *((i, Outcome.SKIPPED, "plan_expired") for i in "bcde"),
    }
    assert "d" not in api.shown_at and "e" not in api.shown_at


@pytest.mark.anyio
async def test_a_delete_waiting_for_its_token_when_the_plan_expires_waits_no_longer() -> None:
    """The plan expires at t=30; the DELETE of batch 2 (checked at t=0) would have its token
    at t=31. It waited for it, to be refused then (``plan_expired``): now its wait ends at
    the expiry, no token taken (the limiter's wait was cancelled), and the batch is handed
    back then, on the run's clock; batch 1's DELETE took its token as ever."""
    clock = FakeClock()
    api = StampedApi(["a", "b", "c"], clock)
    scripted = ScriptedWait(clock, [0, 0, 0, 0, 31, 0])
    limiter = ExpiringLimiter(scripted, clock)
    guard, _, journal = guarded_dispatcher(api, clock, limiter, plan=expiring_plan("abc", 30.0))
    await guard.process(Batch("b1", ("a",)))
    await guard.process(Batch("b2", ("b", "c")))
    assert api.delete_calls == [("a",)]
    assert {(r.job_id, r.outcome, r.reason) for r in journal.results} == {
        ("a", Outcome.DELETED, None), ("b", Outcome.SKIPPED, "plan_expired"),
        ("c", Outcome.SKIPPED, "plan_expired")}  # fmt: skip
    assert 30.0 < clock.now() < 30.1  # at the expiry, not at the token (31)
    assert limiter.cut == 1 and scripted.acquired == 5  # the fifth, the DELETE's, cut short


@pytest.mark.anyio
async def test_only_a_batch_s_first_call_stops_waiting_at_the_expiry() -> None:
    """A batch's later calls (a show call settling an answer, a retry) take their token as
    ever, on an expired plan too: only the DELETE's first attempt, which the dispatcher
    refuses past the expiry whatever the token, may end its wait without one."""
    clock = FakeClock()
    scripted = ScriptedWait(clock, [5.0])
    limiter = ExpiringLimiter(scripted, clock)
    plan = expiring_plan("a", 1.0)
    with deleting(plan, Batch("b1", ("a",), fresh_until=1.0)):
        await limiter.acquire()  # the first: cut at the expiry
        assert 1.0 < clock.now() < 1.1
        await limiter.acquire()  # a later one: its whole wait
    assert 6.0 < clock.now() < 6.2 and limiter.cut == 1
    await limiter.acquire()  # no batch named: as the limiter it wraps
    assert 11.0 < clock.now() < 11.2 and limiter.cut == 1


class RushedWall(FakeClock):
    """A ``FakeClock`` whose system clock runs ten times as fast as its own from 0, as a
    clock stepped forward, or one that went on while the run's stood still, looks to it."""

    def wall(self) -> float:
        return 10 * self.now()


@pytest.mark.anyio
async def test_a_batch_checked_before_its_plan_expired_by_the_system_s_clock_is_not_sent() -> None:
    """The plan's expires_at is 100 on the system's clock, which runs ten times as fast as
    the run's, where it has 1,000 s left. Batch 1 is read and deleted at t=0; batch 2 is
    read at t=0 too, but its token comes at t=31 (the system's clock at 310): no DELETE goes
    out on the plan expired there, however fresh its check on the run's clock, so its jobs
    end ``skipped`` (``plan_expired``), unsent; batch 3, whose turn comes after, is unread."""
    plan = dataclasses.replace(expiring_plan("abcde", 1000.0), wall_expires=100.0)
    await _batch_two_expires_before_its_delete(RushedWall(), plan)


@pytest.mark.anyio
async def test_a_batch_whose_check_expired_before_its_token_came_is_not_sent() -> None:
    clock = FakeClock()
    api = StampedApi(["a", "b"], clock)
    _, dispatcher, journal = guarded_dispatcher(api, clock, [61.0], budget=2)
    stale = await dispatcher.delete_checked(Batch("b1", ("a", "b"), fresh_until=60.0))
    assert stale.ids == ("a", "b") and stale.unsure == frozenset()
    assert api.delete_calls == [] and journal.results == [] and journal.sends == []
    assert dispatcher._budget.taken == 0  # never sent: their share of the cap is back


@pytest.mark.anyio
async def test_jobs_whose_check_expired_are_read_again_before_their_delete() -> None:
    """Three show calls at t=0, a token 61 s late: the jobs are read again (at t=61) and
    deleted on that read, never on the first."""
    clock = FakeClock()
    api = StampedApi(["a", "b", "c"], clock)
    guard, _, journal = guarded_dispatcher(api, clock, [0, 0, 0, 61, 0])
    await guard.process(Batch("b1", ("a", "b", "c")))
    assert journal.outcomes() == dict.fromkeys("abc", Outcome.DELETED)
    for job_id in "abc":
        assert api.deleted_at[job_id] - max(api.shown_at[job_id]) <= 60
        assert len(api.shown_at[job_id]) == 2
    assert guard.counts.stale == 3 and len(api.delete_calls) == 1


@pytest.mark.anyio
async def test_a_check_that_never_holds_until_the_delete_ends_skipped_not_deleted() -> None:
    clock = FakeClock()
    api = StampedApi(["a", "b"], clock)
    guard, _, journal = guarded_dispatcher(api, clock, [61.0])
    await guard.process(Batch("b1", ("a", "b")))
    assert api.delete_calls == []
    assert {(r.job_id, r.outcome, r.reason) for r in journal.results} == {
        ("a", Outcome.SKIPPED, "stale_check"), ("b", Outcome.SKIPPED, "stale_check")}  # fmt: skip
    assert len(api.shown_at["a"]) == 1 + STALE_ROUNDS


@pytest.mark.anyio
async def test_past_max_deletions_the_rest_is_skipped_at_once_without_a_look_up(
    tmp_path: Path,
) -> None:
    """A cap of 100 over 3,000 protected-by-status ids: the jobs past the cap are neither
    listed nor shown, and the summary says why they were skipped, by reason."""
    async with run_simulator(SimulatorConfig(jobs=3000, seed=9)) as sim:
        ids = sim.job_ids()
        done = await reaper(
            ["run", "--input", str(write_ids(tmp_path / "ids.txt", ids)), *FAST,
             "--protected-statuses", "HELD", "--max-deletions", "100"],
            reaper_env(sim.url),
        )  # fmt: skip
        assert done.code == 1, done.stderr  # some ids were not deleted: the cap, not a failure
        summary = done.summary()
        assert summary["deleted"] == 100
        assert summary["skipped_by_reason"] == {"max_deletions": 2900}
        # What was read: a page (500) for the batches in hand when the cap was reached.
        assert sim.stats.list_calls <= 2 and sim.stats.show_calls == 0
