"""enqueue: one stream entry per valid id, a summary line on stdout, the documented exit codes."""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import orjson
import pytest
import redis.asyncio as aioredis
from yarl import URL

from tests.conftest import REDIS_URL
from tests.e2e import signalled

pytestmark = pytest.mark.usefixtures("clean_env")


def _command(args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "worker", "enqueue", "--log-format", "json", *args]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("REAPER_")}


def enqueue(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(_command(args), env=_env(), capture_output=True, timeout=60, check=False)


async def enqueue_async(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(_command(args), env=_env(), check=False)


@pytest.mark.anyio
async def test_valid_ids_become_one_entry_each_and_invalid_ones_are_rejected_on_stderr(
    redis_prefix: str, tmp_path: Path
) -> None:
    source = tmp_path / "ids.jsonl.gz"
    lines = [orjson.dumps(x) for x in ("a-1", {"id": "b_2"}, "bad id", {"job_id": "c3"})]
    source.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    stream = redis_prefix + "ids"
    done = await enqueue_async("--input", str(source), "--stream", stream, "--redis-url", REDIS_URL)
    assert done.returncode == 1  # some rejected
    summary = orjson.loads(done.stdout)
    assert summary["enqueued"] == 3 and summary["rejected"] == 1 and summary["stream"] == stream
    events = [orjson.loads(line) for line in done.stderr.splitlines()]
    (rejected,) = [e for e in events if e["event"] == "job.rejected"]
    assert rejected["job_id"] == "bad id" and rejected["line"] == 3 and rejected["run_id"]
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        entries: Any = await client.xrange(stream)
    finally:
        await client.aclose()
    assert [f for _, f in entries] == [{b"id": b"a-1"}, {b"id": b"b_2"}, {b"id": b"c3"}]
    assert summary["first_entry"] == entries[0][0].decode()
    assert summary["last_entry"] == entries[-1][0].decode()


@pytest.mark.anyio
async def test_csv_columns_naming_project_and_region_go_into_the_entries_and_bad_ones_are_not(
    redis_prefix: str, tmp_path: Path
) -> None:
    """A line's project_id, region and endpoint ride in its entry for serve to route; an
    empty cell names nothing; a bad region is the line's rejection, never enqueued."""
    source = tmp_path / "ids.csv"
    source.write_text(
        "id,Project_ID,region,endpoint\n"
        "a-1,,,\n"
        "b-2,project-b,cn-south-1,\n"
        "c-3,project-c,,http://127.0.0.1:9/\n"
        "d-4,project-d,North 4,\n"
    )
    stream = redis_prefix + "ids"
    done = await enqueue_async("--input", str(source), "--stream", stream, "--redis-url", REDIS_URL)
    assert done.returncode == 1, done.stderr
    events = [orjson.loads(line) for line in done.stderr.splitlines()]
    (rejected,) = [e for e in events if e["event"] == "job.rejected"]
    assert rejected["line"] == 5 and rejected["reason"].startswith("region must")
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        entries: Any = await client.xrange(stream)
    finally:
        await client.aclose()
    assert [f for _, f in entries] == [
        {b"id": b"a-1"},
        {b"id": b"b-2", b"project_id": b"project-b", b"region": b"cn-south-1"},
        {b"id": b"c-3", b"project_id": b"project-c", b"endpoint": b"http://127.0.0.1:9"},
    ]


def test_a_missing_input_is_66_and_enqueues_nothing(tmp_path: Path) -> None:
    done = enqueue("--input", str(tmp_path / "nope.txt"))
    assert done.returncode == 66
    assert b"no such file" in done.stderr.lower() or b"nope.txt" in done.stderr


def test_a_missing_input_is_66_even_with_redis_down(tmp_path: Path) -> None:
    """The input is opened before Redis is asked: a typo in the path is 66, not 69."""
    done = enqueue("--input", str(tmp_path / "nope.txt"), "--redis-url", "redis://127.0.0.1:1/0")
    assert done.returncode == 66, done.stderr


def test_redis_that_does_not_answer_is_69(tmp_path: Path) -> None:
    source = tmp_path / "ids.txt"
    source.write_text("a\n")
    done = enqueue("--input", str(source), "--redis-url", "redis://127.0.0.1:1/0")
    assert done.returncode == 69
    assert b"enqueue.redis_unavailable" in done.stderr


def test_a_redis_url_that_is_not_one_is_78(tmp_path: Path) -> None:
    source = tmp_path / "ids.txt"
    source.write_text("a\n")
    done = enqueue("--input", str(source), "--redis-url", "http://example.invalid/")
    assert done.returncode == 78


@pytest.mark.anyio
async def test_a_database_redis_refuses_is_78_without_a_traceback(
    redis_prefix: str, tmp_path: Path
) -> None:
    source = tmp_path / "ids.txt"
    source.write_text("a\n")
    url = str(URL(REDIS_URL).with_path("/99999"))  # the real Redis, a database it lacks
    done = await enqueue_async("--input", str(source), "--redis-url", url)
    assert done.returncode == 78, done.stderr
    assert b"DB index is out of range" in done.stderr and b"Traceback" not in done.stderr


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("ssl_ca_certs=/etc/ca.pem", b"?ssl_ca_certs= is a setting of rediss:// (TLS)"),
        ("socket_timout=5", b"?socket_timout= is not a Redis setting"),
    ],
)
async def test_a_url_setting_its_connection_cannot_take_is_78_in_words(
    redis_prefix: str, tmp_path: Path, query: str, said: bytes
) -> None:
    """redis-py hands every ``?name=`` to its connection: one it does not take raised
    TypeError with a traceback at the first PING (exit 1). The password is never said."""
    source = tmp_path / "ids.txt"
    source.write_text("a\n")
    url = f"{URL(REDIS_URL).with_password('s3cr3t-canary')}?{query}"
    done = await enqueue_async("--input", str(source), "--redis-url", url)
    assert done.returncode == 78, done.stderr
    assert said in done.stderr and b"Traceback" not in done.stderr
    assert b"s3cr3t-canary" not in done.stderr + done.stdout


