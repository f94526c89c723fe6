"""The benchmark's peers are ports of other projects' controllers; a port that drifted from
its original would make ``--rate auto`` look better (or worse) than it is. These pin each
port's arithmetic to its original's, and run the rclone port under the limiter the
benchmark runs it under, on virtual time."""

from __future__ import annotations

import itertools
import math

import pytest

from tests.benchmarks.harness import BotocoreCubic, RclonePacer
from tests.fakes import FakeClock, paced_sends
from worker.pacing.adaptive import AdaptiveRateLimiter


def test_rclone_pacer_starts_at_its_minimum_sleep_and_never_decays_below_it() -> None:
    pacer = RclonePacer()  # rclone's defaults: 10 ms, 2 s, decay 2, attack 1
    assert pacer.sleep == 0.010
    assert pacer.rate == pytest.approx(100.0)
    for _ in range(5):
        pacer.on_success(0.0)
    assert pacer.sleep == 0.010


def test_rclone_pacer_doubles_on_a_retry_up_to_its_maximum_and_decays_by_a_quarter() -> None:
    pacer = RclonePacer(honour_retry_after=False)
    pacer.on_throttle(0.0, retry_after=1.0)  # ignored: this backend does not pass it on
    assert pacer.sleep == pytest.approx(0.020)
    pacer.on_overload(0.0)  # a 503 is a retry too
    assert pacer.sleep == pytest.approx(0.040)
    pacer.on_success(0.0)
    assert pacer.sleep == pytest.approx(0.030)  # (t << 2 - t) >> 2
    for _ in range(20):
        pacer.on_throttle(0.0)
    assert pacer.sleep == 2.0


def test_rclone_pacer_takes_retry_after_as_its_sleep_and_at_least_its_minimum() -> None:
    pacer = RclonePacer()
    pacer.on_throttle(0.0, retry_after=1.0)
    assert pacer.rate == pytest.approx(1.0)
    for _ in range(3):
        pacer.on_success(0.0)
    assert pacer.sleep == pytest.approx(0.75**3)
    pacer.on_throttle(0.0, retry_after=0.0)
    assert pacer.sleep == 0.010


def test_rclone_pacer_has_a_custom_attack_and_decay() -> None:
    pacer = RclonePacer(min_sleep=0.1, decay=1, attack=2)
    pacer.on_throttle(0.0)
    assert pacer.sleep == pytest.approx(0.1 * 4 / 3)
    pacer.on_success(0.0)
    assert pacer.sleep == pytest.approx(0.1)  # halved, then floored at min_sleep
    no_attack = RclonePacer(attack=0)
    no_attack.on_throttle(0.0)
    assert no_attack.sleep == 2.0  # rclone: attack 0 jumps straight to max_sleep


@pytest.mark.anyio
async def test_rclone_pacer_under_the_limiter_spaces_calls_by_its_sleep() -> None:
    """As rclone's pacer token does: the starts of calls are ``sleep`` apart, burst 1."""
    clock = FakeClock()
    pacer = RclonePacer(min_sleep=0.050)
    limiter = AdaptiveRateLimiter(clock, controller=pacer)
    sends = await paced_sends(limiter, clock, until=2.0, workers=4, latency=0.001)
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert min(gaps) == pytest.approx(0.050)
    assert sum(t < 2.0 for t in sends) == 40  # 20 calls/s for 2 s, though 4 workers are ready


def test_botocore_port_is_unlimited_until_its_first_throttle_then_cuts_to_0_7() -> None:
    cubic = BotocoreCubic(0.0)
    assert cubic.on_success(0.1) == BotocoreCubic.UNLIMITED
    for step in range(1, 41):  # 40 calls/s measured over two 0.5 s buckets
        cubic.on_success(step / 40)
    assert cubic.measured == pytest.approx(40.0, rel=0.1)
    rate = cubic.on_throttle(1.0)
    assert rate == pytest.approx(0.7 * cubic.last_max_rate)
    assert cubic.last_max_rate == pytest.approx(cubic.measured)
    # CUBIC regrows to the rate it was cut from k seconds after the cut, while calls go on
    # at 40/s (its cap is twice the rate measured).
    assert cubic.k == pytest.approx((cubic.last_max_rate * 0.3 / 0.4) ** (1 / 3))
    now = 1.0
    while now < 1.0 + cubic.k:
        now += 1 / 40
        rate = cubic.on_success(now)
    assert math.isclose(rate, cubic.last_max_rate, rel_tol=0.02)
    assert rate < 2 * cubic.measured
