"""``devserver-reaper run``: one-shot deletion of the ids in ``--input``.

This is the edge: it turns settings into the pipeline's collaborators, handles the terminal
(confirmation, progress), signals and the deadline, and maps how the run ended to an exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import structlog
from anyio.abc import TaskGroup, TaskStatus
from structlog.typing import FilteringBoundLogger

from worker import logsetup, stops, wiring
from worker.assembly import RunCalls, RunRecords, build_calls, build_records, started_fields
from worker.clock import Clock, MonotonicClock
from worker.commands.planned import Selecting
from worker.discovery.applied import plan_default
from worker.discovery.guard import Guard
from worker.discovery.plan import SealedPlan, names_projects
from worker.dispatcher import Working
from worker.errors import (
    ApiError,
    ApiUnavailable,
    AuthError,
    ConfigError,
    EventsUnwritable,
    InputUnreadable,
    LedgerUnwritable,
    NoSuchApi,
    ReaperError,
    RedisUnavailable,
    ResultsUnwritable,
    TlsError,
    UsageError,
    file_problem,
)
from worker.exit_codes import ExitCode
from worker.input.shard import INDEX_VARIABLE, Shard
from worker.input.sources import read_entries
from worker.lanes import Lanes
from worker.ledger import UNBOUND, Ledger, LedgerView
from worker.logsetup import new_run_id
from worker.outcomes.events import EventLog
from worker.outcomes.journal import (
    Tally,
    check_output,
    rewrite_results,
)
from worker.pipeline import RunState
from worker.routing import Router
from worker.settings import Settings
from worker.stats import per_second
from worker.targets import Target
from worker.terminal.output import TYPE_IDS, Output, reads_the_terminal
from worker.terminal.prompt import InterruptedAtPrompt, Proposal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True, slots=True)
class RunRequest:
    """What to run, beyond the settings: the command line's own flags."""

    input: str
    input_format: str = "auto"
    results: str | None = None
    retry_failed: bool = False
    progress: str = "auto"
    plan: bool = False  # ``input`` is a plan file written by ``discover --plan``
    exclude: str | None = None  # ids not to delete after all (with a plan)
    selecting: Selecting | None = None  # discover's filters: select, seal, apply


def main(args: argparse.Namespace, settings: Settings) -> int:
    from worker.terminal import output as terminal
    from worker.terminal.failure import refused
    from worker.terminal.summary import command_line

    try:
        if args.events is not None:
            source = args.plan or args.input
            # one file for both: the results' writes would overwrite the events
            results = (
                (args.results, "the --results file"),
                *settings.files_read(args.exclude),
            )
            check_output(args.events, "--events", source, settings.ledger, also=results)
        output = terminal.for_run(
            log_format=settings.log_format,
            log_level=settings.log_level,
            # ids typed at the terminal: a display drawn there would be drawn over them
            progress="off" if reads_the_terminal(args.input) else args.progress,
            verbosity=args.verbose - args.quiet,
            events=args.events,
            silent=frozenset(
                {"run.interrupted", "run.deadline", *(event for _, event, _ in STOPPED_BEFORE)}
            ),
            command=command_line(sys.argv[1:]),
        )
    except UsageError as exc:
        return refused("run", exc)
    try:
        selecting = _selecting(args)
    except UsageError as exc:
        output.close()
        return refused("run", exc)
    request = RunRequest(
        input=selecting.describe() if selecting is not None else args.plan or args.input,
        plan=args.plan is not None or selecting is not None,
        input_format=args.input_format,
        results=args.results,
        retry_failed=args.retry_failed,
        progress=args.progress,
        exclude=args.exclude,
        selecting=selecting,
    )
    try:
        return execute(request, settings, output=output)
    finally:
        output.close()


def execute(
    request: RunRequest,
    settings: Settings,
    *,
    stdin: IO[bytes] | None = None,
    output: Output | None = None,
) -> int:
    """Check what can be checked before any call, confirm, then run the pipeline."""
    with ExitStack() as cleanup:  # a plan's private copy, whatever happens
        return _execute(request, settings, cleanup, stdin, output)


