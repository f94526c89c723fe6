"""One stage of a deleted id's path, run in a loop for ``bench_instructions`` to count:

    python -m tests.benchmarks.stages STAGE ROUNDS

``settle``: 200 answers of 50 records each, as the simulator writes them, parsed
(``parse_deleted``) and settled (``Dispatcher._settle``, which calls ``RunJournal.finished``
with JSON events to ``/dev/null``); ``quiet`` is the same with the events left unwritten;
``intake``: 10,000 ids read from a file, validated, admitted and batched. Everything the
stage needs is built before the first round, so the count of ``ROUNDS`` = 3 less that of
``ROUNDS`` = 1 is two rounds of the stage alone.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import structlog
from multidict import CIMultiDict, CIMultiDictProxy

from worker import logsetup
from worker.api.answers import Answer, Call, parse_deleted
from worker.batcher import Batcher, DeletionBudget
from worker.clock import MonotonicClock
from worker.dispatcher import Dispatcher, Doubt
from worker.input.sources import read_entries
from worker.ledger import TemporaryLedger
from worker.outcomes.events import EventLog
from worker.outcomes.journal import LedgerPort, RunJournal, Tally
from worker.pacing.bucket import UnlimitedRateLimiter
from worker.pacing.retry import RetryPolicy
from worker.pipeline import _next_chunk
from worker.simulator.jobs import JobStore
from worker.types import Batch, Candidate, DeleteResult, JobRecord, Result

IDS = 10_000
BATCH = 50


class _Unwritten(EventLog):
    def results(self, results: Sequence[Result]) -> None:
        return


class NoCalls:
    """The transport of a dispatcher whose every id is in its answer: it calls nobody."""

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult:
        raise AssertionError("no call expected")

    async def get_job(self, job_id: str) -> JobRecord:
        raise AssertionError("no call expected")


def drive(coroutine: Coroutine[Any, Any, object]) -> None:
    """Run a coroutine that never suspends (the temporary ledger records nothing)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise AssertionError("the journal suspended")


def read_admit_batch(source: Path) -> int:
    """What ``run`` does with its input before any call: read and validate the ids,
    admit them through a temporary ledger, batch them. Returns the batches made."""
    batches = 0
    with read_entries(str(source), "auto") as entries, TemporaryLedger.open() as seen:
        batcher = Batcher(BATCH, prefix="b")
        while chunk := _next_chunk(entries, 2000):
            admitted = seen.admit([e for e in chunk if isinstance(e, Candidate)])
            batches += sum(1 for _ in batcher.extend(c.job_id for c in admitted.new))
    return batches


def settle(rounds: int, events: EventLog) -> None:
    store = JobStore()
    ids = store.generate(IDS)
    batches = [ids[k : k + BATCH] for k in range(0, IDS, BATCH)]
    headers = CIMultiDictProxy(CIMultiDict[str]())
    answers = [
        Answer(status=200, reason="OK", headers=headers, request_id="req-1",
               body=b'{"data":[' + b",".join(store.jobs[i].record_json for i in batch) + b"]}")
        for batch in batches
    ]  # fmt: skip
    del store
    call = Call(method="DELETE", path="/v1/p/dev-servers/jobs", secrets=("AK", "SK"))
    sink = open(os.devnull, "w")  # noqa: SIM115 - open for the process's life
    logsetup.configure(fmt="json", stream=sink)
    structlog.contextvars.bind_contextvars(run_id="20261127T000000Z-000000")
    for _ in range(rounds):
        with TemporaryLedger.open() as ledger:
            journal = RunJournal(ledger=LedgerPort(ledger), events=events, tally=Tally())
            dispatcher = Dispatcher(
                transport=NoCalls(),
                limiter=UnlimitedRateLimiter(), policy=RetryPolicy(max_attempts=5),
                journal=journal, clock=MonotonicClock(), budget=DeletionBudget(None),
                max_attempts=5,
            )  # fmt: skip
            doubt = Doubt(Batch("b", ()))  # no id of these batches is in doubt
            for number, (answer, batch) in enumerate(zip(answers, batches, strict=True)):
                journal.dispatching(batch)
                parsed = parse_deleted(answer, call)
                drive(dispatcher._settle(f"b-{number:06d}", batch, 1, parsed, doubt))
            assert journal.unsettled == 0


def intake(rounds: int) -> None:
    source = Path(tempfile.mkdtemp()) / "ids.txt"
    source.write_text("".join(f"{n:08x}-5711-447c-b125-597f4d5a7c78\n" for n in range(IDS)))
    for _ in range(rounds):
        assert read_admit_batch(source) == IDS // BATCH
    source.unlink()
    source.parent.rmdir()


def main(argv: list[str]) -> int:
    stage, rounds = argv[0], int(argv[1])
    if stage == "settle":
        settle(rounds, EventLog())
    elif stage == "quiet":
        settle(rounds, _Unwritten())
    elif stage == "intake":
        intake(rounds)
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
