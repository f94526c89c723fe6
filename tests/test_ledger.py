"""The durable ledger: de-duplication across chunks and runs, one outcome per id, the writer
lock between processes, the project check, and flat memory at scale."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import ConfigError, InputUnreadable, OutcomeConflict, ReaperError
from worker.ledger import (
    Admission,
    Ledger,
    LedgerBusy,
    LedgerMismatch,
    TemporaryLedger,
    escape,
    open_readonly,
)
from worker.targets import Target
from worker.types import Candidate, Outcome, Rejection, Result

PROJECT = "proj-1"
ENDPOINT = "http://127.0.0.1:8443"
REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    """Epoch seconds that move only when told to."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cands(*ids: str, start: int = 1) -> list[Candidate]:
    return [Candidate(job_id, line) for line, job_id in enumerate(ids, start)]


def ids_of(candidates: list[Candidate]) -> list[str]:
    return [c.job_id for c in candidates]


def open_ledger(path: Path | None, run_id: str, **kw: object) -> Ledger:
    opts: dict[str, object] = {"project_id": PROJECT, "endpoint": ENDPOINT, **kw}
    return Ledger.open(path, run_id=run_id, **opts)  # type: ignore[arg-type]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


@pytest.fixture
def ledger(path: Path) -> Iterator[Ledger]:
    with open_ledger(path, "run-1", clock=FakeClock()) as opened:
        yield opened


# -- admission -------------------------------------------------------------------------------


def test_first_admission_is_new_in_input_order(ledger: Ledger) -> None:
    admission = ledger.admit(cands("c", "a", "b"))
    assert admission == Admission(new=cands("c", "a", "b"), repeated=[], done=[], resent=0)


def test_a_batch_size_learnt_is_kept_per_project_and_endpoint_and_a_row_edited_is_none(
    path: Path,
) -> None:
    """What a run learnt of the largest DELETE (``worker.batchsize``) is there for the next
    run on the ledger, the latest per project and endpoint; a row not of its shape (edited
    by hand) is no knowledge, not an error."""
    with open_ledger(path, "run-1") as first:
        first.keep_batch_size(Target(PROJECT, ENDPOINT), (12, 6))
        first.keep_batch_size(Target(PROJECT, ENDPOINT), (12, 7))
        first.keep_batch_size(Target("proj-2", ENDPOINT), (0, 40))
    with sqlite3.connect(path) as conn:
        conn.execute('INSERT INTO meta VALUES (\'batch_size ["p3", "e"]\', \'["x", 1]\')')
    with open_ledger(path, "run-2") as second:
        assert second.batch_sizes() == {(PROJECT, ENDPOINT): (12, 7), ("proj-2", ENDPOINT): (0, 40)}


def test_duplicates_in_one_run_are_repeated_within_and_across_chunks(ledger: Ledger) -> None:
    first = ledger.admit(cands("a", "b", "a"))
    assert ids_of(first.new) == ["a", "b"]
    assert first.repeated == [Candidate("a", 3)]
    second = ledger.admit([Candidate("b", 4), Candidate("c", 5), Candidate("c", 6)])
    assert ids_of(second.new) == ["c"]
    assert second.repeated == [Candidate("b", 4), Candidate("c", 6)]
    assert second.done == []


def test_ids_settled_by_an_earlier_run_are_done_and_not_admitted(path: Path) -> None:
    with open_ledger(path, "run-1") as first:
        first.admit(cands("a", "b", "c"))
        first.record(
            [
                Result("a", Outcome.DELETED, 1, "b-1", 200, request_id="req-1"),
                Result("b", Outcome.FAILED, 6, "b-1", 400, "ModelArts.0001", "bad"),
            ]
        )
    with open_ledger(path, "run-2") as second:
        admission = second.admit(cands("a", "b", "c", "d"))
        assert admission.done == [
            (Candidate("a", 1), Outcome.DELETED),
            (Candidate("b", 2), Outcome.FAILED),
        ]
        assert ids_of(admission.new) == ["c", "d"]  # c was left open by run-1
        assert admission.resent == 0