def _execute(
    request: RunRequest,
    settings: Settings,
    cleanup: ExitStack,
    stdin: IO[bytes] | None,
    output: Output | None,
) -> int:
    output = output if output is not None else Output()
    run_id = new_run_id()
    structlog.contextvars.bind_contextvars(run_id=run_id)
    log = structlog.get_logger("devserver_reaper")
    try:
        # A plan that names its projects (discover --project) is sent there, not to the
        # settings' project, which it does not need.
        named = request.selecting is None and request.plan and names_projects(Path(request.input))
        wiring.check_ca_bundle(settings)  # a dry run fails on it as the run would
        if not settings.dry_run or request.plan:  # a plan's dry run reads the live jobs
            settings.require_api(endpoint=not named)
            if not named:
                wiring.ensure_project(settings)  # from IAM, by region, if no setting names it
        endpoint = UNBOUND if named else _endpoint_or_placeholder(settings)
        if not request.plan:
            _check_input(request.input)
        shard_of(settings)
        if request.results is not None:
            check_output(request.results, "--results", request.input, settings.ledger,
                         also=settings.files_read(request.exclude))  # fmt: skip
        excluded = frozenset[str]()
        if request.exclude is not None:
            from worker.commands.planned import read_excluded

            excluded = read_excluded(request.exclude)
        plan = _load_plan(request, settings) if request.plan else None
        if plan is not None:
            cleanup.callback(plan.close)
            if request.exclude is not None:
                from worker.commands.planned import check_excluded

                excluded = check_excluded(request.exclude, excluded, plan,
                                          selected=request.selecting is not None)  # fmt: skip
            output.name_jobs(plan.reviewed.names())
            if plan.header.named:  # the run's own project: the plan's first
                endpoint = plan_default(plan).endpoint
        if not settings.dry_run and not settings.yes:
            _confirm(request, settings, endpoint, plan, excluded)
    except (ConfigError, InputUnreadable, UsageError, ApiError, ApiUnavailable) as exc:
        return _stopped_before_any_call(log, exc, output, wiring.ca_bundle_said(settings))
    except InterruptedAtPrompt as exc:
        sys.stderr.write(f"\n{exc}\n")
        return ExitCode.INTERRUPTED
    try:
        if reads_the_terminal(request.input) and stdin is None:
            output.say(TYPE_IDS)
        if request.input == "-" and stdin is None:
            # Unbuffered: the reading thread may be left blocked on a quiet pipe after a stop,
            # and a BufferedReader's lock held by it would abort the interpreter at exit.
            stdin = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)  # noqa: SIM115
        elif stdin is None and not request.plan and _pipe(request.input):
            stdin = _open_pipe(request.input)
            cleanup.callback(stdin.close)
        run = partial(run_async, plan=plan, excluded=excluded, output=output)
        return anyio.run(run, request, settings, run_id, endpoint, stdin)
    except (ConfigError, InputUnreadable, UsageError, ApiError, RedisUnavailable) as exc:
        return _stopped_before_any_call(log, exc, output, wiring.ca_bundle_said(settings))


STOPPED_BEFORE = (
    (NoSuchApi, "run.config_error", ExitCode.CONFIG),  # selecting: the API is not there
    (ApiUnavailable, "run.unavailable", ExitCode.UNAVAILABLE),  # selecting: the API gave out
    (ConfigError, "run.config_error", ExitCode.CONFIG),
    (InputUnreadable, "run.input_unreadable", ExitCode.NO_INPUT),
    (UsageError, "run.usage_error", ExitCode.USAGE),  # --results that could not be opened
    (AuthError, "run.credentials_error", ExitCode.NO_PERMISSION),  # credentials refused
    (ApiError, "run.credentials_error", ExitCode.UNAVAILABLE),  # or their service unreachable
    (RedisUnavailable, "run.redis_unavailable", ExitCode.UNAVAILABLE),  # the shared rate limit's
)
"""Errors that end a run before any call: the event that says so, and the exit code."""


def _stopped_before_any_call(
    log: FilteringBoundLogger, exc: ReaperError, output: Output, ca_bundle: str | None = None
) -> int:
    """Said once: the event for the events' readers, one line (and the fix) on stderr. On
    a terminal the event is not shown (``silent``), only kept in ``--events``."""
    from worker.terminal.failure import say_error

    event, code = next((e, c) for kind, e, c in STOPPED_BEFORE if isinstance(exc, kind))
    events = None if output.lines is not None else sys.stdout
    say_error(log, event, exc, command="run", events=events, ca_bundle=ca_bundle)
    return code


def shard_of(settings: Settings) -> Shard | None:
    """The shard this run takes, if sharded; ``ConfigError`` (78) for a bad ``--shard``, or
    for a pod of an Indexed Job given none: every pod would then take every id."""
    if settings.shard is not None:
        return Shard.parse(settings.shard)
    if (index := os.environ.get(INDEX_VARIABLE)) is not None:
        raise ConfigError(
            f"{INDEX_VARIABLE}={index[:8]!r}: this looks like a pod of an Indexed Job, where "
            "every pod would take every id of the input; give --shard auto/COUNT"
        )
    return None


def _endpoint_or_placeholder(settings: Settings) -> str:
    try:
        return settings.api_endpoint
    except ConfigError:
        if settings.dry_run:
            return UNBOUND
        raise


def _check_input(path: str) -> None:
    """Fail before any prompt or call when the input cannot be opened (66): the source's own
    checks (a missing file, stdin closed at start), applied early; opening reads nothing."""
    if not _pipe(path):
        read_entries(path).close()


