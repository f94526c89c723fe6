"""Whether to send a failed batch again, and after how long: decided by the error's type.

Pure logic, no clock and no I/O: ``worker.api.client`` has already translated every failure into
the tree in ``worker.errors``, so the policy never looks at status codes or messages.

- ``ThrottledError`` (429): the server is asking us to slow down, not failing. We wait its
  ``retry_after`` (capped at ``max_retry_after``, so a hostile or mistaken header cannot
  park a worker for hours) plus up to half of it again at random, so the workers refused
  together do not wake together; else back off with full jitter. A throttle never spends
  the budget that makes the API unavailable: the server is up, and the limiter slows down
  instead (``--rate auto`` learns the quota, a fixed rate slows for a while). A budget of
  throttles, ``max_throttled``, can be set (default: none). When the caller says how many
  attempts were throttled (``decide(..., throttled=n)``), throttles and other failures are
  counted apart; when it does not, every attempt counts against both.
- Other ``TransientError`` (5xx, network, timeout, a cut-short body): full-jitter back-off
  until ``max_attempts`` (reason ``transient`` for a bare ``TransientError``).
- ``PermanentError`` (401/403, 404, other 4xx, TLS): never; sending it again cannot help.
- Anything else is a bug, and retrying a bug only hides it: never.

Full jitter (``uniform(0, min(cap, base * 2 ** (n - 1)))``, the AWS Architecture Blog's
"Exponential Backoff and Jitter") spreads the retries of many workers that failed together,
instead of bringing them back in lock-step.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from worker.errors import (
    ApiError,
    ApiTimeout,
    AuthError,
    CircuitOpenError,
    MalformedResponse,
    NetworkError,
    PermanentError,
    ServerError,
    ThrottledError,
    TransientError,
)

_MAX_EXPONENT = 1000
"""``2.0 ** 1000`` is still a finite float; any cap is reached long before."""


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """``retry`` with ``delay_s`` to wait first, or not; ``reason`` names the case for events.

    Reasons when retrying: ``throttled``, ``server_error``, ``network``, ``timeout``,
    ``malformed``, ``circuit_open`` (nothing was sent: the breaker's probe failed).
    When not: ``permanent``, ``auth``, ``attempts_exhausted``, ``unexpected``
    (not an API error at all: a bug, or cancellation).
    """

    retry: bool
    delay_s: float
    reason: str


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """A delay drawn uniformly from ``[0, min(cap, base * 2 ** (attempt - 1))]``.

    ``attempt`` is 1-based: the first retry draws from ``[0, base]``.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, not {attempt!r}")
    if base < 0 or cap < 0:
        raise ValueError("base and cap must not be negative")
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    return rng.uniform(0.0, ceiling)


def _transient_reason(error: TransientError) -> str:
    if isinstance(error, CircuitOpenError):
        return "circuit_open"
    if isinstance(error, ApiTimeout):
        return "timeout"
    if isinstance(error, NetworkError):
        return "network"
    if isinstance(error, ServerError):
        return "server_error"
    if isinstance(error, MalformedResponse):
        return "malformed"
    return "transient"


class RetryPolicy:
    """Decides, per failed attempt of one batch, whether and when to try again."""

    __slots__ = (
        "_rng",
        "base_delay",
        "max_attempts",
        "max_delay",
        "max_retry_after",
        "max_throttled",
    )

    def __init__(
        self,
        *,
        max_attempts: int,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        max_retry_after: float = 60.0,
        max_throttled: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(max_attempts, bool) or max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {max_attempts!r}")
        if max_throttled is not None and max_throttled < 1:
            raise ValueError(f"max_throttled must be >= 1 or None, not {max_throttled!r}")
        for name, value in (
            ("base_delay", base_delay),
            ("max_delay", max_delay),
            ("max_retry_after", max_retry_after),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        self.max_attempts = max_attempts
        self.max_throttled = max_throttled
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_retry_after = max_retry_after
        self._rng = rng if rng is not None else random.Random()

    def decide(
        self, error: BaseException, attempt: int, *, throttled: int | None = None
    ) -> RetryDecision:
        """Decide after attempt number ``attempt`` (1-based) failed with ``error``.

        ``throttled``: how many of the ``attempt`` failed attempts were throttled, this one
        included. When given, throttles count only against ``max_throttled`` and the other
        failures only against ``max_attempts``. When left out, every attempt counts against
        both budgets (the simple, stricter reading).
        """
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, not {attempt!r}")
        if throttled is not None and not 0 <= throttled <= attempt:
            raise ValueError(f"throttled must be within 0..{attempt}, not {throttled!r}")
        if isinstance(error, ThrottledError):
            spent = attempt if throttled is None else max(throttled, 1)
            if self.max_throttled is not None and spent >= self.max_throttled:
                return RetryDecision(False, 0.0, "attempts_exhausted")
            return RetryDecision(True, self._throttle_delay(error, spent), "throttled")
        if isinstance(error, TransientError):
            spent = attempt if throttled is None else attempt - throttled
            if spent >= self.max_attempts:
                return RetryDecision(False, 0.0, "attempts_exhausted")
            delay = full_jitter(max(spent, 1), self.base_delay, self.max_delay, self._rng)
            return RetryDecision(True, delay, _transient_reason(error))
        if isinstance(error, AuthError):
            return RetryDecision(False, 0.0, "auth")
        if isinstance(error, PermanentError | ApiError):
            return RetryDecision(False, 0.0, "permanent")
        return RetryDecision(False, 0.0, "unexpected")

    def _throttle_delay(self, error: ThrottledError, spent: int) -> float:
        """The server's hint, capped, and up to half of it again at random; our own
        full-jitter back-off when it gave none.

        Never shorter than the hint: a call sent before it is up is refused again. The
        jitter spreads the workers refused together, which would otherwise all wake at
        once (a fixed rate's bucket lets its burst out together).
        """
        hint = error.retry_after
        if hint is None or math.isnan(hint):
            return full_jitter(spent, self.base_delay, self.max_delay, self._rng)
        wait = min(max(hint, 0.0), self.max_retry_after)
        return wait + self._rng.uniform(0.0, wait / 2.0)

    def __repr__(self) -> str:
        return (
            f"RetryPolicy(max_attempts={self.max_attempts}, max_throttled={self.max_throttled}, "
            f"base_delay={self.base_delay:g}, max_delay={self.max_delay:g}, "
            f"max_retry_after={self.max_retry_after:g})"
        )
