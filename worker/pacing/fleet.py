"""``--rate auto`` for a fleet: ONE ``RateController`` for every process sharing a quota.

Each process running its own controller on its third of the answers, and setting the
shared bucket's spacing to its own rate, made three controllers fight over one quota (0.58
of it used, 14.5 % of calls refused). Here the process holding a short lease in Redis
(renewed with each of its reservations) is the leader: every process reports its answers
with its reservations, the leader drains them, with the start time of every reservation,
into its controller, which so sees the whole fleet's calls as one process would, and writes
the interval and the ``Retry-After`` pause every reservation uses, and the controller's
state. A refused worker reports before it sleeps on its ``Retry-After``, and while the
fleet is paused every process waiting to reserve comes back at least every
``PAUSE_LOOK_S``: the leader reads the refusals of a pause in it (a long window's check
call, one for the fleet, which the script hands out). A leader that stops is replaced when
its lease lapses, by a process that starts from the stored state (and the long window read),
not from scratch (when Redis lost it, from the last state it saw there). The bucket, its
keys and the waiting are ``worker.pacing.shared``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
import redis.asyncio as aioredis
import redis.exceptions

from worker.clock import Clock
from worker.pacing.adaptive import RESLOT as WAITERS_RESLOT
from worker.pacing.controller import (
    AdaptiveConfig,
    ControllerState,
    Phase,
    RateController,
    answer,
)
from worker.pacing.shared import (
    GCRA,
    PACE_TTL_S,
    REDIS_ERRORS,
    REVISIT_S,
    RedisPacer,
    Reservation,
    interval_us,
    text,
)
from worker.pacing.window import KEEP_S, LONG_WAIT

_CHECK = """
-- The time of a long window's check call (us), or none (''): the pause lets it go alone.
local function set_check(check)
  if check == '' then redis.call('HDEL', KEYS[2], 'check')
  else redis.call('HSET', KEYS[2], 'check', check) end
end
"""

_AUTO = (
    GCRA
    + _CHECK
    + """
-- ARGV: now ('' for the server's), initial interval, burst, ttl ms, me, lease ms, most
-- answers kept, the leader's interval, pause and state to publish ('' for none), horizon,
-- the least and most interval and the longest pause (us) a stored pace may hold, the check
-- call's time to publish with them ('' for none), then answers in fours: how long ago it
-- came (us), latency (us, -1: none), t/o/-, Retry-After (ms, -1: none); or a call's start:
-- how long ago, -1, s, -1.
local now = clock()
own(KEYS[2], 'hash')
own(KEYS[3], 'hash')
own(KEYS[4], 'list')
-- The lease: who holds it, and until when (on the scripts' clock; the key's own expiry only
-- clears it away once the fleet is gone). One further off than a lease is long is not one.
local lead = redis.call('HMGET', KEYS[3], 'who', 'until')
local held = within(lead[2], -math.huge, now + tonumber(ARGV[6]) * 1000)
local least, most = tonumber(ARGV[12]), tonumber(ARGV[13])
local leader = 0
if (not lead[1]) or lead[1] == ARGV[5] or held == nil or held < now then
  redis.call('HSET', KEYS[3], 'who', ARGV[5], 'until', us(now + tonumber(ARGV[6]) * 1000))
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  leader = 1
  if ARGV[8] ~= '' then
    respace(now, within(redis.call('HGET', KEYS[2], 'interval'), least, most),
            tonumber(ARGV[8]), 1)
    redis.call('HSET', KEYS[2], 'interval', ARGV[8], 'pause_until', ARGV[9], 'state', ARGV[10])
    set_check(ARGV[15])
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
  end
end
local p = redis.call('HMGET', KEYS[2], 'interval', 'pause_until', 'state', 'revokes', 'check',
                     'checked')
local interval = within(p[1], least, most) or tonumber(ARGV[2])
local pause = within(p[2], -math.huge, now + tonumber(ARGV[14])) or 0
local horizon = tonumber(ARGV[11])
-- A long window's check call: one start in the pause, at its time, for the whole fleet;
-- every other call waits for the pause's end (``checked``: the check already handed out).
local floor, checking = pause, 0
local check = within(p[5], -math.huge, now + tonumber(ARGV[14]))
if check ~= nil and p[5] ~= p[6] and check < pause then floor = check end
local start, new_tat = reserve(now, interval, tonumber(ARGV[3]), floor, horizon, horizon + most)
if start and floor < pause and start < pause then
  redis.call('HSET', KEYS[2], 'checked', p[5])
  checking = 1
end
-- The check call still to hand out, for a process whose workers all sleep to wake one.
local due = ''
if checking == 0 and floor < pause then due = us(check) end
-- A start is the leader's once it is real, not when it is handed out: a slowdown may take
-- it back before (a call never sent, with no answer to come, held its controller's measure
-- back for good: the calls it counted as sent were never all answered).
for i = 16, #ARGV, 4 do
  if ARGV[i + 2] == 's' then
    redis.call('RPUSH', KEYS[4], 's ' .. us(now - tonumber(ARGV[i])))
  else
    redis.call('RPUSH', KEYS[4], table.concat({'a', us(now - tonumber(ARGV[i])), ARGV[i + 1],
               ARGV[i + 2], ARGV[i + 3]}, ' '))
  end
end
if start then start = us(start) else start = '' end
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[7]), -1)
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
end
local out = {start, us(now), us(new_tat), us(interval), us(pause), leader, p[3] or '',
             p[4] or '', checking, due}
