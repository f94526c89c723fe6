"""What writing ``--rate N``'s fleet pace with every reservation costs Redis: ``_FIXED`` (the
pace written when it moves) against the same script writing it always (0668e0c's), at a
pace the quota allows (no refusal: nothing moves), 2000 reservations a side on virtual time,
alternated over 9 rounds. Redis's own time per script call and its ``HSET`` calls per
reservation, from ``INFO commandstats`` (other clients of the same Redis add to both sides).

    uv run pytest -m benchmark tests/benchmarks/bench_pace_write.py -s -p no:randomly
"""

from __future__ import annotations

import os
import statistics
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import REDIS_URL
from worker.pacing.shared import _FIXED, FleetKeys, interval_us
from worker.pacing.slowdown import SlowdownConfig

pytestmark = pytest.mark.benchmark

ALWAYS = _FIXED.replace("if changed then", "if true then")
"""The script as 0668e0c had it: the pace hash and its expiry written by every call."""
CALLS, ROUNDS, RATE = 2000, 9, 30.0


async def _stats(client: Any) -> tuple[float, int, int]:
    stats = await client.info("commandstats")
    script, hset = stats.get("cmdstat_evalsha", {}), stats.get("cmdstat_hset", {})
    return script.get("usec", 0), script.get("calls", 0), hset.get("calls", 0)


@pytest.mark.anyio
async def test_the_pace_is_not_written_by_reservations_that_move_nothing() -> None:
    assert ALWAYS != _FIXED
    client: Any = aioredis.Redis.from_url(REDIS_URL)
    prefix = f"reaper-bench:{uuid.uuid4().hex[:12]}"
    c = SlowdownConfig()
    step = interval_us(RATE)

    def args(now: int) -> list[Any]:
        return [now, step, 1, 600_000, c.cut, c.per_call, c.per_refusal, c.evidence,
                c.min_rate / RATE, int(c.hold * 1e6), c.growth, 10_000_000,
                int(c.probe * 1e6), 10_000]  # fmt: skip

    scripts = {"when it moves": client.register_script(_FIXED),
               "always": client.register_script(ALWAYS)}  # fmt: skip
    usec: dict[str, list[float]] = {name: [] for name in scripts}
    hsets: dict[str, list[float]] = {name: [] for name in scripts}
    try:
        for n in range(ROUNDS):
            for name in list(scripts)[n % 2 :] + list(scripts)[: n % 2]:
                keys = FleetKeys.of(f"{prefix}:{n}:{name[0]}").all()
                now = 1_000_000_000
                spent, calls, hset = await _stats(client)
                for _ in range(CALLS):
                    await scripts[name](keys=keys, args=args(now))
                    now += step
                after = await _stats(client)
                usec[name].append((after[0] - spent) / (after[1] - calls))
                hsets[name].append((after[2] - hset) / (after[1] - calls))
        print(f"\nload average {os.getloadavg()}")
        for name in scripts:
            print(f"{name}: median {statistics.median(usec[name]):.1f} us a call in Redis, "
                  f"{statistics.median(hsets[name]):.3f} HSET a call, rounds "
                  f"{', '.join(f'{u:.1f}' for u in usec[name])}")  # fmt: skip
        ratios = [a / b for a, b in zip(usec["always"], usec["when it moves"], strict=True)]
        print(f"always / when it moves: median {statistics.median(ratios):.3f}")
    finally:
        async for key in client.scan_iter(f"{prefix}:*"):
            await client.delete(key)
        await client.aclose()