def test_a_done_id_read_twice_in_a_later_run_is_done_once_then_repeated(path: Path) -> None:
    with open_ledger(path, "run-1") as first:
        first.admit(cands("a"))
        first.record([Result("a", Outcome.ABSENT, 1, "b-1")])
    with open_ledger(path, "run-2") as second:
        assert second.admit(cands("a")).done == [(Candidate("a", 1), Outcome.ABSENT)]
        again = second.admit([Candidate("a", 7)])
        assert again.done == []
        assert again.repeated == [Candidate("a", 7)]


def test_ids_open_when_a_run_died_are_new_again_and_sent_ones_counted_resent(path: Path) -> None:
    with open_ledger(path, "run-1") as first:
        first.admit(cands("read-only", "sent-1", "sent-2", "settled"))
        first.mark_sent("b-1", ["sent-1", "sent-2", "settled"], attempt=1)
        first.record([Result("settled", Outcome.DELETED, 1, "b-1", 200)])
    with open_ledger(path, "run-2") as second:
        admission = second.admit(cands("read-only", "sent-1", "sent-2", "settled"))
        assert ids_of(admission.new) == ["read-only", "sent-1", "sent-2"]
        assert admission.resent == 2
        assert admission.done == [(Candidate("settled", 4), Outcome.DELETED)]


def test_ids_sent_unanswered_stay_unsure_across_runs_that_die_before_sending_them(
    path: Path,
) -> None:
    """Run 1 dies with "sent-1" in flight; run 2 reads it and dies before sending it; run 3
    must still know the job may be gone by run 1's hand."""
    with open_ledger(path, "run-1") as first:
        first.admit(cands("sent-1", "read-only"))
        first.mark_sent("b-1", ["sent-1"], attempt=1)
    with open_ledger(path, "run-2") as second:
        assert second.admit(cands("sent-1", "read-only")).unsure == {"sent-1"}
    with open_ledger(path, "run-3") as third:
        admission = third.admit(cands("sent-1", "read-only"))
        assert (set(admission.unsure), admission.resent) == ({"sent-1"}, 1)
        third.record([Result("sent-1", Outcome.DELETED, 1, "b-3", 404, confirmed=False)])
    with open_ledger(path, "run-4") as fourth:
        assert fourth.admit(cands("sent-1")).done == [(Candidate("sent-1", 1), Outcome.DELETED)]
        assert next(fourth.results()).confirmed is False


def test_sent_before_counts_what_earlier_runs_sent_for_the_cap(path: Path) -> None:
    """In flight when a run died, or settled after a DELETE: counted. Read only, or settled
    without a call (skipped, gone before the DELETE): not. Failed ones only when this run
    will not send them again itself."""
    with open_ledger(path, "run-1") as first:
        first.admit(cands("inflight", "deleted", "failed", "skipped", "unread", "gone"))
        first.mark_sent("b-1", ["inflight", "deleted", "failed"], attempt=1)
        first.record([
            Result("deleted", Outcome.DELETED, 1, "b-1", 200),
            Result("failed", Outcome.FAILED, 2, "b-1", 400),
            Result("skipped", Outcome.SKIPPED, 0, "b-1", reason="max_deletions"),
            Result("gone", Outcome.ABSENT, 0, "b-1", 404),
        ])  # fmt: skip
    with open_ledger(path, "run-2") as second:
        assert second.sent_before() == 3
    with open_ledger(path, "run-3", retry_failed=True) as third:
        assert third.sent_before() == 2


def test_a_ledger_from_before_unconfirmed_deletions_is_read_and_taken_over(path: Path) -> None:
    with open_ledger(path, "run-1") as first:
        first.admit(cands("a", "b"))
        first.record([Result("a", Outcome.DELETED, 1, "b-1", 200)])
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE ids DROP COLUMN confirmed")  # as the older version made it
    conn.commit()
    conn.close()
    with open_readonly(path) as view:
        assert [(r.job_id, r.confirmed) for r in view.results()] == [("a", True)]
        assert view.counts()["unconfirmed"] == 0
    with open_ledger(path, "run-2") as second:
        second.admit(cands("b"))
        second.record([Result("b", Outcome.DELETED, 1, "b-2", 404, confirmed=False)])
        assert [(r.job_id, r.confirmed) for r in second.results()] == [("a", True), ("b", False)]


