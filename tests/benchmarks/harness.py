"""Shared by the benchmarks: a simulator in its own process, and our dispatch path driven
in-process against it with every call's send time and outcome recorded.

The simulator runs as ``devserver-reaper simulate`` in a child process, so its CPU is never
ours and its quota clock is its own (as a real gateway's would be). Our side is the real
``Dispatcher`` + ``ApiClient`` + limiter (the code ``run`` uses per batch), driven by
``concurrency`` workers for a fixed time, so a rate benchmark needs no input file.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from worker.batcher import DeletionBudget
from worker.clock import Clock, MonotonicClock
from worker.errors import ApiError, ThrottledError
from worker.pacing.bucket import FixedRate, RateLimiter, TokenBucket, start_apart
from worker.pacing.retry import RetryPolicy
from worker.types import Batch, DeleteResult, JobRecord, Result

PROJECT = "bench-project"
AK = "BENCHAK"
SK = "bench-secret-key"


@dataclass
class SimProcess:
    url: str
    ids: list[str]
    proc: subprocess.Popen[str]

    def control(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        method = "POST" if data else "GET"
        request = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            result: dict[str, Any] = json.loads(answer.read())
            return result

    def stats(self) -> dict[str, Any]:
        return self.control("/_sim/stats")

    def arrivals(self) -> Arrivals:
        """The gateway's view of the calls since the last read (and the read takes them)."""
        seen = self.control("/_sim/arrivals")
        return Arrivals(seen["arrived"], seen["checked"], seen["accepted"])

    def set_quota(self, quota: float, burst: int | None = None) -> None:
        payload: dict[str, Any] = {"quota": quota}
        if burst is not None:
            payload["burst"] = burst
        self.control("/_sim/quota", payload)

    def run_queue_seconds(self) -> float:
        """How long the simulator's process has waited for a CPU while ready to run
        (``/proc/<pid>/schedstat``'s second field, main thread): the scheduler's share of
        its delays."""
        return run_queue_seconds(self.proc.pid)

    def cpu_seconds(self) -> float:
        """The simulator process's CPU so far (user + system), from ``/proc/<pid>/stat``.

        Clock ticks (10 ms on Linux): read it before and after a run of at least a second.
        """
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)"; comm may hold spaces
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
        return (utime + stime) / os.sysconf("SC_CLK_TCK")


def run_queue_seconds(pid: int | None = None) -> float:
    """Seconds process ``pid`` (ours when ``None``) has waited ready to run for a CPU."""
    path = Path(f"/proc/{pid if pid is not None else 'self'}/schedstat")
    return int(path.read_text().split()[1]) / 1e9


