"""A plan's expiry ends the wait of a DELETE for its rate token.

The guard hands a checked batch to the dispatcher, whose DELETE then waits its turn at the
rate limiter. Once the plan has expired that DELETE may not go out: when its token comes,
the dispatcher finds the batch past its ``fresh_until`` (never later than the plan's expiry
on the run's clock) or its ``wall_until`` (the plan's ``expires_at`` on the system's) and
hands it back unsent, and the guard ends its ids ``skipped`` (``plan_expired``). The wait
was for nothing: at ``--rate 2`` with eight batches queued, the last was handed back about
4 s after the plan expired, each one taking a token it would not use.

:class:`ExpiringLimiter`, the limiter the guard's dispatcher takes its tokens from, ends the
wait of a batch's first call once the plan has expired (:func:`deleting` names the batch),
taking no token: the dispatcher's own check then refuses the DELETE, as it would have after
the token. Only the first call of a batch waits on the expiry: it is its DELETE's first
attempt (the dispatcher makes no other call before it), which that check guards. A later
call takes its token as ever: a show call settling an answer has no such check, and must
never go out unpaced.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from worker.clock import Clock
from worker.pacing.bucket import RateLimiter, Reporting

if TYPE_CHECKING:
    from worker.discovery.guard import PlanCheck
    from worker.types import Batch

STEP_S = 0.001
"""What is waited beyond an instant the clocks say is now (the run's clock at the expiry to
the dot): the dispatcher's check wants it passed."""


@dataclass(slots=True)
class _Deleting:
    """A checked batch on its way to its DELETE under ``plan`` (in this task)."""

    plan: PlanCheck
    fresh_until: float | None
    wall_until: float | None
    called: bool = False  # its first call has asked for a token

    def refused(self, clock: Clock) -> bool:
        """Would the dispatcher refuse the DELETE now, the plan having expired? Its own test
        (``Batch.fresh_until`` passed, or ``Batch.wall_until`` reached), with the plan's."""
        if not self.plan.expired(clock):
            return False
        stale = self.fresh_until is not None and clock.now() > self.fresh_until
        return stale or (self.wall_until is not None and clock.wall() >= self.wall_until)

    def left(self, clock: Clock) -> float:
        """Seconds, on the run's clock, until the plan expires by either clock (or a step)."""
        plan, left = self.plan, []
        if plan.expires is not None:
            left.append(plan.expires - clock.now())
        if plan.wall_expires is not None:
            left.append(plan.wall_expires - clock.wall())
        return max(min(left, default=STEP_S), STEP_S)


_DELETING: ContextVar[_Deleting | None] = ContextVar("reaper_deleting", default=None)


@contextmanager
def deleting(plan: PlanCheck | None, batch: Batch) -> Iterator[None]:
    """While the dispatcher deletes ``batch`` (in this task): its first call's wait for a
    token ends once ``plan`` has expired. Without an expiry, or a check the dispatcher can
    refuse by, nothing changes."""
    guarded = plan is not None and (plan.expires is not None or plan.wall_expires is not None)
    if not guarded or (batch.fresh_until is None and batch.wall_until is None):
        yield
        return
    assert plan is not None
    token = _DELETING.set(_Deleting(plan, batch.fresh_until, batch.wall_until))
    try:
        yield
    finally:
        _DELETING.reset(token)


class ExpiringLimiter:
    """A ``RateLimiter`` whose wait for a batch's first token ends when its plan expires."""

    __slots__ = ("_clock", "_inner", "cut")

    def __init__(self, inner: RateLimiter, clock: Clock) -> None:
        self._inner = inner
        self._clock = clock
        self.cut = 0  # waits ended by a plan's expiry, no token taken

    @property
    def rate(self) -> float:
        return self._inner.rate

    def feedback(self, **answer: Any) -> None:
        """How a call ended, told to the limiter it wraps (``RateLimiter.feedback``)."""
        self._inner.feedback(**answer)

    async def rest(self, seconds: float) -> None:
        """A refused caller's sleep, where the limiter it wraps has one (``Reporting``)."""
        if isinstance(self._inner, Reporting):
            await self._inner.rest(seconds)
        else:
            await self._clock.sleep(seconds)

    async def acquire(self) -> None:
        batch = _DELETING.get()
        if batch is None or batch.called:
            await self._inner.acquire()
            return
        batch.called = True
        granted = False
        if not batch.refused(self._clock):
            async with anyio.create_task_group() as race:

                async def token() -> None:
                    nonlocal granted
                    await self._inner.acquire()
                    granted = True
                    race.cancel_scope.cancel()

                async def expiry() -> None:
                    while not batch.refused(self._clock):
                        await self._clock.sleep(batch.left(self._clock))
                    race.cancel_scope.cancel()

                race.start_soon(token)
                race.start_soon(expiry)
        if granted:
            return
        if not batch.refused(self._clock):  # the system's clock set back meanwhile: wait
            await self._inner.acquire()
            return
        self.cut += 1  # the dispatcher refuses the DELETE: no token for it

    def __repr__(self) -> str:
        return f"ExpiringLimiter(cut={self.cut}, inner={self._inner!r})"