def test_retry_failed_admits_failed_ids_again_but_not_other_outcomes(path: Path) -> None:
    with open_ledger(path, "run-1") as first:
        first.admit(cands("gone", "broken"))
        first.record(
            [Result("gone", Outcome.DELETED, 1, "b-1"), Result("broken", Outcome.FAILED, 6, "b-1")]
        )
    with open_ledger(path, "run-2") as plain:
        assert plain.admit(cands("broken")).done == [(Candidate("broken", 1), Outcome.FAILED)]
    with open_ledger(path, "run-3", retry_failed=True) as retry:
        admission = retry.admit(cands("gone", "broken"))
        assert ids_of(admission.new) == ["broken"]
        assert admission.done == [(Candidate("gone", 1), Outcome.DELETED)]
        retry.record([Result("broken", Outcome.DELETED, 1, "b-9", 200)])
        assert retry.counts()["failed"] == 0
        assert retry.counts()["deleted"] == 2


def test_holds_done_is_true_only_when_a_run_would_send_none_of_the_ids(path: Path) -> None:
    """What lets ``run``'s prompt ask nothing: every id deleted, absent, or failed and not
    retried; an id skipped (decided again by the next run), never seen or still open is not,
    wherever it falls among chunks of 1,000 ids."""
    done = [f"job-{n}" for n in range(2500)]
    with open_ledger(path, "run-1") as first:
        first.admit(cands(*done, "skip", "broken", "open"))
        first.record([Result(job_id, Outcome.DELETED, 1, "b-1") for job_id in done[:-1]]
                     + [Result(done[-1], Outcome.ABSENT, 1, "b-1"),
                        Result("skip", Outcome.SKIPPED, 0, None, reason="dry_run"),
                        Result("broken", Outcome.FAILED, 6, "b-1")])  # fmt: skip
    with open_readonly(path) as view:
        assert view.holds_done(done + done[:10] + ["broken"])
        assert not view.holds_done(["broken"], retry_failed=True)
        for other in ("skip", "open", "never-seen"):
            assert not view.holds_done([*done[:1500], other, *done[1500:]]), other
        assert view.holds_done([])


# -- outcomes --------------------------------------------------------------------------------


def test_an_id_gets_exactly_one_outcome_in_a_run(ledger: Ledger) -> None:
    ledger.admit(cands("a", "b", "c"))
    ledger.record([Result("a", Outcome.DELETED, 1, "b-1", 200)])
    with pytest.raises(OutcomeConflict, match=r"1 ids .* e\.g\. a \(kept deleted\)"):
        ledger.record([Result("a", Outcome.ABSENT, 2, "b-2"), Result("b", Outcome.ABSENT)])
    # the valid outcome of the refused call was kept; the first outcome of a was not touched
    outcomes = {r.job_id: r for r in ledger.results()}
    assert outcomes["a"].outcome is Outcome.DELETED
    assert outcomes["a"].batch_id == "b-1"
    assert outcomes["b"].outcome is Outcome.ABSENT
    assert "c" not in outcomes


def test_the_same_id_twice_in_one_record_call_is_refused_whole(ledger: Ledger) -> None:
    ledger.admit(cands("a", "b"))
    with pytest.raises(OutcomeConflict, match="twice"):
        ledger.record([Result("a", Outcome.DELETED), Result("b", Outcome.DELETED)] * 2)
    assert ledger.counts()["open"] == 2


def test_recording_over_an_earlier_runs_outcome_needs_failed_and_retry_failed(path: Path) -> None:
    with open_ledger(path, "run-1") as first:
        first.admit(cands("ok", "bad"))
        first.record([Result("ok", Outcome.DELETED), Result("bad", Outcome.FAILED, 6)])
    with open_ledger(path, "run-2") as plain, pytest.raises(OutcomeConflict):
        plain.record([Result("bad", Outcome.DELETED)])
    with open_ledger(path, "run-3", retry_failed=True) as retry:
        retry.record([Result("bad", Outcome.ABSENT, 1, "b-3")])
        with pytest.raises(OutcomeConflict, match="kept deleted"):
            retry.record([Result("ok", Outcome.ABSENT)])
        assert {r.job_id: r.outcome for r in retry.results()} == {
            "ok": Outcome.DELETED,
            "bad": Outcome.ABSENT,
        }


