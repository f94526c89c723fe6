"""Wires the stages: source -> intake -> batcher -> dispatchers -> journal.

One task group for the run. The intake reads the source in a worker thread, chunk by
chunk, admits ids through the ledger (which de-duplicates them at any scale) and cuts
batches; a bounded stream carries batches to ``concurrency`` dispatchers, so reading never
runs ahead of deleting by more than a few batches. The pool and its stop are ``serve``'s
too (``worker.pool``): stopping (a signal, the deadline, a fatal error) closes the intake at
once; dispatchers finish the batch in hand within the grace period and are cancelled after
it; whatever was not finished stays open in the ledger. The outcomes the dispatchers
report are recorded by the journal's own task (``RunJournal.recording_behind``), each
after the call its dispatcher went on to make, and all of them before the run returns
(with a durable ledger, each before that call, as ``docs/ledger.md`` promises).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import ObjectReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from worker.batcher import Batcher
from worker.dispatcher import Working
from worker.errors import InputUnreadable, ReaperError
from worker.input.intake import escape
from worker.outcomes.journal import LedgerPort, RunJournal, Tally
from worker.pool import DispatchPool
from worker.targets import Target, Targets
from worker.types import Batch, Candidate, Outcome, Rejection, doubted

Entry = Candidate | Rejection


ONE_PROJECT = "names a project, region or endpoint, and this run sends to one project only"


async def targeted(
    candidates: list[Candidate], targets: Targets | None, rejections: list[Rejection]
) -> list[Candidate]:
    """The candidates whose line's project, region or endpoint resolved, each given its
    target; the others added to ``rejections`` with the reason (never sent)."""
    kept: list[Candidate] = []
    for candidate in candidates:
        if candidate.address is not None:
            if targets is None:
                found: Target | str = ONE_PROJECT
            elif (known := targets.known(candidate.address)) is not None:
                found = known  # the usual case: the place a line before named
            else:
                found = await targets.find(candidate.address)
            if isinstance(found, str):
                rejections.append(Rejection(candidate.job_id, candidate.line, found))
                continue
            candidate.target = found
        kept.append(candidate)
    return kept


class BatchProcessor(Protocol):
    async def process(self, batch: Batch) -> None: ...


class Held(Protocol):
    """Batches the dispatcher held back, each to go when its endpoint has room
    (``worker.routing.Router``)."""

    def ready(self) -> Batch | None:
        """One that may go now, taken out; None when none may."""

    async def until_ready(self) -> bool:
        """Return True once one may go, False once none is held."""


@dataclass(slots=True)
class RunState:
    """Why the run stopped, if it did. Read by the command to pick the exit code."""

    stop_reason: str | None = None
    fatal: BaseException | None = None
    intake_done: bool = False
    api_down: bool = False  # the API was failing when the run stopped (circuit open)
    stop_requested: anyio.Event = field(default_factory=anyio.Event)
    stop_now: anyio.Event = field(default_factory=anyio.Event)

    def request_stop(self, reason: str, *, immediate: bool = False) -> None:
        """Stop reading; with ``immediate``, also cancel the calls in flight."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop_requested.set()
        if immediate:
            self.stop_now.set()

    @property
    def stopping(self) -> bool:
        return self.stop_requested.is_set()


def _next_chunk(entries: Iterator[Entry], size: int) -> list[Entry]:
    chunk: list[Entry] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) >= size:
            break
    return chunk


Chunk = list[Entry] | BaseException


class Chunks(ObjectReceiveStream[Chunk]):
    """The chunks :func:`read_in_background` reads: each one taken makes room for the
    next (one waits at most); closed, the reading thread stops at its next hand-over."""

    def __init__(self, receive: MemoryObjectReceiveStream[Chunk]) -> None:
        self._receive = receive
        self._room = threading.Semaphore(1)  # one chunk may wait to be taken
        self.closed = False

    async def receive(self) -> Chunk:
        item = await self._receive.receive()
        self._room.release()
        return item

    def close(self) -> None:
        self.closed = True
        self._receive.close()
        self._room.release()  # the reading thread, if it waits for room, sees it closed

    async def aclose(self) -> None:
        self.close()

    def wanted(self) -> bool:
        """In the reading thread: wait for room for one more chunk; False once closed."""
        self._room.acquire()
        return not self.closed


