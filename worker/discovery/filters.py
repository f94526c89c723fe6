"""Which jobs a discovery selects: durations, cut-offs and filters. Pure: no clock, no I/O.

A filter set is split in two. The server-side part (``status``, ``type``, ``name``, ``id``)
becomes the list calls' queries, so the server sends less (one query per status or type
word: the server matches one value, exactly); the client-side part (a name glob or regex,
an age window on ``create_at`` or ``update_at``, a user name) is applied to each record.
:meth:`Filters.mismatch` re-checks *every* filter, the server-side ones included (statuses
and types without regard to case, as protection compares them; name and id exactly),
because the API documents neither how it matches ``name`` nor whether it honours every
parameter: a record is selected only when we have seen for ourselves that it matches.

Age windows are stored as absolute instants (``older_than`` is "created before this UTC
time"), computed once from the duration the user typed and the time of discovery. A plan
therefore means the same thing when it is applied hours later, and a job that was touched in
the meantime (``update_at`` moved past the cut-off) stops matching instead of the cut-off
sliding along with the clock.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from worker.types import JOB_ID_RE, JobRecord, iso

TimeField = Literal["create_at", "update_at"]
TIME_FIELDS: tuple[TimeField, ...] = ("create_at", "update_at")

_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_RE = re.compile(r"(?:(\d{1,9})([wdhms]))+")
_PART_RE = re.compile(r"(\d{1,9})([wdhms])")
_REGEX_LIMIT = 512
PLAUSIBLE_SINCE = datetime(2010, 1, 1, tzinfo=UTC)
"""No DevServer job was made before this (ModelArts dates from 2018): a job time before it is
a time the API got wrong (0, or seconds read as milliseconds) and matches no age window."""
MAX_SPAN_S = 100 * 366 * 86400
"""The longest duration taken: longer ones overflow date arithmetic, and mean nothing here."""
SERVER_FIELDS = ("id", "name", "type", "status")


FILTER_DESTS = ("filter_status", "filter_type", "filter_name", "filter_id", "name_glob",
                "name_regex", "user_name", "older_than", "newer_than", "all")  # fmt: skip
"""The command line's names (argparse ``dest``) of discover's filter flags, ``--all`` last."""


def filters_given(values: Mapping[str, object]) -> bool:
    """Whether any of discover's filter flags (or ``--all``) is among ``values``."""
    return any(values.get(name) not in (None, False) for name in FILTER_DESTS)


_UNIT_WORDS_RE = re.compile(r"(?:\d+[a-zA-Z])+")
"""Numbers each with a unit, known or not: what a duration with a month or a year looks like."""


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``1d12h``, ``90m``, ``2w``, ``45s``: a positive span of time.

    Units: w(eeks), d(ays), h(ours), m(inutes), s(econds). Months and years are refused on
    purpose: their length depends on the calendar, and a deletion filter must not.
    """
    value = text.strip()
    if _UNIT_WORDS_RE.fullmatch(value) and ("M" in value or "Y" in value.upper()):
        # "6M" is six months to some and six minutes to others: neither is guessed.
        raise ValueError(
            "not a duration: months and years are not units (use d or w, and a lower-case m "
            "for minutes)"
        )
    value = value.lower()
    if not _DURATION_RE.fullmatch(value):
        raise ValueError("not a duration (use a number and a unit w, d, h, m or s, e.g. 30d, 12h)")
    seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART_RE.findall(value))
    if seconds <= 0:
        raise ValueError(f"a duration must be more than 0, not {value}")
    if seconds > MAX_SPAN_S:
        raise ValueError(f"a duration of {value} is longer than 100 years")
    return timedelta(seconds=seconds)


def parse_instant(text: str, now: datetime) -> datetime:
    """A cut-off: a duration before ``now`` (``30d``), or an ISO-8601 date or time.

    A date or a time without a zone is taken as UTC, so the same words mean the same instant
    on every machine.
    """
    value = text.strip()
    if value and value[0].isdigit() and value[-1].lower() in _UNITS and "-" not in value:
        return now - parse_duration(value)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            "not a duration or an ISO-8601 date (e.g. 30d, 12h, 2026-01-31, 2026-01-31T12:00:00Z)"
        ) from None
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the first instant there is
        raise ValueError(f"{value} is out of range: no date that can be compared") from None


class FilterError(ValueError):
    """A filter that cannot be used. Its message names the filters it is about as fields (as a
    plan stores them); :meth:`naming` says it with other names, as the user typed them."""

    def __init__(self, template: str, *fields: str, detail: str = "") -> None:
        """``template``: the message, ``{}`` where a field is named, ``{detail}`` where the
        user's value (or what was wrong with it) goes, never read as a template itself."""
        self._template, self._fields, self._detail = template, fields, detail
        super().__init__(self.naming(lambda field: field))

    def naming(self, name: Callable[[str], str]) -> str:
        """The message, each field called ``name(field)``."""
        return self._template.format(*map(name, self._fields), detail=self._detail)