def test_every_result_field_round_trips(ledger: Ledger) -> None:
    result = Result(
        job_id="a",
        outcome=Outcome.FAILED,
        attempts=6,
        batch_id="b-7",
        http_status=400,
        error_code="ModelArts.4001",
        error_msg="job is running",
        request_id="req-9",
        reason="client error",
    )
    ledger.admit(cands("a"))
    ledger.record([result])
    assert list(ledger.results()) == [result]


def test_an_outcome_for_an_id_never_admitted_is_still_kept(ledger: Ledger) -> None:
    ledger.admit(cands("a"))
    ledger.record([Result("a", Outcome.DELETED), Result("stray", Outcome.ABSENT, 1, "b-1")])
    assert {r.job_id: r.outcome for r in ledger.results()} == {
        "a": Outcome.DELETED,
        "stray": Outcome.ABSENT,
    }
    with pytest.raises(OutcomeConflict):
        ledger.record([Result("stray", Outcome.DELETED)])


def test_a_server_message_with_a_lone_surrogate_is_stored_escaped(ledger: Ledger) -> None:
    ledger.admit(cands("a"))
    ledger.record([Result("a", Outcome.FAILED, 1, "b-1", 500, "X", "bad \udc80 byte")])
    (stored,) = ledger.results()
    assert stored.error_msg == "bad \\udc80 byte"


def test_mark_sent_records_the_batch_and_never_reopens_a_settled_id(ledger: Ledger) -> None:
    ledger.admit(cands("a", "b"))
    ledger.record([Result("a", Outcome.DELETED, 1, "b-1")])
    ledger.mark_sent("b-2", ["a", "b"], attempt=3)
    assert list(ledger.open_ids()) == [("b", "sent")]
    assert [r.batch_id for r in ledger.results()] == ["b-1"]


def test_counts_open_ids_and_rejected_lines(ledger: Ledger) -> None:
    ledger.admit(cands(*(f"id-{n}" for n in range(30))))
    ledger.mark_sent("b-1", ["id-3"], attempt=1)
    ledger.record([Result("id-0", Outcome.DELETED), Result("id-1", Outcome.SKIPPED)])
    ledger.record([Result("id-5", Outcome.DELETED, confirmed=False)])
    ledger.record_rejected([Rejection("bad id", 40, "invalid character ' '")])
    assert ledger.counts() == {
        "deleted": 2,
        "absent": 0,
        "failed": 0,
        "rejected": 0,
        "skipped": 1,
        "open": 27,
        "rejected_lines": 1,
        "unconfirmed": 1,
        "not_listed": 0,
    }
    assert [(r.job_id, r.confirmed) for r in ledger.results()] == [
        ("id-0", True), ("id-1", True), ("id-5", False), ("bad id", True),
    ]  # fmt: skip
    assert list(ledger.open_ids(limit=3)) == [("id-2", "read"), ("id-3", "sent"), ("id-4", "read")]
    assert len(list(ledger.open_ids())) == 27


def test_rejected_lines_are_kept_escaped_bounded_and_once(path: Path) -> None:
    hostile = "evil\x1b[31m\nid"
    with open_ledger(path, "run-1") as first:
        first.record_rejected([Rejection(hostile, 3, "invalid"), Rejection("x" * 5000, 4, "long")])
    with open_ledger(path, "run-2") as second:
        second.record_rejected([Rejection(hostile, 3, "invalid")])
        rejected = [r for r in second.results() if r.outcome is Outcome.REJECTED]
        assert second.counts()["rejected_lines"] == 2
    assert [r.line for r in rejected] == [3, 4]
    assert rejected[0].job_id == "evil\\x1b[31m\\nid"
    assert rejected[0].job_id.isprintable()
    assert len(rejected[1].job_id) < 300
    assert rejected[1].job_id.endswith("(+4800 chars)")


