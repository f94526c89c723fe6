"""The Redis Streams calls of one consumer in one group: read, reclaim, ack, dead-letter.

Only Redis I/O lives here; what to do with an entry is the service's business. Entries come
back as ``(entry_id, fields)``, ``fields`` being ``None`` for an entry that was trimmed from
the stream while it sat pending (nothing left to do but acknowledge it).

Acknowledging is one ``MULTI`` transaction and dead-lettering one script (``_BURY``), so a
crash between the steps cannot leave an entry both dead-lettered and pending, nor a
dead-letter key of another type an entry acknowledged with no dead letter.

Before each DELETE the ids it carries are noted by entry (``{stream}:sending:{entry}``,
``_SEND``, one round trip, which notes nothing when an entry is no longer pending under
this consumer: another replica took it over while this one stalled), and the ids an
answer found not gone by us are struck off that note in the round trip that writes their
outcomes; acknowledging or dead-lettering an entry deletes its note. A replica killed
with a DELETE on the wire thus leaves behind which ids it may have removed, for the
entry's next delivery (:meth:`StreamConsumer.redelivery`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import anyio
import orjson
import redis.asyncio as aioredis
import redis.exceptions

from worker.errors import ApiError, ConfigError, NotAStream
from worker.input.intake import escape
from worker.pacing.shared import FleetKeys
from worker.service.inflight import Finished, Released
from worker.service.layout import SENDING_TTL_S, Retention, StreamLayout
from worker.service.layout import Fields as EntryFields
from worker.service.retention import kept_position
from worker.types import Outcome, Result, target_fields

Entry = tuple[str, dict[bytes, bytes] | None]
Fields = dict[Any, Any]


async def ping(client: aioredis.Redis) -> None:
    """``PING``. A Redis that refuses our settings (the user name or password, a database it
    does not have) is ``ConfigError`` (78), and so is a ``rediss://`` URL naming a Redis
    that speaks no TLS (:func:`_plain_redis`), said as soon as a handshake taking longer than
    ``PLAIN_AFTER_S`` finds a plain Redis there; one that cannot be reached raises one of
    :data:`REDIS_ERRORS`."""
    try:
        plain = await _answer(client)
    except redis.exceptions.AuthenticationError:  # before the caller's: a ConnectionError
        raise ConfigError("redis_url: Redis refused the user name or password") from None
    except redis.exceptions.ResponseError as exc:  # e.g. a database out of range
        raise ConfigError(f"redis_url: Redis refused it: {exc}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        where = _tls_place(client)
        if where is not None and await _plain_redis(*where):
            raise _no_tls(*where) from None
        raise
    if plain is not None:
        raise _no_tls(*plain) from None


def _no_tls(host: str, port: int) -> ConfigError:
    return ConfigError(
        f"redis_url: rediss:// asks for TLS, but the Redis at {host}:{port} speaks without "
        "TLS, so the TLS handshake cannot succeed: use redis:// for it, or turn TLS on in "
        "that Redis"
    )


PLAIN_AFTER_S = 1.0
"""How long a TLS handshake may take before a plain Redis is looked for at its address. A
Redis that speaks no TLS never answers one (it waits for the end of a line the handshake
does not send), so nothing comes back to tell until the connect timeout, 5 s."""


async def _answer(client: aioredis.Redis) -> tuple[str, int] | None:
    """``PING``; over TLS, the host and port instead when the handshake is still waiting
    after ``PLAIN_AFTER_S`` and a plain Redis answers there (the ``PING`` given up)."""
    where = _tls_place(client)
    if where is None:
        await client.ping()
        return None
    plain = False
    failed: Exception | None = None
    async with anyio.create_task_group() as group:

        async def look() -> None:
            nonlocal plain
            await anyio.sleep(PLAIN_AFTER_S)
            plain = await _plain_redis(*where)
            if plain:  # the handshake would only wait out its timeout
                group.cancel_scope.cancel()

        group.start_soon(look)
        try:
            await client.ping()
        except (redis.exceptions.RedisError, OSError) as exc:  # raised out of the group
            failed = exc
        group.cancel_scope.cancel()
    if plain:
        return where
    if failed is not None:
        raise failed
    return None


def _tls_place(client: aioredis.Redis) -> tuple[str, int] | None:
    """The host and port a client connects to over TLS (``rediss://``), else None."""
    pool = client.connection_pool
    if not issubclass(pool.connection_class, aioredis.SSLConnection):
        return None
    kwargs = pool.connection_kwargs
    return str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379))


PLAIN_PROBE_S = 2.0
"""How long the check that a TLS peer is a plain Redis waits for its answer."""


async def _plain_redis(host: str, port: int) -> bool:
    """Does a plain Redis answer at ``host:port`` (a RESP reply to an inline ``PING``,
    ``+PONG`` or an error such as ``-NOAUTH``)? Asked once a TLS connection there failed,
    or its handshake is slow: a TLS handshake to a plain Redis waits for an answer that
    never comes."""
    with anyio.move_on_after(PLAIN_PROBE_S):
        try:
            async with await anyio.connect_tcp(host, port) as stream:
                await stream.send(b"PING\r\n")
                reply = await stream.receive(64)
        except (OSError, anyio.EndOfStream, anyio.BrokenResourceError):
            return False
        return reply[:1] in (b"+", b"-")
    return False


