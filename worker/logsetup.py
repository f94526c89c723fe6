"""structlog, configured once at the edge: JSON lines (orjson) for machines, colour for people.

Events are written with ``print``-free byte loggers; every event carries ``timestamp``
(ISO-8601 UTC), ``level`` and the ``run_id`` bound by the command. Tracebacks are rendered
without local variables, so a secret held in a frame can never reach the log.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Literal, TextIO, cast

import orjson
import structlog

LogFormat = Literal["auto", "json", "console"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


def _orjson_dumps(event: object, **_: object) -> bytes:
    return orjson.dumps(event, default=str)


def configure(
    *, fmt: LogFormat = "auto", level: str = "info", stream: IO[str] | None = None
) -> None:
    """Send events to ``stream`` (stdout by default) as JSON lines, or rendered on a terminal."""
    out = stream if stream is not None else sys.stdout
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if console:
        processors: list[structlog.typing.Processor] = [
            *shared,
            structlog.dev.ConsoleRenderer(
                exception_formatter=structlog.dev.plain_traceback, colors=out.isatty()
            ),
        ]
        factory: structlog.typing.WrappedLogger = structlog.PrintLoggerFactory(cast(TextIO, out))
    else:
        processors = [
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
        binary = getattr(out, "buffer", None)
        factory = (
            structlog.BytesLoggerFactory(binary)
            if binary is not None
            else structlog.PrintLoggerFactory(cast(TextIO, _BytesToText(out)))
        )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


class _BytesToText:
    """Lets the JSON renderer's bytes reach a text stream (pytest's capture, for one)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, data: str | bytes) -> None:
        self._stream.write(data.decode() if isinstance(data, bytes) else data)

    def flush(self) -> None:
        self._stream.flush()
