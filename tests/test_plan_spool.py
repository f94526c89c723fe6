"""`discover --plan` spools the jobs it lists in a private file beside the plan until it is
sealed. A listing killed outright (kill -9, the OOM killer) cannot remove it, and it names
every job listed so far: the next `discover` of that plan removes it, never a spool still in
use. Real processes: the simulator and `discover` each in their own."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.benchmarks.harness import AK, PROJECT, SK, simulator
from worker.discovery.plan import PlanWriter

pytestmark = pytest.mark.timeout(120)


def _discover(url: str, plan: Path) -> list[str]:
    return [sys.executable, "-m", "worker", "discover", "--endpoint", url, "--project-id",
            PROJECT, "--ak", AK, "--sk", SK, "--rate", "1000", "--all", "--page-size", "10",
            "--plan", str(plan)]  # fmt: skip


def _spools(folder: Path) -> list[Path]:
    return sorted(folder.glob(".plan.json.*.jobs"))


def test_the_spool_a_killed_discover_left_is_removed_by_the_next(tmp_path: Path) -> None:
    plans = tmp_path / "plans"
    plans.mkdir()
    plan = plans / "plan.json"
    with simulator(tmp_path, jobs=400, latency_ms=50) as sim:  # 40 pages: seconds of listing
        listing = subprocess.Popen(_discover(sim.url, plan), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            while not any(spool.stat().st_size for spool in _spools(plans)):
                assert listing.poll() is None, "discover ended before it spooled a job"
                time.sleep(0.01)  # a condition: the spool holds a listed job
        finally:
            os.kill(listing.pid, signal.SIGKILL)
            listing.wait()
        left = _spools(plans)
        assert len(left) == 1 and left[0].read_bytes()  # what a kill -9 leaves: listed jobs
        done = subprocess.run(_discover(sim.url, plan), capture_output=True, timeout=90,
                              check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert sorted(p.name for p in plans.iterdir()) == ["plan.json"]


def test_a_spool_in_use_is_never_removed(tmp_path: Path) -> None:
    """A spool whose process lives holds its lock: a second writer of the same plan leaves
    it, and removes only the stale one."""
    plan = tmp_path / "plan.json"
    stale = tmp_path / ".plan.json.deadbeef.jobs"
    stale.write_bytes(b'{"id":"a dead run\'s job"}\n')
    held = tmp_path / ".plan.json.livelive.jobs"
    held.write_bytes(b'{"id":"a living run\'s job"}\n')
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the living writer's descriptor holds it
        with PlanWriter(plan, key=None) as writer:
            assert writer._spool_path.exists()
            assert not stale.exists()
            assert held.exists()
        assert _spools(tmp_path) == [held]  # its own spool gone once closed, the held one kept
    finally:
        os.close(fd)
