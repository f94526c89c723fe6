"""CPU cost per deleted id as instructions, counted by valgrind: the same figure in every
run, where the CPU seconds of ``bench_sdk`` move by half on a busy machine.

    uv run pytest -m benchmark tests/benchmarks/bench_instructions.py -s -p no:randomly

Each side is a child process under ``valgrind --tool=cachegrind --cache-sim=no``, which
counts the instructions the process runs (its user-space CPU work, every thread; the
kernel's side of its system calls is not counted). Each deletes ``SMALL`` and then ``LARGE``
ids against a fresh simulator at zero latency, in batches of 50 with 8 calls in flight; the
difference over ``LARGE - SMALL`` ids is the cost of one more id, with start-up, imports
and set-up subtracted out. The sides:

- ``ours``: the ``run`` command, as ``bench_sdk`` runs it (events to a file);
- ``sdk_threads``: the official SDK's blocking client in a pool of 8 threads
  (``sdk_peer.py``). Its thread-pool "async" client is left out: under valgrind, which
  runs one thread at a time, its count moved by more than the cost being measured;
- ``raw``: the floor, raw aiohttp that signs, sends and reads (``raw_peer.py``);
- ``least``: ``raw`` plus the least per-id work ``run`` is asked for (each id validated and
  de-duplicated, each returned record written as its ``job.deleted`` event line).

Instructions are not seconds (C code such as orjson's does more per cycle than the
interpreter), but a count that is the same in every run settles what the noise of
``bench_sdk`` cannot: how far ours is from the SDK and from the floor, and how much of
issue 7's "a quarter of the SDK's CPU" the work ``run`` must do per id leaves for anything
else. ``test_instructions_per_id_by_stage`` counts where ours' instructions go, stage by
stage in one process (``stages.py``). Needs valgrind; skipped where it is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks import stages
from tests.benchmarks.harness import AK, PROJECT, SK, machine, record, simulator

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(900)]

SMALL, LARGE = 2_000, 6_000
BATCH, CONCURRENCY = 50, 8
HERE = Path(__file__).parent
SIDES = ("ours", "sdk_threads", "raw", "least")
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def _command(side: str, url: str, ids_file: Path, tmp: Path) -> list[str]:
    common = [url, PROJECT, AK, SK, str(ids_file)]
    if side == "ours":
        return [sys.executable, "-m", "worker", "run", "--input", str(ids_file), "--yes",
                "--endpoint", url, "--project-id", PROJECT, "--ak", AK, "--sk", SK,
                "--batch-size", str(BATCH), "--concurrency", str(CONCURRENCY),
                "--rate", "10000", "--burst", "10000", "--log-format", "json",
                "--progress", "off"]  # fmt: skip
    shape = [str(BATCH), str(CONCURRENCY)]
    if side == "sdk_threads":
        return [sys.executable, str(HERE / "sdk_peer.py"), *common, "threads", *shape]
    if side == "raw":
        return [sys.executable, str(HERE / "raw_peer.py"), *common, "raw", *shape]
    events = str(tmp / "least-events.jsonl")
    return [sys.executable, str(HERE / "raw_peer.py"), *common, "least", *shape, events]


def _counted(args: list[str]) -> int:
    """Instructions the child ``args`` ran under valgrind (which must succeed)."""
    valgrind = ["valgrind", "--tool=cachegrind", "--cache-sim=no",
                "--cachegrind-out-file=/dev/null"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([*valgrind, *args], capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    found = _REFS.search(done.stderr)
    assert found is not None, done.stderr[-2000:]
    return int(found.group(1).replace(",", ""))


def _instructions(side: str, ids: int, tmp: Path) -> int:
    """Instructions the side's child ran to delete ``ids`` ids (all of them, checked)."""
    with simulator(tmp, jobs=ids) as sim:
        ids_file = tmp / "ids.txt"
        ids_file.write_text("".join(f"{i}\n" for i in sim.ids))
        count = _counted(_command(side, sim.url, ids_file, tmp))
        assert sim.stats()["deleted"] == ids, f"{side} left jobs undeleted"
    return count


def _per_id(side: str, tmp: Path) -> float:
    """The instructions of one more deleted id: start-up and set-up cancel out."""
    return (_instructions(side, LARGE, tmp) - _instructions(side, SMALL, tmp)) / (LARGE - SMALL)


NEEDS_VALGRIND = pytest.mark.skipif(
    shutil.which("valgrind") is None, reason="valgrind is not installed"
)


@NEEDS_VALGRIND
def test_instructions_per_deleted_id(tmp_path: Path) -> None:
    for side in SIDES:  # unmeasured: every module compiled to bytecode once
        _instructions(side, BATCH, tmp_path)
    per_id = {side: _per_id(side, tmp_path) for side in SIDES}
    again = _per_id("ours", tmp_path)
    sdk = per_id["sdk_threads"]
    record(
        "instructions_per_id",
        **{side: round(value) for side, value in per_id.items()},
        ours_again=round(again),
        of_sdk={side: round(value / sdk, 3) for side, value in per_id.items()},
        quarter_of_sdk=round(sdk / 4),
        machine=machine(),
    )
    assert abs(again - per_id["ours"]) < 0.02 * per_id["ours"]  # a count, not a timing
    assert per_id["raw"] < per_id["least"] < per_id["ours"] < sdk


def _stage_instructions(stage: str, rounds: int) -> int:
    return _counted([sys.executable, "-m", "tests.benchmarks.stages", stage, str(rounds)])


@NEEDS_VALGRIND
def test_instructions_per_id_by_stage() -> None:
    """Where ours' count goes (``stages.py``): two rounds of a stage, less set-up."""
    per_id = {
        stage: (_stage_instructions(stage, 3) - _stage_instructions(stage, 1)) / (2 * stages.IDS)
        for stage in ("settle", "quiet", "intake")
    }
    record(
        "instructions_per_id_by_stage",
        parse_settle_and_events=round(per_id["settle"]),
        of_which_events=round(per_id["settle"] - per_id["quiet"]),
        read_validate_admit_batch=round(per_id["intake"]),
        machine=machine(),
    )
    assert 0 < per_id["quiet"] < per_id["settle"]
    assert per_id["intake"] > 0
