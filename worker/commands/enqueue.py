"""``devserver-reaper enqueue``: add the ids read from ``--input`` to the stream serve reads.

Reads the same formats as ``run`` (``worker.input.sources``), streamed, so memory stays flat
however long the input. Each valid id becomes one stream entry (field ``id``): one id per
entry keeps redelivery and dead-lettering exact (a poison id never drags healthy ids into
the dead-letter stream) and spreads work evenly over replicas, at the price of a larger
stream than lists would make. A line naming its ``project_id``, ``region`` or ``endpoint``
(JSON Lines keys, CSV columns: ``worker.targets``) carries them into its entry, held to the
same rules as ``run``'s lines, an endpoint among them only one the settings trust (their
own, ``allowed_endpoints``, a region's public one, loopback: ``worker.targets.untrusted``);
which projects may be sent to is ``serve``'s to decide.
Entries go out in pipelined chunks of ``CHUNK`` (one round trip each). Invalid ids are
never enqueued: each is a ``job.rejected`` event on stderr. Ids are not de-duplicated
across the input (that would need memory growing with it); a repeat is deleted once and
then answered ``absent``.

stdout is data: one JSON summary line. Exit codes: 0 all enqueued, 1 some rejected, 66 the
input cannot be read, 69 Redis unreachable, 78 bad settings (among them a ``--stream`` naming a
Redis key that is not a stream, and ``dry_run`` or ``max_deletions``: see ``refuse_run_only``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

import anyio
import orjson
import structlog

from worker import logsetup
from worker.errors import ConfigError, InputUnreadable, RedisUnavailable
from worker.exit_codes import ExitCode
from worker.redis_link import answering, redis_client
from worker.settings import Settings
from worker.stops import watching
from worker.targets import FIELDS, untrusted
from worker.types import Candidate, Rejection

if TYPE_CHECKING:
    from worker.input.sources import EntryReader
    from worker.pipeline import Chunk, Chunks

CHUNK = 500

ANSWER_S = 30.0
"""How long Redis has to answer each command (the client's ``socket_timeout``): what a
first stop, while ids are being added, says it waits at most."""


def main(args: argparse.Namespace, settings: Settings) -> int:
    from worker.terminal.output import TYPE_IDS, for_people_on, reads_the_terminal

    shown = for_people_on(sys.stderr, log_format=settings.log_format, log_level=settings.log_level)
    if reads_the_terminal(args.input):
        sys.stderr.write(TYPE_IDS + "\n")
    structlog.contextvars.bind_contextvars(
        run_id="enqueue-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    )
    code = execute(args.input, args.input_format, settings)
    if shown is not None and (note := shown.held_back_note("2> FILE keeps each as JSON")):
        sys.stderr.write(note + "\n")
    return code


def execute(path: str, fmt: str, settings: Settings, *, stdin: IO[bytes] | None = None) -> int:
    from worker.input.sources import read_entries

    log = structlog.get_logger("devserver_reaper")
    try:
        refuse_run_only(settings)
        if path == "-" and stdin is None and sys.stdin is not None:
            # Unbuffered: a stop leaves the reading thread blocked on a quiet pipe, and a
            # BufferedReader's lock held by it would abort the interpreter at exit.
            stdin = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)  # noqa: SIM115
        # Opened before the loop: a named pipe's open waits for a writer, and only here
        # does a SIGTERM end that wait (75); inside the loop signals are heard at an await.
        entries = read_entries(path, fmt, stdin=stdin)  # unreadable: 66 first
        try:
            return anyio.run(_until_stopped, entries, settings)
        finally:
            # A stop leaves the reading thread inside the entries where input is slow to
            # come (a terminal, a pipe): closing them under it raised "generator already
            # executing" (a traceback, exit 1); they are left to the exit, as the thread is.
            with contextlib.suppress(ValueError):
                entries.close()
    except (ConfigError, InputUnreadable) as exc:
        from worker.terminal.failure import say_error

        config = isinstance(exc, ConfigError)
        event = "enqueue.config_error" if config else "enqueue.input_unreadable"
        say_error(log, event, exc, command="enqueue", events=sys.stderr)
        return ExitCode.CONFIG if config else ExitCode.NO_INPUT


def refuse_run_only(settings: Settings) -> None:
    """``dry_run`` and ``max_deletions`` (from the environment or the config file: they are
    not flags of enqueue), refused (78) before Redis is touched, as serve refuses them: the
    ids go to the stream serve deletes from, which knows nothing of either, so
    ``REAPER_DRY_RUN=true enqueue`` had every id deleted and a cap kept none."""
    if settings.dry_run:
        raise ConfigError(
            "dry_run is for run: enqueue adds the ids to the stream serve deletes from, which "
            "no dry run reaches (try them with run --dry-run)"
        )
    if settings.max_deletions is not None:
        raise ConfigError(
            "max_deletions is for run: enqueue adds every id to the stream and serve deletes "
            "what it holds, so neither could keep the cap (enqueue fewer ids instead)"
        )


class _Stop:
    """A SIGTERM or Ctrl-C (``signal``, its name) and the wait it ends at once (for Redis to
    answer, for input to come); ids being added when it comes are added first, so the
    summary counts what is on the stream, unless a second one comes meanwhile: then the
    adding is cut short, its ids in doubt (Redis may have added them)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._waiting: anyio.CancelScope | None = None
        self._adding: tuple[anyio.CancelScope, int] | None = None

    def __call__(self, signal: str) -> None:
        again = self.signal is not None
        self.signal = self.signal or signal
        if self._waiting is not None:
            self._waiting.cancel()
        if self._adding is None:
            return
        scope, ids = self._adding
        if again:
            scope.cancel()
            return
        with contextlib.suppress(OSError):
            sys.stderr.write(
                f"devserver-reaper enqueue: {signal}: stopping once the {ids:,} ids being "
                f"added are (Redis answers within {ANSWER_S:g} s); {signal} again to stop "
                "now, those ids then in doubt\n"
            )
            sys.stderr.flush()

    @contextlib.contextmanager
    def adding(self, ids: int) -> Iterator[None]:
        """Adding ``ids`` to the stream: a second stop cuts it short."""
        with anyio.CancelScope() as scope:
            self._adding = (scope, ids)
            try:
                yield
            finally:
                self._adding = None

    @contextlib.contextmanager
    def ends(self) -> Iterator[None]:
        """A wait that a stop ends (at once when one came already)."""
        with anyio.CancelScope() as scope:
            self._waiting = scope
            if self.signal is not None:
                scope.cancel()
            try:
                yield
            finally:
                self._waiting = None


async def _until_stopped(entries: EntryReader, settings: Settings) -> int:
    stop = _Stop()
    async with watching(stop):
        return await enqueue_entries(entries, settings, stop)


async def enqueue(path: str, fmt: str, settings: Settings, stdin: IO[bytes] | None) -> int:
    """The ids of ``path`` onto the stream (the file opened in the loop: for tests)."""
    from worker.input.sources import read_entries

    with read_entries(path, fmt, stdin=stdin) as entries:
        return await enqueue_entries(entries, settings, _Stop())


async def enqueue_entries(entries: EntryReader, settings: Settings, stop: _Stop) -> int:
    import redis.exceptions

    from worker.outcomes.events import EventLog
    from worker.pipeline import read_in_background
    from worker.service.consumer import not_a_stream, not_permitted
    from worker.service.outage import REDIS_ERRORS, redis_where

    events = EventLog(sink=logsetup.json_sink())
    client = redis_client(settings.redis_url, timeout=ANSWER_S)
    trusted = settings.trusted_endpoints
    enqueued = rejected = 0
    sending = 0  # the ids of the chunk whose answer has not come: in doubt if Redis fails
    first: str | None = None
    last: str | None = None
    chunks: Chunks | None = None
    try:
        try:
            with stop.ends():
                await answering(client, settings.redis_url, kept="the ids stream")
        except RedisUnavailable as exc:
            return _unavailable(exc, settings)
        # A daemon thread of its own, as run's: an anyio worker thread left reading a quiet
        # pipe after a stop kept the interpreter from exiting until its writer closed it.
        chunks = read_in_background(entries, CHUNK)
        while stop.signal is None:
            chunk: Chunk | None = None
            with stop.ends(), contextlib.suppress(anyio.EndOfStream):
                chunk = await chunks.receive()
            if isinstance(chunk, BaseException):
                raise chunk  # the input failed midway (unreadable)
            if chunk is None or stop.signal is not None:
                break  # the input's end, or a stop: a chunk read meanwhile is not added
            ids: list[dict[str, str]] = []
            for entry in chunk:
                if isinstance(entry, Candidate):
                    entry = _trusted(entry, trusted)
                if isinstance(entry, Candidate):
                    ids.append(_fields(entry))
                else:
                    rejected += 1
                    events.rejected(entry)
            if not ids:
                continue
            sending = len(ids)
            added: list[Any] | None = None
            try:
                with stop.adding(sending):
                    async with client.pipeline(transaction=False) as pipe:
                        for fields in ids:
                            pipe.xadd(settings.stream, dict[Any, Any](fields))
                        added = await pipe.execute()
            except redis.exceptions.NoPermissionError as exc:
                raise not_permitted(settings.stream, exc) from None
            except redis.exceptions.ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                raise not_a_stream(settings.stream) from None
            if added is None:  # a second stop cut it short: the chunk is in doubt
                break
            enqueued += len(added)
            sending = 0
            first = first or _text(added[0])
            last = _text(added[-1])
    except REDIS_ERRORS as exc:  # away, or full (OOM): try again later
        where = redis_where(settings.redis_url)
        gone = RedisUnavailable(
            f"Redis at {where} stopped answering ({type(exc).__name__}) after {enqueued:,} ids "
            f"were enqueued{_doubt(sending)}"
        )
        code = _unavailable(gone, settings, enqueued=enqueued, in_doubt=sending)
        _summary(settings.stream, enqueued, rejected, first, last, in_doubt=sending)
        return code
    finally:
        if chunks is not None:  # the reading thread, if still at work, stops at its next send
            chunks.close()
        await client.aclose()
    _summary(settings.stream, enqueued, rejected, first, last, in_doubt=sending)
    if stop.signal is not None:
        entries_said = f" (entries {first} to {last})" if first else ""
        with contextlib.suppress(OSError):
            sys.stderr.write(
                f"devserver-reaper enqueue: stopped by {stop.signal}: {enqueued:,} ids are on "
                f"the stream {settings.stream}{entries_said}{_doubt(sending)}; the rest of "
                "the input was not added\n"
            )
        return ExitCode.INTERRUPTED
    return ExitCode.SOME_FAILED if rejected else ExitCode.OK


def _unavailable(exc: RedisUnavailable, settings: Settings, **fields: Any) -> int:
    """Redis did not answer (69): said once, a line and its fix for a person at a terminal,
    else the event (``enqueue.redis_unavailable``, naming the Redis without its password)."""
    from worker.service.outage import redis_where
    from worker.terminal.failure import say_error

    log = structlog.get_logger("devserver_reaper")
    where = redis_where(settings.redis_url)
    say_error(log, "enqueue.redis_unavailable", exc, command="enqueue", events=sys.stderr,
              redis=where, **fields)  # fmt: skip
    return ExitCode.UNAVAILABLE


def _trusted(candidate: Candidate, trusted: frozenset[str]) -> Candidate | Rejection:
    """``candidate``, or its rejection when its line names an endpoint the settings do not
    trust (``worker.targets.untrusted``): serve would refuse the entry, and it is kept off
    the stream rather than dead-lettered there."""
    endpoint = candidate.address.endpoint if candidate.address is not None else None
    if endpoint is None or (problem := untrusted(endpoint, trusted)) is None:
        return candidate
    return Rejection(candidate.job_id, candidate.line, problem)


def _fields(candidate: Candidate) -> dict[str, str]:
    """The stream entry of one id: ``id``, and the place its line named, if any."""
    fields = {"id": candidate.job_id}
    named = candidate.address
    if named is not None:
        for name in FIELDS:
            value = getattr(named, name)
            if value is not None:
                fields[name] = value
    return fields


def _doubt(sending: int) -> str:
    """What the message says of the ids sent whose answer never came: Redis may have added
    some or all of them (a connection lost after they reached it added all 500 while the
    summary said none), so they are neither counted enqueued nor said to be left out."""
    if not sending:
        return ""
    return (f"; the {sending:,} ids being added then may be on the stream too (in doubt: "
            "enqueueing them again repeats those that are, answered absent)")  # fmt: skip


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _summary(
    stream: str,
    enqueued: int,
    rejected: int,
    first: str | None,
    last: str | None,
    *,
    in_doubt: int = 0,
) -> None:
    line: dict[str, Any] = {
        "stream": stream,
        "enqueued": enqueued,
        "rejected": rejected,
        "first_entry": first,
        "last_entry": last,
    }
    if in_doubt:  # Redis failed before answering for these: some or all may be on the stream
        line["in_doubt"] = in_doubt
    try:
        sys.stdout.buffer.write(orjson.dumps(line) + b"\n")
        sys.stdout.flush()
    except OSError as exc:  # a full disk, a reader gone (| head -0): the ids are on the stream
        with contextlib.suppress(OSError):  # nothing more for stdout, at exit either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        reason = exc.strerror or type(exc).__name__
        entries = f" (entries {first} to {last})" if first else ""
        with contextlib.suppress(OSError):
            sys.stderr.write(
                f"devserver-reaper enqueue: {enqueued:,} ids are on the stream {stream}{entries},"
                f" {rejected:,} rejected, but this summary could not be written to stdout: "
                f"{reason.lower()}\n"
            )
            sys.stderr.flush()
