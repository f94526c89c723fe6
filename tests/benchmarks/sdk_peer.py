"""The official SDK deleting ids from a file, as the benchmark's peer. Run as a script:

    python tests/benchmarks/sdk_peer.py URL PROJECT AK SK IDS_FILE MODE [BATCH] [THREADS]

MODE ``async``: the SDK's ``ModelArtsAsyncClient`` (its own pool of 8 threads around
blocking ``requests``), every batch submitted at once. MODE ``threads``: a pool of
``THREADS`` (8) threads around the blocking ``ModelArtsClient``. MODE ``async-setup`` or
``threads-setup``: everything that mode does but the calls (import the SDK, read the ids,
build the config, credentials and client), then stop without a call: the CPU
baseline, run with an empty ids file. Prints one JSON line: seconds, cpu (this process's
CPU seconds over those seconds, every thread), calls, ids, errors.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def main(argv: list[str]) -> int:
    url, project, ak, sk, ids_file, mode = argv[:6]
    batch = int(argv[6]) if len(argv) > 6 else 50
    threads = int(argv[7]) if len(argv) > 7 else 8
    os.environ["HOME"] = tempfile.mkdtemp()  # the SDK writes ~/.huaweicloud on import
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.http.http_config import HttpConfig
    from huaweicloudsdkmodelarts.v1 import (
        DeleteDevServerJobsRequest,
        ModelArtsAsyncClient,
        ModelArtsClient,
        ServerJobDeleteRequest,
    )

    mode, _, setup = mode.partition("-")
    if mode not in ("async", "threads") or setup not in ("", "setup"):
        raise SystemExit(f"unknown mode {argv[5]!r}")
    with open(ids_file, encoding="ascii") as handle:
        ids = handle.read().split()
    batches = [ids[i : i + batch] for i in range(0, len(ids), batch)]
    config = HttpConfig.get_default_config()
    config.ignore_ssl_verification = True
    credentials = BasicCredentials(ak, sk, project)
    kind: Any = ModelArtsAsyncClient if mode == "async" else ModelArtsClient
    client = (
        kind.new_builder()
        .with_http_config(config)
        .with_credentials(credentials)
        .with_endpoints([url])
        .build()
    )

    def request(job_ids: list[str]) -> Any:
        return DeleteDevServerJobsRequest(body=ServerJobDeleteRequest(job_ids=job_ids))

    errors = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    if setup:
        pass  # the baseline stops here: everything but the calls is done
    elif mode == "async":
        futures = [client.delete_dev_server_jobs_async(request(b)) for b in batches]
        for future in futures:
            try:
                future.result()
            except Exception:
                errors += 1
    else:

        def one(job_ids: list[str]) -> bool:
            try:
                client.delete_dev_server_jobs(request(job_ids))
            except Exception:
                return False
            return True

        with ThreadPoolExecutor(max_workers=threads) as pool:
            errors = sum(not ok for ok in pool.map(one, batches))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    result = {
        "seconds": seconds,
        "cpu": cpu,
        "calls": len(batches),
        "ids": len(ids),
        "errors": errors,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