async def eviction_policy(client: aioredis.Redis) -> str | None:
    """Redis's ``maxmemory-policy`` (``INFO memory``), or ``None`` when it does not say (a
    managed Redis or an ACL may refuse ``INFO``: the check is a courtesy)."""
    try:
        info: Any = await client.info("memory")
    except redis.exceptions.RedisError:
        return None
    policy = info.get("maxmemory_policy") if isinstance(info, dict) else None
    return None if policy is None else _id(policy)


def not_permitted(stream: str, exc: BaseException) -> ConfigError:
    """The error for a Redis ACL user without a right the worker needs (``NOPERM``): a
    setting to fix, exit 78. Redis's message names the command or the key, never a secret."""
    return ConfigError(
        f"stream {stream!r}: the Redis user may not do what the worker needs ({exc}); "
        "give it the ACL in docs/security.md"
    )


def not_a_stream(stream: str) -> NotAStream:
    """The error for a ``--stream`` naming a Redis key that holds something else
    (``WRONGTYPE``): a setting to fix, exit 78."""
    return NotAStream(f"stream {stream!r}: that Redis key holds another type, not a stream")


class Settled(Enum):
    """How settling an entry ended: acknowledged (or dead-lettered), kept pending for its
    failed ids, or left to the replica that took it over (nothing written)."""

    ACKED = "acked"
    KEPT = "kept"
    TAKEN = "taken"


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """``XINFO GROUPS`` for our group: entries not yet read (``lag``) and not yet acked."""

    lag: int | None
    pending: int


def _id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _order(entry_id: str) -> tuple[int, int]:
    """A stream entry id as what it sorts by (milliseconds, sequence)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _entries(raw: Any) -> list[Entry]:
    return [(_id(entry_id), _kept(fields)) for entry_id, fields in raw or ()]


def _kept(fields: Any) -> dict[bytes, bytes] | None:
    """An entry's fields as read (:class:`Fields`, which says of a field there twice), or
    None for an entry trimmed from the stream."""
    if not fields:
        return None
    return fields if isinstance(fields, dict) else dict(fields)


def _stream_list(response: Any) -> list[tuple[Any, Fields | None]] | None:
    """redis-py's ``parse_stream_list``, but each entry's fields a :class:`Fields`: a dict
    would keep the last of a field named twice and say nothing."""
    if response is None:
        return None
    return [(r[0], EntryFields(r[1])) if r is not None else (None, None) for r in response]


def _xreadgroup(response: Any, **options: Any) -> list[list[Any]]:
    if not response:
        return []
    streams = response.items() if isinstance(response, dict) else response  # RESP3, RESP2
    return [[stream, _stream_list(entries)] for stream, entries in streams]


def _xautoclaim(response: Any, **options: Any) -> Any:
    if options.get("parse_justid", False):
        return response[1]
    response[1] = _stream_list(response[1])
    return response


def _read_fields_whole(reader: aioredis.Redis) -> None:
    """Have ``reader``'s replies of entries keep every field (:class:`Fields`)."""
    reader.set_response_callback("XRANGE", lambda response, **_: _stream_list(response))
    reader.set_response_callback("XREADGROUP", _xreadgroup)
    reader.set_response_callback("XAUTOCLAIM", _xautoclaim)


def outcome_fields(result: Result, entries: Sequence[str]) -> dict[str, str]:
    """One entry of the outcomes stream (absent values as empty strings: streams hold text);
    ``project_id`` and ``region`` when its entry named a target other than the default."""
    return {
        "job_id": result.job_id
        if result.outcome is not Outcome.REJECTED
        else escape(result.job_id),
        "outcome": result.outcome.value,
        "batch_id": result.batch_id or "",
        "http_status": "" if result.http_status is None else str(result.http_status),
        "error_code": result.error_code or "",
        "error_msg": result.error_msg or result.reason or "",
        "request_id": result.request_id or "",
        "entry": ",".join(entries),
        **{k: v or "" for k, v in target_fields(result.target).items()},
    }


def last_error(failures: Sequence[Result], done: Sequence[str] = ()) -> str:
    """What the dead-letter stream keeps of why an entry kept failing; ``done`` names the
    entry's ids that have their (terminal) outcome already, not to be sent again when the
    entry is delivered again for its failed ones."""
    last = failures[-1]
    return _error_text([f.job_id for f in failures], last.http_status, last.error_code,
                       last.error_msg, last.request_id, done)  # fmt: skip


def settled_ids(error: str, key: str = "done") -> frozenset[str]:
    """The ``done`` ids a kept entry's last error names (none when it names none); with
    ``key="unsure"``, those sent without a readable answer before the API gave out."""
    try:
        said = orjson.loads(error) if error else {}
    except orjson.JSONDecodeError:
        return frozenset()
    listed = said.get(key) if isinstance(said, dict) else None
    if not isinstance(listed, list):
        return frozenset()
    return frozenset(i for i in listed if isinstance(i, str))


def error_json(
    ids: Sequence[str],
    error: ApiError,
    message: str,
    done: Sequence[str] = (),
    unsure: Sequence[str] = (),
) -> str:
    """The same, for ids the API was unavailable for (the error its retries ended on);
    ``unsure``: those of them sent in an attempt whose answer was lost."""
    return _error_text(list(ids), error.http_status, error.error_code,
                       error.error_msg or message, error.request_id, done, unsure)  # fmt: skip


