"""The floor under every side of ``bench_sdk``: the cheapest client we can write. Run as a
script, as ``sdk_peer.py`` is:

    python tests/benchmarks/raw_peer.py URL PROJECT AK SK IDS_FILE MODE [BATCH] [CONCURRENCY]

MODE ``raw``: raw aiohttp, ``CONCURRENCY`` (8) workers, each request signed with
``worker.signer.sign`` just before it is sent (a signature carries its date, so none can be
made in advance); the body is read, not parsed, and nothing is logged or recorded. MODE
``raw-setup``: everything but the calls (imports, the ids, the session), the CPU baseline,
run with an empty ids file. Prints one JSON line: seconds, cpu (this process's CPU seconds
over those seconds), calls, ids, errors (calls that were not a 200).

No client that signs and sends the same calls over this HTTP stack can cost less, so its
figures bound what any side can reach on the machine at hand.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime

import aiohttp
import anyio
import orjson
import yarl

from worker.signer import sign


async def raw_deletes(
    url: str, project: str, ak: str, sk: str, ids: list[str], batch: int, concurrency: int
) -> tuple[float, float, int]:
    """Delete ``ids`` in batches of ``batch`` with ``concurrency`` workers: (seconds, this
    process's CPU seconds over them, calls that were not a 200)."""
    path = f"/v1/{project}/dev-servers/jobs"
    host = yarl.URL(url).raw_authority
    target = yarl.URL(url + path, encoded=True)
    headers = {"Content-Type": "application/json;charset=UTF-8", "X-Project-Id": project}
    batches = iter([ids[i : i + batch] for i in range(0, len(ids), batch)])
    failed = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failed
        for job_ids in batches:
            body = orjson.dumps({"job_ids": job_ids})
            signed = sign(method="DELETE", host=host, path=path, headers=headers, body=body,
                          ak=ak, sk=sk, when=datetime.now(UTC))  # fmt: skip
            async with session.delete(target, data=body, headers=signed.headers) as answer:
                await answer.read()
                failed += answer.status != 200

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started, cpu_started = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as group:
            for _ in range(concurrency if ids else 0):
                group.start_soon(worker, session)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return seconds, cpu, failed


def main(argv: list[str]) -> int:
    url, project, ak, sk, ids_file, mode = argv[:6]
    batch = int(argv[6]) if len(argv) > 6 else 50
    concurrency = int(argv[7]) if len(argv) > 7 else 8
    if mode not in ("raw", "raw-setup"):
        raise SystemExit(f"unknown mode {mode!r}")
    with open(ids_file, encoding="ascii") as handle:
        ids = handle.read().split()
    if mode == "raw-setup":
        ids = []  # the session is still opened and closed: everything but the calls
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
