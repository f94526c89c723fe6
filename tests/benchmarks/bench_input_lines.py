"""Instructions to read one JSON Lines line, counted by valgrind (the same figure in every
run, where seconds move with the machine's load):

    uv run pytest -m benchmark tests/benchmarks/bench_input_lines.py -s -p no:randomly

A child process reads and validates a file (``read_entries``, as ``run --input`` does) of
``SMALL`` and then ``LARGE`` lines under ``valgrind --tool=cachegrind --cache-sim=no``; the
difference over ``LARGE - SMALL`` lines is the cost of one more line, start-up and imports
subtracted out. Two shapes: ``plain``, six keys of a job record naming no place (what
``discover -o jsonl`` prints), and ``placed``, six keys of which ``project_id`` and
``region``. Needs valgrind; skipped where it is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.benchmarks.harness import machine, record

pytestmark = [
    pytest.mark.benchmark,
    pytest.mark.timeout(900),
    pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed"),
]

SMALL, LARGE = 20_000, 100_000
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")
_READ = (
    "import sys\nfrom worker.input.sources import read_entries\n"
    "with read_entries(sys.argv[1], 'jsonl') as entries:\n    sum(1 for _ in entries)\n"
)


def _line(n: int, placed: bool) -> bytes:
    job = {"id": f"job-{n:012d}", "name": f"common-{n:06d}", "type": "COMMON",
           "status": "FINISHED", "user_name": "carol",
           "create_at": "2026-04-16T10:39:03.730Z"}  # fmt: skip
    if placed:
        del job["user_name"], job["create_at"]
        job |= {"project_id": "proj-b", "region": "cn-east-3"}
    return orjson.dumps(job) + b"\n"


def _instructions(path: Path) -> int:
    done = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, "-c", _READ, str(path)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    found = _REFS.search(done.stderr)
    assert found, done.stderr[-2000:]
    return int(found.group(1).replace(",", ""))


def test_instructions_to_read_a_json_line(tmp_path: Path) -> None:
    figures: dict[str, int] = {}
    for shape in ("plain", "placed"):
        counts = []
        for size in (SMALL, LARGE):
            path = tmp_path / f"{shape}-{size}.jsonl"
            path.write_bytes(b"".join(_line(n, shape == "placed") for n in range(size)))
            counts.append(_instructions(path))
        figures[shape] = round((counts[1] - counts[0]) / (LARGE - SMALL))
    record("input_instructions_per_json_line", **figures, machine=machine())