def test_escape_leaves_printable_text_alone() -> None:
    assert escape("plain-id_1 with spaces") == "plain-id_1 with spaces"
    assert escape(escape("a\tb")) == escape("a\tb") == "a\\tb"


# -- who may open it --------------------------------------------------------------------------


def test_another_project_or_endpoint_is_refused_naming_old_and_new(path: Path) -> None:
    with open_ledger(path, "run-1"):
        pass
    with pytest.raises(LedgerMismatch, match=r"project_id: the ledger has 'proj-1'.*'proj-2'"):
        Ledger.open(path, project_id="proj-2", endpoint=ENDPOINT, run_id="run-2")
    with pytest.raises(LedgerMismatch) as caught:
        Ledger.open(
            path,
            project_id=PROJECT,
            endpoint="https://user:hunter2@modelarts.cn-north-4.myhuaweicloud.com/",
            run_id="run-3",
        )
    message = str(caught.value)
    assert "endpoint" in message
    assert "https://modelarts.cn-north-4.myhuaweicloud.com" in message
    assert "hunter2" not in message
    assert isinstance(caught.value, ConfigError)
    # the refused opens left no lock behind
    with open_ledger(path, "run-4", endpoint=ENDPOINT + "/"):
        pass


def test_a_second_writer_in_the_same_process_is_busy(ledger: Ledger, path: Path) -> None:
    with pytest.raises(LedgerBusy, match=f"pid {os.getpid()}"):
        open_ledger(path, "run-2")


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from worker.ledger import Ledger
    from worker.types import Candidate
    ledger = Ledger.open(Path(sys.argv[1]), project_id="proj-1",
                         endpoint="http://127.0.0.1:8443", run_id="crashed")
    ledger.admit([Candidate("x1", 1), Candidate("x2", 2), Candidate("x3", 3)])
    ledger.mark_sent("b-1", ["x1", "x2"], 1)
    print("locked", flush=True)
    time.sleep(60)
    """
)

OPENER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from worker.ledger import Ledger, LedgerBusy
    try:
        Ledger.open(Path(sys.argv[1]), project_id="proj-1",
                    endpoint="http://127.0.0.1:8443", run_id="second")
    except LedgerBusy as exc:
        print("busy:", exc)
        sys.exit(78)
    print("opened")
    """
)


