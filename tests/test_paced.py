"""The paced call (``worker.pacing.paced``): one order for every call, on virtual time.

Each test pins a bug of the three copies the paced call replaced: show calls that never
told the limiter about a 503, a guard read waiting on the limiter that a stop sat out, and
the breaker asked after the rate token, so calls that waited out an outage went out in one
burst and were timed for it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import pytest

from tests.e2e import reaper, reaper_env, write_ids
from tests.fakes import FakeClock, StalledClock, SteadyController
from worker import wiring
from worker.api.client import JobPage
from worker.batcher import Batcher, DeletionBudget
from worker.discovery.guard import Protection
from worker.dispatcher import Dispatcher, Working
from worker.errors import ApiUnavailable, NetworkError, ServerError, ThrottledError
from worker.ledger import TemporaryLedger
from worker.outcomes.events import EventLog
from worker.outcomes.journal import LedgerPort, RunJournal, Tally
from worker.pacing.adaptive import AdaptiveRateLimiter
from worker.pacing.breaker import BreakerConfig, BreakerGate, CircuitBreaker
from worker.pacing.bucket import (
    APART_TOLERANCE,
    LocalRateLimiter,
    RateLimiter,
    UnlimitedRateLimiter,
)
from worker.pacing.paced import PacedCall, PacedReader
from worker.pacing.retry import RetryPolicy
from worker.pipeline import Pipeline, RunState
from worker.settings import Settings
from worker.types import Batch, Candidate, DeleteResult, JobRecord, Outcome, Result

pytestmark = pytest.mark.anyio


@dataclass(frozen=True, slots=True)
class Fed:
    throttled: bool
    latency_s: float | None
    overloaded: bool


class Recorded:
    """A limiter that records what it is told, around a real one."""

    def __init__(self, inner: RateLimiter) -> None:
        self.inner = inner
        self.fed: list[Fed] = []

    @property
    def rate(self) -> float:
        return self.inner.rate

    async def acquire(self) -> None:
        await self.inner.acquire()

    def feedback(
        self,
        *,
        throttled: bool,
        latency_s: float | None = None,
        retry_after: float | None = None,
        overloaded: bool = False,
    ) -> None:
        self.fed.append(Fed(throttled, latency_s, overloaded))
        self.inner.feedback(
            throttled=throttled, latency_s=latency_s, retry_after=retry_after,
            overloaded=overloaded,
        )  # fmt: skip


class Jobs:
    """Every job exists and is named ``job-N``; ``overloaded`` show calls answer 503 first;
    every call takes ``took`` seconds of virtual time."""

    def __init__(self, clock: FakeClock, *, overloaded: int = 0, took: float = 0.05) -> None:
        self.clock = clock
        self.overloaded = overloaded
        self.took = took
        self.sent: list[float] = []
        self.deletes: list[tuple[str, ...]] = []

    async def get_job(self, job_id: str) -> JobRecord:
        self.sent.append(self.clock.now())
        await self.clock.sleep(self.took)
        if self.overloaded:
            self.overloaded -= 1
            raise ServerError("busy", http_status=503)
        return JobRecord(id=job_id, name=f"name-{job_id}", status="FINISHED")

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult:
        self.sent.append(self.clock.now())
        self.deletes.append(tuple(ids))
        await self.clock.sleep(self.took)
        return DeleteResult(records=tuple(JobRecord(id=i) for i in ids), request_id="r")

    async def list_jobs(self, **filters: str | int | bool) -> JobPage:
        raise AssertionError("no list call expected")


def _policy() -> RetryPolicy:
    return RetryPolicy(max_attempts=5, base_delay=0.1, rng=random.Random(2))


async def test_a_503_on_a_show_call_tells_the_limiter_the_api_is_overloaded() -> None:
    """The guard's reads used to feed the limiter ``throttled`` only: a 503 on a show call
    never slowed ``--rate auto``."""
    clock = FakeClock()
    limiter = Recorded(LocalRateLimiter(100.0, 1, clock))
    reader = PacedReader(api=Jobs(clock, overloaded=1), limiter=limiter, policy=_policy(),
                         clock=clock)  # fmt: skip
    record = await reader.show("job-1")
    assert record is not None and record.id == "job-1"
    assert [f.overloaded for f in limiter.fed] == [True, False]
    assert reader.calls == 2 and reader.retries == 1


async def test_a_stop_does_not_sit_out_the_grace_period_for_a_guard_read_waiting() -> None:
    """With a name rule every id is read before its batch goes. Both dispatchers' reads
    wait for a token (one a second, on a clock that moves only by hand): nobody is
    working, so a stop ends the run at once, not after the hour of grace (the guard's
    reads waited on the limiter as if working)."""
    clock = FakeClock(autojump=False)
    state, tally, working = RunState(), Tally(), Working()
    api = Jobs(clock, took=0.0)
    settings = Settings(rate=1.0, burst=1, max_attempts=3)
    with TemporaryLedger.open() as ledger:
        port = LedgerPort(ledger)
        journal = RunJournal(ledger=port, events=EventLog(), tally=tally)
        processor = wiring.processor(
            settings, transport=api,
            limiter=LocalRateLimiter(1.0, 1, clock), journal=journal, clock=clock,
            stopping=lambda: state.stopping, protection=Protection.parse(["name:keep-*"]),
            working=working,
        )  # fmt: skip
        pipeline = Pipeline(
            entries=iter([Candidate(f"job-{n:03d}", n) for n in range(1, 41)]),
            ledger=port, journal=journal, dispatcher=processor,
            batcher=Batcher(10, prefix="t"), tally=tally, concurrency=2, grace=3600.0,
            state=state, working=working,
        )  # fmt: skip
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                group.start_soon(pipeline.run)
                # The first read took the one token there was; now both wait for the next.
                while not (api.sent and clock.pending >= 2):
                    await anyio.sleep(0.01)
                assert working.count == 0
                sent = len(api.sent)
                state.request_stop("signal")
    assert tally.finished == 0  # every batch left open: none had been read whole
    assert len(api.sent) == sent  # nothing sent after the stop
    assert working.count == 0


async def test_the_breaker_is_asked_before_a_token_and_only_the_call_is_timed() -> None:
    """Five calls meet an open circuit (5 s cool-down) at a rate of 10 calls/s. They used
    to take their tokens first and wait out the cool-down inside the call: when the probe
    came back the four others went out within milliseconds (a burst a strict gateway
    refuses) and the limiter was fed 5 s latencies. Now they wait before the token, go
    out at least 1/rate apart after the probe, and each is timed for its own 50 ms."""
    clock = FakeClock()
    limiter = Recorded(LocalRateLimiter(10.0, 1, clock))
    gate = BreakerGate(clock=clock, breaker=CircuitBreaker(BreakerConfig(cooldown=5.0)))
    for i in range(8):  # eight failures over 3.5 s: the circuit opens at t = 3.5
        gate.breaker.record(i * 0.5, ServerError("down", http_status=500))
    clock.advance(3.5)
    api = Jobs(clock, took=0.05)
    paced = PacedCall(limiter=limiter, policy=_policy(), clock=clock, gate=gate)

    async def one(job_id: str) -> None:
        await paced(lambda: api.delete_jobs([job_id]), what="b")

    async with anyio.create_task_group() as group:
        for n in range(5):
            group.start_soon(one, f"job-{n}")
    assert len(api.sent) == 5
    assert min(api.sent) >= 8.5  # nobody went before the cool-down ended
    gaps = [b - a for a, b in zip(sorted(api.sent), sorted(api.sent)[1:], strict=False)]
    assert min(gaps) >= 0.1 - 1e-9
    assert max(f.latency_s or 0.0 for f in limiter.fed) == pytest.approx(0.05)
    assert not any(f.throttled or f.overloaded for f in limiter.fed)


async def test_a_call_asleep_on_retry_after_holds_no_place_on_the_wire() -> None:
    """Two places, four tasks, each call 0.1 s of virtual time. The first call is refused
    with ``Retry-After: 1``: while its task sleeps, the other three keep both places busy
    (never three out), and it takes a place again in turn when it wakes."""
    clock = FakeClock()
    working = Working(places=2)
    paced = PacedCall(limiter=UnlimitedRateLimiter(), policy=_policy(), clock=clock,
                      working=working)  # fmt: skip
    out: list[tuple[float, int]] = []  # (sent at, calls out then)
    refused: list[str] = []

    async def send(job_id: str) -> str:
        out.append((clock.now(), working.on_wire))
        await clock.sleep(0.1)
        if job_id == "a" and not refused:
            refused.append(job_id)
            raise ThrottledError("throttled", http_status=429, retry_after=1.0)
        return job_id

    async def task(job_id: str, calls: int) -> None:
        with working.busy():
            for _ in range(calls):
                await paced(partial(send, job_id), what=job_id, retrying=None)

    async with anyio.create_task_group() as group:
        group.start_soon(task, "a", 1)
        for name in "bcd":
            group.start_soon(task, name, 10)
    asleep = [on for at, on in out if 0.1 <= at < 1.0]
    assert asleep and all(on == 2 for on in asleep), out
    assert working.most_on_wire == 2 and working.on_wire == 0 and working.count == 0
    assert repr(working) == "Working(count=0, on_wire=0/2)"


async def test_a_task_cancelled_as_it_is_handed_a_place_hands_it_on() -> None:
    """One place: the second task waits for it, and is cancelled just as the first frees it
    to it; the place goes to the third, not lost."""
    working = Working(places=1)
    await working.take_place()
    taken: list[str] = []

    async def wait(name: str) -> None:
        await working.take_place()
        taken.append(name)

    second = anyio.CancelScope()

    async def cancellable(name: str) -> None:
        with second:
            await wait(name)

    async with anyio.create_task_group() as group:
        group.start_soon(cancellable, "second")
        await anyio.wait_all_tasks_blocked()
        group.start_soon(wait, "third")
        await anyio.wait_all_tasks_blocked()
        second.cancel()  # the second is cancelled, and handed the place before it runs
        working.free_place()
    assert taken == ["third"] and working.on_wire == 1


@pytest.mark.parametrize("stall_to", [0.13, 0.35])
@pytest.mark.parametrize("make", ["fixed", "auto"])
async def test_a_call_woken_late_is_not_followed_within_an_interval(
    make: str, stall_to: float
) -> None:
    """The loop is descheduled from 0.1 s to 0.13 s, so the call due at 0.1 s goes out at
    0.13 s. The limiter used to send the next one on its own slot, 0.2 s: 70 ms after the
    late one, at 10 calls/s, which a gateway whose burst is 1 refuses. Both limiters that
    pace with a burst of 1 (``--rate N --burst 1``, and ``--rate auto``) now start every
    call at least an interval (less a hundredth) after the real start of the one before.
    Stalled to 0.35 s, two calls wait for the same start: only one may go after it."""
    clock = StalledClock(0.1, stall_to)
    limiter: RateLimiter = (
        LocalRateLimiter(10.0, 1, clock)
        if make == "fixed"
        else AdaptiveRateLimiter(clock, controller=SteadyController(10.0))
    )
    api = Jobs(clock, took=0.02)
    paced = PacedCall(limiter=limiter, policy=_policy(), clock=clock)

    async def one(job_id: str) -> None:
        await paced(lambda: api.delete_jobs([job_id]), what="b")

    async with anyio.create_task_group() as group:
        for n in range(6):
            group.start_soon(one, f"job-{n}")
    sent = sorted(api.sent)
    assert sent[1] == pytest.approx(stall_to)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert min(gaps) >= (1 - APART_TOLERANCE) / 10.0 - 1e-9
    for i, j in itertools.combinations(range(len(sent)), 2):  # no run faster than the rate
        assert sent[j] - sent[i] >= (j - i - APART_TOLERANCE) / 10.0 - 1e-9
    assert sent[-1] <= stall_to + 4 * 0.1 + 1e-9  # what the stall cost is lost once


async def test_feedback_and_outcomes_of_a_run_through_the_paced_call_are_one_per_call() -> None:
    """Every call sent is fed back exactly once: deletes and show calls alike."""
    clock = FakeClock()
    limiter = Recorded(LocalRateLimiter(50.0, 1, clock))
    api = Jobs(clock, overloaded=2)
    settings = Settings(rate=50.0, burst=1, max_attempts=3)
    tally = Tally()
    with TemporaryLedger.open() as ledger:
        port = LedgerPort(ledger)
        journal = RunJournal(ledger=port, events=EventLog(), tally=tally)
        processor = wiring.processor(
            settings, transport=api,
            limiter=limiter, journal=journal, clock=clock, stopping=lambda: False,
            protection=Protection.parse(["name:keep-*"]), gate=BreakerGate(clock=clock),
        )  # fmt: skip
        pipeline = Pipeline(
            entries=iter([Candidate(f"job-{n:03d}", n) for n in range(1, 21)]),
            ledger=port, journal=journal, dispatcher=processor,
            batcher=Batcher(5, prefix="t"), tally=tally, concurrency=2, grace=1.0,
            state=RunState(),
        )  # fmt: skip
        await pipeline.run()
    assert tally.outcomes[Outcome.DELETED.value] == 20
    assert len(limiter.fed) == len(api.sent) == 20 + 4 + 2  # reads, deletes, two 503s
    assert sum(f.overloaded for f in limiter.fed) == 2


class Down:
    """Nothing answers: every call fails at once with a network error."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent: list[float] = []

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult:
        self.sent.append(self.clock.now())
        await self.clock.sleep(0.001)
        raise NetworkError("refused")

    async def get_job(self, job_id: str) -> JobRecord:
        raise AssertionError("no show call expected")


