"""Where serve's data lives in Redis, and what one stream entry means. Pure logic, no I/O.

The keys all derive from ``settings.stream`` so that one setting names a whole queue:

- ``{stream}``: the ids to delete. An entry has a field ``id`` (one id) or ``ids`` (a JSON
  list of ids), or both.
- ``{stream}:dead``: entries given up on (invalid ids, unreadable payloads, too many
  deliveries), with the reason. Capped (approximately) at ``DEAD_MAXLEN``.
- ``{stream}:outcomes``: one entry per id per outcome, for producers to follow. Capped
  (approximately) at ``OUTCOMES_MAXLEN`` so it cannot grow without end.
- ``{stream}:ratelimit``: the shared rate limiter's state (one number).
- ``{stream}:lasterror``: a hash, stream entry id -> the last failure of an entry that is
  left pending to be tried again; removed when the entry is acknowledged or dead-lettered.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import orjson

from worker.input.intake import escape, validate
from worker.types import Candidate, Rejection

OUTCOMES_MAXLEN = 1_000_000
DEAD_MAXLEN = 1_000_000
MAX_IDS_PER_ENTRY = 1000
"""An entry naming more ids than this is dead-lettered whole: a producer bug, not a batch."""


@dataclass(frozen=True, slots=True)
class StreamLayout:
    """The Redis keys of one queue."""

    stream: str
    group: str

    @property
    def dead(self) -> str:
        return f"{self.stream}:dead"

    @property
    def outcomes(self) -> str:
        return f"{self.stream}:outcomes"

    @property
    def ratelimit(self) -> str:
        return f"{self.stream}:ratelimit"

    @property
    def last_error(self) -> str:
        return f"{self.stream}:lasterror"


@dataclass(frozen=True, slots=True)
class Message:
    """One stream entry, decoded.

    ``ids`` are the valid ids, de-duplicated in order; ``rejections`` the invalid ones (never
    sent). ``problem`` is set when the entry cannot be read at all; it then carries no ids.
    ``payload`` is the entry's fields as text, for the dead-letter stream. ``settled`` are
    ids of the entry that had their outcome on an earlier delivery (taken out of ``ids``).
    """

    entry_id: str
    ids: tuple[str, ...]
    rejections: tuple[Rejection, ...] = ()
    problem: str | None = None
    payload: str = "{}"
    settled: tuple[str, ...] = ()

    def done_besides(self, not_done: Collection[str]) -> list[str]:
        """The ids with an outcome: those settled before, and those of ``ids`` but
        ``not_done`` (still open, or failed and to be tried again)."""
        return [*self.settled, *(i for i in self.ids if i not in not_done)]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def payload_text(fields: dict[bytes, bytes] | dict[str, str]) -> str:
    """The entry's fields as a JSON object of (escaped, bounded) text: safe to log or store."""
    shown = {escape(_text(k), 64): escape(_text(v), 2000) for k, v in fields.items()}
    return orjson.dumps(shown).decode()


def decode_entry(entry_id: str, fields: dict[bytes, bytes] | dict[str, str]) -> Message:
    """Read the ids out of one entry; never raises (a bad entry says why in ``problem``)."""
    payload = payload_text(fields)
    values = {_text(k): v for k, v in fields.items()}
    raw: list[object] = []
    if "id" in values:
        raw.append(_text(values["id"]))
    if "ids" in values:
        try:
            listed = orjson.loads(values["ids"])
        except orjson.JSONDecodeError:
            return Message(entry_id, (), problem="ids is not valid JSON", payload=payload)
        if not isinstance(listed, list):
            return Message(entry_id, (), problem="ids is not a JSON list", payload=payload)
        raw.extend(listed)
    if "id" not in values and "ids" not in values:
        return Message(entry_id, (), problem="entry has neither id nor ids", payload=payload)
    if len(raw) > MAX_IDS_PER_ENTRY:
        problem = f"entry names {len(raw)} ids; at most {MAX_IDS_PER_ENTRY}"
        return Message(entry_id, (), problem=problem, payload=payload)
    ids: dict[str, None] = {}
    rejections: list[Rejection] = []
    for position, value in enumerate(raw, start=1):
        if not isinstance(value, str):
            reason = f"not a string but {type(value).__name__}"
            rejections.append(Rejection(orjson.dumps(value).decode(), position, reason))
            continue
        checked = validate(value, position)
        if isinstance(checked, Candidate):
            ids.setdefault(checked.job_id)
        else:
            rejections.append(checked)
    return Message(entry_id, tuple(ids), tuple(rejections), payload=payload)
