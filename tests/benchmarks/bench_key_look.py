"""What a look of a pause on refused keys costs (``FileCredentials.rotated``, once a second
while ``serve`` is paused): a ``stat`` and a read of each key file, against the ``stat``
alone it was before (``_look()``, still the look of every API call), two key files,
nothing moved, alternated in 9 rounds of 5,000 looks.

    uv run pytest -m benchmark tests/benchmarks/bench_key_look.py -s -p no:randomly
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from worker.api.credentials import FileCredentials

pytestmark = pytest.mark.benchmark

AK, SK = "AKAKAKAKAKAKAKAKAKAK", "s" * 40
LOOKS, ROUNDS = 5_000, 9


@pytest.mark.anyio
async def test_a_pause_look_reads_its_key_files_for_tens_of_microseconds(tmp_path: Path) -> None:
    files = {"ak": tmp_path / "ak", "sk": tmp_path / "sk"}
    for key, path in files.items():
        path.write_text({"ak": AK, "sk": SK}[key] + "\n")
        path.chmod(0o600)
    source = FileCredentials({"ak": AK, "sk": SK, "security_token": None}, files)
    await source.refused(await source.current())  # paused: the refused keys are held

    def per_look(look: Callable[[], object]) -> float:
        start = time.perf_counter()
        for _ in range(LOOKS):
            look()
        return (time.perf_counter() - start) / LOOKS * 1e6

    spent: dict[str, list[float]] = {"stat": [], "stat and read": []}
    for _ in range(ROUNDS):
        spent["stat"].append(per_look(source._look))
        spent["stat and read"].append(per_look(source.rotated))
    print(f"\nload average {os.getloadavg()[0]:.2f}")
    for name, runs in spent.items():
        print(f"{name}: median {statistics.median(runs):.1f} us a look "
              f"(rounds {min(runs):.1f}-{max(runs):.1f})")  # fmt: skip
    assert source.rotated() == ()  # nothing moved: nothing told
