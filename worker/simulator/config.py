"""What a simulator is told to be: its identity, its quota, its faults. Values only.

Validated on construction so that a bad benchmark or test set-up fails at once, with a
message, instead of producing a simulator that behaves in some unintended way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from worker.simulator.quota import WINDOW_KINDS, WindowKind
from worker.types import PROJECT_ID_RE

RetryAfterMode = Literal["off", "seconds", "date"]
RETRY_AFTER_MODES: tuple[RetryAfterMode, ...] = ("off", "seconds", "date")
UnknownPathMode = Literal["gateway", "html"]
UNKNOWN_PATH_MODES: tuple[UnknownPathMode, ...] = ("gateway", "html")
"""How a path that is not the API is answered: the API gateway's JSON 404 (``APIGW.0101``),
or a web server's bare HTML 404 page with no error code (a proxy, a path prefix)."""

# The fault kinds in the order their probabilities are stacked on one uniform draw.
FAULT_KINDS: tuple[str, ...] = (
    "error_before",
    "error_after",
    "unavailable",
    "reset_before",
    "reset_after",
    "truncated",
)


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Probabilities per DELETE call (0..1, their sum at most 1) and added latency.

    One uniform draw from the simulator's seeded RNG picks at most one fault per call, so a
    run with the same seed and the same order of calls sees the same faults.
    """

    error_before: float = 0.0  # 500, the delete NOT applied
    error_after: float = 0.0  # 500 after the delete was applied
    unavailable: float = 0.0  # 503, not applied
    reset_before: float = 0.0  # connection dropped without an answer, not applied
    reset_after: float = 0.0  # applied, then the connection dropped without an answer
    truncated: float = 0.0  # applied, 200 with the JSON body cut short
    latency_ms: float = 0.0  # mean latency added to every API call (0 = none)
    latency_jitter: bool = True  # exponential around latency_ms; False = fixed latency_ms

    def __post_init__(self) -> None:
        total = 0.0
        for kind in FAULT_KINDS:
            value = getattr(self, kind)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"fault probability {kind} must be within 0..1, got {value!r}")
            total += value
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities add up to {total:g}, more than 1")
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms!r}")

    @classmethod
    def spread(cls, rate: float, *, latency_ms: float = 0.0) -> FaultConfig:
        """``rate`` of the calls fail, evenly split over every fault kind."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be within 0..1, got {rate!r}")
        share = rate / len(FAULT_KINDS)
        return cls(
            error_before=share,
            error_after=share,
            unavailable=share,
            reset_before=share,
            reset_after=share,
            truncated=share,
            latency_ms=latency_ms,
        )

    @property
    def any_fault(self) -> bool:
        return any(getattr(self, kind) > 0 for kind in FAULT_KINDS)


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """The simulator's identity, quota and faults. ``sk`` stays out of ``repr``."""

    project_id: str = "demo-project"
    ak: str = "DEMOAK"
    sk: str = field(default="demo-secret-key", repr=False)
    jobs: int = 100  # jobs created at start, deterministic from seed
    seed: int = 0
    quota: float = 0.0  # calls/s over all API calls (token bucket); 0 = unlimited
    burst: int = 1
    # A count of quota * window_s calls over window_s seconds in place of the token bucket
    # (0: the bucket), fixed or sliding (``worker.simulator.quota.WindowCount``).
    window_s: float = 0.0
    window_kind: WindowKind = "fixed"
    retry_after: RetryAfterMode = "seconds"
    max_batch: int = 1000  # more job_ids than this -> 400 for the whole batch
    faults: FaultConfig = FaultConfig()
    reject_ids: frozenset[str] = frozenset()  # any DELETE naming one -> 400, naming no id
    unknown_path: UnknownPathMode = "gateway"  # see UNKNOWN_PATH_MODES
    check_signature: bool = True
    max_skew_s: float = 900.0
    # IAM's project list (worker.simulator.iam): the region whose project this is, more
    # (name, id) pairs IAM knows, and a 403 for keys without iam:projects:listProjects.
    region: str = "cn-north-4"
    iam_projects: tuple[tuple[str, str], ...] = ()
    iam_forbidden: bool = False
    # The keys' IAM user has no ModelArts policy on this project: every jobs API call with a
    # good signature answers 403 APIGW.0302 (a policy may be granted project by project).
    forbidden: bool = False

    def __post_init__(self) -> None:
        if not PROJECT_ID_RE.fullmatch(self.project_id):
            raise ValueError("project_id must be 1 to 64 letters, digits and hyphens")
        if not self.ak or not self.sk:
            raise ValueError("the simulator needs an access key and a secret key")
        if self.jobs < 0:
            raise ValueError(f"jobs must be >= 0, got {self.jobs}")
        if not (math.isfinite(self.quota) and self.quota >= 0):
            raise ValueError(f"quota must be >= 0 (0 = unlimited), got {self.quota!r}")
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")
        _check_window(self.quota, self.burst, self.window_s, self.window_kind)
        if self.retry_after not in RETRY_AFTER_MODES:
            raise ValueError(f"retry_after must be one of {RETRY_AFTER_MODES}")
        if self.unknown_path not in UNKNOWN_PATH_MODES:
            raise ValueError(f"unknown_path must be one of {UNKNOWN_PATH_MODES}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if not self.max_skew_s > 0:
            raise ValueError(f"max_skew_s must be > 0, got {self.max_skew_s!r}")
        if not self.region or not all(name for name, _ in self.iam_projects):
            raise ValueError("a project IAM knows needs a name (a region such as cn-north-4)")
        if not all(PROJECT_ID_RE.fullmatch(known) for _, known in self.iam_projects):
            raise ValueError("a project id IAM knows must be 1 to 64 letters, digits and hyphens")
        if not isinstance(self.reject_ids, frozenset):
            object.__setattr__(self, "reject_ids", frozenset(self.reject_ids))


MAX_WINDOW_S = 3600.0
"""The longest window a count may span: an hour."""

MAX_WINDOW_CALLS = 1_000_000
"""The most calls a window may count (a sliding window keeps each one's time)."""


def _check_window(quota: float, burst: int, span: float, kind: str) -> None:
    """A window count (``window_s``, the flag ``--window``) that makes sense, or
    ``ValueError`` saying why in the flags' words."""
    if kind not in WINDOW_KINDS:
        raise ValueError(f"--window-kind must be one of {', '.join(WINDOW_KINDS)}, not {kind!r}")
    if not (math.isfinite(span) and 0 <= span <= MAX_WINDOW_S):
        raise ValueError(f"--window must be from 0 (a token bucket) to {MAX_WINDOW_S:,g} s")
    if span == 0:
        return
    if quota <= 0:
        raise ValueError("--window counts --quota x --window calls: it needs a --quota above 0")
    if burst != 1:
        raise ValueError("--burst is a token bucket's: a --window count has none (leave it 1)")
    calls = quota * span
    if not 1 <= calls <= MAX_WINDOW_CALLS:
        said = f"{calls:,.0f}" if calls >= 1 else f"{calls:g}"
        raise ValueError(
            f"--window {span:g} at --quota {quota:g} counts {said} calls a window: it must "
            f"count from 1 to {MAX_WINDOW_CALLS:,}"
        )
