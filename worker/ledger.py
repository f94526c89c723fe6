"""The durable ledger: which ids a run has read, sent and settled, in one SQLite file.

Why it exists: de-duplication must not hold every id in memory (a run may read tens of
millions), and a run that dies must be resumable without deleting anything twice or losing
an id. So every id the pipeline reads goes through :meth:`Ledger.admit` and every terminal
outcome through :meth:`Ledger.record`; memory stays at one chunk, whatever the scale. A run
without ``--ledger`` de-duplicates through a :class:`TemporaryLedger` instead: the ids seen,
in a set while there are few and in a file removed at the end past that, and nothing else.

Durability: WAL journal with ``synchronous=NORMAL``. A committed transaction survives a
crash of the process (``kill -9``, OOM kill): it is in the WAL file, which SQLite replays on
the next open. Only an OS crash or a power loss may lose the last few transactions, and that
is harmless here: their ids are read again from the input and simply redone, because a
DELETE of an id that is already gone is idempotent (it ends ``absent``). Full ``fsync`` on
every commit would cost far more than it protects.

Threading: every call is synchronous. The pipeline runs them in one worker thread at a time
(``anyio.to_thread`` with a ``CapacityLimiter(1)``), so the connection is opened with
``check_same_thread=False`` and a guard lock makes any accidental concurrent use wait
instead of corrupting the connection's state. Each write method is one transaction.

Schema choice (measured, see tests/benchmarks/bench_ledger.py): ``ids`` is a rowid table
with a unique index on ``job_id``, not a ``WITHOUT ROWID`` table keyed by ``job_id``. Job
ids are random (UUIDs), so with the id as the key every write touches a random page and
``mark_sent``/``record`` rewrite one page per id; with rowid order the rows of one chunk sit
together, and only ``admit`` pays a random page (in the index). Measured on 1M random
UUIDs: the file is about 40% larger (166 vs 116 MB) and mark_sent/record about 3x faster.
Random ids still cost ``admit`` one WAL page write per new id once the index outgrows a chunk;
sequential ids cost almost nothing (see the benchmark for both).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import orjson

from worker.errors import (
    ConfigError,
    InputUnreadable,
    LedgerUnwritable,
    OutcomeConflict,
    ReaperError,
    file_problem,
)
from worker.private_files import check_existing, claim_private, open_private_fd
from worker.scratch import Scratch
from worker.targets import Target
from worker.types import ANSWER_LOST, Candidate, Outcome, Rejection, Result

SCHEMA_VERSION = "1"
NAMED_SCHEMA = "2"
"""The schema_version of a ledger once a line named its target (``ids.target``): code from
before many projects checks schema_version and refuses it, where it would read every id as
its default project's and send another project's open ids there."""
RAW_LIMIT = 200  # characters of a rejected line kept (escaped); a 1 MB garbage line stays small
_FETCH = 1000  # rows per fetch when streaming exports

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
    run_no INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    started_at REAL NOT NULL,
    ended_at REAL,
    pid INTEGER,
    retry_failed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ids (
    seq INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('read', 'sent', 'done')),
    outcome TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    batch_id TEXT,
    http_status INTEGER,
    error_code TEXT,
    error_msg TEXT,
    request_id TEXT,
    reason TEXT,
    confirmed INTEGER,
    target INTEGER,
    first_run INTEGER NOT NULL,
    last_run INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS targets (
    target INTEGER PRIMARY KEY,
    project_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    region TEXT NOT NULL,
    UNIQUE (project_id, endpoint, region)
);
CREATE TABLE IF NOT EXISTS rejected (
    line INTEGER NOT NULL,
    raw TEXT NOT NULL,
    reason TEXT NOT NULL,
    run INTEGER NOT NULL,
    job_id TEXT,
    PRIMARY KEY (line, raw)
) WITHOUT ROWID;
"""

# A chunk of ids travels as one JSON array parameter: one statement per chunk, not per id.
_LOOKUP = """
SELECT job_id, state, outcome, last_run, attempts, target, reason FROM ids
WHERE job_id IN (SELECT value FROM json_each(?))
"""
_INSERT = """
INSERT INTO ids (job_id, state, first_run, last_run, updated_at, target)
SELECT value, 'read', ?, ?, ?, ? FROM json_each(?)
"""
# An id an earlier run sent and never settled stays 'sent' (so does one a later run then only
# skipped: a dry run, a protection rule, which keeps an attempt for it; and one that failed
# unread after an unanswered DELETE, 'answer_lost', tried again with --retry-failed): if this
# run dies before sending it again, the next one must still know that the job may be gone by
# our hand.
_REOPEN = """
UPDATE ids SET state = iif(state = 'sent' OR (outcome = 'skipped' AND attempts > 0)
    OR (outcome = 'failed' AND reason = 'answer_lost'), 'sent', 'read'),
    outcome = NULL, attempts = 0,
    batch_id = NULL, http_status = NULL, error_code = NULL, error_msg = NULL, request_id = NULL,
    reason = NULL, confirmed = NULL, last_run = ?, updated_at = ?
WHERE job_id IN (SELECT value FROM json_each(?))
"""
_TOUCH = "UPDATE ids SET last_run = ? WHERE job_id IN (SELECT value FROM json_each(?))"
_SENT = """
UPDATE ids SET state = 'sent', batch_id = ?, attempts = ?, updated_at = ?
WHERE state != 'done' AND job_id IN (SELECT value FROM json_each(?))
"""
_UNSENT = """
UPDATE ids SET state = 'read', updated_at = ?
WHERE state = 'sent' AND job_id IN (SELECT value FROM json_each(?))
"""
_RESULTS = """
SELECT job_id, outcome, attempts, batch_id, http_status, error_code, error_msg, request_id,
    reason, {confirmed}, {target}
FROM ids WHERE state = 'done' AND (?1 IS NULL OR last_run = ?1) ORDER BY seq
"""
_SENT_BEFORE = """
SELECT count(*) FROM ids
WHERE state = 'sent' OR outcome = 'deleted'
   OR (state = 'done' AND attempts > 0
       AND NOT (?1 AND outcome = 'failed' AND reason IS NOT 'answer_lost'))
"""
_SIZE_KEY = "batch_size "  # meta: + [project_id, endpoint] -> [refused, taken] (batchsize)
_SIZES = "SELECT key, value FROM meta WHERE key LIKE 'batch_size %'"
_KEEP_SIZE = """
INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value
"""
_DONE_OF = """
SELECT count(*) FROM ids
WHERE job_id IN (SELECT value FROM json_each(?1)) AND state = 'done' AND {target} IS NULL
  AND (outcome IN ('deleted', 'absent') OR (outcome = 'failed' AND NOT ?2))
"""
_BY_TARGET = "SELECT {target}, state = 'done', outcome, count(*) FROM ids GROUP BY 1, 2, 3"
_UNCONFIRMED = """
SELECT count(*), coalesce(sum(reason IS 'not_listed'), 0) FROM ids
WHERE outcome = 'deleted' AND {} = 0
"""
# record()'s fast path: ids admitted and still open, the outcomes as one JSON array of rows
# (measured about twice as fast as the upsert below, which must try an INSERT first).
_SETTLE = """
UPDATE ids SET state = 'done', outcome = r.value ->> 1, attempts = r.value ->> 2,
    batch_id = r.value ->> 3, http_status = r.value ->> 4, error_code = r.value ->> 5,
    error_msg = r.value ->> 6, request_id = r.value ->> 7, reason = r.value ->> 8,
    confirmed = r.value ->> 9, last_run = ?1, updated_at = ?2
FROM json_each(?3) AS r
WHERE ids.job_id = r.value ->> 0
  AND (ids.state != 'done' OR (?4 AND ids.outcome = 'failed' AND ids.last_run != ?1))
"""
# The slow path: also inserts ids that were never admitted.
_RECORD = """
INSERT INTO ids (job_id, outcome, attempts, batch_id, http_status, error_code, error_msg,
    request_id, reason, confirmed, state, first_run, last_run, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'done', ?, ?, ?)
ON CONFLICT (job_id) DO UPDATE SET
    state = 'done', outcome = excluded.outcome, attempts = excluded.attempts,
    batch_id = excluded.batch_id, http_status = excluded.http_status,
    error_code = excluded.error_code, error_msg = excluded.error_msg,
    request_id = excluded.request_id, reason = excluded.reason,
    confirmed = excluded.confirmed, last_run = excluded.last_run, updated_at = excluded.updated_at
WHERE ids.state != 'done'
   OR (? AND ids.outcome = 'failed' AND ids.last_run != excluded.last_run)
"""


