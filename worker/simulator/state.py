"""The simulator's state in one object: config, jobs, quota, faults and counters.

The HTTP handlers in ``app.py`` only translate between requests and this object, and tests
in the same process read it directly to learn the truth behind the answers.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from worker.simulator.auth import check_request
from worker.simulator.config import FAULT_KINDS, FaultConfig, SimulatorConfig
from worker.simulator.faults import FaultPlan
from worker.simulator.jobs import JobStore
from worker.simulator.quota import Quota, TokenBucket, WindowCount


def gate(config: SimulatorConfig, now: float) -> Quota:
    """The quota ``config`` asks for, starting at ``now``: a count over its window, or a
    token bucket."""
    if config.window_s > 0:
        return WindowCount(config.quota, config.window_s, config.window_kind, now)
    return TokenBucket(config.quota, config.burst, now)


ARRIVALS_KEPT = 200_000
"""How many of the latest calls ``Simulator.arrivals`` keeps (about 10 MB at most)."""


@dataclass(slots=True)
class SimStats:
    """Counters of what the simulator has seen. ``calls`` counts every API call (not /_sim/)."""

    calls: int = 0
    delete_calls: int = 0
    list_calls: int = 0
    show_calls: int = 0
    create_calls: int = 0
    deletions: int = 0  # jobs actually deleted
    throttled: int = 0  # 429s
    signature_failures: int = 0  # 401s
    iam_calls: int = 0  # IAM's project list (not in calls: another service)
    bad_requests: int = 0  # 400s
    # Only the kinds that fired, so ``assert stats.faults`` means "some fault happened";
    # a Counter answers 0 for the others.
    faults: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0  # DELETE calls being handled now
    max_in_flight: int = 0  # the most DELETE calls ever handled at once
    # The latency actually drawn, over every API call that reached the latency step with a
    # delay: benchmarks divide by these instead of trusting the nominal mean.
    latency_calls: int = 0
    latency_s: float = 0.0
    # How long those calls really took, from arrival at the handler to the answer leaving it
    # (event-loop clock, calls that ended): the latency a client was served. Never less than
    # the draws; the event loop's timer granularity, or work longer than a draw, add to it.
    latency_served_s: float = 0.0
    # When the first DELETE arrived and the last one was answered (the simulator's clock):
    # how long a client kept it busy deleting, timed the same way for every client.
    first_delete_at: float | None = None
    last_delete_at: float | None = None

    @property
    def delete_span_s(self) -> float:
        """Seconds from the first DELETE's arrival to the last DELETE's answer (0 if none)."""
        if self.first_delete_at is None or self.last_delete_at is None:
            return 0.0
        return self.last_delete_at - self.first_delete_at

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready counters; ``faults`` lists every kind, 0 when it never fired."""
        out = asdict(self)
        out["faults"] = {kind: self.faults[kind] for kind in FAULT_KINDS}
        out["delete_span_s"] = self.delete_span_s
        return out


class Simulator:
    """A ModelArts DevServer jobs project, as an in-process object.

    ``clock`` (monotonic seconds) drives the quota; ``wall`` (epoch seconds) checks
    ``X-Sdk-Date`` and stamps created jobs. Both are injectable for tests.
    """

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        # The window a quota set again counts over: a quota of 0 (no limit) has none, and
        # one set after it counted over this, not a token bucket's.
        self._window_s = config.window_s
        self.clock = clock
        self.wall = wall
        self.url = ""
        self.stats = SimStats()
        self.store = JobStore(seed=config.seed)
        self.faults = FaultPlan(config.faults, config.seed)
        self.bucket = gate(config, clock())
        # The gateway's view of the last ARRIVALS_KEPT calls, for benchmarks of pacing:
        # (reached the handler, quota checked, accepted), on ``clock``.
        self.arrivals: deque[tuple[float, float, bool]] = deque(maxlen=ARRIVALS_KEPT)
        # Unique and cheap: a random prefix per simulator and a counter.
        self._request_prefix = os.urandom(6).hex()
        self._request_seq = itertools.count(1)
        self.store.generate(config.jobs)

    def __repr__(self) -> str:
        return (
            f"Simulator(url={self.url!r}, project_id={self.config.project_id!r}, "
            f"jobs={len(self.store.jobs)}, deleted={len(self.store.deleted)}, "
            f"calls={self.stats.calls}, throttled={self.stats.throttled}, "
            f"max_in_flight={self.stats.max_in_flight}, quota={self.config.quota:g})"
        )

    # -- what tests read ----------------------------------------------------------------
    def job_ids(self) -> list[str]:
        """Ids of the jobs that exist now, in creation order."""
        return list(self.store.jobs)

    @property
    def deleted(self) -> set[str]:
        """Ids deleted so far."""
        return self.store.deleted

    @property
    def delete_counts(self) -> dict[str, int]:
        """How many times each id's delete was applied (never more than 1)."""
        return self.store.delete_counts

    @property
    def sent_counts(self) -> dict[str, int]:
        """How many accepted DELETE calls named each id (resends show here, not above)."""
        return self.store.sent_counts

    # -- what tests change --------------------------------------------------------------
    def add_jobs(self, n: int, **fields: Any) -> list[str]:
        """Create ``n`` more seeded jobs; ``fields`` pins e.g. ``status`` or ``create_at``."""
        return self.store.generate(n, **fields)

    def set_quota(self, quota: float, burst: int | None = None) -> None:
        """Change the quota at once (a fresh, full bucket, or a window count starting now);
        ``burst=None`` keeps the old one. ``ValueError`` where the window cannot count it
        (``SimulatorConfig``); a quota of 0 is no limit, and no window until a quota
        comes again."""
        window_s = self._window_s if quota > 0 else 0.0
        self.config = replace(
            self.config, quota=quota, burst=self.config.burst if burst is None else burst,
            window_s=window_s,
        )  # fmt: skip
        self.bucket = gate(self.config, self.clock())

    def take_arrivals(self) -> list[tuple[float, float, bool]]:
        """The calls the quota was checked for since the last take, oldest first."""
        out = list(self.arrivals)
        self.arrivals.clear()
        return out

    def set_faults(self, faults: FaultConfig) -> None:
        """Change the faults and latency at once (a fresh draw, from the same seed)."""
        self.config = replace(self.config, faults=faults)
        self.faults = FaultPlan(faults, self.config.seed)

    def set_status(self, job_id: str, status: str) -> None:
        self.store.set_status(job_id, status)

    # -- used by the handlers -----------------------------------------------------------
    def signature_refused(
        self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes
    ) -> str | None:
        """Why a request's signature is refused (401), or None: accepted, or not checked."""
        config = self.config
        if not config.check_signature:
            return None
        reason = check_request(
            method=method,
            raw_path=raw_path,
            headers=headers,
            body=body,
            ak=config.ak,
            sk=config.sk,
            now=self.wall(),
            max_skew_s=config.max_skew_s,
        )
        if reason is not None:
            self.stats.signature_failures += 1
        return reason

    def next_request_id(self) -> str:
        return f"{self._request_prefix}{next(self._request_seq):010x}"