def test_a_second_process_on_the_same_ledger_gets_ledger_busy(ledger: Ledger, path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", OPENER, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 78, proc.stderr
    assert f"busy: ledger {path} is in use by another process (pid {os.getpid()})" in proc.stdout


def test_a_kill_9d_holder_does_not_block_and_its_commits_survive(path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LedgerBusy, match=f"pid {holder.pid}"):
            open_ledger(path, "too-early")
    finally:
        holder.kill()  # SIGKILL: no close(), no cleanup
        holder.wait(timeout=30)
        if holder.stdout is not None:
            holder.stdout.close()
    assert holder.returncode == -9
    with open_ledger(path, "next") as resumed:
        admission = resumed.admit(cands("x1", "x2", "x3"))
        assert ids_of(admission.new) == ["x1", "x2", "x3"]
        assert admission.resent == 2
        crashed, resumed_run = resumed.runs()
        assert crashed.run_id == "crashed"
        assert crashed.ended_at is None
        assert resumed_run.run_id == "next"


def test_a_temporary_ledger_is_deleted_on_close() -> None:
    ledger = TemporaryLedger.open()
    where = ledger.path
    ledger.admit(cands("a"))
    assert where.exists()
    ledger.close()
    ledger.close()  # idempotent
    assert not where.exists()
    assert not where.parent.exists()
    with pytest.raises(ReaperError, match="closed"):
        ledger.admit(cands("b"))


@pytest.fixture
def temporary() -> Iterator[TemporaryLedger]:
    with TemporaryLedger.open() as opened:
        yield opened


def test_a_temporary_ledger_admits_each_id_once_across_chunks_and_within_one(
    temporary: TemporaryLedger,
) -> None:
    first = temporary.admit(cands("a", "b", "a", "c"))
    assert ids_of(first.new) == ["a", "b", "c"]
    assert ids_of(first.repeated) == ["a"]
    assert [c.line for c in first.repeated] == [3]  # the second copy, not the first
    second = temporary.admit(cands("c", "d", "b"))
    assert ids_of(second.new) == ["d"]
    assert ids_of(second.repeated) == ["c", "b"]
    assert (second.done, second.resent) == ([], 0)
    assert "admitted=4" in repr(temporary)


@given(
    st.lists(st.lists(st.sampled_from("abcdefgh"), max_size=12), max_size=6),
    st.sampled_from([0, 1, 5, 100]),
)
def test_a_temporary_ledger_admits_like_a_set(chunks: list[list[str]], memory_ids: int) -> None:
    """Whatever the chunks, the ids admitted are the first copies, in input order: in memory,
    on disk, and across the move from one to the other."""
    seen: set[str] = set()
    with TemporaryLedger.open(memory_ids=memory_ids) as ledger:
        for chunk in chunks:
            admission = ledger.admit(cands(*chunk))
            expected_new = []
            for job_id in chunk:
                if job_id not in seen:
                    seen.add(job_id)
                    expected_new.append(job_id)
            assert ids_of(admission.new) == expected_new
            assert len(admission.new) + len(admission.repeated) == len(chunk)


def _seen_on_disk(ledger: TemporaryLedger) -> list[str]:
    with sqlite3.connect(ledger.path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert tables == {"seen"}
        rows = sorted(row[0] for row in conn.execute("SELECT job_id FROM seen"))
    conn.close()
    return rows


def test_a_temporary_ledger_keeps_few_ids_in_memory_and_moves_them_to_disk_past_a_limit() -> None:
    with TemporaryLedger.open(memory_ids=3) as ledger:
        assert ids_of(ledger.admit(cands("a", "b")).new) == ["a", "b"]
        assert ledger.admits_in_memory(1)
        assert not ledger.admits_in_memory(2)
        assert _seen_on_disk(ledger) == []
        assert "in memory" in repr(ledger)
        # Two more would make four: everything moves to the file first, then this chunk.
        admission = ledger.admit(cands("b", "c", "d", "c"))
        assert ids_of(admission.new) == ["c", "d"]
        assert ids_of(admission.repeated) == ["b", "c"]
        assert ledger.spilled
        assert not ledger.admits_in_memory(0)
        assert _seen_on_disk(ledger) == ["a", "b", "c", "d"]
        assert ids_of(ledger.admit(cands("a", "e")).repeated) == ["a"]
        assert _seen_on_disk(ledger) == ["a", "b", "c", "d", "e"]
        assert "on disk" in repr(ledger)


def test_a_file_that_is_not_a_ledger_is_a_config_error(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE jobs (id TEXT)")
    conn.close()
    with pytest.raises(ConfigError, match="not a devserver-reaper ledger"):
        open_ledger(other, "run-1")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(ConfigError, match="not a devserver-reaper ledger"):
        open_ledger(garbage, "run-1")
    with pytest.raises(ConfigError, match="does not exist"):
        open_ledger(tmp_path / "missing-dir" / "ledger.sqlite", "run-1")


def test_repr_shows_path_run_and_cached_counts(ledger: Ledger, path: Path) -> None:
    ledger.admit(cands("a", "b"))
    assert "counts=None" in repr(ledger)
    ledger.counts()
    text = repr(ledger)
    assert f"path={str(path)!r}" in text
    assert "run_id='run-1'" in text
    assert "admitted=2" in text
    assert "'open': 2" in text
    ledger.close()
    assert "closed" in repr(ledger)


def test_rows_carry_the_injected_clock(path: Path) -> None:
    clock = FakeClock(1_000.0)
    with open_ledger(path, "run-1", clock=clock) as ledger:
        clock.now = 2_000.0
        ledger.admit(cands("a"))
    (run,) = open_readonly(path).runs()
    assert (run.started_at, run.ended_at) == (1_000.0, 2_000.0)


# -- invariants --------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    runs=st.lists(
        st.lists(st.lists(st.sampled_from("abcdefgh"), max_size=8), max_size=4),
        min_size=1,
        max_size=3,
    ),
    settle=st.sets(st.sampled_from("abcdefgh")),
)
def test_each_id_is_new_at_most_once_per_run_and_every_candidate_is_classified(
    runs: list[list[list[str]]], settle: set[str]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.sqlite"
        settled: set[str] = set()
        for number, chunks in enumerate(runs):
            with open_ledger(path, f"run-{number}") as ledger:
                seen_new: list[str] = []
                for chunk in chunks:
                    admission = ledger.admit(cands(*chunk))
                    total = len(admission.new) + len(admission.repeated) + len(admission.done)
                    assert total == len(chunk)
                    assert {c.job_id for c, _ in admission.done} <= settled
                    seen_new += ids_of(admission.new)
                assert len(seen_new) == len(set(seen_new))
                assert not set(seen_new) & settled
                finished = [i for i in seen_new if i in settle]
                ledger.record([Result(i, Outcome.DELETED) for i in finished])
                settled |= set(finished)


# -- memory -----------------------------------------------------------------------------------


def _admit_peak(path: Path | None, count: int, memory_ids: int = 0) -> int:
    """The Python-side peak while ``count`` ids are admitted in chunks of 1,000: to the
    ledger at ``path``, or (None) to a temporary ledger of ``memory_ids``."""
    opened = open_ledger(path, "mem") if path else TemporaryLedger.open(memory_ids=memory_ids)
    with opened as ledger:
        tracemalloc.start()
        try:
            for start in range(0, count, 1000):
                ledger.admit([Candidate(f"job-{n:012d}", n) for n in range(start, start + 1000)])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    return peak


PEAK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tests.test_ledger import _admit_peak
    path, count, memory_ids = sys.argv[1:]
    print(_admit_peak(Path(path) if path else None, int(count), int(memory_ids)))
    """
)


def _peaks(*runs: tuple[Path | None, int, int]) -> list[int]:
    """:func:`_admit_peak` of each run, each in a process of its own (side by side): in a
    test runner's process tracemalloc also counts what its other threads allocate meanwhile
    (xdist's, reading the scheduler's messages), which broke the ratio under load."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", PEAK, str(path or ""), str(count), str(memory_ids)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for path, count, memory_ids in runs
    ]
    peaks = []
    for child in children:
        out, _ = child.communicate(timeout=300)
        assert child.returncode == 0, out
        peaks.append(int(out))
    return peaks


@pytest.mark.slow
@pytest.mark.timeout(360)  # ~8 s of CPU, ten times that on a loaded 2-core machine
def test_memory_stays_flat_from_100k_to_1m_admitted_ids(tmp_path: Path) -> None:
    """Python-side peak while admitting, in chunks of 1,000: the same at 1M ids as at 100k,
    because nothing per id stays in memory (SQLite's page cache is bounded by cache_size).
    Ten times the ids is enough to tell: a leak of one small int per id (8 bytes) is 1.3 MB
    against 10 MB here, failing both checks."""
    small, large = _peaks((tmp_path / "small.sqlite", 100_000, 0),
                          (tmp_path / "large.sqlite", 1_000_000, 0))  # fmt: skip
    assert large / small < 1.3, (small, large)
    assert large < 5_000_000  # a chunk's worth, not the 1M ids (~75 MB as Python strings)


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_a_temporary_ledger_holds_no_more_than_its_memory_limit_in_memory() -> None:
    """Past ``memory_ids`` the ids live on disk: the peak at 200k ids is the peak at 20k."""
    small, large = _peaks((None, 20_000, 5_000), (None, 200_000, 5_000))
    assert large / small < 1.3, (small, large)
    assert large < 4_000_000  # 5k ids and a chunk, not the 200k ids (~18 MB)


@pytest.mark.anyio
async def test_the_port_admits_on_the_event_loop_only_while_the_ids_fit_in_memory() -> None:
    from worker.outcomes.journal import LedgerPort

    threads: list[int] = []

    class Watched(TemporaryLedger):
        def admit(self, candidates: Sequence[Candidate]) -> Admission:
            threads.append(threading.get_ident())
            return super().admit(candidates)

    with Watched.open(memory_ids=2) as ledger:
        port = LedgerPort(ledger)
        assert ids_of((await port.admit(cands("a", "b"))).new) == ["a", "b"]
        assert ids_of((await port.admit(cands("b", "c"))).new) == ["c"]
    loop_thread = threading.get_ident()
    assert threads[0] == loop_thread  # a set look-up: no thread hop
    assert threads[1] != loop_thread  # SQLite: off the loop


@pytest.mark.anyio
async def test_the_port_marks_and_records_ids_in_a_durable_ledger_only(
    ledger: Ledger, temporary: TemporaryLedger
) -> None:
    """Nothing resumes from or reports on a temporary ledger: the port only admits to it
    (a temporary ledger has no ``mark_sent``, ``record`` or ``record_rejected`` to call)."""
    from worker.outcomes.journal import LedgerPort

    for opened in (ledger, temporary):
        port = LedgerPort(opened)
        await port.admit(cands("a", "b"))
        await port.mark_sent("b-1", ["a", "b"], 1)
        await port.record([Result("b", Outcome.DELETED, 1, "b-1")])
        await port.record_rejected([Rejection("bad id", 3, "invalid character")])
    assert list(ledger.open_ids()) == [("a", "sent")]
    assert ledger.counts()["deleted"] == 1
    assert ledger.counts()["rejected_lines"] == 1
    assert ids_of(temporary.admit(cands("a", "b")).repeated) == ["a", "b"]
    assert "durable=False" in repr(LedgerPort(temporary))
    assert "durable=True" in repr(LedgerPort(ledger))


def test_only_a_durable_ledger_pays_for_the_wal_and_syncs(
    ledger: Ledger, temporary: TemporaryLedger
) -> None:
    """A temporary ledger is never reopened, so it needs no crash safety."""

    def pragmas(conn: sqlite3.Connection) -> tuple[str, int]:
        return (
            conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA synchronous").fetchone()[0],
        )

    assert pragmas(ledger._conn) == ("wal", 1)
    assert pragmas(temporary._conn) == ("memory", 0)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_run_refusing_a_file_that_is_not_a_ledger_leaves_it_and_makes_nothing_beside_it(
    tmp_path: Path,
) -> None:
    """``run --ledger notes.txt`` left notes.txt-wal, -shm and .lock beside the file; on an
    SQLite file of someone else's, SQLite had also turned it to WAL before it was refused."""
    (tmp_path / "notes.txt").write_text("hello\n", encoding="utf-8")
    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE jobs (id TEXT)")
    conn.close()
    before = _files(tmp_path)
    for name in ("notes.txt", "other.db"):
        with pytest.raises(ConfigError, match=f"{name} is not a devserver-reaper ledger; use"):
            open_ledger(tmp_path / name, "run-1")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConfigError, match=r"^ledger .*dir cannot be used: is a directory$"):
        open_ledger(tmp_path / "dir", "run-1")
    (tmp_path / "dir").rmdir()
    assert _files(tmp_path) == before


def test_reading_a_ledger_leaves_no_file_and_a_running_writer_keeps_its_own(path: Path) -> None:
    """``report`` left ledger-wal and ledger-shm behind: a read-only connection cannot
    remove them. Read while a run writes, the run's files stay for it, and go when it ends."""
    with open_ledger(path, "run-1") as ledger:
        ledger.admit(cands("a", "b"))
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.sqlite", "ledger.sqlite.lock"]
    content = path.read_bytes()
    with open_readonly(path) as view:
        assert view.counts()["open"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.sqlite", "ledger.sqlite.lock"]
    assert path.read_bytes() == content
    with open_ledger(path, "run-2") as running:
        running.admit(cands("c"))
        with open_readonly(path) as view:
            assert view.counts()["open"] == 3
        running.admit(cands("d"))
        with open_readonly(path) as view:
            assert view.counts()["open"] == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.sqlite", "ledger.sqlite.lock"]
    with pytest.raises(InputUnreadable, match=r"^cannot read ledger .*: is a directory$"):
        open_readonly(path.parent)
    with pytest.raises(InputUnreadable, match=r"^cannot read ledger .*nope: no such file$"):
        open_readonly(path.parent / "nope")
