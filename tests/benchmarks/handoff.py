"""Where a slot waits between one call's answer and its next call: a runner for ``bench_sdk``.

    python tests/benchmarks/handoff.py OUT_JSON ours ARGS...   # ``devserver-reaper ARGS``
    python tests/benchmarks/handoff.py OUT_JSON raw ARGS...    # ``raw_peer.py ARGS``

Runs the side in this process with aiohttp's ``ClientSession._request`` and
``ClientResponse.read`` wrapped: for each task, the time from the end of reading an answer
to the start of that task's next request (the **hand-off**: nothing is on the wire for that
slot meanwhile). For ``ours`` it also marks, in that task, the answer parsed
(``parse_deleted``), the outcomes settled (``Dispatcher._settle``: the outcomes, the journal,
the ``job.deleted`` lines), the next batch handed over (``RunJournal.dispatching``) and the
token taken (``RunJournal.sent``, after the breaker and the limiter), so the hand-off is cut
into the stages it passes. Writes ``OUT_JSON`` at exit: the hand-offs' count, mean and
percentiles in ms, and the mean of each stage (``{"from>to": ms}``). The marks cost a few µs
a call, so the side's own figures from such a run are not the contest's.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import runpy
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import client, client_reqrep

RAW = Path(__file__).with_name("raw_peer.py")

_marks: dict[int, list[tuple[str, float]]] = defaultdict(list)
_stages: dict[str, list[float]] = defaultdict(list)
_handoffs: list[float] = []


def _replace(owner: Any, name: str, value: Any) -> None:
    setattr(owner, name, value)


def _mark(name: str) -> None:
    _marks[id(asyncio.current_task())].append((name, time.perf_counter()))


def _instrument() -> None:
    request, read = client.ClientSession._request, client_reqrep.ClientResponse.read

    async def timed_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        now = time.perf_counter()
        marks = _marks.pop(id(asyncio.current_task()), [])
        if marks and marks[0][0] == "answer":
            marks.append(("request", now))
            _handoffs.append(now - marks[0][1])
            for (first, at), (then, until) in itertools.pairwise(marks):
                _stages[f"{first}>{then}"].append(until - at)
        return await request(self, *args, **kwargs)

    async def timed_read(self: Any) -> bytes:
        body = await read(self)
        _marks[id(asyncio.current_task())] = [("answer", time.perf_counter())]
        return body

    _replace(client.ClientSession, "_request", timed_request)
    _replace(client_reqrep.ClientResponse, "read", timed_read)


def _instrument_ours() -> None:
    import worker.api.client as api_client
    from worker.dispatcher import Dispatcher
    from worker.outcomes.journal import RunJournal

    parse = getattr(api_client, "parse_deleted")  # noqa: B009 - not re-exported

    def parse_deleted(*args: Any, **kwargs: Any) -> Any:
        parsed = parse(*args, **kwargs)
        _mark("parsed")
        return parsed

    _replace(api_client, "parse_deleted", parse_deleted)
    settle, dispatching, sent = Dispatcher._settle, RunJournal.dispatching, RunJournal.sent

    async def timed_settle(self: Any, *args: Any) -> Any:
        left = await settle(self, *args)
        _mark("settled")
        return left

    def timed_dispatching(self: Any, ids: Any) -> None:
        _mark("next_batch")
        dispatching(self, ids)

    async def timed_sent(self: Any, *args: Any) -> None:
        _mark("token")
        await sent(self, *args)

    _replace(Dispatcher, "_settle", timed_settle)
    _replace(RunJournal, "dispatching", timed_dispatching)
    _replace(RunJournal, "sent", timed_sent)


def _write(out: Path) -> None:
    ordered = sorted(_handoffs)
    n = len(ordered)

    def at(share: float) -> float:
        return round(ordered[min(n - 1, int(n * share))] * 1000, 3) if n else 0.0

    figures = {
        "handoffs": n,
        "mean_ms": round(sum(ordered) / n * 1000, 3) if n else 0.0,
        "p50_ms": at(0.5),
        "p90_ms": at(0.9),
        "p99_ms": at(0.99),
        "stages_ms": {k: round(sum(v) / len(v) * 1000, 3) for k, v in _stages.items()},
    }
    out.write_text(json.dumps(figures))


def main(argv: list[str]) -> None:
    out, side, *args = argv
    _instrument()
    run: Callable[[], object]
    if side == "ours":
        _instrument_ours()
        from worker.cli import main as cli

        sys.argv = ["devserver-reaper", *args]
        run = cli
    else:
        sys.argv = [str(RAW), *args]
        run = lambda: runpy.run_path(str(RAW), run_name="__main__")  # noqa: E731
    try:
        run()
    except SystemExit as exit_:
        _write(Path(out))
        raise SystemExit(exit_.code) from None
    _write(Path(out))


if __name__ == "__main__":
    main(sys.argv[1:])
