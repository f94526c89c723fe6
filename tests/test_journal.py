"""RunJournal: the run's "exactly one outcome per id" held in memory, for every ledger."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from structlog.testing import capture_logs

from worker.errors import OutcomeConflict, ResultsUnwritable
from worker.ledger import Ledger, TemporaryLedger
from worker.outcomes.events import EventLog
from worker.outcomes.journal import LedgerPort, ResultsWriter, RunJournal, Tally, rewrite_results
from worker.types import Candidate, Outcome, Result

pytestmark = pytest.mark.anyio


AnyLedger = Ledger | TemporaryLedger


@pytest.fixture(params=["temporary", "durable"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AnyLedger]:
    opened: AnyLedger = (
        TemporaryLedger.open()
        if request.param == "temporary"
        else Ledger.open(
            tmp_path / "ledger.sqlite", project_id="p", endpoint="http://127.0.0.1:1", run_id="r"
        )
    )
    opened.admit([Candidate(job_id, n) for n, job_id in enumerate("abcd", 1)])
    try:
        yield opened
    finally:
        opened.close()


def _counts(ledger: AnyLedger) -> dict[str, int]:
    """A durable ledger's counts; a temporary one keeps none."""
    return ledger.counts() if isinstance(ledger, Ledger) else {}


def _journal(ledger: AnyLedger) -> tuple[RunJournal, Tally, io.BytesIO]:
    tally, out = Tally(), io.BytesIO()
    journal = RunJournal(
        ledger=LedgerPort(ledger), events=EventLog(), tally=tally, results=ResultsWriter(out)
    )
    return journal, tally, out


def _deleted(*ids: str) -> list[Result]:
    return [Result(i, Outcome.DELETED, 1, "b-1", http_status=200) for i in ids]


async def test_ids_handed_to_the_dispatcher_get_their_outcomes(ledger: AnyLedger) -> None:
    journal, tally, out = _journal(ledger)
    journal.dispatching(["a", "b", "c"])
    with capture_logs() as events:
        await journal.finished(_deleted("a", "b"))
    assert journal.unsettled == 1  # c: left open, as a stop would leave it
    assert tally.outcomes["deleted"] == 2
    assert [e["job_id"] for e in events] == ["a", "b"]
    assert [orjson.loads(line)["job_id"] for line in out.getvalue().splitlines()] == ["a", "b"]
    # A durable ledger has them too; a temporary one only de-duplicates.
    assert _counts(ledger).get("deleted", 0) == (2 if isinstance(ledger, Ledger) else 0)


@pytest.mark.parametrize(
    ("handed", "first", "second"),
    [
        ([], [], ["a"]),  # never handed to the dispatcher
        (["a", "b"], ["a"], ["a"]),  # a second outcome
        (["a", "b"], [], ["a", "b", "a"]),  # twice in one report
    ],
    ids=["never-dispatched", "second-outcome", "twice-in-one-report"],
)
async def test_an_outcome_an_id_is_not_due_is_refused_and_nothing_of_it_is_written(
    ledger: AnyLedger, handed: list[str], first: list[str], second: list[str]
) -> None:
    journal, tally, out = _journal(ledger)
    journal.dispatching(handed)
    if first:
        await journal.finished(_deleted(*first))
    before = (dict(tally.outcomes), out.getvalue(), journal.unsettled, _counts(ledger))
    with capture_logs() as events, pytest.raises(OutcomeConflict, match="for a, which is not due"):
        await journal.finished(_deleted(*second))
    assert events == []
    assert (dict(tally.outcomes), out.getvalue(), journal.unsettled, _counts(ledger)) == before


async def test_the_unsettled_set_stays_the_size_of_the_calls_in_flight(ledger: AnyLedger) -> None:
    journal, _, _ = _journal(ledger)
    for n in range(1000):
        batch = [f"id-{n}-{i}" for i in range(50)]
        journal.dispatching(batch)
        await journal.finished(
            [Result(i, Outcome.SKIPPED, reason="dry_run") for i in batch[:25]]
            + [Result(i, Outcome.ABSENT, 1, "b") for i in batch[25:]]
        )
        assert journal.unsettled == 0
    assert "unsettled=0" in repr(journal)


_REWRITTEN = [
    Result("job-1", Outcome.DELETED, attempts=1, batch_id="b-1"),
    Result("bad id!", Outcome.REJECTED, reason="invalid character", line=7),
]


def test_rewrite_results_replaces_the_file_and_keeps_a_symlink_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.jsonl"
    real.write_text("stale\n" * 5)
    link = tmp_path / "results.jsonl"
    link.symlink_to(real)
    assert rewrite_results(iter(_REWRITTEN), link) == 2
    assert link.is_symlink()
    rows = [orjson.loads(line) for line in real.read_text().splitlines()]
    assert rows == [r.results_row() for r in _REWRITTEN]
    assert rows[1]["line"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real.jsonl", "results.jsonl"]


def test_rewrite_results_leaves_a_pipe_or_a_device_alone(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert rewrite_results(iter(_REWRITTEN), fifo) == 0
    assert rewrite_results(iter(_REWRITTEN), Path("/dev/null")) == 0
    assert Path("/dev/null").is_char_device()
    assert [p.name for p in tmp_path.iterdir()] == ["fifo"]


def test_rewrite_results_that_cannot_be_written_raises_and_leaves_the_file(
    tmp_path: Path,
) -> None:
    results = tmp_path / "results.jsonl"
    results.write_text("kept\n")
    (tmp_path / ".results.jsonl.partial").mkdir()  # where the new file would be written
    with pytest.raises(ResultsUnwritable, match="cannot be written"):
        rewrite_results(iter(_REWRITTEN), results)
    assert results.read_text() == "kept\n"