_UNSEEN = -1  # not a target number: SQLite numbers rows from 1


class LedgerBusy(ConfigError):
    """Another process holds the ledger: two runs on one ledger would process ids twice."""


class LedgerMismatch(ConfigError):
    """The ledger was started for another project or endpoint; its ids mean nothing here."""


@dataclass(frozen=True, slots=True)
class Admission:
    """What :meth:`Ledger.admit` decided for one chunk of candidates, in input order."""

    new: list[Candidate]
    repeated: list[Candidate]
    done: list[tuple[Candidate, Outcome]]
    resent: int
    unsure: frozenset[str] = frozenset()
    """Of ``new``: the ids an earlier run sent and never heard back about (``resent`` of
    them): their jobs may already be gone by that run's hand."""
    conflicts: list[Rejection] = field(default_factory=list)
    """Candidates whose id was read before for another project or endpoint: one id is one
    job, so the later line is rejected with the reason, never sent."""


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One run that opened the ledger. ``ended_at`` is None when it died (or still runs)."""

    run_id: str
    started_at: float
    ended_at: float | None
    pid: int | None
    retry_failed: bool


@dataclass(frozen=True, slots=True)
class RejectedLine:
    """An invalid input line, kept for the report: its line number, escaped text, reason."""

    line: int
    raw: str
    reason: str
    job_id: str | None = None
    """The line's id, when it could be read (the line was refused for its project, region
    or endpoint); None when the line holds no valid id."""


def escape(raw: str, limit: int = RAW_LIMIT) -> str:
    """Printable, bounded text of an input line: control and unpaired surrogate characters
    become backslash escapes, so a hostile line cannot forge terminal output or log lines.
    Already-escaped text passes unchanged (it is printable)."""
    head = raw[:limit]
    text = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        for ch in head
    )
    return text if len(raw) <= limit else f"{text}...(+{len(raw) - limit} chars)"


UNBOUND = "dry-run"
"""What a dry run given no endpoint or project id records for them: a placeholder that binds
the ledger to neither, so the real run that follows on it takes it over."""

WHOLE = "all"
"""The shard a ledger of a run that is not sharded is for: the whole input."""


def public_endpoint(endpoint: str) -> str:
    """The endpoint as stored and shown: no user info, query or trailing slash."""
    parts = urlsplit(endpoint.strip())
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


class _Closing:
    """A connection-holder: ``close`` releases it once, under its guard, whoever calls it
    and however often; ``with`` closes it on the way out."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """Release what is held. Idempotent."""
        with self._guard:
            if self._closed:
                return
            self._closed = True
            self._release()

    def _release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LedgerView(_Closing):
    """The read side of a ledger; :class:`Ledger` adds the writes, ``report`` uses this alone."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        super().__init__()
        self._conn = conn
        self._path = path
        self._counts: dict[str, int] | None = None
        # A ledger written before deletions could be unconfirmed has no such column: read
        # read-only, it is not added, and every deletion in it was confirmed.
        self._confirmed = "confirmed" if _has_column(conn, "confirmed") else "NULL"
        # Nor has one from before many projects a target: every id in it is the default's.
        self._target = "target" if _has_column(conn, "target") else "NULL"
        self._refused_id = "job_id" if _has_column(conn, "job_id", "rejected") else "NULL"
        self._targets: dict[int, Target] = {}
        if self._target != "NULL":
            for number, project, endpoint, region in conn.execute(
                "SELECT target, project_id, endpoint, region FROM targets"
            ):
                self._targets[number] = Target(project, endpoint, region or None)

    @property
    def path(self) -> Path:
        return self._path

    def meta(self) -> dict[str, str]:
        with self._guard:
            return dict(self._conn.execute("SELECT key, value FROM meta").fetchall())

    def counts(self) -> dict[str, int]:
        """Ids per terminal outcome, ``open`` (read or sent, no outcome), ``rejected_lines``,
        ``unconfirmed`` (of the deleted, those whose record the API never returned) and
        ``not_listed`` (of those, the ones a readable 200 left out, not a lost answer).

        A full scan: call it at the end of a run or for a report, not per chunk."""
        counts = {outcome.value: 0 for outcome in Outcome}
        counts["open"] = 0
        with self._guard:
            rows = self._conn.execute(
                "SELECT state = 'done', outcome, count(*) FROM ids GROUP BY 1, 2"
            ).fetchall()
            (rejected,) = self._conn.execute("SELECT count(*) FROM rejected").fetchone()
            unconfirmed, unlisted = self._conn.execute(
                _UNCONFIRMED.format(self._confirmed)
            ).fetchone()
        for terminal, outcome, count in rows:
            key = outcome if terminal else "open"
            counts[key] = counts.get(key, 0) + count
        counts["rejected_lines"] = rejected
        counts["unconfirmed"] = unconfirmed  # of the deleted: known only by their absence
        counts["not_listed"] = unlisted  # of those: after a 200 that left them out
        self._counts = counts
        return dict(counts)

    @property
    def targets(self) -> list[Target]:
        """The targets its lines named, in the order first met (none: one project's)."""
        return list(self._targets.values())

    def counts_by_target(self) -> dict[Target | None, dict[str, int]]:
        """:meth:`counts`' outcomes and ``open``, per target (None: the ids whose line named
        none, the ledger's default project), targets in the order first met. A full scan."""
        found: dict[Target | None, dict[str, int]] = {}
        with self._guard:
            rows = self._conn.execute(_BY_TARGET.format(target=self._target)).fetchall()
        for number, terminal, outcome, count in rows:
            target = None if number is None else self._targets[number]
            counts = found.setdefault(target, {o.value: 0 for o in Outcome} | {"open": 0})
            key = outcome if terminal else "open"
            counts[key] = counts.get(key, 0) + count
        return found

    def holds_done(self, job_ids: Iterable[str], *, retry_failed: bool = False) -> bool:
        """Whether a run on this ledger would send none of ``job_ids`` (ids of the default
        project): each is ``deleted``, ``absent``, or ``failed`` and not ``retry_failed``
        (a ``skipped`` one is decided again by the next run). Reads them in chunks and
        stops at the first chunk holding one that is not."""
        chunk: set[str] = set()
        for job_id in job_ids:
            chunk.add(job_id)
            if len(chunk) >= _FETCH:
                if not self._all_done(chunk, retry_failed):
                    return False
                chunk = set()
        return self._all_done(chunk, retry_failed)

    def _all_done(self, job_ids: set[str], retry_failed: bool) -> bool:
        if not job_ids:
            return True
        query = _DONE_OF.format(target=self._target)
        with self._guard:
            (done,) = self._conn.execute(
                query, (orjson.dumps(list(job_ids)).decode(), retry_failed)
            ).fetchone()
        return bool(done == len(job_ids))

    def open_ids(self, limit: int | None = None) -> Iterator[tuple[str, str]]:
        """``(job_id, state)`` of ids without an outcome, in the order they were first read.

        Streams; consume it before the next write on this ledger."""
        query = "SELECT job_id, state FROM ids WHERE state != 'done' ORDER BY seq LIMIT ?"
        yield from self._stream(query, (-1 if limit is None else limit,))

    def results(self, run_no: int | None = None) -> Iterator[Result]:
        """Every terminal outcome: the ids, then the rejected input lines (outcome
        ``rejected``, ``job_id`` the escaped line text, ``line`` and ``reason`` set). With
        ``run_no``, only those of the ids and lines that run read."""
        query = _RESULTS.format(confirmed=self._confirmed, target=self._target)
        for row in self._stream(query, (run_no,)):
            job_id, outcome, attempts, batch_id, status, code, msg, request_id, reason = row[:9]
            yield Result(
                job_id=job_id,
                outcome=Outcome(outcome),
                attempts=attempts,
                batch_id=batch_id,
                http_status=status,
                error_code=code,
                error_msg=msg,
                request_id=request_id,
                reason=reason,
                confirmed=row[9] != 0,  # NULL (not a deletion, or an older ledger) or 1
                target=None if row[10] is None else self._targets[row[10]],
            )
        for rejected in self.rejected(run_no=run_no):
            read = rejected.job_id is not None
            yield Result(
                job_id=rejected.job_id if rejected.job_id is not None else rejected.raw,
                outcome=Outcome.REJECTED,
                reason=rejected.reason,
                line=rejected.line,
                raw=rejected.raw if read else None,
            )

    def rejected(
        self, limit: int | None = None, *, run_no: int | None = None
    ) -> Iterator[RejectedLine]:
        """The invalid input lines kept by :meth:`Ledger.record_rejected`, by line number
        (with ``run_no``, those that run read)."""
        query = (
            f"SELECT line, raw, reason, {self._refused_id} FROM rejected "  # noqa: S608
            "WHERE (?1 IS NULL OR run = ?1) ORDER BY line, raw LIMIT ?2"
        )
        params = (run_no, -1 if limit is None else limit)
        for line, raw, reason, job_id in self._stream(query, params):
            yield RejectedLine(line=line, raw=raw, reason=reason, job_id=job_id)

    def runs(self) -> list[RunInfo]:
        """Every run that opened this ledger, oldest first."""
        with self._guard:
            rows = self._conn.execute(
                "SELECT run_id, started_at, ended_at, pid, retry_failed FROM runs ORDER BY run_no"
            ).fetchall()
        return [RunInfo(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def _stream(self, query: str, params: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
        with self._guard:
            cursor = self._conn.execute(query, params)
        try:
            while True:
                with self._guard:
                    rows = cursor.fetchmany(_FETCH)
                if not rows:
                    return
                yield from rows
        finally:
            cursor.close()

    def _release(self) -> None:
        self._conn.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self._path)!r}, counts={self._counts!r})"


