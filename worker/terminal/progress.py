"""A progress line for people at a terminal: done, rate, ETA when the total is known."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import IO

import anyio

from worker.outcomes.journal import Tally


def count_lines(path: str) -> int | None:
    """Lines in a plain file (an upper bound on its ids), or None when it cannot be known."""
    if path == "-" or path.endswith(".gz"):
        return None
    try:
        with open(path, "rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return None


class Progress:
    """Redraws one status line on stderr twice a second; cleared when the run ends."""

    def __init__(
        self, tally: Tally, *, total: int | None, clock: Callable[[], float],
        stream: IO[str] | None = None,
    ) -> None:  # fmt: skip
        self._tally = tally
        self._total = total
        self._clock = clock
        self._stream = stream if stream is not None else sys.stderr
        self._started = clock()

    def line(self) -> str:
        tally = self._tally
        done = tally.finished + tally.repeated + tally.already_done
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = tally.finished / elapsed
        parts = [f"{done:,} done", f"{rate:,.0f} ids/s"]
        counts = tally.counts()
        parts.append(", ".join(f"{name} {n:,}" for name, n in counts.items() if n))
        if self._total:
            share = min(done / self._total, 1.0)
            parts.insert(0, f"{share:6.1%}")
            if rate > 0 and done < self._total:
                parts.append(f"ETA {(self._total - done) / rate:,.0f}s")
        if tally.retries:
            parts.append(f"retries {tally.retries:,}")
        return " | ".join(part for part in parts if part)

    async def run(self) -> None:
        try:
            while True:
                self._stream.write("\r\x1b[2K" + self.line())
                self._stream.flush()
                await anyio.sleep(0.5)
        finally:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()
