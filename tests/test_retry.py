"""The retry policy decides by error type; delays are full jitter or the server's hint."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.errors import (
    ApiError,
    ApiTimeout,
    AuthError,
    ClientError,
    ConfigError,
    MalformedResponse,
    NetworkError,
    NotFound,
    ServerError,
    ThrottledError,
    TlsError,
    TransientError,
)
from worker.pacing.retry import RetryDecision, RetryPolicy, full_jitter


class _Top:
    """A Random whose ``uniform`` always returns the top of the range: pins the ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _policy(**kw: object) -> RetryPolicy:
    kw.setdefault("max_attempts", 5)
    kw.setdefault("rng", _Top())
    return RetryPolicy(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ServerError("502", http_status=502), "server_error"),
        (NetworkError("reset"), "network"),
        (ApiTimeout("read timeout"), "timeout"),
        (MalformedResponse("cut short", http_status=200), "malformed"),
        (TransientError("other"), "transient"),
        (ThrottledError("429", http_status=429), "throttled"),
    ],
)
def test_transient_errors_are_retried_with_their_reason(error: ApiError, reason: str) -> None:
    decision = _policy().decide(error, 1)
    assert decision == RetryDecision(retry=True, delay_s=0.5, reason=reason)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (AuthError("401", http_status=401), "auth"),
        (AuthError("403", http_status=403), "auth"),
        (NotFound("404", http_status=404), "permanent"),
        (ClientError("400", http_status=400), "permanent"),
        (TlsError("bad certificate"), "permanent"),
        (ApiError("neither transient nor permanent"), "permanent"),
        (ConfigError("not an API error"), "unexpected"),
        (KeyError("a bug"), "unexpected"),
        (KeyboardInterrupt(), "unexpected"),
    ],
)
def test_permanent_errors_and_bugs_are_never_retried(error: BaseException, reason: str) -> None:
    decision = _policy().decide(error, 1)
    assert decision == RetryDecision(retry=False, delay_s=0.0, reason=reason)


