"""The pipeline's stop: what the grace period waits for, and what it does not."""

from __future__ import annotations

import random
from collections.abc import Sequence

import anyio
import pytest

from worker.batcher import Batcher, DeletionBudget
from worker.clock import MonotonicClock
from worker.dispatcher import Dispatcher, Working
from worker.events import EventLog
from worker.journal import LedgerPort, RunJournal, Tally
from worker.ledger import TemporaryLedger
from worker.pipeline import Pipeline, RunState
from worker.ratelimit import LocalRateLimiter
from worker.retry import RetryPolicy
from worker.types import Candidate, DeleteResult, JobRecord, Outcome

pytestmark = pytest.mark.anyio


class Deleting:
    """Deletes whatever it is asked to, at once; never asked to show a job here."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult:
        self.calls.append(tuple(ids))
        return DeleteResult(records=tuple(JobRecord(i) for i in ids), request_id="req")

    async def get_job(self, job_id: str) -> JobRecord:
        raise AssertionError("no show call expected")


async def test_a_stop_does_not_wait_out_the_grace_period_for_dispatchers_waiting_for_a_token() -> (
    None
):
    """A rate of one call in 1,000 s: the first batch goes at once (the burst), the others
    wait for tokens. On a stop, nobody has a call on the wire, so the run ends now, not
    when the hour of grace is over (it used to wait it out: QA measured 18 s of 20)."""
    clock = MonotonicClock()
    state, tally, working = RunState(), Tally(), Working()
    api = Deleting()
    with TemporaryLedger.open() as ledger:
        port = LedgerPort(ledger)
        journal = RunJournal(ledger=port, events=EventLog(), tally=tally)
        dispatcher = Dispatcher(
            transport=api, limiter=LocalRateLimiter(0.001, 1, clock),
            policy=RetryPolicy(max_attempts=3, rng=random.Random(1)), journal=journal,
            clock=clock, budget=DeletionBudget(None), max_attempts=3,
            stopping=lambda: state.stopping, working=working,
        )  # fmt: skip
        pipeline = Pipeline(
            entries=iter([Candidate(f"job-{n:03d}", n) for n in range(1, 41)]),
            ledger=port, journal=journal, dispatcher=dispatcher,
            batcher=Batcher(10, prefix="t"), tally=tally, concurrency=2, grace=3600.0,
            state=state, working=working,
        )  # fmt: skip
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                group.start_soon(pipeline.run)
                while not tally.outcomes:  # the first batch is through
                    await anyio.sleep(0.01)
                await anyio.sleep(0.2)  # the other dispatcher is waiting for a token
                state.request_stop("signal")
    assert len(api.calls) == 1
    assert tally.outcomes[Outcome.DELETED.value] == 10
    assert working.count == 0