@pytest.mark.anyio
async def test_credentials_redis_refuses_are_78_and_never_echoed(
    redis_prefix: str, tmp_path: Path
) -> None:
    """Bad settings, not an outage: it was 69 (serve even waited 30 s for it first)."""
    source = tmp_path / "ids.txt"
    source.write_text("a\n")
    url = str(URL(REDIS_URL).with_user("nobody").with_password("s3cr3t-canary"))
    done = await enqueue_async("--input", str(source), "--redis-url", url)
    assert done.returncode == 78, done.stderr
    assert b"refused the user name or password" in done.stderr
    assert b"s3cr3t-canary" not in done.stderr + done.stdout


@pytest.mark.anyio
async def test_a_stream_name_of_a_key_of_another_type_is_a_settings_error(
    redis_prefix: str, tmp_path: Path
) -> None:
    """--stream naming a string key: Redis answers WRONGTYPE, which was a traceback and
    exit 1; it is a setting to fix: 78, one clear error, no traceback."""
    stream = redis_prefix + "wt"
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.set(stream, "hello")
    finally:
        await client.aclose()
    source = tmp_path / "ids.txt"
    source.write_text("a-1\n")
    done = await enqueue_async("--input", str(source), "--stream", stream, "--redis-url", REDIS_URL)
    assert done.returncode == 78, done.stderr
    assert b"Traceback" not in done.stderr
    events = [orjson.loads(line) for line in done.stderr.splitlines()]
    (error,) = [e for e in events if e["event"] == "enqueue.config_error"]
    assert stream in error["error"] and "not a stream" in error["error"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("variable", "value"), [("REAPER_DRY_RUN", "true"), ("REAPER_MAX_DELETIONS", "1")]
)
async def test_enqueue_refuses_the_settings_only_a_run_can_keep(
    redis_prefix: str, tmp_path: Path, variable: str, value: str
) -> None:
    """``REAPER_DRY_RUN=true enqueue`` put every id on the stream serve deletes from (and a
    cap in ``REAPER_MAX_DELETIONS`` kept none): not flags of enqueue, they were passed over
    when set any other way. 78 before Redis is touched, as serve does."""
    source = tmp_path / "ids.txt"
    source.write_text("job-a\njob-b\n")
    stream = redis_prefix + "dry"
    done = await anyio.run_process(
        _command(("--input", str(source), "--redis-url", REDIS_URL, "--stream", stream)),
        env={**_env(), variable: value},
        check=False,
    )
    assert done.returncode == 78, done.stderr
    assert f"{variable.removeprefix('REAPER_').lower()} is for run".encode() in done.stderr
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        assert not await client.exists(stream)
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_stdin_closed_at_start_is_66_in_words_and_nothing_is_enqueued(
    redis_prefix: str, redis_client: Any
) -> None:
    """``enqueue --input - <&-``, as a cron line or a CI step without stdin runs it: stdin is
    not an empty input but none at all. It raised an AttributeError traceback and exited 1,
    which the table calls "some ids rejected"."""
    stream = redis_prefix + "ids"
    line = " ".join(_command(("--input", "-", "--stream", stream, "--redis-url", REDIS_URL)))
    done = await anyio.run_process(["bash", "-c", f"exec {line} <&-"], env=_env(), check=False)
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 66, (out, err)
    assert "Traceback" not in out + err
    assert "stdin is closed (<&-)" in err
    assert await redis_client.exists(stream) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("stdout", ["> /dev/full", "| (exec 0<&-; sleep 1)"])
