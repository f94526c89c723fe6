"""Helpers for end-to-end tests: the real CLI in a subprocess against an in-process simulator."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
from aiohttp import web
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.fakes import FakeClock
from worker.api.client import ApiClient, make_session
from worker.api.credentials import Credentials, StaticCredentials
from worker.discovery.guard import PacedReader
from worker.pacing.bucket import UnlimitedRateLimiter
from worker.pacing.retry import RetryPolicy

SIM_AK = "DEMOAK"
SIM_SK = "demo-secret-key"
SIM_PROJECT = "demo-project"


def reaper_env(endpoint: str, **extra: str) -> dict[str, str]:
    """A clean environment for the CLI: only what the test sets, plus PATH and HOME."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("REAPER_", "HUAWEICLOUD_", "HC_CONTAINER_"))
    }
    env.update(
        REAPER_ENDPOINT=endpoint,
        REAPER_PROJECT_ID=SIM_PROJECT,
        REAPER_AK=SIM_AK,
        REAPER_SK=SIM_SK,
        REAPER_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass(frozen=True, slots=True)
class Finished:
    code: int
    stdout: str
    stderr: str

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.stdout.splitlines():
            if not line.startswith("{"):
                continue
            event = orjson.loads(line)
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def summary(self) -> dict[str, Any]:
        summaries = self.events("run.summary")
        assert len(summaries) == 1, f"expected one run.summary, got {len(summaries)}\n{self.stderr}"
        return summaries[0]


# ``python -m worker`` under a file size limit: a write past it fails (EFBIG) as on a full
# disk, in no file but those of the process (Python ignores SIGXFSZ), with no mount needed.
_FILES_UP_TO = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
    "os.execv(sys.executable, [sys.executable, '-m', 'worker', *sys.argv[2:]])"
)


async def reaper(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    stdin: bytes | None = None,
    files_up_to: int | None = None,
    cwd: Path | None = None,
) -> Finished:
    """Run ``python -m worker ARGS`` to the end without blocking the event loop;
    ``files_up_to``: no file it writes may grow past that many bytes (a full disk);
    ``cwd``: the directory it runs in (the test's own, by default)."""
    limited = [] if files_up_to is None else ["-c", _FILES_UP_TO, str(files_up_to)]
    result = await anyio.run_process(
        [sys.executable, *(limited or ["-m", "worker"]), *args],
        env=dict(env),
        input=stdin if stdin is not None else b"",
        check=False,
        cwd=cwd,
    )
    return Finished(result.returncode, result.stdout.decode(), result.stderr.decode())


HUNG_UP_AS_FROM_A_SHELL = (
    "import runpy, signal; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)"
)
"""``python -m worker`` with SIGHUP's default action, as a shell starts it: the tests may
run under ``nohup``, whose ignored SIGHUP the run would keep (and go on through a hang-up)."""


async def start_reaper(args: Sequence[str], env: Mapping[str, str]) -> Process:
    return await anyio.open_process(
        [sys.executable, "-c", HUNG_UP_AS_FROM_A_SHELL, *args], env=dict(env), stdin=None
    )


async def until(
    check: Callable[[], Awaitable[object]], timeout: float = 60, *, every: float = 0.05
) -> None:
    """Poll ``check`` every ``every`` seconds until it holds. ``timeout`` only stops a hang
    (under load a state may take long to come): a test waits on a state, never on time."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(every)


def deletes_sent(sim: Any, calls: int) -> Callable[[], Awaitable[bool]]:
    """For ``until``: the simulator ``sim`` has had ``calls`` DELETE calls (a run under way)."""

    async def sent() -> bool:
        return bool(sim.stats.delete_calls >= calls)

    return sent


async def kill_when(process: Process, ready: Callable[[], bool], *, within: float = 30) -> None:
    """``kill -9`` the process as soon as ``ready()`` holds, and reap it."""
    with anyio.fail_after(within):
        while not ready():
            await anyio.sleep(0.01)
    process.kill()
    await process.wait()


async def read_all(process: Process) -> tuple[str, str]:
    out, err = bytearray(), bytearray()

    async def drain(stream: Any, into: bytearray) -> None:
        if stream is None:
            return
        async for chunk in stream:
            into.extend(chunk)

    async with anyio.create_task_group() as group:
        group.start_soon(drain, process.stdout, out)
        group.start_soon(drain, process.stderr, err)
    await process.wait()
    return out.decode(), err.decode()


def write_ids(path: Path, ids: Sequence[str]) -> Path:
    path.write_text("\n".join(ids) + "\n", encoding="utf-8")
    return path


def results(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


@asynccontextmanager
async def paced_reader(
    url: str, *, clock: FakeClock | None = None, attempts: int = 4
) -> AsyncIterator[PacedReader]:
    """Show and list calls to the simulator at ``url``, signed, unpaced, retried on virtual
    time (``attempts`` per call)."""
    async with make_session(concurrency=2, connect_timeout=2, read_timeout=5) as session:
        api = ApiClient(
            session=session,
            endpoint=url,
            project_id=SIM_PROJECT,
            credentials=StaticCredentials(Credentials(ak=SIM_AK, sk=SIM_SK)),
        )
        yield PacedReader(
            api=api,
            limiter=UnlimitedRateLimiter(),
            policy=RetryPolicy(max_attempts=attempts, rng=random.Random(1)),
            clock=clock or FakeClock(),
        )


ListHandler = Callable[[web.Request], Awaitable[web.Response]]


@asynccontextmanager
async def list_endpoint(handler: ListHandler) -> AsyncIterator[str]:
    """A bare list endpoint (not signed) answered by ``handler``, on a free loopback port."""
    app = web.Application()
    app.router.add_get("/v1/{project}/dev-servers/jobs", handler)
    async with serve_app(app) as url:
        yield url


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def mount_secret(folder: Path, mode: int = 0o400, **keys: str) -> dict[str, Path]:
    """Key files as the kubelet mounts a Secret, and rotates it: each file is a link through
    ``..data``, which a rotation points at a new version directory in one rename; ``mode``:
    the Secret's ``defaultMode``."""
    version = folder / f"..v{len(list(folder.glob('..v*')))}"
    version.mkdir()
    for name, value in keys.items():
        (version / name).write_text(value + "\n")
        (version / name).chmod(mode)
    staging = folder / "..data_tmp"
    staging.symlink_to(version.name)
    staging.replace(folder / "..data")
    for name in keys:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")
    return {name: folder / name for name in keys}