def _pipe(path: str) -> bool:
    """Whether ``path`` names a pipe (``<(cmd)``, ``/dev/stdin`` on a pipe, a FIFO): what one
    open of it reads, the next does not see, so only the run itself reads it (an early
    open of a FIFO took its writer's ids with it, and the run then waited for ever)."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _open_pipe(path: str) -> IO[bytes]:
    """A named pipe's open waits for a writer: done here, before the event loop, where
    SIGTERM and Ctrl-C end the wait (75); opened by the run inside the loop, the wait could
    not be interrupted (a run given a FIFO nobody writes to was stopped by kill -9 alone).
    Unbuffered, as stdin: the reading thread may be left blocked on it after a stop."""
    try:
        return open(path, "rb", buffering=0)
    except SystemExit:  # the signal, raised by the handler in place before the loop
        logsetup.tell(f"devserver-reaper run: interrupted while --input {path} waited for a "
                      "writer: nothing was read or sent")  # fmt: skip
        raise
    except OSError as exc:
        raise InputUnreadable(f"cannot read input {path}: {file_problem(exc)}") from None


def _selecting(args: argparse.Namespace) -> Selecting | None:
    """discover's filters given to run, or ``None``; ``UsageError`` (64) when they are mixed
    with another source, or when no source is given at all."""
    from datetime import UTC, datetime

    from worker.commands.discover import filters_from_args, page_size_of
    from worker.discovery.filters import filters_given

    if not filters_given(vars(args)):
        if args.input is None and args.plan is None:
            raise UsageError("say what to delete: --input FILE, --plan PLAN, or discover's "
                             "filters (--status, --older-than ...)")  # fmt: skip
        if args.exclude is not None and args.plan is None:
            raise UsageError("--exclude goes with --plan or discover's filters")
        return None
    if args.input is not None or args.plan is not None:
        raise UsageError("discover's filters select the jobs themselves: give them, or "
                         "--input, or --plan, not both")  # fmt: skip
    filters = filters_from_args(args, datetime.now(UTC))
    return Selecting(filters, everything=bool(args.all), page_size=page_size_of(args))


def _load_plan(request: RunRequest, settings: Settings) -> SealedPlan:
    """Read and verify a plan before anything is sent (``PlanRefused``, 64, when it is
    altered, expired, for another project or endpoint, or over ``max_fraction``), or select
    and seal one with discover's filters."""
    from worker.commands.planned import open_file_plan, select_and_seal

    if request.selecting is None:
        return open_file_plan(request.input, settings)
    protection = wiring.protection(settings)
    return select_and_seal(request.selecting, settings, protection)


def _confirm(
    request: RunRequest,
    settings: Settings,
    endpoint: str,
    plan: SealedPlan | None = None,
    excluded: frozenset[str] = frozenset(),
) -> None:
    """On a terminal, ask; anywhere else, insist on --yes (exit 64 before any call). Not
    for a plan that has expired (run only to read what a run before sent unanswered):
    nothing will be sent on it, which a prompt to delete would deny."""
    from datetime import UTC, datetime

    from worker.types import iso

    if plan is not None and datetime.now(UTC) >= plan.header.expires_at:
        sys.stderr.write(f"nothing to ask: the plan expired at {iso(plan.header.expires_at)}, "
                         "so no DELETE goes out on it\n")  # fmt: skip
        return
    interactive = (
        request.input != "-"
        and sys.stdin is not None  # None: closed at start (<&-)
        and sys.stdin.isatty()
        and sys.stderr.isatty()
    )
    if reads_the_terminal(request.input):  # the ids are typed there: no answer can be read
        raise UsageError(
            "refusing to delete without confirmation: --input - reads the ids from the "
            "terminal, so the prompt cannot ask there; pass --yes, or try --dry-run first"
        )
    if not interactive:
        raise UsageError(
            "refusing to delete without confirmation: not on a terminal, so pass --yes "
            "(or set REAPER_YES=true), or try --dry-run first"
        )
    from worker.terminal.prompt import confirm

    with _ledger_view(settings) as view:  # read once for both, closed before the prompt
        counts = view.counts() if view is not None else None
        proposal = _proposal(request, settings, endpoint, plan, counts)
        done = bool(proposal.already_done) and _done_already(
            request, settings, plan, excluded, view, counts
        )
    if done:
        # Nothing would be sent: the run goes on as with --yes, to its summary.
        sys.stderr.write(
            f"nothing to ask: the ledger {settings.ledger} holds every id of "
            f"{request.input} done already, so none will be sent\n"
        )
        return
    confirm(proposal, project_over=settings.confirm_project_over)


