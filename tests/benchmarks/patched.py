"""The command line with parts of ``--rate N``'s fleet pacing off, for ``bench_fleet``'s
sides: ``python -m tests.benchmarks.patched [--slowdown-off] [--revisit-off] serve ...``.

- ``--slowdown-off``: the evidence that cuts the pace is out of reach (the oracle: a pacer
  told the quota and never slowed, its refusals what an even pace of exactly the rate
  meets on this machine, with nothing taken from the rate for them).
- ``--revisit-off``: no look before a start, no take-back at a cut (the fleet's pacing
  before ``REVISIT_S``).

Everything else is the product's: the shared bucket in Redis (the same script, so the same
spacing of the fleet's start times), the dispatcher, the client.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

from worker.pacing import shared
from worker.pacing.slowdown import SlowdownConfig

NEVER = SlowdownConfig(evidence=1e300)
"""Evidence no run of refusals reaches (each adds about 1.5)."""


def _patch(changes: dict[str, Any]) -> None:
    built = shared.RedisRateLimiter.__init__

    def init(self: shared.RedisRateLimiter, *args: Any, **kwargs: Any) -> None:
        built(self, *args, **(kwargs | changes))

    shared.RedisRateLimiter.__init__ = init  # type: ignore[method-assign]


OFF: dict[str, dict[str, Any]] = {
    "--slowdown-off": {"config": NEVER},
    "--revisit-off": {"revisit_s": None},
}

if __name__ == "__main__":
    changes: dict[str, Any] = {}
    while len(sys.argv) > 1 and sys.argv[1] in OFF:
        changes |= OFF[sys.argv.pop(1)]
    _patch(changes)
    runpy.run_module("worker", run_name="__main__", alter_sys=True)
