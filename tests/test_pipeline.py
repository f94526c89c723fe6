"""The pipeline's stop: what the grace period waits for, and what it does not."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from types import SimpleNamespace

import aiohttp
import anyio
import orjson
import pytest

from tests.e2e import SIM_AK, SIM_PROJECT, SIM_SK
from tests.fakes import FakeClock
from worker.api.client import ApiClient
from worker.api.credentials import Credentials, StaticCredentials
from worker.api.session import make_session
from worker.batcher import Batcher, DeletionBudget
from worker.dispatcher import Dispatcher, Working
from worker.errors import ThrottledError
from worker.ledger import TemporaryLedger
from worker.outcomes.events import EventLog
from worker.outcomes.journal import LedgerPort, RunJournal, Tally
from worker.pacing.bucket import LocalRateLimiter, RateLimiter, UnlimitedRateLimiter
from worker.pacing.retry import RetryPolicy
from worker.pipeline import Pipeline, RunState, _next_batch
from worker.simulator import SimulatorConfig, run_simulator
from worker.types import Batch, Candidate, DeleteResult, JobRecord, Outcome, Result

pytestmark = pytest.mark.anyio


class FirstCallOnly:
    """Deletes what the first call asks for; every later call is refused with a 429 and a
    minute of Retry-After."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult:
        self.calls.append(tuple(ids))
        if len(self.calls) > 1:
            raise ThrottledError("slow down", http_status=429, retry_after=60.0)
        return DeleteResult(records=tuple(JobRecord(i) for i in ids), request_id="req")

    async def get_job(self, job_id: str) -> JobRecord:
        raise AssertionError("no show call expected")


@pytest.mark.parametrize("waiting_for", ["a token", "a Retry-After"])
async def test_a_stop_does_not_wait_out_the_grace_period_for_dispatchers_only_waiting(
    waiting_for: str,
) -> None:
    """After the first batch, both dispatchers wait: for a token (one call a second) or
    out a minute's Retry-After. Their clock never moves by itself, so only the stop can
    end those waits. Nobody has a call on the wire, so the run ends at once, not when the
    hour of grace is over (it used to wait it out: QA measured 18 s of a 20 s grace), the
    waiting batches left open and nothing sent after the stop."""
    clock = FakeClock(autojump=False)
    state, tally, working = RunState(), Tally(), Working()
    api = FirstCallOnly()
    limiter: RateLimiter = (
        LocalRateLimiter(1.0, 1, clock) if waiting_for == "a token" else UnlimitedRateLimiter()
    )
    with TemporaryLedger.open() as ledger:
        port = LedgerPort(ledger)
        journal = RunJournal(ledger=port, events=EventLog(), tally=tally)
        dispatcher = Dispatcher(
            transport=api, limiter=limiter,
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
                # The first batch is through, and the dispatchers wait (after a 429 each,
                # in the Retry-After case).
                waited = 1 if waiting_for == "a token" else 3
                while not (tally.outcomes and working.count == 0 and len(api.calls) >= waited):
                    await anyio.sleep(0.01)
                calls = len(api.calls)
                state.request_stop("signal")
    assert tally.outcomes[Outcome.DELETED.value] == 10
    assert tally.finished == 10  # the waiting batches have no outcome: open
    assert len(api.calls) == calls  # nothing sent after the stop
    assert working.count == 0


async def test_a_ready_batch_is_taken_without_a_trip_round_the_event_loop() -> None:
    """A dispatcher takes its next batch just before its next call: a trip round the loop
    there put it behind every other dispatcher's work before each call. A batch waiting
    is taken at once; with none, the dispatcher waits (the others run); once the intake is
    done and the stream empty, there are no more."""
    send, receive = anyio.create_memory_object_stream[Batch](1)
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")
        await send.send(Batch("b-2", ("b",)))
        send.close()

    async with receive, anyio.create_task_group() as group:
        send.send_nowait(Batch("b-1", ("a",)))
        group.start_soon(other)  # runs at this task's first trip round the loop
        first = await _next_batch(receive)
        assert ran == []
        second = await _next_batch(receive)  # none ready: waits, and the other task runs
        assert ran == ["other"]
        assert await _next_batch(receive) is None
    assert (first, second) == (Batch("b-1", ("a",)), Batch("b-2", ("b",)))


class _Noted(EventLog):
    """Notes each batch's outcomes as they are recorded (its ``job.*`` lines written)."""

    def __init__(self, order: list[tuple[str, str]]) -> None:
        super().__init__()
        self._order = order

    def results(self, results: Sequence[Result]) -> None:
        self._order.append(("recorded", results[0].job_id))
        super().results(results)


async def test_the_next_call_is_on_the_wire_before_the_last_batch_is_recorded() -> None:
    """Recording a batch's outcomes (the ledger, a ``job.deleted`` line per id, the results
    file) is not between a dispatcher's answer and its next call any more: over real HTTP to
    the simulator, with one dispatcher, each DELETE after the first has its body written
    before the outcomes of the batch before it are recorded; and every outcome is recorded
    by the end of the run (it used to be recorded before the next call was made)."""
    order: list[tuple[str, str]] = []

    async def body_written(
        _: aiohttp.ClientSession, __: SimpleNamespace, sent: aiohttp.TraceRequestChunkSentParams
    ) -> None:
        order.append(("wire", orjson.loads(sent.chunk)["job_ids"][0]))

    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(body_written)
    trace.freeze()
    state, tally = RunState(), Tally()
    async with run_simulator(SimulatorConfig(jobs=40)) as sim:
        ids = sim.job_ids()
        session = make_session(concurrency=1, connect_timeout=5, read_timeout=10)
        session.trace_configs.append(trace)
        async with session:
            api = ApiClient(
                session=session,
                endpoint=sim.url,
                project_id=SIM_PROJECT,
                credentials=StaticCredentials(Credentials(ak=SIM_AK, sk=SIM_SK)),
            )
            with TemporaryLedger.open() as ledger:
                port = LedgerPort(ledger)
                journal = RunJournal(ledger=port, events=_Noted(order), tally=tally)
                clock = FakeClock()
                dispatcher = Dispatcher(
                    transport=api, limiter=LocalRateLimiter(1000.0, 100, clock),
                    policy=RetryPolicy(max_attempts=3), journal=journal, clock=clock,
                    budget=DeletionBudget(None), max_attempts=3,
                )  # fmt: skip
                pipeline = Pipeline(
                    entries=iter([Candidate(i, n) for n, i in enumerate(ids, 1)]),
                    ledger=port, journal=journal, dispatcher=dispatcher,
                    batcher=Batcher(10, prefix="t"), tally=tally, concurrency=1, grace=10.0,
                    state=state,
                )  # fmt: skip
                with anyio.fail_after(30):
                    await pipeline.run()
    firsts = ids[::10]  # each batch's first id names it
    assert [job_id for kind, job_id in order if kind == "wire"] == firsts
    assert [job_id for kind, job_id in order if kind == "recorded"] == firsts
    for before, batch in itertools.pairwise(firsts):
        assert order.index(("wire", batch)) < order.index(("recorded", before)), order
    assert tally.outcomes[Outcome.DELETED.value] == 40 and state.fatal is None
