"""Batching and the deletion cap: pure invariants, checked with Hypothesis."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.batcher import Batcher, DeletionBudget

ids = st.lists(st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True), max_size=300)


@given(ids, st.integers(min_value=1, max_value=60))
def test_batches_never_exceed_the_limit_and_keep_every_id_in_order(
    job_ids: list[str], size: int
) -> None:
    batcher = Batcher(size, prefix="t")
    batches = list(batcher.extend(job_ids))
    last = batcher.flush()
    if last is not None:
        batches.append(last)
    assert all(1 <= len(b.ids) <= size for b in batches)
    assert [i for b in batches for i in b.ids] == job_ids
    assert len({b.batch_id for b in batches}) == len(batches)
    assert all(len(b.ids) == size for b in batches[:-1])


def test_batcher_repr_shows_its_state() -> None:
    batcher = Batcher(2, prefix="r")
    list(batcher.extend(["a", "b", "c"]))
    assert repr(batcher) == "Batcher(size=2, made=1, pending=1, targets=1)"


def test_zero_batch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(0, prefix="x")


@given(st.integers(min_value=0, max_value=500), st.lists(st.integers(1, 80), max_size=50))
def test_budget_never_grants_more_than_the_limit(limit: int, asks: list[int]) -> None:
    budget = DeletionBudget(limit)
    granted = [budget.take(n) for n in asks]
    assert sum(granted) == min(limit, sum(asks))
    assert all(0 <= g <= n for g, n in zip(granted, asks, strict=True))


@pytest.mark.anyio
async def test_budget_holds_under_concurrent_takers() -> None:
    """Many tasks taking at once, yielding between takes, never exceed the cap together."""
    budget = DeletionBudget(137)
    granted: list[int] = []

    async def taker() -> None:
        for _ in range(20):
            await anyio.sleep(0)
            granted.append(budget.take(3))

    async with anyio.create_task_group() as group:
        for _ in range(16):
            group.start_soon(taker)
    assert sum(granted) == 137
    assert budget.taken == 137


def test_unlimited_budget_grants_everything() -> None:
    budget = DeletionBudget(None)
    assert budget.take(10**6) == 10**6


@pytest.mark.anyio
async def test_a_share_given_back_goes_to_the_one_waiting_and_the_cap_is_reached_only_then() -> (
    None
):
    """Two shares taken of a cap of 2, open; a third asker waits (``settled``) instead of
    being told the cap is reached, and takes the share the first gives back unsent."""
    budget = DeletionBudget(2)
    assert budget.take(1) == 1 and budget.take(1) == 1
    assert budget.spent and not budget.reached and budget.open == 2
    took: list[int] = []

    async def third() -> None:
        await budget.settled()
        took.append(budget.take(1))

    async with anyio.create_task_group() as group:
        group.start_soon(third)
        await anyio.wait_all_tasks_blocked()
        assert took == []  # waiting: a share may come back
        budget.settle(1, unsent=1)  # the first sent nothing after all
    assert took == [1] and budget.open == 2 and not budget.reached
    budget.settle(1)
    budget.settle(1)
    assert budget.reached and budget.taken == 2 and budget.left == 0
