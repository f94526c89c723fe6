"""One rate limit for every process that shares a quota: GCRA kept atomically in Redis, at
the fleet's one rate.

N replicas each with their own ``LocalRateLimiter(rate)`` would send N x ``rate`` calls per
second. Here the bucket is one number in Redis, the *theoretical arrival time* (``tat``:
when the bucket will be full again, in microseconds of the Redis server's clock), and a Lua
script reserves a start time atomically. It is the same arithmetic as
``worker.pacing.bucket.TokenBucket`` (``burst`` calls at once after an idle spell, then
exactly ``1 / rate`` apart), so a fleet behaves like one process with a ``LocalRateLimiter``.

The *rate* the bucket is spaced by is fleet state too, next to it, so that what one process
learns from a refusal paces every process, once:

- ``RedisRateLimiter`` (``--rate N``): the pace is a factor of N kept in Redis, with the
  fleet's evidence that the quota is under it (each reservation a call sent, each refusal
  reported with one a refusal): refusals that are a share of the fleet's calls cut it
  atomically, once for the fleet (``Slowdown``'s arithmetic, the same in Lua); the factor
  climbs back by the Redis clock, computed by whichever reservation comes next, so no
  process keeps a timer of its own.
- ``worker.pacing.fleet.FleetRateController`` (``--rate auto``): one controller for the
  fleet, run by a leader, whose rate every reservation is spaced by.

Why this shape:

- The script reads ``TIME`` on the Redis server, so replicas whose clocks disagree still
  agree on the schedule; each caller only sleeps the *relative* wait it is handed.
- It reserves (and returns how long to wait) rather than refusing: strict FIFO across
  replicas, one round trip per call. But never more than ``horizon`` ahead: a caller
  further back is told when to come back, and its process's other callers queue behind
  it, so a new pace reaches every process within ``horizon`` rather than behind a queue of
  every waiting worker's slot (eight workers in each of three replicas at 2 calls/s held
  12 s of start times, and start-up's growth waited that long).
- All arithmetic is in integer microseconds (exact in Lua's doubles) with the spacing
  rounded up, so rounding can only make the fleet slower than ``rate``, never faster.
- A waiter cancelled while sleeping gives its slot back only when it holds the latest
  reservation (compare-and-set on ``tat``), as the local bucket does.
- The keys expire once nothing needs them, so an idle queue leaves nothing behind.
- What no process of the fleet could have written there (a word, a factor or an interval
  out of the settings' bounds, a time further ahead than a reservation or a pause can be)
  is read as missing: never a faster pace nor a stop for good. A key of another type is
  not ours to delete: the script stops with ``WRONGTYPE`` naming it, which ``serve``
  answers by pausing unready (as for any key of its queue) and ``run`` by ending 78.

Keys, all derived from the bucket's ``key`` (a parameter: one per endpoint and project):
``key`` (the ``tat``), ``key:pace`` (a hash: the fixed rate's factor, or the leader's
interval, pause, state and a long window's check call), ``key:lead`` (the leader's lease:
who, until when), ``key:answers`` (a list of answers and reservations for the leader,
capped).

When Redis does not answer, ``acquire`` waits and asks again: a call not made is always
safe, and the service is unready meanwhile anyway.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from worker.clock import Clock
from worker.errors import ConfigError, NotAStream
from worker.pacing.bucket import check_rate
from worker.pacing.slowdown import Notify, RefusedShare, SlowdownConfig, over_quota

T = TypeVar("T")

GCRA = """
local function clock()
  if ARGV[1] ~= '' then return tonumber(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function us(x) return string.format('%.0f', x) end
-- The bucket's tat, kept until it has passed (and a second more).
local function put(tat, now)
  redis.call('SET', KEYS[1], us(tat), 'PX', math.floor((tat - now) / 1000) + 1000)
end
-- A key of another type where the fleet's state belongs is someone else's: the script
-- stops with WRONGTYPE naming it and leaves it be (serve pauses naming it, run ends 78),
-- since deleting another tool's key is no one's to decide here. A word or a number out of
-- reach in a key of the fleet's own type is read as missing.
local function own(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= kind and t ~= 'none' then
    error({err = 'WRONGTYPE ' .. key .. ' holds a ' .. t .. ', where the fleet keeps a ' .. kind})
  end
end
local function within(x, lo, hi)
  x = tonumber(x)
  if x == nil or x ~= x or x < lo or x > hi then return nil end
  return x
end
-- The next start time on the bucket at KEYS[1], not before ``floor`` (a pause); none when
-- it is more than ``horizon`` away: then the second value says in how long to come back.
-- No reservation leaves the bucket more than ``far`` ahead of now: a later one is not ours.
local function reserve(now, interval, burst, floor, horizon, far)
  local base = math.max(now, floor)
  own(KEYS[1], 'string')
  local tat = within(redis.call('GET', KEYS[1]), -math.huge, now + far) or 0
  if tat < base then tat = base end
  local new_tat = tat + interval
  local start = math.max(new_tat - burst * interval, base)
  if start - now > horizon then return nil, start - now - horizon end
  put(new_tat, now)
  return start, new_tat
end
-- The pace moves from ``old`` to ``new`` (us; ``old`` nil: not known): the starts handed out
-- keep their times and the next is ``new`` after the last of them, as ``TokenBucket.set_rate``
-- does for one process. The tat is ``burst`` old intervals past that last start; left so, the
-- next start came one old interval after it (a cut of a burst of 1's pace spaced one more
-- call at the pace just refused, and it was refused too). Tokens saved meanwhile stay tokens.
local function respace(now, old, new, burst)
  if old == nil or old == new then return end
  own(KEYS[1], 'string')
  local tat = within(redis.call('GET', KEYS[1]), now, math.huge)
  if tat == nil then return end
  local last = tat - burst * old
  if last > now then
    put(last + burst * new, now)
  else
    put(math.ceil(now + (tat - now) * new / old), now)
  end
end
-- A slowdown (a cut, a pause) takes back every start handed out for later than ``revisit``
-- from now: their holders, who look at the count of such take-backs (``revokes`` in the
-- pace, returned by ``revoked``) ``revisit`` before their start, reserve again. The next
-- start is an interval of the new pace after the last one that stands (at the latest,
-- ``revisit`` from now), not after the ones taken back, nor one old interval after it.
local function revoke(now, interval, burst, revisit, revokes)
  own(KEYS[1], 'string')
  put(now + revisit + burst * interval, now)
  revokes = us((within(revokes, 0, 2 ^ 52) or 0) + 1)
  redis.call('HSET', KEYS[2], 'revokes', revokes)
  return revokes
end
"""

_FIXED = (
    GCRA
    + """
-- ARGV: now ('' for the server's), interval asked, burst, ttl ms, cut, evidence a call
-- sent takes, evidence a refusal adds, evidence that cuts, least factor, hold, growth,
-- horizon, probe, revisit (us), then how long ago each refused call was sent (us).
local now = clock()
local cut, hold, growth = tonumber(ARGV[5]), tonumber(ARGV[10]), tonumber(ARGV[11])
local least, probe = tonumber(ARGV[9]), tonumber(ARGV[13])
own(KEYS[2], 'hash')
local p = redis.call('HMGET', KEYS[2], 'factor', 'since', 'cut_at', 'cap', 'evidence',
                     'capped', 'revokes')
local factor = math.max(within(p[1], 0, 1) or 1, least)
local since, cut_at = within(p[2], -math.huge, now) or now, within(p[3], -math.huge, now)
-- the cap is the cut's that wrote it (capped: its cut_at): a cut_at written without it (a
-- replica on the rule before, in a rolling upgrade) is no cut of this rule's, and caps nothing
local ours = cut_at ~= nil and p[6] == p[3]
local top = ours and within(p[4], least / growth, 1) or 1
local evidence = within(p[5], 0, tonumber(ARGV[8])) or 0
local event, changed, slowed = '', false, false
if factor < 1 and now - since >= hold then
  local steps = math.floor((now - since) / hold)
  local cap = 1
  if cut_at ~= nil and now - cut_at < probe then cap = top end
  factor = math.max(factor, math.min(cap, factor * growth ^ steps))
  since = since + steps * hold
  changed = true
  if factor >= 1 then event = 'restored' end
end
for i = 15, #ARGV do
  if cut_at == nil or now - tonumber(ARGV[i]) >= cut_at then
    evidence, changed = evidence + tonumber(ARGV[7]), true
    if evidence >= tonumber(ARGV[8]) then
      -- a pace found over the quota twice (slowed, or asked again within probe) is a step
      -- too high until probe after this cut; once may be a false alarm
      if factor < 1 or (ours and now - cut_at < probe) then top = factor / growth
      else top = 1 end
      local was = factor
      factor = math.max(least, factor * cut)
      if factor < was then event, slowed = 'slowed', true end
      cut_at, since, evidence, ours = now, now, 0, true
    end
  end
end
local interval = math.ceil(tonumber(ARGV[2]) / factor)
local burst, horizon = tonumber(ARGV[3]), tonumber(ARGV[12])
local far = horizon + burst * math.ceil(tonumber(ARGV[2]) / least)
local revokes = p[7] or ''
if slowed and ARGV[14] ~= '' then  -- (none: a benchmark's side as before)
  revokes = revoke(now, interval, burst, tonumber(ARGV[14]), revokes)
end
local start, new_tat = reserve(now, interval, burst, 0, horizon, far)
if start and evidence > 0 then  -- a call sent
  evidence, changed = math.max(0, evidence - tonumber(ARGV[6])), true
end
-- written only when it moved: at a steady pace the quota allows, nothing (no write per call)
if changed then
  local fields = {'factor', string.format('%.17g', factor), 'since', us(since),
                  'evidence', string.format('%.17g', evidence)}
  if ours then
    table.insert(fields, 'cut_at'); table.insert(fields, us(cut_at))
    table.insert(fields, 'cap'); table.insert(fields, string.format('%.17g', top))
    table.insert(fields, 'capped'); table.insert(fields, us(cut_at))
  end
  redis.call('HSET', KEYS[2], unpack(fields))
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
if not start then start = '' else start = us(start) end
return {start, us(now), us(new_tat), event, string.format('%.17g', factor), revokes}
"""
)

REFUND = (
    GCRA
    + """
-- ARGV: now ('' for the server's), the reservation's token (the tat it left), its interval.
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
local now = clock()
local back = tonumber(ARGV[2]) - tonumber(ARGV[3])
if back <= now then redis.call('DEL', KEYS[1]) else put(back, now) end
return 1
"""
)

REDIS_ERRORS = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    redis.exceptions.OutOfMemoryError,  # at its maxmemory: no write until memory is freed
    redis.exceptions.ReadOnlyError,  # a replica, until a failover makes it (or DNS) a primary
)


PACE_TTL_S = 600.0
"""How long the fleet's pace outlives its last change: a fleet restarted within it starts
from what it had learnt. (``--rate N``'s is written only when it moves: one left as it is
that long holds the rate asked, no evidence, a cut too old to matter; its expiry is no
change.)"""

SPEC_EVERY_S = 5.0
"""How often a process writes its rate (``10``, ``auto``) beside the fleet's keys and reads
the others': processes given different rates on one bucket each space their own calls by
theirs, and nothing else would say so."""

SPEC_TTL_S = 15.0
"""How long a rate written there stands for a live process."""

_SPECS = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) / 1000))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


@dataclass(frozen=True, slots=True)
class FleetKeys:
    """The keys of one fleet rate, derived from the bucket's."""

    tat: str
    pace: str
    lead: str
    answers: str
    specs: str

    @classmethod
    def of(cls, key: str) -> FleetKeys:
        return cls(key, f"{key}:pace", f"{key}:lead", f"{key}:answers", f"{key}:specs")

    def all(self) -> list[str]:
        """The keys the reservation scripts are given (not ``specs``: only ``check_spec``
        reads it)."""
        return [self.tat, self.pace, self.lead, self.answers]


SCRIPT_DENIED = "The user executing the script can't"
"""How Redis words an ACL refusal inside a script (a ``ResponseError``, not ``NOPERM``)."""


def acl_denial(exc: BaseException) -> BaseException | None:
    """The ACL's refusal in ``exc`` (alone or in a task group), if that is what it is: a
    command refused (``NoPermissionError``), or a script's command or key refused."""
    if isinstance(exc, BaseExceptionGroup):
        found = exc.subgroup(lambda one: acl_denial(one) is not None)
        return None if found is None else acl_denial(found.exceptions[0])
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return exc
    if isinstance(exc, redis.exceptions.ResponseError) and SCRIPT_DENIED in str(exc):
        return exc
    return None


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A start time handed out by the script, in microseconds of the Redis server's clock.

    ``wait_s`` is how long the caller sleeps; ``token`` identifies the reservation for a
    refund (the ``tat`` it left behind); ``revokes``, the fleet's count of slowdowns that
    took back the starts handed out before them, as it was then (``RedisPacer.acquire``);
    ``check``: a long window's check call, the one start the fleet's pause lets go.
    """

    start_us: int
    now_us: int
    token: str
    revokes: str = ""
    check: bool = False

    @property
    def wait_s(self) -> float:
        return max(0, self.start_us - self.now_us) / 1_000_000


REVISIT_S = 0.01
"""A start handed out for later than this after its reservation is confirmed this long
before it: a slowdown of the fleet since (a cut, a pause) took it back, and its caller
reserves again at the new pace, as one process re-slots its waiters. Long enough for the
look (one ``HMGET``, a fraction of a millisecond on a LAN) and a late wake on a loaded
machine to end before the start; a start due within it of a cut keeps its time."""


def interval_us(rate: float) -> int:
    """Microseconds between two calls at ``rate``, rounded up (never faster than ``rate``)."""
    return max(1, math.ceil(1_000_000 / check_rate(rate)))


class RedisPacer(abc.ABC):
    """What both fleet limiters do: one caller of this process at a time reserves (one
    script call, retried while Redis does not answer; told to come back when the next start
    is more than ``horizon`` away), then sleeps to its start; its slot is given back when it
    is cancelled while it holds the latest. A start more than ``revisit`` after its
    reservation is confirmed ``revisit`` before it: when a slowdown of the fleet took it
    back meanwhile, its caller reserves again (``revisit_s=None``: never, as before
    bench_revisit's "before" side)."""

    def __init__(
        self,
        client: aioredis.Redis,
        key: str,
        clock: Clock,
        *,
        horizon_s: float,
        retry_s: float,
        redis_now: Callable[[], float] | None,
        revisit_s: float | None = REVISIT_S,
    ) -> None:
        self._keys = FleetKeys.of(key)
        self._client = client
        self._clock = clock
        self._turn = anyio.Lock()
        self._horizon_us = int(horizon_s * 1e6)
        self._revisit_us = None if revisit_s is None else int(revisit_s * 1e6)
        self._seen = (-math.inf, "")  # the latest script reply: its Redis time, its revokes
        self._retry_s = retry_s
        self._redis_now = redis_now
        self._refund: Any = client.register_script(REFUND)
        self._specs: Any = client.register_script(_SPECS)
        self._spec_at = -math.inf  # our clock, when this process last wrote its rate
        self._mismatch: set[str] = set()  # the other rates already said
        self._log = structlog.get_logger("devserver_reaper")
        self.granted = 0
        self.waited_s = 0.0
        self.redis_errors = 0
        self.throttles = 0
        self.revisits = 0  # starts confirmed with a look of their own
        self.taken_back = 0  # starts a slowdown took back

    def _now_arg(self) -> str:
        """The time the scripts use: the Redis server's, or a test's clock (microseconds)."""
        return "" if self._redis_now is None else f"{self._redis_now() * 1e6:.0f}"

    @abc.abstractmethod
    async def reserve(self) -> Reservation | float:
        """A start time, or how many seconds to come back in."""

    @property
    @abc.abstractmethod
    def spec(self) -> str:
        """The rate this process was given, as the user wrote it: ``10``, ``auto``."""

    async def check_spec(self) -> None:
        """Every ``SPEC_EVERY_S``: write this process's rate beside the fleet's keys (for
        ``SPEC_TTL_S``) and read the live others'; one that differs is said once
        (``rate.mismatch``, warning). Best effort: a Redis away or a key of another type
        there skips it (the reservation says those)."""
        now = self._clock.now()
        if now - self._spec_at < SPEC_EVERY_S:
            return
        self._spec_at = now
        try:
            specs = await self._specs(
                keys=[self._keys.specs], args=[self._now_arg(), self.spec, int(SPEC_TTL_S * 1e6)]
            )
        except (*REDIS_ERRORS, redis.exceptions.ResponseError):
            return
        others = sorted({text(spec) for spec in specs} - {self.spec} - self._mismatch)
        if others:
            self._mismatch.update(others)
            self._log.warning("rate.mismatch", rate=self.spec, others=others, key=self._keys.tat)

    def _started(self) -> None:  # noqa: B027  (nothing to do, but for auto's leader)
        """A call starts now (its reservation was not taken back)."""

    def _held_s(self) -> float:
        """How long the fleet's pause, as this process knows it, still holds every call
        (a pause learnt after the reservation was made, or not yet in Redis)."""
        return 0.0

    async def acquire(self) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            async with self._turn:
                reservation = await self._asking(self.reserve)
                while not isinstance(reservation, Reservation):
                    await self._clock.sleep(reservation)
                    reservation = await self._asking(self.reserve)
            self.granted += 1
            now = self._clock.now()
            # (A check call goes in the pause: the pause is for the others.)
            held = 0.0 if reservation.check else self._held_s()
            due = now + max(reservation.wait_s, held)
            self.waited_s += due - now
            revisit = self._revisit_us
            try:
                if revisit is not None and reservation.start_us - reservation.now_us > revisit:
                    await self._clock.sleep(max(0.0, due - revisit / 1e6 - now))
                    if await self._taken_back(reservation, due):
                        # A slowdown of the fleet took its start back (the slots after the
                        # last that stands are the new pace's now, for whoever asks first),
                        # or nothing says it stands: reserved again, never sent unconfirmed.
                        self.taken_back += 1
                        continue
                if (wait := due - self._clock.now()) > 0:
                    await self._clock.sleep(wait)
            except BaseException:
                # On failure the slot goes unused once: slower, never faster.
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(1.0),
                    contextlib.suppress(*REDIS_ERRORS),
                ):
                    await self._refund(
                        keys=[self._keys.tat],
                        args=[self._now_arg(), reservation.token, self._spacing],
                    )
                raise
            if reservation.check or self._held_s() <= 0:
                self._started()
                return
            # Paused while it waited: its start was handed out before the pause, and calls
            # must be spaced from the pause's end, not sent at it together.

    def _saw(self, server_now_us: int, revokes: Any) -> None:
        """A script's reply: the fleet's count of take-backs as of its Redis time."""
        if server_now_us >= self._seen[0]:
            self._seen = (server_now_us, text(revokes))

    async def _taken_back(self, reservation: Reservation, due: float) -> bool:
        """Whether ``reservation``'s start (``due`` on our clock) may not go: a slowdown of
        the fleet has taken it back since it was handed out (the count of take-backs
        moved), or the look went unanswered, or was answered ``horizon`` after ``due``.
        A reply of this process's as recent as ``revisit`` before the start says; else one
        ``HMGET`` of the count does.

        A look Redis does not answer is not waited out: every start held across an outage
        would go at once when it ends, beside the first ones the bucket hands out then
        (two starts 0-10 ms apart at 30 calls/s, burst 1). Reserving again waits the outage
        out (``_asking``) and is spaced by the bucket. A look answered that late (Redis
        client's own retries, a process stopped and continued) holds a start as stale."""
        at, revokes = self._seen
        if self._revisit_us is None or at < reservation.start_us - self._revisit_us:
            self.revisits += 1
            try:
                with self._refusals():
                    revokes = await self.revokes()
            except REDIS_ERRORS:
                self.redis_errors += 1
                return True
        late = self._clock.now() - due > self._horizon_us / 1e6
        return late or revokes != reservation.revokes

    async def revokes(self) -> str:
        """The fleet's count of take-backs, as Redis has it now (one ``HMGET``: the command
        the scripts read the pace with, so an ACL that lets them run lets it)."""
        got = await self._client.hmget(self._keys.pace, ["revokes"])
        return "" if got[0] is None else text(got[0])

    async def _asking(self, ask: Callable[[], Awaitable[T]]) -> T:
        """``ask()`` (a reservation, a look), asked again every ``retry_s`` while Redis does
        not answer: said once an outage (``ratelimit.redis_error``), not twice a second
        while Redis is away or full, and its end too (``ratelimit.redis_recovered``). A key
        of another type where the fleet's state belongs ends it (``NotAStream``: serve
        pauses, run ends 78)."""
        failing_since: float | None = None
        while True:
            try:
                with self._refusals():
                    reserved = await ask()
            except REDIS_ERRORS as exc:
                self.redis_errors += 1
                if failing_since is None:
                    failing_since = self._clock.now()
                    self._log.warning("ratelimit.redis_error", error=type(exc).__name__)
                await self._clock.sleep(self._retry_s)
                continue
            if failing_since is not None:
                waited = round(self._clock.now() - failing_since, 3)
                self._log.info("ratelimit.redis_recovered", waited_s=waited)
            return reserved

    @contextlib.contextmanager
    def _refusals(self) -> Iterator[None]:
        """Redis's refusals of the fleet's commands, in the user's words: the ACL's
        (``ConfigError``), a key of another type where the fleet's state belongs
        (``NotAStream``: serve pauses, run ends 78)."""
        try:
            yield
        except redis.exceptions.ResponseError as exc:
            if acl_denial(exc) is not None:
                raise ConfigError(
                    f"rate limit: the Redis user may not do what the shared rate limit "
                    f"needs ({exc}); give it the ACL in docs/security.md"
                ) from None
            if "WRONGTYPE" not in str(exc):
                raise
            said = str(exc).removeprefix("WRONGTYPE ").split(" script: ")[0]
            if not said.startswith(self._keys.tat):  # a plain command's own words
                said = f"{self._keys.pace} holds another type, where the fleet keeps a hash"
            raise NotAStream(
                f"rate limit: a Redis key of another type ({said}) is not the fleet's to "
                "delete: delete or rename it (redis-cli TYPE KEY)"
            ) from None

    @property
    @abc.abstractmethod
    def _spacing(self) -> int:
        """The interval (us) of the last reservation, to refund it."""


class RedisRateLimiter(RedisPacer):
    """``--rate N`` for a fleet: N calls/s together, slowed together while the server refuses.

    The arithmetic is ``worker.pacing.slowdown.Slowdown``'s, run in the reservation script
    on the fleet's factor: a refusal is reported with this process's next reservation (how
    long ago its call was sent), and counts only when that call was sent since the last cut;
    the process whose report cut says so (``rate.slowed``), and the one whose reservation
    brought the pace back to N (``rate.restored``): one event per change, for the fleet.
    Not a ``FixedRate``: its answers move the pace.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        key: str,
        *,
        rate: float,
        burst: int,
        clock: Clock,
        notify: Notify | None = None,
        config: SlowdownConfig | None = None,
        horizon_s: float = 0.1,
        retry_s: float = 0.5,
        redis_now: Callable[[], float] | None = None,
        revisit_s: float | None = REVISIT_S,
    ) -> None:
        super().__init__(
            client, key, clock, horizon_s=horizon_s, retry_s=retry_s, redis_now=redis_now,
            revisit_s=revisit_s,
        )  # fmt: skip
        self._asked = float(rate)
        self._interval = interval_us(rate)
        self._burst = burst
        self._config = config or SlowdownConfig()
        self._notify = notify or structlog.get_logger("devserver_reaper").warning
        self._script: Any = client.register_script(_FIXED)
        self._refused: list[float] = []  # when refused calls were sent, on our clock
        self._share = RefusedShare(self._config)  # of this process's answers
        self.factor = 1.0
        self._last_spacing = self._interval

    @property
    def rate(self) -> float:
        """The fleet's pace as this process last saw it."""
        return self._asked * self.factor

    @property
    def asked(self) -> float:
        return self._asked

    @property
    def _spacing(self) -> int:
        return self._last_spacing

    @property
    def spec(self) -> str:
        return f"{self._asked:g}"

    def feedback(
        self,
        *,
        throttled: bool,
        latency_s: float | None = None,
        retry_after: float | None = None,
        overloaded: bool = False,
    ) -> None:
        now = self._clock.now()
        # This process's calls, a sample of the fleet's: their share refused is the fleet's
        # (or this process's own, under a quota per source address), the rate accepted its.
        over_quota(
            self._share, self._notify, now, latency_s=latency_s, throttled=throttled,
            pace=self.rate, asked=self._asked,
        )  # fmt: skip
        if throttled:
            self.throttles += 1
            self._refused.append(now - (latency_s or 0.0))

    async def reserve(self) -> Reservation | float:
        await self.check_spec()
        c = self._config
        refused, now = self._refused, self._clock.now()
        ago = [f"{(now - sent) * 1e6:.0f}" for sent in refused]
        args: list[Any] = [
            self._now_arg(), self._interval, self._burst, int(PACE_TTL_S * 1000), c.cut,
            c.per_call, c.per_refusal, c.evidence, c.min_rate / self._asked,
            int(c.hold * 1e6), c.growth, self._horizon_us, int(c.probe * 1e6),
            "" if self._revisit_us is None else self._revisit_us, *ago,
        ]  # fmt: skip
        start, server_now, token, event, factor, revokes = await self._script(
            keys=self._keys.all(), args=args
        )
        self._saw(int(server_now), revokes)
        del refused[: len(ago)]  # reported; later ones wait for the next reservation
        self.factor = float(text(factor))
        self._last_spacing = math.ceil(self._interval / self.factor)
        if (event := text(event)) == "slowed":
            self._notify(
                "rate.slowed", rate=round(self.rate, 3), asked=self._asked, reason="throttled"
            )
        elif event == "restored":
            self._notify("rate.restored", rate=round(self.rate, 3))
        if not (start := text(start)):
            return int(token) / 1e6
        return Reservation(int(start), int(server_now), text(token), text(revokes))

    def __repr__(self) -> str:
        return (
            f"RedisRateLimiter(key={self._keys.tat!r}, rate={self.rate:.4g}, "
            f"asked={self._asked:g}, burst={self._burst}, throttles={self.throttles}, "
            f"granted={self.granted})"
        )
