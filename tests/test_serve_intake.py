"""serve's intake decisions without Redis (``worker.service.intake``): the order of reads,
how long a read may block, and when a batch is due."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.batcher import Batcher
from worker.service.intake import (
    AwaitAnswer,
    IntakePlan,
    LingerBatcher,
    ReadNew,
    ReadOwn,
    Reclaim,
)
from worker.targets import Target


def _plan(*, resumed: bool = False, now: float = 100.0) -> IntakePlan:
    return IntakePlan(now, resumed=resumed, reclaim_after=300.0, reclaim_interval=5.0, block=1.0)


def test_own_entries_come_first_page_by_page_then_a_reclaim_then_new_ones() -> None:
    plan = _plan()
    assert plan.next(100.0, answered=False, linger_until=None) == ReadOwn("-")
    plan.read_own("5-0", took_ids=True)
    assert plan.next(100.0, answered=False, linger_until=None) == ReadOwn("5-0")
    plan.read_own(None, took_ids=False)
    # at start-up (not resumed) nothing waits for an answer: the reclaim is due at once
    assert plan.next(100.0, answered=False, linger_until=None) == Reclaim("0-0", 300_000)
    plan.reclaimed(100.0, "9-0", found=True)  # a full page: go on scanning from there
    assert plan.next(100.1, answered=False, linger_until=None) == Reclaim("9-0", 300_000)
    plan.reclaimed(100.0, "0-0", found=True)  # the scan wrapped: look again in 5 s
    assert plan.next(100.25, answered=False, linger_until=None) == ReadNew(1000)
    assert plan.next(104.5, answered=False, linger_until=None) == ReadNew(500)  # the reclaim
    assert plan.next(105.0, answered=False, linger_until=None) == Reclaim("0-0", 300_000)


def test_after_a_pause_nothing_new_is_read_before_an_answer_to_its_own_entries() -> None:
    plan = _plan(resumed=True)
    plan.read_own("5-0", took_ids=True)
    plan.read_own(None, took_ids=False)
    assert plan.next(100.0, answered=False, linger_until=None) == AwaitAnswer()
    assert plan.next(100.0, answered=True, linger_until=None) == Reclaim("0-0", 300_000)


def test_after_a_pause_with_nothing_of_its_own_it_reads_on() -> None:
    plan = _plan(resumed=True)
    plan.read_own(None, took_ids=False)
    plan.reclaimed(100.0, "0-0", found=False)
    assert plan.next(100.0, answered=False, linger_until=None) == ReadNew(1000)


def test_a_read_blocks_no_longer_than_the_linger_of_the_batch_being_filled() -> None:
    plan = _plan()
    plan.read_own(None, took_ids=False)
    plan.reclaimed(100.0, "0-0", found=False)
    assert plan.next(100.0, answered=False, linger_until=100.2) == ReadNew(200)
    assert plan.next(100.3, answered=False, linger_until=100.2) == ReadNew(1)  # overdue: poll


def test_a_batch_is_cut_when_full_and_lingers_no_longer_than_asked() -> None:
    batcher = LingerBatcher(Batcher(3, prefix="t"), linger=0.2)
    assert batcher.due_at is None
    assert batcher.add("a", 10.0) is None
    assert batcher.due_at == 10.2
    assert batcher.settle(10.1, idle=False) == []  # not due, more may come
    assert batcher.add("b", 10.15) is None
    full = batcher.add("c", 10.16)
    assert full is not None and full.ids == ("a", "b", "c") and batcher.due_at is None
    batcher.add("d", 11.0)
    assert batcher.settle(11.0, idle=True) != []  # the read came back empty
    batcher.add("e", 12.0)
    late = batcher.settle(12.2, idle=False)
    assert [b.ids for b in late] == [("e",)]
    assert batcher.settle(13.0, idle=True) == []  # nothing batched


@given(
    size=st.integers(1, 20),
    steps=st.lists(st.tuples(st.integers(0, 5), st.floats(0, 1), st.booleans()), max_size=50),
)
def test_every_id_leaves_once_in_order_in_batches_no_larger_than_the_size(
    size: int, steps: list[tuple[int, float, bool]]
) -> None:
    batcher = LingerBatcher(Batcher(size, prefix="p"), linger=0.2)
    now, sent, out = 0.0, [], []
    for n, (ids, later, idle) in enumerate(steps):
        now += later
        for i in range(ids):
            sent.append(f"{n}-{i}")
            batch = batcher.add(sent[-1], now)
            out.extend([] if batch is None else [batch])
        out.extend(batcher.settle(now, idle=idle))
        due = batcher.due_at
        assert due is None or due > now or not idle  # nothing left overdue after settling
    out.extend(batcher.flush())
    assert [i for batch in out for i in batch.ids] == sent
    assert all(0 < len(batch.ids) <= size for batch in out)


def test_ids_of_two_targets_leave_in_batches_of_their_own_and_a_flush_gives_them_all() -> None:
    """A batch holds one target's ids (one DELETE goes to one project at one endpoint); a
    due linger cuts every target's partial batch, none left behind until the next id."""
    other = Target("project-b", "http://127.0.0.1:1", "cn-north-9")
    batcher = LingerBatcher(Batcher(2, prefix="t"), linger=0.2)
    assert batcher.add("a", 10.0) is None
    assert batcher.add("x", 10.0, other) is None
    full = batcher.add("b", 10.1)
    assert full is not None and full.ids == ("a", "b") and full.target is None
    assert batcher.due_at == 10.2  # "x" still waits, as it has since 10.0
    assert batcher.add("y", 10.15, None) is None
    due = batcher.settle(10.3, idle=False)
    assert sorted((b.target is None, b.ids) for b in due) == [(False, ("x",)), (True, ("y",))]
    assert batcher.due_at is None and batcher.flush() == []


def test_a_reread_reads_our_own_pending_entries_again_before_anything_new() -> None:
    """A paused region answers again: the entries handed back for it are ours and pending,
    read again now (no delivery counted) rather than at a reclaim minutes later."""
    plan = IntakePlan(100.0, resumed=False, reclaim_after=300, reclaim_interval=5, block=1)
    plan.read_own(None, took_ids=False)
    plan.reclaimed(100.0, "0-0", found=False)
    assert isinstance(plan.next(100.1, answered=True, linger_until=None), ReadNew)
    plan.reread()
    assert plan.next(100.2, answered=True, linger_until=None) == ReadOwn("-")
    plan.read_own("5-0", took_ids=True)
    assert plan.next(100.3, answered=True, linger_until=None) == ReadOwn("5-0")
