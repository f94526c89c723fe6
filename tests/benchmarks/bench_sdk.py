"""Issue 7's peer figures, issue 23's regression guards: ``devserver-reaper run`` against
the official SDK, deleting the same ids (20,000 at 20 ms, 100,000 at zero latency) in
batches of 50 with 8 calls in flight.

    uv sync --group bench
    BENCH_REPEATS=3 uv run pytest -m benchmark tests/benchmarks/bench_sdk.py -s -p no:randomly

Each side runs in its own child process against a fresh simulator in another process, so
its CPU (``getrusage`` of the child) is its own. The SDK runs as its thread-pool "async"
client and as 8 threads around its blocking client (``sdk_peer.py``); ours is the real
``run`` command, writing its events to a file as in production, with no rate limit
(``--rate 10000``). The children share one bytecode cache (``PYTHONPYCACHEPREFIX``, warmed
before anything is measured), as an installed package has its ``.pyc`` files: where
``PYTHONDONTWRITEBYTECODE`` is set, every child would otherwise compile every module it
imports, a start-up cost that is the environment's and no client's.

Every side is timed by the simulator (``delete_span_s`` in ``/_sim/stats``): from the arrival
of its first DELETE to the answer of its last, so set-up before the first call (ours opens a
ledger and a session inside its ``duration_s``; the SDK's clock starts after its client is
built) counts for no one. Each side's own clock is recorded too (``client_seconds``).

- at 20 ms mean simulated latency (exponential), the share of the latency ceiling. The
  ceiling is what a client that costs nothing would reach: 8 calls always in flight, each
  taking exactly the latency the simulator served it, so the run cannot take less than
  (the latencies served over the run, summed) ÷ 8. The simulator times each call from its
  arrival at the handler to its answer, its own work included (a server's latency as its
  clients see it; see ``worker.simulator.app._api_call``), and reports the sum
  (``latency_served_s`` in ``/_sim/stats``); the **realised** share is that ceiling ÷ the
  side's measured seconds, and the guard (ours >= 0.95 of raw's, in the same run) is on
  it. Recorded beside it:
  the **drawn** share (the ceiling from the latencies drawn, ``latency_s``: the served
  ones are longer by the event loop's late timer wake-ups, ``sim_timer_lateness_ms`` per
  call), and the **nominal** share (400 calls/s, 8 ÷ 20 ms: not a fair target, since the
  seeded draws of seed 0 average about 21.2 ms, not 20). Below 1 are still, besides the
  client's own time per call: the tail (the last calls, when fewer than 8 are left to
  fill the slots), recorded as ``share_a_free_client_gets`` (the same draws in the same
  order on 8 slots that never wait: about 0.967 for seed 0); and the HTTP stack on both
  ends, outside the simulator's timing: the fourth side, ``raw``, is the cheapest client
  we can write (``raw_peer.py``: sign, send, read, parse nothing), run in the same repeats.
- at zero latency (100,000 ids: 20,000 took under a second, short enough for another
  tenant of a shared machine to move one side's figure by half), where the client's own
  cost decides: ids/s, and CPU seconds per 1,000
  ids. The goal's figure is **net**: the child's CPU less that of a baseline child of the
  same side, run just before it, that does everything but the calls. Ours' baseline is the
  same ``run`` command, keys and flags against a simulator, with an empty input: it
  imports what a real run imports and builds the session, client and credentials, and
  sends nothing; the SDK's is ``sdk_peer.py`` in ``async-setup`` / ``threads-setup`` mode
  with an empty ids file: it imports the SDK and builds the config, credentials and
  client, and sends nothing. Both baselines are checked to send no call. Start-up is about
  1 s of CPU on every side against 0.5-2 s of work, so on a noisy machine the net figure
  moves a lot; two more are recorded beside it: gross (the whole child) and **in-run**
  (each process's own CPU, every thread, read inside it: ``cpu_s`` of ours'
  ``run.summary``, which also covers opening the ledger and the session, so it charges
  ours for set-up that the SDK peer's, from its first call on, does not). The ratios are
  recorded per repeat too (``by_repeat``), to show how far the noise goes. The simulator's
  own CPU during each run is recorded (``sim_busy_share``: its CPU seconds ÷ the run's
  seconds) to show it had CPU to spare.
- where a slot waits at 20 ms (``test_where_a_slot_waits_at_20ms``): ours and raw alternated
  under ``handoff.py``, the time from each answer read to the slot's next request, and for
  ours the stages it passes (parse, settle, the next batch, the token, the request).
- the simulator's own capacity (``test_simulator_is_not_the_bottleneck``): a raw aiohttp
  client that signs each call with ``worker.api.signer`` and reads the body without parsing it,
  at the same concurrency and batch size; the simulator's CPU per call (``/proc/<pid>/stat``)
  gives the calls/s it could serve on one whole CPU.
"""

