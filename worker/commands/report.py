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
import stat
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TypeVar

import orjson

from worker.errors import InputUnreadable, UsageError
from worker.exit_codes import ExitCode
from worker.ledger import UNBOUND, WHOLE, LedgerView, escape, open_readonly
from worker.outcomes.journal import check_output
from worker.outcomes.schema import RESULT_COLUMNS, TARGET
from worker.private_files import written_whole
from worker.settings import Settings
from worker.stops import asked, checkpoint, said
from worker.targets import Target
from worker.terminal.failure import refused
from worker.types import Outcome, Result, iso

OPEN_SHOWN = 20  # open ids listed in the summary; the count is always exact
REJECTED_SHOWN = 20

_Row = TypeVar("_Row")

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet may run as a formula at a cell's start (OWASP, CSV injection)."""


def main(args: argparse.Namespace, settings: Settings) -> int:
    paths = list(dict.fromkeys([*(p for p in [settings.ledger] if p), *map(Path, args.ledgers)]))
    if not paths:
        return refused("report", UsageError(
            "give --ledger PATH (or REAPER_LEDGER), or the ledgers of a sharded run: "
            "report ledger-0.db ledger-1.db ..."
        ))  # fmt: skip
    fmt: str = getattr(args, "format", "summary")
    output: str | None = getattr(args, "output", None)
    with contextlib.ExitStack() as stack:
        try:
            ledgers = []
            for path in paths:
                if output not in (None, "-"):  # truncated below: never a ledger's own files
                    check_output(output, "--output", None, path, also=settings.files_read())
                ledgers.append(stack.enter_context(open_readonly(path)))
            _check_shards(ledgers)
        except (UsageError, InputUnreadable) as exc:
            return refused("report", exc)
        several = len({_place(ledger) for ledger in ledgers}) > 1
        targeted = several or any(ledger.targets for ledger in ledgers)
        written: list[os.stat_result] = []  # the file renamed over ``output`` once whole
        try:
            with _open_output(output, written) as out:
                if fmt == "jsonl":
                    for ledger in ledgers:
                        write_jsonl(
                            ledger, out, default=default_target(ledger) if several else None
                        )
                elif fmt == "csv":
                    for n, ledger in enumerate(ledgers):
                        write_csv(
                            ledger, out, header=n == 0, targeted=targeted,
                            default=default_target(ledger) if several else None,
                        )  # fmt: skip
                else:
                    text = summary(*ledgers)
                    checkpoint()
                    out.write(text.encode())
        except SystemExit:  # SIGTERM or Ctrl-C: a file is removed, never left as if whole
            removed = "" if output in (None, "-") else f"; {output} is not left in part"
            if output not in (None, "-") and _is(output, written):
                removed = f" after {output} was written whole: it stands"
            signum = asked()
            stop = "a signal" if signum is None else said(signum)
            with contextlib.suppress(OSError):
                sys.stderr.write(f"devserver-reaper report: stopped by {stop}{removed}\n")
            raise
        except BrokenPipeError:  # `report | head`: the reader has seen enough
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError as exc:
            left = ""  # a file is renamed into place only once whole: what was there stays
            if output not in (None, "-"):
                left = "; " + (
                    f"{output} is left as it was"
                    if os.path.lexists(output)
                    else "nothing is left under that name"
                )
            print(
                f"devserver-reaper report: cannot write {output or 'stdout'}: {exc.strerror}"
                + left,
                file=sys.stderr,
            )
            return ExitCode.USAGE
    return ExitCode.OK


def _place(ledger: LedgerView) -> tuple[str | None, str | None]:
    meta = ledger.meta()
    return meta.get("project_id"), meta.get("endpoint")


def default_target(ledger: LedgerView) -> Target | None:
    """The project a ledger's run was for (its settings'), where its ids that named none
    went; None for a dry run's ledger bound to none."""
    meta = ledger.meta()
    project, endpoint = meta.get("project_id"), meta.get("endpoint")
    if not project or not endpoint or UNBOUND in (project, endpoint):
        return None
    return Target(project, endpoint, meta.get("region"))


