"""Id validation: pure logic, no I/O. (De-duplication is the ledger's: ``worker.ledger``.)

Everything read from the input passes through :func:`validate` exactly once, so the rules of
the reference ("1 to 64 characters of letters, digits, ``-`` and ``_``") live in one place and every
invalid entry comes out as a :class:`~worker.types.Rejection` with a reason a person can act on,
never as an exception and never silently dropped.
"""

from __future__ import annotations

from itertools import islice

from worker.types import JOB_ID_RE, Candidate, Rejection

MAX_ID_LENGTH = 64
NOT_UTF8 = "not valid UTF-8"

_ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def line_too_long(limit: int) -> str:
    """The reason for a line the source refused to hold in memory (it never saw all of it)."""
    return f"line longer than {limit} bytes"


def validate(raw: str, line: int) -> Candidate | Rejection:
    """A :class:`Candidate` when ``raw`` is a valid job id, else a :class:`Rejection` saying why.

    ``raw`` is taken as it is: the sources strip whitespace where their format allows it.
    The reason names the first problem found, in this order: empty, not valid UTF-8 (lone
    surrogates, as ``surrogateescape`` decoding leaves them), the first invalid character
    (with its 1-based position), then the length. An invalid character is named before the
    length because it is the more useful of the two for a person fixing the file.
    """
    if JOB_ID_RE.fullmatch(raw):
        return Candidate(raw, line)
    return Rejection(raw, line, _reason(raw))


def _reason(raw: str) -> str:
    if not raw:
        return "empty"
    for position, char in enumerate(raw, start=1):
        if char in _ALLOWED:
            continue
        if "\ud800" <= char <= "\udfff":
            return NOT_UTF8
        shown = repr(char)
        if not char.isascii():
            shown += f" (U+{ord(char):04X})"
        return f"invalid character {shown} at position {position}"
    return f"too long ({len(raw)} characters; at most {MAX_ID_LENGTH})"


def escape(raw: str, limit: int = 80) -> str:
    """A printable form of a rejected id for events: escaped, and at most ``limit`` characters.

    Rejected input is hostile by assumption: it may hold terminal control sequences, bidi
    overrides, lone surrogates (which JSON encoders refuse) or megabytes of garbage. Printable
    characters other than the backslash are kept; everything else becomes a Python-style
    escape (``\\n``, ``\\x1b``, ``\\u202e``, ``\\udcff``). A longer result is cut and ends in
    ``…``. Only the first ``limit + 1`` characters of ``raw`` are ever looked at.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    out: list[str] = []
    size = 0
    # Each character yields at least one output character, so limit + 1 of them settle it.
    for char in islice(raw, limit + 1):
        piece = char if char.isprintable() and char != "\\" else _escape_char(char)
        if size + len(piece) > limit:
            break
        out.append(piece)
        size += len(piece)
    else:
        return "".join(out)
    while out and size + 1 > limit:
        size -= len(out.pop())
    return "".join(out) + "…"


def _escape_char(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
