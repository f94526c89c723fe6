"""Read candidate ids from a file or stdin, streamed, in every input format docs/reference.md lists.

Memory does not grow with the input: lines are read in pieces of at most ``max_line_bytes``
(a longer line is rejected and skipped to its newline without ever being held whole), a JSON
array is parsed element by element over a bounded buffer, and gzip is decompressed as it is
read. Every entry comes out, in input order, as a :class:`~worker.types.Candidate` or a
:class:`~worker.types.Rejection`: bad input is never dropped silently and never crashes the
reader. Only a problem that makes the *rest* of the input untrustworthy raises.

What ``line`` means, per format:

* text, JSON Lines: the 1-based physical line number;
* CSV: the physical line number where the record starts (the header is line 1);
* JSON array: the 1-based index of the element in the array (there are no useful lines in a
  JSON document: it may be all on one).

What raises, and why:

* :class:`~worker.errors.InputUnreadable` (exit 66): the file cannot be opened ("no such
  file", "permission denied", "is a directory"), a read fails, the name ends in ``.gz`` but
  the content is not gzip, a gzip stream is truncated or corrupt, or a JSON array is broken in
  a way the parser cannot resume after. Entries read before the problem have been yielded;
  the message names the line (or element) reached, so a run cannot mistake a cut-off input
  for a complete one.
* :class:`~worker.errors.UsageError` (exit 64): a CSV header without an ``id`` or
  ``job_id`` column. The file is readable; the user pointed the tool at the wrong file or
  format, which is a usage problem, and the message lists the columns found.
* ``UsageError`` also for an unknown explicit format; ``ValueError`` for a nonsensical
  ``max_line_bytes`` or chunk size (programming errors).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import sys
import zlib
from collections.abc import Generator, Iterator
from itertools import islice
from pathlib import PurePath
from typing import IO, TYPE_CHECKING, Literal, TypeAlias

from worker.errors import InputUnreadable, UsageError, file_problem
from worker.input.intake import NOT_UTF8, escape, line_too_long, validate
from worker.targets import FIELDS, address, misnamed_by, named_twice
from worker.types import JOB_ID_RE, Candidate, Rejection

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

Entry: TypeAlias = Candidate | Rejection
Format: TypeAlias = Literal["text", "jsonl", "csv", "json"]

FORMATS: tuple[str, ...] = ("auto", "text", "jsonl", "csv", "json")
GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")
"""The byte order marks of UTF-16 and UTF-32 (little- and big-endian): a file saved so
(Windows' "Unicode") has a NUL beside every character, each of its lines a rejection."""
_SUFFIXES: dict[str, Format] = {
    ".txt": "text",
    ".ids": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".json": "json",
}
_READ_SIZE = 64 * 1024
_RAW_PREFIX = 256  # characters of an over-long entry kept for its rejection event
_DECODE = json.JSONDecoder().raw_decode
_AFTER_VALUE = frozenset(" \t\r\n,]")
_STOPS = re.compile(r'["\[\]{},]')  # what matters to the JSON skipper outside a string
# A string's content up to its closing quote; possessive, so a long one keeps no backtracking
# state (the plain form holds ~80 bytes per character matched).
_STRING_BODY = re.compile(r'(?:[^"\\]++|\\.)*+', re.DOTALL)


def detect_format(name: str, explicit: str = "auto") -> Format:
    """The input format: ``explicit`` unless it is ``auto``, else from the file name.

    ``.txt``, ``.ids`` and no suffix are text (stdin, ``-``, is text until its first bytes
    say otherwise: see :func:`_sniffed`); ``.jsonl``/``.ndjson`` JSON
    Lines; ``.csv`` CSV; ``.json`` a JSON array; a trailing ``.gz`` is looked through. Any
    other suffix is read as text: the strictest reading, where anything that is not an id is
    rejected line by line, visibly. Compression is independent of the format and is detected
    when reading (by name or by the gzip magic bytes).
    """
    if explicit != "auto":
        if explicit not in FORMATS:
            raise UsageError(
                f"unknown input format {escape(explicit, 40)!r}; "
                "expected one of auto, text, jsonl, csv, json"
            )
        return explicit  # type: ignore[return-value]
    if name == "-":
        return "text"
    lowered = PurePath(name).name.lower()
    if lowered.endswith(".gz"):
        lowered = lowered[: -len(".gz")]
    return _SUFFIXES.get(PurePath(lowered).suffix, "text")


def read_entries(
    path: str,
    fmt: str = "auto",
    *,
    stdin: IO[bytes] | None = None,
    max_line_bytes: int = 4096,
    called: str = "input",
) -> EntryReader:
    """Stream the entries of ``path`` (``-``: ``stdin``, default ``sys.stdin.buffer``).

    The file is opened here, so a missing or unreadable path raises
    :class:`~worker.errors.InputUnreadable` at once; everything else (the gzip check, the CSV
    header, reading) happens as the iterator is advanced, so stdin is never read from the
    calling thread. The iterator is synchronous: run it in a worker thread (see
    :func:`read_chunks`). Close it (or use it as a context manager) to release the file
    early; it closes itself when exhausted. ``stdin`` is what ``-`` reads, or, for another
    ``path``, the pipe the caller opened at that path already (``run`` opens a named pipe
    before its event loop: see ``worker.commands.run``); it is never closed here.
    """
    if max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be at least 1, not {max_line_bytes}")
    kind = detect_format(path, fmt)
    if path == "-" or stdin is not None:
        if stdin is None and sys.stdin is None:  # closed at start (<&-): not an empty input
            flag = called if called.startswith("-") else f"--{called}"
            raise InputUnreadable(f"{flag} -: stdin is closed (<&-), so there is nothing to read")
        source = stdin if stdin is not None else sys.stdin.buffer
        sniff = path == "-" and fmt == "auto"
        return EntryReader(path, kind, source, False, max_line_bytes, sniff=sniff, called=called)
    return EntryReader(path, kind, _open(path, called), True, max_line_bytes, called=called)


def read_chunks(entries: Iterator[Entry], size: int) -> Iterator[list[Entry]]:
    """Lists of up to ``size`` entries, in order, for the hop from a worker thread.

    Advance it in the thread with ``next(chunks, None)``: ``StopIteration`` must not cross
    into a coroutine (asyncio refuses to set it on a future).
    """
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, not {size}")
    while chunk := list(islice(entries, size)):
        yield chunk


def _open(path: str, called: str) -> IO[bytes]:
    try:
        return open(path, "rb")  # closed by EntryReader
    except OSError as exc:
        raise InputUnreadable(
            f"cannot read {called} {escape(path, 200)}: {file_problem(exc)}"
        ) from None


class EntryReader:
    """The iterator :func:`read_entries` returns: one open input and how far it has got.

    The parsing generator lives in a separate :class:`_Parse` that does not point back here,
    so dropping a reader frees it (and closes its file) at once instead of leaving a
    reference cycle for the garbage collector to finalize in whatever order it likes.
    """

    __slots__ = ("_entries", "_parse")

    def __init__(
        self,
        path: str,
        fmt: Format,
        source: IO[bytes],
        owned: bool,
        max_line_bytes: int,
        *,
        sniff: bool = False,
        called: str = "input",
    ) -> None:
        self._parse = _Parse(path, fmt, source, owned, max_line_bytes, sniff, called)
        self._entries = self._parse.generate()

    def __iter__(self) -> EntryReader:
        return self

    def __next__(self) -> Entry:
        return next(self._entries)

    def close(self) -> None:
        """Stop reading and release the file (stdin is left open)."""
        self._entries.close()
        self._parse.release()

    def __enter__(self) -> EntryReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A reader dropped before it was started still holds its file: close it quietly.
        self._parse.release()

    def __repr__(self) -> str:
        parse = self._parse
        state = "closed" if parse.source.closed else "open"
        return (
            f"EntryReader(path={escape(parse.path, 120)!r}, format={parse.format}, "
            f"at={parse.where()!r}, {state})"
        )


_PLAN_MAGIC = b"devserver-reaper plan v"
"""How a plan file starts (worker.discovery.plan's MAGIC, any version): never read as ids."""


class _Parse:
    """The state of one read: the source, the format, and the progress for messages."""

    def __init__(
        self,
        path: str,
        fmt: Format,
        source: IO[bytes],
        owned: bool,
        max_line_bytes: int,
        sniff: bool,
        called: str,
    ) -> None:
        self.path = path
        self._called = called  # how messages call it: "input", "--exclude"
        self.format: Format = fmt
        self.source = source
        self._owned = owned
        self._limit = max_line_bytes
        self._progress: _Lines | _JsonArray | None = None
        self.sniff = sniff  # stdin with no format named: decided by its first bytes

    def release(self) -> None:
        if self._owned:
            self.source.close()

    def where(self) -> str:
        """How far reading got: the line (or JSON array element) last read."""
        if isinstance(self._progress, _JsonArray):
            return f"element {self._progress.index}"
        return f"line {self._progress.number if self._progress else 0}"

    def _name(self) -> str:
        """``input ids.txt``, ``input stdin``, ``--exclude keep.txt``: the file as messages
        name it."""
        return f"{self._called} " + ("stdin" if self.path == "-" else escape(self.path, 200))

    def generate(self) -> Generator[Entry, None, None]:
        layers: list[io.BufferedIOBase] = []
        try:
            stream = self._decompressed(layers)
            if self.sniff:
                head, dropped = _head(stream)
                self.format = _sniffed(head)
            else:
                head, dropped = _first_bytes(stream, len(_PLAN_MAGIC)), 0
            rewound = _Rewound(head, stream, blank_lines=dropped)  # type: ignore[arg-type]
            stream = io.BufferedReader(rewound, _READ_SIZE)
            layers.append(stream)
            if head.startswith(_WIDE_BOMS):
                raise InputUnreadable(
                    f"{self._name()} is UTF-16 or UTF-32 text (it starts with that byte order "
                    "mark), not UTF-8, and every line of it would be rejected: convert it "
                    "(iconv -f UTF-16 -t UTF-8) and give it again"
                )
            if head.startswith(_PLAN_MAGIC):
                raise InputUnreadable(
                    f"{self._name()} is a plan written by discover --plan, not a list of ids "
                    "(its jobs would go out without the plan's seal, expiry and re-checks): "
                    f"give it to run as --plan {escape(self.path, 200)}"
                )
            if self.format == "json":
                self._progress = _JsonArray(stream, self._limit, self._name())
                yield from self._progress
                return
            self._progress = lines = _Lines(stream, self._limit)
            if self.format == "csv":
                yield from self._csv(lines)
            elif self.format == "jsonl":
                yield from self._jsonl(lines)
            else:
                yield from self._text(lines)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise InputUnreadable(
                f"{self._name()}: gzip stream is truncated or corrupt after {self.where()} ({exc})"
            ) from None
        except OSError as exc:
            reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
            raise InputUnreadable(
                f"{self._name()}: read failed after {self.where()}: {reason}"
            ) from None
        finally:
            for layer in reversed(layers):
                layer.close()
            if self._owned:
                self.source.close()

    def _decompressed(self, layers: list[io.BufferedIOBase]) -> io.BufferedIOBase:
        """The input as a buffered stream, gunzipped when it starts with the gzip magic."""
        head = b""
        while len(head) < len(GZIP_MAGIC):
            more = self.source.read(len(GZIP_MAGIC) - len(head))
            if not more:
                break
            head += more
        stream: io.BufferedIOBase = io.BufferedReader(_Rewound(head, self.source), _READ_SIZE)
        layers.append(stream)
        if head == GZIP_MAGIC:
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
            layers.append(stream)
        elif head and PurePath(self.path).name.lower().endswith(".gz"):
            raise InputUnreadable(
                f"{self._name()}: not gzip (the name ends in .gz but the content does "
                "not start with the gzip magic bytes)"
            )
        return stream

    def _line_text(self, item: bytes | _Overlong, number: int) -> str | Rejection:
        """A physical line as text, or the rejection when it is over-long or not UTF-8."""
        if isinstance(item, _Overlong):
            return Rejection(item.prefix, number, line_too_long(self._limit))
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            return Rejection(item.decode("utf-8", "replace"), number, NOT_UTF8)

    def _text(self, lines: _Lines) -> Iterator[Entry]:
        """One id per line; blank lines and lines starting with ``#`` are skipped.

        Only whole-line comments: ``abc # old`` is rejected (a space is not allowed in an
        id) rather than guessed at, because a deletion tool must not read an id the user
        did not write.
        """
        for item in lines:
            if isinstance(item, _Overlong):
                yield Rejection(item.prefix, lines.number, line_too_long(self._limit))
                continue
            try:
                text = item.decode()
            except UnicodeDecodeError:
                yield Rejection(item.decode("utf-8", "replace"), lines.number, NOT_UTF8)
                continue
            text = text.strip()
            if text and text[0] != "#":
                yield validate(text, lines.number)

    def _jsonl(self, lines: _Lines) -> Iterator[Entry]:
        """One JSON value per line: a string, or an object with ``id`` or ``job_id``."""
        for item in lines:
            text = self._line_text(item, lines.number)
            if isinstance(text, Rejection):
                yield text
                continue
            text = text.strip()
            if not text:
                continue
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as exc:
                yield Rejection(text, lines.number, f"not JSON: {_json_problem(exc)}")
                continue
            yield _from_json(value, text, lines.number)

    def _csv(self, lines: _Lines) -> Iterator[Entry]:
        """CSV with a header naming an ``id`` or ``job_id`` column (case and spaces ignored).

        Fields are stripped of surrounding whitespace. Rows whose fields are all empty
        (spreadsheet exports end with them) are skipped like blank lines. An over-long or
        non-UTF-8 physical line becomes a rejection and is left out of the CSV parse.
        """
        pending: list[Rejection] = []
        start = 0  # the line where the record being parsed starts
        waiting = True  # for the first line of the next record
        last = ""  # the line fed last, to show in a "not valid CSV" rejection

        def feed() -> Iterator[str]:
            nonlocal start, waiting, last
            for item in lines:
                text = self._line_text(item, lines.number)
                if isinstance(text, Rejection):
                    pending.append(text)
                    continue
                if waiting:
                    start, waiting = lines.number, False
                last = text
                yield text + "\n"

        reader = csv.reader(feed())
        columns: list[int] = []
        names: list[str] = []
        places: dict[str, int] = {}
        while True:
            waiting = True
            try:
                row = next(reader)
            except StopIteration:
                yield from pending
                return
            except csv.Error as exc:
                yield from pending
                pending.clear()
                # Drop the csv module's advice about opening files: it is for programmers.
                problem = str(exc).split(" - ", 1)[0]
                yield Rejection(last, start, f"not valid CSV: {problem}")
                continue
            yield from pending
            pending.clear()
            if not any(field.strip() for field in row):
                continue
            if not names:
                names = [field.strip() for field in row]
                columns = _id_columns(names, self._name())
                places = _place_columns(names, self._name())
                continue
            yield self._csv_row(row, start, columns, names, places)

    def _csv_row(
        self,
        row: list[str],
        line: int,
        columns: list[int],
        names: list[str],
        places: dict[str, int],
    ) -> Entry:
        values = []
        for column in columns:
            if column >= len(row):
                return _short(row, line, names[column], len(names))
            values.append(row[column].strip())
        for column in places.values():
            if column >= len(row):
                return _short(row, line, names[column], len(names))
        if len(row) > len(names):
            return _long(row, line, len(names))
        if len(set(values)) > 1:
            return Rejection(",".join(row), line, "the 'id' and 'job_id' fields differ")
        entry = validate(values[0], line)
        if not places:
            return entry
        named: dict[str, str | None] = {name: row[i].strip() for name, i in places.items()}
        return _addressed(entry, named, ",".join(row))


def _short(row: list[str], line: int, name: str, header: int) -> Rejection:
    """The rejection of a CSV row that ends before the field ``name``."""
    reason = f"row has no {name!r} field (it has {len(row)}; the header has {header})"
    return Rejection(",".join(row), line, reason)


def _long(row: list[str], line: int, header: int) -> Rejection:
    """The rejection of a CSV row with more fields than the header: an unquoted comma in a
    field before shifts every column after it, the project's included."""
    extra = ", ".join(repr(escape(field, 40)) for field in row[header : header + 3])
    more = f", … ({len(row) - header} in all)" if len(row) - header > 3 else ""
    reason = (
        f"row has {len(row)} fields, the header {header}: the fields beyond it ({extra}{more}) "
        "name no column (an unquoted comma shifts the columns after it)"
    )
    return Rejection(",".join(row), line, reason)


def _id_columns(names: list[str], source: str) -> list[int]:
    """Where ``id`` and ``job_id`` are in a CSV header; ``UsageError`` when neither is."""
    lowered = [name.lower() for name in names]
    columns = [lowered.index(key) for key in ("id", "job_id") if key in lowered]
    if not columns:
        found = ", ".join(repr(escape(name, 40)) for name in names[:20])
        if len(names) > 20:
            found += f", … ({len(names)} in all)"
        raise UsageError(
            f"{source}: the CSV header has no 'id' or 'job_id' column "
            f"(columns found: {found}); CSV input needs a header row naming the id column"
        )
    return columns


def _place_columns(names: list[str], source: str) -> dict[str, int]:
    """Where ``project_id``, ``region`` and ``endpoint`` are in a CSV header, if anywhere;
    ``UsageError`` for a header naming one twice (in any case), or one spelled otherwise
    (``projectId``): which project a row means would be a guess."""
    lowered = [name.lower() for name in names]
    for name in ("id", "job_id", *FIELDS):
        if lowered.count(name) > 1:
            raise UsageError(
                f"{source}: the CSV header names the {name!r} column "
                f"{lowered.count(name)} times; which one a row means is not clear"
            )
    wrong = _misnamed([name for name in names if name.lower() not in _READ])
    if wrong is not None:
        raise UsageError(f"{source}: the CSV header {escape(wrong, 120)}")
    return {name: lowered.index(name) for name in FIELDS if name in lowered}


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _json_problem(exc: ValueError | RecursionError) -> str:
    """Why the parser refused a JSON text. Beyond syntax errors, it refuses values nested
    deeper than the interpreter's recursion limit and integers of over 4,300 digits."""
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return "a number too long to read"


def _from_json(value: object, raw: str, line: int) -> Entry:
    """The entry for one JSON value: a string id, or an object's ``id``/``job_id``.

    Strings are taken exactly (no stripping): in JSON the quotes say where the id ends.
    """
    if isinstance(value, str):
        return validate(value, line)
    if not isinstance(value, dict):
        return Rejection(
            raw,
            line,
            f"expected a string or an object with 'id' or 'job_id', got {_json_type(value)}",
        )
    lists = [key for key in _LIST_KEYS if key in value]
    if lists:  # serve's entries and the API's body name several ids so; a line names one
        return Rejection(raw, line, f"names {lists[0]!r}, a list, which run does not read: "
                         "put each id on a line of its own, as 'id'")  # fmt: skip
    keys = [key for key in ("id", "job_id") if key in value]
    if not keys:
        return Rejection(raw, line, "object has no 'id' or 'job_id'")
    if (
        "\\" in raw
        or raw.count(_QUOTED[keys[0]]) > 1
        or (len(keys) > 1 and raw.count('"job_id"') > 1)
    ):
        twice = _named_twice(raw)  # a key's name twice, or an escape that may spell one
        if twice is not None:
            return Rejection(raw, line, twice)
    if len(keys) == 2 and value["id"] != value["job_id"]:
        return Rejection(raw, line, "the object's 'id' and 'job_id' differ")
    job_id = value[keys[0]]
    if not isinstance(job_id, str):
        return Rejection(raw, line, f"{keys[0]!r} is not a string (got {_json_type(job_id)})")
    wrong = _misnamed(value)
    if wrong is not None:
        return _refused(job_id, raw, line, wrong)
    if _PLACE_FIELDS.isdisjoint(value):  # most lines: the default's, nothing more to read
        return validate(job_id, line)
    named: dict[str, str | None] = {}
    for name in FIELDS:
        given = value.get(name)
        if given is not None and not isinstance(given, str):
            return _refused(
                job_id, raw, line, f"{name!r} is not a string (got {_json_type(given)})"
            )
        # A key there twice is refused whatever its last value: ``null`` or ``""`` last
        # would leave the line to the default project, which its first value did not name.
        if (given is not None or name in value) and raw.count(_QUOTED[name]) > 1:
            twice = _named_twice(raw)
            if twice is not None:
                return Rejection(raw, line, twice)
        named[name] = given
    return _addressed(validate(job_id, line), named, raw)


_PLACE_FIELDS = frozenset(FIELDS)
_ID_KEYS = ("id", "job_id")
_LIST_KEYS = ("ids", "job_ids")
"""Keys that hold several ids elsewhere (a stream entry's ``ids``, the DELETE body's
``job_ids``): beside an ``id`` they were ignored, and their ids lost without a word."""
_READ = (*_ID_KEYS, *FIELDS)
_misnamed = misnamed_by(_ID_KEYS)
_QUOTED = {key: f'"{key}"' for key in _READ}


def _named_twice(raw: str) -> str | None:
    """Why an object naming a field it is read for twice (``{"id": "a", "id": "b"}``, two
    ``project_id``) is refused, else None. A JSON reader keeps the last (as jq does); for
    a tool that deletes, which one was meant is a guess.

    The parsed object has each key once, so its caller asks only of a line holding a read
    key's quoted name twice, or a ``\\`` escape (which may spell one otherwise): the line
    is parsed again, keeping every pair, to find out. A
    clean line costs a count or two of its text."""
    tops: list[list[str]] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        tops.append([key for key, _ in items])  # the outermost object comes last
        return dict(items)

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError):  # parsed once already: a failure here is not ours
        return None
    return named_twice(tops[-1] if tops else [], _READ, "a JSON reader would keep the last")


