"""``--rate auto``: the controller's arithmetic against a simulated quota, the limiter on
virtual time, and one real run against the simulator over loopback."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import replace

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import FakeClock, paced_sends, simulate
from worker.clock import MonotonicClock
from worker.pacing.adaptive import AdaptiveRateLimiter, SharedAdaptiveLimiter, build_limiter
from worker.pacing.bucket import LocalRateLimiter, RateLimiter
from worker.pacing.controller import AdaptiveConfig, Phase, RateController
from worker.pacing.slowdown import SlowingLimiter
from worker.simulator.quota import TokenBucket as ServerQuota
from worker.simulator.quota import retry_after_seconds

# --- the controller: known answers ---------------------------------------------------------


def _cruising(
    config: AdaptiveConfig | None = None, *, refused: float = math.inf, cut_at: float = -math.inf
) -> RateController:
    """A controller cruising at a level of 100 calls/s; by default nothing was ever refused,
    else ``refused`` calls/s was, at ``cut_at``."""
    ctrl = RateController(0.0, config)
    cruising = replace(ctrl.state, rate=100.0, level=100.0, phase=Phase.CRUISE)
    ctrl.restore(replace(cruising, refused=refused, cut_at=cut_at))
    return ctrl


def _send_while(ctrl: RateController, t: float, going: Callable[[float], bool]) -> float:
    """Calls start at the controller's rate from ``t`` while ``going(t)``; the time after."""
    while going(t):
        ctrl.on_sent(t)
        t += 1.0 / ctrl.rate_at(t)
    return t


def test_startup_doubles_every_interval_while_calls_succeed() -> None:
    ctrl = RateController(0.0, AdaptiveConfig(initial_rate=2.0, startup_interval=1.0))
    t = 0.0
    while t < 3.0:  # sending as fast as allowed, so the "twice what we send" cap never binds
        ctrl.on_sent(t)
        t += 1.0 / ctrl.rate_at(t)
        ctrl.on_success(t, 0.001)
    assert ctrl.rate_at(3.0) == pytest.approx(16.0, rel=0.15)
    assert ctrl.state.phase is Phase.STARTUP


def test_startup_never_grows_past_twice_what_is_really_sent() -> None:
    """A worker held back by its concurrency must not talk itself into a rate it never uses."""
    ctrl = RateController(0.0)
    for i in range(200):  # 5 calls/s, whatever the rate allows
        ctrl.on_sent(i / 5)
        ctrl.on_success(i / 5 + 0.01, 0.01)
    assert ctrl.rate <= 2 * (5 + 1) + 1e-9  # one call more than counted: see rate_at


def test_first_throttle_ends_startup_just_under_the_refused_rate() -> None:
    ctrl = RateController(0.0)
    ctrl.restore(replace(ctrl.state, rate=100.0, level=100.0))
    rate = ctrl.on_throttle(1.0, retry_after=None, latency=0.001)
    assert rate == pytest.approx(95.0)
    assert ctrl.state.phase is Phase.CRUISE


def test_retry_after_pauses_every_call_and_old_news_is_ignored() -> None:
    ctrl = RateController(0.0)
    ctrl.restore(replace(ctrl.state, rate=100.0, level=100.0))
    ctrl.on_throttle(10.0, retry_after=2.0, latency=0.01)
    assert ctrl.pause_until() == 12.0
    level = ctrl.rate
    # A 429 for a call sent before that cut says nothing new: no second cut.
    assert ctrl.on_throttle(10.005, retry_after=None, latency=0.5) == level
    assert ctrl.rate_at(11.0) == level  # no growth during the pause


def test_refused_probe_keeps_the_level_and_probes_less_often() -> None:
    ctrl = _cruising(AdaptiveConfig(hold=5.0, hold_growth=3.0, step=0.03, probe_time=2.0))
    for t in range(1, 7):
        ctrl.on_sent(float(t))
        for k in range(100):
            ctrl.on_sent(t + k / 100)
    assert ctrl.rate_at(5.5) == pytest.approx(103.0)  # probing 3 % above the level
    assert ctrl.state.phase is Phase.PROBE
    assert ctrl.on_throttle(6.0, None, 0.001) == 100.0
    assert ctrl.state.hold == 15.0
    assert ctrl.state.step == pytest.approx(0.015)  # next time half as far: closing in


