"""``--rate auto`` across issue 23's matrix of gateways, on virtual time (``simulate``: the
controller's arithmetic against a token-bucket gateway, calls paced evenly).

The goal for every cell: from 10 s on, at least 0.90 of what can be reached (the quota, or
what the concurrency allows at that latency, if less) and at most 2 % of calls throttled.
A cell the controller does not meet is marked ``xfail(strict=True)``: a known gap (see
docs/rate-auto.md), and one that starts to pass fails the suite until the mark comes off.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
from collections.abc import Callable
from typing import Any

import pytest

from tests.fakes import (
    FixedWindow,
    Run,
    SlidingWindow,
    SteadyController,
    followed_after,
    quota_change,
    simulate,
)
from worker.pacing.controller import RateController, answer
from worker.simulator.quota import TokenBucket as ServerQuota
from worker.simulator.quota import WindowCount, retry_after_seconds

QUOTAS = (5.0, 50.0, 500.0)
BURSTS = (1, 2, 10)
LATENCIES = (0.005, 0.05, 0.3)
CONCURRENCY = (8, 32)


def _cell(*values: Any, name: str, missed: str | None = None) -> Any:
    """One parametrised cell; a cell the controller is known to miss is a strict xfail
    saying why (``missed``)."""
    marks = [pytest.mark.xfail(strict=True, reason=missed)] if missed else []
    return pytest.param(*values, marks=marks, id=name)


def _cells() -> list[Any]:
    return [
        pytest.param(quota, burst, latency, concurrency,
                     id=f"q{quota:g}-b{burst}-{latency * 1000:g}ms-c{concurrency}")
        for quota, burst, latency, concurrency in itertools.product(
            QUOTAS, BURSTS, LATENCIES, CONCURRENCY
        )
    ]  # fmt: skip


@pytest.mark.parametrize(("quota", "burst", "latency", "concurrency"), _cells())
def test_auto_uses_nearly_all_it_can_from_ten_seconds_on(
    quota: float, burst: int, latency: float, concurrency: int
) -> None:
    run = simulate(
        lambda t: quota, duration=40.0, burst=burst, latency=latency, concurrency=concurrency
    )
    _meets_the_goal(run, min(quota, concurrency / latency))


def _meets_the_goal(run: Run, reachable: float) -> None:
    """From 10 s to 40 s: at least 0.90 of ``reachable``, at most 2 % of calls throttled."""
    assert run.accepted_per_s(10.0, 40.0) >= 0.90 * reachable
    assert run.refused_share(10.0, 40.0) <= 0.02


def _drawn(mean: float, seed: int) -> Callable[[float], float]:
    """Latency as the simulator draws it: exponential around ``mean`` (seeded)."""
    rng = random.Random(seed)
    return lambda rate: rng.expovariate(1.0 / mean)


REFUSED_AT_ONCE = 0.002
"""How soon the simulator's 429 comes back over loopback (its traces: 2 ms): it refuses a
call before it draws the latency, as a gateway refuses one before it reaches the service."""


def _as_over_real_http(
    burst: int,
    latency: float,
    concurrency: int,
    seed: int,
    *,
    held: bool = False,
    quota: float = 5.0,
    workers: int | None = None,
) -> Run:
    """A quota of ``quota`` calls/s for 40 s, answered as the simulator answers over real HTTP:
    latency drawn around ``latency`` (``seed``), 429s at once. ``held``: a refused call's
    worker sleeps its Retry-After and up to half again (drawn, ``seed``) before sending it
    again, as the dispatcher's retry policy does, its place among the ``concurrency`` in
    flight free meanwhile for one of as many workers again (the pool's dispatchers;
    ``workers``: as many as that)."""
    wait = random.Random(1000 + seed)
    retry_wait = (lambda after: after + wait.uniform(0.0, after / 2.0)) if held else None
    workers = 2 * concurrency if workers is None else workers
    return simulate(lambda t: quota, duration=40.0, burst=burst, concurrency=concurrency,
                    latency=_drawn(latency, seed), refusal_latency=REFUSED_AT_ONCE,
                    retry_wait=retry_wait, workers=workers)  # fmt: skip


@pytest.mark.parametrize("concurrency", CONCURRENCY, ids=[f"c{c}" for c in CONCURRENCY])
@pytest.mark.parametrize("latency", LATENCIES, ids=[f"{lat * 1000:g}ms" for lat in LATENCIES])
def test_auto_at_five_calls_a_second_burst_ten_answered_as_over_real_http(
    latency: float, concurrency: int
) -> None:
    """The q5-b10 cells answered as the simulator answers over real HTTP: latency drawn
    (exponential, 10 seeds) and 429s at once. At least 0.90 of the quota from 10 s on, and
    at most one refusal (a probe now and then, as with a fixed latency: none there). A
    probe refused past the quota measured that returned to 1 % under the rate refused
    (5.2-5.7 calls/s, which a burst of 10 refuses once its tokens are spent) was refused on
    every cruise back, every 6-10 s: 3 refusals (1.95 %) in each of these 60 runs."""
    for seed in range(10):
        run = _as_over_real_http(10, latency, concurrency, seed)
        used = run.accepted_per_s(10.0, 40.0) / 5.0
        refused = sum(10.0 <= t < 40.0 for t in run.refused)
        assert used >= 0.90 and refused <= 1, (seed, used, refused)


@pytest.mark.parametrize("concurrency", CONCURRENCY, ids=[f"c{c}" for c in CONCURRENCY])
@pytest.mark.parametrize("latency", LATENCIES, ids=[f"{lat * 1000:g}ms" for lat in LATENCIES])
def test_auto_at_five_calls_a_second_burst_ten_with_workers_held_by_retry_after(
    latency: float, concurrency: int
) -> None:
    """The q5-b10 cells answered as over real HTTP, each refused call's worker asleep on its
    Retry-After (1 s, and up to half again) before sending it again (20 seeds): the matrix's
    goal from 10 s on. At 300 ms with 8 in flight the workers asleep held what was really
    sent to 6-10 calls/s while the rate floated at twice that, and with accepted calls still
    out at every 429 no refusal was measured for 5-13 s, each stepping 3 % under the rate
    refused: 3-13 % of the calls refused from 10 s on in 6 of 10 runs (1 of 3 over real
    HTTP). Measured up to an earlier refused call whose span is all answered, they are not."""
    for seed in range(20):
        _meets_the_goal(_as_over_real_http(10, latency, concurrency, seed, held=True), 5.0)


@pytest.mark.parametrize("burst", BURSTS, ids=[f"b{burst}" for burst in BURSTS])
def test_auto_at_500_calls_a_second_with_workers_asleep_on_retry_after_leaving_their_places(
    burst: int,
) -> None:
    """The q500-5ms-c8 cells answered as over real HTTP, each refused call's worker asleep
    on its Retry-After (1 s, and up to half again; 5 seeds): at most 8 calls in flight, and
    16 workers, so a worker asleep leaves its place to another. The matrix's goal from 10 s
    on. With 8 workers, each asleep keeping its place (the dispatcher before the places),
    every one of these runs missed it (``tests/benchmarks/bench_held.py``: 26 of 30 seeds
    over the three bursts, 10 a cell)."""
    for seed in range(5):
        run = _as_over_real_http(burst, 0.005, 8, seed, held=True, quota=500.0)
        _meets_the_goal(run, 500.0)
        if burst == 1:  # the same seed, each worker asleep keeping its place: missed
            kept = _as_over_real_http(burst, 0.005, 8, seed, held=True, quota=500.0, workers=8)
            with pytest.raises(AssertionError):
                _meets_the_goal(kept, 500.0)


@pytest.mark.parametrize("concurrency", CONCURRENCY, ids=[f"c{c}" for c in CONCURRENCY])
@pytest.mark.parametrize("burst", BURSTS, ids=[f"b{burst}" for burst in BURSTS])
def test_auto_at_fifty_calls_a_second_and_300_ms_with_workers_asleep_on_retry_after(
    burst: int, concurrency: int
) -> None:
    """The q50-300ms cells answered as over real HTTP (10 seeds), each refused call's worker
    asleep on its Retry-After and leaving its place to another: the matrix's goal from 10 s
    on. 8 in flight carry about 26.7 calls/s, so the places bind, not the quota: a probe
    past the target bought nothing there but its refusals (1.5-2.1 % at burst 1, 2 of 10
    runs over 2 %), and at burst 2 a refusal of the pace's clumps, read as the workers' rate
    refused, cut the pace to the 20-23 calls/s they sent, under what they could send (0.85
    of it in the worst run). The pace now holds at its target while the places bind, and a
    refusal of what was sent for a window or more cuts under the pace, not under what was
    sent. With 32 in flight the quota binds (106 calls/s could go)."""
    missed = []
    for seed in range(10):
        run = _as_over_real_http(burst, 0.3, concurrency, seed, held=True, quota=50.0)
        used = run.accepted_per_s(10.0, 40.0) / min(50.0, concurrency / 0.3)
        refused = run.refused_share(10.0, 40.0)
        if used < 0.90 or refused > 0.02:
            missed.append((seed, round(used, 3), round(refused, 4)))
    assert not missed


@pytest.mark.parametrize("concurrency", CONCURRENCY, ids=[f"c{c}" for c in CONCURRENCY])
@pytest.mark.parametrize("latency", LATENCIES, ids=[f"{lat * 1000:g}ms" for lat in LATENCIES])
@pytest.mark.parametrize("burst", [1, 2], ids=["b1", "b2"])
def test_auto_at_five_calls_a_second_burst_one_or_two_answered_as_over_real_http(
    burst: int, latency: float, concurrency: int
) -> None:
    """The q5-b1 and q5-b2 cells answered as over real HTTP (3 seeds): the matrix's goal
    from 10 s on. Two or three refusals in its 150 calls (1.3-2.0 %), the probe's: the same
    on every controller of this session since a5ffdd3. Early calls from the target on
    (``EARLY_AFTER`` 0) cost four (2.6 %) in the 5 and 50 ms cells."""
    for seed in range(3):
        _meets_the_goal(_as_over_real_http(burst, latency, concurrency, seed), 5.0)


@pytest.mark.parametrize("burst", [4, 5], ids=["b4", "b5"])
def test_two_in_flight_pairs_a_burst_accepts_are_not_read_as_a_pace_refused(burst: int) -> None:
    """A quota of 8 calls/s, burst 4 or 5, 2 in flight answered around 300 ms (drawn, 10
    seeds), 429s at once: the workers send about 6 calls/s, the two of them back to back
    at the pace whenever both are free, and the pace rose to 22-24. A refused call that
    left at the pace after the one before was read as the pace refused, though the
    gateway had accepted pairs as close: each refusal stepped 3 % under the pace (12 in
    2 s): 3.5-3.6 % of the calls refused from 10 s on (9 % in the worst run), where the
    workers held back are read as held: 1.4-1.7 % (5 % in the worst run; 1.0-1.1 % before
    a refusal at the pace was read as the pace refused). What 2 in flight paced send at
    that latency is 0.85 of the 6.7 calls/s they allow, as before."""
    refused = accepted = 0
    for seed in range(10):
        run = simulate(lambda t: 8.0, duration=40.0, burst=burst, concurrency=2,
                       latency=_drawn(0.3, seed), refusal_latency=REFUSED_AT_ONCE)  # fmt: skip
        refused += sum(10.0 <= t < 40.0 for t in run.refused)
        accepted += sum(10.0 <= t < 40.0 for t in run.ok)
    assert refused / (refused + accepted) <= 0.02
    assert accepted / (10 * 30.0) >= 0.80 * 2 / 0.3


_IN_FLIGHT = (
    "a probe past a burst-1 quota is refused every other call, and where a 2 s window holds "
    "500 calls or more (about 250 calls/s and up) refusals up to 1 % of it (4 of the last "
    "100) are read as send jitter; each probe: 2 tolerated, the third cuts 2 % under the rate "
    "refused, the calls in flight refused after it, the probe back 2.3 s later (2.7 s "
    "before): {now} refused ({then} at 05ec803). Cutting at a second refusal within 2.5 calls "
    "of the first gave 1.5-2.0 %, but late calls refuse two in a row too: the FINE jitter "
    "cells at 500 calls/s fell to 0.849 of the quota"
)


def _in_flight() -> list[Any]:
    cells = [(150.0, 0.05, 32, None), (300.0, 0.1, 32, ("2.68 %", "1.93 %")),
             (500.0, 0.1, 64, ("2.59 %", "1.93 %"))]  # fmt: skip
    return [
        _cell(quota, latency, concurrency, name=f"q{quota:g}-{latency * 1000:g}ms-c{concurrency}",
              missed=_IN_FLIGHT.format(now=figures[0], then=figures[1]) if figures else None)
        for quota, latency, concurrency, figures in cells
    ]  # fmt: skip


@pytest.mark.parametrize(("quota", "latency", "concurrency"), _in_flight())
def test_auto_on_a_burst_of_one_with_many_calls_in_flight_keeps_to_the_budget(
    quota: float, latency: float, concurrency: int
) -> None:
    """A burst of 1 past its quota refuses every other call, and the calls already in
    flight when the first refusal comes back (7-15 here) are refused after the cut whatever
    it does: the probe past the quota must be cut at its first refusals. The goal of the
    matrix: at least 0.90 of the quota, at most 2 % refused from 10 s on. At 150 calls/s
    (a window under 500 calls: every refusal is read as before) 1.24 % (2.03 % when the
    share was read from 250 calls)."""
    run = simulate(lambda t: quota, duration=40.0, burst=1, latency=latency,
                   concurrency=concurrency)  # fmt: skip
    _meets_the_goal(run, quota)


@pytest.mark.parametrize("quota", [150.0, 200.0, 500.0], ids=["q150", "q200", "q500"])
def test_auto_against_a_gateway_whose_refusals_come_in_clumps_keeps_to_the_budget(
    quota: float,
) -> None:
    """A gateway that counts calls per whole second (``FixedWindow``: the gateway's
    documented default is 200 calls/s per API), 8 in flight, answers 5 ms later: the same
    goal as the matrix, from 10 s on. 150 and 200 calls/s: 1.63 % and 1.82 % refused; they
    were 2.91 % and 4.34 % when refusals were read as a share from 250 calls in a window.
    500 calls/s: 1.81 %, where 2.06 % while a refusal read as a little over the budget
    measured nothing (``CLUMP``)."""
    run = simulate(lambda t: quota, duration=40.0, latency=0.005, windowed=True)
    _meets_the_goal(run, quota)


def test_a_gateway_refusing_every_call_for_seconds_is_not_held_as_one_clump() -> None:
    """A gateway counting 500 calls per 10 s (a quota of 50 calls/s stated per second,
    enforced per 10 s), answers 5 ms later: start-up spends the count of 0-10 s within 5 s;
    from 10 s the next count is spent in a second at 690 calls/s, and every call is refused
    until 20 s. A refusal opened a clump (a per-second gateway's: each of its refusals
    says only that the second's count is spent) whenever the calls before its run were
    accepted, so each cut opened the next: one cut in 2 s, and 670-680 calls/s refused until
    the count started again (89 % refused from 10 s on). No per-second count refuses two
    seconds in a row: the rate is under the quota from 15 s (35 calls/s)."""
    run = simulate(lambda t: 50.0, duration=20.0, latency=0.005,
                   gateway=lambda quota, now: FixedWindow(quota, now, span=10.0))  # fmt: skip
    assert max(rate for t, rate in run.rates if t < 12.0) > 600.0
    assert max(rate for t, rate in run.rates if t >= 15.0) < 50.0


def _per_second_drawn(quota: float, latency: float, concurrency: int, seed: int) -> Run:
    """40 s against a gateway counting ``quota`` calls per whole second, latency drawn around
    ``latency`` and sends about 2 ms late (``seed``): a drawn cell of
    ``tests/benchmarks/bench_per_second.py``."""
    rng = random.Random(seed)
    return simulate(lambda t: quota, duration=40.0, latency=_drawn(latency, seed + 100),
                    concurrency=concurrency, windowed=True,
                    jitter=lambda: rng.expovariate(500.0))  # fmt: skip


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_per_second_gateway_with_latency_spread_is_not_measured_from_a_clump(seed: int) -> None:
    """A gateway counting 150 calls per whole second, 32 in flight, latency drawn around
    50 ms, sends 2 ms late on average: a span between two refused calls of one second's
    clump holds no accepted call, and the calls still out in it, counted as accepted, are no
    bound on the quota there (12 out over 0.3 s measured 39.5 calls/s). The matrix's goal
    from 10 s on (read so, 0.53-0.81 of the quota over seeds 1-6; not read, 0.99-1.00)."""
    _meets_the_goal(_per_second_drawn(150.0, 0.05, 32, seed), 150.0)


def test_a_per_second_gateway_at_300_calls_a_second_is_not_measured_across_two_seconds() -> None:
    """A gateway counting 300 calls per whole second, 64 in flight, answers 100 ms later: a
    span from a refused call of one second's clump to one of the next second's holds that
    second's count (300) over more than a second. With one call counted as still out, it
    was read as the most the quota can be: 206 calls/s, the rate fell to it, and the floor
    proved a rise from there, start-up's climb again and a second clump of refusals (7.8 %
    refused from 10 s on). The matrix's goal from 10 s on (1.5 %, as at a5ffdd3)."""
    run = simulate(lambda t: 300.0, duration=40.0, latency=0.1, concurrency=64, windowed=True)
    _meets_the_goal(run, 300.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_per_second_gateway_at_300_calls_a_second_with_latency_spread_keeps_its_quota(
    seed: int,
) -> None:
    """As above with 32 in flight, latency drawn around 50 ms, sends 2 ms late: the calls
    still out, counted as accepted over a span across two seconds, measured 206-222 calls/s
    of the quota of 300, and what followed cost 0.95-0.97 of it from 10 s on, 5.2-6.3 %
    refused. No such measure comes back, and a refusal of a second's clump is measured once
    the answers of its span are in (``CLUMP``): the matrix's goal from 10 s on. Not measured
    at all, start-up's end came down 2-3 % a second, a clump of refusals each: 1.00 of the
    quota and 2.7-3.6 % refused."""
    _meets_the_goal(_per_second_drawn(300.0, 0.05, 32, seed), 300.0)


@pytest.mark.parametrize(
    ("quota", "latency", "concurrency", "seed"),
    [(500.0, 0.005, 32, 2), (500.0, 0.005, 32, 3), (300.0, 0.1, 32, 3), (150.0, 0.05, 8, 3)],
    ids=["q500-5ms-c32-s2", "q500-5ms-c32-s3", "q300-100ms-c32-s3", "q150-50ms-c8-s3"],
)
def test_a_per_second_gateways_clump_cuts_once_and_is_measured_by_its_count(
    quota: float, latency: float, concurrency: int, seed: int
) -> None:
    """A gateway counting calls per whole second refuses every call from its count's end to
    the second's end: one clump, whose first refusal cuts and whose others say nothing new,
    measured by the calls accepted in a row before it (the count). The matrix's goal from
    10 s on, of the quota or what the concurrency allows at that latency: 500 calls/s at
    5 ms, 1.26 % refused; 300 at 100 ms, 0.97 of it and 1.63 %; 150 at 50 ms with 8 in
    flight, 0.92 of it. Each refusal of the clump cutting 3 % more (33 cuts in 0.45 s at
    start-up's end) and measures from refused call to refused call across a second's start,
    they were at 2.50-2.58 % refused, 2.29 %, and 0.89 of it."""
    run = _per_second_drawn(quota, latency, concurrency, seed)
    _meets_the_goal(run, min(quota, concurrency / latency))


def test_a_per_second_gateways_two_counts_are_no_rise() -> None:
    """500 calls/s at 5 ms drawn, 32 in flight, seed 1 (``bench_per_second``): the probe
    near the count, a floor from a refusal at a second's end over 1.47 s held two counts and
    passed that refusal's ceiling by 1.02 % (``FLOOR_SPAN``). Read as a rise, start-up's
    growth went to 705 calls/s and 2.36 % of the calls from 10 s on were refused; the
    matrix's goal from 10 s on (1.25 %)."""
    _meets_the_goal(_per_second_drawn(500.0, 0.005, 32, 1), 500.0)


@pytest.mark.parametrize("quota", [200.0, 400.0], ids=["q200", "q400"])
def test_a_quota_that_falls_a_little_at_a_burst_of_fifty_keeps_to_the_budget(
    quota: float,
) -> None:
    """The quota falls 1 % at 30 s, burst 50, 8 in flight, 5 ms: the fall-and-rise test's
    bound (at most 2 % throttled from 2 s after the change). At 200 calls/s (under the rate
    where refusals are read as a share) 0.23 %; it was 2.12 % when the share was read from
    250 calls in a window; at 400 calls/s, where it is read, 1.38 %."""
    run = simulate(lambda t: quota if t < 30.0 else 0.99 * quota, duration=60.0, burst=50,
                   latency=0.005, concurrency=8)  # fmt: skip
    assert run.refused_share(32.0, 60.0) <= 0.02


LOW_QUOTAS = (1.0, 2.0, 3.0)


@pytest.mark.parametrize("concurrency", CONCURRENCY, ids=[f"c{c}" for c in CONCURRENCY])
@pytest.mark.parametrize("latency", LATENCIES, ids=[f"{lat * 1000:g}ms" for lat in LATENCIES])
@pytest.mark.parametrize("burst", BURSTS, ids=[f"b{burst}" for burst in BURSTS])
@pytest.mark.parametrize("quota", LOW_QUOTAS, ids=[f"q{quota:g}" for quota in LOW_QUOTAS])
def test_auto_under_five_calls_a_second_uses_nearly_all_of_it_from_twenty_seconds_on(
    quota: float, burst: int, latency: float, concurrency: int
) -> None:
    """Quotas of 1, 2 and 3 calls/s, where a 2 s window holds too few calls to measure
    one. The goal, from 20 s to 180 s (160-480 calls): at least 0.90 of the quota, and at
    most 2 % of the calls throttled or one refusal in 30 s where that is more (under 1.7
    calls/s): a probe must be refused now and then to find a quota that rose, and at 1
    call/s one refusal in 50 calls (2 %) would leave a rise unseen for minutes."""
    run = simulate(lambda t: quota, duration=180.0, burst=burst, latency=latency,
                   concurrency=concurrency)  # fmt: skip
    assert run.accepted_per_s(20.0, 180.0) >= 0.90 * quota
    refused = sum(20.0 <= t < 180.0 for t in run.refused)
    assert run.refused_share(20.0, 180.0) <= 0.02 or refused <= 160.0 / 30.0


def _jitter(seed: int, spread: float, tail: float, tail_s: float) -> Callable[[], float]:
    """A loaded loop's send jitter, seeded: each call leaves up to ``spread`` late, and
    ``tail`` of them an exponential ``tail_s`` later still; calls leave in order, so a late
    one and the next may leave back to back (``simulate``)."""
    rng = random.Random(seed)

    def draw() -> float:
        late = rng.uniform(0.0, spread)
        return late + rng.expovariate(1.0 / tail_s) if rng.random() < tail else late

    return draw


LOADED = (0.001, 0.01, 0.005)
"""Most calls within 1 ms of their start, 1 % a tail of 5 ms more on average."""

FINE = (0.0002, 0.005, 0.002)
"""Within 0.2 ms, 0.5 % a tail of 2 ms: about the most a burst of 1 at 500 calls/s (one
call each 2 ms) allows the goal with."""


QUIET = (0.0005, 0.01, 0.002)
"""Most calls within 0.5 ms of their start, 1 % a tail of 2 ms more on average: a quiet
loop's send jitter (``LOADED``: a loaded one's)."""


@pytest.mark.parametrize("jitter", [QUIET, LOADED], ids=["quiet", "loaded"])
def test_auto_at_five_calls_a_second_burst_one_with_send_jitter_keeps_two_refusals(
    jitter: tuple[float, float, float],
) -> None:
    """q5, burst 1, 50 ms drawn, 429s at once, calls leaving late as from a quiet or a
    loaded loop (10 seeds): from 10 s on at most two refusals (147 calls hold 2 % of three,
    so a third misses the goal: the real-HTTP misses of this cell were three). Each probe
    costs one; a cruise back to 1 % under the rate refused (2 ms from the quota's spacing)
    was refused by a call a millisecond or two late, the third: 1 and 5 of 30 seeds
    (``RateController._just_under``)."""
    for seed in range(10):
        run = simulate(lambda t: 5.0, duration=40.0, burst=1, concurrency=8,
                       latency=_drawn(0.05, seed), refusal_latency=REFUSED_AT_ONCE,
                       jitter=_jitter(seed + 100, *jitter))  # fmt: skip
        refused = sum(10.0 <= t < 40.0 for t in run.refused)
        assert run.accepted_per_s(10.0, 40.0) >= 0.90 * 5.0 and refused <= 2, (seed, refused)


@pytest.mark.parametrize("quota", [4.9, 5.9])
def test_a_burst_of_one_near_five_calls_a_second_is_not_held_at_a_measure_under_the_floor(
    quota: float,
) -> None:
    """Quotas beside the matrix's 5, burst 1, 5 ms: the goal from 10 s on. After start-up's
    steps down, every other call refused and then six in a row accepted, a refusal measured
    the quota over a span in which a burst of 1 lost the tokens it got while full: 3.71
    (under the floor of 4.18 those six calls prove), and the probe held 4.9 calls/s at
    0.687 of it, 5.9 at 0.746. A measure under the floor of as few as ``FLOOR_CALLS`` calls
    is suspect: the probe returns to just under the rate refused."""
    run = simulate(lambda t: quota, duration=40.0, burst=1, latency=0.005, concurrency=8)
    _meets_the_goal(run, quota)


@pytest.mark.parametrize("jitter", [QUIET, LOADED], ids=["quiet", "loaded"])
def test_a_burst_of_one_at_five_calls_a_second_is_not_cut_far_under_the_floor(
    jitter: tuple[float, float, float],
) -> None:
    """q5, burst 1, 50 ms drawn, 429s at once, calls leaving late (30 seeds): from 10 s on at
    least 0.94 of the quota. After start-up's steps down a refusal measured 3.46-3.72 calls/s
    over a span in which a burst of 1 lost tokens, under the rough floor of the five or six
    calls since the refusal before (4.02-4.18): the probe returned to the rate refused, but
    the level went 3 % under the measure, and the climb back took 3.7 units of 30 calls:
    0.913-0.920 of the quota in 6 of 30 seeds. The level is now 3 % under that floor, as a
    gateway counting calls per second allows too (0.947-0.953)."""
    used = []
    for seed in range(30):
        run = simulate(lambda t: 5.0, duration=40.0, burst=1, concurrency=8,
                       latency=_drawn(0.05, seed), refusal_latency=REFUSED_AT_ONCE,
                       jitter=_jitter(seed + 100, *jitter))  # fmt: skip
        used.append(run.accepted_per_s(10.0, 40.0) / 5.0)
    assert min(used) >= 0.94, [round(u, 3) for u in used]


@pytest.mark.parametrize(("quota", "latency"), [(4.0, 0.05), (6.0, 0.005)],
                         ids=["q4-50ms", "q6-5ms"])  # fmt: skip
def test_a_per_second_gateway_under_ten_calls_a_second_is_not_raised_by_its_count(
    quota: float, latency: float
) -> None:
    """A gateway counting calls per whole second, 8 in flight: the matrix's goal from 10 s on.
    Such a gateway lets its count through at any pace as each second begins, so the calls it
    accepted since a refusal over less than a second are its count, not a pace: a level set
    from the rough floor of them (start-up's end: 6 calls in 0.43 s, 11.6 calls/s of a count
    of 6) cost 2.2 % and 2.5 % refused in these cells (1.1 % and 1.7 % where the floor is
    what a per-second count allows too)."""
    run = simulate(lambda t: quota, duration=40.0, latency=latency, windowed=True)
    _meets_the_goal(run, quota)


@pytest.mark.parametrize(
    ("quota", "latency"),
    [(2.0, 0.005), (2.0, 0.05), (3.0, 0.005), (3.0, 0.05), (3.0, 0.3)],
    ids=["q2-5ms", "q2-50ms", "q3-5ms", "q3-50ms", "q3-300ms"],
)
def test_a_per_second_gateway_at_two_or_three_calls_a_second_is_measured(
    quota: float, latency: float
) -> None:
    """A gateway counting 2 or 3 calls per whole second, 8 in flight: the matrix's goal from
    10 s on. Start-up's end paced it at 5-7 calls/s, and each second it let its count through
    in a row and refused every call to the second's end: a count of 2 or 3 is under the 8
    accepted calls a measure needs between two refused calls, and from further back the
    measure said 0.4-0.65 of the pace, as a burst of 1 does (it loses the tokens it gets
    while full), and was not trusted. Each refusal stepped 3 % under the pace, a second's
    run of refusals at a time from 7 calls/s: 15.9-18.9 % refused at 3 calls/s, 3.2-4.9 %
    at 2. The runs accepted in a row, each more than the refused run before it allows of
    any token bucket (``GatewayEvidence.no_token_bucket``), prove the count the quota."""
    run = simulate(lambda t: quota, duration=40.0, latency=latency, windowed=True)
    _meets_the_goal(run, quota)


def test_a_per_second_gateway_at_three_calls_a_second_with_latency_spread_is_measured() -> None:
    """As above at 3 calls/s, latency drawn around 50 ms and sends about 2 ms late: 18.2 %
    refused from 10 s on where nothing was measured."""
    _meets_the_goal(_per_second_drawn(3.0, 0.05, 8, 1), 3.0)


@pytest.mark.parametrize("seed", [0, 20])
def test_a_token_bucket_reached_in_clumps_is_not_read_as_a_count_of_a_second(seed: int) -> None:
    """500 calls/s, burst 2, 5 ms drawn, 429s at once, 8 in flight, calls leaving late as
    from a loaded loop (``LOADED``, where the matrix's goal is out of reach): the calls
    behind a late one leave with it and reach the bucket at once, the ones past its token
    refused, and the run accepted after said more than that run allowed of a token bucket as
    the send times spread it, twice in 2 s. The gateway was proven no token bucket and the
    calls accepted in a row before a refusal read as its count of a second: 7 calls (seed 0,
    at 38 s) and 3 (seed 20, at 25 s), the rate 6.8 and 2.9 calls/s. Paced at least half the
    quota from 10 s on (the least 372 and 403 calls/s, as before the proof existed)."""
    run = simulate(lambda t: 500.0, duration=40.0, burst=2, concurrency=8,
                   latency=_drawn(0.005, seed), refusal_latency=REFUSED_AT_ONCE,
                   jitter=_jitter(seed + 100, *LOADED))  # fmt: skip
    least = min(rate for t, rate in run.rates if t >= 10.0)
    assert least >= 0.5 * 500.0, least


PAUSED = (0.001, 0.02, 0.03)
"""Most calls within 1 ms of their start, 2 % a tail of 30 ms more on average: a loop that
pauses now and then (a garbage collection on a loaded host)."""


def test_a_token_bucket_reached_after_pauses_is_not_read_as_a_count_of_a_second() -> None:
    """50 calls/s, burst 1, 5 ms drawn, 429s at once, 8 in flight, calls leaving late as from
    a loop that pauses (``PAUSED``, where the matrix's goal is out of reach: 0.68 used, 3.2 %
    refused): a clump longer than ``LATE`` still proves a token bucket no token bucket,
    and 3 accepted in a row before a refusal at 9.3 s were read as its count of a second:
    the rate 2.9 calls/s to the end (0.06 of the quota used). 41 calls were accepted in the
    second before, which no count of 3 lets through. Paced at least half the quota from
    10 s on (the least 30.3 calls/s, as before the proof existed)."""
    run = simulate(lambda t: 50.0, duration=40.0, burst=1, concurrency=8,
                   latency=_drawn(0.005, 2), refusal_latency=REFUSED_AT_ONCE,
                   jitter=_jitter(102, *PAUSED))  # fmt: skip
    least = min(rate for t, rate in run.rates if t >= 10.0)
    assert least >= 0.5 * 50.0, least


@pytest.mark.xfail(
    strict=True,
    reason="a proven count of 3 holds the probe at it: first within 10 % of a rise to 10 "
    "calls/s 53.7 s after it (22.2 s before the count was proven, at 40 % refused before it)",
)
def test_a_rise_from_a_count_of_a_second_proven_is_followed_within_thirty_seconds() -> None:
    """A gateway counting 3 calls per whole second, then 10 from 15 s, 50 ms, 8 in flight:
    some rate paced within 10 % of 10 by 30 s after the rise, as for a token bucket's rise
    (``test_a_quota_that_rises_from_a_low_one_is_followed_within_thirty_seconds``). The
    count proven at 4.5 s sets the level 3 % under 3 calls/s and nothing is refused: the
    probe's unit is 30 calls (10 s at 3 calls/s), the pace stays 2.9-3.0 up to 45 s, and
    the rise is first paced 53.7 s after it (0.30 of the new quota used over the 30 s after
    it; 3 to 30: 55.2 s, 0.10; a count of 5 to 50: 30.3 s, 0.14). Before the proof the pace
    stayed at 4.2-4.4, 40 % refused before the rise, and the probe from there reached 9
    calls/s 22.2 s after it (0.56 used; 3 to 30: 29.3 s, 5 to 50: 21.9 s)."""
    run = simulate(lambda t: 3.0 if t < 15.0 else 10.0, duration=45.0, latency=0.05,
                   concurrency=8, windowed=True)  # fmt: skip
    assert any(rate >= 0.9 * 10.0 for t, rate in run.rates if t >= 15.0)


def _fixed(share: float, quota: float, jitter: tuple[float, float, float]) -> tuple[float, float]:
    """What a steady pace of ``share`` of the quota uses, and the share of it refused."""
    steady = SteadyController(share * quota)
    run = simulate(lambda t: quota, duration=20.0, burst=1, latency=0.005, concurrency=64,
                   controller=steady, jitter=_jitter(1, *jitter))  # fmt: skip
    return run.accepted_per_s(2.0, 20.0) / quota, run.refused_share(2.0, 20.0)


def test_where_a_burst_of_one_under_send_jitter_allows_the_goal_at_all() -> None:
    """A burst of 1 refuses any call less than 1/quota after the last it accepted, so a
    late call and the next on time are a refusal, whatever the mean rate. At 500 calls/s
    (2 ms apart) a loaded loop's jitter (``LOADED``) leaves no pace that keeps to 2 %
    refused above 0.7 of the quota (the best is 0.61); ``FINE`` jitter lets 0.92 of it
    through with 1.6 % refused. At 50 calls/s (20 ms apart) ``LOADED`` costs little."""
    for share in (0.64, 0.7, 0.8, 0.9, 1.0):
        used, refused = _fixed(share, 500.0, LOADED)
        assert refused > 0.02 or used < 0.7, (share, used, refused)
    used, refused = _fixed(0.92, 500.0, FINE)
    assert used >= 0.90 and refused <= 0.02
    used, refused = _fixed(0.94, 50.0, LOADED)
    assert used >= 0.90 and refused <= 0.02


def _jittered() -> list[Any]:
    cells = []
    for quota, latency, concurrency in itertools.product(QUOTAS, LATENCIES, CONCURRENCY):
        reason = JITTER_MISSED.get((quota, latency, concurrency))
        name = f"q{quota:g}-{latency * 1000:g}ms-c{concurrency}"
        cells.append(_cell(quota, latency, concurrency, name=name, missed=reason))
    return cells


_JITTER_EDGE = (
    "at 0.8996 of the quota with 1.2 % refused: a refusal of up to 1 % of a window's calls "
    "cuts nothing, a little more steps 2 % under the rate refused, so the pace cycles "
    "about 0.90-0.93 of the quota, where a steady pace uses at most 0.905-0.907 (at 0.915-0.92, "
    "1.1-1.6 % refused): 0.8995-0.905 over seeds 1-8, 2 of 8 under 0.90"
)
JITTER_MISSED = {
    (500.0, 0.05, 32): _JITTER_EDGE,
}


@pytest.mark.parametrize(("quota", "latency", "concurrency"), _jittered())
def test_auto_on_a_burst_of_one_under_send_jitter(
    quota: float, latency: float, concurrency: int
) -> None:
    """The matrix's burst-1 cells with calls leaving late as from a loaded loop
    (``LOADED`` at 5 and 50 calls/s, ``FINE`` at 500, where ``LOADED`` leaves the goal out
    of reach): the same goal, from 10 s on."""
    jitter = _jitter(1, *(FINE if quota == 500.0 else LOADED))
    run = simulate(lambda t: quota, duration=40.0, burst=1, latency=latency,
                   concurrency=concurrency, jitter=jitter)  # fmt: skip
    reachable = min(quota, concurrency / latency)
    assert run.accepted_per_s(10.0, 40.0) >= 0.90 * reachable
    assert run.refused_share(10.0, 40.0) <= 0.02


@pytest.mark.parametrize("latency", [0.005, 0.05], ids=["5ms", "50ms"])
@pytest.mark.parametrize("seed", [7, 8, 9])
def test_auto_at_fifty_calls_a_second_burst_one_reads_send_jitter_as_jitter(
    seed: int, latency: float
) -> None:
    """q50, burst 1, 8 in flight, calls leaving late as from a loaded loop (``LOADED``): a
    burst of 1 refuses a call that leaves late and the next on time, about 1 % of the calls
    at any pace near the quota, and each such refusal read as a rate cut 3 % under a
    measure of the pace: 0.864-0.897 of the quota from 10 s on in these seeds (median
    0.912 over seeds 1-20). A refusal weighed against the last 10 s of answers
    (``RateController._jitter_lately``) is jitter: 0.901-0.913 here (median 0.916-0.922).
    The goal of the matrix, from 10 s on."""
    run = simulate(lambda t: 50.0, duration=40.0, burst=1, latency=latency, concurrency=8,
                   jitter=_jitter(seed, *LOADED))  # fmt: skip
    _meets_the_goal(run, 50.0)


class _DriftingCount:
    """A gateway counting calls per whole second whose count falls 1 % a second from 10 s
    to 50 s (60 -> 40 calls/s), the calls it counted kept as it falls."""

    def __init__(self, now: float) -> None:
        self.window = WindowCount(60.0, 1.0, "fixed", now)

    @staticmethod
    def quota(now: float) -> float:
        return 60.0 * math.pow(0.99, min(max(now, 10.0), 50.0) - 10.0)

    def try_acquire(self, now: float) -> float:
        self.window.limit = round(self.quota(now))
        return self.window.try_acquire(now)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_auto_behind_a_count_per_second_falling_one_percent_a_second(seed: int) -> None:
    """q60 counted per whole second, falling 1 %/s from 10 s to 50 s, 8 in flight, 5 ms,
    calls leaving late as from a loaded loop (``LOADED``): at most 2 % of the calls from
    10 s to 60 s refused, at least 0.90 of the quota used. The count refuses about a call a
    second as it falls, the first after each cut the only one since it; read as send
    jitter (``RateController._jitter_lately``) each cost a second more past the count:
    2.07-2.15 % refused here (2 of 20 seeds met), 1.62-1.83 % with the last 10 s's share
    refused weighed (18 of 20, as before the jitter reading)."""
    run = simulate(lambda t: 60.0, duration=60.0, latency=0.005, concurrency=8,
                   jitter=_jitter(seed, *LOADED),
                   gateway=lambda _, now: _DriftingCount(now))  # fmt: skip
    mean = statistics.fmean(_DriftingCount.quota(10.0 + k / 10.0) for k in range(500))
    assert run.refused_share(10.0, 60.0) <= 0.02
    assert run.accepted_per_s(10.0, 60.0) >= 0.90 * mean


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_auto_at_five_calls_a_second_behind_a_burst_of_ten_with_latency_spread(seed: int) -> None:
    """As over real HTTP: latency drawn exponential around 300 ms, and a loaded loop's send
    jitter (``LOADED``), 8 in flight, a quota of 5 calls/s with a burst of 10, which lets
    start-up reach about 30 calls/s. The goal of the matrix, from 10 s on. A refusal with
    answers still out was never measured, and each stepped 3 % under the rate refused, down
    from about 30: 2.6 %, 3.2 % and 12.0 % refused over seeds 1-3; 0.0 % now."""
    rng = random.Random(seed)
    run = simulate(lambda t: 5.0, duration=40.0, burst=10, concurrency=8,
                   latency=lambda rate: rng.expovariate(1.0 / 0.3),
                   jitter=_jitter(seed, *LOADED))  # fmt: skip
    _meets_the_goal(run, 5.0)


@pytest.mark.parametrize("latency", [0.005, 0.05])
def test_a_measure_by_a_hair_is_the_least_the_quota_can_be(latency: float) -> None:
    """3.9 calls/s at a burst of 1, 8 in flight, 429s at once (as over real HTTP). Start-up's
    end steps down 3 % a refusal to 3.90 calls/s, and the next refusal, 2.3 s after the one
    before with none between, measures 3.47: 8 calls accepted over 2.3 s, what was sent less
    a call. Taken as the quota, the probe returned to 3.47, under 6 calls/s in early calls,
    which a burst of 1 refuses under twice the pace whatever the quota: 0.897 of it from 10 s
    on. Such a measure is the least the quota can be, and the probe returns to just under
    the rate refused (``_by_a_hair``)."""
    run = simulate(lambda t: 3.9, duration=40.0, burst=1, latency=latency, concurrency=8,
                   refusal_latency=REFUSED_AT_ONCE)  # fmt: skip
    _meets_the_goal(run, 3.9)


_MOMENTS = {"fall": (0.0, 2.5, 5.5), "rise": (0.0, 1.0, 2.5, 4.0)}
"""Seconds after 30 s (the fall) or 60 s (the rise) the change comes: where it falls in
the probe's cycle decides how soon it is seen (``tests/benchmarks/bench_quota_change.py``
moves it by 0-5.5 s in 0.5 s steps: 16 of its 144 moments missed, 11 since ``hold_cap``,
1 since a rise is proven past the pace a refused call went at and a burst of 1's measure
is read against what its span sent, none since the growth after a burst of 1's proven
rise doubles every second; these held misses of each direction: the fall at burst
1, 5 ms, +2.5 and +5.5 s, followed in 13.1-13.4 s, the rise at +1, +2.5 and +4 s in
10.0-10.7 s). A shorter probe unit (1.5-2 s where it holds 30-40 calls, or past the target
1 s where it holds 15-20), or a steeper probe (``cubic`` 0.01-0.02), moved the misses
rather than ending them: 10-19 of the 144, a steeper probe overshooting 50 calls/s by 10 %
at burst 10."""


def _changes() -> list[Any]:
    return [
        pytest.param(kind, offset, burst, latency,
                     id=f"{kind}+{offset:g}s-b{burst}-{latency * 1000:g}ms")
        for (kind, offsets), burst, latency in itertools.product(
            _MOMENTS.items(), BURSTS, (0.005, 0.05)
        )
        for offset in offsets
    ]  # fmt: skip


@pytest.mark.parametrize(("kind", "offset", "burst", "latency"), _changes())
def test_a_quota_that_falls_and_rises_is_followed_within_ten_seconds_each_way(
    kind: str, offset: float, burst: int, latency: float
) -> None:
    """50 calls/s, 20 from 30 s, 50 again from 60 s, the fall or the rise ``offset`` s
    later: every rate paced within 10 % of the new quota from 10 s after that change on,
    and at most 2 % throttled after its first 2 s (8 in flight)."""
    run, start = quota_change(kind, offset, burst=burst, latency=latency)
    end, quota = (60.0, 20.0) if kind == "fall" else (start + 30.0, 50.0)
    assert run.refused_share(start + 2.0, end) <= 0.02
    assert followed_after(run, start, end, quota) < 10.0


@pytest.mark.parametrize(
    "offset", [pytest.param(2.0, id="rise+2s"), pytest.param(1.5, id="rise+1.5s")]
)
def test_a_rise_just_after_a_probe_refused_at_a_burst_of_one_is_followed_within_ten_seconds(
    offset: float,
) -> None:
    """The quota-change cells at burst 1, 50 ms, the rise 1.5 and 2.0 s after 60 s: just after
    a probe's refusal, which cost two (the call after the refused one had its slot before the
    cut) and so a cruise in units of 2 s (``hold_cap``). The rise 0.16 s after the refusal
    (sent at 61.34 s) is proven only once the floor since, an average over the cruise back
    from 18.9 calls/s and the probe past 19.8, passes the refused call's ceiling (20.05) by
    1 %, 8.8 s after the rise; from there the rate doubles every second (``hold``), not every
    unit of the probe past its target (1.5 s at 20 calls/s): the rise 1.5 s after 60 s was
    followed in 10.1 s, 9.7 s now; 2.0 s after, 9.6 s, 9.2 s now."""
    run, start = quota_change("rise", offset, burst=1, latency=0.05)
    assert run.refused_share(start + 2.0, start + 30.0) <= 0.02
    assert followed_after(run, start, start + 30.0, 50.0) < 10.0


_FALLS_FAR = (
    pytest.param(50.0, 5.0, 0.3, id="50to5-300ms"),
    pytest.param(20.0, 2.0, 0.005, id="20to2-5ms"),
)


@pytest.mark.parametrize(("high", "low", "latency"), _FALLS_FAR)
def test_a_quota_that_falls_far_at_a_burst_of_one_is_used_from_twenty_seconds_after(
    high: float, low: float, latency: float
) -> None:
    """``high`` calls/s, ``low`` from 30 s, burst 1, 8 in flight: from 20 s after the fall
    at least 0.90 of the new quota, at most 2 % throttled. Start-up's end and the first
    measure, both at the old quota or both at the new, say what burst the gateway has; one
    of each read start-up's calls as a burst of 11-87 (at 50 calls/s with 300 ms answers
    start-up is held at 27 by the 8 in flight and first refused after the fall), and every
    probe after stopped at the quota measured: 0.83-0.86 of it."""
    run = simulate(lambda t: high if t < 30.0 else low, duration=90.0, burst=1,
                   latency=latency, concurrency=8)  # fmt: skip
    assert run.accepted_per_s(50.0, 90.0) >= 0.90 * low
    assert run.refused_share(50.0, 90.0) <= 0.02


def _with_503s(fails: Callable[[float], float], *, seed: int, duration: float = 40.0) -> Run:
    """Calls paced evenly at the controller's rate, 8 in flight, answered 20 ms later,
    against a gateway quota of 50 calls/s with a burst of 2; a call the gateway lets
    through is a 503 with the chance ``fails(rate it was sent at)``. ``Run.refused``
    holds the 429s and the 503s alike."""
    rng = random.Random(seed)
    ctrl = RateController(0.0)
    gateway = ServerQuota(50.0, 2, 0.0)
    run = Run()
    now = next_slot = 0.0
    in_flight: list[tuple[float, bool, bool]] = []  # (answered at, throttled, a 503)
    while now < duration:
        while in_flight and in_flight[0][0] <= now:
            done, throttled, failed = heapq.heappop(in_flight)
            answer(ctrl, done, throttled=throttled, latency_s=0.02,
                           retry_after=1.0 if throttled else None, overloaded=failed)  # fmt: skip
        rate = ctrl.rate_at(now)
        wait = max(next_slot, ctrl.pause_until()) - now
        if wait > 0 or len(in_flight) >= 8:
            now += wait if wait > 0 else in_flight[0][0] - now
            continue
        ctrl.on_sent(now)
        throttled = gateway.try_acquire(now) > 0
        failed = not throttled and rng.random() < fails(rate)
        (run.refused if throttled or failed else run.ok).append(now)
        heapq.heappush(in_flight, (now + 0.02, throttled, failed))
        run.rates.append((now, rate))
        next_slot = now + 1.0 / rate
    return run


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_503s_at_a_steady_rate_do_not_slow_auto_but_503s_rising_with_it_do(
    seed: int,
) -> None:
    """Issue 23's point 4. 2 % of the calls 503 at random, whatever the rate: faults to
    retry, so the quota is still used (each used to cut the rate, and held ``--rate auto``
    near 11 calls/s). A service that fails every call past 30 calls/s (503s rising with
    the rate): overload, so the rate settles at what the service serves (``_served_flat``;
    no further than where a fifth of the answers are 503s, ``overload_share``), well under
    the gateway's quota of 50."""
    steady = _with_503s(lambda rate: 0.02, seed=seed)
    assert steady.accepted_per_s(10.0, 40.0) >= 0.90 * 0.98 * 50.0
    rising = _with_503s(lambda rate: max(0.0, 1.0 - 30.0 / rate), seed=seed)
    paced = [rate for t, rate in rising.rates if t >= 10.0]
    assert statistics.fmean(paced) <= 1.03 * 30.0 / (1.0 - 0.2)
    assert rising.refused_share(10.0, 40.0) <= 0.21
    assert rising.accepted_per_s(10.0, 40.0) >= 0.95 * 30.0


def _idle_from(quota: float, burst: int, idle: tuple[float, float], duration: float) -> Run:
    """Calls paced at the controller's rate, 8 in flight, answered 5 ms later, against a
    gateway of ``quota`` and ``burst``; none start while ``idle`` lasts (a run waiting for
    ids: the pacing goes on, nobody sends)."""
    ctrl = RateController(0.0)
    gateway = ServerQuota(quota, burst, 0.0)
    run = Run()
    now = next_slot = 0.0
    in_flight: list[tuple[float, bool, float]] = []
    while now < duration:
        while in_flight and in_flight[0][0] <= now:
            done, ok, retry_after = heapq.heappop(in_flight)
            answer(ctrl, done, throttled=not ok, latency_s=0.005, retry_after=retry_after,
                   overloaded=False)  # fmt: skip
        rate = ctrl.rate_at(now)
        if idle[0] <= now < idle[1]:
            now = min([idle[1], *(done for done, _, _ in in_flight)])
            continue
        wait = max(next_slot, ctrl.pause_until()) - now
        if wait > 0 or len(in_flight) >= 8:
            now += wait if wait > 0 else in_flight[0][0] - now
            continue
        ctrl.on_sent(now)
        refused = gateway.try_acquire(now)
        (run.ok if refused <= 0 else run.refused).append(now)
        heapq.heappush(in_flight, (now + 0.005, refused <= 0, float(retry_after_seconds(refused))))
        run.rates.append((now, rate))
        next_slot = now + 1.0 / rate
    return run


@pytest.mark.parametrize("burst", [1, 2], ids=["b1", "b2"])
@pytest.mark.parametrize("quota", LOW_QUOTAS, ids=[f"q{quota:g}" for quota in LOW_QUOTAS])
def test_a_refusal_after_a_long_idle_stretch_does_not_cut_far_under_the_quota(
    quota: float, burst: int
) -> None:
    """Under about 4 calls/s a refusal is measured from as far back as 30 s; a run that
    sends nothing for 20 s (its ids came in two lots) must not measure across that: the
    gateway's bucket filled and lost what it got meanwhile. Idle from each half second of
    10-20 s: every rate paced in the 15 s after at least 0.6 of the quota (measured across
    the idle stretch, the first refusal after it cut to 0.11-0.28 of it)."""
    for start in [10.0 + k / 2.0 for k in range(21)]:
        run = _idle_from(quota, burst, (start, start + 20.0), start + 35.0)
        paced = [rate for t, rate in run.rates if t >= start + 20.0]
        assert min(paced) >= 0.6 * quota, (start, min(paced))


def test_a_burst_seen_by_a_start_up_that_began_after_an_idle_stretch_still_counts() -> None:
    """3 calls/s, burst 10, nothing sent from 1 s to 21 s (start-up not yet refused): the
    burst start-up saw is counted from the first call after the idle stretch (the bucket
    refilled meanwhile), so the probes stop at the quota measured, at most 2 % throttled
    from 31 s on (counted across the stretch, or not at all, 2.45 %)."""
    run = _idle_from(3.0, 10, (1.0, 21.0), 111.0)
    assert run.refused_share(31.0, 111.0) <= 0.02


_RISES = ((1.0, 50.0), (2.0, 50.0), (5.0, 50.0), (1.0, 5.0))
_RISE_GAP = (
    "under 6 calls/s the probe is early calls (twice the pace) two units of 30 calls past "
    "the rate's return to its target (about 110 calls after a cut: 110 s at 1 call/s, 55 s "
    "at 2, 22 s at 5), and a rise is proven a few seconds into the probe that first meets "
    "it (not where an answer takes longer than an early call's interval, as at 5 calls/s and "
    "300 ms: the cubic climb as before); the cycle is what the budget leaves (2 %, or one "
    "refusal in 30 s; one unit put 2 calls/s at burst 2 over it). No controller "
    "within the budget meets 30 s from 1 call/s at every moment (one probe in 30 s at most, "
    "60 s at burst 1, before 10 s of growth to 45 calls/s). "
)
RISE_MISSED = {
    # (from, to, burst, latency): (proven, 0.9 of the new quota), seconds after the rise
    (1.0, 50.0, 1, 0.05): (137.9, 148.5),
    (1.0, 50.0, 2, 0.05): (117.7, 128.1),
    (1.0, 50.0, 10, 0.05): (95.4, 106.0),
    (1.0, 50.0, 1, 0.3): (140.2, 150.8),
    (2.0, 50.0, 1, 0.05): (61.2, 70.0),
    (2.0, 50.0, 2, 0.05): (48.1, 56.7),
    (2.0, 50.0, 1, 0.3): (62.4, 70.9),
    (1.0, 5.0, 1, 0.05): (137.9, 142.0),
    (1.0, 5.0, 2, 0.05): (117.7, 121.6),
    (1.0, 5.0, 10, 0.05): (95.4, 99.4),
    (1.0, 5.0, 1, 0.3): (140.2, 144.2),
}


def _rises() -> list[Any]:
    cells = []
    for (low, high), (burst, latency) in itertools.product(
        _RISES, ((1, 0.05), (2, 0.05), (10, 0.05), (1, 0.3))
    ):
        missed = RISE_MISSED.get((low, high, burst, latency))
        reason = (
            f"{_RISE_GAP}Proven {missed[0]:g} s after it, 0.9 of {high:g} at {missed[1]:g} s"
            if missed
            else None
        )
        name = f"q{low:g}-to-{high:g}-b{burst}-{latency * 1000:g}ms"
        cells.append(_cell(low, high, burst, latency, name=name, missed=reason))
    return cells


@pytest.mark.parametrize(("low", "high", "burst", "latency"), _rises())
def test_a_quota_that_rises_from_a_low_one_is_followed_within_thirty_seconds(
    low: float, high: float, burst: int, latency: float
) -> None:
    """``low`` calls/s for 60 s, then ``high``: some rate paced within 10 % of it by 30 s
    after (8 calls in flight at 50 ms, 32 at 300 ms, where 8 would allow only 27 calls/s).
    Once a probe proves the rise, the rate doubles every 2 s at most (``rise_interval``):
    doubling once a probe unit (30 s at 1 call/s) took 145 s from 1 call/s to 45."""
    concurrency = 8 if latency < 0.1 else 32
    run = simulate(lambda t: low if t < 60.0 else high, duration=90.0, burst=burst,
                   latency=latency, concurrency=concurrency)  # fmt: skip
    assert any(rate >= 0.9 * high for t, rate in run.rates if t >= 60.0)


def test_the_growth_after_a_rise_behind_a_sliding_window_is_not_the_fast_one() -> None:
    """A sliding window of 1 s, 50 calls/s, 20 from 30.2 s, 50 again from 60.2 s; latency
    drawn around 5 ms, calls leaving about 2 ms late (``bench_foreign_gateways.py``'s quota
    change, seed 2). The window's cut before the rise cost 8 refusals, a clump its count
    let through first, not a burst of 1's two (the refused call and the one after, its slot
    taken before the cut): doubling every second after the rise, the growth reached 68.9
    calls/s before its first refusal (59.1 doubling every unit of the probe), and 36 calls
    were refused from 2 s after the rise to 90 s (4.2 %), 19 now (2.3 %). The goal's 2 % is
    missed either way: the rise is proven 20 s after it (a known miss of that benchmark)."""
    draws, late = random.Random(102), random.Random(2)
    run = simulate(lambda t: 20.0 if 30.2 <= t < 60.2 else 50.0, duration=90.0,
                   concurrency=8, latency=lambda rate: draws.expovariate(1.0 / 0.005),
                   jitter=lambda: late.expovariate(500.0),
                   gateway=lambda quota, now: SlidingWindow(quota, now, span=1.0))  # fmt: skip
    assert run.refused_share(62.2, 90.0) <= 0.025
