"""Where a slot waits between one call's answer and its next call: a runner for ``bench_sdk``.

    python tests/benchmarks/handoff.py OUT_JSON ours ARGS...   # ``devserver-reaper ARGS``
    python tests/benchmarks/handoff.py OUT_JSON raw ARGS...    # ``raw_peer.py ARGS``

Runs the side in this process with aiohttp's ``ClientSession._request`` and
``ClientResponse.read`` wrapped: for each task, the time from the end of reading an answer
to the start of that task's next request (the **hand-off**: nothing is on the wire for that
slot meanwhile). For ``ours`` it also marks, in that task, the answer parsed
(``parse_deleted``), the outcomes settled (``Dispatcher._settle``: made and reported to the
journal, which records them, their ``job.deleted`` lines with them, from a task of its own
behind the slot's next call: ``RunJournal.recording_behind``), the next batch handed over
(``RunJournal.dispatching``) and the token taken (``RunJournal.sent``, after the breaker
and the limiter), so the hand-off is cut into the stages it passes. For both sides it also
marks when the request's bytes are written (``request>wire``): aiohttp before Python 3.12
writes a body from a task of its own, which runs only once every callback ready before it
has run. Each stage is timed on the wall clock and on this thread's CPU clock
(``stages_cpu_ms``): what the loop's thread spent in it, its own work and the other slots'
run in between, and none of the time another process had the CPU, so it moves little with
the machine's load. Writes ``OUT_JSON`` at exit: the hand-offs' count, mean and
percentiles in ms, and the mean of each stage (``{"from>to": ms}``). The marks cost a few
µs a call, so the side's own figures from such a run are not the contest's.
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

Mark = tuple[str, float, float]  # (name, wall clock, this thread's CPU clock)

_marks: dict[int, list[Mark]] = defaultdict(list)
_stages: dict[str, list[float]] = defaultdict(list)
_stages_cpu: dict[str, list[float]] = defaultdict(list)
_handoffs: list[float] = []
_requested: dict[int, Mark] = {}  # the slot (task id) of each request being written
_slots: dict[int, int] = {}  # a request (its id) to the slot that sent it


def _replace(owner: Any, name: str, value: Any) -> None:
    setattr(owner, name, value)


def _now(name: str) -> Mark:
    return name, time.perf_counter(), time.thread_time()


def _mark(name: str) -> None:
    _marks[id(asyncio.current_task())].append(_now(name))


def _stage(first: Mark, then: Mark) -> None:
    _stages[f"{first[0]}>{then[0]}"].append(then[1] - first[1])
    _stages_cpu[f"{first[0]}>{then[0]}"].append(then[2] - first[2])


def _instrument() -> None:
    request, read = client.ClientSession._request, client_reqrep.ClientResponse.read
    send, write_bytes = client_reqrep.ClientRequest.send, client_reqrep.ClientRequest.write_bytes

    async def timed_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        now = _now("request")
        slot = id(asyncio.current_task())
        marks = _marks.pop(slot, [])
        if marks and marks[0][0] == "answer":
            marks.append(now)
            _handoffs.append(now[1] - marks[0][1])
            for first, then in itertools.pairwise(marks):
                _stage(first, then)
            _requested[slot] = now
        return await request(self, *args, **kwargs)

    async def timed_send(self: Any, conn: Any) -> Any:
        _slots[id(self)] = id(asyncio.current_task())
        return await send(self, conn)

    async def timed_write_bytes(self: Any, *args: Any, **kwargs: Any) -> None:
        slot = _slots.pop(id(self), None)
        if slot is not None and (asked := _requested.pop(slot, None)) is not None:
            _stage(asked, _now("wire"))
        await write_bytes(self, *args, **kwargs)

    async def timed_read(self: Any) -> bytes:
        body = await read(self)
        _marks[id(asyncio.current_task())] = [_now("answer")]
        return body

    _replace(client.ClientSession, "_request", timed_request)
    _replace(client_reqrep.ClientRequest, "send", timed_send)
    _replace(client_reqrep.ClientRequest, "write_bytes", timed_write_bytes)
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
        "stages_cpu_ms": {k: round(sum(v) / len(v) * 1000, 3) for k, v in _stages_cpu.items()},
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
