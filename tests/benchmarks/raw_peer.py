"""The floor under every side of ``bench_sdk``: the cheapest client we can write. Run as a
script, as ``sdk_peer.py`` is:

    python tests/benchmarks/raw_peer.py URL PROJECT AK SK IDS_FILE MODE [BATCH] [CONCURRENCY]
        [EVENTS_FILE]

MODE ``raw``: raw aiohttp, ``CONCURRENCY`` (8) workers, each request signed with
``worker.api.signer.sign`` just before it is sent (a signature carries its date, so none can be
made in advance); the body is read, not parsed, and nothing is logged or recorded. MODE
``raw-setup``: everything but the calls (imports, the ids, the session), the CPU baseline,
run with an empty ids file. MODE ``least``: ``raw`` plus the least per-id work ``run`` is
asked for: each id validated and de-duplicated before it is sent, and each returned record
written as its ``job.deleted`` event, a JSON line with the two times in ISO-8601, to
``EVENTS_FILE`` (the ninth argument). Prints one JSON line: seconds, cpu (this process's CPU seconds
over those seconds), calls, ids, errors (calls that were not a 200).

No client that signs and sends the same calls over this HTTP stack can cost less, so its
figures bound what any side can reach on the machine at hand.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO

import aiohttp
import anyio
import orjson
import yarl

from worker.api.signer import sign
from worker.input.intake import validate
from worker.logsetup import timestamp
from worker.types import Candidate, stamp_iso

Handler = Callable[[bytes, int], None]
"""What ``least`` does with a 200's body: (body, batch number)."""


async def raw_deletes(
    url: str,
    project: str,
    ak: str,
    sk: str,
    ids: list[str],
    batch: int,
    concurrency: int,
    handle: Handler | None = None,
) -> tuple[float, float, int]:
    """Delete ``ids`` in batches of ``batch`` with ``concurrency`` workers: (seconds, this
    process's CPU seconds over them, calls that were not a 200). ``handle`` gets each 200's
    body; without it the body is read and dropped."""
    path = f"/v1/{project}/dev-servers/jobs"
    host = yarl.URL(url).raw_authority
    target = yarl.URL(url + path, encoded=True)
    headers = {"Content-Type": "application/json;charset=UTF-8", "X-Project-Id": project}
    batches = iter(enumerate([ids[i : i + batch] for i in range(0, len(ids), batch)]))
    failed = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failed
        for number, job_ids in batches:
            body = orjson.dumps({"job_ids": job_ids})
            signed = sign(method="DELETE", host=host, path=path, headers=headers, body=body,
                          ak=ak, sk=sk, when=datetime.now(UTC))  # fmt: skip
            async with session.delete(target, data=body, headers=signed.headers) as answer:
                body = await answer.read()
                failed += answer.status != 200
                if handle is not None and answer.status == 200:
                    handle(body, number)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started, cpu_started = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as group:
            for _ in range(concurrency if ids else 0):
                group.start_soon(worker, session)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return seconds, cpu, failed


def admitted(lines: list[str]) -> list[str]:
    """The ids ``run`` would send: valid, each once, in order."""
    seen: set[str] = set()
    out: list[str] = []
    for number, line in enumerate(lines, start=1):
        entry = validate(line, number)
        if isinstance(entry, Candidate) and entry.job_id not in seen:
            seen.add(entry.job_id)
            out.append(entry.job_id)
    return out


def event_writer(out: IO[bytes]) -> Handler:
    """Each record of a body as its ``job.deleted`` event line, a batch in one write."""
    context = b',"event":"job.deleted","run_id":"least","level":"info","timestamp":'

    def handle(body: bytes, number: int) -> None:
        tail = context + orjson.dumps(timestamp()) + b"}"
        batch_id = f"least-{number:06d}"
        lines = []
        for record in orjson.loads(body)["data"]:
            fields = {
                "job_id": record["id"],
                "name": record.get("name"),
                "user_name": record.get("user_name"),
                "description": record.get("description"),
                "type": record.get("type"),
                "status": record.get("status"),
                "abnormal_count": record.get("abnormal_count"),
                "create_at": stamp_iso(record.get("create_at")),
                "update_at": stamp_iso(record.get("update_at")),
                "batch_id": batch_id,
                "request_id": None,
            }
            lines.append(orjson.dumps(fields)[:-1] + tail)
        out.write(b"\n".join(lines) + b"\n")
        out.flush()

    return handle


def main(argv: list[str]) -> int:
    url, project, ak, sk, ids_file, mode = argv[:6]
    batch = int(argv[6]) if len(argv) > 6 else 50
    concurrency = int(argv[7]) if len(argv) > 7 else 8
    if mode not in ("raw", "raw-setup", "least"):
        raise SystemExit(f"unknown mode {mode!r}")
    with open(ids_file, encoding="ascii") as source:
        ids = source.read().split()
    if mode == "raw-setup":
        ids = []  # the session is still opened and closed: everything but the calls
    if mode == "least":
        with open(argv[8], "wb") as events:
            ids = admitted(ids)
            seconds, cpu, errors = anyio.run(
                raw_deletes, url, project, ak, sk, ids, batch, concurrency, event_writer(events)
            )
    else:
        seconds, cpu, errors = anyio.run(raw_deletes, url, project, ak, sk, ids, batch, concurrency)
    result = {
        "seconds": seconds,
        "cpu": cpu,
        "calls": -(-len(ids) // batch),
        "ids": len(ids),
        "errors": errors,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