def read_in_background(entries: Iterator[Entry], size: int) -> Chunks:
    """Read the source in a daemon thread of its own, a chunk at a time, with back-pressure.

    Not an anyio worker thread: a read blocked on a quiet stdin would keep the interpreter
    from exiting after a stop. A daemon thread is simply left behind. The reader's own
    errors (an unreadable file midway) arrive as items, raised by the receiving side; so
    does any other exception, as ``InputUnreadable``: a reader that died without a word
    would leave the run waiting for ever for input that never comes.

    A chunk is handed over by a plain call on the loop (``send_nowait``, once there is room
    for it), never a coroutine made in the thread: one made as the loop closed (a chunk of
    a slow pipe read just after Ctrl-C) was never run, "coroutine ... was never awaited".
    """
    send, receive = anyio.create_memory_object_stream[Chunk](1)
    chunks = Chunks(receive)
    token = anyio.lowlevel.current_token()

    def produce() -> None:
        try:
            while True:
                item: Chunk
                try:
                    item = _next_chunk(entries, size)
                except ReaperError as exc:
                    item = exc
                except Exception as exc:  # noqa: BLE001 - a bug of ours, but never a hang
                    item = InputUnreadable(
                        f"the input could not be read: {type(exc).__name__}: {escape(str(exc))}"
                    )
                if (isinstance(item, list) and not item) or not chunks.wanted():
                    break
                anyio.from_thread.run_sync(send.send_nowait, item, token=token)
                if isinstance(item, BaseException):
                    break
        # RuntimeError: the loop finished (RunFinishedError) or closed as it was called.
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, RuntimeError):
            pass  # the run is over or stopped reading: nothing is waiting for more
        if chunks.closed:  # no one waits on the loop to be told: closed from here
            send.close()
            return
        try:  # closed either way, or its finaliser warns (an unclosed stream) at exit
            anyio.from_thread.run_sync(send.close, token=token)
        except RuntimeError:
            send.close()  # no loop is left to race with

    threading.Thread(target=produce, name="reaper-input", daemon=True).start()
    return chunks


async def _next_batch(receive: MemoryObjectReceiveStream[Batch]) -> Batch | None:
    """The next batch, None once there are no more. A batch waiting is taken at once: a
    trip round the event loop there (what ``receive`` makes, even with one ready) put the
    slot behind every other slot's work before each call; the slot yields at its call."""
    try:
        return receive.receive_nowait()
    except anyio.WouldBlock:
        pass
    except anyio.EndOfStream:
        return None
    try:
        return await receive.receive()
    except anyio.EndOfStream:
        return None