@contextlib.contextmanager
def _ledger_view(settings: Settings) -> Generator[LedgerView | None]:
    """The ledger opened to read for the prompt, once (``None``: no ledger, or none that
    can be read: the run itself says why)."""
    from worker.ledger import open_readonly

    if settings.ledger is None or not settings.ledger.is_file():
        yield None
        return
    try:
        view = open_readonly(settings.ledger)
    except InputUnreadable:
        yield None
        return
    with view:
        yield view


def _done_already(
    request: RunRequest,
    settings: Settings,
    plan: SealedPlan | None,
    excluded: frozenset[str],
    view: LedgerView | None,
    counts: Mapping[str, int] | None,
) -> bool:
    """Whether the ledger (``view``, its ``counts``) holds every id of the input (or plan,
    less ``excluded``) done already, when that can be known before the run: a file or a
    plan of the settings' project, no shard, and a ledger with no open, skipped or (with
    --retry-failed) failed id (else a run ended early, or has work to do: asked as ever).
    Reads the input once more, as far as its first id not done."""
    if view is None or counts is None or settings.shard is not None:
        return False
    if plan is not None and plan.header.named:
        return False
    if plan is None and not os.path.isfile(request.input):
        return False  # a pipe read again gives other ids than the run will read, or none
    if counts["open"] + counts["skipped"] + counts["failed"] * request.retry_failed:
        return False
    with contextlib.suppress(InputUnreadable):
        found = (
            (i for i in plan.ids() if i not in excluded)
            if plan is not None
            else _plain_ids(request)
        )
        with contextlib.closing(found):
            first = next(found, None)
            return first is not None and view.holds_done(
                itertools.chain([first], found), retry_failed=request.retry_failed
            )
    return False


def _plain_ids(request: RunRequest) -> Generator[str]:
    """The valid ids of the input file in order, "" (never a ledger's) for one whose line
    names a project (its row is kept under that project); invalid lines, never sent, left
    out."""
    from worker.types import Candidate

    with read_entries(request.input, request.input_format) as entries:
        for entry in entries:
            if isinstance(entry, Candidate):
                yield entry.job_id if entry.address is None else ""


def _counted(plan: SealedPlan | None, key: str) -> tuple[tuple[str, int], ...]:
    """A plan's jobs counted by type or status, as its review recorded them, most first."""
    if plan is None:
        return ()
    counts = plan.header.review.get(key) or {}
    return tuple(sorted(((str(k), int(v)) for k, v in counts.items()), key=lambda kv: -kv[1]))


def _others_named(request: RunRequest, settings: Settings) -> str:
    """What the prompt adds to the settings' project when the input's lines may name others
    (JSON Lines, CSV and JSON can; a file of bare ids cannot): the prompt is shown before
    the input is parsed, so it says which projects a line could send ids to."""
    from worker.input.sources import detect_format

    if request.input != "-" and detect_format(request.input, request.input_format) == "text":
        return ""
    default = wiring.project_id(settings)
    others = [p for p in settings.allowed_projects if p != default]
    if not settings.allowed_projects:
        return ", and any project a line names"
    return f", and {', '.join(others)} where a line names it" if others else ""


def _proposal(
    request: RunRequest,
    settings: Settings,
    endpoint: str,
    plan: SealedPlan | None,
    counts: Mapping[str, int] | None,
) -> Proposal:
    """What the prompt shows: everything known before any call (``counts``: the ledger's,
    when there is one to read)."""
    from worker.terminal.progress import count_lines
    from worker.terminal.prompt import Proposal

    protection = wiring.protection(settings)
    rules = [f"{len(protection.ids):,} id{'s' if len(protection.ids) != 1 else ''}"] * bool(
        protection.ids
    )
    rules += [f"name {name}" for name in protection.names]
    rules += [f"type {kind}" for kind in sorted(protection.types)]
    rules += [f"status {status}" for status in sorted(protection.statuses)]
    done = None
    if counts is not None:
        done = counts["deleted"] + counts["absent"]
        done += 0 if request.retry_failed else counts["failed"]
    typed = None
    if plan is not None and plan.header.named:  # the projects it names, each its own jobs
        sections = plan.header.sections
        project = "; ".join(f"{s.where}: {s.jobs:,} jobs" for s in sections)
        endpoint = ", ".join(dict.fromkeys(s.endpoint for s in sections))
        typed = f"{len(sections)} project{'s' * (len(sections) != 1)}"
    elif plan is not None:  # a plan of one project holds its jobs, no line names another
        project = wiring.project_id(settings)
    else:
        project = wiring.project_id(settings) + _others_named(request, settings)
    return Proposal(
        source=request.input,
        project=project,
        typed=typed,
        endpoint=endpoint,
        count=len(plan) if plan is not None else count_lines(request.input, request.input_format),
        exact=plan is not None,
        cap=settings.max_deletions,
        ledger=settings.ledger is not None,
        by_type=_counted(plan, "by_type"),
        by_status=_counted(plan, "by_status"),
        protection=tuple(rules),
        already_done=done,
        rechecked=plan is not None or protection.needs_record,
        batch_size=settings.batch_size,
        rate=settings.rate,
    )