def unwritable(what: str, exc: sqlite3.Error) -> LedgerUnwritable:
    """The error of a ledger write SQLite refused midway (``database or disk is full``)."""
    return LedgerUnwritable(f"{what} cannot be written: {exc}")


_SQLITE = b"SQLite format 3\x00"
"""How an SQLite database file begins; byte 18 of its header is 2 in WAL mode."""


def _header(path: Path) -> bytes:
    """The first 100 bytes of the regular file at ``path`` (b"" for an empty one);
    ``OSError`` when there is none (``IsADirectoryError`` for a directory). Opened
    non-blocking: a named pipe there is refused, not waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        kind = os.fstat(fd).st_mode
        if stat.S_ISDIR(kind):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(kind):
            raise OSError(errno.EINVAL, "is not a regular file", str(path))
        return os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def _uri(path: Path, query: str) -> str:
    return f"{path.resolve().as_uri().replace('file://', 'file:', 1)}?{query}"


def open_readonly(path: Path) -> LedgerView:
    """Open a ledger to read, without its writer lock and without the project check, so an
    operator can inspect a crashed run or one still running (WAL lets readers and the
    writer proceed side by side). ``InputUnreadable`` when it is missing or not a ledger.

    It leaves no file behind. A read-only connection to a WAL database makes ``-wal`` and
    ``-shm`` beside it and, unable to write, never removes them; so where there are none
    (no run holds the ledger, none died with transactions in its WAL) it is read through a
    read-write connection that writes nothing (``query_only``): the last connection to
    close removes both, as SQLite does for every writer, and a run that opens the ledger
    meanwhile keeps them. Where they are there, ``mode=ro`` reads them as they are."""
    try:
        header = _header(path)
    except OSError as exc:
        raise InputUnreadable(f"cannot read ledger {path}: {file_problem(exc)}") from None
    if not header.startswith(_SQLITE):
        raise InputUnreadable(f"{path} is not a devserver-reaper ledger")
    beside = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
    quiet = header[18] == 2 and not any(os.path.lexists(p) for p in beside)
    try:
        conn = sqlite3.connect(
            _uri(path, "mode=rw" if quiet else "mode=ro"), uri=True, check_same_thread=False
        )
        conn.execute("PRAGMA query_only = ON")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error as exc:
        raise InputUnreadable(f"ledger {path} cannot be read: {exc}") from None
    if not {"meta", "runs", "ids", "rejected"} <= tables:
        conn.close()
        raise InputUnreadable(f"{path} is not a devserver-reaper ledger")
    return LedgerView(conn, path)


def _refuse_other_files(path: Path) -> None:
    """``ConfigError`` when what is at ``path`` cannot be a ledger, before anything is made
    beside it (the lock, ``-wal``, ``-shm``) or SQLite turns it to WAL: a run that refuses a
    file leaves it and its directory as they were. An empty file or none is a new ledger.
    An SQLite file is read with ``immutable`` (no lock, no file made): enough to see its
    tables where no one writes, and when a run does (a ledger, then), an error or a stale
    page only leaves the decision to :func:`_prepare`, under the lock."""
    try:
        header = _header(path)
        check_existing(path)  # a link, another user's file: refused, nothing created
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"ledger {path} cannot be used: {file_problem(exc)}") from None
    if not header:
        return
    if not header.startswith(_SQLITE):
        raise ConfigError(f"{path} is not a devserver-reaper ledger; use another --ledger")
    try:
        with contextlib.closing(sqlite3.connect(_uri(path, "immutable=1"), uri=True)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error:
        return
    if tables and "meta" not in tables:
        raise ConfigError(f"{path} is not a devserver-reaper ledger; use another --ledger")


class _FileLock:
    """An exclusive ``flock`` on ``<ledger>.lock`` holding the owner's pid.

    ``flock`` dies with its process, so a lock left by a ``kill -9``'d run never blocks the
    next one. The lock file itself is never deleted: unlinking it could let two processes
    lock two different files of the same name."""

    def __init__(self, path: Path) -> None:
        fd = open_private_fd(path)  # 0600, never through a planted link
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            owner = f" (pid {holder})" if holder.isdigit() else ""
            raise LedgerBusy(
                f"ledger {path.with_suffix('')} is in use by another process{owner}; "
                "wait for it to finish or use another --ledger"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")  # a report reading during a checkpoint
    conn.execute("PRAGMA cache_size=-32768")  # 32 MiB of pages, bounded whatever the scale
    conn.execute("PRAGMA wal_autocheckpoint=8192")  # fewer checkpoints: measured 2x on admit
    conn.execute("PRAGMA journal_size_limit=67108864")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


class Ledger(LedgerView):
    """The writer: admits ids, marks them sent, records their outcomes. One per run.

    Holds an exclusive lock on the ledger for its whole life; ``close`` releases it. A run
    without ``--ledger`` uses a :class:`TemporaryLedger` instead."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        lock: _FileLock,
        run_id: str,
        run_no: int,
        retry_failed: bool,
        clock: Callable[[], float],
        default: tuple[str, str] = ("", ""),
    ) -> None:
        """``default``: the project and endpoint of the settings, where the ids whose line
        named no target go."""
        super().__init__(conn, path)
        self._default = default[0], public_endpoint(default[1])
        self._numbers = {target: number for number, target in self._targets.items()}
        self._lock = lock
        self._run_id = run_id
        self._run_no = run_no
        self._retry_failed = retry_failed
        self._clock = clock
        self._admitted = 0
        self._recorded = 0

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        project_id: str,
        endpoint: str,
        run_id: str,
        retry_failed: bool = False,
        shard: str = WHOLE,
        clock: Callable[[], float] = time.time,
        region: str | None = None,
        named: str = "ledger",
    ) -> Ledger:
        """Open (creating if needed) and lock the ledger at ``path``. ``clock`` gives the
        epoch seconds stored in rows; ``shard`` is the part of the input it is for (``I/N``);
        ``region``: the default project's, kept for the report to name it; ``named``: the
        setting as the user gave it (``--ledger``, ``REAPER_LEDGER``). A directory that
        does not exist is the setting's error (78), as any invalid setting's."""
        if not path.parent.is_dir():
            raise ConfigError(f"{named} {path}: the directory {path.parent} does not exist")
        _refuse_other_files(path)
        try:
            lock = _FileLock(path.with_name(path.name + ".lock"))
        except OSError as exc:
            raise ConfigError(f"ledger {path} cannot be locked: {exc.strerror}") from None
        try:
            for name in (path.name, path.name + "-wal", path.name + "-shm"):
                claim_private(path.with_name(name))  # SQLite would follow a link to the db
            check_existing(path.with_name(path.name + "-journal"))  # played back if "hot"
        except OSError as exc:
            lock.release()
            raise ConfigError(f"ledger {exc.filename} cannot be used: {exc.strerror}") from None
        try:
            conn = _connect(path)
            try:
                run_no = _prepare(
                    conn, path, project_id, endpoint, shard, run_id, retry_failed, clock
                )
                if region is not None:  # a label for the report, not checked: the endpoint is
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('region', ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (region,),
                    )
            except BaseException:
                conn.close()
                raise
        except sqlite3.DatabaseError as exc:
            lock.release()
            raise ConfigError(f"ledger {path} cannot be used: {exc}") from None
        except BaseException:
            lock.release()
            raise
        return cls(
            conn,
            path,
            lock=lock,
            run_id=run_id,
            run_no=run_no,
            retry_failed=retry_failed,
            clock=clock,
            default=(project_id, endpoint),
        )

    @property
    def run_id(self) -> str:
        return self._run_id

    def holds_open_ids(self) -> bool:
        """Did an earlier run leave ids open (read or sent, no outcome)? Then this run
        continues its work. A query on the ledger: ask once, before this run admits
        anything."""
        with self._guard:
            row = self._conn.execute("SELECT 1 FROM ids WHERE state != 'done' LIMIT 1").fetchone()
        return row is not None

    def batch_sizes(self) -> dict[tuple[str, str], tuple[int, int]]:
        """What earlier runs learnt of the most ids one DELETE may carry, by project and
        endpoint (``worker.batchsize.BatchSize.learnt``). A row not of that shape (edited
        by hand) is no knowledge: left out."""
        with self._guard:
            rows = self._conn.execute(_SIZES).fetchall()
        sizes: dict[tuple[str, str], tuple[int, int]] = {}
        for key, value in rows:
            try:
                project_id, endpoint = orjson.loads(key.removeprefix(_SIZE_KEY))
                refused, taken = orjson.loads(value)
            except (orjson.JSONDecodeError, TypeError, ValueError):
                continue
            # What a run learns is a refused size past the most taken (or none refused): a
            # refused size at or under it (``[1, 5]``, ``[true, 9]``) left a cap of 0 ids a
            # call, and the run spun on it, deaf to SIGTERM.
            if (
                all(type(n) is int and n >= 0 for n in (refused, taken))
                and taken > 0
                and (refused == 0 or refused > taken)
            ):
                sizes[(str(project_id), str(endpoint))] = (refused, taken)
        return sizes

    def keep_batch_size(self, target: Target, learnt: tuple[int, int]) -> None:
        """What this run learnt of the most ids one DELETE to ``target`` may carry, for the
        runs after it (:meth:`batch_sizes`)."""
        key = _SIZE_KEY + orjson.dumps([target.project_id, target.endpoint]).decode()
        with self._transaction() as conn:
            conn.execute(_KEEP_SIZE, (key, orjson.dumps(list(learnt)).decode()))

    def sent_before(self) -> int:
        """Ids earlier runs sent for deletion, which ``--max-deletions`` counts over every
        run on the ledger: those a run died with in flight (``sent``), those settled
        after a DELETE went out, and every ``deleted`` one (a job a dead run sent, found
        gone by the guard's look-up before it was sent again, settles with no attempt of
        its own), but for ``failed`` ones this run may send again
        (``retry_failed``: it counts them when it does). Ask before this run admits any."""
        with self._guard:
            (count,) = self._conn.execute(_SENT_BEFORE, (self._retry_failed,)).fetchone()
        return int(count)

    def admits_in_memory(self, n: int) -> bool:
        """Never: every admission is a transaction on the ledger file."""
        return False

    def admit(self, candidates: Sequence[Candidate]) -> Admission:
        """Decide, for one chunk, which candidates this run must process; one transaction.

        ``new``: first seen, open from an earlier run (``resent`` counts those that were
        sent when it died), skipped by an earlier run, or failed earlier and
        ``retry_failed``. ``repeated``: already admitted in this run. ``done``: deleted,
        absent or failed in an earlier run; skipped.

        ``skipped`` is final for its run only: a dry run, a ``--max-deletions`` cap, a
        protection rule or a plan that no longer matched decided nothing about the job, so
        the next run decides again under its own settings (a real run after a dry run on
        the same ledger deletes)."""
        new: list[Candidate] = []
        repeated: list[Candidate] = []
        done: list[tuple[Candidate, Outcome]] = []
        conflicts: list[Rejection] = []
        unsure: list[str] = []
        unique = list(dict.fromkeys(c.job_id for c in candidates))
        with self._transaction() as conn:
            existing = {row[0]: row[1:] for row in conn.execute(_LOOKUP, (orjson.dumps(unique),))}
            inserts: dict[int | None, list[str]] = {}
            reopen: list[str] = []
            touch: list[str] = []
            seen: dict[str, int | None] = {}  # id -> the target it was first read for
            for candidate in candidates:
                job_id = candidate.job_id
                number = self._number(conn, candidate.target)
                first = seen.get(job_id, _UNSEEN)
                if first is not _UNSEEN:
                    if self._same_place(first, number):
                        repeated.append(candidate)
                    else:
                        conflicts.append(self._conflict(candidate, first))
                    continue
                row = existing.get(job_id)
                if row is None:
                    seen[job_id] = number
                    new.append(candidate)
                    inserts.setdefault(number, []).append(job_id)
                    continue
                state, outcome, last_run, attempts, stored, reason = row
                seen[job_id] = stored
                if not self._same_place(stored, number):
                    conflicts.append(self._conflict(candidate, stored))
                elif last_run == self._run_no:
                    repeated.append(candidate)
                elif (
                    state != "done"
                    or outcome == Outcome.SKIPPED
                    or (self._retry_failed and outcome == Outcome.FAILED)
                ):
                    new.append(candidate)
                    reopen.append(job_id)
                    if _in_doubt(state, outcome, attempts, reason):
                        unsure.append(job_id)  # sent by a run that never heard back
                else:
                    done.append((candidate, Outcome(outcome)))
                    touch.append(job_id)
            run, now = self._run_no, self._clock()
            for number, ids in inserts.items():
                conn.execute(_INSERT, (run, run, now, number, orjson.dumps(ids)))
            if reopen:
                conn.execute(_REOPEN, (run, now, orjson.dumps(reopen)))
            if touch:  # so a second copy later in this run counts as repeated, not done
                conn.execute(_TOUCH, (run, orjson.dumps(touch)))
        self._admitted += len(new)
        return Admission(
            new=new,
            repeated=repeated,
            done=done,
            resent=len(unsure),
            unsure=frozenset(unsure),
            conflicts=conflicts,
        )

    def _number(self, conn: sqlite3.Connection, target: Target | None) -> int | None:
        """The ledger's number for ``target`` (None: the default), added when new."""
        if target is None:
            return None
        number = self._numbers.get(target)
        if number is None:
            key = (target.project_id, public_endpoint(target.endpoint), target.region or "")
            conn.execute(
                "INSERT INTO targets (project_id, endpoint, region) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                key,
            )
            conn.execute(_NAMED, (NAMED_SCHEMA,))
            (number,) = conn.execute(
                "SELECT target FROM targets WHERE project_id = ? AND endpoint = ? AND region = ?",
                key,
            ).fetchone()
            self._numbers[target] = number
            self._targets[number] = Target(key[0], key[1], target.region)
        return number

    def _numbered(self, number: int | None) -> Target:
        """The target numbered so (None: the default)."""
        return Target(*self._default) if number is None else self._targets[number]

    def _same_place(self, one: int | None, other: int | None) -> bool:
        """Read for the same project? A project id names one project, whichever endpoint
        (public, private, a proxy) its calls go through."""
        return one == other or self._numbered(one).project_id == self._numbered(other).project_id

    def _conflict(self, candidate: Candidate, first: int | None) -> Rejection:
        return conflict(candidate, self._numbered(first))

    def run_results(self) -> Iterator[Result]:
        """The terminal outcome of every id and invalid line this run read, whichever run
        settled it: what ``--results`` holds when the run ends."""
        return self.results(self._run_no)

    def mark_sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        """The ids are about to be sent in ``batch_id``: if the run dies now, the next run
        knows they may already be deleted (``resent``). Terminal ids are left alone."""
        with self._transaction() as conn:
            conn.execute(_SENT, (batch_id, attempt, self._clock(), orjson.dumps(list(ids))))

    def mark_unsent(self, ids: Sequence[str]) -> None:
        """A readable answer said no DELETE of this run applied the ids (a 429, or a 200
        that left them out and is taken at its word): if the run dies now, the next one
        sends them as it would any id, rather than ending those it finds gone ``deleted``
        by a DELETE that did not apply (``answer_lost``)."""
        with self._transaction() as conn:
            conn.execute(_UNSENT, (self._clock(), orjson.dumps(list(ids))))

    def record(self, results: Sequence[Result]) -> None:
        """Store terminal outcomes; one transaction.

        An id gets exactly one: a second outcome in this run, or over an earlier run's
        outcome (other than ``failed`` with ``retry_failed``), raises ``OutcomeConflict``
        after the valid ones of the call are committed."""
        if not results:
            return
        duplicates = _duplicates(r.job_id for r in results)
        if duplicates:
            raise OutcomeConflict(
                f"{len(duplicates)} ids appear twice in one record() call, e.g. "
                f"{escape(duplicates[0])}; nothing of the call was recorded"
            )
        run, now, retry = self._run_no, self._clock(), self._retry_failed
        conflicts: list[tuple[str, str]] = []
        with self._transaction() as conn:
            # Optimistic: the update refuses a second outcome by itself. Only when some id
            # was not settled (never admitted, or a caller's bug) is the call redone slowly.
            conn.execute("SAVEPOINT record")
            written = conn.execute(_SETTLE, (run, now, _outcome_rows(results), retry)).rowcount
            if written != len(results):
                conn.execute("ROLLBACK TO record")
                payload = _outcome_rows(results)
                rows = [(*row, run, run, now, retry) for row in orjson.loads(payload)]
                conflicts = self._conflicts(conn, rows)
                refused = {job_id for job_id, _ in conflicts}
                rows = [row for row in rows if row[0] not in refused]
                written = conn.executemany(_RECORD, rows).rowcount
            conn.execute("RELEASE record")
        self._recorded += written
        if conflicts:
            job_id, kept = conflicts[0]
            raise OutcomeConflict(
                f"{len(conflicts)} ids already have a terminal outcome and were not recorded "
                f"again, e.g. {escape(job_id)} (kept {kept}); the other {written} outcomes "
                "of the call were recorded"
            )

    def _conflicts(
        self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]
    ) -> list[tuple[str, str]]:
        """``(job_id, outcome kept)`` of the ids :data:`_RECORD` refuses to overwrite."""
        stored = {
            row[0]: row[1:] for row in conn.execute(_LOOKUP, (orjson.dumps([r[0] for r in rows]),))
        }
        refused = []
        for row in rows:
            state, outcome, last_run, *_ = stored.get(row[0], ("read", None, None, 0))
            replaceable = self._retry_failed and outcome == Outcome.FAILED
            if state == "done" and not (replaceable and last_run != self._run_no):
                refused.append((row[0], outcome))
        return refused

    def record_rejected(self, rejections: Sequence[Rejection]) -> None:
        """Keep invalid input lines for the report (escaped, bounded). Not ids: never sent,
        never admitted. The same line read again by a later run is kept once."""
        if not rejections:
            return
        rows = [
            (r.line, escape(r.raw), r.reason, self._run_no, None)
            if r.text is None
            else (r.line, escape(r.text), r.reason, self._run_no, r.raw)
            for r in rejections
        ]
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO rejected (line, raw, reason, run, job_id) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (line, raw) DO UPDATE SET reason = excluded.reason, "
                "run = excluded.run, job_id = excluded.job_id",
                rows,
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._guard:
            if self._closed:
                raise ReaperError(f"ledger {self._path} is closed")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    # SQLite may have rolled back already (a full disk): then this fails too
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:  # a full disk, an I/O error
                raise unwritable(f"ledger {self._path}", exc) from None

    def _release(self) -> None:
        """Note the run's end and release the lock. A ledger that cannot take the note (a
        full disk, said already) shows the run as crashed or running, which is all it can."""
        try:
            with contextlib.suppress(sqlite3.OperationalError):
                self._conn.execute(
                    "UPDATE runs SET ended_at = ? WHERE run_no = ?", (self._clock(), self._run_no)
                )
        finally:
            self._conn.close()
            self._lock.release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"Ledger(path={str(self._path)!r}, run_id={self._run_id!r}, {state}, "
            f"admitted={self._admitted}, "
            f"recorded={self._recorded}, counts={self._counts!r})"
        )


