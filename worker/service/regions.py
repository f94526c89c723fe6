"""serve's batches of many projects and regions: each to its target's lane, an endpoint's
outage its own.

A batch holds the ids of one target (``Message.target``; None: the settings' default). Its
lane is a dispatcher (wrapped in the guard when jobs are protected) built with the target's
rate limiter (one per project and endpoint, shared through Redis) and its endpoint's circuit
breaker (``worker.lanes.Lanes``), and a journal that stamps each outcome with the target
(``worker.routing.Stamped``).

An endpoint whose API gives out (a batch ends ``ApiUnavailable``, or its circuit is open)
is *paused* while the service has met another endpoint: one batch of it is kept as the
probe of its recovery, held in memory and sent again each time its breaker lets a call
through (no delivery counted) until the endpoint answers or the service stops; every other
batch of it is handed back at once with :class:`Paused`, nothing sent (and no delivery
counted), so the dispatchers stay free for the other endpoints' batches. The service leaves
a handed-back batch's entries pending with the error, never acknowledged. The probe's
answer resumes the endpoint, and ``on_resume`` has the service read them again at once.
With one endpoint met, its batches wait for its breaker and end ``ApiUnavailable`` as a
one-project service's always have.

A project an entry named that its endpoint refuses (a 401/403 for the keys, or the
gateway's 404 for a project it does not know there: a producer that named the wrong
region) pauses that project at that endpoint alike, never the replica: an entry must not
be able to stop the work of the others. Its entries stay pending with the refusal, probed
one batch at a time, and end ``failed`` after ``max_deliveries`` if it lasts. The default
project's refusal pauses the whole replica, unready, as it always has (the service's
``AuthError`` and ``NoSuchApi``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

from worker.clock import Clock
from worker.errors import (
    ApiError,
    ApiUnavailable,
    AuthError,
    CircuitOpenError,
    NoSuchApi,
    TakenOver,
)
from worker.pacing.breaker import BreakerGate
from worker.pipeline import BatchProcessor
from worker.routing import Router
from worker.targets import Target
from worker.types import Batch

PROBE_GAP = 1.0
"""Seconds at least between two tries of a paused endpoint's probe."""


class Paused(ApiUnavailable):
    """A batch of a paused endpoint, handed back unsent: another batch of it is probing."""


class RegionRouter:
    """The service's ``BatchProcessor``: a lane per target, a pause per endpoint.

    ``lane(target)`` makes the processor of a target's batches; ``gate(target)`` is the
    circuit breaker of its endpoint; ``place(target)`` the target itself (None: the
    default). ``on_pause(target, error)`` and ``on_resume(target)`` are told when an
    endpoint pauses and resumes (the service's events)."""

    def __init__(
        self,
        *,
        lane: Callable[[Target | None], BatchProcessor],
        gate: Callable[[Target | None], BreakerGate],
        place: Callable[[Target | None], Target],
        on_pause: Callable[[Target, ApiError], None] = lambda target, error: None,
        on_resume: Callable[[Target], None] = lambda target: None,
        stopping: Callable[[], bool] = lambda: False,
        clock: Clock | None = None,
    ) -> None:
        """``clock``: a probe that failed waits ``PROBE_GAP`` seconds on it before it goes
        again, whatever its breaker says (None: no wait of its own)."""
        self._clock = clock
        # Its lanes, one per target, made on first use; its stop on an outage is run's, and
        # serve pauses the endpoint instead (``process``).
        self._lanes = Router(default=None, lane=lane)
        self._gate = gate
        self._place = place
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._stopping = stopping
        self._busy: dict[str, int] = {}  # endpoint -> its batches being processed
        self._met: set[str] = set()
        self.paused: dict[str, ApiError] = {}
        """The endpoints paused (and the places ``project@endpoint`` refused), with the
        error their last batch ended on."""
        self.handed_back = 0
        self.probes = 0
        """Batches sent again as their paused endpoint's probe."""

    async def process(self, batch: Batch) -> None:
        place = self._place(batch.target)
        endpoint = place.endpoint
        refusal = f"{place.project_id}@{endpoint}"  # a project refused there
        busy = self._busy.get(endpoint, 0)
        self._met.add(endpoint)
        others = len(self._met) > 1
        down = endpoint in self.paused or self._gate(batch.target).api_down
        refused = refusal in self.paused and self._busy.get(refusal, 0) > 0
        if (busy and others and down) or refused:
            self.handed_back += 1
            cause = (
                self.paused.get(refusal)
                or self.paused.get(endpoint)
                or CircuitOpenError(f"the API at {place.where} is failing; another batch probes it")
            )
            raise Paused(cause, batch_id=batch.batch_id, open_ids=len(batch))
        self._busy[endpoint] = busy + 1
        self._busy[refusal] = self._busy.get(refusal, 0) + 1
        try:
            await self._probing(batch, endpoint, place)
        except (AuthError, NoSuchApi) as exc:
            if batch.target is None:
                raise  # the deployment's own project: the replica pauses, unready
            self._pause(refusal, place, exc)
            raise ApiUnavailable(exc, batch_id=batch.batch_id, open_ids=len(batch)) from exc
        finally:
            self._busy[endpoint] -= 1
            self._busy[refusal] -= 1
        if self._stopping():
            return  # a stop left the batch open: its endpoint did not answer
        for key in (endpoint, refusal):
            if self.paused.pop(key, None) is not None:
                self._on_resume(place)

    async def _probing(self, batch: Batch, endpoint: str, place: Target) -> None:
        """The batch through its lane; while another endpoint has been met, an outage of
        this one keeps the batch here as its probe, sent again (its breaker paces it) until
        it is answered or the service stops. With one endpoint met, the outage goes up."""
        lane = self._lanes.lane(batch.target)
        unsure = batch.unsure
        while True:
            try:
                await lane.process(batch)
                return
            except TakenOver as exc:  # not the API's doing: nothing to pause or probe
                exc.unsure |= unsure
                raise
            except ApiUnavailable as exc:
                # Sent without a readable answer on any try: the next delivery, or the next
                # try, must not call those jobs absent.
                unsure = exc.unsure = exc.unsure | unsure
                if len(self._met) < 2 or self._stopping():
                    raise  # nothing paused: its batches wait for its breaker, as before
                self._pause(endpoint, place, exc.cause)
            self.probes += 1
            batch = replace(batch, unsure=unsure)
            if self._clock is not None:  # never a busy loop, whatever the lane answers
                await self._clock.sleep(PROBE_GAP)

    def _pause(self, key: str, place: Target, error: ApiError) -> None:
        if key not in self.paused:
            self._on_pause(place, error)
        self.paused[key] = error

    def down_for(self, target: Target | None) -> bool:
        """``target``'s endpoint (or its project there) is paused, or its circuit not
        closed: a batch of it now is handed back at once, or is the probe."""
        place = self._place(target)
        paused = {place.endpoint, f"{place.project_id}@{place.endpoint}"} & set(self.paused)
        return bool(paused) or self._gate(target).api_down

    def down(self) -> Iterator[tuple[Target | None, bool]]:
        """Each target met, and whether its endpoint is paused or its circuit not closed."""
        for target in self._lanes.lanes:
            yield target, self.down_for(target)

    def __repr__(self) -> str:
        paused = ", ".join(self.paused) or "none"
        return (
            f"RegionRouter(lanes={len(self._lanes.lanes)}, paused=[{paused}], "
            f"handed_back={self.handed_back}, probes={self.probes})"
        )