async def run_async(
    request: RunRequest,
    settings: Settings,
    run_id: str,
    endpoint: str,
    stdin: IO[bytes] | None = None,
    *,
    plan: SealedPlan | None = None,
    excluded: frozenset[str] = frozenset(),
    output: Output | None = None,
) -> int:
    """The run itself, inside an event loop (``demo`` calls this beside its simulator)."""
    output = output if output is not None else Output()
    structlog.contextvars.bind_contextvars(run_id=run_id)
    state = RunState()
    events = EventLog(sink=logsetup.json_sink())
    failure: ReaperError | None = None
    code: int = ExitCode.OK
    # What a stop waits for (calls on the wire, answers settling), and the places on the wire
    working = Working(places=settings.concurrency)
    say = partial(_say_stopping, output, working, settings.grace)
    async with anyio.create_task_group() as group:
        # Signals first: from here on SIGTERM/SIGINT stop the run cleanly, even during set-up.
        await group.start(_watch_signals, state, events, say)
        if settings.deadline is not None:
            group.start_soon(_deadline, state, settings.deadline, events, say)
        records = (("the ledger", settings.ledger), ("the results file", request.results))
        kept = [name for name, given in records if given]
        logsetup.when_lost(_stop_when_lost(state, kept))
        try:
            code = await _run(
                request, settings, run_id, endpoint, stdin, plan, state, events, group, output,
                working, excluded,
            )  # fmt: skip
        except ReaperError as exc:  # raised as itself, not wrapped in the group's ExceptionGroup
            failure = exc
        finally:
            logsetup.when_lost(None)
        group.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return code


def _stop_when_lost(state: RunState, kept: list[str]) -> Callable[[str, OSError], None]:
    """What a run does when its event stream is closed or full: stop as on SIGTERM (75),
    said once on stderr if stderr can still take it, with where the outcomes still go
    (``kept``: the ledger, the results file, or neither)."""
    where = (
        f"their outcomes go to {' and '.join(kept)}"
        if kept
        else "nothing else records their outcomes (give --ledger or --results)"
    )
    token, loop_thread = anyio.lowlevel.current_token(), threading.get_ident()

    def stop(error: EventsUnwritable) -> None:
        state.fatal = state.fatal or error
        state.request_stop("fatal")

    def lost(name: str, exc: OSError) -> None:
        reason = exc.strerror or type(exc).__name__
        error = EventsUnwritable(f"the events cannot be written to {name} ({reason})")
        if threading.get_ident() == loop_thread:
            stop(error)
        else:
            anyio.from_thread.run_sync(stop, error, token=token)
        if name != "stderr":
            logsetup.tell(
                f"devserver-reaper: {error}; stopping as on SIGTERM: the calls in flight "
                f"finish and {where} (exit 75)"
            )

    return lost


async def _run(
    request: RunRequest,
    settings: Settings,
    run_id: str,
    endpoint: str,
    stdin: IO[bytes] | None,
    plan: SealedPlan | None,
    state: RunState,
    events: EventLog,
    group: TaskGroup,
    output: Output,
    working: Working,
    excluded: frozenset[str] = frozenset(),
) -> int:
    clock = MonotonicClock()
    reads = not settings.dry_run or plan is not None  # a plan's dry run reads the live jobs
    if plan is not None and plan.header.named:
        project = plan_default(plan).project_id  # its ledger is bound to its first project
    else:
        project = wiring.project_id(settings) if reads else (settings.project_id or UNBOUND)
    protection = wiring.protection(settings)  # before anything is opened: a bad file is 78
    unchecked = () if reads else protection.record_rules()  # a dry run of ids reads no job
    if unchecked:
        logsetup.tell(_unchecked_note(unchecked, protection.bare_ids()))
        output.unchecked(unchecked)  # each DRY-RUN line says so too
    shard = shard_of(settings)
    tally = Tally()
    started, cpu_started = time.monotonic(), time.process_time()
    async with AsyncExitStack() as stack:
        records = build_records(
            stack, settings, source=request.input, fmt=request.input_format,
            results=request.results, retry_failed=request.retry_failed, project=project,
            endpoint=endpoint, run_id=run_id, shard=shard, plan=plan, stdin=stdin,
            events=events, tally=tally,
        )  # fmt: skip
        events.note(
            "run.started",
            input=request.input,
            **started_fields(settings, endpoint=endpoint, project=project),
            ledger=str(settings.ledger) if settings.ledger else None,
            plan=plan.header.seal if plan is not None else None,
            excluded=len(excluded) if request.exclude else None,
            protection=repr(protection) if protection.active else None,
        )
        try:
            calls = await build_calls(
                stack, settings, records, reads=reads, clock=clock, run_id=run_id,
                state=state, working=working, protection=protection, plan=plan,
                excluded=excluded, events=events, tally=tally,
            )  # fmt: skip
            if plan is not None:
                await _recount(plan, calls, settings, clock)
            total = await _watch_progress(
                calls, request, settings, plan, records, tally, clock, events, group, output
            )
            state.api_down = reads and calls.lanes.api_down
            if state.fatal is None:  # an endpoint or a project out, the others went on
                state.fatal = calls.router.failure
        finally:
            await _finish_results(records, request.results, state)
        code = exit_code(state, tally)
        duration, cpu = time.monotonic() - started, time.process_time() - cpu_started
        sharded: dict[str, object] = (
            {}
            if records.sharding is None
            else {"shard": str(records.sharding.shard), "other_shards": records.sharding.others}
        )
        if settings.max_deletions is not None:
            sharded.update(
                max_deletions=settings.max_deletions,
                max_deletions_left=records.budget.left,
                sent_by_earlier_runs=records.spent,
            )
        if calls.targets.met:  # some line named its project: the outcomes per project
            sharded["projects"] = per_project(tally, records.default, calls.router,
                                              calls.targets.met)  # fmt: skip
        guards = calls.guards
        checks = _added([guard.checks() for guard in guards]) if guards else None
        _summarise(
            events, tally, state, code, duration, cpu, settings, output, sharded, checks,
            total, plan, unchecked,
        )  # fmt: skip
        return code


