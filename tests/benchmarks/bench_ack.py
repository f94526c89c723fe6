"""What serve's owner-checking acknowledgement costs: ``StreamConsumer.ack`` (the ``_ACK``
script: ``XINFO GROUPS``, ``XPENDING`` of the entry, then ``XACK``, ``HDEL`` of its last error
and ``DEL`` of its note) against a plain ``XACK``, and against the script's writes in a
``MULTI`` without the check (what the check adds on its own). One entry an ack, as serve
acks a finished entry; 1000 entries pending under the consumer a side, each with a last
error and a note; the three sides alternated over 9 rounds in one run, medians.

Redis's own time per ack is the top-level command's ``usec`` in ``INFO commandstats``
(``evalsha``, ``xack``, ``exec``: each includes the commands it runs) of a private
``redis-server`` started for the run, so no other client of the shared Redis adds to it.
Acks per second are the client's (one connection, one ack at a time: round trips included).

    uv run pytest -m benchmark tests/benchmarks/bench_ack.py -s -p no:randomly
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.test_redis_auth import REDIS_SERVER, redis_server
from worker.service.consumer import StreamConsumer
from worker.service.layout import StreamLayout

pytestmark = [
    pytest.mark.benchmark,
    pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server"),
]

ENTRIES, ROUNDS = 1000, 9
SIDES = {"script": "cmdstat_evalsha", "xack": "cmdstat_xack", "multi": "cmdstat_exec"}


async def _usec(client: Any, stat: str) -> tuple[float, int]:
    said = (await client.info("commandstats")).get(stat, {})
    return float(said.get("usec", 0)), int(said.get("calls", 0))


async def _pending_entries(client: Any, layout: StreamLayout) -> list[str]:
    """``ENTRIES`` entries read by ``c1`` (pending under it), each with a last error and a
    note of ids sent, as serve leaves them before the ack."""
    await client.xgroup_create(layout.stream, layout.group, "0", mkstream=True)
    async with client.pipeline(transaction=False) as pipe:
        for n in range(ENTRIES):
            pipe.xadd(layout.stream, {"id": f"job-{n}"})
        entries = [e.decode() for e in await pipe.execute()]
    await client.xreadgroup(layout.group, "c1", {layout.stream: ">"}, count=ENTRIES)
    async with client.pipeline(transaction=False) as pipe:
        for n, entry in enumerate(entries):
            pipe.hset(layout.last_error, entry, f'{{"ids": ["job-{n}"]}}')
            pipe.set(layout.sending(entry), f"+job-{n}\n=job-{n}\n", ex=600)
        await pipe.execute()
    return entries


@pytest.mark.anyio
async def test_the_owner_check_of_an_ack_against_a_plain_xack(tmp_path: Path) -> None:
    async with redis_server(tmp_path, []) as port:
        client: Any = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
        try:
            per_ack: dict[str, list[float]] = {side: [] for side in SIDES}
            rates: dict[str, list[float]] = {side: [] for side in SIDES}
            for n in range(ROUNDS):
                order = list(SIDES)[n % 3 :] + list(SIDES)[: n % 3]
                for side in order:
                    layout = StreamLayout(f"bench:{n}:{side}", "reapers")
                    entries = await _pending_entries(client, layout)
                    consumer = StreamConsumer(client, layout, "c1")
                    ack = _side(side, client, consumer, layout)
                    await ack(entries[0])  # the script loaded, the connection warm
                    spent, calls = await _usec(client, SIDES[side])
                    started = time.perf_counter()
                    for entry in entries[1:]:
                        await ack(entry)
                    elapsed = time.perf_counter() - started
                    after, calls_after = await _usec(client, SIDES[side])
                    assert calls_after - calls == ENTRIES - 1
                    assert int((await client.xpending(layout.stream, layout.group))["pending"]) == 0
                    per_ack[side].append((after - spent) / (ENTRIES - 1))
                    rates[side].append((ENTRIES - 1) / elapsed)
                    await client.delete(layout.stream, layout.last_error)
            print(f"\nload average {os.getloadavg()}")
            for side in SIDES:
                print(f"{side}: median {statistics.median(per_ack[side]):.2f} us of Redis a "
                      f"ack, {statistics.median(rates[side]):.0f} acks/s; rounds "
                      f"{', '.join(f'{u:.2f}' for u in per_ack[side])} us")  # fmt: skip
            for other in ("xack", "multi"):
                ratios = [a / b for a, b in zip(per_ack["script"], per_ack[other], strict=True)]
                speed = [b / a for a, b in zip(rates["script"], rates[other], strict=True)]
                print(f"script / {other}: Redis time median {statistics.median(ratios):.2f}x, "
                      f"acks/s median {1 / statistics.median(speed):.2f}x")  # fmt: skip
        finally:
            await client.aclose()


def _side(
    side: str, client: Any, consumer: StreamConsumer, layout: StreamLayout
) -> Callable[[str], Awaitable[object]]:
    if side == "script":
        return lambda entry: consumer.ack([entry])
    if side == "xack":
        return lambda entry: client.xack(layout.stream, layout.group, entry)

    async def multi(entry: str) -> object:
        async with client.pipeline(transaction=True) as pipe:
            pipe.xack(layout.stream, layout.group, entry)
            pipe.hdel(layout.last_error, entry)
            pipe.delete(layout.sending(entry))
            return await pipe.execute()

    return multi