async def _until_unavailable(
    max_attempts: int, batches: int, breaker: BreakerConfig | None = None
) -> tuple[float, Journal, Down]:
    """Batches against an API that is down, through the breaker: when the run gives up
    (virtual time), what the journal heard, and what was sent."""
    clock = FakeClock()
    journal, api = Journal(), Down(clock)
    dispatcher = Dispatcher(
        transport=api, limiter=UnlimitedRateLimiter(),
        policy=RetryPolicy(max_attempts=max_attempts, rng=random.Random(5)), journal=journal,
        clock=clock, budget=DeletionBudget(None), max_attempts=max_attempts,
        gate=BreakerGate(clock=clock, breaker=CircuitBreaker(breaker)),
    )  # fmt: skip

    async def all_batches() -> None:
        async with anyio.create_task_group() as group:
            for n in range(batches):
                group.start_soon(dispatcher.process, Batch(f"b{n}", (f"job-{n}",)))

    with pytest.raises(ExceptionGroup) as caught:
        await all_batches()
    assert caught.group_contains(ApiUnavailable)
    return clock.now(), journal, api


async def test_retry_events_say_the_wait_really_sat_out_cool_downs_included() -> None:
    """One batch opens the breaker by itself (threshold 3): its later waits are the
    cool-downs, longer than the policy's delays, and its ``batch.retry`` events say so: the
    run lasted exactly their sum and the calls."""
    ended, journal, api = await _until_unavailable(
        6, 1, BreakerConfig(failure_threshold=3, min_failure_span=0.0)
    )
    waits = [r[2] for r in journal.retries]
    assert [r[1] for r in journal.retries] == [2, 3, 4, 5, 6]
    assert ended == pytest.approx(sum(waits) + 0.001 * len(api.sent))
    assert waits[-1] >= 4.0  # the fourth cool-down (1, 2, 4, 8 s); the policy says <= 4 s


