"""What a deleted id costs in ``run``, stage by stage, on the real functions in this process:

    uv run pytest -m benchmark tests/benchmarks/bench_hotpath.py -s -p no:randomly

A 50-record answer as the simulator writes it is parsed (``parse_deleted``), its outcomes
are made as the dispatcher makes them, and the journal settles them with their events
(``RunJournal.finished`` over a temporary ledger, JSON events to ``/dev/null``); the input
stage reads, validates, admits and batches a file of 100,000 ids. Each figure is the best of
7 rounds, in microseconds per id: the floor under ``bench_sdk``'s zero-latency figures that
HTTP and the event loop add to.
"""

from __future__ import annotations

import gc
import os
import time
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import structlog
from multidict import CIMultiDict, CIMultiDictProxy

from tests.benchmarks.harness import machine, record
from tests.benchmarks.stages import NoCalls, drive, read_admit_batch
from worker import logsetup
from worker.api.answers import Answer, Call, parse_deleted
from worker.batcher import DeletionBudget
from worker.clock import MonotonicClock
from worker.dispatcher import Dispatcher, Doubt
from worker.ledger import TemporaryLedger
from worker.outcomes.events import EventLog
from worker.outcomes.journal import LedgerPort, RunJournal, Tally
from worker.pacing.bucket import UnlimitedRateLimiter
from worker.pacing.retry import RetryPolicy
from worker.simulator.jobs import JobStore
from worker.types import Batch, Result

pytestmark = pytest.mark.benchmark

BATCH = 50
ROUNDS = 7


def _best(step: Callable[[], object], repeat: int, ids: int) -> float:
    """Microseconds per id of ``step`` (run ``repeat`` times a round), best of the rounds."""
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.process_time()
        for _ in range(repeat):
            step()
        best = min(best, time.process_time() - started)
    return best / (repeat * ids) * 1e6


class _Kept:
    """A journal that only keeps the outcomes it is given: the dispatcher's own work, timed
    apart from the journal's."""

    def __init__(self) -> None:
        self.results: list[Result] = []

    async def sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        return

    async def unsent(self, batch_id: str, ids: Sequence[str]) -> None:
        return

    async def retrying(self, batch_id: str, attempt: int, delay_s: float, reason: str) -> None:
        return

    async def finished(self, results: Sequence[Result]) -> None:
        self.results = list(results)


def test_what_a_deleted_id_costs_stage_by_stage(tmp_path: Path) -> None:
    # pytest's own objects out of the collector's way: a run's process has a small heap,
    # and a large one makes every collection the per-id objects trigger slower.
    gc.collect()
    gc.freeze()
    try:
        _measure(tmp_path)
    finally:
        gc.unfreeze()


def _measure(tmp_path: Path) -> None:
    store = JobStore()
    ids = store.generate(BATCH)
    body = b'{"data":[' + b",".join(store.jobs[i].record_json for i in ids) + b"]}"
    answer = Answer(status=200, reason="OK", headers=CIMultiDictProxy(CIMultiDict()),
                    body=body, request_id="req-1")  # fmt: skip
    call = Call(method="DELETE", path="/v1/p/dev-servers/jobs", secrets=("AK", "SK"))
    parsed = parse_deleted(answer, call)
    kept = _Kept()
    clock = MonotonicClock()
    dispatcher = Dispatcher(
        transport=NoCalls(), limiter=UnlimitedRateLimiter(), policy=RetryPolicy(max_attempts=5),
        journal=kept, clock=clock, budget=DeletionBudget(None), max_attempts=5,
    )  # fmt: skip

    def make_outcomes() -> None:  # what the dispatcher does with a 200 (all ids returned)
        drive(dispatcher._settle("b-000001", ids, 1, parsed, Doubt(Batch("b", ()))))

    make_outcomes()
    results = kept.results
    assert len(parsed.records) == len(results) == BATCH

    with open(os.devnull, "w") as sink, TemporaryLedger.open() as ledger:
        logsetup.configure(fmt="json", stream=sink)
        structlog.contextvars.bind_contextvars(run_id="20261127T000000Z-000000")
        events = EventLog(sink=logsetup.json_sink())
        journal = RunJournal(ledger=LedgerPort(ledger), events=events, tally=Tally())

        def settle() -> None:
            journal.dispatching(ids)
            drive(journal.finished(results))

        figures = {
            "parse_records": _best(lambda: parse_deleted(answer, call), 2000, BATCH),
            "make_outcomes": _best(make_outcomes, 2000, BATCH),
            "journal_and_events": _best(settle, 2000, BATCH),
        }
        assert events.fast_batches >= 2000 * ROUNDS  # every batch went the JSON fast path
    structlog.contextvars.clear_contextvars()

    source = tmp_path / "ids.txt"
    source.write_text("".join(f"job-{n:012d}\n" for n in range(100_000)))

    def intake() -> int:
        batches = read_admit_batch(source)
        assert batches == 100_000 // BATCH
        return batches

    figures["read_validate_admit_batch"] = _best(intake, 1, 100_000)
    record("hotpath_us_per_id", **{k: round(v, 2) for k, v in figures.items()},
           total=round(sum(figures.values()), 2), machine=machine())  # fmt: skip


class _MonotonicMethod:
    """The run's clock as it was: a method calling ``time.monotonic()``."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()


def test_what_a_read_of_the_run_s_clock_costs() -> None:
    """``MonotonicClock.now()`` (``CLOCK_BOOTTIME`` on Linux) against the method calling
    ``time.monotonic()`` it replaced: nanoseconds a read, best of 7 rounds of a million,
    timed by ``time.perf_counter`` (``process_time`` ticks too coarsely for one read). Read
    per call on the hot path, it may cost no more than half as much again."""
    reads = 1_000_000

    def best_ns(clock: object) -> float:
        timer = timeit.Timer("clock.now()", globals={"clock": clock})
        return min(timer.repeat(repeat=ROUNDS, number=reads)) / reads * 1e9

    ours, before = best_ns(MonotonicClock()), best_ns(_MonotonicMethod())
    record("clock_read_ns", run_clock=round(ours, 1), monotonic_method=round(before, 1),
           ratio=round(ours / before, 2), machine=machine())  # fmt: skip
    assert ours < 1.5 * before
