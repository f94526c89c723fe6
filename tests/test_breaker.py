"""The circuit breaker: its state machine on scripted times, and the gate calls wait at
while it is open (through the paced call), on virtual time."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import anyio
import pytest

from tests.fakes import FakeClock
from worker.errors import (
    ApiTimeout,
    ApiUnavailable,
    ClientError,
    NetworkError,
    ServerError,
    ThrottledError,
    TransientError,
)
from worker.pacing.breaker import BreakerConfig, BreakerGate, CircuitBreaker, CircuitState
from worker.pacing.bucket import UnlimitedRateLimiter
from worker.pacing.paced import PacedCall, Stopped
from worker.pacing.retry import RetryPolicy
from worker.types import DeleteResult


def _open(breaker: CircuitBreaker, start: float = 0.0, n: int = 8) -> float:
    t = start
    for i in range(n):
        t = start + i * 0.5
        breaker.record(t, ServerError("500"))
    return t


# --- the state machine ---------------------------------------------------------------------


def test_opens_after_enough_failures_in_a_row_over_enough_time() -> None:
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=3, min_failure_span=2.0))
    for t in (0.0, 0.1, 0.2, 0.3):  # many failures at once: a blip, not an outage
        breaker.record(t, NetworkError("reset"))
    assert breaker.state(0.3) is CircuitState.CLOSED
    breaker.record(2.5, ApiTimeout("slow"))
    assert breaker.state(2.5) is CircuitState.OPEN
    assert breaker.admit(2.6).go is False


def test_a_success_in_between_resets_the_count() -> None:
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=3, min_failure_span=0.0))
    breaker.record(0.0, ServerError("500"))
    breaker.record(0.1, ServerError("500"))
    breaker.record(0.2, None)
    breaker.record(0.3, ServerError("500"))
    assert breaker.state(0.3) is CircuitState.CLOSED


def test_throttles_are_neutral_and_a_4xx_proves_the_api_is_up() -> None:
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=2, min_failure_span=0.0))
    breaker.record(0.0, ServerError("500"))
    for t in range(1, 20):
        breaker.record(float(t), ThrottledError("429"))
    assert breaker.state(20.0) is CircuitState.CLOSED
    breaker.record(21.0, ClientError("400"))
    breaker.record(22.0, ServerError("500"))
    assert breaker.state(22.0) is CircuitState.CLOSED  # the 400 reset the count


def test_half_open_lets_one_probe_through_and_its_answer_decides() -> None:
    config = BreakerConfig(failure_threshold=8, min_failure_span=2.0, cooldown=1.0)
    breaker = CircuitBreaker(config)
    t = _open(breaker)
    assert breaker.admit(t + 0.5) == breaker.admit(t + 0.5)
    assert breaker.admit(t + 0.5).wait_s == pytest.approx(0.5)
    probe = breaker.admit(t + 1.0)
    assert probe.go and probe.probe
    others = breaker.admit(t + 1.0)
    assert not others.go and others.wait_s == float("inf")
    breaker.record(t + 1.1, None, probe=True)
    assert breaker.state(t + 1.1) is CircuitState.CLOSED
    assert breaker.admit(t + 1.1).go


def test_a_failed_probe_reopens_for_twice_as_long_up_to_the_cap() -> None:
    breaker = CircuitBreaker(BreakerConfig(cooldown=1.0, max_cooldown=3.0))
    t = _open(breaker)
    cooldowns = []
    for _ in range(4):
        t = breaker.open_until
        assert breaker.admit(t).probe
        breaker.record(t, ServerError("503"), probe=True)
        cooldowns.append(breaker.open_until - t)
    assert cooldowns == [2.0, 3.0, 3.0, 3.0]
    assert breaker.opened == 5
    assert "state=open" in repr(breaker)


@pytest.mark.anyio
async def test_a_cancelled_probe_lets_another_one_go() -> None:
    breaker = CircuitBreaker()
    t = _open(breaker)
    t = breaker.open_until
    assert breaker.admit(t).probe
    breaker.record(t, anyio.get_cancelled_exc_class()(), probe=True)
    assert breaker.admit(t).probe
    assert breaker.state(t) is CircuitState.HALF_OPEN


# --- the gate, through the paced call, on virtual time -------------------------------------


class FlakyApi:
    """Fails every call until ``up_at`` (virtual time), then answers."""

    def __init__(self, clock: FakeClock, up_at: float) -> None:
        self.clock = clock
        self.up_at = up_at
        self.calls: list[float] = []

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult:
        self.calls.append(self.clock.now())
        await self.clock.sleep(0.01)
        if self.clock.now() < self.up_at:
            raise ServerError("503", http_status=503)
        return DeleteResult(records=(), http_status=200, request_id="r")


def _paced(
    clock: FakeClock,
    gate: BreakerGate,
    *,
    max_attempts: int = 50,
    stopping: Callable[[], bool] = lambda: False,
) -> PacedCall:
    policy = RetryPolicy(max_attempts=max_attempts, base_delay=0.1, max_delay=0.1,
                         rng=random.Random(3))  # fmt: skip
    return PacedCall(
        limiter=UnlimitedRateLimiter(), policy=policy, clock=clock, gate=gate, stopping=stopping
    )


@pytest.mark.anyio
async def test_an_outage_is_probed_at_a_low_rate_and_calls_resume_after_it() -> None:
    """Eight callers retrying every 0.1 s would send 80 calls a second for 20 s; with the
    breaker open they send a handful of probes, and all of them succeed once it is up."""
    clock = FakeClock()
    api = FlakyApi(clock, up_at=20.0)
    gate = BreakerGate(clock=clock, breaker=CircuitBreaker(BreakerConfig(max_cooldown=8.0)))
    paced = _paced(clock, gate)
    done: list[float] = []

    async def caller() -> None:
        await paced(lambda: api.delete_jobs(["a"]), what="b")
        done.append(clock.now())

    async with anyio.create_task_group() as group:
        for _ in range(8):
            group.start_soon(caller)
    during = [t for t in api.calls if 3.0 <= t < 20.0]
    assert len(during) <= 6  # probes at 1, 2, 4, 8, 8 s intervals, one at a time
    assert len(done) == 8
    assert max(done) - 20.0 <= 8.0 + 0.2  # resumed within one cooldown of recovery
    assert gate.breaker.state(clock.now()) is CircuitState.CLOSED


@pytest.mark.anyio
async def test_a_stopping_run_gives_up_waiting_without_sending() -> None:
    clock = FakeClock()
    api = FlakyApi(clock, up_at=1e9)
    stop = False
    gate = BreakerGate(clock=clock)
    _open(gate.breaker, start=clock.now())
    paced = _paced(clock, gate, stopping=lambda: stop)
    sent_before = len(api.calls)

    async def stop_soon() -> None:
        nonlocal stop
        await clock.sleep(0.2)
        stop = True

    async with anyio.create_task_group() as group:
        group.start_soon(stop_soon)
        with pytest.raises(Stopped):
            await paced(lambda: api.delete_jobs(["a"]), what="b")
    assert len(api.calls) == sent_before
    assert "BreakerGate(CircuitBreaker(state=open" in repr(gate)


@pytest.mark.anyio
async def test_a_failed_probe_is_an_attempt_of_every_call_that_waited_on_it() -> None:
    """So an outage ends the run after ``max_attempts`` probes, whatever the cool-downs:
    the waiters' own retries are told ``circuit_open`` and nothing of theirs was sent."""
    clock = FakeClock()
    api = FlakyApi(clock, up_at=1e9)
    gate = BreakerGate(clock=clock)
    _open(gate.breaker, start=clock.now())
    paced = _paced(clock, gate, max_attempts=3)
    reasons: list[str] = []

    async def retrying(error: TransientError, attempt: int, delay: float, reason: str) -> None:
        reasons.append(reason)

    async def caller() -> None:
        with pytest.raises(ApiUnavailable):
            await paced(lambda: api.delete_jobs(["a"]), what="b", retrying=retrying)

    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(caller)
    assert len(api.calls) <= 3 + 1  # the probes, one per round: not one per caller
    assert "circuit_open" in reasons