async def stop_and_drain(process: Process, signum: signal.Signals = signal.SIGTERM) -> bytes:
    """SIGTERM (or ``signum``) a running worker, read what is left of its stdout, wait for
    it to exit and close it: the rest of its output. A process that has exited already
    (crashed) is only drained: its own exit is what the caller's assertion should show."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)
    rest = b""
    with anyio.fail_after(30):
        if process.stdout is not None:
            async for chunk in process.stdout:
                rest += chunk
        await process.wait()
    await process.aclose()
    return rest


@dataclass
class Served:
    """A ``serve`` subprocess printing JSON events, and those it has printed
    (:func:`collect`)."""

    process: Process
    events: list[dict[str, Any]] = field(default_factory=list)
    started: anyio.Event = field(default_factory=anyio.Event)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    @property
    def port(self) -> int:
        """The health and metrics port it said it bound (``serve.started``)."""
        return int(self.named("serve.started")[0]["http_port"])


async def collect(served: Served) -> None:
    """Each line of ``served``'s stdout into its events, until it closes; ``started`` set
    at ``serve.started``."""
    assert served.process.stdout is not None
    lines = BufferedByteReceiveStream(served.process.stdout)
    while True:
        try:
            line = await lines.receive_until(b"\n", 1 << 20)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            return
        event = orjson.loads(line)
        served.events.append(event)
        if event.get("event") == "serve.started":
            served.started.set()


@asynccontextmanager
async def serving(
    sim: Any, redis_url: str, errors: Path, *flags: str, consumer: str = "a"
) -> AsyncIterator[Served]:
    """A ``serve`` subprocess on the simulator ``sim`` and the Redis at ``redis_url`` (JSON
    events, a free health port, consumer name ``consumer``, more ``flags``), its stderr into
    ``errors``, its events collected; killed at the end of the block if it still runs."""
    command = [sys.executable, "-m", "worker", "serve", "--endpoint", sim.url,
               "--project-id", sim.config.project_id, "--ak", SIM_AK,
               "--redis-url", redis_url, "--http-port", "0", "--log-format", "json",
               "--consumer", consumer, *flags]  # fmt: skip
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REAPER_", "HUAWEICLOUD_", "HC_CONTAINER_"))}  # fmt: skip
    with errors.open("wb") as err:
        process = await anyio.open_process(command, env=env | {"REAPER_SK": SIM_SK}, stderr=err)
    served = Served(process)
    async with anyio.create_task_group() as group, reaped(process):
        group.start_soon(collect, served)
        with anyio.fail_after(60):
            await served.started.wait()
        yield served


@asynccontextmanager
async def reaped(process: Process) -> AsyncIterator[Process]:
    """``process`` for the length of the block; killed at its end if it still runs."""
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.aclose()


async def signalled(
    command: Sequence[str],
    env: Mapping[str, str] | None,
    steps: Sequence[tuple[bytes, signal.Signals]],
    *,
    ready: Callable[[], Awaitable[object]] | None = None,
) -> tuple[int, str, str]:
    """Run ``command``; once ``ready`` (if given) returns, for each ``(word, signum)`` of
    ``steps`` in turn, send ``signum`` as soon as its stderr has said ``word`` (``b""``: at
    once). Its exit code (``-9``: killed), stdout and stderr, read to their ends."""
    process = await anyio.open_process(command, env=env)
    async with reaped(process):
        assert process.stdout is not None and process.stderr is not None
        if ready is not None:
            await ready()
        err = b""
        with anyio.fail_after(60):  # a hang's guard, not a measure
            for word, signum in steps:
                while word not in err:
                    err += await process.stderr.receive()
                process.send_signal(signum)
            err += b"".join([chunk async for chunk in process.stderr])
            out = b"".join([chunk async for chunk in process.stdout])
            code = await process.wait()
    return code, out.decode(), err.decode()


async def stopped(served: Served) -> int:
    """SIGTERM a ``serve`` and wait for it to exit (30 s at most): its exit code."""
    with contextlib.suppress(ProcessLookupError):
        served.process.send_signal(signal.SIGTERM)
    with anyio.fail_after(30):
        return await served.process.wait()


async def redis_errors_of(port: int) -> float:
    """The Redis calls a ``serve`` found refused (or away), from the ``/metrics`` of its
    health port ``port``."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as answer,
    ):
        text = await answer.text()
    found = re.search(r"^devserver_reaper_redis_errors_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0
