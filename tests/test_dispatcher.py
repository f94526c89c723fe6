"""The dispatcher's policy by error class, against an in-memory fake API and a fake clock."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes import FakeClock
from worker.batcher import DeletionBudget
from worker.dispatcher import Dispatcher
from worker.errors import (
    ApiUnavailable,
    AuthError,
    ClientError,
    MalformedResponse,
    NetworkError,
    NotFound,
    ServerError,
    ThrottledError,
)
from worker.pacing.bucket import UnlimitedRateLimiter
from worker.pacing.retry import RetryPolicy
from worker.types import Batch, DeleteResult, JobRecord, Outcome, Result


class FakeApi:
    """Jobs in a set; ``script`` is a list of faults to raise on the next DELETE calls."""

    def __init__(self, jobs: Sequence[str], *, poison: frozenset[str] = frozenset()) -> None:
        self.jobs = set(jobs)
        self.poison = poison
        self.script: list[BaseException | str] = []
        self.delete_calls: list[tuple[str, ...]] = []
        self.show_calls: list[str] = []
        self.deleted: Counter[str] = Counter()
        self.resist: Counter[str] = Counter()  # job -> DELETE calls it survives (answered 200)
        self.unlisted: set[str] = set()  # deleted by a 200 that did not list them

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult:
        self.delete_calls.append(tuple(ids))
        await anyio.sleep(0)
        if self.poison & set(ids):
            raise ClientError("bad job_ids", http_status=400, error_code="ModelArts.0101")
        fault = self.script.pop(0) if self.script else None
        if isinstance(fault, BaseException) and not isinstance(fault, ServerError | NetworkError):
            raise fault
        records = []
        for job_id in ids:
            if self.resist[job_id] > 0:
                self.resist[job_id] -= 1
                continue
            if job_id in self.jobs:
                self.jobs.discard(job_id)
                self.deleted[job_id] += 1
                records.append(JobRecord(id=job_id, status="DELETED"))
        if isinstance(fault, BaseException):  # applied, then failed: the ambiguous kind
            raise fault
        if fault == "drop-records":  # a readable 200 that does not list what it deleted
            self.unlisted.update(record.id for record in records)
            records = []
        return DeleteResult(records=tuple(records), request_id=f"req-{len(self.delete_calls)}")

    async def get_job(self, job_id: str) -> JobRecord:
        self.show_calls.append(job_id)
        if job_id not in self.jobs:
            raise NotFound("job not found", http_status=404, request_id="show")
        return JobRecord(id=job_id, status="PROCESSING")


class Journal:
    """An in-memory sink that also checks the one-outcome invariant as it goes."""

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.retries: list[tuple[str, int, float, str]] = []
        self.sends: list[tuple[str, tuple[str, ...], int]] = []
        self.unsends: list[tuple[str, tuple[str, ...]]] = []

    async def sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        self.sends.append((batch_id, tuple(ids), attempt))

    async def unsent(self, batch_id: str, ids: Sequence[str]) -> None:
        self.unsends.append((batch_id, tuple(ids)))

    async def retrying(self, batch_id: str, attempt: int, delay_s: float, reason: str) -> None:
        self.retries.append((batch_id, attempt, delay_s, reason))

    async def finished(self, results: Sequence[Result]) -> None:
        self.results.extend(results)

    def outcomes(self) -> dict[str, Outcome]:
        seen: dict[str, Outcome] = {}
        for result in self.results:
            assert result.job_id not in seen, f"{result.job_id} got two outcomes"
            seen[result.job_id] = result.outcome
        return seen


def make(
    api: FakeApi,
    *,
    max_attempts: int = 5,
    budget: int | None = None,
    dry_run: bool = False,
) -> tuple[Dispatcher, Journal, FakeClock]:
    journal = Journal()
    clock = FakeClock()
    dispatcher = Dispatcher(
        transport=api,
        limiter=UnlimitedRateLimiter(),
        policy=RetryPolicy(max_attempts=max_attempts, rng=random.Random(1)),
        journal=journal,
        clock=clock,
        budget=DeletionBudget(budget),
        max_attempts=max_attempts,
        dry_run=dry_run,
    )
    return dispatcher, journal, clock


def ids(n: int, prefix: str = "job") -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(n)]


@pytest.mark.anyio
async def test_every_returned_record_is_deleted_and_carries_the_request_id() -> None:
    api = FakeApi(ids(10))
    dispatcher, journal, _ = make(api)
    await dispatcher.process(Batch("b1", tuple(ids(10))))
    assert set(journal.outcomes().values()) == {Outcome.DELETED}
    assert all(r.request_id == "req-1" and r.record is not None for r in journal.results)
    assert len(api.delete_calls) == 1


@pytest.mark.anyio
async def test_an_id_missing_from_the_answer_is_checked_and_ends_absent() -> None:
    api = FakeApi(ids(3))
    dispatcher, journal, _ = make(api)
    await dispatcher.process(Batch("b1", ("job-0000", "ghost-1", "job-0001")))
    assert journal.outcomes() == {
        "job-0000": Outcome.DELETED,
        "job-0001": Outcome.DELETED,
        "ghost-1": Outcome.ABSENT,
    }
    assert api.show_calls == ["ghost-1"]


@pytest.mark.anyio
async def test_a_job_still_there_after_a_200_is_sent_again() -> None:
    api = FakeApi(["job-0000", "late"])
    api.resist["late"] = 1  # the first 200 leaves this job in place and does not list it
    dispatcher, journal, _ = make(api)
    await dispatcher.process(Batch("b1", ("job-0000", "late")))
    assert journal.outcomes() == {"job-0000": Outcome.DELETED, "late": Outcome.DELETED}
    assert api.show_calls == ["late"]
    assert api.delete_calls == [("job-0000", "late"), ("late",)]
    assert api.deleted["late"] == 1


@pytest.mark.anyio
async def test_a_job_that_never_goes_fails_after_the_attempt_budget() -> None:
    api = FakeApi(["stuck"])
    api.resist["stuck"] = 100
    dispatcher, journal, _ = make(api, max_attempts=3)
    await dispatcher.process(Batch("b1", ("stuck",)))
    assert journal.outcomes() == {"stuck": Outcome.FAILED}
    assert len(api.delete_calls) == 3


@pytest.mark.anyio
async def test_a_4xx_batch_is_split_until_the_poison_id_stands_alone() -> None:
    good = ids(15)
    api = FakeApi(good, poison=frozenset({"poison"}))
    dispatcher, journal, _ = make(api)
    await dispatcher.process(Batch("b1", (*good[:7], "poison", *good[7:])))
    outcomes = journal.outcomes()
    assert outcomes.pop("poison") is Outcome.FAILED
    assert set(outcomes) == set(good)
    assert set(outcomes.values()) == {Outcome.DELETED}
    failed = next(r for r in journal.results if r.job_id == "poison")
    assert failed.http_status == 400 and failed.error_code == "ModelArts.0101"
    assert dispatcher.splits >= 4  # 16 -> 8 -> 4 -> 2 -> 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    "fault",
    [
        ThrottledError("slow down", http_status=429, retry_after=2.0),
        ServerError("boom", http_status=500),
        NetworkError("reset"),
        MalformedResponse("cut short", http_status=200),
    ],
)
async def test_transient_failures_are_retried_then_succeed(fault: BaseException) -> None:
    api = FakeApi(ids(5))
    api.script = [fault, fault]
    dispatcher, journal, clock = make(api)
    await dispatcher.process(Batch("b1", tuple(ids(5))))
    outcomes = journal.outcomes()
    assert len(outcomes) == 5
    # After an ambiguous failure the first attempt may already have deleted the jobs (this
    # fake applies a 5xx or a reset before failing): they are deleted all the same, by that
    # attempt, unconfirmed; never absent, never lost and never deleted twice.
    assert set(outcomes.values()) == {Outcome.DELETED}
    applied_unseen = isinstance(fault, ServerError | NetworkError)
    assert {r.confirmed for r in journal.results} == {not applied_unseen}
    assert max(api.deleted.values()) == 1
    assert [r[1] for r in journal.retries] == [2, 3]
    if isinstance(fault, ThrottledError):
        assert all(delay >= 2.0 for *_, delay, _ in journal.retries)
        assert clock.now() >= 4.0


@pytest.mark.anyio
async def test_a_lost_answer_ends_deleted_unconfirmed_with_the_record_read_before() -> None:
    """A 500 after the DELETE was applied: the retry finds the jobs gone. They end
    ``deleted`` with ``confirmed`` false, carrying the record a look-up had read, not
    ``absent`` as if somebody else had removed them."""
    api = FakeApi(ids(3))
    api.script = [ServerError("boom", http_status=500)]
    dispatcher, journal, _ = make(api)
    seen = JobRecord(id="job-0001", name="nightly", status="FINISHED")
    await dispatcher.process(Batch("b1", tuple(ids(3)), known={"job-0001": seen}))
    assert journal.outcomes() == dict.fromkeys(ids(3), Outcome.DELETED)
    by_id = {r.job_id: r for r in journal.results}
    assert {r.confirmed for r in by_id.values()} == {False}
    assert {r.reason for r in by_id.values()} == {"answer_lost"}
    assert by_id["job-0001"].record is seen and by_id["job-0000"].record is None
    assert by_id["job-0000"].row()["confirmed"] is False
    assert api.deleted == dict.fromkeys(ids(3), 1)


@pytest.mark.anyio
async def test_an_id_an_earlier_run_sent_unanswered_ends_deleted_unconfirmed() -> None:
    """The batch names ids a dead run had in flight: those found gone are its deletions;
    a ghost it never sent is still ``absent``."""
    api = FakeApi(["job-0001"])  # job-0000 went with the dead run's call
    dispatcher, journal, _ = make(api)
    batch = Batch("b1", ("job-0000", "job-0001", "ghost"), unsure=frozenset({"job-0000"}))
    await dispatcher.process(batch)
    by_id = {r.job_id: r for r in journal.results}
    assert (by_id["job-0000"].outcome, by_id["job-0000"].confirmed) == (Outcome.DELETED, False)
    assert (by_id["job-0001"].outcome, by_id["job-0001"].confirmed) == (Outcome.DELETED, True)
    assert by_id["ghost"].outcome is Outcome.ABSENT
    assert by_id["ghost"].row()["confirmed"] is None


@pytest.mark.anyio
async def test_ids_an_earlier_run_sent_are_sent_again_without_taking_from_the_cap() -> None:
    """The dead run counted them against ``--max-deletions`` (``spent``): resending them
    costs nothing more, and the fresh ids get what is left."""
    api = FakeApi(ids(6))
    dispatcher, journal, _ = make(api, budget=4)
    dispatcher._budget = DeletionBudget(4, spent=2)  # the dead run sent job-0004, job-0005
    batch = Batch("b1", tuple(ids(6)), unsure=frozenset({"job-0004", "job-0005"}))
    await dispatcher.process(batch)
    outcomes = journal.outcomes()
    assert {i for i, o in outcomes.items() if o is Outcome.DELETED} == {
        "job-0000", "job-0001", "job-0004", "job-0005",
    }  # fmt: skip
    assert {i for i, o in outcomes.items() if o is Outcome.SKIPPED} == {"job-0002", "job-0003"}
    assert dispatcher._budget.left == 0


@pytest.mark.anyio
async def test_exhausted_retries_mean_the_api_is_unavailable_and_ids_stay_open() -> None:
    api = FakeApi(ids(5))
    api.script = [ServerError("down", http_status=503)] * 10
    dispatcher, journal, _ = make(api, max_attempts=3)
    with pytest.raises(ApiUnavailable):
        await dispatcher.process(Batch("b1", tuple(ids(5))))
    assert [r for r in journal.results if r.outcome is Outcome.FAILED] == []


@pytest.mark.anyio
async def test_auth_failure_stops_at_once() -> None:
    api = FakeApi(ids(5))
    api.script = [AuthError("no", http_status=401)]
    dispatcher, journal, _ = make(api)
    with pytest.raises(AuthError):
        await dispatcher.process(Batch("b1", tuple(ids(5))))
    assert journal.results == []
    assert len(api.delete_calls) == 1


@pytest.mark.anyio
async def test_dry_run_sends_nothing() -> None:
    api = FakeApi(ids(5))
    dispatcher, journal, _ = make(api, dry_run=True)
    await dispatcher.process(Batch("b1", tuple(ids(5))))
    assert api.delete_calls == [] and api.show_calls == []
    assert {r.reason for r in journal.results} == {"dry_run"}
    assert set(journal.outcomes().values()) == {Outcome.SKIPPED}


@pytest.mark.anyio
async def test_the_deletion_cap_holds_across_concurrent_batches() -> None:
    api = FakeApi(ids(400))
    dispatcher, journal, _ = make(api, budget=123)
    async with anyio.create_task_group() as group:
        for n in range(20):
            group.start_soon(
                dispatcher.process, Batch(f"b{n}", tuple(ids(400)[n * 20 : n * 20 + 20]))
            )
    outcomes = Counter(journal.outcomes().values())
    assert sum(api.deleted.values()) == 123
    assert outcomes == {Outcome.DELETED: 123, Outcome.SKIPPED: 277}


faults = st.lists(
    st.sampled_from(["ok", "throttle", "4xx", "5xx-after", "reset", "drop-records"]),
    max_size=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    faults,
    st.integers(min_value=1, max_value=60),
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=0, max_value=4),
)
def test_every_id_gets_exactly_one_outcome_whatever_fails(
    script: list[str], n: int, size: int, ghosts: int
) -> None:
    """The invariant, over random fault scripts: each id once, never deleted twice, and
    every job the API deleted ends ``deleted`` (unconfirmed when its answer was lost), not
    ``absent``. A ghost (never a job) sent in an attempt without an answer cannot be told
    from a job that attempt deleted: it may end ``deleted`` too, but never confirmed."""
    real = ids(n)
    wanted = real + [f"ghost-{g}" for g in range(ghosts)]
    api = FakeApi(real, poison=frozenset({"ghost-0"}) if ghosts > 2 else frozenset())
    table: dict[str, BaseException | str] = {
        "ok": "ok",
        "drop-records": "drop-records",
        "throttle": ThrottledError("429", http_status=429, retry_after=1.0),
        "4xx": ClientError("x", http_status=400),
        "5xx-after": ServerError("500", http_status=500),
        "reset": NetworkError("reset"),
    }
    api.script = [table[s] for s in script]
    dispatcher, journal, _ = make(api, max_attempts=50)

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for start in range(0, len(wanted), size):
                batch = Batch(f"b{start}", tuple(wanted[start : start + size]))
                group.start_soon(dispatcher.process, batch)

    anyio.run(main)
    outcomes = journal.outcomes()
    assert set(outcomes) == set(wanted)
    assert max(api.deleted.values(), default=0) <= 1
    deleted = {i for i, o in outcomes.items() if o is Outcome.DELETED}
    # A 200 that leaves a deleted job out of its records says "not by this call": only
    # then may one of our deletions read ``absent``.
    assert set(api.deleted) - api.unlisted == (deleted & set(real)) - api.unlisted
    confirmed = {r.job_id for r in journal.results if r.outcome is Outcome.DELETED and r.confirmed}
    assert confirmed <= set(api.deleted)
    assert {i for i, o in outcomes.items() if o is Outcome.ABSENT} & set(real) <= api.unlisted
    assert api.jobs == {i for i, o in outcomes.items() if o is Outcome.FAILED and i in real}
