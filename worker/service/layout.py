"""Where serve's data lives in Redis, and what one stream entry means. Pure logic, no I/O.

The keys all derive from ``settings.stream`` so that one setting names a whole queue:

- ``{stream}``: the ids to delete. An entry has a field ``id`` (one id) or ``ids`` (a JSON
  list of ids), or both; and may name where they are, ``project_id`` and ``region`` (or
  ``endpoint``), held to the settings' own rules (``worker.targets``). An entry naming a
  place serve may not send to is dead-lettered with the reason (:func:`aimed`).
- ``{stream}:dead``: entries given up on (invalid ids, unreadable payloads, too many
  deliveries), with the reason. Kept to ``Retention.dead_max_len`` entries and
  ``Retention.dead_max_age_s`` seconds, whichever is fewer.
- ``{stream}:outcomes``: one entry per id per outcome, for producers to follow. Kept the
  same way (``outcomes_max_len``, ``outcomes_max_age_s``) so it cannot grow without end.
- ``{stream}:ratelimit``: the shared rate limiter's bucket (one number), and beside it
  ``:pace`` (the fleet's rate), ``:lead`` (the lease of the process that runs ``--rate
  auto``'s controller) and ``:answers`` (what the others report to it): see
  ``worker.pacing.shared``.
- ``{stream}:lasterror``: a hash, stream entry id -> the last failure of an entry that is
  left pending to be tried again; removed when the entry is acknowledged or dead-lettered.
- ``{stream}:sending:{entry}``: a string, the ids of that entry sent in DELETEs whose
  answer is not recorded yet (``+id`` lines, ``-id`` once an answer said it was not gone
  by us), and ``=id`` for each id whose outcome row is written (``=!value`` for an invalid
  value's ``rejected`` row, which no id can be; made by that write for an
  entry that had no note: an id rejected at admission, never sent); removed when the
  entry is acknowledged or dead-lettered, else expires after
  ``SENDING_TTL_S``. What a redelivery of an entry whose holder died mid-call reads, so
  the jobs that call removed end ``deleted`` (unconfirmed), never ``absent``.
- ``{stream}:position``: a hash, group -> the last entry id below which that group has
  acknowledged everything: where a lost group is created again (``worker.service.retention``).

The ids stream itself is trimmed below the oldest entry any group still needs
(``worker.service.retention``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

import orjson

from worker.input.intake import escape, validate
from worker.targets import FIELDS, Address, Target, Targets, address, misnamed_by, named_twice
from worker.types import Candidate, Rejection

MAX_IDS_PER_ENTRY = 1000
"""An entry naming more ids than this is dead-lettered whole: a producer bug, not a batch."""
MAX_ENTRY_BYTES = 128 * 1024
"""An entry whose fields hold more bytes than this is dead-lettered unread: 1,000 ids of 64
characters fit in 67 KB, and parsing a 4 MB list of a million ids takes a replica from 75 to
165 MB, past a pod's memory limit, so it is refused before anything parses it."""
PAYLOAD_FIELDS = 16
"""The fields of an entry shown in its dead letter and log lines (an entry has one or two)."""
WEEK_S = 7 * 24 * 3600
SENDING_TTL_S = WEEK_S
"""How long the note of ids on the wire outlives a replica that died with them: a week, as
long as outcomes are kept by default, where a redelivery takes ``reclaim_after`` (or a
restart); an entry not delivered again within it has those ids found gone ``absent``."""


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of the outcomes and dead-letter streams is kept: at most ``*_max_len``
    entries and none older than ``*_max_age_s`` seconds (0: no age limit)."""

    outcomes_max_len: int = 1_000_000
    outcomes_max_age_s: float = WEEK_S
    dead_max_len: int = 1_000_000
    dead_max_age_s: float = WEEK_S


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

    @property
    def position(self) -> str:
        return f"{self.stream}:position"

    def written(self, token: str) -> str:
        """The key saying one write of outcome rows was applied (``token``: a digest of
        them), set in its transaction: a retry after the reply was lost finds it and does
        not write the rows twice."""
        return f"{self.stream}:written:{token}"

    def sending(self, entry_id: str) -> str:
        """The ids of entry ``entry_id`` on the wire (or sent, their answer not recorded)."""
        return f"{self.stream}:sending:{entry_id}"


@dataclass(frozen=True, slots=True)
class Message:
    """One stream entry, decoded.

    ``ids`` are the valid ids, de-duplicated in order; ``rejections`` the invalid ones (never
    sent), each value once, at its first position: every value named gets one outcome.
    ``problem`` is set when the entry cannot be read at all; it then carries no ids.
    ``payload`` is the entry's fields as text, for the dead-letter stream. ``settled`` are
    ids of the entry that had their outcome on an earlier delivery (taken out of ``ids``).

    ``address``: the project, region or endpoint the entry names (None: none); ``target``:
    where its ids' calls go once that is resolved (None: the settings' default).
    ``refused``: the entry names a place serve may not send to (``problem`` says why; its
    ids are ``rejections`` with that reason, never sent). ``given_up``: the entry was read
    past ``max_deliveries`` but some ids were kept for one last call (the reason and last
    error its dead letter says once they settle); ``look``: those of them that call only
    reads (``Batch.look``): none of its calls sent them.
    """

    entry_id: str
    ids: tuple[str, ...]
    rejections: tuple[Rejection, ...] = ()
    problem: str | None = None
    payload: str = "{}"
    settled: tuple[str, ...] = ()
    address: Address | None = None
    target: Target | None = None
    refused: bool = False
    given_up: tuple[str, str] | None = None
    look: tuple[str, ...] = ()

    def done_besides(self, not_done: Collection[str]) -> list[str]:
        """The ids with an outcome: those settled before, and those of ``ids`` but
        ``not_done`` (still open, or failed and to be tried again)."""
        return [*self.settled, *(i for i in self.ids if i not in not_done)]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def payload_text(fields: dict[bytes, bytes] | dict[str, str]) -> str:
    """The entry's fields as a JSON object of (escaped, bounded) text: safe to log or store.

    At most ``PAYLOAD_FIELDS`` fields are shown, then ``"..."`` says how many more there
    were: an entry of 400,000 one-byte fields would otherwise be escaped whole (to 5.5 MB,
    more than the entry) before the size bound refused it."""
    # Only the head of a value is decoded: escape looks at no more than 2,001 characters.
    # A field there twice (:class:`Fields`) is shown each time, the second as ``id (2)``.
    items = getattr(fields, "pairs", ()) or fields.items()
    head: list[tuple[bytes | str, bytes | str]] = list(islice(items, PAYLOAD_FIELDS))
    shown: dict[str, str] = {}
    for k, v in head:
        key = escape(_text(k[:256]), 64)
        if key in shown:
            key = next(f"{key} ({n})" for n in range(2, PAYLOAD_FIELDS + 2)
                       if f"{key} ({n})" not in shown)  # fmt: skip
        shown[key] = escape(_text(v[:8004]), 2000)
    count = _field_count(fields)
    if count > PAYLOAD_FIELDS:
        shown["..."] = f"{count - PAYLOAD_FIELDS} more fields"
    return orjson.dumps(shown).decode()


class Unread(bytes):
    """What the bounded reader (``worker.service.bounded``) kept of a string it did not
    read whole: its first bytes; ``size``, the bytes it held; and ``fields``, how many
    fields of the entry it stands for (the pair ``...`` stands for all those not kept)."""

    size: int
    fields: int

    def __new__(cls, head: bytes, size: int, fields: int = 1) -> Unread:
        value = super().__new__(cls, head)
        value.size, value.fields = size, fields
        return value


def _size(value: bytes | str) -> int:
    return value.size if isinstance(value, Unread) else len(value)


def entry_size(fields: dict[bytes, bytes] | dict[str, str]) -> int:
    """The bytes an entry's fields hold (their lengths only: nothing is decoded)."""
    return sum(_size(k) + _size(v) for k, v in fields.items())


