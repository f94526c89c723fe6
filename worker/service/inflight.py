"""Which stream entries wait on which ids, and when an entry is done. Pure logic, no I/O.

An entry is acknowledged only once every valid id in it has a terminal outcome, so the
service needs the many-to-many map between entries and ids: one entry may carry many ids,
and one id may arrive in several entries (a producer that enqueued it twice, a redelivery
beside a fresh copy). An id already waiting for an answer is not sent again; the entries
that name it all settle when its one outcome arrives.

An id is waited on per target (``Message.target``, ``Result.target``; None: the default):
the same id named for two projects is two jobs, each sent to its own.

An entry some of whose ids are handed back without an outcome (``release``: their batch was
not sent, or the API gave out) is kept here while its other ids are still in flight (the
probe of a paused region, a sibling batch on the wire): their outcomes are its outcomes, so
each time one of them settles the entry comes back from ``settle`` as handed back
(``Finished.released``), its ids done brought up to date for its kept error, and it is
never acknowledged here. Forgetting it at the first hand-back sent those ids again on its
next delivery, where they ended ``absent``: two outcomes for one id.

An id is *on the wire* from the moment a DELETE carrying it is about to be noted
(``on_wire``) until its outcome or hand-back: an entry admitted meanwhile that names it
(``Admission.joined``) is noted as having it sent too, or its redelivery after a crash,
apart from the first entry's, would call the job that DELETE removed ``absent``.

An entry that joins an id already waiting (``add``'s ``unsure``: an earlier delivery sent it
without hearing back) sends no batch of its own that could carry that doubt, so the entries
waiting on an id are asked when its answer comes (``answered``): a 404 then means
``deleted``, unconfirmed, for every entry waiting on it, as it would had the doubt gone out
with the call.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

from worker.errors import ApiError
from worker.service.layout import Message
from worker.targets import Target
from worker.types import Outcome, Result, gone

Key = tuple[Target | None, str]


@dataclass(frozen=True, slots=True)
class HandBack:
    """Why ids of an entry were handed back without an outcome: the ``error`` their batch
    ended on (and its text), those of them sent without a readable answer (``unsure``: by
    this delivery or an earlier one), whether nothing was tried (``give_back``: the
    delivery is not counted), and whether the round ended before their batch was sent
    (``stopped``: nothing to keep for an entry with no id done)."""

    error: ApiError
    text: str
    unsure: frozenset[str] = frozenset()
    give_back: bool = False
    stopped: bool = False

    @classmethod
    def not_sent(cls, unsure: frozenset[str] = frozenset()) -> HandBack:
        """A batch not started when the round ended (a stop, or a refusal that pauses);
        ``unsure``: its ids an earlier delivery sent without hearing back, which stay so."""
        error = ApiError("the service stopped before they were sent")
        return cls(error, "not sent", unsure, stopped=True)


@dataclass(frozen=True, slots=True)
class Released:
    """An entry some of whose ids were handed back: those ``ids`` (all of them so far), its
    ids ``done`` (an outcome recorded, not to be sent again on its next delivery), why
    (``why``; None: no reason kept), whether this is its first hand-back of this delivery
    (``first``: its delivery is given back once) and whether ids of it are still in flight
    (``waiting``: it is still held, and comes back from ``settle`` as they settle)."""

    ids: list[str]
    done: list[str]
    why: HandBack | None = None
    first: bool = True
    waiting: bool = False


@dataclass(frozen=True, slots=True)
class Finished:
    """An entry whose ids all have an outcome. ``failures`` decide whether it is acked.

    With ``released``: an entry handed back (never acked here) one of whose ids in flight
    settled: its kept error is to be written again with ``released.done``; it is still held
    while ``released.waiting``."""

    message: Message
    deliveries: int
    failures: tuple[Result, ...] = ()
    released: Released | None = None

    @property
    def entry_id(self) -> str:
        return self.message.entry_id


@dataclass(slots=True)
class _Waiting:
    message: Message
    deliveries: int
    open: set[str]
    unsure: frozenset[str] = frozenset()  # sent by an earlier delivery, never heard back
    look: frozenset[str] = frozenset()  # given up unsent: read, not deleted (``looks``)
    failures: list[Result] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    why: HandBack | None = None

    @property
    def target(self) -> Target | None:
        return self.message.target

    def handed_back(self, first: bool = False) -> Released:
        not_done = self.open | set(self.released) | {r.job_id for r in self.failures}
        ids = set(self.released)
        return Released(ids=[i for i in self.message.ids if i in ids],
                        done=self.message.done_besides(not_done), why=self.why,
                        first=first, waiting=bool(self.open))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Admission:
    """What ``InFlight.add`` decided: the ids to send now, the entry if already done, and
    its ids already on the wire for another entry (``joined``: to be noted under it too)."""

    send: tuple[str, ...]
    finished: Finished | None = None
    joined: tuple[str, ...] = ()


class InFlight:
    """The entries this consumer holds and the ids they wait on."""

    __slots__ = ("_asked", "_entries", "_looking", "_waiters", "_wire")

    def __init__(self) -> None:
        self._entries: dict[str, _Waiting] = {}
        self._waiters: dict[Key, list[str]] = {}
        self._wire: set[Key] = set()  # ids a DELETE carries (or is about to), no outcome yet
        self._looking: set[Key] = set()  # ids a look carries (``Batch.look``), no outcome yet
        self._asked: set[Key] = set()  # ids a look's failure was not the answer of (to send)

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

    def on_last_delivery(
        self, job_id: str, limit: int, target: Target | None = None
    ) -> tuple[str, ...]:
        """The entries waiting on ``job_id`` (of ``target``) that are on their last allowed
        delivery: a failure of it is their last outcome (the others may try it again)."""
        held = self._waiters.get((target, job_id), ())
        return tuple(e for e in held if e in self._entries and self._entries[e].deliveries >= limit)

    def entries_of(self, job_id: str, target: Target | None = None) -> tuple[str, ...]:
        """The entries waiting on ``job_id`` of ``target`` (for the outcomes stream's
        ``entry`` field)."""
        return tuple(self._waiters.get((target, job_id), ()))

    def entries_heard(self, job_id: str, target: Target | None = None) -> tuple[str, ...]:
        """The entries waiting on ``job_id`` (of ``target``) that do not bring it as sent
        unheard by an earlier delivery (``add``'s ``unsure``): an answer saying a call of
        this delivery applied none of it says nothing of that one, whose note stays."""
        held = self._waiters.get((target, job_id), ())
        return tuple(
            e for e in held if e in self._entries and job_id not in self._entries[e].unsure
        )

    def on_wire(self, job_ids: Sequence[str], target: Target | None = None) -> None:
        """A DELETE of ``job_ids`` (of ``target``) is about to be noted and sent: an entry
        admitted from now until their outcome that names one of them is told so
        (``Admission.joined``)."""
        self._wire.update((target, i) for i in job_ids if (target, i) in self._waiters)

    def wired(self, entry_id: str, job_id: str, target: Target | None = None) -> bool:
        """Is ``job_id`` (of ``target``) still on the wire, and ``entry_id`` waiting on it?"""
        key = (target, job_id)
        return key in self._wire and entry_id in self._waiters.get(key, ())

    def add(
        self, message: Message, deliveries: int, unsure: frozenset[str] = frozenset()
    ) -> Admission:
        """Hold ``message``; return the ids nobody is waiting on yet (to send).

        ``unsure``: its ids an earlier delivery sent without hearing back; those already
        waited on for another entry are doubted when their answer comes (``answered``).
        An entry with no valid id is finished at once. Adding an entry already held is a
        no-op (a reclaim that found one of our own entries still in progress).
        """
        if message.entry_id in self._entries:
            return Admission(())
        if not message.ids:
            return Admission((), Finished(message, deliveries))
        self._entries[message.entry_id] = _Waiting(message, deliveries, set(message.ids), unsure,
                                                   frozenset(message.look))  # fmt: skip
        send: list[str] = []
        joined: list[str] = []
        target = message.target
        for job_id in message.ids:
            waiting = self._waiters.get((target, job_id))
            if waiting is None:
                self._waiters[target, job_id] = [message.entry_id]
                send.append(job_id)
            else:
                waiting.append(message.entry_id)
                if (target, job_id) in self._wire:
                    joined.append(job_id)
        return Admission(tuple(send), joined=tuple(joined))

    def answered(self, result: Result) -> Result:
        """``result`` as the entries waiting on its id may tell it: a job found gone that a
        joining entry's earlier delivery sent without hearing back is ``deleted``,
        unconfirmed (``gone``), not ``absent``."""
        if result.outcome is not Outcome.ABSENT or not self._doubted(result.target, result.job_id):
            return result
        ours = gone(result.job_id, unsure={result.job_id}, known={}, batch_id=result.batch_id,
                    attempts=result.attempts, http_status=result.http_status,
                    request_id=result.request_id)  # fmt: skip
        return replace(ours, line=result.line, target=result.target)

    def doubt(self, entry_id: str, job_ids: Collection[str]) -> None:
        """The held entry ``entry_id``, admitted as new, brings ``job_ids`` as sent unheard
        (``add``'s ``unsure``): its note of ids sent names them, read after it was admitted
        (a group whose delivery state went back handed it out again, its DELETE maybe on
        the wire at another replica)."""
        waiting = self._entries.get(entry_id)
        if waiting is not None:
            waiting.unsure = waiting.unsure.union(set(job_ids) & set(waiting.message.ids))

    def doubts(self, job_ids: Sequence[str], target: Target | None = None) -> set[str]:
        """Those of ``job_ids`` (of ``target``) that an entry waiting on them brings as sent
        unheard by an earlier delivery (``add``'s ``unsure``): a batch of them carries that
        doubt. Once an id's answer is recorded its entries are no longer asked, so a later
        entry naming it, delivered fresh, meets a 404 as ``absent``."""
        return {job_id for job_id in job_ids if self._doubted(target, job_id)}

    def looks(self, job_ids: Sequence[str], target: Target | None = None) -> list[str]:
        """Those of ``job_ids`` (of ``target``) only to be read, not deleted: every entry
        waiting on them gave them up unsent (``Message.look``). An entry that may still
        delete one (a fresh entry naming it) has it deleted, its answer theirs too."""
        return [job_id for job_id in job_ids if self._looked(target, job_id)]

    def looked_by(self, job_id: str, target: Target | None = None) -> tuple[Message, int] | None:
        """The first entry waiting on ``job_id`` only to read it (``Message.look``): its
        message and deliveries; None unless every entry waiting on it only reads it."""
        if not self._looked(target, job_id):
            return None
        first = self._entries[self._waiters[target, job_id][0]]
        return first.message, first.deliveries

    def looking(self, job_ids: Sequence[str], target: Target | None = None) -> None:
        """A look (``Batch.look``) of ``job_ids`` (of ``target``) is about to go out."""
        self._looking.update((target, i) for i in job_ids)

    def not_theirs(self, result: Result) -> bool:
        """Is ``result`` a look's failure of an id an entry that may delete it waits on now
        (admitted after the look went out, it joined it)? Not that entry's answer: nobody
        sent the DELETE it asked for. No outcome then; the id is sent, for them all."""
        key = (result.target, result.job_id)
        if key not in self._looking or result.outcome is not Outcome.FAILED:
            return False
        if self._looked(result.target, result.job_id):
            return False
        self._looking.discard(key)
        self._asked.add(key)
        return True

    def asked(self, job_ids: Sequence[str], target: Target | None = None) -> tuple[str, ...]:
        """Those of ``job_ids`` (of a look just done) whose look's answer was not theirs
        (``not_theirs``), still waited on: to be sent now, once. Not an id a fresh entry
        named after its look answered: that entry's own call is on its way."""
        keys = [(target, i) for i in job_ids if (target, i) in self._asked]
        self._asked.difference_update(keys)
        return tuple(i for t, i in keys if (t, i) in self._waiters)

    def _looked(self, target: Target | None, job_id: str) -> bool:
        waiting = [self._entries.get(e) for e in self._waiters.get((target, job_id), ())]
        return bool(waiting) and all(w is not None and job_id in w.look for w in waiting)

    def _doubted(self, target: Target | None, job_id: str) -> bool:
        """Does an entry waiting on this id bring a delivery that sent it unheard (``add``'s
        ``unsure``)? One whose own batch carried the doubt had its answer told already."""
        waiting = (self._entries.get(entry) for entry in self._waiters.get((target, job_id), ()))
        return any(w is not None and job_id in w.unsure for w in waiting)

    def settle(self, results: Sequence[Result]) -> list[Finished]:
        """Record outcomes; return the entries this completes, in the order they complete,
        and the entries handed back whose ids done these change (``Finished.released``)."""
        done: list[Finished] = []
        handed: dict[str, _Waiting] = {}
        for result in results:
            self._wire.discard((result.target, result.job_id))
            self._looking.discard((result.target, result.job_id))
            self._asked.discard((result.target, result.job_id))
            for entry_id in self._waiters.pop((result.target, result.job_id), ()):
                waiting = self._entries.get(entry_id)
                if waiting is None:
                    continue
                waiting.open.discard(result.job_id)
                if result.outcome is Outcome.FAILED:
                    waiting.failures.append(result)
                if waiting.released:
                    handed[entry_id] = waiting
                elif not waiting.open:
                    del self._entries[entry_id]
                    done.append(
                        Finished(waiting.message, waiting.deliveries, tuple(waiting.failures))
                    )
        for entry_id, waiting in handed.items():
            if not waiting.open:
                del self._entries[entry_id]
            done.append(Finished(waiting.message, waiting.deliveries, tuple(waiting.failures),
                                 released=waiting.handed_back()))  # fmt: skip
        return done

    def release(
        self, job_ids: Sequence[str], target: Target | None = None, why: HandBack | None = None
    ) -> dict[str, Released]:
        """Hand back ``job_ids`` of ``target`` without an outcome (their entries are left
        pending in Redis for a later delivery, ``why`` kept with them); return, by entry,
        its ids handed back so far and its ids that have an outcome (not to be sent again).
        Its ``why.unsure`` names also the ids an earlier delivery of it sent without hearing
        back (``add``'s ``unsure``): an answer to a call it joined says nothing of those.

        An entry with ids still in flight besides (``Released.waiting``) stays held until
        they settle (``settle``); the others are forgotten."""
        touched: dict[str, bool] = {}  # entry -> its first hand-back of this delivery
        for job_id in job_ids:
            self._wire.discard((target, job_id))
            self._looking.discard((target, job_id))
            self._asked.discard((target, job_id))
            for entry_id in self._waiters.pop((target, job_id), ()):
                waiting = self._entries.get(entry_id)
                if waiting is None or job_id not in waiting.open:
                    continue
                touched.setdefault(entry_id, not waiting.released)
                waiting.open.discard(job_id)
                waiting.released.append(job_id)
                if why is not None:  # its own doubt stays whatever the call's answer said
                    doubt = waiting.why.unsure if waiting.why is not None else waiting.unsure
                    waiting.why = replace(why, unsure=why.unsure | doubt)
        dropped: dict[str, Released] = {}
        for entry_id, first in touched.items():
            waiting = self._entries[entry_id]
            dropped[entry_id] = waiting.handed_back(first)
            if not waiting.open:
                del self._entries[entry_id]
        return dropped

    def clear(self) -> None:
        """Forget everything (a new round re-reads its pending entries from Redis)."""
        self._entries.clear()
        self._waiters.clear()
        self._wire.clear()
        self._looking.clear()
        self._asked.clear()

    def __repr__(self) -> str:
        return (f"InFlight(entries={len(self._entries)}, open_ids={len(self._waiters)}, "
                f"on_wire={len(self._wire)}, looking={len(self._looking)})")  # fmt: skip
