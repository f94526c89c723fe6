"""The collaborators of each target of a run (``worker.routing``), made from the settings.

One rate limiter per place (project and endpoint: a quota is per project and API), shared
through Redis, keyed per place, when the run shares its limit (``wiring.shares_rate``);
one circuit breaker per endpoint (an outage is the endpoint's); one API client per place,
all signing with the account's one AK/SK pair over the process's one HTTP session (the
project travels in the path and ``X-Project-Id``, which the signature covers).

This is the edge, as ``worker.wiring`` is: it reads settings; what it makes never does.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from worker import wiring
from worker.api.client import ApiClient
from worker.api.credentials import CredentialSource
from worker.clock import Clock
from worker.pacing.breaker import BreakerGate
from worker.pacing.bucket import RateLimiter
from worker.settings import Settings
from worker.targets import Target, limit_key


class Lanes:
    """Made once per run; hands out, per target, what its lane is built with."""

    def __init__(
        self,
        settings: Settings,
        *,
        default: Target | None,
        clock: Clock,
        session: aiohttp.ClientSession | None = None,
        credentials: CredentialSource | None = None,
        redis: Any = None,
        limit_base: str | None = None,
    ) -> None:
        """``session`` and ``credentials``: None when nothing is read or sent (a dry run
        of ids), and then :meth:`transport` is None. ``redis`` and ``limit_base``: the
        shared rate limit's client and key (the default's place's key; see
        ``targets.limit_key``), None for a limiter of this process's own."""
        self._settings = settings
        self.default = default
        self._clock = clock
        self._session = session
        self._credentials = credentials
        self._redis = redis
        self._base = limit_base
        self._limiters: dict[tuple[str, str], RateLimiter] = {}
        self._gates: dict[str, BreakerGate] = {}
        self._clients: dict[tuple[str, str], ApiClient] = {}

    def place(self, target: Target | None) -> Target:
        """The target itself, or the default for None."""
        if target is not None:
            return target
        if self.default is None:
            raise ValueError("no default target is set")
        return self.default

    def limiter(self, target: Target | None) -> RateLimiter:
        """The rate limiter of the target's place, one per project and endpoint."""
        place = self.place(target)
        key = (place.project_id, place.endpoint)
        found = self._limiters.get(key)
        if found is None:
            if self._redis is not None and self._base is not None:
                shared = limit_key(self._base, place, self.default)
                found = wiring.shared_limiter(self._settings, self._redis, shared, self._clock)
            else:
                found = wiring.limiter(self._settings, self._clock)
            self._limiters[key] = found
        return found

    def gate(self, target: Target | None) -> BreakerGate:
        """The circuit breaker of the target's endpoint."""
        endpoint = self.place(target).endpoint
        found = self._gates.get(endpoint)
        if found is None:
            found = self._gates[endpoint] = BreakerGate(clock=self._clock)
        return found

    def transport(self, target: Target | None) -> ApiClient | None:
        """The API client of the target's place; None when the run reads nothing."""
        if self._session is None or self._credentials is None:
            return None
        place = self.place(target)
        key = (place.project_id, place.endpoint)
        found = self._clients.get(key)
        if found is None:
            found = self._clients[key] = ApiClient(
                session=self._session,
                endpoint=place.endpoint,
                project_id=place.project_id,
                credentials=self._credentials,
            )
        return found

    @property
    def api_down(self) -> bool:
        """Some endpoint's circuit is not closed: its API was failing when last heard from."""
        return any(gate.api_down for gate in self._gates.values())

    @property
    def rate(self) -> float:
        """The calls per second the limiters allow together. Before the first call has made
        one (a limiter is made on first use), the rate the first will start at: the stats
        of a queue still empty said 0."""
        if not self._limiters:
            return wiring.starting_rate(self._settings)
        return sum(float(limiter.rate) for limiter in self._limiters.values())

    def __repr__(self) -> str:
        return (
            f"Lanes(default={self.default}, places={len(self._limiters)}, "
            f"endpoints={len(self._gates)}, shared={self._redis is not None})"
        )