def test_a_refused_probe_pauses_nothing_but_a_refusal_at_the_level_pauses_every_call() -> None:
    """The level under a probe was being accepted: calls go back to it at once. A refusal
    at the level is the quota falling (or a burst hiding an overshoot): everyone waits."""
    ctrl = _cruising(AdaptiveConfig(hold=5.0, step=0.03, probe_time=2.0))
    _send_while(ctrl, 0.0, lambda t: t < 6.0)
    assert ctrl.rate_at(5.5) == pytest.approx(103.0)
    assert ctrl.on_throttle(6.0, retry_after=1.0, latency=0.001) == 100.0
    assert ctrl.pause_until() < 6.0
    assert ctrl.rate_at(6.001) == 100.0
    # The same probe's other refused calls, answered later, are old news: still no pause.
    ctrl.on_throttle(6.01, retry_after=1.0, latency=0.02)
    assert ctrl.pause_until() < 6.0 and ctrl.rate == 100.0
    # Refused at the level, while cruising: step down, and every call waits.
    assert ctrl.on_throttle(20.0, retry_after=1.0, latency=0.001) == pytest.approx(97.0)
    assert ctrl.pause_until() == 21.0


def test_a_refusal_soon_after_a_refused_probe_measures_the_quota() -> None:
    """A refused probe empties the server's bucket, and paused nobody: at the level since,
    the next refusal comes when the server has accepted its quota's worth and not one call
    more. So the level goes just under what it accepted (every call sent since the cut but
    this one), with no pause; never further than the cut in a row would have gone."""
    ctrl = _cruising(AdaptiveConfig(hold=5.0, step=0.03, probe_time=2.0))
    _send_while(ctrl, 0.0, lambda t: t < 6.0)
    ctrl.rate_at(5.5)  # probing at 103
    assert ctrl.on_throttle(6.0, retry_after=1.0, latency=0.001) == 100.0
    # 2 s at 100 calls/s, and one refused: the server accepts 99.5 calls/s.
    assert ctrl.on_throttle(8.001, retry_after=1.0, latency=0.001) == pytest.approx(0.97 * 99.5)
    assert ctrl.pause_until() < 8.0
    # Again 0.1 s later: the same measure over a shorter time, (96.5 * 0.1 - 1) / 0.1.
    level = ctrl.rate
    assert ctrl.on_throttle(8.102, retry_after=1.0, latency=0.001) == pytest.approx(
        0.97 * (level - 10.0)
    )
    assert ctrl.pause_until() < 8.0
    # Again at once: a measure over 1 ms says nothing. The cut in a row, and a pause.
    level = ctrl.rate
    cut = ctrl.on_throttle(8.104, retry_after=1.0, latency=0.001)
    assert cut == pytest.approx(0.85**3 * level)
    assert ctrl.pause_until() == pytest.approx(9.104)


def test_a_controller_that_sees_only_its_share_of_refusals_does_not_measure() -> None:
    """Replicas sharing a rate each see only their own refusals: the time between two of
    them says too little about the server, so such a controller (``shared``, as
    ``SharedAdaptiveLimiter`` builds it) cuts in a row and pauses, as before."""
    ctrl = _cruising(AdaptiveConfig(hold=5.0, step=0.03, probe_time=2.0, shared=True))
    _send_while(ctrl, 0.0, lambda t: t < 6.0)
    ctrl.rate_at(5.5)
    assert ctrl.on_throttle(6.0, retry_after=1.0, latency=0.001) == 100.0
    assert ctrl.on_throttle(8.001, retry_after=1.0, latency=0.001) == pytest.approx(85.0)
    assert ctrl.pause_until() == pytest.approx(9.001)


def test_a_raised_level_is_provisional_until_a_whole_cruise_has_passed_at_it() -> None:
    """A server's burst can hide a probe's small overshoot until after the probe passed: a
    refusal before the next probe is the probe's, and goes back to the level under it with
    no pause. Once a whole cruise has passed at the raised level, it is the level."""
    config = AdaptiveConfig(hold=1.0, step=0.03, probe_time=1.0, hold_growth=3.0)
    # A refusal remembered (110 calls/s): the probes cruise between them.
    ctrl = _cruising(config, refused=110.0, cut_at=0.0)
    t = _send_while(ctrl, 0.0, lambda t: t < 2.5)
    assert ctrl.state.level == pytest.approx(103.0)  # the probe (1 s to 2 s) passed
    assert ctrl.state.provisional
    assert ctrl.on_throttle(t, retry_after=1.0, latency=0.001) == pytest.approx(100.0)
    assert ctrl.pause_until() < t  # no pause: the level under it was never in doubt
    assert ctrl.state.hold == 3.0  # probed less often, as after a refused probe
    assert not ctrl.state.provisional

    ctrl = _cruising(config, refused=110.0, cut_at=0.0)
    t = _send_while(  # to the next probe
        ctrl, 0.0, lambda t: ctrl.state.phase is not Phase.PROBE or ctrl.state.level < 103.0
    )
    assert not ctrl.state.provisional  # 103 held for a whole cruise
    ctrl.restore(replace(ctrl.state, phase=Phase.CRUISE, rate=103.0, since=t))
    assert ctrl.on_throttle(t, retry_after=1.0, latency=0.001) == pytest.approx(0.97 * 103.0)
    assert ctrl.pause_until() == pytest.approx(t + 1.0)  # a refusal at the level: everyone


