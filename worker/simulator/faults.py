"""Which fault, if any, a DELETE call suffers, and how long it is delayed.

One uniform draw per call from a seeded RNG: with the same seed and the same order of calls
the same faults happen, so a flaky-network test fails the same way every time.
"""

from __future__ import annotations

import random
from enum import StrEnum

from worker.simulator.config import FAULT_KINDS, FaultConfig


class Fault(StrEnum):
    NONE = "none"
    ERROR_BEFORE = "error_before"  # 500, not applied
    ERROR_AFTER = "error_after"  # applied, then 500
    UNAVAILABLE = "unavailable"  # 503, not applied
    RESET_BEFORE = "reset_before"  # connection dropped, not applied
    RESET_AFTER = "reset_after"  # applied, then connection dropped
    TRUNCATED = "truncated"  # applied, 200 with a body cut mid-JSON

    @property
    def applies(self) -> bool:
        """Whether the delete is applied before the fault shows."""
        return self in _APPLIED


_APPLIED = frozenset({Fault.NONE, Fault.ERROR_AFTER, Fault.RESET_AFTER, Fault.TRUNCATED})


class FaultPlan:
    """Draws faults and latencies from one seeded RNG."""

    __slots__ = ("_config", "_latency_rng", "_rng", "_table")

    def __init__(self, config: FaultConfig, seed: int) -> None:
        self._config = config
        self._rng = random.Random(seed)
        # Latency has its own stream: list and show calls draw it too, and must not shift
        # which DELETE call gets which fault.
        self._latency_rng = random.Random(f"latency-{seed}")
        self._table: tuple[tuple[float, Fault], ...] = ()
        edge = 0.0
        table: list[tuple[float, Fault]] = []
        for kind in FAULT_KINDS:
            probability = float(getattr(config, kind))
            if probability > 0:
                edge += probability
                table.append((edge, Fault(kind)))
        self._table = tuple(table)

    def __repr__(self) -> str:
        return f"FaultPlan({self._config!r})"

    def draw(self) -> Fault:
        """The fault of the next DELETE call (``Fault.NONE`` most of the time)."""
        if not self._table:
            return Fault.NONE
        point = self._rng.random()
        for edge, fault in self._table:
            if point < edge:
                return fault
        return Fault.NONE

    def latency(self) -> float:
        """Seconds to delay the next call: exponential around the mean, or fixed."""
        mean_ms = self._config.latency_ms
        if mean_ms <= 0:
            return 0.0
        if not self._config.latency_jitter:
            return mean_ms / 1000.0
        return self._latency_rng.expovariate(1000.0 / mean_ms)
