"""serve's entries naming a region but no project id: the project is IAM's to find.

The look-up is ``run``'s (``Targets.fresh`` over the process's ``ProjectCache``: IAM is
asked once a process for each region, and a failure is not kept there), held to
``allowed_projects`` like any entry's project. What IAM's failure means for an entry:

* IAM could not be reached, timed out, throttled or failed with 5xx (``later``): the entry
  stays pending, its delivery given back as for a region that is down, and it is read
  again once the region's hold (:data:`RETRY_S`, at most ``reclaim_after``) is over;
* IAM said no (no project of that name, more than one, 401/403 naming the permission, not
  IAM's project list at that URL): the entry is dead-lettered with that reason.

A failure is held for its region :data:`RETRY_S` seconds on the service's clock: the entries
of that region read meanwhile get the same answer without asking IAM again, so a burst of
them (or a hostile producer) does not turn into a burst of IAM calls, and the intake does
not wait on IAM for each. The end of each region's hold wakes the intake (``due``), and a
hold over is let go. The entries of other regions and projects never wait on it.
"""

from __future__ import annotations

from collections.abc import Callable

from worker.clock import Clock
from worker.targets import Address, LookupFailed, Target, Targets

RETRY_S = 30.0
"""Seconds a region's failed look-up is held before IAM is asked again (serve holds it no
longer than ``reclaim_after``, when its entries would be read again anyway)."""


class RegionLookups:
    """The target of an entry's address, its region's project looked up in IAM when the
    entry names none. ``on_failed(failure)`` is told each time IAM was asked and failed."""

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
        self.asked = 0

    async def find(self, named: Address) -> Target | str | LookupFailed:
        """Where an entry naming ``named`` goes, the reason it is refused, or IAM's failure
        to find its region's project (now, or within the region's hold)."""
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
        self.asked += 1
        found = await self._targets.fresh(named)
        if isinstance(found, LookupFailed):
            self._held[found.region] = (self._clock.now() + self._retry_s, found)
            self._on_failed(found)
        return found

    def due(self, now: float) -> bool:
        """True once each time the hold of a region whose entries were left waiting on IAM
        is over (each region's own, however many were read again while it lasted): the
        service then reads its own pending entries again. Holds that are over are let go."""
        over = [(region, failed) for region, (until, failed) in self._held.items() if now >= until]
        for region, _ in over:
            del self._held[region]
        return any(failed.later for _, failed in over)

    def __repr__(self) -> str:
        held = ", ".join(self._held) or "none"
        return f"RegionLookups(asked={self.asked}, held=[{held}])"
