"""A job our own attempt may have deleted stays ours through the guard's re-check: a DELETE
applied and its answer lost, the check expiring before the next attempt, the job read again
and found gone ends ``deleted`` unconfirmed (``answer_lost``), never ``absent``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.e2e import reaper, reaper_env, results
from tests.fakes import FakeClock
from tests.gateway import Gateway, serve_gateway
from tests.test_recheck import StampedApi, guarded_dispatcher
from worker.errors import ApiUnavailable, ServerError, ThrottledError
from worker.types import ANSWER_LOST, Batch, JobRecord, Outcome

MAX_AGE_S = 1.0
"""``--recheck-max-age`` of the runs here: the least the settings take."""
LATE_S = MAX_AGE_S + 0.5
"""How long the first DELETE's answer is held after the jobs are gone: past the check, so
the attempt after it cannot go out on that check, whatever the machine's load."""


class LateGateway(Gateway):
    """The first DELETE is applied, answered ``LATE_S`` later with a 502 (the answer lost);
    the others as ``script`` says."""

    async def delete(self, request: web.Request) -> web.StreamResponse:
        if self.delete_calls:
            return await super().delete(request)
        self._apply(await self.counted(request))
        await asyncio.sleep(LATE_S)
        return web.json_response(
            {"error_code": "APIGW.0201", "error_msg": "Bad gateway"}, status=502
        )


