"""The limiters ``--rate auto`` runs: a ``RateController`` (``worker.pacing.controller``) sets their
rate from the calls' answers.

- ``AdaptiveRateLimiter``: one process. Calls are spaced by a token bucket at the
  controller's rate; a cut re-slots the waiters, and a ``Retry-After`` pause holds every
  call back.
- Replicas sharing one quota through Redis run one controller for the fleet:
  ``worker.pacing.fleet.FleetRateController``.
- ``build_limiter``: a fixed ``--rate N`` (which slows while refused,
  ``worker.pacing.slowdown``) or ``auto``, for one process.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import anyio
import anyio.lowlevel
import structlog

from worker.clock import Clock
from worker.pacing.bucket import LocalRateLimiter, RateLimiter, TokenBucket, start_apart
from worker.pacing.controller import AdaptiveConfig, PacedController, RateController, answer
from worker.pacing.slowdown import Notify, SlowingLimiter

SLICE_S = 0.05
"""Waiters look at the rate at least this often."""

PAUSE_SLICE_S = 0.1
"""Callers held by a pause look at its end at least this often: it may come sooner."""

RESLOT = 0.05
"""A rate change larger than this fraction re-slots every waiter."""

NOTIFY_S = 1.0
"""At most one ``rate.slowed`` this often: the cuts of a second are one slow-down."""


class AdaptiveRateLimiter:
    """A ``RateLimiter`` whose rate a ``RateController`` sets from the calls' answers.

    Calls are spaced by a ``TokenBucket`` with a burst of 1 by default: the server's burst is
    as unknown as its rate, and a burst it does not allow would be refused at once. When the
    controller cuts the rate, waiters that reserved at the old rate reserve again at the new
    one (their slots were too close together); a ``Retry-After`` pause holds every call back.
    """

    __slots__ = (
        "_bucket", "_burst", "_clock", "_controller", "_generation", "_last_sent", "_notify",
        "_slotted", "_told_at", "slowed_from", "throttles",
    )  # fmt: skip

    def __init__(
        self,
        clock: Clock,
        *,
        burst: int = 1,
        config: AdaptiveConfig | None = None,
        controller: PacedController | None = None,
        notify: Notify | None = None,
    ) -> None:
        self._clock = clock
        self._notify = notify or structlog.get_logger().info
        self.slowed_from = math.inf  # the rate before the cuts not yet climbed back from
        self._told_at = -math.inf  # the last ``rate.slowed``
        self._burst = burst
        self._controller = controller or RateController(clock.now(), config)
        self._bucket = TokenBucket(self._controller.rate, burst, clock.now())
        self._slotted = self._controller.rate  # the rate the waiters' slots were given at
        self._last_sent = -math.inf
        self._generation = 0
        self.throttles = 0

    def _sync(self, now: float) -> None:
        """Bring the bucket to the controller's rate. A change of more than ``RESLOT`` starts
        a fresh bucket, and every waiter takes a new slot at the new rate: slots handed out
        at 2 calls/s to eight waiters would otherwise hold a rate increase back for 4 s, and
        slots handed out before a cut would overrun the server."""
        rate = self._controller.rate_at(now)
        if rate == self._bucket.rate:
            return
        if rate >= self.slowed_from:
            self.slowed_from = math.inf
            self._notify("rate.restored", rate=round(rate, 3), asked="auto")
        slotted = self._slotted
        if abs(rate - slotted) > RESLOT * slotted:
            # The fresh bucket's first slot is one interval after the last call that went,
            # so re-slotting never lets two calls start closer together than the new rate.
            self._generation += 1
            self._slotted = rate
            self._bucket = TokenBucket(rate, self._burst, max(now, self._last_sent + 1.0 / rate))
        else:
            self._bucket.set_rate(rate, now)

    async def acquire(self) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        clock = self._clock
        while True:
            now = clock.now()
            pause = self._controller.pause_until()
            if now < pause:
                # In slices too: a check call's refusal reads the window to end up to a
                # second before the pause it set (``LongWindow``), and callers asleep to
                # the pause's end lost that second of the window's count.
                await clock.sleep(min(pause - now, PAUSE_SLICE_S))
                continue
            self._sync(now)
            generation = self._generation
            start = now + self._bucket.reserve(now)
            version = self._bucket.version
            if start <= now:
                await anyio.lowlevel.cancel_shielded_checkpoint()
            else:
                # Sleep in slices, so a new rate reaches waiters that are already queued.
                try:
                    while generation == self._generation and clock.now() < start:
                        self._sync(clock.now())
                        if generation != self._generation:
                            break
                        await clock.sleep(min(start - clock.now(), SLICE_S))
                except BaseException:
                    if generation == self._generation:
                        self._bucket.refund(version)
                    raise
                if generation != self._generation:
                    continue  # the rate changed a lot while we waited: take a new slot
                if clock.now() < self._controller.pause_until():
                    continue
            # The bucket is read again after every wait: a cut while this call waits to start
            # (the one before it woke late) re-slots the queue at the new rate, and this call
            # too must wait an interval of the new rate, not of the old.
            self._last_sent = await start_apart(
                clock, lambda: self._bucket, lambda: self._last_sent
            )
            if self._last_sent < self._controller.pause_until():
                # A refusal paused every call while this one waited to start: it goes after
                # the pause, on a new slot. Its start stays the last one (the bucket was
                # told of it too): one interval lost after the pause, slower, never faster.
                continue
            self._controller.on_sent(self._last_sent)
            return

    @property
    def rate(self) -> float:
        return self._controller.rate

    @property
    def controller(self) -> PacedController:
        return self._controller

    def feedback(
        self,
        *,
        throttled: bool,
        latency_s: float | None = None,
        retry_after: float | None = None,
        overloaded: bool = False,
    ) -> None:
        """Fold one answer into the controller (``overloaded``: a 503), then take up the
        rate it sets."""
        now = self._clock.now()
        self.throttles += throttled
        before = self._controller.rate_at(now)
        answer(
            self._controller, now, throttled=throttled, latency_s=latency_s,
            retry_after=retry_after, overloaded=overloaded,
        )  # fmt: skip
        rate = self._controller.rate
        if rate < before and now - self._told_at >= NOTIFY_S:
            # At most one event a second: start-up's end cuts a dozen times in one.
            self.slowed_from = min(self.slowed_from, before)
            self._told_at = now
            reason = "throttled" if throttled else "overloaded" if overloaded else "latency"
            self._notify("rate.slowed", rate=round(rate, 3), asked="auto", reason=reason)
        self._sync(now)

    def __repr__(self) -> str:
        return (
            f"AdaptiveRateLimiter({self._controller!r}, burst={self._burst}, "
            f"throttles={self.throttles})"
        )


def build_limiter(
    rate: float | Literal["auto"],
    burst: int,
    clock: Clock,
    *,
    config: AdaptiveConfig | None = None,
    max_retry_after: float | None = None,
    notify: Notify | None = None,
) -> RateLimiter:
    """The limiter ``--rate`` asks for: a fixed rate (a ``LocalRateLimiter`` that slows
    itself while the server refuses it, saying so through ``notify``: ``rate.slowed``
    events, structlog's by default) or the adaptive one.

    With ``auto`` the configured burst is not used: the server's burst is unknown and may
    be 1, so calls are evenly spaced (burst 1). ``max_retry_after`` (the setting) caps the
    ``Retry-After`` pause that holds every call back, as the retry policy caps the refused
    call's own wait: ``--max-retry-after 2`` must not let one header stop the run for 30 s.
    """
    if rate == "auto":
        if max_retry_after is not None:
            config = replace(config or AdaptiveConfig(), max_pause=max_retry_after)
        return AdaptiveRateLimiter(clock, burst=1, config=config, notify=notify)
    fixed = LocalRateLimiter(rate=float(rate), burst=burst, clock=clock)
    return SlowingLimiter(fixed, clock, notify=notify or structlog.get_logger().warning)