from __future__ import annotations

import heapq
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.benchmarks.harness import (
    AK,
    PROJECT,
    SK,
    SimProcess,
    machine,
    median,
    record,
    repeats,
    simulator,
)
from tests.benchmarks.raw_peer import raw_deletes
from worker.simulator import FaultConfig
from worker.simulator.faults import FaultPlan

pytestmark = pytest.mark.benchmark

IDS = 20_000
ZERO_IDS = 5 * IDS
"""At zero latency: 20,000 ids took 0.4-0.8 s a side, and on a shared machine one other
tenant's burst moved a side's figure by half (the ratios of one repeat ran 0.94-1.76)."""
SIM_IDS = 5 * IDS  # the simulator's capacity run
BATCH = 50
CONCURRENCY = 8
LATENCY_S = 0.020
PEER = Path(__file__).with_name("sdk_peer.py")
RAW = Path(__file__).with_name("raw_peer.py")
HANDOFF = Path(__file__).with_name("handoff.py")
SIDES = ("ours", "sdk_async", "sdk_threads", "raw")
"""``raw`` is the floor, not a contender: the cheapest client we can write (``raw_peer.py``),
run in the same repeats as the others, so what no client of this stack can beat on this
machine is measured beside the goals, not assumed."""
PYCACHE = Path(tempfile.gettempdir()) / "devserver-reaper-bench-pycache"
LONG = pytest.mark.timeout(1800)
"""For each test here: ``BENCH_REPEATS`` runs of child processes (and, at zero latency, a
baseline child before each) outlast pytest's default 120 s."""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    return env


def _child(args: list[str], stdout: Any = subprocess.PIPE) -> tuple[str, float]:
    """Run a child to the end: (its stdout, its CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        args, stdout=stdout, stderr=subprocess.PIPE, text=True, check=False, env=_child_env()
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise AssertionError(f"{args[:4]} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout or "", cpu


def _run_args(url: str, ids_file: Path) -> list[str]:
    """Ours' ``run`` as every figure here runs it: events to a file, no rate limit."""
    return ["run", "--input", str(ids_file), "--yes",
            "--endpoint", url, "--project-id", PROJECT, "--ak", AK, "--sk", SK,
            "--batch-size", str(BATCH), "--concurrency", str(CONCURRENCY),
            "--rate", "10000", "--burst", "10000", "--log-format", "json",
            "--progress", "off"]  # fmt: skip


def _ours(url: str, ids_file: Path, tmp: Path, *, expect: int = IDS) -> dict[str, float]:
    events = tmp / "events.jsonl"
    args = [sys.executable, "-m", "worker", *_run_args(url, ids_file)]
    with events.open("w") as out:
        _, cpu = _child(args, stdout=out)
    summary = json.loads(events.read_text().splitlines()[-1])
    assert summary["event"] == "run.summary" and summary["deleted"] == expect, summary
    return {"seconds": summary["duration_s"], "cpu": cpu, "run_cpu": summary["cpu_s"]}


def _peer(
    script: Path, url: str, ids_file: Path, mode: str, *, expect: int = IDS
) -> dict[str, float]:
    """A peer script's run (``sdk_peer.py``, ``raw_peer.py``): its own seconds and CPU from
    its first call on, and the child's whole CPU."""
    out, cpu = _child([sys.executable, str(script), url, PROJECT, AK, SK, str(ids_file), mode,
                       str(BATCH), str(CONCURRENCY)])  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    assert result["errors"] == 0 and result["ids"] == expect, result
    return {"seconds": result["seconds"], "cpu": cpu, "run_cpu": result["cpu"]}