@dataclass
class LaggingGateway(LateGateway):
    """``LateGateway`` whose listing lags behind its deletions: a page still holds the
    jobs deleted (as an index not yet updated, or a page read before the DELETE went out)."""

    gone: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _apply(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        self.gone.update({i: self.jobs[i] for i in ids if i in self.jobs})
        return super()._apply(ids)

    async def list(self, request: web.Request) -> web.Response:
        self.calls += 1
        jobs = [*self.jobs.values(), *self.gone.values()]
        return web.json_response({"current": 1, "pages": 1, "size": len(jobs),
                                  "total": len(jobs), "data": jobs})  # fmt: skip


def fast(*more: str) -> list[str]:
    return ["--yes", "--rate", "1000", "--burst", "50", "--max-attempts", "6",
            "--recheck-max-age", f"{MAX_AGE_S:g}", *more]  # fmt: skip


async def planned_and_applied(
    gateway: Gateway, tmp: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``discover --plan`` of ``gateway``'s jobs (two RUNNING ones added, that the plan's
    filter leaves out), then ``run --plan`` to the end: its summary and results rows."""
    running = Gateway.with_jobs(2, prefix="running").jobs
    gateway.jobs.update({i: {**job, "status": "RUNNING"} for i, job in running.items()})
    async with serve_gateway(gateway) as url:
        env = reaper_env(url)
        plan, out = tmp / "plan.json", tmp / "results.jsonl"
        made = await reaper(["discover", "--status", "FINISHED", "--plan", str(plan)], env)
        assert made.code == 0, made.stderr
        done = await reaper(["run", "--plan", str(plan), "--results", str(out), *fast()], env)
        assert done.code == 0, done.stderr
        return done.summary(), results(out)


@pytest.mark.anyio
async def test_a_plan_s_job_deleted_by_an_attempt_whose_answer_was_lost_is_not_absent(
    tmp_path: Path,
) -> None:
    """``run --plan``: the first DELETE is applied and answered with a 502 after the jobs'
    check expired, so the retry is not sent on it: the jobs are read again and found gone.
    That attempt removed them: ``deleted``, ``confirmed`` false, ``answer_lost``."""
    gateway = LateGateway.with_jobs(3)
    summary, rows = await planned_and_applied(gateway, tmp_path)
    assert summary["checks"]["expired"] == 3, summary  # the scenario happened
    assert gateway.delete_calls == 1 and gateway.deleted == set(gateway.asked)
    assert {row["job_id"] for row in rows} == gateway.deleted and len(rows) == 3
    for row in rows:
        assert (row["outcome"], row["confirmed"]) == ("deleted", False), row
    assert (summary["deleted"], summary["unconfirmed"], summary["absent"]) == (3, 3, 0)


# -- the same, in process on virtual time: each way a batch's doubt must outlive its rounds ------


class DoubtApi(StampedApi):
    """``StampedApi`` whose jobs can change status (``status``), whose show calls can fail
    (``show_faults``, one per call), and whose lost DELETE can land late: an id of ``lands``
    goes away just after its second show call (the re-check saw it, the next DELETE won't)."""

    def __init__(self, jobs: list[str], clock: FakeClock) -> None:
        super().__init__(jobs, clock)
        self.status: dict[str, str] = {}
        self.show_faults: list[BaseException] = []
        self.lands: set[str] = set()

    async def get_job(self, job_id: str) -> JobRecord:
        if self.show_faults:
            raise self.show_faults.pop(0)
        record = await super().get_job(job_id)
        if job_id in self.lands and len(self.shown_at[job_id]) == 2:
            self.jobs.discard(job_id)
        return replace(record, status=self.status.get(job_id, record.status))


def lost() -> ServerError:
    return ServerError("bad gateway", http_status=502)


LATE = [0, 0, 61.0, 0]
"""Tokens: the show call's and the first DELETE's at once, the retry's 61 s late (past the
60 s check), then at once again."""


@pytest.mark.anyio
async def test_a_job_an_expired_round_deleted_unanswered_is_deleted_unconfirmed() -> None:
    """The first DELETE is applied and answered 502; its retry comes past the check, so the
    job is read again and found gone: ``deleted``, unconfirmed, with the record read before
    it, counted once against the cap."""
    clock = FakeClock()
    api = DoubtApi(["a"], clock)
    api.script = [lost()]
    guard, dispatcher, journal = guarded_dispatcher(api, clock, LATE, budget=1)
    await guard.process(Batch("b1", ("a",)))
    (result,) = journal.results
    assert (result.outcome, result.confirmed, result.reason) == (
        Outcome.DELETED, False, ANSWER_LOST)  # fmt: skip
    assert result.record is not None and result.record.id == "a" and result.attempts == 1
    assert len(api.delete_calls) == 1 and guard.counts.stale == 1
    assert dispatcher._budget.taken == 1


@pytest.mark.anyio
async def test_a_job_still_there_after_an_unanswered_round_is_sent_on_the_cap_it_took() -> None:
    """The 502's DELETE was not applied: the re-check finds the job and the next round sends
    it on the share of ``--max-deletions 1`` the first round took, not a second share."""
    clock = FakeClock()
    api = DoubtApi(["a"], clock)
    api.script, api.resist["a"] = [lost()], 1
    guard, dispatcher, journal = guarded_dispatcher(api, clock, LATE, budget=1)
    await guard.process(Batch("b1", ("a",)))
    assert journal.outcomes() == {"a": Outcome.DELETED}
    assert journal.results[0].confirmed and api.deleted["a"] == 1
    assert dispatcher._budget.taken == 1


@pytest.mark.anyio
async def test_a_job_refused_only_by_throttles_before_its_check_expired_takes_one_share() -> None:
    """A 429 (not applied), then the retry's token past the check: the share of the cap
    the first round took goes back, so the round after it has one to send the job with."""
    clock = FakeClock()
    api = DoubtApi(["a"], clock)
    api.script = [ThrottledError("slow down", http_status=429, retry_after=1.0)]
    guard, dispatcher, journal = guarded_dispatcher(api, clock, LATE, budget=1)
    await guard.process(Batch("b1", ("a",)))
    assert journal.outcomes() == {"a": Outcome.DELETED} and journal.results[0].confirmed
    assert dispatcher._budget.taken == 1


@pytest.mark.anyio
async def test_a_lost_delete_landing_after_the_re_check_is_still_ours() -> None:
    """The 502's DELETE lands only after the re-check read the job: the next round's DELETE
    does not find it, and its show call's 404 is our first attempt's doing."""
    clock = FakeClock()
    api = DoubtApi(["a"], clock)
    api.script, api.resist["a"], api.lands = [lost()], 1, {"a"}
    guard, _, journal = guarded_dispatcher(api, clock, LATE)
    await guard.process(Batch("b1", ("a",)))
    (result,) = journal.results
    assert (result.outcome, result.confirmed, result.reason) == (
        Outcome.DELETED, False, ANSWER_LOST)  # fmt: skip
    assert len(api.delete_calls) == 2


@pytest.mark.anyio
async def test_a_job_found_protected_after_an_unanswered_round_keeps_its_attempt() -> None:
    """Read again after the 502 it is protected (its status now FAILED): ``skipped``, but
    with the attempt that may have reached it, as a dead run's call is kept: the next run
    on the ledger still knows the job may be gone by it."""
    clock = FakeClock()
    api = DoubtApi(["a"], clock)
    api.script, api.resist["a"] = [lost()], 1
    guard, _, journal = guarded_dispatcher(api, clock, LATE)

    async def fail_it(batch_id: str, attempt: int, delay_s: float, reason: str) -> None:
        api.status["a"] = "FAILED"  # while the retry waits for its token

    journal.retrying = fail_it  # type: ignore[method-assign]
    await guard.process(Batch("b1", ("a",)))
    (result,) = journal.results
    assert (result.outcome, result.reason, result.attempts) == (Outcome.SKIPPED, "protected", 1)


@pytest.mark.anyio
async def test_the_api_giving_out_on_the_re_check_names_the_ids_sent_unanswered() -> None:
    """After the 502 the re-check's show calls fail until the API is unavailable: the error
    names the id the first round sent unanswered, so ``serve`` keeps it on its entry's note
    and a later delivery that finds the job gone does not call it ``absent``."""
    clock = FakeClock()
    api = DoubtApi(["a", "b"], clock)
    api.script, api.resist["a"] = [lost()], 1
    guard, _, journal = guarded_dispatcher(api, clock, [0, 0, 0, 61.0, 0])

    async def failing_reads(batch_id: str, attempt: int, delay_s: float, reason: str) -> None:
        api.show_faults = [lost() for _ in range(10)]

    journal.retrying = failing_reads  # type: ignore[method-assign]
    with pytest.raises(ApiUnavailable) as raised:
        await guard.process(Batch("b1", ("a", "b"), unsure=frozenset({"b"})))
    assert raised.value.unsure == {"a", "b"}
    assert journal.results == []


@pytest.mark.anyio
async def test_a_job_sent_unanswered_is_read_again_by_its_show_call_not_a_page(
    tmp_path: Path,
) -> None:
    """The listing still holds the jobs the lost DELETE removed (a page read before it went
    out says nothing of it): the jobs in doubt are read again with the show call, found
    gone, and end ``deleted`` unconfirmed with no second DELETE sent for them."""
    gateway = LaggingGateway.with_jobs(3)
    summary, rows = await planned_and_applied(gateway, tmp_path)
    checks = summary["checks"]
    assert (checks["expired"], checks["by_show"]) == (3, 3), checks
    assert gateway.delete_calls == 1
    assert {(r["outcome"], r["confirmed"]) for r in rows} == {("deleted", False)}


class UnreadableGateway(LateGateway):
    """``LateGateway`` whose show call is refused (400) once a DELETE went out, while
    ``unreadable``: the re-check after the lost answer cannot read the jobs."""

    unreadable = True

    async def show(self, request: web.Request) -> web.Response:
        if self.unreadable and self.delete_calls:
            self.calls += 1
            return web.json_response(
                {"error_code": "ModelArts.0400", "error_msg": "bad request"}, status=400
            )
        return await super().show(request)


@pytest.mark.anyio
async def test_a_job_failed_unread_after_a_lost_answer_stays_in_doubt_on_the_ledger(
    tmp_path: Path,
) -> None:
    """The first DELETE is applied and its 502 comes after the check expired; read again,
    the jobs' show call is refused (400): ``failed``, ``answer_lost`` (they may be gone by
    that DELETE). ``--retry-failed`` on the ledger then finds them gone: ``deleted``,
    unconfirmed, as an id a dead run sent (it said ``absent``: the ledger took a failure
    for a job never sent, and the cap did not count that DELETE)."""
    gateway = UnreadableGateway(jobs=Gateway.with_jobs(3).jobs)
    names = gateway.job_ids()
    ids, ledger = tmp_path / "ids.txt", tmp_path / "ledger.db"
    ids.write_text("".join(f"{i}\n" for i in names))
    out = tmp_path / "results.jsonl"
    args = ["run", "--input", str(ids), "--ledger", str(ledger), "--results", str(out),
            "--protect", "name:keep-*", "--max-deletions", "10", *fast()]  # fmt: skip
    async with serve_gateway(gateway) as url:
        env = reaper_env(url)
        first = await reaper(args, env)
        assert first.code == 1, first.stderr
        assert first.summary()["checks"]["expired"] == 3  # the scenario happened
        failed = results(out)
        assert gateway.deleted == set(names)
        gateway.unreadable = False
        again = await reaper([*args, "--retry-failed"], env)
    assert {(r["outcome"], r["reason"], r["attempts"]) for r in failed} == {
        ("failed", ANSWER_LOST, 1)
    }, failed
    assert again.code == 0, again.stderr
    rows = results(out)
    assert {(r["outcome"], r["confirmed"], r["reason"]) for r in rows} == {
        ("deleted", False, ANSWER_LOST)
    }, rows
    summary = again.summary()
    assert (summary["deleted"], summary["unconfirmed"], summary["absent"]) == (3, 3, 0)
    assert summary["sent_by_earlier_runs"] == 3  # the lost DELETE counts against the cap
    assert gateway.delete_calls == 1  # nothing sent twice
