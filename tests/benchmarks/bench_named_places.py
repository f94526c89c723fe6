"""Calls on the wire when every line names its target (one endpoint) against plain ids:
``run --concurrency 4`` in a process of its own against a loopback fake of the API
(``tests.gateway``) that holds each DELETE 30 ms and answers 30 % of them 429 with
``Retry-After: 1``, and measures the mean DELETEs out at once (time-weighted, from the first
call to the last answer) and the most.

    uv run pytest -m benchmark tests/benchmarks/bench_named_places.py -s -p no:randomly

``BENCH_REPEATS`` (default 3) seeds; the named runs' means over the plain runs' of the same
seeds is what is held to (both measured in the same run).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from tests.benchmarks.harness import machine, repeats
from tests.e2e import reaper, reaper_env, write_ids
from tests.gateway import Gateway, serve_gateway

pytestmark = [pytest.mark.benchmark, pytest.mark.anyio, pytest.mark.timeout(900)]

JOBS = 400
REFUSED = 0.3
HELD_S = 0.03


class Meter(Gateway):
    """Counts the DELETEs out at once over time; refuses ``REFUSED`` of them (seeded)."""

    def __init__(self, seed: int) -> None:
        super().__init__(jobs=Gateway.with_jobs(JOBS).jobs)
        self.rng = random.Random(seed)
        self.out = self.most = 0
        self.area = 0.0
        self.first: float | None = None
        self.last: float | None = None

    def _tick(self, change: int) -> None:
        now = time.monotonic()
        if self.last is not None:
            self.area += self.out * (now - self.last)
        self.first = now if self.first is None else self.first
        self.last = now
        self.out += change
        self.most = max(self.most, self.out)

    @property
    def mean(self) -> float:
        assert self.first is not None and self.last is not None
        return self.area / (self.last - self.first)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        self._tick(1)
        try:
            await asyncio.sleep(HELD_S)
            if self.rng.random() < REFUSED:
                await request.read()
                return web.json_response(
                    {"error_code": "APIGW.0308", "error_msg": "throttled"},
                    status=429, headers={"Retry-After": "1"},
                )  # fmt: skip
            return await super().delete(request)
        finally:
            self._tick(-1)


async def _run(named: bool, seed: int, tmp: Path) -> Meter:
    gateway = Meter(seed)
    async with serve_gateway(gateway) as url:
        if named:
            src = tmp / "ids.jsonl"
            lines = (orjson.dumps({"id": i, "project_id": "other-project", "endpoint": url})
                     for i in gateway.job_ids())  # fmt: skip
            src.write_bytes(b"\n".join(lines) + b"\n")
        else:
            src = write_ids(tmp / "ids.txt", gateway.job_ids())
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--batch-size", "5", "--concurrency", "4",
             "--rate", "1000", "--burst", "50", "--max-attempts", "20"],
            reaper_env(url), cwd=tmp,
        )  # fmt: skip
    assert done.code == 0, done.stderr[-2000:]
    assert not gateway.jobs
    return gateway


async def test_a_named_endpoint_alone_keeps_as_many_calls_out_as_plain_ids(tmp_path: Path) -> None:
    plain: list[float] = []
    named: list[float] = []
    for seed in range(repeats(3)):
        one = await _run(False, seed, tmp_path)
        other = await _run(True, seed, tmp_path)
        plain.append(one.mean)
        named.append(other.mean)
        print(f"seed {seed}: plain {one.mean:.2f} (most {one.most}), "
              f"named {other.mean:.2f} (most {other.most})")  # fmt: skip
        assert other.most == 4
    ratio = statistics.median(n / p for n, p in zip(named, plain, strict=True))
    print(f"{machine()}: median plain {statistics.median(plain):.2f}, named "
          f"{statistics.median(named):.2f} on the wire; named/plain {ratio:.2f}")  # fmt: skip
    assert ratio >= 0.8
