"""One dispatch pool for ``run`` and ``serve``: an intake task feeding the dispatchers over
one bounded stream of batches, and the graceful stop.

``concurrency`` is the most calls on the wire at once (``--concurrency``). When the
``Working`` given bounds them (its ``places``), the pool runs twice as many dispatchers
(``Working.tasks``): one asleep on a refusal's ``Retry-After`` or a back-off holds no place
on the wire, and lets another dispatcher take a batch (``Working.take_hand``) whose calls
use it; otherwise no more than ``concurrency`` batches are taken in hand, as before, so
nothing is read, checked or held further ahead. Without places, one dispatcher a call, as
each sends one call at a time.

Shutdown is the subtlest code of both commands, so it exists once, here. On ``stop``:
``on_stop`` runs (a service turns unready, starts its drain), the intake is cancelled at
once (even mid-read), and the dispatchers get ``grace`` seconds for calls on the wire and
answers being settled; they are cancelled as soon as none is working (those only waiting
for a place on the wire, a token or out a backoff have nothing to finish), or at once on
``stop_now`` (a second signal). Their waits for a rate token end at the stop itself
(``Working.stop``): a process stopping reserves nothing more of a fleet's shared rate.
Whatever was not finished stays open: in the ledger for ``run``, pending in Redis for
``serve``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from worker.dispatcher import Working
from worker.types import Batch

Intake = Callable[[MemoryObjectSendStream[Batch]], Awaitable[None]]
Dispatch = Callable[[MemoryObjectReceiveStream[Batch]], Coroutine[Any, Any, None]]


class DispatchPool:
    """Build it with the sizes, then ``await run(...)`` once per round of work."""

    def __init__(self, *, concurrency: int, grace: float, buffer: int, working: Working) -> None:
        self._concurrency = concurrency
        self._grace = grace
        self._buffer = buffer
        self._working = working
        self._scope: anyio.CancelScope | None = None
        self.rounds = 0

    async def run(
        self,
        intake: Intake,
        dispatch: Dispatch,
        *,
        stop: anyio.Event,
        stop_now: anyio.Event | None = None,
        on_stop: Callable[[], None] | None = None,
        beside: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
    ) -> None:
        """Until the intake and every dispatcher are done, or ``cancel()``; ``beside``:
        tasks that live as long as the round (a keep-alive), cancelled with it."""
        self.rounds += 1
        self._working.start()
        send, receive = anyio.create_memory_object_stream[Batch](self._buffer)
        async with anyio.create_task_group() as outer:
            intake_scope, dispatch_scope = anyio.CancelScope(), anyio.CancelScope()
            outer.start_soon(self._watch_stop, stop, stop_now, on_stop, intake_scope,
                             dispatch_scope)  # fmt: skip
            for task in beside:
                outer.start_soon(task)
            with dispatch_scope:
                async with anyio.create_task_group() as group:
                    self._scope = group.cancel_scope
                    group.start_soon(self._intake, intake, send, intake_scope)
                    for _ in range(self._working.tasks(self._concurrency)):
                        group.start_soon(dispatch, receive.clone())
                    receive.close()
            outer.cancel_scope.cancel()

    def cancel(self) -> None:
        """End the round now: intake and dispatchers alike (refused credentials)."""
        if self._scope is not None:
            self._scope.cancel()

    @staticmethod
    async def _intake(intake: Intake, send: MemoryObjectSendStream[Batch],
                      scope: anyio.CancelScope) -> None:  # fmt: skip
        with scope:
            await intake(send)

    async def _watch_stop(
        self,
        stop: anyio.Event,
        stop_now: anyio.Event | None,
        on_stop: Callable[[], None] | None,
        intake_scope: anyio.CancelScope,
        dispatch_scope: anyio.CancelScope,
    ) -> None:
        await stop.wait()
        if on_stop is not None:
            on_stop()
        self._working.stop()  # its waits for a token end now, and reserve nothing more
        intake_scope.cancel()
        with anyio.move_on_after(self._grace):
            async with anyio.create_task_group() as first:

                async def then_stop(wait: Callable[[], Awaitable[object]]) -> None:
                    await wait()
                    first.cancel_scope.cancel()

                if stop_now is not None:
                    first.start_soon(then_stop, stop_now.wait)
                first.start_soon(then_stop, self._working.idle)
        dispatch_scope.cancel()

    def __repr__(self) -> str:
        return (
            f"DispatchPool(concurrency={self._concurrency}, grace={self._grace:g}, "
            f"rounds={self.rounds}, {self._working!r})"
        )