def _unchecked_note(kinds: Sequence[str], bare: Sequence[str]) -> str:
    """Said once at the start of a dry run of ids given rules it cannot check: its count
    of what a run would delete takes in the jobs those rules would protect."""
    from worker.terminal.summary import rules_in_words

    lines = [
        f"devserver-reaper run: a dry run of ids reads no job, so {rules_in_words(kinds)} "
        "are not checked:",
        "  would delete counts the jobs they protect too; a run, or a plan's dry run, reads "
        "each job and checks them",
    ]
    if bare:  # a bare word protects its name too: id:WORD is the id alone, checked here
        lines.append(f"  ({bare[0]} protects that name as well as that id; id:{bare[0]} "
                     "protects the id alone, which a dry run checks)")  # fmt: skip
    return "\n".join(lines)


async def _watch_progress(
    calls: RunCalls,
    request: RunRequest,
    settings: Settings,
    plan: SealedPlan | None,
    records: RunRecords,
    tally: Tally,
    clock: MonotonicClock,
    events: EventLog,
    group: TaskGroup,
    output: Output,
) -> int | None:
    """Run the pipeline with the progress line on a terminal, else ``run.stats``; return the
    total the progress line counted to (ids of a plan, lines of a file), when one is shown."""
    total: int | None = None
    if output.display is not None and records.sharding is None:  # a shard's part is not known
        from worker.terminal.progress import count_lines

        total = len(plan) if plan is not None else count_lines(request.input, request.input_format)
    progress_scope = anyio.CancelScope()  # entered by the progress task
    display = output.display if output.progress else None
    if display is not None:
        from worker.terminal.progress import Progress

        progress = Progress(tally, total=total, clock=time.monotonic)
        group.start_soon(_in_scope, progress_scope, partial(display.show, progress))
    else:
        stats = partial(_log_stats, settings.stats_interval, tally, calls.lanes, clock, events)
        group.start_soon(_in_scope, progress_scope, stats)
    try:
        await calls.pipeline.run()
    finally:
        progress_scope.cancel()
        if display is not None:
            display.stop()
    return total


async def _finish_results(records: RunRecords, path: str | None, state: RunState) -> None:
    """The results file flushed and, with a ledger, made whole from it; a failure to write
    it is the run's (``ResultsUnwritable``, 75), said once."""
    if records.results is None or path is None:
        return
    try:
        records.results.flush()
        if isinstance(records.ledger, Ledger):
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(
                    rewrite_results, records.ledger.run_results(), Path(path)
                )
    except ResultsUnwritable as exc:
        state.fatal = state.fatal or exc


async def _recount(plan: SealedPlan, calls: RunCalls, settings: Settings, clock: Clock) -> None:
    """``max_fraction`` against the jobs each project holds now, not only the count the plan
    recorded (which a plan sealed without a key cannot vouch for): ``PlanRefused`` (64),
    naming the project when the plan names several."""
    if settings.max_fraction is None:
        return
    from worker.discovery.listing import count_listing
    from worker.discovery.plan import check_fraction

    named = plan.header.named
    for section in plan.header.sections:
        lane = calls.router.lane(section.target) if named else calls.guard
        if not isinstance(lane, Guard) or lane.reader is None:
            continue
        inventory = await count_listing(lane.reader, clock=clock)
        check_fraction(section.jobs, min(inventory, section.inventory_size),
                       settings.max_fraction, project=section.where if named else None)  # fmt: skip


