"""The per-job events' fields are declared once (worker.outcomes.schema): what a real run
writes, and what docs/reference.md says, are both held to that declaration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e import reaper, reaper_env, write_ids
from worker.outcomes.events import result_event
from worker.outcomes.schema import (
    ADDED,
    DELETED_WITHOUT_RECORD,
    EVENT_FIELDS,
    JOB_EVENTS,
    RESULT_COLUMNS,
    TARGET,
)
from worker.simulator import FaultConfig, SimulatorConfig, run_simulator
from worker.targets import Target
from worker.types import JobRecord, Outcome, Result

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"


def test_the_schema_declares_each_field_once_per_event_and_a_record_less_deletion_fits_it() -> None:
    for fields in JOB_EVENTS.values():
        assert len(set(fields)) == len(fields)
    deleted = JOB_EVENTS["job.deleted"]
    assert [f for f in deleted if f in DELETED_WITHOUT_RECORD] == list(DELETED_WITHOUT_RECORD)
    assert EVENT_FIELDS.isdisjoint(ADDED)


@pytest.mark.anyio
async def test_every_per_job_event_a_run_writes_carries_the_schemas_fields_in_its_order(
    tmp_path: Path,
) -> None:
    """A run that meets every outcome: deleted (confirmed or not), absent, failed, skipped
    (protected, and by the cap) and rejected."""
    faults = FaultConfig(error_after=0.1, reset_after=0.05)  # deleted, confirmed or not
    poison = frozenset({"poison-1"})  # any DELETE naming it is refused: it ends failed
    config = SimulatorConfig(jobs=300, seed=5, faults=faults, reject_ids=poison)
    events = []
    async with run_simulator(config) as sim:
        real = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", ["poison-1", *real, "not valid!"])
        ledger, results = tmp_path / "run.ledger", tmp_path / "results.jsonl"
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--batch-size", "10", "--rate", "500",
             "--burst", "50", "--max-deletions", "250", "--protect", f"id:{real[0]}",
             "--ledger", str(ledger), "--results", str(results)],
            reaper_env(sim.url),
        )  # fmt: skip
        events += done.events()
    _check_results_lines(results.read_text().splitlines())
    report = await reaper(["report", "--ledger", str(ledger), "--format", "csv"], {})
    assert report.stdout.splitlines()[0] == ",".join(RESULT_COLUMNS)
    async with run_simulator(SimulatorConfig(jobs=0)) as sim:  # no fault: ghosts end absent
        src = write_ids(tmp_path / "ghosts.txt", ["ghost-1", "ghost-2"])
        events += (await reaper(["run", "-i", str(src), "--yes"], reaper_env(sim.url))).events()
    seen: set[str] = set()
    for event in events:
        name = event["event"]
        if name not in JOB_EVENTS:
            continue
        seen.add(name)
        own = [key for key in event if key not in (*ADDED, "run_id")]
        schema = JOB_EVENTS[name]
        assert set(own) <= set(schema), (name, own)
        assert own == [key for key in schema if key in own], (name, own)  # in its order
        if name == "job.rejected":  # raw only when the line's id could be read
            assert own == [key for key in schema if key != "raw" or "raw" in own], (name, own)
        elif name != "job.deleted":
            assert own == list(schema), (name, own)  # every field, always
    assert seen == set(JOB_EVENTS), seen


def _documented_fields(name: str) -> list[str]:
    """The fields the reference's events table gives ``name``: the backticked words of its
    row's last cell before any parenthesis."""
    row = next(
        line for line in REFERENCE.read_text(encoding="utf-8").splitlines()
        if line.startswith(f"| `{name}` |")
    )  # fmt: skip
    cell = row.rstrip(" |").rsplit(" | ", 1)[1]
    return re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", cell))


@pytest.mark.parametrize("name", sorted(JOB_EVENTS))
def test_the_reference_lists_each_per_job_events_fields_as_the_schema_does(name: str) -> None:
    assert _documented_fields(name) == list(JOB_EVENTS[name])


def _check_results_lines(lines: list[str]) -> None:
    """Every outcome's line of ``--results`` in the schema's columns, each of them (``line``
    for a rejected line only), in their order."""
    import orjson

    outcomes = set()
    for text in lines:
        row = orjson.loads(text)
        outcomes.add(row["outcome"])
        rejected = row["outcome"] == "rejected"
        shown = {"line": rejected, "raw": "raw" in row}  # raw: a rejected line's, id read
        assert list(row) == [c for c in RESULT_COLUMNS if shown.get(c, True)], row
    assert outcomes == {"deleted", "failed", "skipped", "rejected"}, outcomes


_RECORD = JobRecord(id="job-1", name="n", status="Running", create_stamp=1, update_stamp=2)
_RESULTS = [
    Result("job-1", Outcome.DELETED, 1, "b-1", 200, request_id="r-1", record=_RECORD),
    Result("job-2", Outcome.DELETED, 2, "b-1", confirmed=False),
    Result("job-3", Outcome.ABSENT, 1, "b-2"),
    Result("job-4", Outcome.FAILED, 3, "b-2", 500, "ModelArts.0001", "boom", "r-2"),
    Result("job-5", Outcome.SKIPPED, reason="protected"),
    Result("bad id", Outcome.REJECTED, reason="not an id", line=7),
    Result("job-7", Outcome.REJECTED, reason="bad project", line=8, raw='{"id":"job-7"}'),
    Result("job-6", Outcome.ABSENT, 1, "b-3", target=Target("proj-b", "http://x", "cn-east-3")),
]


@pytest.mark.parametrize("result", _RESULTS, ids=lambda r: f"{r.outcome}-{r.job_id}")
def test_a_results_row_is_the_schemas_columns_and_agrees_with_its_event(result: Result) -> None:
    """The results file and ``report`` say what the event says: every field the two share
    has the same value, and the row's own columns are the schema's, in its order."""
    row = result.row()
    shown = {"line": result.line is not None, "raw": result.raw is not None}
    expected = [c for c in RESULT_COLUMNS if shown.get(c, True)]
    expected += list(TARGET) if result.target is not None else []
    assert list(row) == expected
    name, _, fields = result_event(result)
    assert row["outcome"] == name.removeprefix("job.")
    shared = (set(row) & set(fields)) - {"job_id"}  # a rejected id is escaped in both
    assert shared and {k: row[k] for k in shared} == {k: fields[k] for k in shared}
    assert set(row) - {"outcome"} <= EVENT_FIELDS  # no column the events do not declare


def test_the_reference_lists_the_results_columns_in_the_schemas_order() -> None:
    row = next(
        line for line in REFERENCE.read_text(encoding="utf-8").splitlines()
        if line.startswith("| `--results PATH` |")
    )  # fmt: skip
    cell = re.sub(r"\([^)]*\)", "", row.split("|")[2]).split(";")[0]  # before what it says
    assert re.findall(r"`([a-z_]+)`", cell) == list(RESULT_COLUMNS)