def _run_side(
    side: str, url: str, ids_file: Path, tmp: Path, *, baseline: bool = False, ids: int = IDS
) -> dict[str, float]:
    """One side's child on ``ids_file`` (``ids`` of them); a ``baseline`` is given an empty
    file."""
    expect = 0 if baseline else ids
    if side == "ours":
        return _ours(url, ids_file, tmp, expect=expect)
    script, mode = (RAW, side) if side == "raw" else (PEER, side.removeprefix("sdk_"))
    return _peer(script, url, ids_file, f"{mode}-setup" if baseline else mode, expect=expect)


def _baseline(side: str, tmp: Path) -> float:
    """CPU seconds of a child that does everything the side's real run does but the calls
    (interpreter, imports, settings, session, credentials, client), to subtract."""
    empty = tmp / "empty.txt"
    empty.write_text("")
    with simulator(tmp, jobs=0) as sim:
        cpu = _run_side(side, sim.url, empty, tmp, baseline=True)["cpu"]
        assert sim.stats()["calls"] == 0, f"{side}'s baseline sent a call"
    return cpu


@pytest.fixture(scope="module", autouse=True)
def _warm_bytecode_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One unmeasured baseline per side first, so no measured child compiles a module."""
    tmp = tmp_path_factory.mktemp("warm")
    for side in SIDES:
        _baseline(side, tmp)
    return


def _measure(
    tmp: Path, latency_ms: float, *, net: bool = False, ids: int = IDS
) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, float]]]]:
    """Per side, medians over ``BENCH_REPEATS`` runs (sides interleaved) of: seconds, CPU,
    the realised and nominal shares of the latency ceiling, the realised mean latency, and
    the simulator's busy share; and the runs themselves. With ``net``, each run is paired
    with a baseline child of its own side just before it (``net_cpu``: the run's CPU less
    that baseline's), so a machine that drifts between runs moves both alike."""
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for _ in range(repeats(3)):
        for side in SIDES:
            baseline = _baseline(side, tmp) if net else 0.0
            with simulator(tmp, jobs=ids, latency_ms=latency_ms) as sim:
                assert len(sim.ids) == ids
                ids_file = tmp / "ids.txt"
                ids_file.write_text("".join(f"{i}\n" for i in sim.ids))
                sim_cpu = sim.cpu_seconds()
                figures = _run_side(side, sim.url, ids_file, tmp, ids=ids)
                # Every side is timed the same way, by the simulator: from its first DELETE's
                # arrival to its last DELETE's answer. The sides' own clocks start at
                # different places (ours before the ledger and the session are set up, the
                # SDK's after its client is built); theirs are kept as ``client_seconds``.
                figures["client_seconds"] = figures["seconds"]
                figures["seconds"] = sim.stats()["delete_span_s"]
                figures["sim_busy_share"] = (sim.cpu_seconds() - sim_cpu) / figures["seconds"]
                figures.update(_latency_figures(sim, figures["seconds"], ids))
                if net:
                    figures["baseline_cpu"] = baseline
                    figures["net_cpu"] = figures["cpu"] - baseline
                runs[side].append(figures)
    medians = {
        side: {key: median([r[key] for r in values]) for key in values[0]}
        for side, values in runs.items()
    }
    return medians, runs


def _latency_figures(sim: SimProcess, seconds: float, ids: int) -> dict[str, float]:
    """What the simulator says it delayed, turned into ceiling shares of ``seconds``."""
    stats = sim.stats()
    assert stats["deleted"] == ids
    calls = stats["latency_calls"]
    if calls == 0:
        return {}
    assert calls == stats["calls"] == ids / BATCH, stats  # every call was delayed, none retried
    drawn = stats["latency_s"] / CONCURRENCY
    return {
        "realised_share": stats["latency_served_s"] / CONCURRENCY / seconds,
        "drawn_share": drawn / seconds,
        "nominal_share": calls * LATENCY_S / CONCURRENCY / seconds,
        "mean_latency_ms": stats["latency_served_s"] / calls * 1000,
        "free_client_share": drawn / _free_client_seconds(calls, stats["latency_s"]),
        "timer_lateness_ms": (stats["latency_served_s"] - stats["latency_s"]) / calls * 1000,
    }


def _free_client_seconds(calls: int, drawn_s: float) -> float:
    """How long a client that costs nothing takes on the simulator's draws (seed 0, drawn in
    the order the calls arrive): each of the ``CONCURRENCY`` slots sends the next call the
    moment its last one ends. More than ``drawn_s / CONCURRENCY`` by the tail alone: at the
    end, fewer calls are left than slots."""
    plan = FaultPlan(FaultConfig(latency_ms=LATENCY_S * 1000), seed=0)
    draws = [plan.latency() for _ in range(calls)]
    assert sum(draws) == drawn_s  # the very draws the simulator made
    slots = [0.0] * CONCURRENCY
    for draw in draws:
        heapq.heappush(slots, heapq.heappop(slots) + draw)
    return max(slots)


def _by_side(figures: dict[str, dict[str, float]], key: str, digits: int = 3) -> dict[str, float]:
    return {side: round(f[key], digits) for side, f in figures.items()}


@LONG
def test_share_of_the_latency_ceiling_at_20ms(tmp_path: Path) -> None:
    figures, runs = _measure(tmp_path, LATENCY_S * 1000)
    realised = _by_side(figures, "realised_share")
    # Ours over the floor within each repeat (the two a few seconds apart): on a shared
    # machine the load moves both sides' shares from one repeat to the next.
    same_run = [round(o["realised_share"] / r["realised_share"], 3)
                for o, r in zip(runs["ours"], runs["raw"], strict=True)]  # fmt: skip
    record("sdk_latency_share", latency_ms=LATENCY_S * 1000,
           nominal_ceiling_calls_per_s=CONCURRENCY / LATENCY_S,
           shares_realised=realised, shares_drawn=_by_side(figures, "drawn_share"),
           shares_nominal=_by_side(figures, "nominal_share"),
           mean_latency_ms_served=_by_side(figures, "mean_latency_ms", 2),
           share_a_free_client_gets=_by_side(figures, "free_client_share"),
           ours_share_of_raw=round(realised["ours"] / realised["raw"], 3),
           ours_share_of_raw_by_repeat=same_run,
           ours_share_of_raw_same_run_median=median(same_run),
           load_average=[round(x, 2) for x in os.getloadavg()],
           sim_timer_lateness_ms=_by_side(figures, "timer_lateness_ms"),
           seconds=_by_side(figures, "seconds"),
           client_seconds=_by_side(figures, "client_seconds"),
           sim_busy_share=_by_side(figures, "sim_busy_share"),
           machine=machine())  # fmt: skip
    # Issue 23's regression guard (the goal of 0.95 of the ceiling itself is retired: the
    # floor does not reach it here): ours keeps 0.95 of what the floor gets in the same run.
    assert realised["ours"] >= 0.95 * realised["raw"]


@LONG
def test_where_a_slot_waits_at_20ms(tmp_path: Path) -> None:
    """Where ours loses against the floor at 20 ms: each side (ours, raw) run under
    ``handoff.py``, alternated, ``BENCH_REPEATS`` times; per side the medians of the mean
    hand-off (a slot's answer read to its next request started) and, for ours, of each
    stage it passes. Recorded, not asserted: the marks cost a little, so the shares of such a
    run are only read side by side."""
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "raw": []}
    for _ in range(repeats(3)):
        for side in runs:
            with simulator(tmp_path, jobs=IDS, latency_ms=LATENCY_S * 1000) as sim:
                ids_file = tmp_path / "ids.txt"
                ids_file.write_text("".join(f"{i}\n" for i in sim.ids))
                out = tmp_path / "handoff.json"
                args = (_run_args(sim.url, ids_file) if side == "ours" else
                        [sim.url, PROJECT, AK, SK, str(ids_file), "raw", str(BATCH),
                         str(CONCURRENCY)])  # fmt: skip
                with (tmp_path / "events.jsonl").open("w") as events:
                    _child([sys.executable, str(HANDOFF), str(out), side, *args], stdout=events)
                figures = json.loads(out.read_text())
                figures.update(_latency_figures(sim, sim.stats()["delete_span_s"], IDS))
                runs[side].append(figures)
    medians = {
        side: {
            "handoff_mean_ms": median([r["mean_ms"] for r in values]),
            "handoff_p50_ms": median([r["p50_ms"] for r in values]),
            "handoff_p90_ms": median([r["p90_ms"] for r in values]),
            "realised_share": round(median([r["realised_share"] for r in values]), 3),
            **{
                key: {stage: median([r[key][stage] for r in values]) for stage in values[0][key]}
                for key in ("stages_ms", "stages_cpu_ms")
            },
        }
        for side, values in runs.items()
    }
    record("sdk_slot_handoff", latency_ms=LATENCY_S * 1000, sides=medians,
           load_average=[round(x, 2) for x in os.getloadavg()], machine=machine())  # fmt: skip


