"""structlog, configured once at the edge: JSON lines (orjson) for machines, colour for people.

Events are written with ``print``-free byte loggers; every event carries ``timestamp``
(ISO-8601 UTC), ``level`` and the ``run_id`` bound by the command. Tracebacks are rendered
without local variables, so a secret held in a frame can never reach the log.

Why :class:`JsonSink` exists: a run writes one ``job.*`` event per id, and structlog's
processor chain costs several times what the event's JSON does. ``configure`` remembers what
it installed for JSON output, and :func:`json_sink` hands that to the commands, which give
it to their ``EventLog``; the log writes through it only while it is still the
configuration in force (not the console renderer, not ``structlog.testing.capture_logs``,
not someone else's ``structlog.configure``), so a batch of events can be written with one
timestamp and one write, in exactly the bytes structlog would have produced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, BinaryIO, ClassVar, Literal, TextIO, cast

import orjson
import structlog

LogFormat = Literal["auto", "json", "console"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


def _orjson_dumps(event: object, **_: object) -> bytes:
    return orjson.dumps(event, default=str)


def _orjson_text(event: object, **_: object) -> str:
    return orjson.dumps(event, default=str).decode()


def timestamp() -> str:
    """What ``TimeStamper(fmt="iso", utc=True)`` writes: ISO-8601 UTC with a ``Z``."""
    return datetime.now(tz=UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class JsonSink:
    """The JSON output ``configure`` installed: where lines go and which levels pass.

    ``processors`` is the very list handed to structlog (``capture_logs`` edits that list in
    place, so its contents are compared too, against ``chain``)."""

    processors: list[structlog.typing.Processor]
    chain: tuple[structlog.typing.Processor, ...]
    wrapper_class: type[Any]
    logger_factory: Any
    min_level: int
    write: Callable[[bytes], None]

    def active(self) -> bool:
        """Is this still structlog's configuration, untouched?"""
        config = structlog.get_config()
        processors = config["processors"]
        if processors is not self.processors or len(processors) != len(self.chain):
            return False
        if any(now is not then for now, then in zip(processors, self.chain, strict=True)):
            return False
        return (
            config["wrapper_class"] is self.wrapper_class
            and config["logger_factory"] is self.logger_factory
        )

    def timestamp(self) -> str:
        return timestamp()

    def __repr__(self) -> str:
        return f"JsonSink(min_level={logging.getLevelName(self.min_level)}, active={self.active()})"


_sink: JsonSink | None = None


class Unwritable:
    """The event stream, made safe to lose: ``| head -1`` closes it (EPIPE), a full disk
    fills it (ENOSPC). The first ``OSError`` of ``write`` or ``flush`` turns it into a sink
    that drops everything, points its descriptor at ``/dev/null`` (so no later flush, the
    interpreter's at exit included, fails again), and calls the handler of
    :func:`when_lost` once. Events are never worth a traceback; losing them is for the
    command to decide (``run`` stops as on SIGTERM)."""

    __slots__ = ("__weakref__", "_stream", "error", "name")  # structlog keys a lock by it

    def __init__(self, stream: IO[Any], name: str) -> None:
        self._stream = stream
        self.name = name
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        if self.error is None:
            try:
                return int(self._stream.write(data) or 0)
            except OSError as exc:
                self._lose(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._stream.flush()
            except OSError as exc:
                self._lose(exc)

    def isatty(self) -> bool:
        return self.error is None and self._stream.isatty()

    def _lose(self, exc: OSError) -> None:
        self.error = exc
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        if _on_lost is not None:
            _on_lost(self.name, exc)

    def __repr__(self) -> str:
        return f"Unwritable({self.name!r}, error={self.error!r})"


_on_lost: Callable[[str, OSError], None] | None = None


def when_lost(handler: Callable[[str, OSError], None] | None) -> None:
    """Call ``handler(name, error)`` when an event stream can no longer be written."""
    global _on_lost
    _on_lost = handler


def tell(text: str) -> None:
    """One line for a person on stderr, if stderr can still take it. Never raises: when it
    cannot, stderr is pointed at ``/dev/null`` so nothing later fails on it either."""
    stream = sys.stderr
    if stream is None:
        return
    from worker.terminal.wrap import for_terminal

    try:
        # Broken between words on a terminal: its edge cut "outcom" / "es" at 80 columns.
        stream.write(for_terminal(stream, text) + "\n")
        stream.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


def json_sink() -> JsonSink | None:
    """The JSON sink while ``configure``'s JSON set-up is the one in force, else ``None``."""
    sink = _sink
    return sink if sink is not None and sink.active() else None


def configure(
    *, fmt: LogFormat = "auto", level: str = "info", stream: IO[str] | None = None
) -> None:
    """Send events to ``stream`` (stdout by default) as JSON lines, or rendered on a terminal."""
    global _sink
    out = stream if stream is not None else sys.stdout
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    min_level = _LEVELS.get(level, logging.INFO)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    write: Callable[[bytes], None] | None = None
    if console:
        processors: list[structlog.typing.Processor] = [
            *shared,
            structlog.dev.ConsoleRenderer(
                exception_formatter=structlog.dev.plain_traceback, colors=out.isatty()
            ),
        ]
        factory: Any = structlog.PrintLoggerFactory(cast(TextIO, Unwritable(out, _name(out))))
    else:
        buffer = getattr(out, "buffer", None)
        if buffer is not None:
            binary = cast(BinaryIO, Unwritable(buffer, _name(out)))
            serializer: Callable[..., str | bytes] = _orjson_dumps
            factory = structlog.BytesLoggerFactory(binary)
            write = _binary_writer(binary)
        else:  # a text stream with no bytes underneath (io.StringIO): the renderer makes str
            out = cast(IO[str], Unwritable(out, _name(out)))
            serializer = _orjson_text
            factory = structlog.PrintLoggerFactory(cast(TextIO, out))
            write = _text_writer(out)
        processors = [
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=serializer),
        ]
    wrapper = structlog.make_filtering_bound_logger(min_level)
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    # structlog.configure keeps the list object itself: that identity is what active() checks.
    installed = structlog.get_config()["processors"]
    _sink = (
        None
        if write is None
        else JsonSink(
            processors=installed,
            chain=tuple(installed),
            wrapper_class=wrapper,
            logger_factory=factory,
            min_level=min_level,
            write=write,
        )
    )
    _route_library_logs(min_level)


