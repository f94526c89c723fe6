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

``CircuitBreaker`` is the pure state machine over times passed in. ``BreakerGate`` is how
calls meet it: ``worker.pacing.paced.PacedCall`` asks the gate *before* taking a rate token,
so a call waiting out the cool-down holds no token, and when the API recovers the waiting
calls take tokens in turn (a strict gateway would refuse them all at once) and none of them
is timed for the outage. While the circuit is open a call waits (it is not refused, so
waiting spends none of the batch's retry budget); half-open, one call at a time goes as the
probe. A probe that fails is an attempt of its batch, and of every batch that waited on it:
the retry budget the user set (``--max-attempts``), not the breaker, decides when an outage
ends the run with ``ApiUnavailable`` (exit 69), the ids left open. When the run is stopping
(a signal or the deadline) a waiting call gives up with ``CircuitOpenError`` (transient,
nothing sent), so its ids stay open for the next run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import anyio

from worker.clock import Clock
from worker.errors import (
    ApiError,
    CircuitOpenError,
    MalformedResponse,
    NetworkError,
    ServerError,
    ThrottledError,
)

FAILURES: tuple[type[ApiError], ...] = (ServerError, NetworkError, MalformedResponse)
"""The answers (or their absence) that say the API is down. ``ApiTimeout`` is a
``NetworkError``."""


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failure_threshold: int = 8  # failures in a row ...
    min_failure_span: float = 2.0  # ... spread over at least this many seconds
    cooldown: float = 1.0  # first open period
    max_cooldown: float = 30.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        for name in ("min_failure_span", "cooldown", "max_cooldown"):
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
        self.opened = 0
        """How many times the circuit has opened (shown in ``repr``)."""

    def state(self, now: float) -> CircuitState:
        if self._state is CircuitState.OPEN and now >= self._open_until:
            self._state = CircuitState.HALF_OPEN
        return self._state

    @property
    def open_until(self) -> float:
        return self._open_until

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

    def release(self) -> None:
        """The probe admitted did not go (cancelled, stopping): another call may probe."""
        self._probing = False

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
        self._state = CircuitState.OPEN
        self._open_until = now + self._cooldown
        self._failures = 0
        self.opened += 1

    def _success(self) -> None:
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._cooldown = self._config.cooldown

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self._state.value}, failures={self._failures}, "
            f"cooldown={self._cooldown:g}, opened={self.opened})"
        )


class _Round:
    """One probe's verdict, for the calls that wait on it."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: BaseException | None = None


class BreakerGate:
    """The breaker as a gate a call passes before it takes a rate token
    (``worker.pacing.paced.PacedCall``).

    Closed: every call goes. Open: calls wait for the cool-down to end, holding no token.
    Half-open: one call goes as the probe; the others wait for its verdict. A probe that
    fails is the failure of every call that waited on it: ``admit`` raises the probe's
    error for each of them, with nothing sent, so an outage spends the batches' retry
    budgets at the pace of the probes and the run ends (``ApiUnavailable``, 69) after
    ``--max-attempts`` of them, whatever the cool-downs. When the run is stopping a
    waiting call gives up with ``CircuitOpenError`` (nothing sent).
    """

    __slots__ = ("_clock", "_poll_s", "_round", "breaker")

    def __init__(
        self,
        *,
        clock: Clock,
        breaker: CircuitBreaker | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self._clock = clock
        self.breaker = breaker or CircuitBreaker()
        self._poll_s = poll_s
        self._round = _Round()  # the probe out now, and its verdict once it comes

    @property
    def api_down(self) -> bool:
        """The circuit is not closed: the API was failing when last heard from."""
        return self.breaker.state(self._clock.now()) is not CircuitState.CLOSED

    def closed_for(self) -> float:
        """Seconds until the circuit lets a call (a probe) through again: 0 unless open."""
        now = self._clock.now()
        if self.breaker.state(now) is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self.breaker.open_until - now)

    async def admit(self, stopping: Callable[[], bool]) -> bool:
        """Wait until a call may go; whether it goes as the probe."""
        while True:
            admission = self.breaker.admit(self._clock.now())
            if admission.go:
                return admission.probe
            if stopping():
                raise CircuitOpenError(
                    "the API kept failing and the circuit is open; nothing was sent"
                )
            if math.isinf(admission.wait_s):
                # A probe is out: wait for its verdict (or poll for a stop).
                probe = self._round
                with anyio.move_on_after(self._poll_s):
                    await probe.done.wait()
                if isinstance(probe.error, FAILURES):
                    # The probe failed: so did this attempt, with nothing sent.
                    raise CircuitOpenError(
                        f"nothing was sent: the probe of the API failed ({probe.error})",
                        http_status=probe.error.http_status,
                        error_code=probe.error.error_code,
                        error_msg=probe.error.error_msg,
                        request_id=probe.error.request_id,
                    )
            else:
                await self._clock.sleep(min(admission.wait_s, self._poll_s))

    def release(self, probe: bool) -> None:
        """A call admitted did not go after all (cancelled, stopping): let another probe."""
        if probe:
            self.breaker.release()
            self._notify(None)

    def record(self, error: BaseException | None, *, probe: bool) -> None:
        """How a call that went ended: ``None`` for an answer, else its error."""
        self.breaker.record(self._clock.now(), error, probe=probe)
        if probe:
            self._notify(error)

    def _notify(self, verdict: BaseException | None) -> None:
        done, self._round = self._round, _Round()
        done.error = verdict
        done.done.set()

    def __repr__(self) -> str:
        return f"BreakerGate({self.breaker!r})"


__all__ = ["Admission", "BreakerConfig", "BreakerGate", "CircuitBreaker", "CircuitOpenError",
           "CircuitState"]  # fmt: skip
