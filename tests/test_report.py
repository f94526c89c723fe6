"""`devserver-reaper report`: the real command, run as a subprocess against a filled ledger."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from worker.ledger import Ledger
from worker.types import Candidate, Outcome, Rejection, Result

pytestmark = pytest.mark.usefixtures("clean_env")

REPO = Path(__file__).resolve().parent.parent
FIELDS = [
    "job_id",
    "outcome",
    "batch_id",
    "request_id",
    "confirmed",
    "http_status",
    "error_code",
    "error_msg",
    "attempts",
    "reason",
]
OUTCOMES = [
    Result("job-del", Outcome.DELETED, 1, "b-1", 200, request_id="req-1"),
    Result("job-abs", Outcome.ABSENT, 1, "b-1", 200, request_id="req-1"),
    Result("job-bad", Outcome.FAILED, 6, "b-2", 400, "ModelArts.4001", 'job, "busy"', "req-2"),
    Result("job-skip", Outcome.SKIPPED, 0, reason="protected"),
]


def report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "report", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def fill(path: Path, *, open_ids: int = 3) -> Ledger:
    """A ledger with one settled run and a second one still holding the lock (returned)."""
    with Ledger.open(path, project_id="proj-1", endpoint="http://127.0.0.1:1", run_id="run-a") as a:
        a.admit([Candidate(r.job_id, n) for n, r in enumerate(OUTCOMES, 1)])
        a.record(OUTCOMES)
        a.record_rejected([Rejection("bad\x1b[2Jid", 9, "invalid characters")])
    running = Ledger.open(path, project_id="proj-1", endpoint="http://127.0.0.1:1", run_id="run-b")
    running.admit([Candidate(f"open-{n:03d}", n) for n in range(open_ids)])
    running.mark_sent("b-9", ["open-001"], attempt=2)
    return running


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


def test_summary_of_a_running_ledger_shows_counts_open_ids_rejected_and_runs(
    ledger_path: Path,
) -> None:
    running = fill(ledger_path, open_ids=25)
    try:  # the writer still holds its lock: report must not need it
        proc = report("--ledger", str(ledger_path))
    finally:
        running.close()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for outcome, count in (("deleted", 1), ("absent", 1), ("failed", 1), ("skipped", 1),
                           ("rejected", 1), ("total", 5)):  # fmt: skip
        assert f"  {outcome:<10}{count:>12}" in out
    assert "open (read or sent, no outcome yet): 25" in out
    assert "open-000  read" in out
    assert "open-001  sent" in out
    assert "open-019  read" in out
    assert "open-020" not in out  # the first 20 only
    assert "... and 5 more" in out
    assert "line 9: bad\\x1b[2Jid  (invalid characters)" in out
    assert "\x1b" not in out
    assert "run-a  started" in out
    assert "run-b  started" in out
    assert "no end (crashed or running)" in out
    assert "project_id  proj-1" in out


def test_jsonl_exports_every_terminal_outcome_with_the_results_fields(ledger_path: Path) -> None:
    fill(ledger_path).close()
    proc = report("--ledger", str(ledger_path), "--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    rows = [orjson.loads(line) for line in proc.stdout.splitlines()]
    assert [row["job_id"] for row in rows] == [
        "job-del",
        "job-abs",
        "job-bad",
        "job-skip",
        "bad\\x1b[2Jid",
    ]
    assert all(set(FIELDS) <= set(row) for row in rows)
    assert rows[2] == {**OUTCOMES[2].row()}
    assert rows[4]["outcome"] == "rejected"
    assert rows[4]["reason"] == "invalid characters"


def test_csv_export_to_a_file_matches_the_ledger(ledger_path: Path, tmp_path: Path) -> None:
    fill(ledger_path).close()
    target = tmp_path / "out.csv"
    proc = report("--ledger", str(ledger_path), "--format", "csv", "--output", str(target))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    rows = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"))))
    assert list(rows[0])[: len(FIELDS)] == FIELDS
    assert [row["outcome"] for row in rows] == [
        "deleted",
        "absent",
        "failed",
        "skipped",
        "rejected",
    ]
    failed = rows[2]
    assert failed["error_msg"] == 'job, "busy"'
    assert failed["http_status"] == "400"
    assert failed["attempts"] == "6"
    assert rows[0]["error_code"] == ""


def test_csv_has_the_columns_of_jsonl_and_no_cell_a_spreadsheet_would_run(
    ledger_path: Path,
) -> None:
    """The rejected line's number was missing from the CSV; and a rejected line, an id or a
    server's message starting with = + - @ tab or CR is a formula to a spreadsheet (OWASP
    CSV injection): quoted away with a leading '."""
    hostile = [
        Result("-job-dash", Outcome.ABSENT, 1, "b-1", 404, error_msg='=HYPERLINK("x")'),
        Result("job-at", Outcome.FAILED, 1, "b-1", 400, "ModelArts.1", "@SUM(A1)"),
        Result("job-plus", Outcome.DELETED, 1, "b-1", 404, confirmed=False, reason="answer_lost"),
    ]
    with Ledger.open(ledger_path, project_id="p", endpoint="http://127.0.0.1:1", run_id="r") as a:
        a.admit([Candidate(r.job_id, n) for n, r in enumerate(hostile, 1)])
        a.record(hostile)
        a.record_rejected([Rejection("+cmd|' /C calc'!A0", 7, "invalid characters"),
                           Rejection("\tx", 8, "invalid characters"),
                           Rejection("job-ok", 9, "bad project", text='=cmd|"x"')])  # fmt: skip
    jsonl = report("--ledger", str(ledger_path), "--format", "jsonl")
    keys = set().union(*(orjson.loads(line) for line in jsonl.stdout.splitlines()))
    proc = report("--ledger", str(ledger_path), "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert set(rows[0]) == keys and "line" in keys
    by_id = {row["job_id"]: row for row in rows}
    assert by_id["'-job-dash"]["error_msg"] == '\'=HYPERLINK("x")'
    assert by_id["job-at"]["error_msg"] == "'@SUM(A1)"
    assert by_id["job-plus"]["confirmed"] == "false"
    assert by_id["job-ok"]["raw"] == '\'=cmd|"x"'  # a refused line's text, quoted away too
    assert by_id["'+cmd|' /C calc'!A0"]["line"] == "7"
    assert by_id["\\tx"]["line"] == "8"  # the ledger keeps a tab escaped: no tab starts it
    for row in rows:
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row.values())