def _field_count(fields: dict[bytes, bytes] | dict[str, str]) -> int:
    return sum(k.fields if isinstance(k, Unread) else 1 for k in fields)


class Fields(dict):  # type: ignore[type-arg]
    """An entry's fields as a dict, as redis-py gives them, and beside it every pair as
    Redis holds them when a field is there more than once (``XADD s * id a id b``): a
    dict keeps the last, and which one the producer meant is then a guess."""

    __slots__ = ("pairs",)

    def __init__(self, flat: list[Any] | None = None) -> None:
        flat = flat or []
        super().__init__(zip(flat[::2], flat[1::2], strict=False))
        self.pairs: tuple[tuple[Any, Any], ...] = ()
        if 2 * len(self) < len(flat):
            self.pairs = tuple(zip(flat[::2], flat[1::2], strict=False))


_READ = ("id", "ids", *FIELDS)
_misnamed = misnamed_by(("id", "ids"))


def _named_twice(fields: Mapping[Any, Any]) -> str | None:
    """Why an entry naming a field it is read for more than once is refused, else None."""
    pairs = getattr(fields, "pairs", ())
    if not pairs:
        return None
    return named_twice([_text(k) for k, _ in pairs], _READ, "Redis keeps each, a reader the last")


@dataclass(frozen=True, slots=True)
class _Unlisted:
    """An ``ids`` value of an entry refused for a field named twice that is no JSON list:
    whatever ids it names, it is one rejection with ``reason`` (every value an entry names
    gets an outcome)."""

    text: str
    reason: str