# The temporary ledger's one table and one statement: a chunk of ids in, the new ones out.
# One B-tree keyed by the id (a rowid table with a unique index would be two), and no
# look-up before the insert: measured on 300k random UUIDs, 2.8 us per id against 4.2.
_SEEN_SCHEMA = (
    "CREATE TABLE seen (job_id TEXT PRIMARY KEY, place INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID"
)
_SEE = """
INSERT INTO seen (job_id, place) SELECT value, ? FROM json_each(?) WHERE true
ON CONFLICT (job_id) DO NOTHING RETURNING job_id
"""
_SPILL = "INSERT INTO seen (job_id, place) SELECT value ->> 0, value ->> 1 FROM json_each(?)"
_PLACES = "SELECT job_id, place FROM seen WHERE job_id IN (SELECT value FROM json_each(?))"

MEMORY_IDS = 100_000
"""Ids a temporary ledger keeps in a set before it moves them to SQLite: about 12 MB of
UUIDs. Most runs are smaller and never touch the disk; a set look-up costs a tenth of a
SQLite insert (0.5 against 5.8 us per id on the benchmark machine)."""


class TemporaryLedger(_Closing):
    """The ledger of a run without ``--ledger``: the ids it has read, and nothing else.

    The first :data:`MEMORY_IDS` ids are kept in a set. De-duplication must not hold every
    id in memory, so past that the set is moved to an SQLite file in a private temporary
    directory (made when the ledger is opened, so a bad ``TMPDIR`` fails the run before it
    reads anything) and every later id goes there; the file is removed on close. Nothing
    can resume from it or report on it, so it can only :meth:`admit` ("exactly one outcome
    per id" is the journal's, see ``worker.outcomes.journal.RunJournal``), and it needs no file lock
    (the directory is the run's own) and no crash safety (a new run makes a new one)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        scratch: Scratch,
        memory_ids: int = MEMORY_IDS,
        default: Target | None = None,
    ) -> None:
        super().__init__()
        self._conn = conn
        self._scratch = scratch
        self._admitted = 0
        self._memory_ids = memory_ids
        # The ids read for the default (place 0), None once the ids are in SQLite; and those
        # read for a target their line named, with its place: a set look-up a line for most
        # ids, as a dict's is measurably slower (bench_hotpath).
        self._memory: set[str] | None = set()
        self._named: dict[str, int] = {}
        self._places = _Places(default)

    @classmethod
    def open(cls, memory_ids: int = MEMORY_IDS, default: Target | None = None) -> TemporaryLedger:
        """``default``: the settings' target, where the ids whose line named none go (an id
        read for it and again for the same project named on its line is one id)."""
        try:
            scratch = Scratch("ledger")  # removed by a later run's if this process is killed
        except OSError as exc:
            raise ConfigError(f"temporary ledger cannot be made: {exc}") from None
        directory = scratch.path
        try:
            conn = sqlite3.connect(
                directory / "seen.sqlite", isolation_level=None, check_same_thread=False
            )
            # 16 MiB of page cache: a million ids already fill it, so memory is the same at
            # any larger scale (RSS(10M) / RSS(1M) <= 1.10 is a goal of the scale benchmark).
            for pragma in ("journal_mode=MEMORY", "synchronous=OFF", "cache_size=-16384"):
                conn.execute(f"PRAGMA {pragma}")
            conn.execute(_SEEN_SCHEMA)
        except sqlite3.Error as exc:
            scratch.remove()
            raise ConfigError(f"temporary ledger in {directory} cannot be made: {exc}") from None
        return cls(conn, scratch, memory_ids, default)

    @property
    def path(self) -> Path:
        return self._scratch.path / "seen.sqlite"

    @property
    def spilled(self) -> bool:
        """Whether the ids have moved from memory to the SQLite file."""
        return self._memory is None

    def admits_in_memory(self, n: int) -> bool:
        """Whether admitting ``n`` more ids is only set look-ups: cheap enough for the event
        loop, where a thread hop would cost more than the work."""
        memory = self._memory
        return memory is not None and len(memory) + len(self._named) + n <= self._memory_ids

    def admit(self, candidates: Sequence[Candidate]) -> Admission:
        """``new``: first seen in this run; ``repeated``: seen before (a second copy within
        the chunk too). On disk, one transaction; ``LedgerUnwritable`` when the disk is full."""
        try:
            return self._admit(candidates)
        except sqlite3.OperationalError as exc:
            where = f"temporary ledger {self.path} (the ids a run without --ledger has seen)"
            raise unwritable(where, exc) from None

    def _admit(self, candidates: Sequence[Candidate]) -> Admission:
        with self._guard:
            if self._closed:
                raise ReaperError("the temporary ledger is closed")
            if not self.admits_in_memory(len(candidates)):
                self._spill()
            new: list[Candidate] = []
            repeated: list[Candidate] = []
            conflicts: list[Rejection] = []
            places = self._places
            memory = self._memory
            if memory is None and not places.many and all(c.target is None for c in candidates):
                unique = list(dict.fromkeys(c.job_id for c in candidates))
                # One statement, so one transaction of its own (autocommit mode).
                fresh = {row[0] for row in self._conn.execute(_SEE, (0, orjson.dumps(unique)))}
                for candidate in candidates:
                    if candidate.job_id in fresh:
                        fresh.discard(candidate.job_id)  # a second copy in the chunk is repeated
                        new.append(candidate)
                    else:
                        repeated.append(candidate)
            elif memory is None:  # many places: where each id was read first decides
                unique = list(dict.fromkeys(c.job_id for c in candidates))
                seen = dict(self._conn.execute(_PLACES, (orjson.dumps(unique),)).fetchall())
                added: dict[int, list[str]] = {}
                for candidate in candidates:
                    place = places.number(candidate.target)
                    first = seen.get(candidate.job_id)
                    if first is None:
                        seen[candidate.job_id] = place
                        added.setdefault(place, []).append(candidate.job_id)
                        new.append(candidate)
                    elif places.same(first, place):
                        repeated.append(candidate)
                    else:
                        conflicts.append(places.conflict(candidate, first))
                for place, ids in added.items():
                    self._conn.execute(_SEE, (place, orjson.dumps(ids)))
            else:
                named = self._named
                for candidate in candidates:
                    job_id, target = candidate.job_id, candidate.target
                    if target is None and not named:  # no line named a target: the set alone
                        if job_id in memory:
                            repeated.append(candidate)
                        else:
                            memory.add(job_id)
                            new.append(candidate)
                        continue
                    place = places.number(target)
                    earlier = 0 if job_id in memory else named.get(job_id)
                    if earlier is None:
                        if place:
                            named[job_id] = place
                        else:
                            memory.add(job_id)
                        new.append(candidate)
                    elif places.same(earlier, place):
                        repeated.append(candidate)
                    else:
                        conflicts.append(places.conflict(candidate, earlier))
            self._admitted += len(new)
        return Admission(new=new, repeated=repeated, done=[], resent=0, conflicts=conflicts)

    def _spill(self) -> None:
        """Move the ids kept in memory to the SQLite file, in one statement."""
        if self._memory is None:
            return
        kept = [*((job_id, 0) for job_id in self._memory), *self._named.items()]
        if kept:
            self._conn.execute(_SPILL, (orjson.dumps(kept),))
        self._memory = None
        self._named = {}

    def _release(self) -> None:
        """Close and remove the file."""
        try:
            self._conn.close()
        finally:
            self._scratch.remove()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        where = "on disk" if self.spilled else "in memory"
        return (
            f"TemporaryLedger({str(self._scratch.path)!r}, {state}, {where}, "
            f"admitted={self._admitted})"
        )


class _Places:
    """A temporary ledger's numbers for the targets its ids were read for (0: the default)
    and the place each stands for, where its calls go: its project and endpoint."""

    def __init__(self, default: Target | None) -> None:
        self._default = default
        self._numbers: dict[Target, int] = {}
        self._targets: dict[int, Target | None] = {0: default}

    @property
    def many(self) -> bool:
        return bool(self._numbers)

    def number(self, target: Target | None) -> int:
        if target is None:
            return 0
        number = self._numbers.get(target)
        if number is None:
            number = self._numbers[target] = len(self._numbers) + 1
            self._targets[number] = target
        return number

    def same(self, one: int, other: int) -> bool:
        """Read for the same project (``Ledger._same_place``)."""
        if one == other:
            return True
        first, second = self._targets[one], self._targets[other]
        return first is not None and second is not None and first.project_id == second.project_id

    def conflict(self, candidate: Candidate, first: int) -> Rejection:
        return conflict(candidate, self._targets[first])


def conflict(candidate: Candidate, first: Target | None) -> Rejection:
    """The rejection of a line naming an id read before for another project or endpoint."""
    where = (
        "the default project" if first is None else f"project {first.project_id} at {first.where}"
    )
    return Rejection(
        candidate.job_id,
        candidate.line,
        f"id read before for {where}: one id is one job, and it is not sent to two "
        "projects (give each project's copy a run of its own)",
    )


def _prepare(
    conn: sqlite3.Connection,
    path: Path,
    project_id: str,
    endpoint: str,
    shard: str,
    run_id: str,
    retry_failed: bool,
    clock: Callable[[], float],
) -> int:
    """Create the schema, check the ledger is ours and for this project, register the run."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    if tables and "meta" not in tables:
        raise ConfigError(f"{path} is not a devserver-reaper ledger")
    wanted = {
        "schema_version": SCHEMA_VERSION,
        "project_id": project_id,
        "endpoint": public_endpoint(endpoint),
        "shard": shard,  # a ledger holds one shard's ids: another shard would misread it
    }
    conn.execute("BEGIN IMMEDIATE")
    try:
        # statement by statement: executescript() would commit the open transaction
        for statement in filter(str.strip, _SCHEMA.split(";")):
            conn.execute(statement)
        stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if stored.get("schema_version") == NAMED_SCHEMA:
            wanted["schema_version"] = NAMED_SCHEMA
        _check_meta(path, stored, wanted)
        if not _has_column(conn, "confirmed"):  # a ledger from before unconfirmed deletions
            conn.execute("ALTER TABLE ids ADD COLUMN confirmed INTEGER")
        if not _has_column(conn, "target"):  # from before many projects: all the default's
            conn.execute("ALTER TABLE ids ADD COLUMN target INTEGER")
        if not _has_column(conn, "job_id", "rejected"):  # from before a refused line's id
            conn.execute("ALTER TABLE rejected ADD COLUMN job_id TEXT")
        conn.executemany(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
            [*wanted.items(), ("created_at", repr(clock()))],
        )
        conn.executemany(  # a dry run's placeholders give way to a real run's settings
            "UPDATE meta SET value = ? WHERE key = ? AND value = ?",
            [(value, key, UNBOUND) for key, value in wanted.items() if value != UNBOUND],
        )
        conn.execute(
            "INSERT INTO runs (run_id, started_at, pid, retry_failed) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (run_id) DO NOTHING",
            (run_id, clock(), os.getpid(), int(retry_failed)),
        )
        (run_no,) = conn.execute("SELECT run_no FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return int(run_no)


_NAMED = "UPDATE meta SET value = ? WHERE key = 'schema_version'"


def _in_doubt(state: str, outcome: str | None, attempts: int, reason: str | None) -> bool:
    """Did an earlier run send the id without hearing back, the job perhaps gone by that
    call? In flight when it died (``sent``); or settled since without deciding it: only
    skipped (keeping that attempt), or ``failed`` unread after it (``answer_lost``), which
    ``--retry-failed`` tries again. As :data:`_REOPEN` keeps such an id ``sent``."""
    return (
        state == "sent"
        or (outcome == Outcome.SKIPPED and attempts > 0)
        or (outcome == Outcome.FAILED and reason == ANSWER_LOST)
    )


def _has_column(conn: sqlite3.Connection, name: str, table: str = "ids") -> bool:
    return any(row[1] == name for row in conn.execute(f"PRAGMA table_info({table})"))


def _outcome_rows(results: Sequence[Result]) -> bytes:
    """The results as one JSON array of rows, the parameter of :data:`_SETTLE`."""
    rows = [
        [
            r.job_id,
            r.outcome.value,
            r.attempts,
            r.batch_id,
            r.http_status,
            r.error_code,
            r.error_msg,
            r.request_id,
            r.reason,
            None if r.outcome is not Outcome.DELETED else int(r.confirmed),
        ]
        for r in results
    ]
    try:
        return orjson.dumps(rows)
    except orjson.JSONEncodeError:  # a lone surrogate in a server's message: keep it escaped
        return orjson.dumps([[_utf8(v) if isinstance(v, str) else v for v in row] for row in rows])


def _utf8(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_meta(path: Path, stored: dict[str, str], wanted: dict[str, str]) -> None:
    """``LedgerMismatch`` naming each setting that differs, old and new (none is secret)."""
    differs = [
        f"{key}: the ledger has {stored[key]!r}, the settings say {value!r}"
        for key, value in wanted.items()
        if key in stored and stored[key] != value and UNBOUND not in (stored[key], value)
    ]
    if differs:
        raise LedgerMismatch(
            f"ledger {path} belongs to another project, endpoint or shard "
            f"({'; '.join(differs)}); use another --ledger"
        )


def _duplicates(job_ids: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    twice: list[str] = []
    for job_id in job_ids:
        if job_id in seen:
            twice.append(job_id)
        seen.add(job_id)
    return twice