async def test_time_to_unavailable_follows_max_attempts_not_the_breaker() -> None:
    """Eight batches open the breaker; waiting out its cool-down spends no budget, but a
    failed probe is an attempt of every batch that waited on it (``circuit_open``, nothing
    sent): so the run gives up after ``max_attempts`` rounds, not after two minutes."""
    short, _, _ = await _until_unavailable(3, 8)
    long, journal, api = await _until_unavailable(6, 8)
    assert short < long < 20.0
    assert any(r[3] == "circuit_open" for r in journal.retries)
    assert len(api.sent) < 8 * 6  # the waiters' attempts failed with the probe, unsent


class Journal:
    def __init__(self) -> None:
        self.retries: list[tuple[str, int, float, str]] = []

    async def sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        pass

    async def unsent(self, batch_id: str, ids: Sequence[str]) -> None:
        pass

    async def retrying(self, batch_id: str, attempt: int, delay_s: float, reason: str) -> None:
        self.retries.append((batch_id, attempt, delay_s, reason))

    async def finished(self, results: Sequence[Result]) -> None:
        raise AssertionError("an API that is down decides no outcome")


async def test_a_run_against_a_closed_port_gives_up_after_its_retries(tmp_path: Path) -> None:
    """Through the real command: exit 69 once each batch has spent ``--max-attempts``,
    and the slowest batch's ``batch.retry`` waits make up most of the run (the breaker's
    own 120 s used to: 122 s whatever the setting)."""
    src = write_ids(tmp_path / "ids.txt", [f"job-{n}" for n in range(16)])
    done = await reaper(
        ["run", "-i", str(src), "--yes", "--max-attempts", "5", "--batch-size", "1",
         "--concurrency", "8"],
        reaper_env("http://127.0.0.1:9"),
    )  # fmt: skip
    assert done.code == 69, done.stderr
    retries = done.events("batch.retry")
    per_batch: dict[str, float] = {}
    for event in retries:
        assert event["attempt"] <= 5
        per_batch[event["batch_id"]] = per_batch.get(event["batch_id"], 0.0) + event["delay_s"]
    assert max(per_batch.values()) >= 0.5 * done.summary()["duration_s"]