@LONG
def test_client_cost_at_zero_latency(tmp_path: Path) -> None:
    figures, runs = _measure(tmp_path, 0.0, net=True, ids=ZERO_IDS)
    ids_per_s = {side: round(ZERO_IDS / f["seconds"]) for side, f in figures.items()}
    per_1000 = {
        name: {side: round(f[key] / ZERO_IDS * 1000, 4) for side, f in figures.items()}
        for name, key in (("in_run", "run_cpu"), ("net", "net_cpu"), ("gross", "cpu"))
    }
    cpu = per_1000["net"]
    best_sdk = max(ids_per_s["sdk_async"], ids_per_s["sdk_threads"])
    cheapest_sdk = min(cpu["sdk_async"], cpu["sdk_threads"])
    busy = _by_side(figures, "sim_busy_share")
    # The same ratios within each repeat, sides side by side: how far the noise goes.
    by_repeat: dict[str, list[float]] = {"speedup": [], "in_run": [], "net": []}
    for ours, *sdks in zip(runs["ours"], runs["sdk_async"], runs["sdk_threads"], strict=True):
        by_repeat["speedup"].append(round(min(s["seconds"] for s in sdks) / ours["seconds"], 2))
        for name, key in (("in_run", "run_cpu"), ("net", "net_cpu")):
            by_repeat[name].append(round(ours[key] / min(s[key] for s in sdks), 3))
    in_run = per_1000["in_run"]
    # The floor: what the cheapest client of this stack (raw) gets against the SDK, and what
    # ours gets against it. The per-id work run is asked to do has to fit between the two.
    floor = {
        "raw_speedup": round(ids_per_s["raw"] / best_sdk, 2),
        "raw_cpu_ratio": round(cpu["raw"] / cheapest_sdk, 3),
        "raw_cpu_ratio_in_run": round(
            in_run["raw"] / min(in_run["sdk_async"], in_run["sdk_threads"]), 3),
        "ours_share_of_raw_ids_per_s": round(ids_per_s["ours"] / ids_per_s["raw"], 3),
    }  # fmt: skip
    record("sdk_zero_latency", ids_per_s=ids_per_s, cpu_s_per_1000_ids_net=cpu,
           cpu_s_per_1000_ids_in_run=in_run, cpu_s_per_1000_ids_gross=per_1000["gross"],
           startup_cpu_s=_by_side(figures, "baseline_cpu"),
           speedup=round(ids_per_s["ours"] / best_sdk, 2),
           cpu_ratio=round(cpu["ours"] / cheapest_sdk, 3),
           cpu_ratio_in_run=round(
               in_run["ours"] / min(in_run["sdk_async"], in_run["sdk_threads"]), 3),
           by_repeat=by_repeat, floor=floor, sim_busy_share=busy,
           client_seconds=_by_side(figures, "client_seconds"),
           machine=machine())  # fmt: skip
    # The simulator had at least half a CPU to spare for every contender (raw, the floor,
    # outruns it: it sends the next call the moment an answer is read).
    assert max(busy[side] for side in ("ours", "sdk_async", "sdk_threads")) < 0.5
    # Issue 23's regression guards (issue 7's 3x and 1/4 are retired: the per-id work the
    # tool exists to do costs the rest): 2x the SDK's ids/s at half its CPU per id.
    assert ids_per_s["ours"] >= 2 * best_sdk
    assert cpu["ours"] <= cheapest_sdk / 2


