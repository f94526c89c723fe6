"""What a command imports at start-up, and the bytecode the suite's children start from.

Names of modules, never times: a light command must not bring a heavy package back (each
costs tens of milliseconds of CPU on every start; tests/benchmarks/bench_startup.py measures
them), and that is seen in ``sys.modules`` of the real command in a child process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import worker
from tests.conftest import PYCACHE


def test_children_of_the_suite_read_and_write_compiled_bytecode() -> None:
    """A ``python -m worker`` a test starts finds each module compiled by the first process
    that imported it, in the suite's one cache, instead of compiling it from source."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys, worker.cli; "
         "print(sys.flags.dont_write_bytecode, sys.pycache_prefix)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.split() == ["0", str(PYCACHE)]
    package = Path(worker.__file__).resolve().parent
    compiled = PYCACHE / package.relative_to(package.anchor)
    assert list(compiled.glob("cli.*.pyc")), f"no bytecode of worker.cli under {compiled}"