def test_a_passed_probe_raises_the_level_and_the_next_step() -> None:
    """Under a refusal still remembered, the next probe comes after a cruise."""
    ctrl = _cruising(AdaptiveConfig(hold=1.0, step=0.03, probe_time=1.0), refused=110.0,
                     cut_at=0.0)  # fmt: skip
    _send_while(ctrl, 0.0, lambda t: t < 3.5)
    assert ctrl.state.level == pytest.approx(103.0)
    assert ctrl.state.step == pytest.approx(0.06)
    assert ctrl.state.since > 2.9  # the next probe began after a cruise (1 s) at 103


def test_with_no_refusal_remembered_passed_probes_follow_each_other() -> None:
    """Nothing refused for ``max_hold``, or ever: the quota may be far above. Each passed
    probe is followed at once by one twice as high, until one is refused."""
    ctrl = _cruising(AdaptiveConfig(hold=1.0, step=0.03, probe_time=1.0))
    # A cruise (1 s), then probes of 1 s each: 3, 6 and 12 % up.
    _send_while(ctrl, 0.0, lambda t: t < 4.5)
    assert ctrl.state.phase is Phase.PROBE
    assert ctrl.state.level == pytest.approx(100.0 * 1.03 * 1.06 * 1.12)


def test_a_refusal_of_a_call_sent_before_a_probe_began_is_not_that_probes() -> None:
    """A probe passes a rate once refused (the quota rose): its rate becomes the level and
    the next probe starts at once. Then a refusal arrives for a call the passed probe
    sent. It refuses that probe's rate, now the provisional level: back to the level
    under it, not a refusal of the new probe that leaves the refused rate standing."""
    ctrl = RateController(0.0)
    ctrl.restore(replace(ctrl.state, rate=10.3, level=10.0, phase=Phase.PROBE, since=0.0,
                         cut_at=0.0, refused=10.2))  # fmt: skip
    ctrl.rate_at(2.5)  # the probe (2 s) passed 10.2: the next one follows at once
    assert ctrl.state.phase is Phase.PROBE and ctrl.state.level == pytest.approx(10.3)
    ctrl.on_throttle(2.6, retry_after=1.0, latency=0.7)  # sent at 1.9, by the passed probe
    assert ctrl.state.level == pytest.approx(10.0)
    assert ctrl.pause_until() < 2.6  # a refused probe: nobody waits but the refused call


def test_a_probe_rises_at_most_twice_as_far_as_the_last_one_went() -> None:
    """Probes kept under halfway to a refusal go up by 1-2 %; once that refusal is
    forgotten (``max_hold``), the next probe doubles the last height, not a step that
    kept doubling unseen behind the cap (it reached +96 %: twice the quota at once)."""
    quota = 500.0
    run = simulate(lambda t: quota, duration=120.0, burst=50)
    assert max(rate for t, rate in run.rates if t >= 20.0) <= 1.15 * quota
    assert run.accepted_per_s(40.0, 120.0) >= 0.93 * quota


def test_probes_under_one_call_per_second() -> None:
    """Below one call per ``window`` a window just before a send holds no call; the check
    that calls really go out at the level must span a few calls, or it never probes."""
    run = simulate(lambda t: 1.0, duration=120.0, burst=5)
    assert run.accepted_per_s(40.0, 120.0) >= 0.9