def _check_shards(ledgers: Sequence[LedgerView]) -> None:
    """Ledgers merged into one view: the shards of one clean-up, or the runs of several
    projects (each counted under its own). No shard of one project's clean-up twice:
    ``UsageError`` naming both files."""
    shards: dict[tuple[tuple[str | None, str | None], str], Path] = {}
    made: dict[tuple[tuple[str | None, str | None], str, str], Path] = {}
    for ledger in ledgers:
        meta = ledger.meta()
        shard = meta.get("shard", WHOLE)
        key = (_place(ledger), shard)
        if shard != WHOLE and key in shards:
            raise UsageError(f"{ledger.path} and {shards[key]} are both shard {shard}")
        shards[key] = ledger.path
        # A whole ledger may be one of several clean-ups of a project, but not a copy of
        # another: the same creation, place and shard would count its every id twice.
        copy = (*key, meta.get("created_at", ""))
        if copy in made:
            raise UsageError(
                f"{ledger.path} and {made[copy]} are copies of one ledger (created at the "
                "same instant, for the same project and shard): its ids would be counted twice"
            )
        made[copy] = ledger.path


def _is(path: str, written: list[os.stat_result]) -> bool:
    """``path`` names the file of ``written`` (renamed over it whole before a stop came)."""
    try:
        named = os.stat(path)  # our link: the file it leads to, replaced whole
    except OSError:
        return False
    return any((named.st_dev, named.st_ino) == (w.st_dev, w.st_ino) for w in written)


@contextlib.contextmanager
def _open_output(output: str | None, written: list[os.stat_result]) -> Iterator[IO[bytes]]:
    """``output``'s stream; the file it writes (one renamed over the name once whole) is
    added to ``written``, so a stop after the rename is not said to have left nothing."""
    if output is None or output == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    # Private, never through a planted link; a file appears under its name only once whole
    # (a full disk, a signal or a kill -9 leave what was there), a pipe is streamed to.
    with written_whole(Path(output)) as handle:
        info = os.fstat(handle.fileno())
        if stat.S_ISREG(info.st_mode):  # not a pipe or a device, written to as a stream
            written.append(info)
        yield handle


def write_jsonl(ledger: LedgerView, out: IO[bytes], *, default: Target | None = None) -> None:
    """One JSON line per terminal outcome, as ``run --results`` writes it; with ``default``
    (ledgers of several projects merged), the ids that named no project carry it."""
    for result in _results(ledger, default):
        out.write(orjson.dumps(result.row()) + b"\n")


def _results(ledger: LedgerView, default: Target | None) -> Iterator[Result]:
    """The ledger's results, each after a look for a stop whose exit was lost: a large
    export went on to its end after a SIGTERM."""
    for result in ledger.results():
        checkpoint()
        if default is not None and result.target is None and result.outcome is not Outcome.REJECTED:
            result.target = default
        yield result


def write_csv(
    ledger: LedgerView,
    out: IO[bytes],
    *,
    header: bool = True,
    targeted: bool = False,
    default: Target | None = None,
) -> None:
    """The rows of ``--format jsonl`` as CSV with a header, in the same columns (``line``
    empty but for rejected input); empty cells for missing values. A text cell a
    spreadsheet would run as a formula is neutralised with a leading ``'``: an id, a
    rejected line or a server's message is data, never a command. ``targeted``: the
    ``project_id`` and ``region`` columns too (a ledger of many projects)."""
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    try:
        fields = (*RESULT_COLUMNS, *TARGET) if targeted or default else RESULT_COLUMNS
        writer = csv.DictWriter(text, fieldnames=fields)
        if header:
            writer.writeheader()
        for result in _results(ledger, default):
            writer.writerow({key: csv_cell(value) for key, value in result.row().items()})
    finally:
        text.detach()  # leave `out` open: the caller owns it