if leader == 1 then
  for _, e in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do out[#out + 1] = e end
  redis.call('DEL', KEYS[4])
end
return out
"""
)

_PUBLISH = (
    GCRA
    + _CHECK
    + """
-- ARGV: now ('' for the server's), me, the interval, pause and state to publish, ttl ms,
-- revisit (us; '' when the pace is no slower: nothing to take back), the least and most
-- interval a stored pace may hold (us), the check call's time ('' for none). Returns
-- whether it was published (by the leader), the time, and the count of take-backs.
local now = clock()
own(KEYS[2], 'hash')
own(KEYS[3], 'hash')
local revokes = redis.call('HGET', KEYS[2], 'revokes') or ''
if redis.call('HGET', KEYS[3], 'who') ~= ARGV[2] then return {0, us(now), revokes} end
local old = within(redis.call('HGET', KEYS[2], 'interval'), tonumber(ARGV[8]), tonumber(ARGV[9]))
respace(now, old, tonumber(ARGV[3]), 1)
redis.call('HSET', KEYS[2], 'interval', ARGV[3], 'pause_until', ARGV[4], 'state', ARGV[5])
set_check(ARGV[10])
if ARGV[7] ~= '' then
  revokes = revoke(now, tonumber(ARGV[3]), 1, tonumber(ARGV[7]), revokes)
end
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return {1, us(now), revokes}
"""
)

RESLOT = 0.02
"""A change of the leader's rate larger than this share is published at once; smaller ones
go with its next reservation."""

LOOKS_A_LEASE = 4
"""While every worker of a process sleeps on a ``Retry-After``, it calls the script at least
this many times a lease (``FleetRateController.rest``): a leader's lease outlives a late
look or two."""

PAUSE_LOOK_S = 0.25
"""While the fleet is paused, a process waiting to reserve comes back at least this often:
its answers reach the leader, and the leader reads them (a long window's check call, and
the refusal that reads the window, came in a pause nobody reserved in, and were read only
after it, when every worker had been refused once)."""


Kept = dict[str, dict[str, float]]
"""A long window's read and check, as ``LongWindow.kept`` gives them."""


@dataclass(frozen=True, slots=True)
class _Pace:
    """What the leader publishes: the interval and pause (us), its controller's state, the
    long window's check call's time (us, '' for none) and what it read of the window."""

    interval: int
    pause_us: int
    state: ControllerState | None
    check: str = ""
    window: Kept = dataclasses.field(default_factory=dict)
    before: ControllerState | None = None  # ``RateController.outage_before``

    def stored(self) -> str:
        return "" if self.state is None else encode_state(self.state, self.window, self.before)


def _json(v: Any) -> Any:
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def _fields(state: ControllerState) -> dict[str, Any]:
    return {
        f.name: _json(v)
        for f in dataclasses.fields(state)
        if (v := getattr(state, f.name)) is not None
    }


def encode_state(
    state: ControllerState, window: Kept | None = None, before: ControllerState | None = None
) -> str:
    """The controller's state as JSON (infinities as strings), for the next leader, what it
    read of a long window (``LongWindow.kept``), and the state before an outage's cuts
    (``RateController.outage_before``)."""
    out = _fields(state)
    if before is not None:
        out["outage_before"] = _fields(before)
    if window:
        out["long_window"] = {k: {f: _json(v) for f, v in p.items()} for k, p in window.items()}
    return orjson.dumps(out).decode()


def decode_window(stored: str, config: AdaptiveConfig, now: float) -> Kept:
    """The long window a leader stored beside its state (``encode_state``), if a leader of
    ``config`` could have stored it by ``now``: a rate out of its bounds, or an end or a
    pause further ahead than it allows, was written by someone else (``{}``: none)."""
    try:
        raw = orjson.loads(stored).get("long_window") or {}
        kept = {k: {f: float(v) for f, v in part.items()} for k, part in raw.items()}
    except (ValueError, TypeError, AttributeError, orjson.JSONDecodeError):
        return {}
    window, check = kept.get("window", {}), kept.get("check", {})
    rate, end = window.get("rate", 0.0), window.get("end", math.inf)
    sane = (
        all(not math.isnan(v) for part in kept.values() for v in part.values())
        and (not window or (0 < rate <= config.max_rate and end <= now + KEEP_S))
        and (not check or check.get("hold", math.inf) <= now + config.max_pause)
    )
    return kept if sane else {}


def decode_state(stored: str, part: str | None = None) -> ControllerState | None:
    """The state a leader stored (``part``: the one stored under that name beside it), or
    ``None`` when there is none (or it does not read as one: written by another version)."""
    if not stored:
        return None
    try:
        raw = orjson.loads(stored)
        if part is not None:
            raw = raw.get(part)
            if raw is None:
                return None
        values: dict[str, Any] = {}
        for f in dataclasses.fields(ControllerState):
            if f.name not in raw:
                continue
            v = raw[f.name]
            if f.name == "phase":
                values[f.name] = Phase(v)
            elif isinstance(v, bool) or f.type in ("int", "bool"):
                values[f.name] = v
            else:
                values[f.name] = float(v)
        return ControllerState(**values)
    except (ValueError, TypeError, AttributeError, orjson.JSONDecodeError):
        return None


def sane_state(
    state: ControllerState | None, config: AdaptiveConfig, now: float
) -> ControllerState | None:
    """``state`` if a controller of ``config`` could have stored it by ``now`` (Redis
    clock), else ``None``: a rate out of its bounds or a pause longer than it allows was
    written by someone else, and starting from scratch is safe where adopting it is not."""
    if state is None:
        return None
    times = (state.since, state.cut_at, state.refused_at, state.pause_until)
    if not (
        config.min_rate <= state.rate <= config.max_rate
        and config.min_rate <= state.level <= config.max_rate
        and not any(math.isnan(t) for t in (*times, state.quota, state.refused))
        and state.pause_until <= now + config.max_pause
    ):
        return None
    return state


def taken_over(stored_state: str, config: AdaptiveConfig, now: float) -> RateController:
    """A new leader's controller at ``now`` (Redis clock), from the state the last leader
    stored (``_Pace.stored``); a fresh one where none reads as sane."""
    controller = RateController(now, config)
    stored = sane_state(decode_state(stored_state), config, now)
    if stored is None:
        return controller
    controller.restore(stored, start_seen=False)
    # The long window read, and the check call under way: a leader that took over in the
    # pause read the check's refusal as any other, and the window never.
    kept = decode_window(stored_state, config, now)
    with contextlib.suppress(KeyError):  # (none kept: no window, as before)
        controller.long_window.adopt(kept, now)
    # Mid-outage: the rate before its cuts returns once served again.
    before = sane_state(decode_state(stored_state, "outage_before"), config, now)
    if before is not None:
        controller.resume(now, before)
    return controller


@dataclass(frozen=True, slots=True)
class _Answer:
    at: float  # when it came (or the call started), on this process's clock
    latency_s: float | None
    flag: str  # "t" throttled, "o" overloaded, "-" anything else; "s" a call started
    retry_after: float | None


class FleetRateController(RedisPacer):
    """``--rate auto`` for a fleet: one ``RateController``, run by the process that holds the
    lease, on every process's answers; every reservation is spaced by its rate.

    A process that is not the leader only reports: its answers go to Redis with its next
    reservation. The leader feeds the reservations' start times (``on_sent``) and the
    answers, in the order they came (``answer``, on the Redis clock), to its controller,
    and publishes its interval, its ``Retry-After`` pause and its state: a slowdown or a
    pause at once (one more script call), a rise with its next reservation. The controller
    sees all the fleet's calls, so it measures the quota between refusals and caps its
    growth at what the fleet really sends.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        key: str,
        clock: Clock,
        *,
        config: AdaptiveConfig | None = None,
        lease_s: float = 2.0,
        horizon_s: float = 0.1,
        retry_s: float = 0.5,
        max_answers: int = 10_000,
        me: str | None = None,
        redis_now: Callable[[], float] | None = None,
        revisit_s: float | None = REVISIT_S,
    ) -> None:
        super().__init__(
            client, key, clock, horizon_s=horizon_s, retry_s=retry_s, redis_now=redis_now,
            revisit_s=revisit_s,
        )  # fmt: skip
        self._config = config or AdaptiveConfig()
        self._me = me or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lease_ms = int(lease_s * 1000)
        self._max_answers = max_answers
        c = self._config  # what a stored pace may hold: anything else is not a leader's
        self._bounds = (interval_us(c.max_rate), interval_us(c.min_rate), round(c.max_pause * 1e6))
        self._script: Any = client.register_script(_AUTO)
        self._publish_script: Any = client.register_script(_PUBLISH)
        # The newest ``max_answers`` kept for the next reservation to report, the oldest
        # dropped first: a deque, since a list's ``del [0]`` moved every answer kept.
        self._answers: deque[_Answer] = deque(maxlen=max_answers)
        self._dropped = 0  # answers the bound dropped unreported, ever
        self._interval = interval_us(self._config.initial_rate)  # the fleet's, as last seen
        self._pause_us = 0  # the fleet's pause, as last seen
        self._offset = 0.0  # the Redis clock minus ours, seconds
        self._controller: RateController | None = None
        self._led_at = -math.inf  # our clock, at our last reservation as the leader
        self._t = -math.inf  # the controller's time: the last answer fed, Redis clock
        self._published: _Pace | None = None
        self._pending: _Pace | None = None  # for the next reservation to publish
        self._basis = ""  # the stored state this leader last published or started from
        self.leads = 0  # times this process became the leader
        self._seen_state = ""  # the last estimate a leader stored, as this process saw it
        self.reported = 0  # answers and starts sent to Redis for the leader
        self._io = anyio.Lock()  # one script call at a time: each takes the answers kept
        self._asked_at = -math.inf  # our clock, when this process last called the script
        self._look_s = lease_s / LOOKS_A_LEASE
        self._check_us: int | None = None  # the fleet's check call still to hand out
        self._woken_for: int | None = None  # the check a worker of ours was woken for
        self.looks = 0  # script calls made for workers asleep on a Retry-After
        self.woken = 0  # workers woken for a check call

    @property
    def rate(self) -> float:
        """The fleet's rate as this process last saw it (the leader's: its controller's)."""
        return 1e6 / self._interval

    @property
    def leading(self) -> bool:
        return self._controller is not None

    @property
    def controller(self) -> RateController | None:
        """The fleet's controller while this process leads, else ``None``."""
        return self._controller

    @property
    def _spacing(self) -> int:
        return self._interval

    def feedback(
        self,
        *,
        throttled: bool,
        latency_s: float | None = None,
        retry_after: float | None = None,
        overloaded: bool = False,
    ) -> None:
        """Keep the answer for the next reservation to report."""
        self.throttles += throttled
        flag = "t" if throttled else "o" if overloaded else "-"
        self._keep(_Answer(self._clock.now(), latency_s, flag, retry_after))

    def _started(self) -> None:
        """Keep the start for the next reservation to report: the leader's controller
        counts the calls really sent, not the start times handed out."""
        self._keep(_Answer(self._clock.now(), None, "s", None))

    def _keep(self, answer: _Answer) -> None:
        if len(self._answers) == self._max_answers:
            self._dropped += 1  # past ``max_answers``, the oldest goes
        self._answers.append(answer)

    def _held_s(self) -> float:
        return max(0.0, self._pause_us / 1e6 - (self._clock.now() + self._offset))

    @property
    def spec(self) -> str:
        return "auto"

    async def reserve(self) -> Reservation | float:
        await self.check_spec()
        async with self._io:
            return await self._exchange(self._horizon_us)

    async def rest(self, seconds: float) -> None:
        """A refused worker's sleep on its ``Retry-After``: its answer is reported first
        (``report``), and while it sleeps the process keeps in touch with the fleet. Where
        every worker of the fleet was refused in a window's first refusals and slept to its
        end, nothing reserved: nobody sent the check call the pause lets go, the window was
        never read, and the leader's lease lapsed (a new leader each window, 4-7 in 70 s).
        So while no script call of this process's has gone for ``lease_s / LOOKS_A_LEASE``,
        a sleeping worker makes one (``look``: no start asked for), which renews the lease
        of a leader asleep (and lets a process take it over from one gone) and reads what
        the leader published; and the sleep ends at the fleet's check call's time, for one
        worker of this process to ask for it (the script hands it to the first to ask; any
        other waits for the pause's end in ``acquire``, as before: no call more goes in the
        pause than the one check)."""
        await self.report()
        end = self._clock.now() + seconds
        while (now := self._clock.now()) < end:
            check = self._check_us
            due = math.inf if check in (None, self._woken_for) else check / 1e6 - self._offset
            if due <= now:
                self._woken_for = check
                self.woken += 1
                return
            if (look := self._asked_at + self._look_s) <= now:
                await self.look()
                continue
            await self._clock.sleep(min(end, look, due) - now)

    async def look(self) -> None:
        """One script call with nothing to reserve, unless another went since a worker
        asked for it (``rest``): the lease renewed, the answers kept reported, and the
        fleet's pause and check call read. Best effort, as ``report``."""
        async with self._io:
            if self._asked_at + self._look_s > self._clock.now():
                return  # (the test ``rest`` makes, to the bit: else it asks again at once)
            self.looks += 1
            with contextlib.suppress(*REDIS_ERRORS, redis.exceptions.ResponseError):
                await self._exchange(-1)

    async def report(self) -> None:
        """Send the answers kept now, with no reservation (the leader, reading them too).
        A refused worker calls it before it sleeps on the ``Retry-After``: a process whose
        workers were all refused reserved nothing until they woke, so its refusals reached
        no leader meanwhile (against a long window, every worker of the fleet slept to the
        window's end, the leader's among them, and the window was never read). Best effort:
        where Redis does not answer, they go with the next reservation, as ever."""
        if not self._answers:
            return
        with contextlib.suppress(*REDIS_ERRORS, redis.exceptions.ResponseError):
            async with self._io:
                if self._answers:
                    await self._exchange(-1)  # (a horizon before now: no start handed out)

    async def _exchange(self, horizon_us: int) -> Reservation | float:
        """One call of the reservation script: the answers kept go, and a start comes back
        if one is due within ``horizon_us`` (else how long to come back in); the leader
        reads the fleet's answers and publishes."""
        answers, now, dropped = self._answers, self._clock.now(), self._dropped
        self._asked_at = now  # (answered or not: a look waits its turn again)
        reported: list[Any] = []
        for a in answers:
            reported += [
                f"{(now - a.at) * 1e6:.0f}",
                -1 if a.latency_s is None else f"{a.latency_s * 1e6:.0f}",
                a.flag,
                -1 if a.retry_after is None else f"{a.retry_after * 1e3:.0f}",
            ]
        if self._pending is not None and self._lapsed() and not await self._unchanged():
            # Made under a lease that lapsed, and another leader published since: the
            # script would overwrite that newer state with it, and this one restore from it.
            self._pending = None
        pending = self._pending
        publish: tuple[Any, ...] = ("", "", "", "")
        if pending is not None:
            publish = (pending.interval, pending.pause_us, pending.stored(), pending.check)
        reply = await self._script(
            keys=self._keys.all(),
            args=[
                self._now_arg(), self._interval, 1, int(PACE_TTL_S * 1000), self._me,
                self._lease_ms, self._max_answers, *publish[:3], horizon_us,
                *self._bounds, publish[3], *reported,
            ],
        )  # fmt: skip
        # The reported are the oldest kept; those the bound dropped while the call was out
        # were among them, and the answers that came meanwhile wait for the next report.
        for _ in range(max(0, len(reported) // 4 - (self._dropped - dropped))):
            answers.popleft()
        self.reported += len(reported) // 4
        start, server_now, token, interval, pause, leader, state, revokes, check, due, *events = (
            reply
        )
        server_now = int(server_now)
        self._check_us = int(due) if (due := text(due)) else None
        self._saw(server_now, revokes)
        self._offset = server_now / 1e6 - self._clock.now()
        self._interval, self._pause_us = int(interval), int(pause)
        if state := text(state):
            self._seen_state = state
        if int(leader):
            if pending is not None:
                self._published, self._pending, self._basis = pending, None, publish[2]
            await self._lead(server_now, self._seen_state, [text(e) for e in events])
        else:
            self._controller, self._pending = None, None
        if not (start := text(start)):
            back = int(token) / 1e6
            return min(back, PAUSE_LOOK_S) if self._pause_us > server_now else back
        return Reservation(int(start), server_now, text(token), text(revokes), int(check) == 1)

    def _lapsed(self) -> bool:
        """Whether this process's lease may have lapsed since it last led: no reservation of
        its own as the leader for as long as a lease is."""
        return self._clock.now() - self._led_at > self._lease_ms / 1e3

    async def _unchanged(self) -> bool:
        """Whether the fleet's stored state is still the one this leader last published or
        started from (``_basis``), or none: no other leader published since."""
        got = await self._client.hmget(self._keys.pace, ["state"])
        return got[0] is None or text(got[0]) == self._basis

    async def _lead(self, server_now: int, stored_state: str, events: list[str]) -> None:
        """Feed the fleet's reservations and answers to the controller, and publish."""
        if self._controller is None or self._lapsed():
            # Newly the leader (or again, after another may have led): from the stored state,
            # or, when Redis lost it (flushed, restarted), the last this process saw there.
            self._controller = taken_over(stored_state, self._config, server_now / 1e6)
            stored = sane_state(decode_state(stored_state), self._config, server_now / 1e6)
            if stored is None:
                # Nothing stored (a first start, or Redis flushed or restarted under a
                # running fleet): the calls sent before were paced by an estimate now lost,
                # and their refusals say nothing of this one's rate. Taken as news, they held
                # a fleet at 30 calls/s at the start-up rate, 2, for good. A call sent from
                # now on is news (its Retry-After pauses the fleet): a cut counts a call sent
                # within one interval after it as sent before it, so the cut is put that
                # much earlier (at server_now, the first refusal of a fresh fleet was ignored).
                fresh = self._controller.state
                cut_at = server_now / 1e6 - 1.0 / fresh.level
                self._controller.restore(dataclasses.replace(fresh, cut_at=cut_at))
            self._t = -math.inf
            self._published = _Pace(self._interval, self._pause_us, stored)
            self._basis = stored_state
            self.leads += 1
            # The rate its controller starts from: the one seen last may be another's.
            rate = self._controller.rate
            self._log.info("rate.leader", rate=round(rate, 3), restored=stored is not None)
        self._led_at = self._clock.now()
        ctrl = self._controller
        answers: list[tuple[int, int, str, int]] = []
        for event in events:
            kind, *fields = event.split(" ")
            if kind == "s":
                ctrl.on_sent(int(fields[0]) / 1e6)
            elif kind == "a" and len(fields) == 4:
                answers.append((int(fields[0]), int(fields[1]), fields[2], int(fields[3])))
        read = server_now / 1e6
        for at_us, latency_us, flag, retry_ms in sorted(answers):
            at = at_us / 1e6
            latency = None if latency_us < 0 else latency_us / 1e6
            retry_after = None if retry_ms < 0 else retry_ms / 1e3
            if flag in ("t", "o") and latency is not None:
                # A refusal (or a 503) is read when it reaches the leader, as one process
                # reads it when it comes: the fleet's pace moves then, not when it came. Its
                # call is dated back all the same (its report's time added to its latency),
                # and its Retry-After still counts from when it came. Dated when it came, the
                # cut made the calls sent meanwhile at the old pace look sent at the new one:
                # their refusals were news, and measured the quota at half (after a leader
                # was killed, 11.2 calls/s of 20 from answers a third of a second late at
                # 300 ms: 0.56 of the quota for 34 s).
                late = read - at
                latency, at = latency + late, read
                if retry_after is not None:
                    said = min(retry_after, self._config.max_pause)
                    retry_after = max(0.0, said - late)
                    if said >= LONG_WAIT:
                        # Still a long wait, as one process reads it: a window's last 2 s
                        # read as 1.99 was a token bucket's, and its count spent again at
                        # the pause's end, unread (32 % refused, from 5 s into a window).
                        retry_after = max(retry_after, LONG_WAIT)
            if at < self._t:
                # Reported after a later answer of another process: at the controller's
                # time, sent when it was.
                latency = None if latency is None else latency + (self._t - at)
                at = self._t
            self._t = at
            answer(
                ctrl, at, throttled=flag == "t", latency_s=latency, retry_after=retry_after,
                overloaded=flag == "o",
            )  # fmt: skip
        if self._t > -math.inf:
            ctrl.rate_at(self._t)
        pause, check = ctrl.pause_until(), ""
        if (waiting := ctrl.long_window.check) is not None and pause > 0:
            # The pause lets one call of the fleet go at its end (the script hands it out),
            # and holds every other to the check's own end, as one process does.
            check, pause = f"{round(pause * 1e6)}", max(pause, waiting.hold)
        pause_us = round(pause * 1e6) if math.isfinite(pause) and pause > 0 else 0
        interval = interval_us(ctrl.rate)
        kept = ctrl.long_window.kept()
        publish = _Pace(interval, pause_us, ctrl.state, check, kept, ctrl.outage_before)
        last = self._published
        if last is not None and publish == last:
            return
        self._interval, self._pause_us = interval, max(pause_us, self._pause_us)
        if (
            last is None
            or abs(interval - last.interval) > RESLOT * last.interval
            or pause_us > last.pause_us
        ):
            # A pause, or a new rate: at once, not with our next reservation, which may be
            # a second away when the rate is low. A slowdown takes back the starts handed
            # out beyond ``revisit`` (``RedisPacer.acquire``): they were spaced for the rate
            # just refused, or fall in the pause; as one process re-slots its waiters, for a
            # change of more than its ``RESLOT``.
            slower = (
                last is None
                or interval > last.interval * (1 + WAITERS_RESLOT)
                or pause_us > last.pause_us
            )
            revisit = self._revisit_us if slower else None
            with contextlib.suppress(*REDIS_ERRORS):
                encoded = publish.stored()
                done, server_now, revokes = await self.publish(
                    interval, pause_us, encoded, revisit, check
                )
                self._saw(int(server_now), revokes)
                if int(done):
                    self._published, self._pending, self._basis = publish, None, encoded
                    return
        self._pending = publish

    async def publish(
        self, interval: int, pause_us: int, state: str, revisit: int | None, check: str = ""
    ) -> list[Any]:
        """Write the leader's pace (if this process still holds the lease) and, when it is a
        slowdown (``revisit``), take back the starts handed out beyond ``revisit`` us:
        (published or not, the Redis time, the count of take-backs). ``check``: the time
        (us) the pause lets one call go, a long window's check call ('': none)."""
        reply: list[Any] = await self._publish_script(
            keys=self._keys.all(),
            args=[
                self._now_arg(), self._me, interval, pause_us, state, int(PACE_TTL_S * 1000),
                "" if revisit is None else revisit, *self._bounds[:2], check,
            ],
        )  # fmt: skip
        return reply

    def __repr__(self) -> str:
        return (
            f"FleetRateController(key={self._keys.tat!r}, rate={self.rate:.4g}, "
            f"leading={self.leading}, throttles={self.throttles}, granted={self.granted}, "
            f"reported={self.reported}, looks={self.looks}, woken={self.woken}, "
            f"{self._controller!r})"
        )