def handed_back_error(held: Released, failed: Sequence[str] = (), done: Sequence[str] = ()) -> str:
    """The last error kept for an entry whose ids were handed back (``held``): why, which
    ids (with ``failed``, those of its ids that failed and are to be tried again) and which
    are done (``held.done`` and ``done``), so its next delivery sends only the others."""
    why = held.why
    error = why.error if why is not None else ApiError("handed back without an outcome")
    text = why.text if why is not None else str(error)
    unsure = why.unsure if why is not None else frozenset()
    return error_json([*held.ids, *failed], error, text, [*held.done, *done],
                      [i for i in held.ids if i in unsure])  # fmt: skip


def _error_text(
    ids: list[str],
    http_status: int | None,
    error_code: str | None,
    error_msg: str | None,
    request_id: str | None,
    done: Sequence[str] = (),
    unsure: Sequence[str] = (),
) -> str:
    said: dict[str, Any] = {"ids": ids, "http_status": http_status, "error_code": error_code,
                            "error_msg": error_msg, "request_id": request_id}  # fmt: skip
    if done:
        said["done"] = list(done)
    if unsure:
        said["unsure"] = list(unsure)
    return orjson.dumps(said).decode()


_MINE = """
local function id_of(entry)
  local ms, seq = string.match(entry, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function last_delivered(stream, group)
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if groups['err'] then return nil end
  for _, g in ipairs(groups) do
    local fields = {}
    for j = 1, #g, 2 do fields[g[j]] = g[j + 1] end
    if fields['name'] == group then return fields['last-delivered-id'] end
  end
  return nil
end
local function taken(stream, group, consumer, entry, delivered)
  if not delivered then return false end
  local row = redis.call('XPENDING', stream, group, entry, entry, 1)
  if #row > 0 then return row[1][2] ~= consumer end
  local ms, seq = id_of(entry)
  local dms, dseq = id_of(delivered)
  return ms < dms or (ms == dms and seq <= dseq)
end
"""
"""Whether an entry was taken over (``taken``): pending under another consumer, or
delivered by the group and pending no more (acknowledged by the one that took it over).
An entry the group never delivered (the group or the stream was deleted and made again
below it), or no group at all (``last_delivered`` is nil), is nobody else's."""

_BURY = (
    _MINE
    + """
if taken(KEYS[1], ARGV[2], ARGV[3], ARGV[5], last_delivered(KEYS[1], ARGV[2])) then
  return 0
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[1], ARGV[2], ARGV[5])
redis.call('HDEL', KEYS[3], ARGV[5])
redis.call('DEL', KEYS[4])
return 1
"""
)
"""Dead-letter an entry and acknowledge it, unless it was taken over (``_MINE``: returns
0, nothing written; the taker settles it). A script, not a ``MULTI``: a transaction does
not roll back, so a dead-letter key of another type (``WRONGTYPE`` on the ``XADD``) left
the entry acknowledged with no dead letter; the script stops at the failing ``XADD``.
``KEYS``: the stream, the dead letters, the last errors, the entry's note of ids sent.
``ARGV``: the cap, the group, the consumer, then the dead letter's fields and values,
``entry`` first."""

_ACK = (
    _MINE
    + """
local delivered = last_delivered(KEYS[1], ARGV[1])
local lost = {}
for i = 3, #ARGV do
  local entry = ARGV[i]
  if taken(KEYS[1], ARGV[1], ARGV[2], entry, delivered) then
    lost[#lost + 1] = entry
  else
    redis.call('XACK', KEYS[1], ARGV[1], entry)
    redis.call('HDEL', KEYS[2], entry)
    redis.call('DEL', KEYS[i])
  end
end
return lost
"""
)
"""Acknowledge entries, each with its last error and its note of ids sent, except those
taken over (``_MINE``): a replica that stalled past ``reclaim_after`` and then heard back
must not acknowledge an entry its taker still works on (whose ids may yet fail and be
kept pending). Returns those left to their taker. ``KEYS``: the stream, the last errors,
then each entry's note; ``ARGV``: the group, the consumer, the entries."""

_WRITE = (
    _MINE
    + """
local delivered = last_delivered(KEYS[1], ARGV[1])
local n = tonumber(ARGV[6])
local mine = {}
local lost = {}
for i = 1, n do
  mine[i] = not taken(KEYS[1], ARGV[1], ARGV[2], ARGV[6 + i], delivered)
  if not mine[i] then lost[#lost + 1] = ARGV[6 + i] end
end
if ARGV[5] == '1' then redis.call('SET', KEYS[4], '1', 'EX', ARGV[4]) end
local at = 7 + 3 * n
while at <= #ARGV do
  local m = tonumber(ARGV[at])
  local ours = {}
  for j = 1, m do
    local i = tonumber(ARGV[at + j])
    if mine[i] then ours[#ours + 1] = ARGV[6 + i] end
  end
  at = at + m + 1
  local f = tonumber(ARGV[at])
  if m == 0 or #ours > 0 then
    local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*'}
    for j = 1, f do args[#args + 1] = ARGV[at + j] end
    for j = 7, #args, 2 do
      if m > 0 and args[j] == 'entry' then args[j + 1] = table.concat(ours, ',') end
    end
    redis.call(unpack(args))
  end
  at = at + f + 1
end
for i = 1, n do
  if mine[i] then
    local err = ARGV[6 + 2 * n + i]
    if err ~= '' then redis.call('HSET', KEYS[3], ARGV[6 + i], err) end
    local lines = ARGV[6 + n + i]
    local was = redis.call('GET', KEYS[4 + i])
    if lines ~= '' and (was or string.find('\\n' .. lines, '\\n=', 1, true)) then
      redis.call('SET', KEYS[4 + i], (was or '') .. lines, 'EX', ARGV[4])
    end
  end
end
return lost
"""
)
"""Write outcome rows, last errors and lines on the notes of ids sent, for the entries still
this consumer's only (``_MINE``): a replica that stalled past ``reclaim_after`` and then
heard back leaves the entries taken over to their taker, whose outcome counts (its own
answer, e.g. ``absent`` for a job the taker deleted, was written after the taker's and
was taken for the last word). A row naming several entries is written if any is ours,
naming those only. ``KEYS``: the stream, the outcomes, the last errors, the key saying
this write was applied (``written``), then each entry's note; ``ARGV``: the group, the
consumer, the outcomes' length cap, the time to live of notes and of ``written``, whether
to set it (``1``), the number of entries ``n``, the entries, their note lines, their last
errors (empty: none), then each row as the number of its entries, their indexes (from 1),
the number of its field names and values, and those. A note is made when a row is written
for an entry that has none (an id rejected at admission, never sent): its ``=id`` line is
what keeps a later delivery from writing the row again."""