async def test_a_summary_stdout_cannot_take_is_said_on_stderr_with_the_ids_enqueued(
    redis_prefix: str, tmp_path: Path, stdout: str
) -> None:
    """Every id is on the stream before the summary line is written; stdout full or its
    reader gone then raised an OSError traceback and exited 1 ("some ids rejected", when
    none was). Now the summary is said on stderr and the exit code is the enqueue's."""
    source = tmp_path / "ids.txt"
    source.write_text("a-1\nb-2\nc-3\n")
    stream = redis_prefix + "ids"
    line = " ".join(
        _command(("--input", str(source), "--stream", stream, "--redis-url", REDIS_URL))
    )
    done = await anyio.run_process(
        ["bash", "-c", f"set -o pipefail; {line} {stdout}"], env=_env(), check=False
    )
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "Traceback" not in err
    assert f"3 ids are on the stream {stream} (entries " in err
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        assert await client.xlen(stream) == 3
    finally:
        await client.aclose()


def _dropping_after(
    limit: int, stream: str, *, drop: bool = True, reached: threading.Event | None = None
) -> int:
    """A port that relays to the real Redis until a pipelined chunk takes the XADDs sent past
    ``limit``: then its replies are held back, and once Redis has added the whole chunk
    (``reached`` is set) the client's connection is dropped (once), as a network lost before
    the answer drops it; without ``drop``, the answers are held back for good (a Redis that
    no longer answers)."""
    import redis

    upstream = URL(REDIS_URL)
    listener = socket.create_server(("127.0.0.1", 0))
    dropped = threading.Event()

    def relay(client: socket.socket) -> None:
        server = socket.create_connection((upstream.host or "127.0.0.1", upstream.port or 6379))
        held = threading.Event()

        def replies() -> None:
            with contextlib.suppress(OSError):
                while data := server.recv(65536):
                    if not held.is_set():
                        client.sendall(data)

        threading.Thread(target=replies, daemon=True).start()
        sent = 0
        with contextlib.suppress(OSError), client, server:
            while data := client.recv(65536):
                sent += data.count(b"XADD")
                past = sent > limit and not dropped.is_set()
                if past:
                    held.set()
                server.sendall(data)
                if past:
                    dropped.set()
                    with redis.Redis.from_url(REDIS_URL) as look:
                        while int(look.xlen(stream)) < 2 * limit:  # the chunk reached Redis
                            time.sleep(0.01)
                    if reached is not None:
                        reached.set()
                    if drop:
                        client.shutdown(socket.SHUT_RDWR)
                        return

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                threading.Thread(target=relay, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return int(listener.getsockname()[1])


@pytest.mark.anyio
async def test_a_chunk_whose_answer_was_lost_is_said_in_doubt_not_left_out(
    redis_prefix: str, tmp_path: Path
) -> None:
    """The connection lost after Redis added the second chunk, before its answer: the
    summary said 500 enqueued and the message "after 500 ids", while the stream held 1,000.
    Now the 500 sent are said in doubt (summary, event, message), never claimed left out."""
    from worker.commands.enqueue import CHUNK

    stream = redis_prefix + "ids"
    source = tmp_path / "ids.txt"
    source.write_text("".join(f"job-{i}\n" for i in range(5 * CHUNK)), encoding="utf-8")
    port = _dropping_after(CHUNK, stream)
    done = await enqueue_async(
        "--input", str(source), "--stream", stream, "--redis-url", f"redis://127.0.0.1:{port}/0"
    )
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        on_stream = await client.xlen(stream)
    finally:
        await client.aclose()
    summary = orjson.loads(done.stdout)
    assert done.returncode == 69, done.stderr[-2000:]
    assert on_stream == 2 * CHUNK  # the lost answer's chunk is there; nothing was sent twice
    assert summary["enqueued"] == CHUNK and summary["in_doubt"] == CHUNK, summary
    assert summary["enqueued"] + summary["in_doubt"] >= on_stream
    (event,) = [orjson.loads(line) for line in done.stderr.splitlines()]
    assert event["in_doubt"] == CHUNK and "may be on the stream too" in event["error"], event


@pytest.mark.anyio
async def test_a_second_signal_while_a_chunk_is_added_stops_at_once_saying_it_in_doubt(
    redis_prefix: str, tmp_path: Path
) -> None:
    """A Redis that stops answering while the second chunk is added: a first SIGTERM waits
    for the chunk's answer (said on stderr), a second one stops at once: 75, the chunk said
    in doubt (summary and line). The second was ignored: the answer was waited for until
    Redis's 30 s timeout, and the run ended 69 as of a Redis lost, not as stopped."""
    from worker.commands.enqueue import CHUNK

    stream = redis_prefix + "ids"
    source = tmp_path / "ids.txt"
    source.write_text("".join(f"job-{i}\n" for i in range(5 * CHUNK)), encoding="utf-8")
    reached = threading.Event()
    port = _dropping_after(CHUNK, stream, drop=False, reached=reached)
    args = (
        "--input",
        str(source),
        "--stream",
        stream,
        "--redis-url",
        f"redis://127.0.0.1:{port}/0",
    )

    async def held() -> None:  # the chunk is on Redis, its answer held back
        assert await anyio.to_thread.run_sync(reached.wait, 60), "the chunk never reached Redis"

    steps = [(b"", signal.SIGTERM), (b"again to stop now", signal.SIGTERM)]
    code, out, said = await signalled(_command(args), _env(), steps, ready=held)
    assert code == 75, said[-2000:]
    summary = orjson.loads(out)
    assert summary["enqueued"] == CHUNK and summary["in_doubt"] == CHUNK, summary
    assert f"stopped by SIGTERM: {CHUNK} ids are on the stream {stream}" in said, said[-2000:]
    assert "may be on the stream too" in said and "Traceback" not in said, said[-2000:]


_HANDED_OVER_AS_THE_LOOP_CLOSES = (
    "import asyncio, runpy, sys, threading, time\n"
    "import worker.pipeline as pipeline\n"
    "release, calls, whole = threading.Event(), [], pipeline._next_chunk\n"
    "def held(entries, size):\n"
    "    calls.append(size)\n"
    "    if len(calls) == 2:\n"
    "        sys.stderr.write('reading\\n'); sys.stderr.flush()\n"
    "        release.wait()\n"
    "    return whole(entries, size)\n"
    "pipeline._next_chunk = held\n"
    "close = asyncio.BaseEventLoop.close\n"
    "def closing(self):\n"
    "    ready = len(self._ready)\n"
    "    reader = [t for t in threading.enumerate() if t.name == 'reaper-input']\n"
    "    release.set()\n"
    "    end = time.monotonic() + 10\n"
    "    while len(self._ready) == ready and any(t.is_alive() for t in reader) \\\n"
    "            and time.monotonic() < end:\n"
    "        time.sleep(0.001)\n"
    "    close(self)\n"
    "asyncio.BaseEventLoop.close = closing\n"
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n"
)
"""``python -W error::RuntimeWarning -m worker ARGS`` whose input thread reads its second
chunk only once the event loop is closing (after its last turn, before ``close``): the
hand-over of that chunk then meets a loop that will never run it, as a slow pipe's chunk
met it after Ctrl-C (1 of 27 in a trial). ``reading`` on stderr once the thread waits."""


@pytest.mark.anyio
async def test_a_chunk_handed_over_as_the_loop_closes_leaves_no_coroutine_unawaited(
    redis_prefix: str, tmp_path: Path
) -> None:
    """SIGTERM while the input thread reads, its chunk handed over as the loop closes: the
    hand-over made a coroutine in the thread (``task_wrapper``) that the closed loop never
    ran: "RuntimeWarning: coroutine ... was never awaited" at exit. Now nothing is left
    unawaited: 75 and the first chunk on the stream, stderr without a warning."""
    from worker.commands.enqueue import CHUNK

    stream = redis_prefix + "ids"
    source = tmp_path / "ids.txt"
    source.write_text("".join(f"job-{i}\n" for i in range(3 * CHUNK)), encoding="utf-8")
    args = ("--input", str(source), "--stream", stream, "--redis-url", REDIS_URL)
    command = [sys.executable, "-W", "error::RuntimeWarning", "-c",
               _HANDED_OVER_AS_THE_LOOP_CLOSES, *_command(args)[3:]]  # fmt: skip
    code, out, said = await signalled(command, _env(), [(b"reading", signal.SIGTERM)])
    assert code == 75, said[-2000:]
    assert orjson.loads(out)["enqueued"] in (0, CHUNK), out
    assert "never awaited" not in said and "RuntimeWarning" not in said, said[-2000:]
    assert "Traceback" not in said, said[-2000:]