def csv_cell(value: object) -> object:
    """One cell: booleans as JSON spells them, text that starts a formula quoted away."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return iso(datetime.fromtimestamp(epoch, tz=UTC)) or "-"


def summary(*ledgers: LedgerView) -> str:
    """Counts per outcome, open ids (the first few), rejected lines, and the runs: of one
    ledger, or of the ledgers of a sharded run added up."""
    meta = ledgers[0].meta()
    counts: Counter[str] = Counter()
    for ledger in ledgers:
        counts.update(ledger.counts())
    several = len({_place(ledger) for ledger in ledgers}) > 1
    lines = [f"ledger      {ledger.path}" + _shard_of(ledger) for ledger in ledgers]
    lines += [
        f"project_id  {'several: see by project' if several else meta.get('project_id', '-')}",
        f"endpoint    {'several: see by project' if several else meta.get('endpoint', '-')}",
        "",
        "outcomes",
    ]
    per_outcome = {outcome.value: counts.get(outcome.value, 0) for outcome in Outcome}
    # Rejected input is kept per line, apart from the ids (it never had a valid id).
    per_outcome[Outcome.REJECTED.value] = counts["rejected_lines"]
    lines += [f"  {outcome:<10}{count:>12}" for outcome, count in per_outcome.items()]
    total = sum(per_outcome.values())
    lines += [f"  {'total':<10}{total:>12}", ""]
    if several or any(ledger.targets for ledger in ledgers):
        lines += _by_project(ledgers)
    if counts["unconfirmed"]:
        lost, unlisted = counts["unconfirmed"] - counts["not_listed"], counts["not_listed"]
        how = []
        if lost:
            how.append(f"{lost} gone after a call whose answer was lost")
        if unlisted:
            how.append(f"{unlisted} gone after a 200 that left them out and could not be "
                       "taken at its word (not_listed)")  # fmt: skip
        lines += [
            f"of the deleted, unconfirmed: {counts['unconfirmed']} (the API never returned "
            f"their records): {'; '.join(how)}",
            "",
        ]
    lines.append(f"open (read or sent, no outcome yet): {counts['open']}")
    open_rows = _first([ledger.open_ids for ledger in ledgers], OPEN_SHOWN)
    lines += [f"  {job_id}  {state}" for job_id, state in open_rows]
    if counts["open"] > OPEN_SHOWN:
        lines.append(f"  ... and {counts['open'] - OPEN_SHOWN} more")
    lines += ["", f"rejected input lines: {counts['rejected_lines']}"]
    lines += [
        f"  line {row.line}: {escape(row.raw)}  ({row.reason})"
        for row in _first([ledger.rejected for ledger in ledgers], REJECTED_SHOWN)
    ]
    if counts["rejected_lines"] > REJECTED_SHOWN:
        lines.append(f"  ... and {counts['rejected_lines'] - REJECTED_SHOWN} more")
    runs = [run for ledger in ledgers for run in ledger.runs()]
    lines += ["", f"runs: {len(runs)}"]
    for run in runs:
        end = _when(run.ended_at) if run.ended_at is not None else "no end (crashed or running)"
        retry = "  retry-failed" if run.retry_failed else ""
        lines.append(
            f"  {run.run_id}  started {_when(run.started_at)}  ended {end}  pid {run.pid}{retry}"
        )
    return "\n".join(lines) + "\n"


def _by_project(ledgers: Sequence[LedgerView]) -> list[str]:
    """Outcomes and open ids per project and place, the ledgers added up."""
    per: dict[tuple[str, str], Counter[str]] = {}
    for ledger in ledgers:
        default = default_target(ledger)
        for target, counts in ledger.counts_by_target().items():
            place = target if target is not None else default
            key = ("-", "-") if place is None else (place.project_id, place.where)
            per.setdefault(key, Counter()).update(counts)
    shown = [o.value for o in Outcome if o is not Outcome.REJECTED] + ["open"]
    lines = ["by project (project_id, region or endpoint: " + ", ".join(shown) + ")"]
    for (project, where), counts in per.items():
        figures = " ".join(f"{name} {counts[name]}" for name in shown)
        lines.append(f"  {project}  {where}  {figures}")
    return [*lines, ""]


def _shard_of(ledger: LedgerView) -> str:
    shard = ledger.meta().get("shard", WHOLE)
    return "" if shard == WHOLE else f"  (shard {shard})"


def _first(readers: Sequence[Callable[..., Iterable[_Row]]], limit: int) -> list[_Row]:
    """The first ``limit`` rows of ``reader(limit=...)`` across the readers, in order."""
    found: list[_Row] = []
    for read in readers:
        found += list(read(limit=limit - len(found)))
        if len(found) >= limit:
            break
    return found