_SEND = (
    _MINE
    + """
local delivered = last_delivered(KEYS[1], ARGV[2])
local n = #KEYS - 1
local lost = {}
for i = 1, n do
  local entry = ARGV[3 + i]
  if taken(KEYS[1], ARGV[2], ARGV[3], entry, delivered) then lost[#lost + 1] = entry end
end
if #lost > 0 then return lost end
for i = 1, n do
  local was = redis.call('GET', KEYS[1 + i])
  redis.call('SET', KEYS[1 + i], (was or '') .. ARGV[3 + n + i], 'EX', ARGV[1])
end
return lost
"""
)
"""Note ids about to be sent, unless an entry they are noted under was taken over
(``_MINE``); then nothing is noted, and those entries are returned (empty: the note is
written). ``KEYS``: the stream, then the entries' notes; ``ARGV``: the notes' time to live,
the group, the consumer, the entries' ids, then the lines for each note."""


def sent_ids(note: bytes | str | None) -> frozenset[str]:
    """The ids a note of ids sent still names: each ``+id`` line (``_SEND``) adds one, a
    later ``-id`` line (``_WRITE``) takes it off."""
    ids: set[str] = set()
    for line in _id(note or b"").splitlines():
        if line.startswith("+"):
            ids.add(line[1:])
        elif line.startswith("-"):
            ids.discard(line[1:])
    return frozenset(ids)