def test_close_under_a_refusal_the_probe_goes_just_past_it() -> None:
    """Halving a gap of 1 % gains little: the probe tests the refused rate itself. Refused,
    the refusal stands (not the probe's higher rate); passed, the quota has risen, and the
    probes that follow come at once."""
    config = AdaptiveConfig(hold=1.0, step=0.03, probe_time=1.0)
    ctrl = _cruising(config, refused=101.0, cut_at=0.0)
    t = _send_while(ctrl, 0.0, lambda t: ctrl.state.phase is not Phase.PROBE)
    assert ctrl.rate == pytest.approx(101.0 * 1.01)
    probing = ctrl.state

    ctrl.on_throttle(t + 0.01, retry_after=1.0, latency=0.005)
    assert ctrl.state.level == 100.0
    assert ctrl.state.refused == 101.0

    ctrl = RateController(0.0, config)
    ctrl.restore(probing)
    _send_while(ctrl, t, lambda t: t < probing.since + 1.5)  # the probe (1 s) passes
    assert ctrl.state.level == pytest.approx(101.0 * 1.01)
    assert ctrl.state.phase is Phase.PROBE  # the next one at once: the quota rose


def test_503s_that_are_a_share_of_the_answers_cut_like_a_throttle_without_a_pause() -> None:
    """Ten 503s in the last fifty answers: the service is overloaded."""
    ctrl = _cruising()
    t = 1.0
    for _ in range(40):
        t += 0.01
        ctrl.on_success(t, latency=0.01)
    rates = []
    for _ in range(10):
        t += 0.01
        rates.append(ctrl.on_overload(t, latency=0.01))
    assert rates[:9] == [100.0] * 9
    assert rates[9] == pytest.approx(97.0)
    assert ctrl.pause_until() < 1.0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_503s_at_a_steady_rate_are_faults_not_overload(seed: int) -> None:
    """2 % of the answers 503 at random: the rate stays (each used to cut it, and held
    ``--rate auto`` near 11 calls/s)."""
    rng = random.Random(seed)
    ctrl = _cruising()
    t, rates = 1.0, []
    for _ in range(20_000):
        t += 0.01
        if rng.random() < 0.02:
            rates.append(ctrl.on_overload(t, latency=0.01))
        else:
            rates.append(ctrl.on_success(t, latency=0.01))
    assert statistics.fmean(rates) >= 95.0
    assert min(rates) >= 85.0


def test_refusals_at_the_level_step_down_once_then_cut_harder_each_time_in_a_row() -> None:
    """The first refusal at a level that held is most often a hair's overshoot a server's
    burst hid: 3 % down. More in a row mean the quota fell: 0.85, 0.85², ... each pausing
    every call for the Retry-After."""
    ctrl = _cruising(AdaptiveConfig(hold=5.0, step=0.03, beta=0.85))
    assert ctrl.on_throttle(10.0, retry_after=1.0, latency=0.001) == pytest.approx(97.0)
    assert ctrl.pause_until() == 11.0
    assert ctrl.on_throttle(12.0, retry_after=1.0, latency=0.001) == pytest.approx(82.45)
    assert ctrl.on_throttle(14.0, retry_after=1.0, latency=0.001) == pytest.approx(0.85**2 * 82.45)
    assert ctrl.pause_until() == 15.0
    # A refusal after a quiet hold is a first one again.
    level = ctrl.state.level
    assert ctrl.on_throttle(30.0, retry_after=1.0, latency=0.001) == pytest.approx(0.97 * level)


@pytest.mark.parametrize(("level", "hold"), [(100.0, 2.0), (10.0, 4.851), (2.0, 5.0)])
def test_after_a_cut_in_a_row_the_climb_back_starts_soon(level: float, hold: float) -> None:
    """A cut in a row leaves the level well under the rate refused: the cruise before the
    next probe is ``rebound_hold`` (2 s), or long enough for ``rebound_calls`` (40) at the
    new level, but never longer than ``hold`` (5 s)."""
    ctrl = RateController(0.0)
    ctrl.restore(replace(ctrl.state, rate=level, level=level, phase=Phase.CRUISE))
    ctrl.on_throttle(10.0, retry_after=1.0, latency=0.001)  # at the level: 3 % down, a pause
    assert ctrl.state.hold == 5.0
    ctrl.on_throttle(11.5, retry_after=1.0, latency=0.001)  # again, after the pause: 0.85
    assert ctrl.rate == pytest.approx(0.97 * 0.85 * level)
    assert ctrl.state.hold == pytest.approx(hold, rel=1e-3)


