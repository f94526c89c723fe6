"""Many targets in one run: each batch goes to the processor of its target.

A batch holds the ids of one target (``worker.batcher``), so a DELETE goes to one project
at one endpoint. :class:`Router` is the ``BatchProcessor`` the pipeline sees; behind it, a
lane per target (a dispatcher, wrapped in the guard when jobs are protected), made when the
target's first batch comes. The lanes of one place (project and endpoint) share one rate
limiter, since the quota is the project's; the lanes of one endpoint share one circuit
breaker, since an outage is the endpoint's (``Lanes``, made by ``worker.wiring``).

An endpoint whose API gives out (``ApiUnavailable``: its breaker's probes and the batch's
attempts spent) stops only its own lanes while another endpoint the run has met still
answers: that batch's ids and every later batch's for that endpoint stay open, never sent,
and the other endpoints go on. When every endpoint the run has met is down, the error
goes up and the run stops as a one-project run always has. Either way the run ends 69.

The outcome of an id whose line named its target carries it (``Result.target``):
:class:`Stamped` sets it as the outcome is settled, so the dispatcher and the guard need not
know about targets at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from worker.dispatcher import Journal
from worker.errors import ApiUnavailable
from worker.pipeline import BatchProcessor
from worker.targets import Target
from worker.types import Batch, Result


class Stamped:
    """A journal for the lane of one named target: each outcome settled through it carries
    ``target``. Everything else passes through."""

    __slots__ = ("_inner", "target")

    def __init__(self, inner: Journal, target: Target) -> None:
        self._inner = inner
        self.target = target

    async def sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        await self._inner.sent(batch_id, ids, attempt)

    async def retrying(self, batch_id: str, attempt: int, delay_s: float, reason: str) -> None:
        await self._inner.retrying(batch_id, attempt, delay_s, reason)

    async def finished(self, results: Sequence[Result]) -> None:
        target = self.target
        for result in results:
            result.target = target
        await self._inner.finished(results)

    def __repr__(self) -> str:
        return f"Stamped({self.target}, {self._inner!r})"


Lane = Callable[[Target | None], BatchProcessor]
"""Makes the processor of the batches of a target (None: the settings' default)."""


class Router:
    """Sends each batch to its target's lane; keeps an endpoint's outage its own.

    ``down``: the endpoints that gave out, with the error; ``left_open``: the ids of the
    later batches of those endpoints, not sent because of it. ``on_down(endpoint, error)``
    is called once per endpoint that gives out while others still answer (the run's
    warning event)."""

    def __init__(
        self,
        *,
        default: Target | None,
        lane: Lane,
        on_down: Callable[[str, ApiUnavailable], None] = lambda endpoint, error: None,
    ) -> None:
        self._default = default
        self._make = lane
        self._lanes: dict[Target | None, BatchProcessor] = {}
        self._met: dict[str, None] = {}
        self._on_down = on_down
        self.down: dict[str, ApiUnavailable] = {}
        self.left_open = 0

    def lane(self, target: Target | None) -> BatchProcessor:
        """The processor of ``target``'s batches, made on first use."""
        found = self._lanes.get(target)
        if found is None:
            found = self._lanes[target] = self._make(target)
        return found

    @property
    def lanes(self) -> dict[Target | None, BatchProcessor]:
        return dict(self._lanes)

    async def process(self, batch: Batch) -> None:
        place = batch.target if batch.target is not None else self._default
        if place is None:  # the pipeline sends no such batch: every line resolved
            raise ValueError(f"batch {batch.batch_id} has no target and no default is set")
        endpoint = place.endpoint
        if endpoint in self.down:
            self.left_open += len(batch)
            return
        self._met[endpoint] = None
        try:
            await self.lane(batch.target).process(batch)
        except ApiUnavailable as exc:
            first = endpoint not in self.down
            self.down.setdefault(endpoint, exc)
            if all(met in self.down for met in self._met):
                raise  # nothing the run has met answers: it stops, as one project's does
            if first:
                self._on_down(endpoint, exc)

    def __repr__(self) -> str:
        down = ", ".join(self.down) or "none"
        return (
            f"Router(lanes={len(self._lanes)}, endpoints={len(self._met)}, down=[{down}], "
            f"left_open={self.left_open})"
        )
