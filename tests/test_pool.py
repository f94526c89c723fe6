"""The dispatch pool ``run`` and ``serve`` share (``worker.pool``): what a stop cancels at
once, what it gives the grace period, and what a second signal cuts short. Real anyio time
is never waited on: the tests wait for events and for every task to block, and the grace
periods are an hour, far longer than any test may take."""

from __future__ import annotations

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from worker.dispatcher import Working
from worker.pool import DispatchPool
from worker.types import Batch

pytestmark = pytest.mark.anyio


class Work:
    """An intake that sends ``n`` batches then waits for ever, and dispatchers that hold a
    batch ``busy`` until ``release`` (``hold``) or only wait (not working)."""

    def __init__(self, n: int, *, hold: bool) -> None:
        self.n, self.hold = n, hold
        self.working = Working()
        self.release = anyio.Event()
        self.started = anyio.Event()
        self.intake_cancelled = False
        self.taken: list[str] = []
        self.finished: list[str] = []

    async def intake(self, send: MemoryObjectSendStream[Batch]) -> None:
        async with send:
            for i in range(self.n):
                await send.send(Batch(f"b{i}", (f"j{i}",)))
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                self.intake_cancelled = True
                raise

    async def dispatch(self, receive: MemoryObjectReceiveStream[Batch]) -> None:
        async with receive:
            async for batch in receive:
                self.taken.append(batch.batch_id)
                self.started.set()
                if self.hold:
                    with self.working.busy():
                        await self.release.wait()
                else:
                    await anyio.sleep_forever()  # waiting for a token: not working
                self.finished.append(batch.batch_id)


async def test_a_stop_cancels_the_intake_and_waits_for_the_calls_on_the_wire() -> None:
    work = Work(2, hold=True)
    pool = DispatchPool(concurrency=2, grace=3600, buffer=1, working=work.working)
    stop, stopped = anyio.Event(), []
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: pool.run(work.intake, work.dispatch, stop=stop,
                                          on_stop=lambda: stopped.append(True)))  # fmt: skip
        await work.started.wait()
        stop.set()
        await anyio.wait_all_tasks_blocked()
        assert stopped == [True] and work.intake_cancelled
        assert work.finished == []  # still given the grace period
        work.release.set()
    assert sorted(work.finished) == sorted(work.taken) == ["b0", "b1"]


async def test_dispatchers_only_waiting_are_cancelled_at_once() -> None:
    work = Work(2, hold=False)
    pool = DispatchPool(concurrency=2, grace=3600, buffer=1, working=work.working)
    stop = anyio.Event()
    with anyio.fail_after(10):  # an hour of grace was waited out before
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: pool.run(work.intake, work.dispatch, stop=stop))
            await work.started.wait()
            stop.set()
    assert work.finished == []


async def test_a_second_signal_cuts_the_grace_period_short() -> None:
    work = Work(1, hold=True)
    pool = DispatchPool(concurrency=1, grace=3600, buffer=1, working=work.working)
    stop, now = anyio.Event(), anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: pool.run(work.intake, work.dispatch, stop=stop,
                                              stop_now=now))  # fmt: skip
            await work.started.wait()
            stop.set()
            await anyio.wait_all_tasks_blocked()
            now.set()
    assert work.finished == []  # the call in hand was cancelled, left open


async def test_cancel_ends_the_round_and_tasks_beside_it() -> None:
    work = Work(1, hold=True)
    pool = DispatchPool(concurrency=1, grace=3600, buffer=1, working=work.working)
    beside_ended = []

    async def keep_alive() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            beside_ended.append(True)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: pool.run(work.intake, work.dispatch, stop=anyio.Event(),
                                              beside=(keep_alive,)))  # fmt: skip
            await work.started.wait()
            pool.cancel()
    assert beside_ended == [True] and pool.rounds == 1
    assert repr(pool) == "DispatchPool(concurrency=1, grace=3600, rounds=1, Working(count=0))"
