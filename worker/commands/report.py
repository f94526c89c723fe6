"""``devserver-reaper report``: what a ledger holds, for people (summary) or tools (jsonl, csv).

It opens the ledger read-only and without the writer's lock, so an operator can look into a
run that crashed, or one that is still running, without disturbing it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import orjson

from worker.errors import InputUnreadable, UsageError
from worker.exit_codes import ExitCode
from worker.ledger import LedgerView, escape, open_readonly
from worker.outcomes.journal import check_output
from worker.settings import Settings
from worker.types import Outcome, Result, iso

OPEN_SHOWN = 20  # open ids listed in the summary; the count is always exact
REJECTED_SHOWN = 20

RESULT_FIELDS = tuple(Result(job_id="", outcome=Outcome.DELETED).row())


def main(args: argparse.Namespace, settings: Settings) -> int:
    if settings.ledger is None:
        print("devserver-reaper report: give --ledger PATH (or REAPER_LEDGER)", file=sys.stderr)
        return ExitCode.USAGE
    fmt: str = getattr(args, "format", "summary")
    output: str | None = getattr(args, "output", None)
    try:
        if output not in (None, "-"):  # truncated below: never the ledger's own files
            check_output(output, "--output", None, settings.ledger)
        ledger = open_readonly(settings.ledger)
    except UsageError as exc:
        print(f"devserver-reaper report: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except InputUnreadable as exc:
        print(f"devserver-reaper report: {exc}", file=sys.stderr)
        return ExitCode.NO_INPUT
    with ledger:
        try:
            with _open_output(output) as out:
                if fmt == "jsonl":
                    write_jsonl(ledger, out)
                elif fmt == "csv":
                    write_csv(ledger, out)
                else:
                    out.write(summary(ledger).encode())
        except BrokenPipeError:  # `report | head`: the reader has seen enough
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError as exc:
            print(
                f"devserver-reaper report: cannot write {output or 'stdout'}: {exc.strerror}",
                file=sys.stderr,
            )
            return ExitCode.USAGE
    return ExitCode.OK


@contextlib.contextmanager
def _open_output(output: str | None) -> Iterator[IO[bytes]]:
    if output is None or output == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    with Path(output).open("wb") as handle:
        yield handle


def write_jsonl(ledger: LedgerView, out: IO[bytes]) -> None:
    """One JSON line per terminal outcome, as ``run --results`` writes it."""
    for result in ledger.results():
        out.write(orjson.dumps(result.results_row()) + b"\n")


def write_csv(ledger: LedgerView, out: IO[bytes]) -> None:
    """The same rows as CSV with a header; empty cells for missing values."""
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    try:
        writer = csv.DictWriter(text, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        for result in ledger.results():
            writer.writerow(result.row())
    finally:
        text.detach()  # leave `out` open: the caller owns it


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return iso(datetime.fromtimestamp(epoch, tz=UTC)) or "-"


def summary(ledger: LedgerView) -> str:
    """Counts per outcome, open ids (the first few), rejected lines, and the runs."""
    meta = ledger.meta()
    counts = ledger.counts()
    lines = [
        f"ledger      {ledger.path}",
        f"project_id  {meta.get('project_id', '-')}",
        f"endpoint    {meta.get('endpoint', '-')}",
        "",
        "outcomes",
    ]
    per_outcome = {outcome.value: counts.get(outcome.value, 0) for outcome in Outcome}
    # Rejected input is kept per line, apart from the ids (it never had a valid id).
    per_outcome[Outcome.REJECTED.value] = counts["rejected_lines"]
    lines += [f"  {outcome:<10}{count:>12}" for outcome, count in per_outcome.items()]
    total = sum(per_outcome.values())
    lines += [f"  {'total':<10}{total:>12}", ""]
    lines.append(f"open (read or sent, no outcome yet): {counts['open']}")
    lines += [f"  {job_id}  {state}" for job_id, state in ledger.open_ids(limit=OPEN_SHOWN)]
    if counts["open"] > OPEN_SHOWN:
        lines.append(f"  ... and {counts['open'] - OPEN_SHOWN} more")
    lines += ["", f"rejected input lines: {counts['rejected_lines']}"]
    lines += [
        f"  line {row.line}: {escape(row.raw)}  ({row.reason})"
        for row in ledger.rejected(limit=REJECTED_SHOWN)
    ]
    if counts["rejected_lines"] > REJECTED_SHOWN:
        lines.append(f"  ... and {counts['rejected_lines'] - REJECTED_SHOWN} more")
    runs = ledger.runs()
    lines += ["", f"runs: {len(runs)}"]
    for run in runs:
        end = _when(run.ended_at) if run.ended_at is not None else "no end (crashed or running)"
        retry = "  retry-failed" if run.retry_failed else ""
        lines.append(
            f"  {run.run_id}  started {_when(run.started_at)}  ended {end}  pid {run.pid}{retry}"
        )
    return "\n".join(lines) + "\n"