class Pipeline:
    """One run over one source. Build it, ``await run()``, then read ``state`` and ``tally``."""

    def __init__(
        self,
        *,
        entries: Iterator[Entry],
        ledger: LedgerPort,
        journal: RunJournal,
        dispatcher: BatchProcessor,
        batcher: Batcher,
        tally: Tally,
        concurrency: int,
        grace: float,
        chunk_size: int = 2000,
        state: RunState | None = None,
        working: Working | None = None,
        targets: Targets | None = None,
        held: Held | None = None,
    ) -> None:
        """``targets``: resolves the project, region or endpoint a line names; None: this
        run sends to one project only (its dispatcher is not a ``worker.routing.Router``),
        and a line naming any is rejected with the reason, never sent. ``held``: the
        batches the dispatcher holds back for their endpoint's share (the router), taken
        by a dispatcher with a free hand before the next batch read, and after the last."""
        self._entries = entries
        self._held = held
        self._targets = targets
        self._ledger = ledger
        self._journal = journal
        self._dispatcher = dispatcher
        self._batcher = batcher
        self._tally = tally
        self._concurrency = concurrency
        self._grace = grace
        self._chunk_size = chunk_size
        self.state = state if state is not None else RunState()
        self._working = working if working is not None else Working()
        # Ids an earlier run sent without hearing back, until their batch is cut: a few
        # batches' worth per run that died, never the input.
        self._unsure: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"Pipeline(concurrency={self._concurrency}, tally={self._tally!r}, "
            f"stop_reason={self.state.stop_reason!r}, batcher={self._batcher!r})"
        )

    async def run(self) -> RunState:
        """Read, batch and dispatch until the input ends or a stop (``worker.pool``)."""
        pool = DispatchPool(concurrency=self._concurrency, grace=self._grace,
                            buffer=self._concurrency, working=self._working)  # fmt: skip
        async with self._journal.recording_behind(self._failed, buffer=self._concurrency):
            await pool.run(self._intake, self._dispatch, stop=self.state.stop_requested,
                           stop_now=self.state.stop_now)  # fmt: skip
        return self.state

    def _failed(self, exc: ReaperError) -> None:
        """A fatal error: the run stops (at once when the error says so)."""
        if self.state.fatal is None:
            self.state.fatal = exc
        self.state.request_stop("fatal", immediate=exc.stops_at_once)

    async def _intake(self, send: MemoryObjectSendStream[Batch]) -> None:
        async with send:
            try:
                await self._read_all(send)
            except anyio.BrokenResourceError:
                pass
            except ReaperError as exc:  # the source failed midway (unreadable, usage)
                self.state.fatal = exc
                self.state.request_stop("input")
                return
        if not self.state.stopping:
            self.state.intake_done = True

    async def _read_all(self, send: MemoryObjectSendStream[Batch]) -> None:
        chunks = read_in_background(self._entries, self._chunk_size)
        async with chunks:
            async for chunk in chunks:
                if isinstance(chunk, BaseException):
                    raise chunk
                if self.state.stopping:
                    return
                await self._admit(chunk, send)
        while not self.state.stopping and (last := self._batcher.flush()) is not None:
            await send.send(self._doubted(last))

    async def _admit(self, chunk: list[Entry], send: MemoryObjectSendStream[Batch]) -> None:
        self._tally.read += len(chunk)
        rejections = [entry for entry in chunk if isinstance(entry, Rejection)]
        candidates = [entry for entry in chunk if isinstance(entry, Candidate)]
        if any(c.address is not None for c in candidates):
            candidates = await targeted(candidates, self._targets, rejections)
        if rejections:
            await self._journal.rejected(rejections)
        if candidates:
            admission = await self._ledger.admit(candidates)
            if admission.conflicts:
                await self._journal.rejected(admission.conflicts)
            self._tally.repeated += len(admission.repeated)
            self._tally.already_done += len(admission.done)
            self._tally.already_failed += sum(
                outcome is Outcome.FAILED for _, outcome in admission.done
            )
            self._tally.resent += admission.resent
            self._unsure |= admission.unsure
            for candidate in admission.new:
                batch = self._batcher.add(candidate.job_id, candidate.target)
                if batch is not None:
                    await send.send(self._doubted(batch))

    def _doubted(self, batch: Batch) -> Batch:
        """The batch, naming its ids an earlier run may have deleted unseen."""
        return doubted(batch, self._unsure)

    async def _dispatch(self, receive: MemoryObjectReceiveStream[Batch]) -> None:
        held = self._held
        read = True  # batches may still come from the intake
        async with receive:
            while True:
                if not read and (held is None or not await held.until_ready()):
                    return  # none more read, and none held back
                await self._working.take_hand()
                try:
                    batch = None if held is None else held.ready()
                    if batch is None and read:
                        batch = await _next_batch(receive)
                        read = batch is not None
                    if self.state.stopping:
                        return
                    if batch is None:
                        await anyio.lowlevel.checkpoint()  # round again: a stop wins
                        continue  # another dispatcher took the batch held back
                    self._journal.dispatching(batch.ids)
                    with self._working.busy():
                        await self._dispatcher.process(batch)
                except ReaperError as exc:  # 401/403, TLS, API unavailable: the run stops
                    self._failed(exc)
                    return
                finally:
                    self._working.free_hand()