def clean_env() -> dict[str, str]:
    """This process's environment without any REAPER_ or HUAWEICLOUD_ setting, unbuffered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REAPER_", "HUAWEICLOUD_"))}
    return env | {"PYTHONUNBUFFERED": "1"}


async def enqueue(path: Path, ids: Sequence[str], *, stream: str, redis_url: str) -> None:
    """Write ``ids`` to ``path`` and add them to ``stream`` with the real ``enqueue``."""
    path.write_text("".join(f"{i}\n" for i in ids))
    done = await anyio.run_process(
        [sys.executable, "-m", "worker", "enqueue", "--input", str(path),
         "--stream", stream, "--redis-url", redis_url],
        env=clean_env(), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]


@contextmanager
def simulator(
    tmp: Path,
    *,
    jobs: int,
    quota: float = 0,
    burst: int = 1,
    latency_ms: float = 0,
    project: str = PROJECT,
    seed: int = 0,
    region: str = "cn-north-4",
    flags: Sequence[str] = (),
) -> Iterator[SimProcess]:
    """``devserver-reaper simulate`` on a free loopback port, for the ``with`` block.
    ``project`` and ``seed``: for two simulators of two projects with ids of their own;
    ``flags``: more of the simulator's flags (``--forbidden``)."""
    ids_file = tmp / f"ids-{time.monotonic_ns()}.txt"
    args = [sys.executable, "-m", "worker", "simulate", "--port", "0", "--jobs", str(jobs),
            "--quota", str(quota), "--burst", str(burst), "--latency-ms", str(latency_ms),
            "--project-id", project, "--region", region, "--ak", AK, "--sk", SK,
            "--seed", str(seed),
            "--ids-file", str(ids_file), *flags]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"simulator did not start: {line!r}")
        url = line.split("listening on ", 1)[1].split()[0]
        ids = ids_file.read_text().split()
        yield SimProcess(url=url, ids=ids, proc=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        ids_file.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class Arrivals:
    """What the simulator's gateway saw, per call in order: when it reached its handler,
    when its quota was checked (the time a token bucket judges), and whether it passed. The
    simulator's ``time.monotonic``: the same clock as ours on one host."""

    arrived: list[float]
    checked: list[float]
    accepted: list[bool]


@dataclass(frozen=True, slots=True)
class Call:
    start: float
    kind: str  # ok | throttled | error


@dataclass
class Trace:
    calls: list[Call] = field(default_factory=list)
    rates: list[tuple[float, float]] = field(default_factory=list)  # (time, limiter rate)
    t0: float = 0.0
    writes: list[float] = field(default_factory=list)  # when each request's bytes were written

    def window(self, start: float, end: float) -> tuple[int, int, int]:
        """(ok, throttled, errors) among calls started in [start, end) seconds after t0."""
        ok = throttled = errors = 0
        for call in self.calls:
            at = call.start - self.t0
            if start <= at < end:
                if call.kind == "ok":
                    ok += 1
                elif call.kind == "throttled":
                    throttled += 1
                else:
                    errors += 1
        return ok, throttled, errors

    def per_second(self, end: float) -> list[tuple[int, int]]:
        """(ok, throttled) per whole second from t0."""
        out = [(0, 0) for _ in range(math.ceil(end))]
        for call in self.calls:
            second = int(call.start - self.t0)
            if 0 <= second < len(out):
                ok, thr = out[second]
                out[second] = (ok + (call.kind == "ok"), thr + (call.kind == "throttled"))
        return out


class _Recording:
    """The transport, recording each call's start and outcome."""

    def __init__(self, inner: Any, clock: Clock, trace: Trace) -> None:
        self._inner = inner
        self._clock = clock
        self._trace = trace

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult:
        return await self._record(self._inner.delete_jobs(ids))  # type: ignore[no-any-return]

    async def get_job(self, job_id: str) -> JobRecord:
        return await self._record(self._inner.get_job(job_id))  # type: ignore[no-any-return]

    async def _record(self, call: Any) -> Any:
        start = self._clock.now()
        try:
            result = await call
        except ThrottledError:
            self._trace.calls.append(Call(start, "throttled"))
            raise
        except ApiError:
            self._trace.calls.append(Call(start, "error"))
            raise
        self._trace.calls.append(Call(start, "ok"))
        return result


class NullJournal:
    async def sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        pass

    async def unsent(self, batch_id: str, ids: Sequence[str]) -> None:
        pass

    async def retrying(self, batch_id: str, attempt: int, delay_s: float, reason: str) -> None:
        pass

    async def finished(self, results: Sequence[Result]) -> None:
        pass


def _writes_into(writes: list[float], clock: Clock) -> aiohttp.TraceConfig:
    """An aiohttp trace that notes when each request's body is handed to the socket (the
    headers go with it, in one write)."""

    async def chunk_sent(*_: object) -> None:
        writes.append(clock.now())

    config = aiohttp.TraceConfig()
    config.on_request_chunk_sent.append(chunk_sent)
    config.freeze()
    return config


class EvenPacer(FixedRate):
    """The oracle: a pacer told the rate to keep (``rate``, burst 1), with no adaptation, so
    what it reaches is what any sender can on this host. ``apart``: the pacing rule of
    ``worker.pacing.bucket.start_apart`` (no start less than an interval after the real
    start before it); without it, plain GCRA. Notes each call's slot and real start."""

    def __init__(self, rate: float, clock: Clock, *, apart: bool = True) -> None:
        self._clock = clock
        self._bucket = TokenBucket(rate, 1, clock.now())
        self._apart = apart
        self._last = -math.inf
        self.slots: list[float] = []
        self.starts: list[float] = []

    @property
    def rate(self) -> float:
        return self._bucket.rate

    async def acquire(self) -> None:
        now = self._clock.now()
        wait = self._bucket.reserve(now)
        self.slots.append(now + wait)
        await self._clock.sleep(wait)
        if self._apart:
            self._last = await start_apart(self._clock, lambda: self._bucket, lambda: self._last)
        else:
            self._last = self._clock.now()
        self.starts.append(self._last)


async def drive(
    url: str,
    ids: Sequence[str],
    make_limiter: Callable[[Clock], RateLimiter],
    *,
    duration: float,
    concurrency: int = 8,
    batch_size: int = 10,
    on_second: Callable[[float], None] | None = None,
) -> Trace:
    """Delete ``ids`` through the real dispatcher for ``duration`` seconds; the calls' trace.

    As ``run`` sends them: at most ``concurrency`` calls on the wire (``Working``'s places),
    from twice as many dispatcher tasks (``Working.tasks``), so a task asleep on a 429's
    ``Retry-After`` leaves its place to another.

    ``on_second(t)`` is called about once a second (t = seconds since start): a quota change.
    """
    from worker.api.client import ApiClient
    from worker.api.credentials import Credentials, StaticCredentials
    from worker.api.session import make_session
    from worker.dispatcher import Dispatcher
    from worker.pacing.paced import Working

    clock = MonotonicClock()
    trace = Trace(t0=clock.now())
    limiter = make_limiter(clock)
    working = Working(places=concurrency)
    session = make_session(concurrency=concurrency, connect_timeout=10, read_timeout=30)
    session.trace_configs.append(_writes_into(trace.writes, clock))
    try:
        client = ApiClient(
            session=session,
            endpoint=url,
            project_id=PROJECT,
            credentials=StaticCredentials(Credentials(ak=AK, sk=SK)),
        )
        dispatcher = Dispatcher(
            transport=_Recording(client, clock, trace),
            limiter=limiter,
            policy=RetryPolicy(max_attempts=6, max_throttled=1000),
            journal=NullJournal(),
            clock=clock,
            budget=DeletionBudget(None),
            max_attempts=6,
            working=working,
        )
        batches = iter(
            Batch(f"b{n}", tuple(ids[i : i + batch_size]))
            for n, i in enumerate(range(0, len(ids), batch_size))
        )

        async def worker() -> None:
            for batch in batches:
                with working.busy():
                    await dispatcher.process(batch)

        async def sampler() -> None:
            second = 0
            while True:
                trace.rates.append((clock.now() - trace.t0, limiter.rate))
                await anyio.sleep(0.1)
                elapsed = clock.now() - trace.t0
                if on_second is not None and int(elapsed) > second:
                    second = int(elapsed)
                    await anyio.to_thread.run_sync(on_second, elapsed)

        with anyio.move_on_after(duration):
            async with anyio.create_task_group() as group:
                group.start_soon(sampler)
                async with anyio.create_task_group() as workers:
                    for _ in range(working.tasks(concurrency)):
                        workers.start_soon(worker)
                group.cancel_scope.cancel()
    finally:
        await session.close()
    return trace


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentiles(values: Sequence[float], *qs: float) -> list[float]:
    """The ``qs`` quantiles (0-100) of ``values``, nearest rank; NaN for none."""
    ordered = sorted(values)
    if not ordered:
        return [math.nan for _ in qs]
    last = len(ordered) - 1
    return [ordered[min(last, max(0, math.ceil(q / 100 * len(ordered)) - 1))] for q in qs]


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {sys.platform}"


def repeats(default: int) -> int:
    return int(os.environ.get("BENCH_REPEATS", str(default)))


RESULTS = Path(os.environ.get("BENCH_RESULTS", "/tmp/devserver-reaper-bench.jsonl"))


def record(name: str, **figures: Any) -> None:
    """Print a figure and append it to ``BENCH_RESULTS`` (what the README table is made from)."""
    row = {"bench": name, **figures}
    print(json.dumps(row))
    with RESULTS.open("a") as out:
        out.write(json.dumps(row) + "\n")


class BotocoreCubic:
    """botocore's adaptive retry mode (``botocore/retries/adaptive.py`` and ``bucket.py``),
    ported to ``RateController``'s interface so the same limiter runs it: the peer that
    ``--rate auto`` is measured against. Unlimited until the first throttle; then CUBIC on
    the rate (scale 0.4, beta 0.7), capped at twice the measured send rate (0.5 s buckets,
    smoothing 0.8); it does not pause for Retry-After."""

    UNLIMITED = 10_000.0

    def __init__(self, now: float) -> None:
        self.enabled = False
        self.rate = self.UNLIMITED
        self.last_max_rate = 0.0
        self.last_throttle = now
        self.k = 0.0
        self.measured = 0.0
        self.bucket_start = math.floor(now * 2) / 2
        self.count = 0

    def pause_until(self) -> float:
        return -math.inf

    def rate_at(self, now: float) -> float:
        return self.rate

    def on_sent(self, now: float) -> None:
        pass

    def _measure(self, now: float) -> None:
        bucket = math.floor(now * 2) / 2
        self.count += 1
        if bucket > self.bucket_start:
            current = self.count / (bucket - self.bucket_start)
            self.measured = current * 0.8 + self.measured * 0.2
            self.count = 0
            self.bucket_start = bucket

    def on_success(self, now: float, latency: float | None = None) -> float:
        self._measure(now)
        if self.enabled:
            cubic = 0.4 * (now - self.last_throttle - self.k) ** 3 + self.last_max_rate
            self.rate = max(0.5, min(cubic, 2 * self.measured))
        return self.rate

    def on_throttle(
        self, now: float, retry_after: float | None = None, latency: float | None = None
    ) -> float:
        self._measure(now)
        base = min(self.measured, self.rate) if not self.enabled else self.rate
        self.last_max_rate = base
        self.k = (base * (1 - 0.7) / 0.4) ** (1 / 3)
        self.last_throttle = now
        self.enabled = True
        self.rate = max(0.5, min(base * 0.7, 2 * self.measured))
        return self.rate

    def on_overload(self, now: float, latency: float | None = None) -> float:
        return self.on_success(now, latency)


class RclonePacer:
    """rclone's default pacer (``lib/pacer``: ``Pacer`` with the ``Default`` calculator),
    ported to ``RateController``'s interface: the other peer ``--rate auto`` is measured
    against. rclone spaces the starts of calls by a sleep time (its pacer token comes back
    that long after a call takes it), so the rate is 1 / sleep with a burst of 1, which is
    what ``AdaptiveRateLimiter`` does with a burst of 1. When a call ends, ``Calculate``
    sets the sleep: to the ``Retry-After`` a backend passed on (``pacer.RetryAfterError``),
    at least ``min_sleep``; else, after a call to be retried (a 429 or 503 here), to
    ``sleep * 2**attack / (2**attack - 1)`` (doubled, at ``attack = 1``), at most
    ``max_sleep``; else, after a success, to ``sleep * (2**decay - 1) / 2**decay`` (3/4 of
    it, at ``decay = 2``), at least ``min_sleep``. rclone's defaults are 10 ms, 2 s, 2 and
    1; ``min_sleep`` is a backend's choice, and at 10 ms it would cap the pacer at 100
    calls/s, under the 500/s quota measured, so the benchmark passes 1 ms. A backend that
    does not pass ``Retry-After`` on is ``honour_retry_after=False``."""

    def __init__(
        self,
        *,
        min_sleep: float = 0.010,
        max_sleep: float = 2.0,
        decay: int = 2,
        attack: int = 1,
        honour_retry_after: bool = True,
    ) -> None:
        self.min_sleep = min_sleep
        self.max_sleep = max_sleep
        self.decay = decay
        self.attack = attack
        self.honour_retry_after = honour_retry_after
        self.sleep = min_sleep  # New(): Calculate on the zero state decays 0 up to min_sleep

    @property
    def rate(self) -> float:
        return 1.0 / self.sleep

    def pause_until(self) -> float:
        return -math.inf  # rclone spaces calls; it never holds them all back

    def rate_at(self, now: float) -> float:
        return self.rate

    def on_sent(self, now: float) -> None:
        pass

    def on_success(self, now: float, latency: float | None = None) -> float:
        scale = 2**self.decay
        self.sleep = max(self.min_sleep, self.sleep * (scale - 1) / scale)
        return self.rate

    def on_throttle(
        self, now: float, retry_after: float | None = None, latency: float | None = None
    ) -> float:
        if retry_after is not None and self.honour_retry_after:
            self.sleep = max(self.min_sleep, retry_after)
        else:
            self._retry()
        return self.rate

    def on_overload(self, now: float, latency: float | None = None) -> float:
        self._retry()  # a 503 is retried by rclone's backends too
        return self.rate

    def _retry(self) -> None:
        if self.attack == 0:
            self.sleep = self.max_sleep
            return
        scale = 2**self.attack
        self.sleep = min(self.max_sleep, self.sleep * scale / (scale - 1))


async def stop_replicas(replicas: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every replica, and their end waited for without blocking this event loop:
    an in-process simulator runs on it (bench_fleet, bench_serve_soak). Waited for with
    ``Popen.wait``, a call on the wire at the stop went unanswered until its replica's
    grace (20 s) ran out."""
    for replica in replicas:
        replica.send_signal(signal.SIGTERM)
    with anyio.CancelScope(shield=True), anyio.move_on_after(60):
        while any(replica.poll() is None for replica in replicas):
            await anyio.sleep(0.05)
    stuck = [replica.pid for replica in replicas if replica.poll() is None]
    for replica in replicas:
        if replica.poll() is None:
            replica.kill()
            replica.wait()
    assert not stuck, f"replicas {stuck} did not stop within 60 s of SIGTERM"