def _addressed(entry: Entry, named: dict[str, str | None], raw: str) -> Entry:
    """``entry`` with the project, region or endpoint its line named (``FIELDS``), or the
    line rejected for the first bad one, named with the rule it breaks."""
    if isinstance(entry, Rejection) or not any(named.values()):
        return entry
    found = address(named)
    if isinstance(found, str):
        return _refused(entry.job_id, raw, entry.line, found)
    entry.address = found
    return entry


def _refused(job_id: str, raw: str, line: int, reason: str) -> Rejection:
    """The rejection of a line for what it says beside its id (a bad project, region or
    endpoint; a misspelt field): the id as its ``job_id`` when it is one, so a script
    matching ids finds it, and the line's text beside it; else the text, as for a bad id."""
    if JOB_ID_RE.fullmatch(job_id):
        return Rejection(job_id, line, reason, text=raw)
    return Rejection(raw, line, reason)


class _Overlong:
    """A line longer than the limit: only its beginning is kept, for the rejection event."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix


class _Lines:
    """The physical lines of a stream as bytes (without the line ending), bounded in size.

    The stream is read in blocks and split on ``\n`` in C, which is several times faster
    than ``readline`` per line. Only the unfinished last line of a block is carried over;
    once it is longer than the limit it becomes an :class:`_Overlong` and the rest of that
    line is discarded block by block, so no line is ever held whole. ``number`` is the
    1-based number of the line last yielded. A UTF-8 byte order mark on the first line is
    dropped.
    """

    def __init__(self, stream: io.BufferedIOBase, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._prefix = min(limit, _RAW_PREFIX)  # the same however the reads fall
        self.number = 0

    def _line(self, line: bytes) -> bytes | _Overlong:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self._limit:
            return _Overlong(line[: self._prefix].decode("utf-8", "replace"))
        return line

    def __iter__(self) -> Iterator[bytes | _Overlong]:
        read = self._stream.read1
        limit = self._limit
        carry = b""  # the start of a line whose end has not been read yet
        overlong: _Overlong | None = None  # set while the rest of a long line is discarded
        block = read(_READ_SIZE)
        while len(block) < len(_BOM) and _BOM.startswith(block) and (more := read(_READ_SIZE)):
            block += more  # a byte order mark cut by a short read
        block = block.removeprefix(_BOM) or read(_READ_SIZE)  # the mark may be a read alone
        while block:
            lines = block.split(b"\n")
            tail = lines.pop()
            if lines:
                self.number += 1
                if overlong is not None:
                    yield overlong
                    overlong = None
                else:
                    yield self._line(carry + lines[0] if carry else lines[0])
                carry = b""
                for line in islice(lines, 1, None):
                    self.number += 1
                    # The common case inline: this loop is the hot path of every line format.
                    if len(line) <= limit and not line.endswith(b"\r"):
                        yield line
                    else:
                        yield self._line(line)
            if overlong is None:
                carry = carry + tail if carry else tail
                if len(carry) > limit + 1:  # + 1: a "\r" may come before the "\n"
                    overlong = _Overlong(carry[: self._prefix].decode("utf-8", "replace"))
                    carry = b""
            block = read(_READ_SIZE)
        if overlong is not None or carry:
            self.number += 1
            yield overlong if overlong is not None else self._line(carry)


def _first_bytes(stream: io.BufferedIOBase, size: int) -> bytes:
    """Up to ``size`` bytes from the start, or fewer where the first line ends sooner (a
    pipe's short first line is not waited on for more)."""
    head = b""
    while len(head) < size and b"\n" not in head:
        more = stream.read1(size - len(head))
        if not more:
            break
        head += more
    return head


def _head(stream: io.BufferedIOBase) -> tuple[bytes, int]:
    """Bytes read up to the end of the first line that is not white space (or the end of the
    input), and how many line breaks of leading white space were let go on the way.

    White space before the first entry may be of any length: past ``_HEAD_LIMIT`` it is
    counted (its line breaks, so line numbers stay true) instead of kept."""
    head, dropped = b"", 0
    while True:
        mark = _BOM if head.startswith(_BOM) else b""
        if _BOM.startswith(head[: len(_BOM)]) and not mark:  # part of a mark, or none yet
            content = head[len(_BOM) :].lstrip()
        else:
            content = head[len(mark) :].lstrip()
        if b"\n" in content or len(content) > _FIRST_LINE:  # the first line, for CSV
            break
        if not content and len(head) > _HEAD_LIMIT:  # white space only: keep its line breaks
            dropped += head.count(b"\n", len(mark))
            head = mark
        more = stream.read1(_READ_SIZE)
        if not more:
            break
        head += more
    return head, dropped


_HEAD_LIMIT = 64 * 1024
_FIRST_LINE = 4096
_CSV_HEADERS = frozenset({"id", "job_id", "jobid", "job id"})


def _sniffed(head: bytes) -> Format:
    """Stdin's format from its first bytes: ``[`` a JSON array, ``{`` or ``"`` JSON Lines
    (``discover --output jsonl``), a first line holding a comma or naming an id column
    (``id``, ``job_id``, quoted or not) CSV, anything else text. None of these can start or
    be an id; a quoted header (``"id"``) is CSV's, never a JSON Lines id."""
    head = head.removeprefix(_BOM).lstrip()
    if head.startswith(b"["):
        return "json"
    first = head.split(b"\n", 1)[0].strip()
    column = first.strip(b'"').decode("utf-8", "replace").strip().lower()
    header = b"," in first or column in _CSV_HEADERS
    if head.startswith(b"{") or (head.startswith(b'"') and not header):
        return "jsonl"
    return "csv" if header else "text"


class _Rewound(io.RawIOBase):
    """The bytes read to sniff the format, put back in front of the rest of the input.

    Reads with ``read1`` where the source has it, so a pipe delivers lines as they arrive
    instead of after a full buffer. Closing it leaves the source open.
    """

    def __init__(self, head: bytes, source: IO[bytes], *, blank_lines: int = 0) -> None:
        """``blank_lines``: line breaks let go while sniffing, given back after a leading
        byte order mark (so line numbers stay true), however many."""
        super().__init__()
        mark = _BOM if head.startswith(_BOM) else b""
        self._mark, self._blank, self._head = mark, blank_lines, head[len(mark) :]
        self._source = source
        self._read = getattr(source, "read1", source.read)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        if self._mark:
            count = min(len(view), len(self._mark))
            view[:count] = self._mark[:count]
            self._mark = self._mark[count:]
            return count
        if self._blank:
            count = min(len(view), self._blank)
            view[:count] = b"\n" * count
            self._blank -= count
            return count
        if self._head:
            count = min(len(view), len(self._head))
            view[:count] = self._head[:count]
            self._head = self._head[count:]
            return count
        data: bytes = self._read(len(view))
        view[: len(data)] = data
        return len(data)


class _JsonArray:
    """An incremental parser for a top-level JSON array of strings or objects.

    Each element is decoded with :meth:`json.JSONDecoder.raw_decode` over a buffer that
    never holds much more than one element plus one read. An element that does not parse
    is skipped by a string-aware bracket scanner (discarding as it goes) to the next
    top-level ``,`` or ``]`` and rejected; when no such point exists before the end, the
    array cannot be resumed and :class:`InputUnreadable` names the element and the
    character offset. A trailing comma before ``]`` is tolerated; anything but whitespace
    after the closing ``]`` is an error, so a second document is not silently ignored.
    Bytes that are not UTF-8 are decoded with ``surrogateescape``, so an id holding them is
    rejected as "not valid UTF-8" and the rest of the array still parses.
    """

    def __init__(self, stream: io.BufferedIOBase, limit: int, name: str) -> None:
        self._stream = stream
        self._limit = limit
        self._name = name
        self._text = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._buf = ""
        self._pos = 0
        self._base = 0  # characters dropped from the front of the buffer
        self._eof = False
        self._started = False
        self.index = 0

    def _offset(self) -> int:
        return self._base + self._pos

    def _fill(self) -> bool:
        """Append one more read to the buffer; False when the input is exhausted."""
        if self._eof:
            return False
        data = self._stream.read1(_READ_SIZE)
        if self._pos:
            self._base += self._pos
            self._buf = self._buf[self._pos :]
            self._pos = 0
        if not data:
            self._eof = True
            self._buf += self._text.decode(b"", final=True)
            return False
        text = self._text.decode(data)
        if not self._started and text:  # a first read may end inside the byte order mark
            self._started = True
            text = text.removeprefix("\ufeff")
        self._buf += text
        return True

    def _peek(self) -> str:
        """Skip whitespace; the next character, or "" at the end of the input."""
        while True:
            buf, pos = self._buf, self._pos
            end = len(buf)
            while pos < end and buf[pos] in " \t\r\n":
                pos += 1
            self._pos = pos
            if pos < end:
                return buf[pos]
            if not self._fill():
                return ""

    def _broken(self, what: str, offset: int | None = None) -> InputUnreadable:
        where = self._offset() if offset is None else offset
        return InputUnreadable(
            f"{self._name}: malformed JSON array: {what} (element {self.index}, "
            f"character offset {where})"
        )

    def __iter__(self) -> Iterator[Entry]:
        first = self._peek()
        if first == "":
            return  # an empty file holds no ids, whatever its format
        if first != "[":
            raise InputUnreadable(
                f"{self._name}: not a JSON array (it starts with {escape(first, 10)!r}); "
                "for one JSON value per line use the jsonl format"
            )
        self._pos += 1
        char = self._peek()
        while char != "]":
            if char == "":
                raise self._broken("the input ends before the closing ']'")
            self.index += 1
            yield self._element()
            char = self._peek()
            if char == ",":
                self._pos += 1
                char = self._peek()
            elif char not in ("]", ""):
                raise self._broken(f"expected ',' or ']', found {escape(char, 10)!r}")
        self._pos += 1
        if self._peek() != "":
            raise self._broken("unexpected data after the closing ']'")

    def _element(self) -> Entry:
        while True:
            try:
                value, end = _DECODE(self._buf, self._pos)
            except (ValueError, RecursionError) as exc:
                # A syntax error may only be the buffer cutting the element: read on while
                # that can help. Nesting and overlong numbers more input cannot help.
                cut = isinstance(exc, json.JSONDecodeError)
                if cut and len(self._buf) - self._pos <= self._limit and self._fill():
                    continue
                return self._skip_bad(_json_problem(exc))
            # A number may go on in the next read ("0" of "0.5"); or what follows is
            # garbage, which the caller reports once reading more cannot help.
            if (
                (end == len(self._buf) or self._buf[end] not in _AFTER_VALUE)
                and len(self._buf) - self._pos <= self._limit
                and self._fill()
            ):
                continue
            raw = self._buf[self._pos : end]
            self._pos = end
            if len(raw) > self._limit:
                return Rejection(raw[:_RAW_PREFIX], self.index, self._too_long())
            return _from_json(value, raw, self.index)

    def _too_long(self) -> str:
        return f"element longer than {self._limit} characters"

    def _skip_bad(self, message: str) -> Rejection:
        """Reject the element at the cursor and move past it, or raise if that is impossible."""
        start = self._offset()
        prefix = self._buf[self._pos : self._pos + _RAW_PREFIX]
        depth, in_string, escaped = 0, False, False
        while True:
            buf, pos = self._buf, self._pos
            end = len(buf)
            while pos < end:
                if escaped:  # the character after a backslash that ended the previous read
                    escaped = False
                    pos += 1
                    continue
                if in_string:
                    pos = _STRING_BODY.match(buf, pos).end()  # type: ignore[union-attr]
                    if pos < end:
                        # Either the closing quote, or a backslash ending the buffer.
                        escaped = buf[pos] == "\\"
                        in_string = escaped
                        pos += 1
                    continue
                found = _STOPS.search(buf, pos)
                if found is None:
                    pos = end
                    break
                pos = found.start()
                char = buf[pos]
                if char == '"':
                    in_string = True
                elif char in "[{":
                    depth += 1
                elif depth:
                    if char in "]}":
                        depth -= 1
                elif char in ",]":
                    self._pos = pos
                    size = self._offset() - start
                    reason = self._too_long() if size > self._limit else f"not JSON: {message}"
                    return Rejection(prefix[:size].strip(), self.index, reason)
                pos += 1
            self._pos = pos
            if not self._fill():
                raise self._broken(
                    f"element cannot be parsed ({message}) and the array does not resume after it",
                    start,
                )