def test_a_sustained_rise_of_latency_cuts_but_one_slow_call_or_window_does_not() -> None:
    """The baseline learnt at 50 calls/s; at 100 (a probe passed, say) latency rises."""
    ctrl = _cruising(AdaptiveConfig(latency_samples=10, latency_factor=1.4, latency_floor_s=0.05))
    ctrl.restore(replace(ctrl.state, rate=50.0, level=50.0))
    t = 1.0

    def answers(latencies: list[float]) -> None:
        nonlocal t
        for latency in latencies:
            t += 0.01
            ctrl.on_success(t, latency)

    answers([0.01] * 30)  # the baseline: three windows
    ctrl.restore(replace(ctrl.state, rate=100.0, level=100.0))
    answers([0.01] * 9 + [2.0])  # one GC pause
    answers([0.2] * 10)  # one slow window, then back to usual
    answers([0.01] * 10)
    assert ctrl.rate == 100.0
    answers([0.2] * 20)  # two in a row
    assert ctrl.rate < 100.0


def _exponential(rng: random.Random, mean: float) -> Callable[[float], float]:
    return lambda rate: rng.expovariate(1.0 / mean)


def _bimodal(rng: random.Random) -> Callable[[float], float]:
    """Half the calls fast (jobs already deleted), half slow (real deletes): the median of
    any window of them lands in one mode or the other by chance."""
    return lambda rate: rng.uniform(0.005, 0.02) if rng.random() < 0.5 else rng.uniform(0.3, 0.6)


_STEADY_LATENCIES: dict[str, Callable[[random.Random], Callable[[float], float]]] = {
    "exponential 200 ms": lambda rng: _exponential(rng, 0.2),
    "exponential 2 s": lambda rng: _exponential(rng, 2.0),
    "bimodal 10 ms / 450 ms": _bimodal,
}


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("spread", list(_STEADY_LATENCIES))
def test_a_wide_but_steady_latency_never_cuts_the_rate(spread: str, seed: int) -> None:
    """Latencies drawn from one distribution however wide, and nothing ever refused: the
    rate never falls, over a quarter of an hour. (Measured against the fastest call seen,
    such latencies looked like a rise every 50 calls, and the rate sank to 4 calls/s.)"""
    rng = random.Random(seed)
    ctrl = RateController(0.0, AdaptiveConfig(max_rate=100.0))
    run = simulate(lambda t: 1e6, duration=900.0, latency=_STEADY_LATENCIES[spread](rng),
                   concurrency=10_000, controller=ctrl)  # fmt: skip
    rates = [rate for _, rate in run.rates]
    assert all(b >= a for a, b in itertools.pairwise(rates))
    assert rates[-1] == 100.0


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("spread", list(_STEADY_LATENCIES))
def test_a_wide_but_steady_latency_leaves_the_quota_in_use(spread: str, seed: int) -> None:
    """The QA run: quota 50 calls/s (burst 5), answers that take 200 ms on average, and
    ``--rate auto`` sank 34 -> 17 -> 12 -> 9.5 -> 7.5 calls/s in 40 s. Over ten minutes of
    such answers, every minute after the first uses nearly all of the quota."""
    rng = random.Random(seed)
    quota = 50.0
    run = simulate(lambda t: quota, duration=600.0, burst=5,
                   latency=_STEADY_LATENCIES[spread](rng), concurrency=1_000)  # fmt: skip
    for start in range(60, 600, 60):
        assert run.accepted_per_s(start, start + 60) >= 0.85 * quota
    assert run.accepted_per_s(60.0, 600.0) >= 0.95 * quota
    assert run.refused_share(60.0, 600.0) <= 0.02


@pytest.mark.parametrize("seed", [1, 2])
def test_latency_that_doubles_past_the_servers_capacity_keeps_the_rate_under_it(
    seed: int,
) -> None:
    """No quota, but a server that slows down past 40 calls/s: its answers take twice as
    long (exponential, 200 ms then 400 ms) once calls come faster. Cruising at 20 calls/s,
    the probes climb past 40: the rise cuts, and cuts again while it lasts; the rate keeps
    close under the capacity, probing past it now and then, where without the signal it
    would climb to ``max_rate``."""
    rng = random.Random(seed)
    capacity = 40.0

    def latency(rate: float) -> float:
        return rng.expovariate(1.0 / (0.2 if rate <= capacity else 0.4))

    ctrl = _cruising(AdaptiveConfig(max_rate=1_000.0))
    ctrl.restore(replace(ctrl.state, rate=20.0, level=20.0))
    run = simulate(lambda t: 1e6, duration=600.0, latency=latency, concurrency=10_000,
                   controller=ctrl)  # fmt: skip
    late = [rate for t, rate in run.rates if t >= 120.0]
    assert statistics.median(late) <= 1.02 * capacity
    assert run.accepted_per_s(120.0, 600.0) >= 0.8 * capacity
    assert sum(rate > 1.2 * capacity for rate in late) <= 0.05 * len(late)