def _digest(
    rows: Sequence[Mapping[str, str]],
    unmark: Mapping[str, Sequence[str]] | None,
    errors: Mapping[str, str] | None,
) -> str:
    """A name for one write of outcome rows (with its strikes and last errors)."""
    said = orjson.dumps([list(rows), unmark or {}, errors or {}], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(said, digest_size=16).hexdigest()


def noted_done(note: bytes | str | None) -> frozenset[str]:
    """The ids a note of ids sent names as having their outcome written (``=id`` lines,
    added in the transaction that writes the outcome rows): a later delivery of the entry,
    after its holder died before acknowledging it, does not send them again."""
    return frozenset(line[1:] for line in _id(note or b"").splitlines() if line[:1] == "=")


def _done_mark(row: Mapping[str, str]) -> str:
    """What the note says of a row written (after its ``=``): the id, or for an invalid
    value's ``rejected`` row ``!`` and its text, which no id can be: the rejected ``1`` of
    ``[1, "1"]`` marked the id ``1`` done, and a later delivery never sent it."""
    return f"!{row['job_id']}" if row["outcome"] == Outcome.REJECTED.value else row["job_id"]


def _lines(sign: str, ids: Sequence[str]) -> str:
    return "".join(f"{sign}{job_id}\n" for job_id in ids)


_LEAVE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


@dataclass(frozen=True, slots=True)
class GroupMade:
    """What :meth:`StreamConsumer.ensure_group` found."""

    position: str | None
    """The kept position the group was created at; None: at ``0``, or it was there."""
    kept: bool
    """Whether a position was kept for the group (retention's pass keeps one once the
    group has read): none for a group lost mid-run means Redis lost the queue's keys."""


class StreamConsumer:
    """``consumer`` in ``layout.group``, reading ``layout.stream``. The calls that return
    entries go over ``reader`` (in ``serve`` one parsing with ``worker.service.bounded``'s
    ``BoundedParser``, so a huge entry costs no more memory than the size limit), the others
    over ``client``."""

    def __init__(
        self,
        client: aioredis.Redis,
        layout: StreamLayout,
        consumer: str,
        *,
        reader: aioredis.Redis | None = None,
        retention: Retention | None = None,
    ) -> None:
        self._r = client
        self.retention = retention if retention is not None else Retention()
        self._reader = reader if reader is not None else client
        _read_fields_whole(self._reader)
        self.layout = layout
        self.consumer = consumer
        self.acked = 0
        self.dead_lettered = 0
        self._leave = client.register_script(_LEAVE)
        self._bury = client.register_script(_BURY)
        self._send = client.register_script(_SEND)
        self._ack = client.register_script(_ACK)
        self._written: list[str] = []  # keys of writes known applied, to delete
        self._unsure: set[str] = set()  # tokens of writes whose reply was lost
        self._unsure_acks: set[str] = set()  # entries whose ack's reply was lost

    async def ensure_group(self) -> GroupMade:
        """Create the group (and the stream) if missing; an existing group is kept as it is.

        A group created again (it was destroyed, or Redis restored without it) starts at the
        position kept for it (``worker.service.retention``), not at ``0``: it reads again what
        was pending or unread when it was lost, not every entry ever written. Says that
        position when it was used, and whether one was kept at all (none, for a group that
        read before: Redis lost the queue's keys with it).

        A position past the stream's last entry was kept for another stream (this one was
        deleted and made again, or lost with a restore; retention never trims above it):
        entries there may lie below it (a Redis clock behind the old one), so the group
        starts at ``0`` instead of skipping them unread."""
        try:
            position = await kept_position(self._r, self.layout)
        except redis.exceptions.ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            key = self.layout.position
            raise NotAStream(f"{key!r}: that Redis key holds another type, not a hash") from None
        kept = position is not None
        try:
            if position is not None:
                last: Any = await self._r.xrevrange(self.layout.stream, count=1)
                if not last or _order(_id(last[0][0])) < _order(position):
                    position = None
            await self._r.xgroup_create(
                self.layout.stream, self.layout.group, id=position or "0", mkstream=True
            )
        except redis.exceptions.ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                raise not_a_stream(self.layout.stream) from None
            if "BUSYGROUP" not in str(exc):
                raise
            return GroupMade(None, kept)
        return GroupMade(position, kept)

    async def ping(self) -> object:
        return await self._r.ping()

    async def read_own(self, after: str, count: int) -> tuple[list[Entry], dict[str, int]]:
        """Our own pending entries after ``after`` (``"-"`` from the start) *without counting
        a delivery*, with the deliveries each has had: ``XPENDING`` for this consumer, then
        ``XRANGE`` for the fields, then ``XCLAIM ... JUSTID`` (which does not count one
        either) to reset their idle time, so no reclaim takes them while they are re-sent.

        For entries read under this consumer name before: by this process in an earlier
        round (a pause on refused credentials ended it), or by the process before a restart.
        Reading them again with ``XREADGROUP ... 0`` would count a delivery per pause or per
        restart, and a crash-looping pod or a long outage would dead-letter ids never tried.
        """
        start = after if after == "-" else f"({after}"
        pending: Any = await self._r.xpending_range(
            self.layout.stream, self.layout.group, start, "+", count, consumername=self.consumer
        )
        if not pending:
            return [], {}
        ids = [_id(p["message_id"]) for p in pending]
        # At least 1: an entry this name handed over before a restart gave its delivery back.
        counts = {_id(p["message_id"]): max(1, int(p["times_delivered"])) for p in pending}
        async with self._reader.pipeline(transaction=False) as pipe:  # entries: bounded
            for entry_id in ids:
                pipe.xrange(self.layout.stream, entry_id, entry_id, count=1)
            replies = await pipe.execute()
        entries: list[Entry] = [
            (entry_id, _kept(reply[0][1]) if reply else None)
            for entry_id, reply in zip(ids, replies, strict=True)
        ]
        await self._r.xclaim(
            self.layout.stream, self.layout.group, self.consumer, 0, list[Any](ids), justid=True
        )
        return entries, counts

    async def read_new(self, count: int, block_ms: int) -> list[Entry]:
        """Entries never delivered to anyone, waiting up to ``block_ms`` (at least 1) for some.

        This is the call a shutdown cancels. A connection cancelled mid-reply cannot be
        reused (the reply would answer the next command) and a pooled one may never make
        it back to its pool, so blocking reads go over ``reader``, a single-connection
        client, and a cancelled read closes that connection (it reconnects when next used).
        """
        try:
            reply: Any = await self._reader.xreadgroup(
                self.layout.group,
                self.consumer,
                {self.layout.stream: ">"},
                count=count,
                block=max(1, block_ms),
            )
        except BaseException:
            connection = self._reader.connection
            if connection is not None:
                with anyio.CancelScope(shield=True):
                    await connection.disconnect(nowait=True)
            raise
        return _entries(reply[0][1]) if reply else []

    async def reclaim(self, min_idle_ms: int, cursor: str, count: int) -> tuple[str, list[Entry]]:
        """``XAUTOCLAIM``: take over entries idle longer than ``min_idle_ms``, from anyone.

        Returns the cursor for the next call (``"0-0"`` once the whole list was scanned).
        Entries trimmed from the stream are dropped from the pending list by Redis itself.
        """
        reply = await self._reader.xautoclaim(  # entries: bounded
            self.layout.stream,
            self.layout.group,
            self.consumer,
            min_idle_time=min_idle_ms,
            start_id=cursor,
            count=count,
        )
        return _id(reply[0]), _entries(reply[1])

    async def keep_alive(self, entry_ids: Sequence[str]) -> int:
        """Reset the idle time of those of ``entry_ids`` this consumer still holds, so no
        replica's reclaim takes over work in progress. ``XCLAIM ... JUSTID`` does not count
        a delivery; the owner is checked first (``XPENDING``), so an entry another replica
        has taken over is left to it. Returns how many were refreshed."""
        pending = await self._pending(entry_ids)
        mine: list[Any] = [e for e, p in pending.items() if _id(p["consumer"]) == self.consumer]
        if mine:
            await self._r.xclaim(
                self.layout.stream, self.layout.group, self.consumer, 0, mine, justid=True
            )
        return len(mine)

    async def deliveries(self, entry_ids: Sequence[str]) -> dict[str, int]:
        """How many times each entry has been delivered (0: no longer pending)."""
        pending = await self._pending(entry_ids)
        return {e: int(pending[e]["times_delivered"]) if e in pending else 0 for e in entry_ids}

    async def _pending(self, entry_ids: Sequence[str]) -> dict[str, Any]:
        """``XPENDING`` of each entry still pending (owner, deliveries), one round trip."""
        if not entry_ids:
            return {}
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                for entry_id in entry_ids:
                    pipe.xpending_range(
                        self.layout.stream, self.layout.group, entry_id, entry_id, 1
                    )
                replies = await pipe.execute()
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            return {}  # the stream or the group was deleted: nothing is pending any more
        return {e: r[0] for e, r in zip(entry_ids, replies, strict=True) if r}

    async def redelivery(
        self, entry_ids: Sequence[str]
    ) -> tuple[dict[str, str], dict[str, frozenset[str]], dict[str, frozenset[str]]]:
        """What earlier deliveries left of entries delivered again, one round trip: their
        last errors (``{stream}:lasterror``), the ids each had on the wire when its
        holder stopped hearing back (``{stream}:sending:{entry}``), and the ids of it whose
        outcome is written already (``=id`` on the same note), by entry id."""
        if not entry_ids:
            return {}, {}, {}
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hmget(self.layout.last_error, list(entry_ids))
            pipe.mget([self.layout.sending(e) for e in entry_ids])
            errors, notes = await pipe.execute()
        kept = {e: _id(v) for e, v in zip(entry_ids, errors, strict=True) if v is not None}
        sent = {e: sent_ids(n) for e, n in zip(entry_ids, notes, strict=True) if n is not None}
        done = {e: noted_done(n) for e, n in zip(entry_ids, notes, strict=True) if n is not None}
        return (kept, {e: ids for e, ids in sent.items() if ids},
                {e: ids for e, ids in done.items() if ids})  # fmt: skip

    async def mark_sending(self, marks: Mapping[str, Sequence[str]]) -> frozenset[str]:
        """Note, by entry, the ids a DELETE is about to carry (``_SEND``, one round trip):
        if the process dies before their answer is recorded, the entry's next delivery
        knows them sent. Nothing is noted when an entry is no longer pending under this
        consumer (another replica took it over while this one stalled): those entries are
        returned, and the DELETE must not go out."""
        if not marks:
            return frozenset()
        lines = [_lines("+", ids) for ids in marks.values()]
        keys = [self.layout.stream, *(self.layout.sending(e) for e in marks)]
        args: list[str | int] = [SENDING_TTL_S, self.layout.group, self.consumer, *marks, *lines]
        lost: list[Any] = await self._send(keys=keys, args=args)
        return frozenset(_id(e) for e in lost)

    async def keep_errors(
        self, errors: Mapping[str, str], unmark: Mapping[str, Sequence[str]] | None = None
    ) -> frozenset[str]:
        """Remember why entries left pending did not finish (``{stream}:lasterror``), by
        entry id; ``unmark``: ids to strike off their notes of ids sent (not applied by us,
        as far as their answers said), in the same round trip: :meth:`write_outcomes` with
        no outcome to write, the one path for both (a second copy of it missed a fix).
        Returns the entries taken over, for which nothing was written."""
        return await self.write_outcomes((), unmark, errors)

    async def write_outcomes(
        self,
        rows: Sequence[dict[str, str]],
        unmark: Mapping[str, Sequence[str]] | None = None,
        errors: Mapping[str, str] | None = None,
    ) -> frozenset[str]:
        """Append to the outcomes stream, trimmed approximately to ``outcomes_max_len``;
        ``unmark``: ids whose answer said they were not gone by us, struck off their
        entries' notes of ids sent, in the same round trip; with ``errors``, keep those last
        errors (by entry id) too, all in one transaction, so an entry handed back never has
        outcomes written that its ids done do not name. Each row's id is marked done on
        its entries' notes (``=id``) in the same transaction: a replica killed before the
        entry is acknowledged leaves the next delivery the ids not to send and write again
        (else the id had two outcomes, the second ``absent`` or unconfirmed). Returns the
        entries taken over by another replica (``_WRITE``), for which nothing was written;
        none when a retry finds its rows written already."""
        if not rows and not unmark and not errors:
            return frozenset()
        done: dict[str, list[str]] = {}
        for row in rows:
            for entry_id in filter(None, row.get("entry", "").split(",")):
                done.setdefault(entry_id, []).append(_done_mark(row))
        # Redis may apply the transaction and the reply be lost (Redis killed, the
        # connection cut): the caller then calls again with the same rows. A digest of
        # them, set in the transaction, says it was applied; deleted by a later write once
        # this one is known done (one such key a replica, not one a write).
        token = _digest(rows, unmark, errors) if rows else None
        lost = token is not None and token in self._unsure  # an earlier try's reply was lost
        if token is not None and lost and await self._r.exists(self.layout.written(token)):
            self._unsure.discard(token)
            self._written.append(self.layout.written(token))
            return frozenset()
        lines: dict[str, str] = {}
        for sign, marks in (("-", unmark or {}), ("=", done)):
            for entry_id, ids in marks.items():
                lines[entry_id] = lines.get(entry_id, "") + _lines(sign, ids)
        entries = list(dict.fromkeys([*lines, *(errors or {})]))
        index = {entry_id: i for i, entry_id in enumerate(entries, 1)}
        flat: list[str | int] = []
        for row in rows:
            named = [index[e] for e in filter(None, row.get("entry", "").split(","))]
            fields = [item for pair in row.items() for item in pair]
            flat += [len(named), *named, len(fields), *fields]
        layout = self.layout
        keys = [layout.stream, layout.outcomes, layout.last_error,
                layout.written(token or "-"), *(layout.sending(e) for e in entries)]  # fmt: skip
        args: list[str | int] = [
            layout.group, self.consumer, self.retention.outcomes_max_len, SENDING_TTL_S,
            int(token is not None), len(entries), *entries,
            *(lines.get(e, "") for e in entries), *((errors or {}).get(e, "") for e in entries),
            *flat,
        ]  # fmt: skip
        confirmed, self._written = self._written, []
        async with self._r.pipeline(transaction=True) as pipe:
            if confirmed:
                pipe.delete(*confirmed)
            pipe.eval(_WRITE, len(keys), *keys, *args)
            try:
                replies = await pipe.execute()
            except BaseException:
                self._written.extend(confirmed)  # not known deleted: try again next time
                if token is not None:
                    self._unsure.add(token)
                raise
        if token is not None:
            self._unsure.discard(token)
            self._written.append(self.layout.written(token))
        return frozenset(_id(e) for e in replies[-1])

    async def ack(self, entry_ids: Sequence[str]) -> frozenset[str]:
        """Acknowledge entries that need nothing more (their ids all done, or nothing in
        them), each with its last error and note of ids sent, in one script (``_ACK``).
        Returns those not acknowledged: taken over by another replica, which settles them."""
        if not entry_ids:
            return frozenset()
        layout = self.layout
        with self._settling(entry_ids):
            found: list[Any] = await self._ack(
                keys=[layout.stream, layout.last_error, *(layout.sending(e) for e in entry_ids)],
                args=[layout.group, self.consumer, *entry_ids],
            )
            lost = await self._taken_from_us({_id(e) for e in found})
        self.acked += len(entry_ids) - len(lost)
        return frozenset(lost)

    @contextlib.contextmanager
    def _settling(self, entry_ids: Iterable[str]) -> Iterator[None]:
        """An ack (or a dead-lettering) of ``entry_ids`` is on its way: if its reply is lost
        (Redis killed or stalled past the timeout, the connection cut), Redis may have
        applied it all the same, and the next try finds them acknowledged since delivered,
        as it finds an entry a taker settled (:meth:`_taken_from_us`)."""
        try:
            yield
        except BaseException:
            self._unsure_acks.update(entry_ids)
            raise
        self._unsure_acks.difference_update(entry_ids)

    async def _taken_from_us(self, found: set[str]) -> set[str]:
        """Of the entries a script found taken over (``_MINE``), those really taken: not
        those only acknowledged since delivered (pending no more) after our own try whose
        reply was lost, which that try acknowledged: said taken, they were 'left to the
        replica that took them over' that no other replica ever held. (A taker's ack after
        a try that never reached Redis needs this replica alone cut off past
        ``reclaim_after``; the outcome rows it wrote before stand either way.)"""
        unsure = found & self._unsure_acks
        if not unsure:
            return found
        pending = await self._pending(sorted(unsure))
        return found - {e for e in unsure if e not in pending}

    async def finish(self, finished: Finished) -> Settled:
        """Settle one entry: ack it (dead-lettering its invalid ids with it), or, when some of
        its ids failed, keep it pending with the last error for a later delivery. An entry
        taken over by another replica meanwhile is left to it, not acknowledged nor given a
        last error."""
        message = finished.message
        if finished.failures:
            # Through the owner check, as every last error: a replica that stalled past
            # reclaim_after wrote this over its taker's, naming as done ids whose rows the
            # check had refused it, and the entry's next delivery never sent them.
            done = message.done_besides({f.job_id for f in finished.failures})
            kept = {message.entry_id: last_error(finished.failures, done)}
            return Settled.TAKEN if await self.keep_errors(kept) else Settled.KEPT
        if message.rejections or message.problem:
            return await self._buried(self._dead_fields(finished))
        if await self.ack([message.entry_id]):
            return Settled.TAKEN
        return Settled.ACKED

    async def dead_letter(
        self, entry_id: str, payload: str, reason: str, deliveries: int, error: str = ""
    ) -> Settled:
        """Move an entry to the dead-letter stream and acknowledge it, in one script; an
        entry taken over by another replica is left to it (``Settled.TAKEN``)."""
        fields: Fields = {
            "entry": entry_id,
            "payload": payload,
            "reason": reason,
            "deliveries": str(deliveries),
            "consumer": self.consumer,
            "last_error": error,
        }
        return await self._buried(fields)

    async def _buried(self, fields: Fields) -> Settled:
        """The dead letter written and its entry (``fields["entry"]``) acknowledged, or,
        when the ``XADD`` fails or the entry was taken over, neither (``_BURY``)."""
        flat = [item for pair in fields.items() for item in pair]
        layout = self.layout
        entry = fields["entry"]
        with self._settling([entry]):
            buried = await self._bury(keys=[layout.stream, layout.dead, layout.last_error,
                                            layout.sending(entry)],
                                      args=[self.retention.dead_max_len, layout.group,
                                            self.consumer, *flat])  # fmt: skip
            if not int(buried) and await self._taken_from_us({entry}):
                return Settled.TAKEN
        self.dead_lettered += 1
        self.acked += 1
        return Settled.ACKED

    def _dead_fields(self, finished: Finished) -> Fields:
        message = finished.message
        rejected = [
            {"job_id": escape(r.raw), "position": r.line, "reason": r.reason}
            for r in message.rejections
        ]
        return {
            "entry": message.entry_id,
            "payload": message.payload,
            "reason": message.problem or "invalid ids",
            "deliveries": str(finished.deliveries),
            "consumer": self.consumer,
            "last_error": "",
            "rejected": orjson.dumps(rejected).decode(),
        }

    async def hand_over(self, idle_ms: int, count: int = 10_000) -> int:
        """Leaving: mark the entries still pending under our name idle for ``idle_ms``
        (``XCLAIM ... IDLE ... JUSTID``, which counts no delivery), so another replica's
        next ``XAUTOCLAIM`` takes them at once instead of ``reclaim_after`` later, with the
        delivery this replica had of each given back (``RETRYCOUNT``): the taker's counts it.
        An entry another replica has taken meanwhile is idle for less than any of ours was,
        and ``XCLAIM``'s minimum idle time leaves it to that replica. Returns how many."""
        pending: Any = await self._r.xpending_range(
            self.layout.stream, self.layout.group, "-", "+", count, consumername=self.consumer
        )
        return await self._give_back(list(pending), idle_ms)

    async def give_back(self, entry_ids: Sequence[str]) -> int:
        """The delivery of entries handed back unsent (their endpoint paused: nothing was
        tried) given back, as :meth:`hand_over` does, so an outage of one region does not
        spend its entries' ``max_deliveries``. They stay pending under our name, for a
        reclaim to take ``reclaim_after`` from now. Returns how many."""
        pending = await self._pending(entry_ids)
        mine = [p for p in pending.values() if _id(p["consumer"]) == self.consumer]
        return await self._give_back(mine, 0)

    async def _give_back(self, pending: list[Any], idle_ms: int) -> int:
        """``XCLAIM ... IDLE idle_ms RETRYCOUNT n-1 JUSTID`` of our ``pending`` entries (each
        an ``XPENDING`` row): one delivery fewer each, and idle for ``idle_ms``."""
        if not pending:
            return 0
        least = min(int(p["time_since_delivered"]) for p in pending)
        # The taker's XAUTOCLAIM counts a delivery: ours is given back first (RETRYCOUNT, one
        # call per count), so entries passed along a rolling update are not dead-lettered
        # for hops, never having been tried.
        by_count: dict[int, list[Any]] = {}
        for p in pending:
            by_count.setdefault(int(p["times_delivered"]), []).append(_id(p["message_id"]))
        async with self._r.pipeline(transaction=False) as pipe:
            for count, ids in by_count.items():
                pipe.xclaim(self.layout.stream, self.layout.group, self.consumer, least, ids,
                            idle=idle_ms, retrycount=max(count - 1, 0), justid=True)  # fmt: skip
            claimed: list[Any] = await pipe.execute()
        return sum(len(c) for c in claimed)

    async def leave(self) -> bool:
        """Remove our consumer name from the group if nothing is pending under it (one
        script: nothing can become ours between the check and the removal)."""
        removed: Any = await self._leave(
            keys=[self.layout.stream], args=[self.layout.group, self.consumer]
        )
        return int(removed) >= 0

    async def not_streams(self) -> list[str]:
        """The keys of the queue that hold another type than serve keeps there (missing ones
        are fine): the streams, the hashes of positions and last errors, the rate limit's
        string and the fleet's pace, lease and answers beside it, and the notes of ids sent
        (strings) of the entries pending under our name, the only notes serve writes to."""
        layout = self.layout
        fleet = FleetKeys.of(layout.ratelimit)
        kinds = {layout.stream: "stream", layout.outcomes: "stream", layout.dead: "stream",
                 layout.position: "hash", layout.last_error: "hash",
                 layout.ratelimit: "string", fleet.pace: "hash", fleet.lead: "hash",
                 fleet.answers: "list"}  # fmt: skip
        kinds.update((layout.sending(e), "string") for e in await self._ours())
        async with self._r.pipeline(transaction=False) as pipe:
            for key in kinds:
                pipe.type(key)
            types = await pipe.execute()
        return [k for (k, kind), t in zip(kinds.items(), types, strict=True)
                if _id(t) not in (kind, "none")]  # fmt: skip

    async def _ours(self, count: int = 10_000) -> list[str]:
        """The entries pending under our name (none when the stream or the group is gone, or
        the stream key holds another type: said on its own)."""
        try:
            pending: Any = await self._r.xpending_range(
                self.layout.stream, self.layout.group, "-", "+", count, consumername=self.consumer
            )
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith(("NOGROUP", "WRONGTYPE")):
                raise
            return []
        return [_id(p["message_id"]) for p in pending]

    async def group_info(self) -> GroupInfo | None:
        """Our group's lag and pending count, or ``None`` if the group is gone."""
        for group in await self._r.xinfo_groups(self.layout.stream):
            name = group.get("name")
            if name is not None and _id(name) == self.layout.group:
                lag = group.get("lag")
                return GroupInfo(
                    lag=None if lag is None else int(lag), pending=int(group["pending"])
                )
        return None

    def __repr__(self) -> str:
        return (
            f"StreamConsumer(stream={self.layout.stream!r}, group={self.layout.group!r}, "
            f"consumer={self.consumer!r}, acked={self.acked}, dead_lettered={self.dead_lettered})"
        )
