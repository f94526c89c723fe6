"""Which stream entries wait on which ids, and when an entry is done. Pure logic, no I/O.

An entry is acknowledged only once every valid id in it has a terminal outcome, so the
service needs the many-to-many map between entries and ids: one entry may carry many ids,
and one id may arrive in several entries (a producer that enqueued it twice, a redelivery
beside a fresh copy). An id already waiting for an answer is not sent again; the entries
that name it all settle when its one outcome arrives.

An id is waited on per target (``Message.target``, ``Result.target``; None: the default):
the same id named for two projects is two jobs, each sent to its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.service.layout import Message
from worker.targets import Target
from worker.types import Outcome, Result

Key = tuple[Target | None, str]


@dataclass(frozen=True, slots=True)
class Finished:
    """An entry whose ids all have an outcome. ``failures`` decide whether it is acked."""

    message: Message
    deliveries: int
    failures: tuple[Result, ...] = ()

    @property
    def entry_id(self) -> str:
        return self.message.entry_id


@dataclass(slots=True)
class _Waiting:
    message: Message
    deliveries: int
    open: set[str]
    failures: list[Result] = field(default_factory=list)

    @property
    def target(self) -> Target | None:
        return self.message.target


@dataclass(frozen=True, slots=True)
class Admission:
    """What ``InFlight.add`` decided: the ids to send now, and the entry if already done."""

    send: tuple[str, ...]
    finished: Finished | None = None


@dataclass(frozen=True, slots=True)
class Released:
    """An entry let go without an outcome: the ids it held of the batch, and its ids done."""

    ids: list[str]
    done: list[str]


class InFlight:
    """The entries this consumer holds and the ids they wait on."""

    __slots__ = ("_entries", "_waiters")

    def __init__(self) -> None:
        self._entries: dict[str, _Waiting] = {}
        self._waiters: dict[Key, list[str]] = {}

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def open_ids(self) -> int:
        return len(self._waiters)

    def entry_ids(self) -> list[str]:
        """The entries held, oldest first."""
        return list(self._entries)

    def last_delivery(self, job_id: str, limit: int, target: Target | None = None) -> bool:
        """Is every entry waiting on ``job_id`` (of ``target``) on its last allowed delivery
        (so an outcome for it now is its last)?"""
        held = self._waiters.get((target, job_id), ())
        waiting = [self._entries[e] for e in held if e in self._entries]
        return all(w.deliveries >= limit for w in waiting)

    def entries_of(self, job_id: str, target: Target | None = None) -> tuple[str, ...]:
        """The entries waiting on ``job_id`` of ``target`` (for the outcomes stream's
        ``entry`` field)."""
        return tuple(self._waiters.get((target, job_id), ()))

    def add(self, message: Message, deliveries: int) -> Admission:
        """Hold ``message``; return the ids nobody is waiting on yet (to send).

        An entry with no valid id is finished at once. Adding an entry already held is a
        no-op (a reclaim that found one of our own entries still in progress).
        """
        if message.entry_id in self._entries:
            return Admission(())
        if not message.ids:
            return Admission((), Finished(message, deliveries))
        self._entries[message.entry_id] = _Waiting(message, deliveries, set(message.ids))
        send: list[str] = []
        target = message.target
        for job_id in message.ids:
            waiting = self._waiters.get((target, job_id))
            if waiting is None:
                self._waiters[target, job_id] = [message.entry_id]
                send.append(job_id)
            else:
                waiting.append(message.entry_id)
        return Admission(tuple(send))

    def settle(self, results: Sequence[Result]) -> list[Finished]:
        """Record outcomes; return the entries this completes, in the order they complete."""
        done: list[Finished] = []
        for result in results:
            for entry_id in self._waiters.pop((result.target, result.job_id), ()):
                waiting = self._entries.get(entry_id)
                if waiting is None:
                    continue
                waiting.open.discard(result.job_id)
                if result.outcome is Outcome.FAILED:
                    waiting.failures.append(result)
                if not waiting.open:
                    del self._entries[entry_id]
                    done.append(
                        Finished(waiting.message, waiting.deliveries, tuple(waiting.failures))
                    )
        return done

    def release(self, job_ids: Sequence[str], target: Target | None = None) -> dict[str, Released]:
        """Forget the entries waiting on ``job_ids`` of ``target`` without an outcome (left
        pending in Redis for a later delivery); return, by entry, those of ``job_ids`` it
        held and its ids that already have an outcome (not to be sent again on its next
        delivery)."""
        wanted = set(job_ids)
        dropped: dict[str, Released] = {}
        for job_id in job_ids:
            for entry_id in list(self._waiters.get((target, job_id), ())):
                waiting = self._entries.pop(entry_id, None)
                if waiting is None:
                    continue
                message = waiting.message
                failed = {r.job_id for r in waiting.failures}
                dropped[entry_id] = Released(
                    ids=[i for i in message.ids if i in wanted],
                    done=message.done_besides(waiting.open | failed),
                )
                for other in waiting.open:
                    key = (waiting.target, other)
                    holders = self._waiters.get(key)
                    if holders is not None and entry_id in holders:
                        holders.remove(entry_id)
                        if not holders:
                            del self._waiters[key]
        return dropped

    def clear(self) -> None:
        """Forget everything (a new round re-reads its pending entries from Redis)."""
        self._entries.clear()
        self._waiters.clear()

    def __repr__(self) -> str:
        return f"InFlight(entries={len(self._entries)}, open_ids={len(self._waiters)})"