async def _log_stats(
    interval: float, tally: Tally, lanes: Lanes, clock: MonotonicClock, events: EventLog
) -> None:
    """``run.stats`` every ``interval`` seconds (0: never) when no progress line is shown:
    a CronJob's log says where the run stands, not only each id (``worker.stats``)."""
    from worker.stats import StatsWindow, every

    window = StatsWindow(clock.now())

    async def report() -> None:
        fields = window.close(clock.now(), tally.counts())
        events.note("run.stats", **fields, read=tally.read, rate=round(lanes.rate, 3))

    await every(interval, clock, report)


async def _in_scope(scope: anyio.CancelScope, task: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await task()


async def _watch_signals(
    state: RunState,
    events: EventLog,
    say: Callable[[str, bool], None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    # SIGHUP too: the terminal gone (an ssh session dropped) killed the run outright, its
    # calls in flight unrecorded; unless it was started ignoring it (nohup), which stays so.
    hangup = signal.getsignal(signal.SIGHUP) != signal.SIG_IGN
    # not run_async in a test; held back: a stop's exit was dropped before the loop
    command = signal.getsignal(signal.SIGTERM) in (stops.raise_stop, stops.let_pass)
    try:
        with stops.receiving(*[signal.SIGHUP] * hangup) as received:
            task_status.started()
            count = 0

            def heard(signum: int) -> None:
                nonlocal count
                count += 1
                events.warn("run.interrupted", signal=signal.Signals(signum).name,
                            immediate=count > 1)  # fmt: skip
                say(stops.said(signum), count > 1)
                state.request_stop("signal", immediate=count > 1)

            if (lost := stops.asked()) is not None:  # its exit dropped before the loop ran
                heard(lost)
            async for signum in received:
                heard(signum)
    finally:  # the run has ended and said so; the loop and the process are closing
        if command:
            stops.outside_loop(*[signal.SIGHUP] * hangup, handler=_stopped_closing)


def _stopped_closing(signum: int, frame: object) -> None:
    """A stop after the run's summary, as the loop and the process close: 75 and a line
    (the system's handler, put back as the loop's signal watch ended, killed it: 143).
    Said once: the stops after it are held back (:func:`stops.held_back`)."""
    stops.held_back(signal.SIGHUP)
    with contextlib.suppress(OSError):  # straight to fd 2: never into a write it interrupts
        os.write(2, f"devserver-reaper run: stopped by {stops.said(signum)} as it closed, "
                    "after its summary: the outcomes it gave stand\n".encode())  # fmt: skip
    stops.raise_stop(signum, frame)


async def _deadline(
    state: RunState, seconds: float, events: EventLog, say: Callable[[str, bool], None]
) -> None:
    await anyio.sleep(seconds)
    events.warn("run.deadline", deadline_s=seconds)
    say(f"deadline of {seconds:g} s reached", False)
    state.request_stop("deadline")


def _say_stopping(output: Output, working: Working, grace: float, why: str, now: bool) -> None:
    """What a stop does, said to the person who asked for it (``run.interrupted`` is for
    programs): a first one lets the calls in flight finish, a second cancels them."""
    if now:
        output.say(f"{why} again: stopping now; the ids of calls in flight stay open", "yellow")
        return
    calls = working.count
    finishing = (
        f"finishing {calls} call{'s' if calls != 1 else ''} in flight (up to {grace:g} s)"
        if calls
        else "no call in flight"
    )
    again = " again" if why == "Ctrl-C" else ""  # a SIGTERM or the deadline was no Ctrl-C
    output.say(f"{why}: stopping; {finishing}; Ctrl-C{again} to stop now", "yellow")


PER_PROJECT = ("deleted", "absent", "failed", "skipped")


def per_project(
    tally: Tally, default: Target, router: Router, met: list[Target]
) -> list[dict[str, object]]:
    """``run.summary``'s ``projects``: the settings' project first, then each one a line
    named, with its outcomes (the settings' project's: those of the ids whose line named
    none, and of those that named it), and whether its endpoint gave out or the API did not
    know the project (``out``: its ids left open)."""
    named: dict[Target, Counter[str]] = {target: Counter() for target in met} | tally.by_target
    rest = Counter({name: tally.outcomes[name] for name in PER_PROJECT})
    for counts in named.values():
        rest.subtract({name: counts[name] for name in PER_PROJECT})
    named[default] = named.get(default, Counter()) + rest
    named = {default: named.pop(default), **named}  # the settings' project first, always
    return [
        {
            "project_id": target.project_id,
            "region": target.region,
            "endpoint": target.endpoint,
            **{name: counts[name] for name in PER_PROJECT},
            "out": target.endpoint in router.down
            or (target.project_id, target.endpoint) in router.refused,
        }
        for target, counts in named.items()
    ]


def _added(counts: list[dict[str, int]]) -> dict[str, int]:
    """Counts of the same names added up (the guards of several targets)."""
    total: dict[str, int] = {}
    for each in counts:
        for name, count in each.items():
            total[name] = total.get(name, 0) + count
    return total


def exit_code(state: RunState, tally: Tally) -> int:
    """How the run ended, as docs/reference.md gives the exit codes, most serious first."""
    fatal = state.fatal
    if isinstance(fatal, AuthError):
        return ExitCode.NO_PERMISSION
    if isinstance(fatal, NoSuchApi | ConfigError):  # ConfigError: a rate-limit key of
        return ExitCode.CONFIG  # another type in Redis, met mid-run
    if isinstance(fatal, ApiUnavailable | TlsError):
        return ExitCode.UNAVAILABLE
    if isinstance(fatal, InputUnreadable):
        return ExitCode.NO_INPUT
    if isinstance(fatal, UsageError):
        return ExitCode.USAGE
    if isinstance(fatal, ResultsUnwritable | EventsUnwritable | LedgerUnwritable):
        return ExitCode.INTERRUPTED  # stopped with work unrecorded: run again (with --ledger)
    if fatal is not None:
        return ExitCode.UNAVAILABLE
    work_left = not state.intake_done or open_ids(tally) > 0
    if state.stop_reason == "deadline" and work_left and state.api_down:
        return ExitCode.UNAVAILABLE  # no progress could be made: the API was down
    if state.stop_reason in ("signal", "deadline") and work_left:
        return ExitCode.INTERRUPTED
    counts = tally.counts()
    # Ids of this input that an earlier run on the ledger left failed count too: a run
    # resumed after an interruption must not hide them behind a 0.
    failed = counts["failed"] + tally.already_failed
    undone = tally.skip_reasons["max_deletions"] + tally.skip_reasons["plan_expired"]
    if failed or counts["rejected"] or undone:  # undone: work left on purpose, to do anew
        return ExitCode.SOME_FAILED
    if open_ids(tally) > 0:
        return ExitCode.INTERRUPTED
    return ExitCode.OK


def open_ids(tally: Tally) -> int:
    """Ids admitted in this run that have no outcome yet."""
    admitted = tally.read - tally.repeated - tally.already_done
    return max(0, admitted - tally.finished)


def _summarise(
    events: EventLog,
    tally: Tally,
    state: RunState,
    code: int,
    duration: float,
    cpu: float,
    settings: Settings,
    output: Output,
    sharded: dict[str, object],
    checks: dict[str, int] | None = None,
    total: int | None = None,
    plan: SealedPlan | None = None,
    unchecked: Sequence[str] = (),
) -> None:
    counts = tally.counts()
    fields: dict[str, object] = dict(counts)
    fields.update(
        unconfirmed=tally.unconfirmed,  # of the deleted: gone, record never returned
        open=open_ids(tally),
        repeated=tally.repeated,
        already_done=tally.already_done,
        already_failed=tally.already_failed,
        retries=tally.retries,
        duration_s=round(duration, 3),
        ids_per_s=per_second(tally.finished, duration),
        cpu_s=round(cpu, 3),  # this process, every thread, over duration_s: for sizing
        dry_run=settings.dry_run,
        stop_reason=state.stop_reason,
        exit_code=int(code),
        # "shard": "I/N", and "other_shards": the ids read and left to the others; the cap,
        # what is left of it, and what earlier runs on the ledger spent of it
        **sharded,
    )
    if tally.skip_reasons:
        fields["skipped_by_reason"] = dict(sorted(tally.skip_reasons.items()))
    if settings.dry_run:  # checked and found deletable: what the run would have sent
        fields["would_delete"] = tally.skip_reasons["dry_run"]
        # The rules it could not check (a dry run of ids reads no job): would_delete is then
        # an upper bound, the jobs those rules protect counted in it.
        fields["unchecked_rules"] = list(unchecked)
    if checks is not None:
        fields["checks"] = checks
    if state.fatal is not None:
        fields["error"] = str(state.fatal)
    events.summary(fields)
    if output.display is not None:
        from worker.terminal.summary import RunEnd

        if output.lines is not None and (note := output.lines.held_back_note()):
            output.say(note, "dim")
        read_all = state.intake_done  # the input read to its end: its size is known
        end = RunEnd(
            fields,
            total=tally.read if read_all else total,
            exact_total=plan is not None or read_all,
            read=tally.read,
            would_delete=tally.skip_reasons["dry_run"],
            command=output.command,
            ledger=settings.ledger is not None,
            error=state.fatal,
            ca_bundle=wiring.ca_bundle_said(settings),
        )
        output.display.print(end.text())