def test_latency_that_stays_high_at_a_rate_once_calm_is_learnt_not_cut() -> None:
    """The server slows down for its own reasons while the rate holds at a level that had
    the usual latency: cutting would not cure it. The higher latency becomes the baseline
    and the rate stands."""
    config = AdaptiveConfig(latency_samples=10, latency_factor=1.4, latency_floor_s=0.05)
    ctrl = _cruising(config)
    for i in range(200):  # calm, then slow from the 100th answer on, all at the level
        ctrl.on_success(1.0 + i / 100, 0.01 if i < 100 else 0.3)
    assert ctrl.rate == 100.0


def test_state_is_a_value_another_controller_can_adopt() -> None:
    """What replicas sharing a rate through Redis would store and load."""
    one = RateController(0.0)
    run = simulate(lambda t: 50.0, duration=15.0, controller=one)
    assert run.refused
    other = RateController(15.0)
    other.restore(one.state)
    assert other.rate == one.rate and other.state == one.state
    with pytest.raises(AttributeError):
        one.state.rate = 1.0  # type: ignore[misc]


_ANSWERS = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=3, allow_nan=False),  # seconds of sending at the rate
        st.sampled_from(["ok", "429", "429", "503"]),  # then an answer
        st.one_of(st.none(), st.floats(min_value=0, max_value=2, allow_nan=False)),  # latency
        st.sampled_from([None, 0.0, 1.0, 2.0, 60.0]),  # Retry-After
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(answers=_ANSWERS, shared=st.booleans())
def test_whatever_the_answers_the_rate_stays_in_bounds_and_moves_the_right_way(
    answers: list[tuple[float, str, float | None, float | None]], shared: bool
) -> None:
    """Calls sent at the rate, and answers in any order: the rate stays finite, within
    ``min_rate`` and ``max_rate``; between refusals it never falls; a 429 or a 503 never
    raises it; no pause outlasts ``max_pause``."""
    ctrl = RateController(0.0, AdaptiveConfig(max_rate=100.0, shared=shared))
    c = ctrl.config
    now, last = 0.0, ctrl.rate
    for gap, kind, latency, retry_after in answers:
        end = now + gap
        while now < end:  # the worker sends at the rate; a pause holds it back
            now = max(now, ctrl.pause_until())
            rate = ctrl.rate_at(now)
            assert rate >= last  # no refusal since the last look
            last = rate
            ctrl.on_sent(now)
            now += 1.0 / rate
        before = ctrl.rate_at(now)
        assert before >= last
        if kind == "ok":
            after = ctrl.on_success(now)  # no latency given: no latency signal either
            assert after >= before
        else:
            if kind == "429":
                after = ctrl.on_throttle(now, retry_after, latency)
            else:
                after = ctrl.on_overload(now, latency)
            assert after <= before
        assert math.isfinite(after) and c.min_rate <= after <= c.max_rate
        assert ctrl.pause_until() <= now + c.max_pause
        last = after


# --- the controller against a simulated quota ---------------------------------------------


@pytest.mark.parametrize("quota", [5.0, 50.0, 500.0])
def test_converges_to_the_quota_and_stays_under_it(quota: float) -> None:
    ctrl = RateController(0.0)
    run = simulate(lambda t: quota, duration=40.0, burst=2, controller=ctrl)
    assert 0.8 * quota <= run.accepted_per_s(10.0, 40.0) <= quota * 1.01
    assert run.refused_share(10.0, 40.0) <= 0.02
    # Within a probe's resolution: a probe less than ``min_step`` over the quota can pass
    # while the server's burst absorbs its overshoot; the next refusal at the level finds
    # it out (the accepted rate above stays under the quota all the same).
    assert 0.85 * quota <= ctrl.state.level <= quota * (1 + ctrl.config.min_step)


def test_recovers_when_the_quota_rises() -> None:
    """At most ``max_hold`` (30 s) passes before the next probe sees the room above."""
    run = simulate(lambda t: 20.0 if t < 20 else 50.0, duration=90.0, burst=2)
    assert run.accepted_per_s(5.0, 20.0) <= 20.0 * 1.01
    assert run.accepted_per_s(70.0, 90.0) >= 0.85 * 50.0
    assert run.refused_share(70.0, 90.0) <= 0.02