@pytest.mark.parametrize("suffix", ["", "-wal"])
def test_an_output_that_is_the_ledgers_own_file_exits_64_and_leaves_it(
    ledger_path: Path, suffix: str
) -> None:
    """``--output`` is truncated: pointed at the ledger, it used to wipe it, then fail."""
    fill(ledger_path).close()
    target = ledger_path.with_name(ledger_path.name + suffix)
    before = target.read_bytes() if target.exists() else None
    proc = report("--ledger", str(ledger_path), "--format", "jsonl", "--output", str(target))
    assert proc.returncode == 64, proc.stderr
    assert "is the ledger" in proc.stderr and "Traceback" not in proc.stderr
    assert (target.read_bytes() if target.exists() else None) == before
    assert report("--ledger", str(ledger_path)).returncode == 0  # still a ledger


def test_a_missing_ledger_exits_66_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sqlite"
    proc = report("--ledger", str(missing))
    assert proc.returncode == 66
    assert f"cannot read ledger {missing}: no such file" in proc.stderr
    assert not missing.exists()  # reading never creates a ledger


def test_a_file_that_is_not_a_ledger_exits_66(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello\n", encoding="utf-8")
    proc = report("--ledger", str(other))
    assert proc.returncode == 66
    assert str(other) in proc.stderr


def test_report_without_a_ledger_is_a_usage_error() -> None:
    env_free = report()
    assert env_free.returncode == 64
    assert "--ledger" in env_free.stderr


def test_report_reads_the_ledger_from_the_environment(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(ledger_path).close()
    monkeypatch.setenv("REAPER_LEDGER", str(ledger_path))
    proc = report("--format", "jsonl")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 5


def test_two_copies_of_one_whole_ledger_are_refused_not_counted_twice(tmp_path: Path) -> None:
    """fleet.md: two copies of the same shard are refused (64). A ledger of no shard copied
    (a backup beside the original) was merged, every deletion reported twice."""
    ledger = tmp_path / "ledger.db"
    fill(ledger).close()
    copy = tmp_path / "copy.db"
    copy.write_bytes(ledger.read_bytes())
    both = report(str(ledger), str(copy))
    assert both.returncode == 64, both.stdout
    assert "copies of one ledger" in both.stderr and "counted twice" in both.stderr
    other = tmp_path / "other.db"  # another clean-up of the same project still merges
    with Ledger.open(other, project_id="proj-1", endpoint="http://127.0.0.1:1", run_id="c") as c:
        c.admit([Candidate("job-other", 1)])
        c.record([Result("job-other", Outcome.DELETED, 1, "b-3", 200, request_id="req-3")])
    merged = report(str(ledger), str(other), "--format", "jsonl")
    assert merged.returncode == 0, merged.stderr
    assert {orjson.loads(line)["job_id"] for line in merged.stdout.splitlines()} >= {
        "job-del",
        "job-other",
    }


def test_an_export_the_disk_cannot_hold_is_removed_not_left_as_if_whole(tmp_path: Path) -> None:
    """``report --output`` past a full disk (a file size limit: writes past it fail as on a
    full disk) exits 64 saying why, and leaves no file: a truncated export under its name
    read as the whole ledger, its last rows missing without a word."""
    path = tmp_path / "ledger.sqlite"
    many = [
        Result(f"job-{n:05d}", Outcome.DELETED, 1, "b-1", 200, request_id="r") for n in range(3000)
    ]
    with Ledger.open(
        path, project_id="proj-1", endpoint="http://127.0.0.1:1", run_id="run-a"
    ) as led:
        led.admit([Candidate(r.job_id, n) for n, r in enumerate(many, 1)])
        led.record(many)
    target = tmp_path / "out.jsonl"
    whole = report("--ledger", str(path), "--format", "jsonl", "--output", str(target))
    assert whole.returncode == 0, whole.stderr
    size = target.stat().st_size
    target.unlink()
    limit = size // 2  # room for the ledger's own files (its -shm is 32 KiB), not the export
    assert limit > 64 * 1024, size
    limited = (
        "import os, resource, sys; n = int(sys.argv[1]); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
        "os.execv(sys.executable, [sys.executable, '-m', 'worker', *sys.argv[2:]])"
    )
    cut = subprocess.run(
        [sys.executable, "-c", limited, str(limit), "report", "--ledger", str(path),
         "--format", "jsonl", "--output", str(target)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert cut.returncode == 64, cut.stderr
    assert "cannot write" in cut.stderr and "Traceback" not in cut.stderr
    assert not target.exists(), target.stat().st_size