def _nonblank(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not value.strip():
        raise FilterError("{} must not be blank", what)
    return value


Words = tuple[str, ...]


def any_of(value: str | Iterable[str] | None, what: str) -> Words | None:
    """``FINISHED``, ``finished,failed`` or ``["FINISHED", "failed"]``: the words, upper case,
    stripped, each once, in the order given; ``None`` for nothing given."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else [p for v in value for p in v.split(",")]
    words = tuple(dict.fromkeys(word.strip().upper() for word in parts if word.strip()))
    if not words:
        raise FilterError("{} must not be blank", what)
    for word in words:
        if not _WORD_RE.fullmatch(word):
            noun = f"a job {what} such as FINISHED or COMMON"
            raise FilterError("{} {detail} is not " + noun, what, detail=repr(word))
    return words


_WORD_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


@dataclass(frozen=True, slots=True)
class Filters:
    """One discovery's filters. ``None`` means "not filtered on".

    ``status`` and ``type`` are sets of words, any of which matches, compared without regard
    to case (``finished,failed``); given as one string they are split on commas.
    """

    status: Words | str | None = None  # a string is split on commas: a tuple once made
    type: Words | str | None = None
    name: str | None = None
    id: str | None = None
    name_glob: str | None = None
    name_regex: str | None = None
    user_name: str | None = None
    older_than: datetime | None = None
    newer_than: datetime | None = None
    time_field: TimeField = "create_at"

    def __post_init__(self) -> None:
        for field_name in ("status", "type"):
            words = any_of(getattr(self, field_name), field_name)
            object.__setattr__(self, field_name, words)
        for field_name in ("name", "name_glob", "name_regex", "user_name"):
            _nonblank(getattr(self, field_name), field_name)
        if self.id is not None and not JOB_ID_RE.fullmatch(self.id):
            raise FilterError("{} must be 1 to 64 letters, digits, '-' and '_'", "id")
        if self.name_regex is not None:
            if len(self.name_regex) > _REGEX_LIMIT:
                raise FilterError(f"{{}} is longer than {_REGEX_LIMIT} characters", "name_regex")
            try:
                re.compile(self.name_regex)
            except re.error as exc:
                raise FilterError(
                    "{} is not a regular expression: {detail}", "name_regex", detail=str(exc)
                ) from None
        if self.time_field not in TIME_FIELDS:
            raise FilterError(f"{{}} must be one of {', '.join(TIME_FIELDS)}", "time_field")
        for field_name in ("older_than", "newer_than"):
            value = getattr(self, field_name)
            if value is not None and value.tzinfo is None:
                raise FilterError("{} must carry a time zone", field_name)
        if (
            self.older_than is not None
            and self.newer_than is not None
            and self.newer_than >= self.older_than
        ):
            raise FilterError(
                "{} must be before {}: no job can be both (the window is empty)",
                "newer_than", "older_than",
            )  # fmt: skip

    @property
    def empty(self) -> bool:
        """No filter at all: every job matches. ``discover`` refuses this without ``--all``."""
        return all(getattr(self, name) is None for name in _FILTER_FIELDS)

    def server_queries(self) -> list[dict[str, str]]:
        """The list calls' queries: the filters the server can apply itself. The server
        matches one value exactly, so a status or type of several words is one query per
        word (per pair, for both), each in the upper case the API uses."""
        fixed = {key: value for key in ("name", "id") if (value := getattr(self, key))}
        queries = [fixed]
        for key in ("status", "type"):
            words = getattr(self, key)
            if words:
                queries = [{**query, key: word} for query in queries for word in words]
        return queries

    def mismatch(self, record: JobRecord) -> str | None:
        """Why ``record`` does not match, in words; ``None`` when it matches every filter.

        A record that lacks a field a filter needs does not match: unknown is not a yes.
        """
        for key in ("status", "type"):
            wanted = getattr(self, key)
            have = getattr(record, key)
            if wanted is not None and (have or "").strip().upper() not in wanted:
                return f"{key} is {have!r}, not {_either(wanted)}"
        for key in ("name", "id"):
            wanted = getattr(self, key)
            have = getattr(record, key)
            if wanted is not None and have != wanted:
                return f"{key} is {have!r}, not {wanted!r}"
        if self.user_name is not None and record.user_name != self.user_name:
            return f"user_name is {record.user_name!r}, not {self.user_name!r}"
        name = record.name
        if self.name_glob is not None and (
            name is None or not fnmatch.fnmatchcase(name, self.name_glob)
        ):
            return f"name {name!r} does not match the glob {self.name_glob!r}"
        if self.name_regex is not None and (
            name is None or re.search(self.name_regex, name) is None
        ):
            return f"name {name!r} does not match the regex {self.name_regex!r}"
        if self.older_than is not None or self.newer_than is not None:
            when = getattr(record, self.time_field)
            if when is None:
                return f"{self.time_field} is unknown"
            if when < PLAUSIBLE_SINCE:
                # 0, or seconds read as milliseconds: a broken time, not an old job.
                return f"{self.time_field} {iso(when)} is not a plausible job time"
            if self.older_than is not None and not when < self.older_than:
                return f"{self.time_field} {iso(when)} is not before {iso(self.older_than)}"
            if self.newer_than is not None and not when > self.newer_than:
                return f"{self.time_field} {iso(when)} is not after {iso(self.newer_than)}"
        return None

    def matches(self, record: JobRecord) -> bool:
        return self.mismatch(record) is None

    def to_json(self) -> dict[str, Any]:
        """Every field, times as ISO-8601 UTC, words as lists: what a plan records."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _FILTER_FIELDS}
        for key in ("status", "type"):
            out[key] = None if out[key] is None else list(out[key])
        out["older_than"] = iso(self.older_than)
        out["newer_than"] = iso(self.newer_than)
        out["time_field"] = self.time_field
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Filters:
        """The inverse of :meth:`to_json`; ``ValueError`` on anything unexpected."""
        known = set(_FILTER_FIELDS) | {"time_field"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown filters: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name in _FILTER_FIELDS:
            value = data.get(name)
            if name in ("status", "type") and isinstance(value, list):
                if not all(isinstance(word, str) for word in value):
                    raise ValueError(f"filter {name} is not a list of words")
                value = tuple(value)
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"filter {name} is not a string")
            values[name] = value
        for name in ("older_than", "newer_than"):
            if values[name] is not None:
                values[name] = datetime.fromisoformat(values[name].replace("Z", "+00:00"))
        time_field = data.get("time_field", "create_at")
        if time_field not in TIME_FIELDS:
            raise ValueError("time_field must be create_at or update_at")
        return cls(**values, time_field=time_field)


_FILTER_FIELDS = (
    "status", "type", "name", "id", "name_glob", "name_regex", "user_name", "older_than",
    "newer_than",
)  # fmt: skip


def _either(words: Words) -> str:
    return " or ".join(repr(word) for word in words)


def matched_fields(record: JobRecord) -> dict[str, Any]:
    """What a plan keeps of a job: the fields filters look at, times as ISO-8601 UTC."""
    return {
        "id": record.id,
        "type": record.type,
        "status": record.status,
        "name": record.name,
        "user_name": record.user_name,
        "create_at": iso(record.create_at),
        "update_at": iso(record.update_at),
    }