@LONG
def test_simulator_is_not_the_bottleneck(tmp_path: Path) -> None:
    """The simulator's own capacity: a raw client deletes 100,000 ids (five times the others'
    20,000, so the CPU clock's 10 ms ticks matter less) at concurrency 8, batches of 50, and
    the simulator child's CPU (``/proc/<pid>/stat``) is read around it."""
    import anyio

    runs: list[dict[str, float]] = []
    for _ in range(repeats(3)):
        with simulator(tmp_path, jobs=SIM_IDS) as sim:
            cpu_before = sim.cpu_seconds()
            seconds, _, failed = anyio.run(
                raw_deletes, sim.url, PROJECT, AK, SK, sim.ids, BATCH, CONCURRENCY
            )
            cpu = sim.cpu_seconds() - cpu_before
            assert failed == 0
            assert sim.stats()["deleted"] == SIM_IDS
            runs.append({"seconds": seconds, "cpu": cpu})
    calls = SIM_IDS / BATCH
    seconds = median([r["seconds"] for r in runs])
    cpu = median([r["cpu"] for r in runs])
    cpu_per_call = cpu / calls
    capacity = 1 / cpu_per_call  # calls/s the simulator could serve on one whole CPU
    record("sdk_simulator_capacity", calls_per_s=round(calls / seconds),
           ids_per_s=round(SIM_IDS / seconds), sim_cpu_ms_per_call=round(cpu_per_call * 1000, 3),
           sim_cpu_s_per_1000_ids=round(cpu / SIM_IDS * 1000, 4),
           sim_busy_share=round(cpu / seconds, 3), sim_cpu_capacity_calls_per_s=round(capacity),
           machine=machine())  # fmt: skip
    # At the 20 ms figure's 400 calls/s the simulator is busy a quarter of a CPU at most.
    assert capacity >= 4 * CONCURRENCY / LATENCY_S


