"""What serve keeps in Redis: the ids stream trimmed below what any group still needs, the
outcomes and dead-letter streams by age, and each group's acknowledged position.

**The ids stream.** An entry leaves the stream once *every* group reading the stream is done
with it: ``XTRIM MINID`` below the lowest of, over all groups, the group's oldest pending
entry, or, when it has none pending, its last delivered entry (kept: it is the one entry at
or past the bound). Entries not yet delivered to some group lie above that group's last
delivered entry, so an entry a group has not read is never trimmed. Deleting on
acknowledgement (``XDEL``) was the other choice; it is wrong as soon as two groups read one
stream (the first to ack would delete the entry under the second), and its tombstones make
Redis stop reporting a group's lag. With two groups, the stream is therefore as long as
the slower group is behind; a group nobody reads any more holds every entry after its
position, so remove it (``XGROUP DESTROY``) when it is retired.

**The position.** The same computation gives, for our group, the id of the last entry below
which everything was acknowledged; it is kept in ``{stream}:position`` (a hash by group).
When the group is lost (``XGROUP DESTROY``, a Redis restored without it) it is created again
there instead of at ``0``, so it replays what was pending or unread, not the whole stream.
Until then the kept position bounds the trim as the group did: the other groups' passes
must not take what it had not finished.

**Consumer names** of our group with nothing pending and idle for ``CONSUMER_IDLE_S`` go
too: pods have new names, and a replica killed or leaving with entries pending (handed over
to the others) cannot remove its own.

**Outcomes and dead letters** are capped by count on every ``XADD`` (approximately, which
Redis does cheaply) and trimmed here by age, ``XTRIM MINID`` at Redis's own clock minus
the age (stream ids are Redis's clock in milliseconds); exactly, so what is older goes.

All of it is one Lua script, so it is atomic: a group created (at ``0``) while it runs cannot
have entries trimmed under it. Any replica may run it at any time; running it twice does
nothing the first did not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from worker.service.layout import Retention, StreamLayout

CONSUMER_IDLE_S = 3600.0
"""A consumer name with nothing pending and no read for this long is removed from the group
(a replica that left holding entries, or was killed): harmless, since a replica reading
again under that name is added back by Redis, and it keeps the group's list of consumers
to the replicas that exist."""

_SCRIPT = """
local function parse(id)
  return string.match(id, '^(%d+)-(%d+)$')
end
local function num_less(a, b)  -- decimal strings, no leading zeros: no float rounding
  if #a ~= #b then return #a < #b end
  return a < b
end
local function id_less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  if am ~= bm then return num_less(am, bm) end
  return num_less(as, bs)
end

local trimmed, floor, position, gone, seen = 0, false, false, 0, false
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    local bound = info['last-delivered-id']
    local done = bound
    if tonumber(info['pending']) > 0 then
      bound = redis.call('XPENDING', KEYS[1], info['name'])[2]
      local before = redis.call('XREVRANGE', KEYS[1], '(' .. bound, '-', 'COUNT', 1)
      done = before[1] and before[1][1] or false
    end
    if info['name'] == ARGV[1] then
      for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
        local c = {}
        for i = 1, #consumer, 2 do c[consumer[i]] = consumer[i + 1] end
        if tonumber(c['pending']) == 0 and tonumber(c['idle']) > tonumber(ARGV[4]) then
          redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c['name'])
          gone = gone + 1
        end
      end
    end
    if info['name'] == ARGV[1] then seen = true end
    if info['name'] == ARGV[1] and done and done ~= '0-0' then
      local kept = redis.call('HGET', KEYS[2], ARGV[1])
      if not kept or id_less(kept, done) then
        redis.call('HSET', KEYS[2], ARGV[1], done)
        kept = done
      end
      position = kept
    end
    if not floor or id_less(bound, floor) then floor = bound end
  end
  -- Our group lost (destroyed, or a restore without it) until a replica makes it again at
  -- its kept position: what lies above that position is still ours to read.
  local kept = not seen and redis.call('HGET', KEYS[2], ARGV[1])
  if floor and kept and id_less(kept, floor) then floor = kept end
  if floor then trimmed = redis.call('XTRIM', KEYS[1], 'MINID', floor) end
end

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local aged = {0, 0}
for i = 1, 2 do
  local age_ms = tonumber(ARGV[i + 1])
  if age_ms > 0 and now_ms > age_ms then
    local minid = string.format('%d', now_ms - age_ms)
    aged[i] = redis.call('XTRIM', KEYS[i + 2], 'MINID', minid)
  end
end
return {trimmed, floor, position, aged[1], aged[2], gone}
"""


@dataclass(frozen=True, slots=True)
class Trimmed:
    """What one pass removed, and where our group stands (``None``: nothing known yet)."""

    ids: int
    outcomes: int
    dead: int
    position: str | None
    consumers: int = 0
    """Consumer names removed: nothing pending, idle longer than ``CONSUMER_IDLE_S``."""


def _text(value: Any) -> str | None:
    if value is None or value is False:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class Keeper:
    """Runs the retention script for one group of one stream."""

    def __init__(self, client: aioredis.Redis, layout: StreamLayout, retention: Retention) -> None:
        self._r = client
        self._layout = layout
        self._retention = retention
        self._script = client.register_script(_SCRIPT)
        self.passes = 0
        self.trimmed = 0

    async def trim(self) -> Trimmed:
        """One pass: trim the ids stream and the aged outcomes and dead letters; keep our
        group's position. Raises ``redis.exceptions.ResponseError`` (``WRONGTYPE``) when a
        key holds something other than a stream."""
        layout, keep = self._layout, self._retention
        reply: Any = await self._script(
            keys=[layout.stream, layout.position, layout.outcomes, layout.dead],
            args=[layout.group, int(keep.outcomes_max_age_s * 1000),
                  int(keep.dead_max_age_s * 1000), int(CONSUMER_IDLE_S * 1000)],
        )  # fmt: skip
        self.passes += 1
        self.trimmed += int(reply[0])
        return Trimmed(int(reply[0]), int(reply[3]), int(reply[4]), _text(reply[2]), int(reply[5]))

    def __repr__(self) -> str:
        stream = self._layout.stream
        return f"Keeper(stream={stream!r}, passes={self.passes}, trimmed={self.trimmed})"


async def kept_position(client: aioredis.Redis, layout: StreamLayout) -> str | None:
    """Our group's kept position, if any pass has kept one."""
    return _text(await client.hget(layout.position, layout.group))
