"""What the check in the note before each DELETE costs: ``_SEND`` (``XPENDING`` per entry,
then the note) against the same note without the check (the script before it), one call
noting 100 entries of one id each (as ``enqueue`` writes them), on notes absent before the
call (an entry noted once, as in the soak), alternated in 5 rounds of 300 calls.

    uv run pytest -m benchmark tests/benchmarks/bench_note.py -s -p no:randomly
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import REDIS_URL
from worker.service.consumer import StreamConsumer, _lines
from worker.service.layout import SENDING_TTL_S, StreamLayout

pytestmark = pytest.mark.benchmark

UNCHECKED = """
for i, key in ipairs(KEYS) do
  local was = redis.call('GET', key)
  redis.call('SET', key, (was or '') .. ARGV[i + 1], 'EX', ARGV[1])
end
return #KEYS
"""
"""The note as written before the check: ``GET`` and ``SET`` per entry."""
ENTRIES, CALLS, ROUNDS = 100, 300, 5


@pytest.mark.anyio
async def test_the_check_that_entries_are_still_ours_costs_no_more_than_noise() -> None:
    client: Any = aioredis.Redis.from_url(REDIS_URL)
    entries: list[str] = []
    layout = StreamLayout(f"reaper-bench:{uuid.uuid4().hex[:12]}:ids", "g")
    try:
        await client.xgroup_create(layout.stream, layout.group, "0", mkstream=True)
        entries = [(await client.xadd(layout.stream, {"id": f"job-{i}"})).decode()
                   for i in range(ENTRIES)]  # fmt: skip
        await client.xreadgroup(layout.group, "c1", {layout.stream: ">"})
        notes = [layout.sending(e) for e in entries]
        marks = {e: [str(uuid.uuid4())] for e in entries}
        consumer = StreamConsumer(client, layout, "c1")
        unchecked = client.register_script(UNCHECKED)

        async def checked() -> None:
            assert not await consumer.mark_sending(marks)

        async def plain() -> None:
            lines = [_lines("+", ids) for ids in marks.values()]
            await unchecked(keys=notes, args=[SENDING_TTL_S, *lines])

        spent: dict[str, list[float]] = {"checked": [], "unchecked": []}
        calls: dict[str, Callable[[], Awaitable[None]]] = {"checked": checked, "unchecked": plain}
        for _ in range(ROUNDS):
            for name, call in calls.items():
                total = 0.0
                for _ in range(CALLS):
                    await client.delete(*notes)
                    started = time.perf_counter()
                    await call()
                    total += time.perf_counter() - started
                spent[name].append(total / CALLS * 1000)
        print(f"\nload average {os.getloadavg()}")
        for name, rounds in spent.items():
            print(f"{name}: median {statistics.median(rounds):.2f} ms a call, rounds "
                  f"{', '.join(f'{r:.2f}' for r in rounds)}")  # fmt: skip
    finally:
        await client.delete(layout.stream, *(layout.sending(e) for e in entries))
        await client.aclose()