def test_stays_stable_when_the_quota_falls() -> None:
    ctrl = RateController(0.0)
    run = simulate(lambda t: 50.0 if t < 20 else 20.0, duration=60.0, burst=2, controller=ctrl)
    assert run.accepted_per_s(40.0, 60.0) >= 0.85 * 20.0
    assert run.refused_share(40.0, 60.0) <= 0.02
    assert ctrl.state.level <= 20.0 * (1 + ctrl.config.min_step)  # a probe's resolution


def test_a_burst_hiding_the_overshoot_costs_throttles_but_not_stability() -> None:
    """A server bucket of 10 % of the quota lets an overshoot pass for a while."""
    run = simulate(lambda t: 100.0, duration=60.0, burst=10)
    assert run.accepted_per_s(20.0, 60.0) >= 0.85 * 100.0
    assert run.refused_share(20.0, 60.0) <= 0.02


# --- the limiter on virtual time ----------------------------------------------------------


@pytest.mark.anyio
async def test_a_rate_increase_reaches_callers_already_queued() -> None:
    """Slots handed out at 2 calls/s to eight waiters must not hold growth back for 4 s."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(clock)
    sends = await paced_sends(limiter, clock, until=5.0, workers=8, latency=0.002)
    in_last_second = sum(4.0 <= t < 5.0 for t in sends)
    assert in_last_second >= 40  # 2 calls/s doubling every 0.75 s, minus the cap's lag
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert min(gaps) > 0  # burst 1: never two calls at the same instant


@pytest.mark.anyio
async def test_a_cut_respaces_the_queue_and_retry_after_holds_every_call() -> None:
    clock = FakeClock()
    controller = RateController(clock.now())
    controller.restore(replace(controller.state, rate=100.0, level=100.0, phase=Phase.CRUISE))
    limiter = AdaptiveRateLimiter(clock, controller=controller)
    sends: list[float] = []

    async def worker() -> None:
        for _ in range(5):
            await limiter.acquire()
            sends.append(clock.now())

    limiter.feedback(throttled=True, latency_s=0.0, retry_after=1.0)
    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(worker)
    assert min(sends) >= 1.0  # nobody started during the Retry-After pause
    spacing = 1.0 / limiter.rate
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert all(gap >= spacing - 1e-9 for gap in gaps)
    assert "throttles=1" in repr(limiter)


def test_build_limiter_gives_a_fixed_or_an_adaptive_limiter() -> None:
    clock = FakeClock()
    fixed = build_limiter(25.0, 5, clock)
    assert isinstance(fixed, SlowingLimiter) and fixed.rate == 25.0
    assert "LocalRateLimiter(rate=25, burst=5" in repr(fixed)
    auto = build_limiter("auto", 5, clock)
    assert isinstance(auto, AdaptiveRateLimiter) and isinstance(auto, RateLimiter)
    assert auto.rate == AdaptiveConfig().initial_rate


@pytest.mark.anyio
@pytest.mark.parametrize("max_retry_after", [2.0, 45.0])
async def test_auto_pauses_no_longer_than_max_retry_after(max_retry_after: float) -> None:
    """``--max-retry-after`` caps the pause a ``Retry-After`` puts on every call, as it caps
    the refused call's own wait (``RetryPolicy``): one 429 saying ``Retry-After: 3000``
    must not stop a run told ``--max-retry-after 2`` for longer than 2 s, and a cap above
    the controller's own default (30 s) is the one honoured."""
    from worker import wiring
    from worker.settings import Settings

    clock = FakeClock()
    limiter = wiring.limiter(Settings(rate="auto", max_retry_after=max_retry_after), clock)
    assert isinstance(limiter, AdaptiveRateLimiter)
    limiter.feedback(throttled=True, latency_s=0.0, retry_after=3000.0)
    await limiter.acquire()
    assert clock.now() == pytest.approx(max_retry_after)


# --- one real run over loopback -----------------------------------------------------------