class _ToStructlog(logging.Handler):
    """The standard library's records of a library (aiohttp's server errors) as our events:
    one line in the log's own format, with the error's type and message and no traceback
    (a malformed request from a client is not our bug, and a traceback is not JSON)."""

    EVENTS: ClassVar[dict[str, str]] = {"aiohttp.server": "http.error", "aiohttp.web": "http.error"}

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"message": record.getMessage(), "logger": record.name}
        level = record.levelno
        error = record.exc_info[1] if record.exc_info else None
        if error is not None:
            # The type and the HTTP status only: aiohttp's message quotes the bytes the
            # client sent, which may hold its own secrets (an Authorization header).
            fields["error"] = type(error).__name__
            status = getattr(error, "code", None)
            if isinstance(status, int) and 400 <= status < 500:
                fields["status"] = status
                level = min(level, logging.WARNING)  # the client's mistake, not ours
        event = self.EVENTS.get(record.name, f"{record.name}.log")
        log = structlog.get_logger("devserver_reaper")
        with contextlib.suppress(Exception):  # logging must never raise into the library
            log.log(level, event, **fields)


_BRIDGE = _ToStructlog()


def _route_library_logs(min_level: int) -> None:
    """aiohttp logs through the standard library; without a handler its errors reach stderr
    as plain text with a traceback (Python's last-resort handler). Route them to structlog."""
    library = logging.getLogger("aiohttp")
    if _BRIDGE not in library.handlers:
        library.addHandler(_BRIDGE)
    library.propagate = False
    library.setLevel(min_level)


class _LineLogger:
    """structlog's logger for people: the rendered line goes to ``write``, whatever the level."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write

    def msg(self, message: str) -> None:
        self._write(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def configure_for_people(
    *,
    render: structlog.typing.Processor,
    write: Callable[[str], None],
    level: str = "info",
    events: IO[bytes] | None = None,
) -> None:
    """Events for a person at a terminal: ``render`` turns each into one line (or drops it,
    raising ``DropEvent``) and ``write`` shows it. With ``events``, every event is first
    written there as a JSON line, as ``configure`` would write it (``--events FILE``)."""
    global _sink
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if events is not None:
        safe = cast(IO[bytes], Unwritable(events, _name(events)))
        processors += [structlog.processors.format_exc_info, _tee(_binary_writer(safe))]
    processors.append(render)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=lambda *_: _LineLogger(write),
        cache_logger_on_first_use=False,
    )
    _sink = None  # one event at a time: each is filtered for the person


def _name(stream: IO[Any]) -> str:
    """How a person knows the stream: ``stdout``, ``stderr`` or its file's name."""
    name = getattr(stream, "name", None)
    if name in ("<stdout>", 1):
        return "stdout"
    if name in ("<stderr>", 2):
        return "stderr"
    return str(name) if name is not None else "the event stream"


def _tee(write: Callable[[bytes], None]) -> structlog.typing.Processor:
    def tee(logger: Any, method: str, event: Any) -> Any:
        write(orjson.dumps(event, default=str) + b"\n")
        return event

    return tee


def _binary_writer(binary: IO[bytes]) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        binary.write(data)
        binary.flush()  # as structlog's BytesLogger does after every event

    return write


def _text_writer(out: IO[str]) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        out.write(data.decode())
        out.flush()

    return write


def new_run_id() -> str:
    """A run's id: sortable by time, unique enough to tell runs apart in one ledger or log."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
