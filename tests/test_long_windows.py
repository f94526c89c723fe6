"""``--rate auto`` against a count over a long window (10 s or a minute, fixed or sliding)
and against a service that sheds calls with 503 past its capacity, on virtual time
(``simulate`` with a foreign ``gateway`` or ``service``; docs/rate-auto.md, "How it moves").

A long window's count is spent by start-up within seconds; its refusals say so with a
``Retry-After`` pointing to the window's end. Read as a token bucket's, each refusal
measured the quota from the calls between refusals (41-80 % of the calls refused from 10 s
on); read as a count (``worker.pacing.window``), the run pauses to the window's end and
paces at 0.95 of the count's rate after it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from tests.fakes import (
    Averaged,
    FixedWindow,
    Gateway,
    Queueing,
    Run,
    SlidingWindow,
    simulate,
)
from worker.pacing.controller import AdaptiveConfig, RateController
from worker.pacing.fleet import encode_state, taken_over
from worker.pacing.window import LongWindow, Verdict
from worker.simulator.quota import TokenBucket as ServerQuota

SPANS: dict[str, Callable[[float, float], Gateway]] = {
    "fixed 10 s": lambda quota, now: FixedWindow(quota, now, span=10.0),
    "sliding 10 s": lambda quota, now: SlidingWindow(quota, now, span=10.0),
}


def _used_and_refused(run: Run, quota: float, start: float, end: float) -> tuple[float, float]:
    return run.accepted_per_s(start, end) / quota, run.refused_share(start, end)


@pytest.mark.parametrize("latency", [0.005, 0.05], ids=["5ms", "50ms"])
@pytest.mark.parametrize("quota", [5.0, 50.0], ids=["q5", "q50"])
@pytest.mark.parametrize("kind", sorted(SPANS))
def test_a_count_over_ten_seconds_is_read_from_its_retry_after(
    kind: str, quota: float, latency: float
) -> None:
    """A count of 10 q calls per 10 s, fixed or sliding, 8 in flight: from 10 s on at least
    0.90 of the quota and at most 2 % refused (read as a token bucket's, 54-72 % refused
    at q5 and 10-66 % at q50)."""
    run = simulate(lambda t: quota, duration=40.0, latency=latency, gateway=SPANS[kind])
    used, refused = _used_and_refused(run, quota, 10.0, 40.0)
    assert refused <= 0.02
    assert used >= 0.90


@pytest.mark.parametrize("quota", [5.0, 50.0], ids=["q5", "q50"])
def test_a_count_over_a_minute_is_kept_to_from_its_second_minute(quota: float) -> None:
    """A count of 60 q calls a minute: start-up spends the first minute's within seconds,
    so nothing but a pause to its end is left of it; from the second minute on, at least
    0.90 of the quota and at most 2 % refused, and from 10 s to its end one call at most
    (the pause ends after ``max_pause``, 30 s, and that call is refused into another; read
    as a token bucket's: 45-80 % refused from 10 s on)."""
    run = simulate(lambda t: quota, duration=130.0, latency=0.005,
                   gateway=lambda q, now: FixedWindow(q, now, span=60.0))  # fmt: skip
    used, refused = _used_and_refused(run, quota, 60.0, 130.0)
    assert refused <= 0.02
    assert used >= 0.90
    assert len([t for t in run.ok + run.refused if 10.0 <= t < 59.0]) <= 1


@pytest.mark.parametrize("quota", [5.0, 50.0], ids=["q5", "q50"])
def test_a_token_bucket_asking_for_five_seconds_is_no_window(quota: float) -> None:
    """A token bucket whose every 429 says ``Retry-After: 5``: the check call into the
    first pause is accepted, so nothing is read as a window, and the quota is used as
    before (at least 0.95 of it from 10 s on, at most 2 % refused)."""
    ctrl = RateController(0.0)
    run = simulate(lambda t: quota, duration=40.0, burst=2, latency=0.005, controller=ctrl,
                   retry_after=lambda wait, now: 5.0)  # fmt: skip
    used, refused = _used_and_refused(run, quota, 10.0, 40.0)
    assert ctrl.windows == 0
    assert refused <= 0.02
    assert used >= 0.95


@pytest.mark.parametrize("latency", [0.005, 0.05], ids=["5ms", "50ms"])
@pytest.mark.parametrize("capacity", [5.0, 50.0], ids=["c5", "c50"])
def test_a_service_shedding_calls_past_its_capacity_is_paced_at_what_it_serves(
    capacity: float, latency: float
) -> None:
    """No quota at the gateway; the service behind it takes longer as its load rises and
    answers 503 once it served its capacity in the last second (``Queueing``). 503s that
    rise with the rate are overload: from 10 s on at most 2 % answered 503, and at least
    0.90 of what 8 in flight carry there (cutting 3 % per ten 503s, 71 % answered 503 at a
    capacity of 5 calls/s, 19 % at 50)."""
    service = Queueing(capacity, latency, random.Random(1))
    run = simulate(lambda t: 0.0, duration=40.0, latency=latency, service=service,
                   gateway=lambda quota, now: _Open())  # fmt: skip
    reachable = 8 / (latency + 8 / capacity)
    shed = [t for t in run.unavailable if t >= 10.0]
    answered = [t for t in run.ok + run.unavailable + run.refused if t >= 10.0]
    assert len(shed) <= 0.02 * len(answered)
    assert run.accepted_per_s(10.0, 40.0) >= 0.90 * reachable


class _Open:
    """No quota at the gateway: the service is the limit."""

    def try_acquire(self, now: float) -> float:
        return 0.0


@pytest.mark.parametrize("latency", [0.005, 0.05], ids=["5ms", "50ms"])
def test_a_sliding_count_that_rises_is_probed_with_its_refusals_cut(latency: float) -> None:
    """A count over a sliding 10 s of 20 calls/s, 50 from 40 s: the window read again after
    the rise spans from the end before (41 s), and the short waits of a sliding window's
    oldest calls leaving cut nothing only while its pace caps the rate (``forget`` after its
    end); past that the probe is a token bucket's, refused and cut. At most 10 % refused
    from 55 s on (the short waits ignored for the whole long span: 90 % at 5 ms and 41 % at
    50 ms, the probe uncut at the concurrency's ceiling)."""
    run = simulate(lambda t: 20.0 if t < 40.0 else 50.0, duration=100.0, latency=latency,
                   gateway=SPANS["sliding 10 s"])  # fmt: skip
    assert run.refused_share(55.0, 100.0) <= 0.10


@pytest.mark.parametrize("seed", [3, 4, 5])
@pytest.mark.parametrize("quota", [20.0, 50.0], ids=["q20", "q50"])
def test_random_503s_of_a_tenth_of_the_calls_are_not_read_as_a_service_past_capacity(
    quota: float, seed: int
) -> None:
    """A tenth of the calls the gateway (burst 2) lets through answered 503 at random,
    whatever the rate: what the service serves holds flat at a steady rate, a tenth under
    what is sent, and a fifth of 50 answers comes by chance. Cut to what it served on that
    (each 30 s, the probe held there), the rate went a tenth down each time: 0.82-0.92 of
    what the service serves used from 10 s on; a service past its capacity sheds a fifth
    of what is sent or more before it is read so, and at least 0.935 is used here."""
    draws = random.Random(seed)
    run = simulate(lambda t: quota, duration=60.0, burst=2, latency=0.005,
                   service=lambda now: (draws.random() < 0.10, 0.005))  # fmt: skip
    assert run.accepted_per_s(10.0, 60.0) >= 0.935 * 0.9 * quota


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("share", [0.15, 0.20, 0.30])
def test_random_503s_that_do_not_fall_with_the_rate_leave_the_quota_in_use(
    share: float, seed: int
) -> None:
    """A share of the calls a gateway of 20 calls/s (burst 2) lets through answered 503 at
    random, whatever the rate: at least 0.90 of the quota used from 10 s on (503s
    counted: the gateway let them through) and at most 2 % refused. A cut to what the
    service served, where 503s are a fifth of the last 50 answers, buys nothing here: the
    503s of the calls after it keep their share, and the rate goes back to where it was
    (cut to what was served, then 3 % under the rate at each fifth by chance: 0.53-0.75
    of the quota used)."""
    draws = random.Random(seed)
    run = simulate(lambda t: 20.0, duration=40.0, burst=2, latency=0.005,
                   service=lambda now: (draws.random() < share, 0.005))  # fmt: skip
    through = len([t for t in run.ok + run.unavailable if t >= 10.0]) / 30.0
    assert through >= 0.90 * 20.0
    assert run.refused_share(10.0, 40.0) <= 0.02


def _out(
    start: float, end: float, latency: float, draws: random.Random
) -> Callable[[float], tuple[bool, float]]:
    """A service out from ``start`` to ``end`` (every call answered 503 at once), healthy
    before and after: its 503s are the same share at any rate."""
    return lambda now: (
        (True, 0.002) if start <= now < end else (False, draws.expovariate(1.0 / latency))
    )


@pytest.mark.parametrize(
    "seed",
    [
        1,
        pytest.param(4, marks=pytest.mark.xfail(
            strict=True, reason="60 % random 503s: a second cut's trial at 1 call/s, 0.65 used"
        )),
    ],
)  # fmt: skip
def test_random_503s_of_most_calls_do_not_halve_the_rate(seed: int) -> None:
    """Three fifths of the calls a gateway of 5 calls/s (burst 2) lets through answered 503
    at random, 5 ms: at least 0.70 of the quota used from 10 s on (503s counted). A trial's
    503s more than 4 past 0.4 (``MOST_FAULTS``) of its answers are ``STILL``, and at 60 %
    they pass that by 0.2 of the answers on average: the trial ends ``STILL`` (10 of 14)
    and halves the rate. The halving's trial finds the same share of 503s as the answers
    at the rates over it (``SAME_SHARE``): they did not fall with the rate, ``RANDOM``, and
    the rate before returns; a later cut's trial with the share of the faults known too.
    0.80 and 0.65 used here (0.55 and 0.38 before: each halving's trial read ``STILL``
    too, and halved again); medians over 10 seeds 0.69 at q5 and 0.65 at q50 (0.57 and
    0.36 before), 0.45 at 70 % (0.39). Seed 4: the first cut's trials took 15 s, and a
    second cut's, at 1 call/s, 12 s more."""
    draws = random.Random(seed)
    run = simulate(lambda t: 5.0, duration=60.0, burst=2, latency=0.005,
                   service=lambda now: (draws.random() < 0.6, 0.005))  # fmt: skip
    through = len([t for t in run.ok + run.unavailable if t >= 10.0]) / 50.0
    assert through >= 0.70 * 5.0


@pytest.mark.parametrize("quota", [5.0, 50.0], ids=["q5", "q50"])
@pytest.mark.parametrize("outage", [5.0, 20.0, 60.0], ids=["5s", "20s", "60s"])
def test_a_service_out_for_a_while_is_used_in_full_once_it_is_back(
    quota: float, outage: float
) -> None:
    """A gateway of ``quota`` calls/s (burst 2) in front of a service that answers every
    call 503 for ``outage`` s from 20 s on, 50 ms: an outage is no capacity, its 503s the
    same share at any rate. At least 0.90 of the quota used from 10 s after it ends to 40 s
    after (0.96-1.01 here). A trial that served nothing says nothing of a capacity: the
    rates halved through the outage bound nothing, a trial after one ends at the first
    answers served in a row (one at 0.2 calls/s, not the first cut's 100 answers: 500 s),
    and then the rate before the first cut is tried, and returns. On the code before, each
    trial read ``STILL`` halved the rate to the floor (0.2 calls/s at q50 after 52 s) and
    capped the probes half-way to the last rate halved: 0.34 used at q50 after 5 s, 0.00
    after 60 s; at q5 0.55, 0.14, 0.04 (only q50 after 20 s passed, by a chance ``RANDOM``).

    Where the rate before was start-up's (never served in full: a service counting every
    call, its 503s too, that start-up ran past), nothing returns to it
    (``test_a_service_counting_every_call_is_halved_till_it_serves``)."""
    draws, start = random.Random(1), 20.0
    run = simulate(lambda t: quota, duration=start + outage + 40.0, burst=2, latency=0.05,
                   service=_out(start, start + outage, 0.05, draws))  # fmt: skip
    back = start + outage
    assert run.accepted_per_s(back + 10.0, back + 40.0) >= 0.90 * quota


@pytest.mark.parametrize("quota", [20.0, 50.0], ids=["q20", "q50"])
def test_after_an_outage_the_probes_go_on(quota: float) -> None:
    """A gateway of ``quota`` calls/s (burst 2) in front of a service out for 5 s from 20 s,
    50 ms; 20 s after it ends the quota doubles: at least 0.90 of the new one used from 20 s
    to 40 s after the rise (0.99-1.00 here). The step back to the rate before the first cut
    is a trial of its own: at 4758e8d its ``FELL`` stepped again, a trial after trial at the
    rate before, which holds the rate, and the probe never found the rise (0.49 at q20)."""
    draws, end = random.Random(1), 25.0
    run = simulate(lambda t: quota if t < end + 20.0 else 2.0 * quota, duration=end + 60.0,
                   burst=2, latency=0.05, service=_out(20.0, end, 0.05, draws))  # fmt: skip
    assert run.accepted_per_s(end + 40.0, end + 60.0) >= 0.90 * 2.0 * quota


@pytest.mark.parametrize("gap", [3.0, 5.0], ids=["3s", "5s"])
def test_a_second_outage_during_the_step_back_is_an_outage_too(gap: float) -> None:
    """A gateway of 50 calls/s (burst 2) in front of a service out 20-25 s and again for 5 s
    from ``gap`` s after, healthy between, 50 ms: at least 0.90 of the quota used from 20 s
    to 60 s after the second ends (0.99 here). The second came while the step back up to
    the rate before was tried: served, then 503s in a row, it read ``STILL`` as a bound,
    the halving under it went on through the outage and stood at 6 calls/s, the probes
    capped at 9: 0.40 and 0.18 used (the same at 947e83f). A step back served a second in
    a row, then out again, bounds nothing once a recovery (``Recovery.again``): the rate
    before is stepped back up to once served again. Out again within a second of the step
    (2 s after the first outage), it reads as a lower capacity: 0.40."""
    draws, late = random.Random(1), random.Random(101)
    end = 25.0 + gap + 5.0
    service = _down_when(lambda now: 20.0 <= now < 25.0 or 25.0 + gap <= now < end, 0.05, draws)
    run = simulate(lambda t: 50.0, duration=end + 60.0, burst=2, latency=0.05, service=service,
                   jitter=lambda: late.expovariate(500.0))  # fmt: skip
    assert run.accepted_per_s(end + 20.0, end + 60.0) >= 0.90 * 50.0


def test_a_service_back_with_a_lower_capacity_is_not_tried_at_the_old_rate_twice() -> None:
    """A gateway of 50 calls/s (burst 2) in front of a service healthy at 50 calls/s, out
    from 20 s to 30 s, and back shedding past a capacity of 5 (``Queueing``), 50 ms: at most
    200 calls answered 503 from 30 s to 60 s, as a step back to the rate before and the
    halving after it cost (170 here; medians of 10 seeds 172, 179 with send jitter). The
    halving's trial at 6.1 calls/s (past 5, its 503s 5 of 18) reads ``RANDOM``: returned to
    the rate before the outage, 50 calls/s, a second time, 277 (medians 274 and 273, 9 %
    answered 503 from 60 s on, none now). On the code before 4758e8d 82 (no step back).
    Read ``RANDOM`` as ``FELL`` after any halving of the step back, random 503s after an
    outage would stay at half the quota
    (``test_random_503s_after_an_outage_return_to_the_rate_before``)."""
    draws = random.Random(1)
    queue = Queueing(5.0, 0.05, draws)

    def serve(now: float) -> tuple[bool, float]:
        if now < 20.0:
            return False, draws.expovariate(20.0)
        return (True, 0.002) if now < 30.0 else queue(now)

    run = simulate(lambda t: 50.0, duration=70.0, burst=2, latency=0.05, service=serve)
    assert len([t for t in run.unavailable if 30.0 <= t < 60.0]) <= 200


@pytest.mark.parametrize("share", [0.10, 0.20, 0.30])
def test_random_503s_after_an_outage_return_to_the_rate_before(share: float) -> None:
    """A gateway of 50 calls/s (burst 2) in front of a service out from 20 s to 30 s, and
    answering ``share`` of the calls 503 at random after, 50 ms: at least 0.95 of the quota
    let through from 40 s to 70 s (0.99 here). The step back to the rate before reads
    ``STILL`` (more than 4 503s at a rate over one served), its halving ``RANDOM``, and the
    rate before returns; read as a lower capacity there (a ``FELL``), 0.48. Calls leave
    about 2 ms late (without, 3 of 30 seeds stay under half the quota, on the code before too)."""
    draws, late = random.Random(1), random.Random(2)

    def serve(now: float) -> tuple[bool, float]:
        if 20.0 <= now < 30.0:
            return True, 0.002
        return now >= 30.0 and draws.random() < share, draws.expovariate(20.0)

    run = simulate(lambda t: 50.0, duration=70.0, burst=2, latency=0.05, service=serve,
                   jitter=lambda: late.expovariate(500.0))  # fmt: skip
    assert len([t for t in run.ok + run.unavailable if 40.0 <= t < 70.0]) / 30.0 >= 0.95 * 50.0


class _NewLeader:
    """A fleet's controller whose leader changes at ``at``: the new one starts from what the
    last stored (``encode_state``, as ``_Pace.stored``; ``taken_over``, as ``_lead``)."""

    def __init__(self, at: float) -> None:
        self.controller, self.at = RateController(0.0), at

    def _lead(self, now: float) -> RateController:
        if now >= self.at:
            last, self.at = self.controller, math.inf
            stored = encode_state(last.state, last.long_window.kept(), last.outage_before)
            self.controller = taken_over(stored, AdaptiveConfig(), now)
        return self.controller

    @property
    def rate(self) -> float:
        return self.controller.rate

    def pause_until(self) -> float:
        return self.controller.pause_until()

    def rate_at(self, now: float) -> float:
        return self._lead(now).rate_at(now)

    def on_sent(self, now: float) -> None:
        self._lead(now).on_sent(now)

    def on_success(self, now: float, latency: float | None = None) -> float:
        return self._lead(now).on_success(now, latency)

    def on_throttle(
        self, now: float, retry_after: float | None = None, latency: float | None = None
    ) -> float:
        return self._lead(now).on_throttle(now, retry_after, latency)

    def on_overload(self, now: float, latency: float | None = None) -> float:
        return self._lead(now).on_overload(now, latency)


@pytest.mark.parametrize("quota", [5.0, 50.0], ids=["q5", "q50"])
@pytest.mark.parametrize("outage", [5.0, 20.0], ids=["5s", "20s"])
def test_a_fleet_whose_leader_changes_mid_outage_uses_the_quota_once_it_is_back(
    quota: float, outage: float
) -> None:
    """As ``test_a_service_out_for_a_while_is_used_in_full_once_it_is_back``, a fleet's
    leader changing half-way through the outage: at least 0.90 of the quota used from 10 s
    after it ends to 40 s after (1.00 here, as under one leader). The state before the first
    cut is stored beside the state (``outage_before``): restored as a plain cut, the new
    leader's trial read the outage's rate as a capacity: 0.46 and 0.12 used at q50 after
    5 and 20 s, 0.86 and 0.73 at q5 (medians of 6 seeds with send jitter: 0.50, 0.12,
    0.90, 0.74)."""
    draws, start = random.Random(1), 20.0
    run = simulate(lambda t: quota, duration=start + outage + 40.0, burst=2, latency=0.05,
                   controller=_NewLeader(start + outage / 2.0),
                   service=_out(start, start + outage, 0.05, draws))  # fmt: skip
    back = start + outage
    assert run.accepted_per_s(back + 10.0, back + 40.0) >= 0.90 * quota


def _down_when(
    down: Callable[[float], bool], latency: float, draws: random.Random
) -> Callable[[float], tuple[bool, float]]:
    """A service that answers every call 503 at once while ``down(now)``, healthy otherwise."""
    return lambda now: (True, 0.002) if down(now) else (False, draws.expovariate(1.0 / latency))


@pytest.mark.xfail(strict=True, reason="start-up's cut holds where nothing was served")
@pytest.mark.parametrize(("start", "end"), [(0.5, 5.0), (1.0, 11.0), (0.0, 30.0)])
def test_a_service_out_during_start_up_is_used_in_full_once_it_is_back(
    start: float, end: float
) -> None:
    """A gateway of 50 calls/s (burst 2) in front of a service out from ``start`` to ``end``,
    50 ms: at least 0.90 of the quota used from 10 s after it ends to 60 s after. Used: 0.005,
    0.011 and 0.19, the same on the code before 4758e8d. Start-up's first cut is to what was
    served (0.25 calls/s, a few answers before the outage) and, the rate before being
    start-up's, its trial is a full one (20 answers: 80 s at 0.25 calls/s) whose ``FELL``
    caps the probes two margins over it; out from the first call, the 503s step the rate down
    and cap the probes at the last one's rate (9 calls/s). Resuming start-up from the rate
    served once served again (a short trial) fixed the first two (0.99) but broke
    ``test_a_service_counting_every_call_is_halved_till_it_serves`` (78 % answered 503): the
    two look alike until the rate before is tried, and start-up's is past the every-call
    service."""
    draws = random.Random(1)
    run = simulate(lambda t: 50.0, duration=end + 60.0, burst=2, latency=0.05,
                   service=_down_when(lambda now: start <= now < end, 0.05, draws))  # fmt: skip
    assert run.accepted_per_s(end + 10.0, end + 60.0) >= 0.90 * 50.0


@pytest.mark.parametrize(
    "kind",
    [
        "up 2 s, down 2 s",
        "up 10 s, down 1 s",
        pytest.param(
            "90 % 503s",
            marks=pytest.mark.xfail(strict=True, reason="90 % random 503s read as a capacity"),
        ),
    ],
)
def test_a_service_that_flaps_is_used_in_full_once_it_holds(kind: str) -> None:
    """A gateway of 50 calls/s (burst 2) in front of a service that, from 20 s to 140 s, is
    out 2 s of every 4, or 1 s of every 11, or answers 90 % of the calls 503 at random; 50 ms.
    At least 0.90 of the quota used from 10 s after it holds to 40 s after. Out 1 s of 11:
    0.997 (medians of 10 seeds 0.997, 0.992 with send jitter; 0.65 before): the 503s of an
    outage overtake the answers of calls sent before it (2 ms against 50 ms), and a run of
    them read in the order answered was broken by those (``FaultWatch.unserved``), so the
    cut read a capacity: its trial, served in full 3 % under the rate before, ``FELL``, the
    service was read shedding, and each outage after stepped the rate 3 % down for good.
    Out 2 s of 4: 0.946 (medians 0.941, 0.943 with send jitter; 1 of 20 runs at 0.04;
    0.035 before): after the first outage's trials found a share of faults, the next
    outage's 503s, two fifths over it, were read as 503s that rose with the rate
    (``FaultWatch.clear``): shedding, untried, and stepped down through the rest. 90 %
    503s: 0.004 (6 seeds with send jitter: 0.015), the same on the code before 4758e8d:
    served between 503s, the trials read a capacity. (Repeated outages of 5 s every 30 s
    for 5 min held: 0.99 of the quota used between them, 0.03 on the code before.)"""
    draws, marks = random.Random(1), random.Random(2)
    downs: dict[str, Callable[[float], bool]] = {
        "up 2 s, down 2 s": lambda now: (now - 20.0) % 4.0 >= 2.0,
        "up 10 s, down 1 s": lambda now: (now - 20.0) % 11.0 >= 10.0,
        "90 % 503s": lambda now: marks.random() < 0.9,
    }
    down = downs[kind]
    service = _down_when(lambda now: 20.0 <= now < 140.0 and down(now), 0.05, draws)
    run = simulate(lambda t: 50.0, duration=180.0, burst=2, latency=0.05, service=service)
    assert run.accepted_per_s(150.0, 180.0) >= 0.90 * 50.0


class _EveryCallCounted(Averaged):
    """A service that counts every call it gets over a sliding 10 s, those it answers 503
    too, and answers 503 past ``capacity`` calls/s of them: past its capacity it serves
    nothing at all, as a service out does, until the rate falls under it."""

    def __call__(self, now: float) -> tuple[bool, float]:
        if self.arrived(now) > 10.0 * self.capacity:
            return True, 0.002
        return False, self.draws.expovariate(1.0 / self.latency)


@pytest.mark.parametrize("capacity", [5.0, 20.0])
@pytest.mark.parametrize("latency", [0.005, 0.05], ids=["5ms", "50ms"])
def test_a_service_counting_every_call_is_halved_till_it_serves(
    capacity: float, latency: float
) -> None:
    """``_EveryCallCounted``, no quota at the gateway, 120 s: at most 10 % of the calls
    answered 503 from 10 s on (4.4-6.8 % here; 14-20 % over the first 60 s): its trials'
    answers stay 503s at any rate past its capacity, and only halving finds a rate it
    serves. A rate held where nothing was served for 10 s (as for an outage) held it past
    its capacity for good: 53-83 % answered 503 (medians of 10 seeds)."""
    service = _EveryCallCounted(capacity, latency, random.Random(1))
    run = simulate(lambda t: 0.0, duration=120.0, latency=latency, service=service,
                   gateway=lambda quota, now: _Open())  # fmt: skip
    shed = len([t for t in run.unavailable if t >= 10.0])
    assert shed <= 0.10 * len([t for t in run.ok + run.unavailable if t >= 10.0])


@pytest.mark.xfail(strict=True, reason="the rate shed caps the probes for 30 s (forget)")
@pytest.mark.parametrize("latency", [0.005, 0.05], ids=["5ms", "50ms"])
def test_a_capacity_that_rises_after_shedding_is_followed_within_seconds(latency: float) -> None:
    """A service shedding calls with 503 past its capacity of 5 calls/s, 50 from 30 s on
    (no quota at the gateway): every second from 45 s on should serve at least 0.90 of what
    8 in flight carry at 50. The rate shed caps the probes for 30 s after its last 503, and
    then they pass it by about 0.3 % a second: 5 calls/s served 30-70 s (a known limit)."""
    service = Queueing(5.0, latency, random.Random(1))

    def rising(now: float) -> tuple[bool, float]:
        service.capacity = 5.0 if now < 30.0 else 50.0
        return service(now)

    run = simulate(lambda t: 0.0, duration=70.0, latency=latency, service=rising,
                   gateway=lambda quota, now: _Open())  # fmt: skip
    reachable = 8 / (latency + 8 / 50.0)
    assert min(run.accepted_per_s(t, t + 1.0) for t in range(45, 70)) >= 0.90 * reachable


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("latency", [0.005, 0.05], ids=["5ms", "50ms"])
def test_503s_that_fall_slowly_after_a_cut_do_not_lift_the_rate_past_the_service(
    latency: float, seed: int
) -> None:
    """A service of 5 calls/s shedding over a 10 s average of its arrivals (no quota at the
    gateway): the trial after the first cut to what it served still sees its 503s (5 of
    9), reads them random and returns to start-up's rate; counted from then on, their share
    rose with the rate and lifted what a fifth must pass out of reach: 4000-8000 calls/s
    from 15 s on, 99.7 % answered 503. The rate stays under 100 calls/s from 15 s on."""
    run = simulate(lambda t: 0.0, duration=25.0, latency=latency, gateway=lambda q, now: _Open(),
                   service=Averaged(5.0, latency, random.Random(seed)))  # fmt: skip
    assert max(rate for sent, rate in run.rates if sent >= 15.0) < 100.0
    assert len([t for t in run.unavailable if t >= 15.0]) < 10 * 100


@pytest.mark.parametrize(("latency", "seed"), [(0.005, 4), (0.05, 6)], ids=["5ms", "50ms"])
def test_503s_averaged_over_thirty_seconds_do_not_return_the_rate_past_the_service(
    latency: float, seed: int
) -> None:
    """A service of 5 calls/s shedding over a 30 s average of its arrivals (no quota at the
    gateway), 120 s: its 503s keep their share for 30 s after a cut, at any rate. Start-up
    past it, the trials halve the rate again and again (``STILL``), to under the service,
    its 503s still the share they were; a deep halving's trial 10 s on (``SPAN``) read them
    random, and the rate before the cut returned, many times what the service serves.
    Only the first halving's trial reads the same share random: from 20 s on at most the
    service's 5 calls/s sent, on average (8.8 and 8.4, 60 % and 63 % answered 503, where
    any halving's trial could; 3.0 and 2.4 now, as at cefc868^; medians of 10 seeds drawn
    as ``bench_foreign_gateways``, 0.42 of 5 sent and 15 % answered 503, 1.31 and 40 %)."""
    run = simulate(lambda t: 0.0, duration=120.0, latency=latency, gateway=lambda q, now: _Open(),
                   service=Averaged(5.0, latency, random.Random(seed), span=30.0))  # fmt: skip
    sent = len([t for t in run.ok + run.unavailable if t >= 20.0]) / 100.0
    assert sent <= 5.0


@pytest.mark.parametrize("latency", [0.005, 0.05], ids=["5ms", "50ms"])
def test_a_service_counting_its_capacity_over_ten_seconds_sheds_little(latency: float) -> None:
    """A service of 5 calls/s counted over a sliding 10 s (50 calls), shedding past it with
    503, no quota at the gateway: at most 2 % answered 503 from 10 s on. After the first cut
    to what it served its count is still full, and the trial's first answers are 503s: read
    as random, the rate returned to 83 calls/s and the cut that stood held at twice the
    capacity, 69 % (5 ms) and 59 % (50 ms) answered 503. 503s past the most share of
    faults at the trial's rate halve it, tried again, until a trial's calls are served
    (0-1 % here). Its capacity lies between that rate and the one halved: the probes stop
    half-way, at least 0.70 of it used (0.61-0.63 capped two margins over the rate served,
    the probe from a trial that found a capacity)."""
    service = Queueing(5.0, latency, random.Random(1), span=10.0)
    run = simulate(lambda t: 0.0, duration=40.0, latency=latency, service=service,
                   gateway=lambda quota, now: _Open())  # fmt: skip
    shed = len([t for t in run.unavailable if t >= 10.0])
    assert shed <= 0.02 * len([t for t in run.ok + run.unavailable if t >= 10.0])
    assert run.accepted_per_s(10.0, 40.0) >= 0.70 * 8 / (latency + 8 / 5.0)


@pytest.mark.parametrize("max_pause", [5.0, 30.0])
def test_a_window_whose_retry_after_points_an_hour_ahead_does_not_starve_the_run(
    max_pause: float,
) -> None:
    """A count over a fixed 10 s of 5 calls/s whose ``Retry-After`` is an HTTP date from a
    clock an hour ahead: the check call's refusal points to the same end, an hour on. Read
    as a count over that hour, the pace was 0.013 calls/s until its end, whatever
    ``--max-retry-after`` (0.002-0.004 of the quota used from 20 s to 120 s); no count is
    kept over more than ``KEEP_S``, so no window is read, each pause is capped at
    ``max_pause``, and at least a quarter of the quota is used."""
    ctrl = RateController(0.0, AdaptiveConfig(max_pause=max_pause))
    run = simulate(lambda t: 5.0, duration=120.0, latency=0.005, controller=ctrl,
                   gateway=lambda q, now: FixedWindow(q, now, span=10.0),
                   retry_after=lambda wait, now: math.ceil(wait) + 3600.0)  # fmt: skip
    assert ctrl.windows == 0
    assert run.accepted_per_s(20.0, 120.0) >= 0.25 * 5.0


def test_a_long_wait_pauses_for_its_check_call_whatever_the_rate() -> None:
    """Start-up at 800 calls/s (a fleet's, past a window begun before it) refused with a
    ``Retry-After`` of 9 s: the check's pause holds every call but the check, though one
    refusal of so many calls reads as send jitter. It cut nothing and paused nobody, and
    every call went on into the window's spent count (three replicas: 24 refused a window,
    7 % of the calls at 30 calls/s)."""
    ctrl = RateController(0.0)
    ctrl.restore(replace(ctrl.state, rate=800.0, level=800.0))
    now = 0.0
    for _ in range(1600):
        now += 1 / 800
        ctrl.on_sent(now)
        ctrl.on_success(now + 0.005, 0.005)
    ctrl.on_throttle(now + 0.006, retry_after=9.0, latency=0.005)
    check = ctrl.long_window.check
    assert check is not None
    assert ctrl.pause_until() == pytest.approx(check.at)


class _BegunBefore:
    """A fixed count over ``span`` s whose windows began ``before`` s before the run."""

    def __init__(self, quota: float, before: float, span: float = 10.0) -> None:
        self.window, self.before = FixedWindow(quota, before, span=span), before

    def try_acquire(self, now: float) -> float:
        return self.window.try_acquire(now + self.before)


def test_a_long_wait_after_a_window_spent_in_its_last_second_is_checked() -> None:
    """A window begun 5 s before the run (30 calls/s, 50 ms, 8 in flight): start-up spends
    its count in its last second, so its refusals say ``Retry-After: 1``, read as a token
    bucket's. The next window's count is spent in seconds and its refusals point 8 s ahead,
    but were no news (the first ones remembered), so no check call went and no window was
    read from them: each refusal after it cut as a token bucket's, and the count was spent
    again and again (25 % of the calls refused from the second window on, 5 s, to 40 s; a
    fleet: every worker refused once a window, 7.4 %).
    The first long wait since every end told before has passed is checked as news is."""
    ctrl = RateController(0.0)
    run = simulate(lambda t: 30.0, duration=40.0, latency=0.05, controller=ctrl,
                   gateway=lambda q, now: _BegunBefore(q, 5.0))  # fmt: skip
    first_refused = min(run.refused)
    assert first_refused < 5.0  # (the first window's count, spent in its last second)
    used, refused = _used_and_refused(run, 30.0, 5.0, 40.0)  # from the second window
    assert refused <= 0.02, (used, refused)
    assert used >= 0.90, (used, refused)


@pytest.mark.parametrize("before", [2.5, 5.0])
def test_a_window_read_again_is_spanned_to_where_its_retry_after_most_likely_ends(
    before: float,
) -> None:
    """A window read again (a refusal of a call sent after the last end): its count over
    the span from the last end to the new ``Retry-After``'s end. Whole seconds rounded up,
    that end is up to a second late (half of one on average), and the span read to it a
    tenth too long on a 10 s window: the pace 0.86 of the quota (a fleet of three accepted
    220-275 of a window's 300). One process, 30 calls/s, 5 ms, a fixed 10 s count begun
    ``before`` s before it: from the second window to 70 s, at least 0.93 of the quota used
    (0.918 and 0.906 read to the end said; 0.949 and 0.936 now), at most 2 % refused."""
    ctrl = RateController(0.0)
    run = simulate(lambda t: 30.0, duration=70.0, latency=0.005, controller=ctrl,
                   gateway=lambda q, now: _BegunBefore(q, before))  # fmt: skip
    second = (math.floor((min(run.refused) + before) / 10.0) + 1) * 10.0 - before
    used, refused = _used_and_refused(run, 30.0, second, 70.0)
    assert ctrl.windows >= 2  # (read again at least once)
    assert refused <= 0.02, (used, refused)
    assert used >= 0.93, (used, refused)


@pytest.mark.parametrize("latency", [0.005, 0.05], ids=["5ms", "50ms"])
@pytest.mark.parametrize("quota", [5.0, 30.0], ids=["q5", "q30"])
def test_a_fixed_count_is_not_read_lower_at_each_lapse_of_its_cap(
    quota: float, latency: float
) -> None:
    """A fixed count of 10 q calls per 10 s over 200 s (the window tests above run 40 s).
    Paced at 0.95 of the rate read, the count is not spent, so nothing is refused until the
    cap lapses (``forget``, 30 s after the last end) and the probe spends the count of the
    window it is in. Read again from the last end, 40 s before, the count was mostly the
    pace's: each lapse read the rate lower (q30: 29.5, 27.9, 27.1, 26.9 calls/s), and from
    150 s on 0.892/0.876 (q5) and 0.882/0.864 (q30) of the quota was used (5/50 ms).
    Read over the last span, the rate before standing where the count over it begun a
    second earlier or later allows it (``LongWindow._again``): 0.964/0.952 and 0.930/0.929,
    at 0.2-0.6 % refused. Begun 1-9 s before the run (7 starts), medians 0.95-0.97 at q5
    and q30, 0.92-0.95 at q50 (0.86-0.89 before). A quota that falls past the lapse (30 to
    15 or 28 calls/s at 75 or 85 s) is read to it: 0.90-0.99 used from 15 s after it, at
    most 0.8 % refused."""
    run = simulate(lambda t: quota, duration=200.0, latency=latency, gateway=SPANS["fixed 10 s"])
    used, refused = _used_and_refused(run, quota, 150.0, 200.0)
    assert refused <= 0.02, (used, refused)
    assert used >= 0.92, (used, refused)


@pytest.mark.parametrize(
    ("quota", "latency"),
    [(20.0, 0.005), (20.0, 0.05), (50.0, 0.05)],
    ids=["q20-5ms", "q20-50ms", "q50-50ms"],
)
def test_a_sliding_count_is_kept_to_over_a_long_run(quota: float, latency: float) -> None:
    """A sliding count of 10 q calls over any 10 s, 200 s (the tests above run 40 s, at q5
    and q50): from 10 s on 3.7 % (q20, 5 ms), 4.5 % (q20, 50 ms) and 3.8 % (q50, 50 ms) of
    the calls are refused, the quota used 0.95-0.97; from 150 s on 3.1, 6.0 and 5.5 %. The
    same on the code before 819b162 and 95deecd: past the cap's lapse the short waits of
    the probe passing the count cut as a token bucket's, and the rate came back and spent
    it again. Read as the window (``LongWindow._again``, ``short``): 0.947, 0.939, 0.940
    used at 0.33, 0.58 and 0.57 % refused (0.932, 0.924, 0.925 paused to what the wait
    says)."""
    run = simulate(lambda t: quota, duration=200.0, latency=latency, gateway=SPANS["sliding 10 s"])
    used, refused = _used_and_refused(run, quota, 10.0, 200.0)
    assert refused <= 0.02, (used, refused)
    assert used >= 0.90, (used, refused)


def test_a_short_wait_past_a_windows_cap_reads_it_and_pauses_to_its_likely_end() -> None:
    """A window read (40 calls in its first 4 s, its check refused with the same end), its
    pace of 4 calls/s kept to 45 s, past its cap's lapse (``forget``, 30 s after its end),
    where a call is refused with ``Retry-After: 1``: a sliding count's oldest call leaving
    as the probe passes it. It reads the window (cut as a token bucket's, the probe came
    back and spent the count again: 3.7-4.5 % of a sliding 10 s count's calls refused over
    200 s), from the count over the span begun a second before what the wait says (the
    sliding count's own: 39 calls, 4 calls/s, where the likely span's is half a second of
    calls short), and pauses to where the wait most likely ends, half a second before what
    it says. Paused to what it says, each lapse cost a second of the count: a sliding 10 s
    count at 5-50 calls/s, 5-50 ms, over 200 s, 0.915-0.935 used (median 0.927), now
    0.930-0.950 (0.942), at most 0.8 % refused either way (on the code before both, 0.945-0.973
    used at 1.1-4.5 % refused)."""
    window = LongWindow()

    def refused(sent: float, retry_after: float, *, news: bool = False) -> Verdict | None:
        return window.refused(sent, sent + 0.005, retry_after, news=news,
                              lasting=lambda: False, max_pause=30.0, forget=30.0)  # fmt: skip

    for n in range(40):
        window.sent(0.1 * n)
        window.accepted(0.1 * n, 0.1 * n + 0.005)
    check = refused(4.0, 6.0, news=True)
    assert check == Verdict(Verdict.CHECK, 5.505)
    assert window.sent(check.until) is not None
    first = refused(check.until, 5.0)
    read = window.window
    assert first is not None and first.kind == Verdict.READ and read is not None
    sends = [read.end + 0.25 * n for n in range(int((45.0 - read.end) / 0.25) + 1)]
    for sent in sends:
        window.sent(sent)
        window.accepted(sent, sent + 0.005)
    short = refused(45.0, 1.0)
    assert short is not None and short.kind == Verdict.READ
    assert short.until == pytest.approx(45.505)
    assert window.windows == 2
    counted = [t for t in sends if 45.005 - read.span <= t]
    assert window.window is not None
    assert window.window.rate == pytest.approx(len(counted) / read.span)


@pytest.mark.parametrize(
    ("kind", "before", "after", "at"),
    [("fixed 10 s", 50.0, 20.0, 35.0), ("sliding 10 s", 30.0, 27.0, 85.0),
     ("sliding 10 s", 30.0, 27.0, 135.0)],
    ids=["fixed-50-20-at-35s", "sliding-30-27-at-85s", "sliding-30-27-at-135s"],
)  # fmt: skip
def test_a_window_whose_quota_falls_is_read_again_to_its_new_count(
    kind: str, before: float, after: float, at: float
) -> None:
    """A count over 10 s whose quota falls mid-run (20 ms), read again from its next
    refusals: from 15-20 s after the fall, at least 0.90 of the new quota and at most 2 %
    refused. Spanned from the last end (a Retry-After rounded up, up to a second late) to
    half a second before the new one's, the span is short by half a second on average: the
    fixed count of 20 calls/s read 22.2 and paced at 21.1 (2.06 % refused from 50 s to
    100 s; 0.90 % on 819b162, the span read to what the Retry-After says). Over the
    sliding count the reads swung: 0.823 used at 1.6 % refused and 0.665 at 2.4 % (on
    819b162 0.980 at 2.3 % and 0.940 at 4.5 %: failing too, by its refusals). Spanned from
    where the last most likely ended, and past the cap's lapse over the last span
    (``LongWindow._again``): 0.943 at 0.74 %, 0.963 at 1.2 %, 0.954 at 2.4 %; the short
    waits past the lapse read as the window too: 0.943 at 0.74 %, 0.944 at 0.39 %, 0.939 at
    0.78 %."""
    run = simulate(lambda t: before if t < at else after, duration=at + 80.0, latency=0.02,
                   gateway=SPANS[kind])  # fmt: skip
    start = at + (15.0 if kind.startswith("fixed") else 20.0)
    used, refused = _used_and_refused(run, after, start, at + 65.0 if at == 35.0 else at + 80.0)
    assert refused <= 0.02, (used, refused)
    assert used >= 0.90, (used, refused)


@pytest.mark.xfail(
    strict=True,
    reason="a token bucket that becomes a count over 10 s mid-run: 0.78-0.85 of it used",
)
@pytest.mark.parametrize(
    ("kind", "after"),
    [("fixed 10 s", 20.0), ("fixed 10 s", 5.0), ("sliding 10 s", 5.0)],
    ids=["fixed-q20", "fixed-q5", "sliding-q5"],
)
def test_a_token_bucket_that_becomes_a_long_window_mid_run_is_read_as_one(
    kind: str, after: float
) -> None:
    """A token bucket of 50 calls/s (burst 2) for 30 s, then a count of 10 q calls per 10 s
    (a gateway's quota changed to a window's, its first long Retry-After mid-run; 20 ms):
    from 45 s to 100 s, 0.853, 0.851 and 0.782 of the quota used (q20 fixed, q5 fixed, q5
    sliding), at 0.4-0.9 % refused. Before 819b162 (a first long wait checked whatever came
    before it): 0.847, 0.884, 0.815; at 819b162, before its span read to the likely end
    (95deecd): 0.822, 0.815, 0.760. Read again past its cap over its last span
    (``LongWindow._again``): 0.867, 0.855, 0.782; the first window is read from the run's
    first call, over 40 s of the bucket's calls, and its pace spends the next count in 5 s
    (the rest of that window paused)."""
    window = SPANS[kind]

    def gateway(quota: float, now: float) -> Gateway:
        return ServerQuota(quota, 2, now) if now < 30.0 else window(quota, now)

    run = simulate(lambda t: 50.0 if t < 30.0 else after, duration=100.0, latency=0.02,
                   gateway=gateway)  # fmt: skip
    used, refused = _used_and_refused(run, after, 45.0, 100.0)
    assert refused <= 0.02, (used, refused)
    assert used >= 0.90, (used, refused)


def test_a_leader_that_took_over_after_a_windows_end_reads_on_from_the_end_it_held_to() -> None:
    """A fleet's next leader takes up a window read by the one before (ended at 10 s, most
    likely at 9.5 s) at 12 s: the calls accepted before that were the other's to count. Its
    first long refusal holds to the end it says (20.05 s), the rate read standing; the next
    window's is read from there: 40 calls from 20.05 s to where the next wait most likely
    ends, 29.65 s. Read from where the old window most likely ended (``Window.began``, the
    held window keeping its ``likely``), the span took in 10 s the new leader saw no call
    of: 2.0 calls/s, not 4.2."""
    window = LongWindow()
    kept = {"end": 10.0, "rate": 4.0, "span": 10.0, "last": 9.9, "shift": 10.0,
            "mirror": 0.0, "likely": 9.5}  # fmt: skip
    window.adopt({"window": kept}, 12.0)

    def refused(sent: float, retry_after: float) -> Verdict | None:
        return window.refused(sent, sent + 0.05, retry_after, news=False,
                              lasting=lambda: False, max_pause=30.0, forget=30.0)  # fmt: skip

    assert refused(13.0, 7.0) == Verdict(Verdict.HOLD, 20.05)
    for n in range(40):
        window.sent(20.05 + 0.1 * n)
        window.accepted(20.05 + 0.1 * n, 20.1 + 0.1 * n)
    read = refused(24.1, 6.0)
    assert read is not None and read.kind == Verdict.READ
    assert window.window is not None
    assert window.window.rate == pytest.approx(40 / (29.65 - 20.05))