def decode_entry(entry_id: str, fields: dict[bytes, bytes] | dict[str, str]) -> Message:
    """Read the ids out of one entry; never raises (a bad entry says why in ``problem``).

    An entry larger than ``MAX_ENTRY_BYTES`` is refused before anything parses it. An
    entry naming ``id``, ``ids`` or a place field twice (:class:`Fields`) is refused, every
    id it names, in any of them, a rejection with the reason."""
    payload = payload_text(fields)
    size = entry_size(fields)
    if size > MAX_ENTRY_BYTES:
        problem = f"entry holds {size} bytes; at most {MAX_ENTRY_BYTES}"
        return Message(entry_id, (), problem=problem, payload=payload)
    twice = _named_twice(fields)
    values = {_text(k): v for k, v in fields.items()}
    every = getattr(fields, "pairs", ()) if twice else ()  # each time a field is there
    pairs = [(_text(k), v) for k, v in every] if every else list(values.items())
    raw: list[object] = []
    for name, value in pairs:
        if name == "id":
            raw.append(_text(value))
        elif name == "ids":
            try:
                listed = orjson.loads(value)
            except orjson.JSONDecodeError:
                if twice:  # refused for the field named twice: the value is rejected whole
                    raw.append(_Unlisted(_text(value), "ids is not valid JSON"))
                    continue
                return Message(entry_id, (), problem="ids is not valid JSON", payload=payload)
            if not isinstance(listed, list):
                if twice:
                    raw.append(_Unlisted(_text(value), "ids is not a JSON list"))
                    continue
                return Message(entry_id, (), problem="ids is not a JSON list", payload=payload)
            raw.extend(listed)
    if "id" not in values and "ids" not in values:
        return Message(entry_id, (), problem="entry has neither id nor ids", payload=payload)
    if not raw and twice is None:  # a producer's bug, which an ack would hide
        return Message(entry_id, (), problem="entry names no ids", payload=payload)
    if len(raw) > MAX_IDS_PER_ENTRY:
        problem = f"entry names {len(raw)} ids; at most {MAX_IDS_PER_ENTRY}"
        return Message(entry_id, (), problem=problem, payload=payload)
    named = twice if twice is not None else _address(values)
    ids: dict[str, None] = {}
    rejections: dict[str, Rejection] = {}  # by the value named: its first position
    for position, value in enumerate(raw, start=1):
        if isinstance(value, _Unlisted):
            rejections.setdefault(value.text, Rejection(value.text, position, value.reason))
            continue
        if not isinstance(value, str):
            reason = f"not a string but {type(value).__name__}"
            text = orjson.dumps(value).decode()
            rejections.setdefault(text, Rejection(text, position, reason))
            continue
        checked = validate(value, position)
        if isinstance(checked, Candidate):
            ids.setdefault(checked.job_id)
        else:
            rejections.setdefault(checked.raw, checked)
    invalid = tuple(rejections.values())
    if isinstance(named, str):  # its ids end rejected with the rule, as a line's would
        return _refused(Message(entry_id, tuple(ids), invalid, payload=payload), named)
    return Message(entry_id, tuple(ids), invalid, payload=payload, address=named)


def _address(values: Mapping[str, bytes | str]) -> Address | str | None:
    """The place an entry's ``project_id``/``region``/``endpoint`` fields name (None: none),
    or why one is refused (the rule it breaks, as for an input line)."""
    wrong = _misnamed(values)
    if wrong is not None:
        return escape(wrong, 200)
    given: dict[str, str | None] = {}
    for name in FIELDS:
        value = values.get(name)
        if value is not None:
            text = _text(value)
            if len(text) > 512:  # the rules allow far less; escape keeps the reason short
                return f"{name} is {len(text)} characters long"
            given[name] = text
    if not any(given.values()):
        return None
    found = address(given)
    if isinstance(found, str):
        return escape(found, 200)
    return found


ONE_PROJECT = "names a project, region or endpoint, and this service sends to one project only"


def aimed(message: Message, targets: Targets | None, found: Target | str | None = None) -> Message:
    """``message`` with the target of the place it names, or, when serve may not send
    there (a project outside the allowed ones, a region named without its project id that
    IAM did not give), refused: its ids become rejections with the reason and it is
    dead-lettered on ack. ``found``: what the place was resolved to already (a look-up)."""
    if message.problem is not None or (message.address is None and targets is None):
        return message
    if targets is None:
        return _refused(message, ONE_PROJECT)
    # An entry naming nothing is the default's, held to allowed_projects as well: a list
    # that leaves out the default project refuses it too.
    if found is None:
        found = targets.of(message.address or Address())
    if isinstance(found, Target):
        return replace(message, target=None if found == targets.default else found)
    return _refused(message, found)


def _refused(message: Message, found: str) -> Message:
    refusals = tuple(Rejection(job_id, n, found) for n, job_id in enumerate(message.ids, 1))
    return replace(message, ids=(), rejections=(*message.rejections, *refusals),
                   problem=found, refused=True)  # fmt: skip