def test_backoff_ceiling_doubles_from_base_up_to_max_delay() -> None:
    policy = _policy(max_attempts=10, base_delay=0.5, max_delay=5.0)
    delays = [policy.decide(ServerError("503"), n).delay_s for n in range(1, 10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0]


def test_transient_errors_stop_after_max_attempts() -> None:
    policy = _policy(max_attempts=3)
    assert policy.decide(NetworkError("reset"), 2).retry
    assert policy.decide(NetworkError("reset"), 3) == RetryDecision(
        retry=False, delay_s=0.0, reason="attempts_exhausted"
    )


def test_single_attempt_means_no_retry() -> None:
    assert _policy(max_attempts=1).decide(ServerError("500"), 1).reason == "attempts_exhausted"


def test_retry_after_is_honoured_with_up_to_half_of_it_again_at_random() -> None:
    """Never shorter than the hint; spread, so workers refused together wake apart."""
    decision = _policy().decide(ThrottledError("429", retry_after=7.5), 1)
    assert decision == RetryDecision(retry=True, delay_s=7.5 * 1.5, reason="throttled")
    policy = RetryPolicy(max_attempts=3, rng=random.Random(4))
    delays = {policy.decide(ThrottledError("429", retry_after=2.0), 1).delay_s for _ in range(20)}
    assert all(2.0 <= d <= 3.0 for d in delays)
    assert len(delays) == 20


def test_retry_after_is_capped_at_max_retry_after_before_the_jitter() -> None:
    policy = _policy(max_retry_after=60.0)
    assert policy.decide(ThrottledError("429", retry_after=86400.0), 1).delay_s == 90.0
    assert policy.decide(ThrottledError("429", retry_after=math.inf), 1).delay_s == 90.0


def test_negative_retry_after_means_now_and_nan_means_no_hint() -> None:
    policy = _policy()
    assert policy.decide(ThrottledError("429", retry_after=-3.0), 1).delay_s == 0.0
    assert policy.decide(ThrottledError("429", retry_after=math.nan), 2).delay_s == 1.0


def test_throttles_never_exhaust_a_batch_unless_a_budget_is_set() -> None:
    """A 429 says the server is up: the limiter slows down, the batch is never given up
    for it (that would end the run 69, "unavailable")."""
    policy = _policy(max_attempts=3)
    assert policy.max_throttled is None
    assert all(policy.decide(ThrottledError("429"), n, throttled=n).retry for n in (1, 10, 500))
    assert _policy(max_attempts=3, max_throttled=2).decide(ThrottledError("429"), 2).reason == (
        "attempts_exhausted"
    )


def test_untracked_throttles_count_against_the_failure_budget() -> None:
    """Without ``throttled``, attempt 3 of max_attempts=3 is the last, whatever came before."""
    policy = _policy(max_attempts=3)
    assert policy.decide(ServerError("500"), 3).reason == "attempts_exhausted"


def test_tracked_throttles_do_not_use_up_the_failure_budget() -> None:
    """Seven 429s then two 5xx: only the two count against max_attempts=3."""
    policy = _policy(max_attempts=3, max_throttled=10)
    second = policy.decide(ServerError("500"), 9, throttled=7)
    assert second == RetryDecision(retry=True, delay_s=1.0, reason="server_error")
    assert policy.decide(ServerError("500"), 10, throttled=7).reason == "attempts_exhausted"
    # ... and failures do not use up the throttle budget either.
    throttle = policy.decide(ThrottledError("429"), 12, throttled=3)
    assert throttle == RetryDecision(retry=True, delay_s=2.0, reason="throttled")
    assert policy.decide(ThrottledError("429"), 12, throttled=10).reason == "attempts_exhausted"


@pytest.mark.parametrize(("attempt", "throttled"), [(0, None), (-1, None), (2, 3), (2, -1)])
def test_attempt_numbers_are_checked(attempt: int, throttled: int | None) -> None:
    with pytest.raises(ValueError, match=r"attempt|throttled"):
        _policy().decide(ServerError("500"), attempt, throttled=throttled)


@pytest.mark.parametrize(
    "kw",
    [
        {"max_attempts": 0},
        {"max_attempts": 3, "max_throttled": 0},
        {"max_attempts": 3, "base_delay": -1.0},
        {"max_attempts": 3, "max_delay": math.inf},
        {"max_attempts": 3, "max_retry_after": math.nan},
    ],
)
def test_invalid_policy_settings_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RetryPolicy(**kw)  # type: ignore[arg-type]


def test_same_seed_same_delays() -> None:
    def delays(seed: int) -> list[float]:
        policy = RetryPolicy(max_attempts=8, rng=random.Random(seed))
        return [policy.decide(ServerError("503"), n).delay_s for n in range(1, 8)]

    assert delays(42) == delays(42)
    assert delays(42) != delays(43)


def test_policy_repr_shows_its_budget() -> None:
    assert repr(RetryPolicy(max_attempts=4)) == (
        "RetryPolicy(max_attempts=4, max_throttled=None, base_delay=0.5, max_delay=30, "
        "max_retry_after=60)"
    )


@given(
    attempt=st.integers(1, 5000),
    base=st.floats(0, 100, allow_nan=False),
    cap=st.floats(0, 1000, allow_nan=False),
    seed=st.integers(0, 2**32),
)
def test_full_jitter_stays_within_zero_and_the_capped_ceiling(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    delay = full_jitter(attempt, base, cap, random.Random(seed))
    assert 0.0 <= delay <= cap
    assert delay <= base * 2.0 ** min(attempt - 1, 1000)


@given(attempt=st.integers(1, 200), hint=st.none() | st.floats(-10, 1e6), seed=st.integers(0, 99))
def test_every_retry_delay_is_bounded(attempt: int, hint: float | None, seed: int) -> None:
    policy = RetryPolicy(max_attempts=200, max_throttled=200, rng=random.Random(seed))
    for error in (ServerError("503"), ThrottledError("429", retry_after=hint)):
        decision = policy.decide(error, attempt)
        assert 0.0 <= decision.delay_s <= max(policy.max_delay, 1.5 * policy.max_retry_after)
        assert decision.retry is (attempt < 200)


def test_full_jitter_draws_the_whole_range() -> None:
    rng = random.Random(7)
    draws = [full_jitter(3, 1.0, 30.0, rng) for _ in range(2000)]
    assert min(draws) < 0.2
    assert max(draws) > 3.8
    assert max(draws) <= 4.0


def test_full_jitter_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="1-based"):
        full_jitter(0, 1.0, 1.0, random.Random(0))
