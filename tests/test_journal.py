"""RunJournal: the run's "exactly one outcome per id" held in memory, for every ledger."""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import orjson
import pytest
from anyio import wait_all_tasks_blocked
from structlog.testing import capture_logs

from worker.errors import OutcomeConflict, ReaperError, ResultsUnwritable
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


async def test_outcomes_recorded_behind_go_after_the_calls_sent_meanwhile() -> None:
    """Inside ``recording_behind`` (a run without a durable ledger) a report returns at
    once, its conflicts still raised at once; the outcomes are recorded (events, results
    file, tallies) after a task made ready meanwhile has run (aiohttp writes a call's body
    from such a task), and every one of them by the way out."""
    with TemporaryLedger.open() as ledger:
        journal, tally, out = _journal(ledger)
        journal.dispatching(["a", "b", "c", "d"])
        recorded_at_wire: list[int] = []
        failures: list[ReaperError] = []
        with capture_logs() as events:

            async def body_written() -> None:
                recorded_at_wire.append(len(events))

            async with (
                anyio.create_task_group() as group,
                journal.recording_behind(failures.append, buffer=1),
            ):
                await wait_all_tasks_blocked()  # the recording task waits for a report
                await journal.finished(_deleted("a", "b"))
                with pytest.raises(OutcomeConflict):
                    await journal.finished(_deleted("a"))
                assert (tally.finished, events, journal.unsettled) == (0, [], 2)
                group.start_soon(body_written)
                await journal.finished(_deleted("c", "d"))
    assert recorded_at_wire == [0] and failures == []
    assert [e["job_id"] for e in events] == ["a", "b", "c", "d"]
    assert [orjson.loads(line)["job_id"] for line in out.getvalue().splitlines()] == [
        "a", "b", "c", "d"
    ]  # fmt: skip
    assert tally.outcomes["deleted"] == 4 and journal.unsettled == 0


async def test_with_a_durable_ledger_each_outcome_is_committed_before_the_report_returns(
    tmp_path: Path,
) -> None:
    """A run that can be resumed records each outcome before its dispatcher's next call, even
    inside ``recording_behind``: a crash then leaves no more than the calls in flight
    unsettled, the window ``docs/ledger.md`` promises (test_resume's kill -9 runs sent up to
    5 windows again per kill with the outcomes recorded behind)."""
    ledger = Ledger.open(
        tmp_path / "ledger.sqlite", project_id="p", endpoint="http://127.0.0.1:1", run_id="r"
    )
    ledger.admit([Candidate("a", 1)])
    try:
        journal, tally, _ = _journal(ledger)
        journal.dispatching(["a"])
        with capture_logs() as events:
            async with journal.recording_behind(lambda exc: None, buffer=1):
                await journal.finished(_deleted("a"))
                assert ledger.counts().get("deleted") == 1
                assert tally.finished == 1 and [e["job_id"] for e in events] == ["a"]
    finally:
        ledger.close()


async def test_a_report_whose_dispatcher_is_cancelled_waiting_for_room_is_still_recorded() -> None:
    """The reports behind are full and the dispatcher reporting one more is cancelled while
    it waits for room (a second Ctrl-C, ``--grace 0``): its ids were taken off the ids due an
    outcome, so unless it is recorded they have none, though the API deleted them."""
    with TemporaryLedger.open() as ledger:
        journal, tally, out = _journal(ledger)
        journal.dispatching(["a", "b", "c"])
        with capture_logs() as events:
            async with journal.recording_behind(lambda exc: None, buffer=1):
                await journal.finished(_deleted("a"))  # the one report that fits
                with anyio.CancelScope() as scope:
                    scope.cancel()
                    await journal.finished(_deleted("b", "c"))  # waits for room
    assert [e["job_id"] for e in events] == ["a", "b", "c"]
    assert [orjson.loads(line)["job_id"] for line in out.getvalue().splitlines()] == [
        "a", "b", "c"
    ]  # fmt: skip
    assert tally.outcomes["deleted"] == 3 and journal.unsettled == 0


class _Full(io.BytesIO):
    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


async def test_a_recording_that_fails_behind_is_told_and_the_later_ones_are_still_made() -> None:
    """The results file fails under ``recording_behind``: its error goes to ``failed`` (no
    dispatcher is there to see it), and every outcome still has its event, written before
    the file is tried."""
    with TemporaryLedger.open() as ledger:
        ledger.admit([Candidate(job_id, n) for n, job_id in enumerate("abc", 1)])
        journal = RunJournal(
            ledger=LedgerPort(ledger), events=EventLog(), tally=Tally(),
            results=ResultsWriter(_Full()),
        )  # fmt: skip
        journal.dispatching(["a", "b", "c"])
        failures: list[ReaperError] = []
        with capture_logs() as events:
            async with journal.recording_behind(failures.append, buffer=1):
                await journal.finished(_deleted("a", "b"))
                await journal.finished(_deleted("c"))
    assert [type(f) for f in failures] == [ResultsUnwritable, ResultsUnwritable]
    assert [e["job_id"] for e in events] == ["a", "b", "c"]


_REWRITTEN = [
    Result("job-1", Outcome.DELETED, attempts=1, batch_id="b-1"),
    Result("bad id!", Outcome.REJECTED, reason="invalid character", line=7),
]


def test_rewrite_results_never_follows_a_symlink_to_the_file_it_leads_to(tmp_path: Path) -> None:
    """A link planted where the results go (``results.jsonl -> someone's file``): the file it
    leads to is neither truncated nor rewritten, and the link stays as it was."""
    real = tmp_path / "real.jsonl"
    real.write_text("someone else's\n")
    link = tmp_path / "results.jsonl"
    link.symlink_to(real)
    assert rewrite_results(iter(_REWRITTEN), link) == 0
    assert link.is_symlink()
    assert real.read_text() == "someone else's\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real.jsonl", "results.jsonl"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_rewrite_results_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path, mode: int) -> None:
    results = tmp_path / "results.jsonl"
    results.write_text("stale\n" * 5)
    results.chmod(mode)
    assert rewrite_results(iter(_REWRITTEN), results) == 2
    rows = [orjson.loads(line) for line in results.read_text().splitlines()]
    assert rows == [r.row() for r in _REWRITTEN]
    assert rows[1]["line"] == 7
    assert results.stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]  # no temporary left


def test_rewrite_results_makes_a_missing_file_private(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    old = os.umask(0)  # the widest umask: the mode is the code's, not the umask's
    try:
        assert rewrite_results(iter(_REWRITTEN), results) == 2
    finally:
        os.umask(old)
    assert results.stat().st_mode & 0o777 == 0o600


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

    def disk_fills() -> Iterator[Result]:
        yield _REWRITTEN[0]
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ResultsUnwritable, match="cannot be written: No space left"):
        rewrite_results(disk_fills(), results)
    assert results.read_text() == "kept\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]  # the temporary is gone
