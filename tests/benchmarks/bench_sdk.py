"""Issue 7's peer figures: ``devserver-reaper run`` against the official SDK, deleting the
same 20,000 ids in batches of 50 with 8 calls in flight.

    uv run pytest -m benchmark tests/benchmarks/bench_sdk.py -s -p no:randomly

Each side runs in its own child process against a fresh simulator in another process, so
its CPU (``getrusage`` of the child) is its own. The SDK runs as its thread-pool "async"
client and as 8 threads around its blocking client (``sdk_peer.py``); ours is the real
``run`` command, writing its events to a file as in production, with no rate limit
(``--rate 10000``).

- at 20 ms mean simulated latency (exponential), the share of the latency ceiling:
  achieved calls/s ÷ (concurrency ÷ mean latency) = 400 calls/s here;
- at zero latency, where the client's own cost decides: ids/s, and CPU seconds per 1,000
  ids (gross: the whole child; net: minus the same child's start-up and imports).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.benchmarks.harness import AK, PROJECT, SK, machine, median, record, repeats, simulator

pytestmark = pytest.mark.benchmark

IDS = 20_000
BATCH = 50
CONCURRENCY = 8
PEER = Path(__file__).with_name("sdk_peer.py")
SIDES = ("ours", "sdk_async", "sdk_threads")


def _child(args: list[str], stdout: Any = subprocess.PIPE) -> tuple[str, float]:
    """Run a child to the end: (its stdout, its CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(args, stdout=stdout, stderr=subprocess.PIPE, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise AssertionError(f"{args[:4]} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout or "", cpu


def _ours(url: str, ids_file: Path, tmp: Path) -> dict[str, float]:
    events = tmp / "events.jsonl"
    args = [sys.executable, "-m", "worker", "run", "--input", str(ids_file), "--yes",
            "--endpoint", url, "--project-id", PROJECT, "--ak", AK, "--sk", SK,
            "--batch-size", str(BATCH), "--concurrency", str(CONCURRENCY),
            "--rate", "10000", "--burst", "10000", "--log-format", "json",
            "--progress", "off"]  # fmt: skip
    with events.open("w") as out:
        _, cpu = _child(args, stdout=out)
    summary = json.loads(events.read_text().splitlines()[-1])
    assert summary["event"] == "run.summary" and summary["deleted"] == IDS, summary
    return {"seconds": summary["duration_s"], "cpu": cpu}


def _sdk(url: str, ids_file: Path, mode: str) -> dict[str, float]:
    out, cpu = _child([sys.executable, str(PEER), url, PROJECT, AK, SK, str(ids_file), mode,
                       str(BATCH), str(CONCURRENCY)])  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    assert result["errors"] == 0, result
    return {"seconds": result["seconds"], "cpu": cpu}


def _baseline(side: str, tmp: Path) -> float:
    """CPU seconds of the child's start-up alone (interpreter, imports), to subtract."""
    if side == "ours":
        empty = tmp / "empty.txt"
        empty.write_text("")
        _, cpu = _child([sys.executable, "-m", "worker", "run", "--input", str(empty),
                         "--dry-run", "--log-format", "json", "--progress", "off"])  # fmt: skip
        return cpu
    _, cpu = _child([sys.executable, str(PEER), "-", "-", "-", "-", "-", "import"])
    return cpu


def _measure(tmp: Path, latency_ms: float) -> dict[str, dict[str, float]]:
    """Median seconds and CPU per side over ``BENCH_REPEATS`` runs, sides interleaved."""
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for _ in range(repeats(3)):
        for side in SIDES:
            with simulator(tmp, jobs=IDS, latency_ms=latency_ms) as sim:
                ids_file = tmp / "ids.txt"
                ids_file.write_text("".join(f"{i}\n" for i in sim.ids))
                if side == "ours":
                    figures = _ours(sim.url, ids_file, tmp)
                else:
                    figures = _sdk(sim.url, ids_file, side.removeprefix("sdk_"))
                assert len(sim.ids) == IDS
                assert sim.stats()["deleted"] == IDS
                runs[side].append(figures)
    return {
        side: {
            "seconds": median([r["seconds"] for r in values]),
            "cpu": median([r["cpu"] for r in values]),
        }
        for side, values in runs.items()
    }


def test_share_of_the_latency_ceiling_at_20ms(tmp_path: Path) -> None:
    latency = 0.020
    ceiling = CONCURRENCY / latency  # calls per second
    calls = IDS / BATCH
    figures = _measure(tmp_path, latency * 1000)
    shares = {side: round(calls / f["seconds"] / ceiling, 3) for side, f in figures.items()}
    record("sdk_latency_share", latency_ms=20, ceiling_calls_per_s=ceiling, shares=shares,
           seconds={s: round(f["seconds"], 3) for s, f in figures.items()},
           machine=machine())  # fmt: skip
    assert shares["ours"] >= 0.95


def test_client_cost_at_zero_latency(tmp_path: Path) -> None:
    figures = _measure(tmp_path, 0.0)
    base = {side: _baseline(side if side == "ours" else "sdk", tmp_path) for side in SIDES}
    ids_per_s = {side: round(IDS / f["seconds"]) for side, f in figures.items()}
    gross = {side: round(f["cpu"] / IDS * 1000, 4) for side, f in figures.items()}
    net = {side: round((f["cpu"] - base[side]) / IDS * 1000, 4) for side, f in figures.items()}
    best_sdk = max(ids_per_s["sdk_async"], ids_per_s["sdk_threads"])
    cheapest_sdk = min(net["sdk_async"], net["sdk_threads"])
    record("sdk_zero_latency", ids_per_s=ids_per_s, cpu_s_per_1000_ids_gross=gross,
           cpu_s_per_1000_ids_net=net, startup_cpu_s={k: round(v, 3) for k, v in base.items()},
           speedup=round(ids_per_s["ours"] / best_sdk, 2),
           cpu_ratio=round(net["ours"] / cheapest_sdk, 3), machine=machine())  # fmt: skip
    assert ids_per_s["ours"] >= 3 * best_sdk
    assert net["ours"] <= cheapest_sdk / 4