async def _client_deletes(url: str, ids: list[str]) -> tuple[float, float]:
    """Delete ``ids`` through our ``ApiClient`` alone (sign, send, read, parse and validate
    every record), ``CONCURRENCY`` workers, nothing else: no intake, ledger, journal, events.
    Returns (seconds, this process's CPU seconds over them)."""
    import anyio

    from worker.api.client import ApiClient
    from worker.api.credentials import Credentials, StaticCredentials
    from worker.api.session import make_session

    batches = iter([ids[i : i + BATCH] for i in range(0, len(ids), BATCH)])
    session = make_session(concurrency=CONCURRENCY, connect_timeout=10, read_timeout=30)
    try:
        client = ApiClient(session=session, endpoint=url, project_id=PROJECT,
                           credentials=StaticCredentials(Credentials(ak=AK, sk=SK)))  # fmt: skip

        async def worker() -> None:
            for batch in batches:
                answer = await client.delete_jobs(batch)
                assert len(answer.records) == len(batch)

        started, cpu = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as group:
            for _ in range(CONCURRENCY):
                group.start_soon(worker)
        return time.perf_counter() - started, time.process_time() - cpu
    finally:
        await session.close()


@LONG
def test_what_the_http_client_alone_costs(tmp_path: Path) -> None:
    """The floor under ours' zero-latency figures: the same 20,000 ids through ``ApiClient``
    alone, in this process, against the same simulator. The rest of ``run``'s cost is the
    per-id work run is asked to do (validate, de-duplicate, one outcome and one event per id)."""
    import anyio

    runs: list[tuple[float, float]] = []
    for _ in range(repeats(3)):
        with simulator(tmp_path, jobs=IDS) as sim:
            runs.append(anyio.run(_client_deletes, sim.url, sim.ids))
            assert sim.stats()["deleted"] == IDS
    seconds = median([r[0] for r in runs])
    cpu = median([r[1] for r in runs])
    record("sdk_client_alone", ids_per_s=round(IDS / seconds),
           cpu_s_per_1000_ids=round(cpu / IDS * 1000, 4),
           cpu_ms_per_call=round(cpu / (IDS / BATCH) * 1000, 3), machine=machine())  # fmt: skip
