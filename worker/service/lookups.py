"""serve's entries naming a region but no project id: the project is IAM's to find.

The look-up is ``run``'s (``Targets.fresh`` over the process's ``ProjectCache``: IAM is
asked once a process for each region, and a failure is not kept there), held to
``allowed_projects`` like any entry's project. It runs **beside the intake, never in it**
(:meth:`RegionLookups.run`, one task per place asked, at most :data:`ASKED_AT_ONCE` at
once): IAM refusing connections costs its retries, IAM accepting and never answering
three read timeouts, and the intake must read and send the other entries meanwhile. An
entry whose region is being looked up is left pending as for IAM unreachable (below), and
the answer wakes the intake (``due``) to read it again. What IAM's failure means:

* IAM could not be reached, timed out, throttled or failed with 5xx (``later``): the entry
  stays pending, its delivery given back as for a region that is down, and it is read
  again once the region's hold (:data:`RETRY_S`, at most ``reclaim_after``) is over;
* IAM said no (no project of that name, more than one, 401/403 naming the permission, not
  IAM's project list at that URL): the entry is dead-lettered with that reason.

A failure is held for its region :data:`RETRY_S` seconds on the service's clock: the entries
of that region read meanwhile get the same answer without asking IAM again, so a burst of
them (or a hostile producer) does not turn into a burst of IAM calls. The end of each
region's hold wakes the intake (``due``), and a hold over is let go. The entries of other
regions and projects never wait on it.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from worker.clock import Clock
from worker.errors import TransientError
from worker.targets import Address, LookupFailed, Target, Targets, Unresolved

RETRY_S = 30.0
"""Seconds a region's failed look-up is held before IAM is asked again (serve holds it no
longer than ``reclaim_after``, when its entries would be read again anyway)."""

ASKED_AT_ONCE = 8
"""Places whose project IAM is asked at once; an entry of another waits (pending) until one
of them is answered, so a producer naming many regions opens no more IAM calls than this."""


class Asking(TransientError):
    """IAM is being asked for the project of an entry's region: the entry waits, pending."""


class RegionLookups:
    """The target of an entry's address, its region's project looked up in IAM when the
    entry names none. ``on_failed(failure)`` is told each time IAM was asked and failed.
    :meth:`run` asks IAM; until it runs, entries needing IAM wait."""

    def __init__(
        self,
        targets: Targets,
        clock: Clock,
        *,
        retry_s: float = RETRY_S,
        on_failed: Callable[[LookupFailed], None] = lambda failure: None,
    ) -> None:
        self._targets = targets
        self._clock = clock
        self._retry_s = retry_s
        self._on_failed = on_failed
        self._held: dict[str, tuple[float, LookupFailed]] = {}
        self._asking: set[Address] = set()
        self._answered = False  # a look-up that entries wait on has ended
        self._queued: list[Address] = []  # to ask (never more than ASKED_AT_ONCE)
        self._wake: anyio.Event | None = None  # ``run``'s, set when some are queued
        self.asked = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Ask IAM for each place :meth:`find` met, each in its own task, until cancelled."""
        async with anyio.create_task_group() as group:
            task_status.started()
            while True:
                self._wake = anyio.Event()
                if not self._queued:
                    await self._wake.wait()
                queued, self._queued = self._queued, []
                for named in queued:
                    group.start_soon(self._look_up, named)

    async def _look_up(self, named: Address) -> None:
        try:
            self.asked += 1
            found = await self._targets.fresh(named)
            if isinstance(found, LookupFailed):
                self._held[found.region] = (self._clock.now() + self._retry_s, found)
                self._on_failed(found)
        finally:
            self._asking.discard(named)
            self._answered = True

    async def find(self, named: Address) -> Target | str | LookupFailed:
        """Where an entry naming ``named`` goes, the reason it is refused, or why it must
        wait: IAM's failure to find its region's project (within the region's hold), or
        IAM being asked for it now (:class:`Asking`: the answer wakes the intake)."""
        region = named.region
        if named.project_id is None and region is not None:
            held = self._held.get(region)
            if held is not None:
                if self._clock.now() < held[0]:
                    return held[1]
                del self._held[region]
        known = self._targets.known(named)
        if known is not None:
            return known
        place = self._targets.resolve(named)
        if not isinstance(place, Unresolved) or place.region is None:
            return await self._targets.fresh(named)  # IAM has nothing to say: no wait
        if named not in self._asking and len(self._asking) < ASKED_AT_ONCE:
            self._asking.add(named)
            self._queued.append(named)
            if self._wake is not None:
                self._wake.set()
        reason = f"the project of region {place.region} is being looked up in IAM"
        return LookupFailed(place.region, reason, Asking(reason))

    def due(self, now: float) -> bool:
        """True once each time a look-up ended or the hold of a region whose entries were
        left waiting on IAM is over (each region's own, however many were read again
        while it lasted): the service then reads its own pending entries again. Holds that
        are over are let go."""
        over = [(region, failed) for region, (until, failed) in self._held.items() if now >= until]
        for region, _ in over:
            del self._held[region]
        answered, self._answered = self._answered, False
        return answered or any(failed.later for _, failed in over)

    def __repr__(self) -> str:
        held = ", ".join(self._held) or "none"
        return f"RegionLookups(asked={self.asked}, asking={len(self._asking)}, held=[{held}])"
