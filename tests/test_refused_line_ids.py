"""A line whose id is valid but whose project, region or endpoint is not is rejected with
that id as its ``job_id`` (the line's text in ``raw``), in every record a script reads it
from: the ``job.rejected`` event, ``--results``, the ledger's ``report`` as JSON Lines and
CSV. Through the real command, against a simulator process."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.benchmarks.harness import simulator
from tests.test_multiregion import HOME
from tests.test_multiregion import _env as run_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]


def _reaper(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, capture_output=True, timeout=120,
        check=False,
    )  # fmt: skip


def _jsonl(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.splitlines() if line.startswith(b"{")]


def test_a_line_refused_for_its_project_keeps_its_id_as_job_id_and_its_text_as_raw(
    tmp_path: Path,
) -> None:
    """``{"id": "<valid>", "project_id": "bad project!"}`` and the like were recorded with
    the whole line as ``job_id`` (cut at 80 or 200 characters), so a script looking its ids
    up in the results or the ledger's export did not find them. A line whose id cannot be
    read keeps its text as ``job_id``, as before, with no ``raw``."""
    with simulator(tmp_path, jobs=3, project=HOME) as sim:
        env = run_env(sim.url)
        lines = [
            orjson.dumps({"id": "job-ok-1", "project_id": "bad project!"}).decode(),
            orjson.dumps({"id": "job-ok-2", "endpoint": "http://evil.example.com"}).decode(),
            "job-ok-3,bad proj",  # CSV below
            "not an id!",
        ]
        jsonl = tmp_path / "in.jsonl"
        jsonl.write_text("\n".join([lines[0], lines[1], '"not an id!"']) + "\n")
        ledger, results = tmp_path / "l.db", tmp_path / "r.jsonl"
        done = _reaper(env, "run", "-i", str(jsonl), "--yes", "--ledger", str(ledger),
                       "--results", str(results))  # fmt: skip
        assert done.returncode == 1, done.stderr.decode()
        assert sim.control("/_sim/deleted")["ids"] == []
        events = [e for e in _jsonl(done.stdout) if e.get("event") == "job.rejected"]
        want = {1: ("job-ok-1", lines[0]), 2: ("job-ok-2", lines[1]), 3: ("not an id!", None)}
        got = {e["line"]: (e["job_id"], e.get("raw")) for e in events}
        assert got == want
        got = {r["line"]: (r["job_id"], r.get("raw")) for r in _jsonl(results.read_bytes())}
        assert got == want
        report = _reaper(env, "report", "--ledger", str(ledger), "--format", "jsonl")
        assert {r["line"]: (r["job_id"], r.get("raw")) for r in _jsonl(report.stdout)} == want
        report = _reaper(env, "report", "--ledger", str(ledger), "--format", "csv")
        rows = list(csv.DictReader(io.StringIO(report.stdout.decode())))
        got = {int(r["line"]): (r["job_id"], r["raw"] or None) for r in rows}
        assert got == want

        table = tmp_path / "in.csv"
        table.write_text("id,project_id\njob-ok-3,bad proj\n")
        done = _reaper(env, "run", "-i", str(table), "--yes", "--results", str(results))
        assert done.returncode == 1, done.stderr.decode()
        (row,) = _jsonl(results.read_bytes())
        assert (row["job_id"], row["raw"], row["line"]) == ("job-ok-3", lines[2], 2)
