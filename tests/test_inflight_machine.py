"""``InFlight`` under every interleaving of admitting entries, batching their ids, settling
and handing back batches (a Hypothesis state machine; pure, no I/O).

The invariant: each id of an entry ends in exactly one of its outcome (recorded for that
entry: its outcome row names it, and its ids done say so) or handed back (left for its
next delivery), never both, never twice; and each entry is finished exactly once,
acknowledged or handed back, with ids done that are exactly the ids whose outcome it got.
A hand-back while another batch of the same entry was in flight (a paused region's probe)
forgot the entry: the probe's outcomes were recorded for no entry and were not in its ids
done, so its next delivery sent them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from worker.service.inflight import Finished, InFlight, Released
from worker.service.layout import Message
from worker.types import Outcome, Result

IDS = ("a", "b", "c", "d", "e")
OUTCOMES = (Outcome.DELETED, Outcome.ABSENT, Outcome.FAILED)


@dataclass
class _Entry:
    message: Message
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # recorded for this entry
    handed: set[str] = field(default_factory=set)  # handed back without an outcome
    ended: int = 0  # times it was finished (acked, kept or handed back)


class InFlightMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.inflight = InFlight()
        self.entries: dict[str, _Entry] = {}
        self.unbatched: list[str] = []  # ids to send, not in a batch yet (the batcher's)
        self.batches: list[list[str]] = []  # batches on the wire

    # -- the service's moves ---------------------------------------------------------------
    @rule(ids=st.lists(st.sampled_from(IDS), min_size=1, max_size=4, unique=True))
    def add(self, ids: list[str]) -> None:
        entry_id = f"{len(self.entries) + 1}-0"
        message = Message(entry_id, tuple(ids))
        self.entries[entry_id] = _Entry(message)
        admission = self.inflight.add(message, 1)
        assert admission.finished is None
        for job_id in admission.send:
            assert job_id not in self.unbatched and all(job_id not in b for b in self.batches)
        self.unbatched.extend(admission.send)

    @precondition(lambda self: self.unbatched)
    @rule(size=st.integers(1, 3))
    def batch(self, size: int) -> None:
        self.batches.append(self.unbatched[:size])
        del self.unbatched[:size]

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        """Some ids of a batch get their outcome (a batch may settle in parts)."""
        index = data.draw(st.integers(0, len(self.batches) - 1))
        batch = self.batches[index]
        count = data.draw(st.integers(1, len(batch)))
        settled, self.batches[index] = batch[:count], batch[count:]
        if not self.batches[index]:
            del self.batches[index]
        results = [Result(i, data.draw(st.sampled_from(OUTCOMES))) for i in settled]
        for result in results:  # what the outcome row names, as the journal writes it
            for entry_id in self.inflight.entries_of(result.job_id):
                entry = self.entries[entry_id]
                assert result.job_id not in entry.outcomes and result.job_id not in entry.handed
                entry.outcomes[result.job_id] = result.outcome
        for done in self.inflight.settle(results):
            self._finished(done)

    @precondition(lambda self: self.batches or self.unbatched)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """A batch handed back without an outcome (its region paused, the API gave out,
        or a stop before it was sent): on the wire, or still in the batcher."""
        if self.batches and (not self.unbatched or data.draw(st.booleans())):
            batch = self.batches.pop(data.draw(st.integers(0, len(self.batches) - 1)))
        else:
            batch, self.unbatched = self.unbatched, []
        for job_id in batch:
            for entry_id in self.inflight.entries_of(job_id):
                entry = self.entries[entry_id]
                assert job_id not in entry.outcomes and job_id not in entry.handed
                entry.handed.add(job_id)
        for entry_id, held in self.inflight.release(batch).items():
            self._released(self.entries[entry_id], held)

    # -- what the service is told ----------------------------------------------------------
    def _finished(self, done: Finished) -> None:
        entry = self.entries[done.entry_id]
        if done.released is not None:
            self._released(entry, done.released)
            return
        assert not entry.handed, "an entry with ids handed back must not be acknowledged"
        failed = {r.job_id for r in done.failures}
        assert failed == {i for i, o in entry.outcomes.items() if o is Outcome.FAILED}
        assert set(entry.outcomes) == set(entry.message.ids)
        entry.ended += 1

    def _released(self, entry: _Entry, held: Released) -> None:
        done = {i for i, o in entry.outcomes.items() if o is not Outcome.FAILED}
        assert set(held.done) == done, "its ids done must be those whose outcome it got"
        assert set(held.ids) == entry.handed
        if getattr(held, "waiting", False):
            return
        assert set(entry.outcomes) | entry.handed == set(entry.message.ids), (
            "every id of an entry handed back has its outcome or is handed back"
        )
        entry.ended += 1

    @invariant()
    def each_entry_ends_once_and_only_when_no_id_of_it_is_in_flight(self) -> None:
        waiting = {*self.unbatched, *(i for b in self.batches for i in b)}
        for entry_id, entry in self.entries.items():
            assert entry.ended <= 1
            open_ids = set(entry.message.ids) - set(entry.outcomes) - entry.handed
            if entry.ended:
                assert entry_id not in self.inflight and not open_ids
            else:
                assert entry_id in self.inflight and open_ids
                assert open_ids <= waiting

    def teardown(self) -> None:
        """Everything on the wire answered: every entry ended, exactly once."""
        while self.batches or self.unbatched:
            batch = self.batches.pop() if self.batches else self.unbatched
            if batch is self.unbatched:
                self.unbatched = []
            for job_id in batch:
                for entry_id in self.inflight.entries_of(job_id):
                    self.entries[entry_id].outcomes[job_id] = Outcome.DELETED
            for done in self.inflight.settle([Result(i, Outcome.DELETED) for i in batch]):
                self._finished(done)
        assert [e.ended for e in self.entries.values()] == [1] * len(self.entries)
        assert len(self.inflight) == 0 and self.inflight.open_ids == 0


InFlightMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=30,
                                             deadline=None)  # fmt: skip
test_inflight_interleavings = InFlightMachine.TestCase