@pytest.mark.anyio
async def test_finds_the_simulators_quota_over_real_http() -> None:
    """Against the simulator (quota 20 calls/s), ``--rate auto`` leaves startup at its
    first 429, and a few seconds later the server accepts nearly the quota and refuses
    at most one call a second."""
    from tests.benchmarks.harness import AK, PROJECT, SK, NullJournal
    from worker.api.client import ApiClient
    from worker.api.credentials import Credentials, StaticCredentials
    from worker.api.session import make_session
    from worker.batcher import DeletionBudget
    from worker.dispatcher import Dispatcher
    from worker.pacing.retry import RetryPolicy
    from worker.simulator import SimulatorConfig, run_simulator
    from worker.types import Batch

    clock = MonotonicClock()
    config = SimulatorConfig(project_id=PROJECT, ak=AK, sk=SK, jobs=400, quota=20, burst=2)
    async with run_simulator(config) as sim:
        controller = RateController(clock.now())
        limiter = AdaptiveRateLimiter(clock, controller=controller)
        session = make_session(concurrency=4, connect_timeout=5, read_timeout=5)
        try:
            client = ApiClient(
                session=session,
                endpoint=sim.url,
                project_id=PROJECT,
                credentials=StaticCredentials(Credentials(ak=AK, sk=SK)),
            )
            dispatcher = Dispatcher(
                transport=client,
                limiter=limiter,
                policy=RetryPolicy(max_attempts=3, max_throttled=100),
                journal=NullJournal(),
                clock=clock,
                budget=DeletionBudget(None),
                max_attempts=3,
            )
            ids = sim.job_ids()
            batches = iter(Batch(f"b{i}", (job,)) for i, job in enumerate(ids))

            async def worker() -> None:
                for batch in batches:
                    await dispatcher.process(batch)

            seen: list[tuple[int, int]] = []

            async def watch() -> None:
                await anyio.sleep(5.0)
                seen.append((sim.stats.calls, sim.stats.throttled))

            with anyio.move_on_after(8.0):
                async with anyio.create_task_group() as group:
                    group.start_soon(watch)
                    for _ in range(4):
                        group.start_soon(worker)
        finally:
            await session.close()
        state = controller.state
        assert limiter.throttles >= 1 and sim.stats.throttled >= 1
        assert state.phase is not Phase.STARTUP and not math.isinf(state.cut_at)
        calls, throttled = seen[0]
        late_ok = (sim.stats.calls - calls) - (sim.stats.throttled - throttled)
        assert 0.4 * 20 * 3 <= late_ok <= 20 * 3 + 2  # the last 3 s: under the quota
        assert sim.stats.throttled - throttled <= 3


# --- replicas sharing one quota -----------------------------------------------------------


@pytest.mark.anyio
async def test_replicas_sharing_a_bucket_find_the_quota_together() -> None:
    """Three replicas, each with its own controller, pacing through one shared bucket (a
    ``LocalRateLimiter`` standing in for ``RedisRateLimiter``): the fleet, not each
    replica, converges on the server's 40 calls/s."""
    clock = FakeClock()
    shared = LocalRateLimiter(rate=2.0, burst=1, clock=clock)
    replicas = [SharedAdaptiveLimiter(shared, clock) for _ in range(3)]
    server = ServerQuota(40.0, 2, 0.0)
    ok: list[float] = []
    refused: list[float] = []

    async def worker(limiter: SharedAdaptiveLimiter) -> None:
        while clock.now() < 60.0:
            await limiter.acquire()
            sent = clock.now()
            wait = server.try_acquire(sent)
            await clock.sleep(0.005)
            if wait > 0:
                refused.append(sent)
                limiter.feedback(
                    throttled=True, latency_s=0.005, retry_after=retry_after_seconds(wait)
                )
            else:
                ok.append(sent)
                limiter.feedback(throttled=False, latency_s=0.005)

    async with anyio.create_task_group() as group:
        for limiter in replicas:
            for _ in range(3):
                group.start_soon(worker, limiter)
    late_ok = sum(30.0 <= t < 60.0 for t in ok) / 30.0
    late_refused = sum(30.0 <= t < 60.0 for t in refused)
    assert 0.8 * 40.0 <= late_ok <= 40.0 * 1.01
    assert late_refused <= 0.02 * late_ok * 30.0
    assert all(r.controller.state.phase is not Phase.STARTUP for r in replicas)
    assert "SharedAdaptiveLimiter(" in repr(replicas[0])


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("step", 1.0, "step < 1"),
        ("beta", 1.0, "0 < beta < 1"),
        ("hold", 0.0, "hold must be"),
        ("initial_rate", math.inf, "initial_rate must be"),
        ("min_rate", 5.0, "min_rate <= initial_rate"),
    ],
)
def test_a_config_the_arithmetic_cannot_work_with_is_refused(
    field: str, value: float, says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        AdaptiveConfig(**{field: value})  # type: ignore[arg-type]
