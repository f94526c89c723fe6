"""A circuit breaker: when the API keeps failing, stop sending, probe now and then, resume.

Without it, eight dispatchers facing an API that answers every call with a 5xx (or not at
all) each retry on their own schedule: the API gets ``concurrency`` calls per back-off
period however long the outage, and every batch burns its retry budget in parallel. With
it, once ``failure_threshold`` calls in a row have failed over at least ``min_failure_span``
seconds the circuit **opens**: no call is sent for ``cooldown`` seconds. Then it is
**half-open**: one call at a time goes through as a probe. A probe that gets any answer from
the service closes the circuit; a failed probe opens it again for twice as long (up to
``max_cooldown``).

What counts: server errors, network errors, timeouts and cut-short bodies are failures;
429s are neither (the rate limiter's business: a throttling API is up); any other answer,
4xx included, proves the API is up.

``CircuitBreaker`` is the pure state machine over times passed in. ``BreakerTransport``
wraps the dispatcher's ``Transport``: while the circuit is open a call waits (it is not
refused, so waiting spends none of the batch's retry budget); half-open, one call at a time
is let through. A probe that fails is an attempt of its batch like any other, so an outage
that outlasts ``max_attempts`` probes still ends the run with ``ApiUnavailable`` (exit 69).
When the run is stopping (a signal or the deadline) a waiting call gives up with
``CircuitOpenError`` (transient, nothing sent), so its ids stay open for the next run. After
``give_up_after`` seconds down, waiting calls fail the same way at once: the dispatcher
spends its retry budget in a few back-offs and stops the run with ``ApiUnavailable`` (exit
69), the ids left open, instead of probing for as long as the batches' budgets last. Probes
still go through meanwhile, so an API that comes back is still noticed.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

import anyio

from worker.clock import Clock
from worker.errors import (
    ApiError,
    MalformedResponse,
    NetworkError,
    ServerError,
    ThrottledError,
    TransientError,
)
from worker.types import DeleteResult, JobRecord

if TYPE_CHECKING:
    from worker.api.client import Api, JobPage

T = TypeVar("T")

FAILURES: tuple[type[ApiError], ...] = (ServerError, NetworkError, MalformedResponse)
"""The answers (or their absence) that say the API is down. ``ApiTimeout`` is a
``NetworkError``."""


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpenError(TransientError):
    """No call was made: the circuit was open when the run began to stop."""


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = 8  # failures in a row ...
    min_failure_span: float = 2.0  # ... spread over at least this many seconds
    cooldown: float = 1.0  # first open period
    max_cooldown: float = 30.0
    give_up_after: float = 120.0  # down this long: waiting calls fail instead of waiting

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        for name in ("min_failure_span", "cooldown", "max_cooldown", "give_up_after"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.cooldown <= 0 or self.max_cooldown < self.cooldown:
            raise ValueError("need 0 < cooldown <= max_cooldown")


@dataclass(frozen=True, slots=True)
class Admission:
    """``go`` now (as the probe, if ``probe``), or wait ``wait_s`` (``inf``: for the probe)."""

    go: bool
    probe: bool = False
    wait_s: float = 0.0


class CircuitBreaker:
    """The state machine. Pure: every method takes ``now``; no clock, no I/O."""

    __slots__ = (
        "_config",
        "_cooldown",
        "_down_since",
        "_failures",
        "_first_failure",
        "_open_until",
        "_probing",
        "_state",
        "opened",
    )

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self._config = config or BreakerConfig()
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._first_failure = 0.0
        self._cooldown = self._config.cooldown
        self._open_until = -math.inf
        self._probing = False
        self._down_since: float | None = None
        self.opened = 0
        """How many times the circuit has opened (shown in ``repr``)."""

    def state(self, now: float) -> CircuitState:
        if self._state is CircuitState.OPEN and now >= self._open_until:
            self._state = CircuitState.HALF_OPEN
        return self._state

    @property
    def open_until(self) -> float:
        return self._open_until

    def given_up(self, now: float) -> bool:
        """Down (open or half-open, no probe answered) for ``give_up_after`` seconds."""
        since = self._down_since
        return since is not None and now - since >= self._config.give_up_after

    def admit(self, now: float) -> Admission:
        """May a call start now? Half-open admits one probe at a time."""
        state = self.state(now)
        if state is CircuitState.CLOSED:
            return Admission(go=True)
        if state is CircuitState.OPEN:
            return Admission(go=False, wait_s=self._open_until - now)
        if self._probing:
            return Admission(go=False, wait_s=math.inf)
        self._probing = True
        return Admission(go=True, probe=True)

    def record(self, now: float, error: BaseException | None, *, probe: bool = False) -> None:
        """How a call ended: ``None`` for an answer, else the error it raised."""
        if probe:
            self._probing = False
        if isinstance(error, ThrottledError) or (
            error is not None and not isinstance(error, ApiError)
        ):
            return  # a throttle, a cancellation or a bug: says nothing about the API's health
        if isinstance(error, FAILURES):
            self._failure(now, probe=probe)
        else:
            self._success()

    def _failure(self, now: float, *, probe: bool) -> None:
        c = self._config
        if self._state is CircuitState.HALF_OPEN and probe:
            self._cooldown = min(2.0 * self._cooldown, c.max_cooldown)
            self._open(now)
            return
        if self._state is not CircuitState.CLOSED:
            return  # a call that started before the circuit opened
        if self._failures == 0:
            self._first_failure = now
        self._failures += 1
        if self._failures >= c.failure_threshold and now - self._first_failure >= (
            c.min_failure_span
        ):
            self._open(now)

    def _open(self, now: float) -> None:
        if self._down_since is None:
            self._down_since = now
        self._state = CircuitState.OPEN
        self._open_until = now + self._cooldown
        self._failures = 0
        self.opened += 1

    def _success(self) -> None:
        self._down_since = None
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._cooldown = self._config.cooldown

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self._state.value}, failures={self._failures}, "
            f"cooldown={self._cooldown:g}, opened={self.opened})"
        )


class BreakerTransport:
    """A ``Transport`` that waits while the circuit is open and probes when half-open.

    ``stopping`` is polled while waiting (every ``poll_s``): once it says yes, a waiting
    call raises ``CircuitOpenError`` instead of sending.
    """

    __slots__ = ("_changed", "_clock", "_inner", "_poll_s", "_stopping", "breaker")

    def __init__(
        self,
        inner: Api,
        *,
        clock: Clock,
        breaker: CircuitBreaker | None = None,
        stopping: Callable[[], bool] = lambda: False,
        poll_s: float = 0.5,
    ) -> None:
        self._inner = inner
        self._clock = clock
        self.breaker = breaker or CircuitBreaker()
        self._stopping = stopping
        self._poll_s = poll_s
        self._changed = anyio.Event()

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult:
        return await self._call(lambda: self._inner.delete_jobs(ids))

    async def get_job(self, job_id: str) -> JobRecord:
        return await self._call(lambda: self._inner.get_job(job_id))

    async def list_jobs(self, **filters: str | int | bool) -> JobPage:
        return await self._call(lambda: self._inner.list_jobs(**filters))

    @property
    def api_down(self) -> bool:
        """The circuit is not closed: the API was failing when last heard from."""
        return self.breaker.state(self._clock.now()) is not CircuitState.CLOSED

    async def _admit(self) -> bool:
        while True:
            admission = self.breaker.admit(self._clock.now())
            if admission.go:
                return admission.probe
            if self._stopping() or self.breaker.given_up(self._clock.now()):
                raise CircuitOpenError(
                    "the API kept failing and the circuit is open; nothing was sent"
                )
            if math.isinf(admission.wait_s):
                # A probe is out: wait for its verdict (or poll for a stop).
                changed = self._changed
                with anyio.move_on_after(self._poll_s):
                    await changed.wait()
            else:
                await self._clock.sleep(min(admission.wait_s, self._poll_s))

    async def _call(self, send: Callable[[], Awaitable[T]]) -> T:
        probe = await self._admit()
        try:
            result = await send()
        except BaseException as exc:
            # A cancellation or a bug says nothing about the API; a probe is released.
            self.breaker.record(self._clock.now(), exc, probe=probe)
            if probe:
                self._notify()
            raise
        self.breaker.record(self._clock.now(), None, probe=probe)
        if probe:
            self._notify()
        return result

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def __repr__(self) -> str:
        return f"BreakerTransport({self.breaker!r})"
