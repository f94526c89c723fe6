"""A chaos run of ``serve``: replicas killed (-9), frozen (SIGSTOP past ``reclaim_after``)
and restarted, Redis restarted, answers lost after the DELETE was applied, entries sharing
ids, ids that never existed and invalid ids; then the invariants checked from the outcome
rows and the simulator's own record of deletions. Not a test (it is long and random): run
``uv run python -m tests.chaos_serve --seed 1 --chaos 40`` and read its report (exit 1 on
a violation). Its own redis-server on a free port (append-only, fsync always), so a restart
loses nothing the replicas were told was written."""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import orjson
import redis.asyncio as aioredis

from tests.benchmarks import harness
from tests.e2e import Served, collect
from worker.simulator import FaultConfig, SimulatorConfig, run_simulator
from worker.types import ANSWER_LOST

GROUP = "reapers"
STREAM = "chaos:ids"
REDIS = shutil.which("redis-server") or "redis-server"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Redis:
    """A redis-server of its own, restartable on the same port and data."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.folder / "redis.conf"
        conf.write_text("\n".join([
            "bind 127.0.0.1", f"port {self.port}", 'save ""', "appendonly yes",
            "appendfsync always", f"dir {self.folder}", "logfile redis.log"]) + "\n")  # fmt: skip
        self.process = subprocess.Popen([REDIS, str(conf)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class Fleet:
    def __init__(self, sim: Any, redis: Redis, tmp: Path, group: anyio.abc.TaskGroup,
                 flags: list[str]) -> None:  # fmt: skip
        self.sim, self.redis, self.tmp, self.group, self.flags = sim, redis, tmp, group, flags
        self.replicas: dict[str, Served] = {}
        self.history: list[Served] = []

    async def start(self, name: str) -> Served:
        command = [sys.executable, "-m", "worker", "serve", "--endpoint", self.sim.url,
                   "--project-id", self.sim.config.project_id, "--ak", self.sim.config.ak,
                   "--stream", STREAM, "--group", GROUP, "--consumer", name,
                   "--redis-url", self.redis.url, "--http-port", "0", "--log-format", "json",
                   *self.flags]  # fmt: skip
        err = (self.tmp / f"{name}-{len(self.history)}.err").open("wb")
        process = await anyio.open_process(
            command, env=harness.clean_env() | {"REAPER_SK": self.sim.config.sk}, stderr=err
        )
        served = Served(process)
        self.replicas[name] = served
        self.history.append(served)
        self.group.start_soon(collect, served)
        with anyio.fail_after(180):
            await served.started.wait()
        return served


def make_entries(rng: random.Random, jobs: list[str], n: int) -> list[list[str]]:
    """``n`` entries of 1-4 ids: existing jobs (a third of them named by 2-3 entries), ids
    that never existed, and invalid ids."""
    pool = list(jobs)
    rng.shuffle(pool)
    shared = pool[: len(pool) // 3]
    single = pool[len(pool) // 3 :]
    entries: list[list[str]] = []
    for _ in range(n):
        ids: list[str] = []
        for _ in range(rng.randint(1, 4)):
            draw = rng.random()
            if draw < 0.1:
                ids.append(str(uuid.UUID(int=rng.getrandbits(128), version=4)))  # never existed
            elif draw < 0.17:
                ids.append(rng.choice(["bad id!", "x/y", "a" * 70, "é"]))
            elif draw < 0.55 and shared:
                ids.append(rng.choice(shared))
            elif single:
                ids.append(single.pop())
        if ids:
            entries.append(ids)
    return entries


async def chaos(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="chaos-serve-"))
    redis = Redis(tmp)
    redis.start()
    faults = FaultConfig(reset_after=args.lost, truncated=args.lost / 2, latency_ms=40)
    flags = ["--batch-size", "3", "--concurrency", "3", "--rate", "40", "--burst", "5",
             "--reclaim-after", "2", "--max-attempts", "3", "--grace", "2",
             "--max-deliveries", str(args.max_deliveries)]  # fmt: skip
    said: dict[str, Any] = {"tmp": str(tmp), "seed": args.seed, "actions": []}
    try:
        async with (
            run_simulator(SimulatorConfig(jobs=args.jobs, seed=args.seed, faults=faults)) as sim,
            anyio.create_task_group() as group,
        ):
            jobs = sim.job_ids()
            entries = make_entries(rng, jobs, args.entries)
            client = aioredis.Redis.from_url(redis.url)
            fleet = Fleet(sim, redis, tmp, group, flags)
            async with anyio.create_task_group() as starting:
                for name in ("r1", "r2", "r3"):
                    starting.start_soon(fleet.start, name)
            added: dict[str, list[str]] = {}
            waves = 4
            per = (len(entries) + waves - 1) // waves
            end = time.monotonic() + args.chaos
            wave = 0
            redis_done = False
            while time.monotonic() < end:
                if wave < waves:
                    for ids in entries[wave * per : (wave + 1) * per]:
                        with contextlib.suppress(Exception):
                            entry: Any = await client.xadd(STREAM, {"ids": orjson.dumps(ids)})
                            added[entry.decode()] = ids
                    wave += 1
                await anyio.sleep(rng.uniform(0.5, 2.0))
                action = rng.choice(["kill", "kill", "stop", "stop"])
                if not redis_done and time.monotonic() > end - args.chaos / 2:
                    action, redis_done = "redis", True
                name = rng.choice(sorted(fleet.replicas))
                served = fleet.replicas[name]
                said["actions"].append((action, name, round(end - time.monotonic(), 1)))
                if action == "kill":
                    served.process.kill()
                    await served.process.wait()
                    fresh = rng.random() < 0.5
                    new = f"{name}x" if fresh else name
                    if fresh:
                        del fleet.replicas[name]
                    group.start_soon(fleet.start, new)
                elif action == "stop":
                    served.process.send_signal(signal.SIGSTOP)
                    await anyio.sleep(rng.uniform(2.5, 5.0))
                    served.process.send_signal(signal.SIGCONT)
                elif action == "redis":
                    redis.kill()
                    await anyio.sleep(rng.uniform(0.5, 2.0))
                    redis.start()
                    await client.aclose()
                    client = aioredis.Redis.from_url(redis.url)
            while wave < waves:  # the rest, if the chaos was short
                for ids in entries[wave * per : (wave + 1) * per]:
                    entry = await client.xadd(STREAM, {"ids": orjson.dumps(ids)})
                    added[entry.decode()] = ids
                wave += 1
            sim.set_faults(FaultConfig())
            finisher = await fleet.start("finisher")
            with anyio.fail_after(args.settle):
                while True:
                    info: Any = await client.xpending(STREAM, GROUP)
                    groups: Any = await client.xinfo_groups(STREAM)
                    lag = groups[0].get("lag")
                    if int(info["pending"]) == 0 and lag == 0:
                        break
                    await anyio.sleep(0.5)
            await anyio.sleep(1.0)  # writes after the last ack
            for served in fleet.replicas.values():
                if served.process.returncode is None:
                    served.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                for served in fleet.history:
                    if served.process.returncode is None:
                        with contextlib.suppress(Exception):
                            await served.process.wait()
            raw: Any = await client.xrange(STREAM + ":outcomes")
            rows = [{k.decode(): v.decode() for k, v in f.items()} for _, f in raw]
            left_notes: list[Any] = await client.keys(STREAM + ":sending:*")
            left_written: list[Any] = await client.keys(STREAM + ":written:*")
            left_errors: Any = await client.hgetall(STREAM + ":lasterror")
            dead: Any = await client.xlen(STREAM + ":dead")
            await client.aclose()
            events = [e for s in fleet.history for e in s.events]
            (tmp / "raw.json").write_bytes(orjson.dumps({
                "added": added, "rows": rows, "jobs": jobs, "deleted": sorted(sim.deleted),
                "delete_counts": sim.delete_counts, "events": events}))  # fmt: skip
            group.cancel_scope.cancel()
            said.update(check(added, rows, set(jobs), set(sim.deleted), sim, events))
            said["left"] = {"notes": len(left_notes), "written": len(left_written),
                            "lasterror": len(left_errors), "dead": dead}  # fmt: skip
            said["finisher_deleted"] = len(finisher.named("job.deleted"))
            said["stats"] = {"delete_calls": sim.stats.delete_calls,
                             "faults": dict(sim.stats.faults)}  # fmt: skip
    finally:
        redis.kill()
    said["violations_total"] = len(said.get("violations", []))
    if (left := said.get("left")) and (left["notes"] or left["lasterror"]):
        said.setdefault("violations", []).append(("leak", left))
        said["violations_total"] = len(said["violations"])
    print(json.dumps(said, indent=1, default=str))
    return 1 if said["violations_total"] else 0


def _escape(job_id: str) -> str:
    from worker.input.intake import escape

    return job_id if _valid(job_id) else escape(job_id)


def _valid(job_id: str) -> bool:
    from worker.input.intake import validate
    from worker.types import Candidate

    return isinstance(validate(job_id, 1), Candidate)


def check(added: dict[str, list[str]], rows: list[dict[str, str]], existed: set[str],
          deleted: set[str], sim: Any, events: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The invariants, from the rows and the simulator's record."""
    violations: list[Any] = []
    unknowable = in_doubt = 0
    by_pair: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for row in rows:
        for entry in row["entry"].split(","):
            by_pair.setdefault((entry, row["job_id"]), []).append(
                (row["outcome"], row["error_msg"])
            )
    # A look (an entry given up) found the job there, so a deletion of it came later.
    looked = {(entry, row["job_id"]) for row in rows for entry in row["entry"].split(",")
              if row["outcome"] == "failed" and row["batch_id"].endswith(".look")}  # fmt: skip
    looked_then_deleted = 0
    asked: set[str] = set()
    outcomes: dict[str, int] = {}
    for entry, ids in added.items():
        for job_id in dict.fromkeys(ids):
            key = (entry, _escape(job_id))
            got = by_pair.pop(key, [])
            asked.add(job_id)
            if len(got) != 1:
                violations.append(("rows", entry, job_id, got))
                continue
            outcome, error = got[0]
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            valid = _valid(job_id)
            if not valid and outcome != "rejected":
                violations.append(("untrue", entry, job_id, outcome, "invalid"))
            elif valid and outcome == "deleted" and job_id not in deleted:
                if job_id not in existed and error == "answer_lost":
                    unknowable += 1  # documented: a lost answer, then a 404, is ours
                    continue
                violations.append(("untrue", entry, job_id, outcome, "not deleted"))
            elif valid and outcome == "absent" and job_id in existed - deleted:
                violations.append(("untrue", entry, job_id, outcome, "still exists"))
            elif outcome == "failed" and job_id in deleted:
                if error.startswith(ANSWER_LOST):  # documented: sent unheard, may be gone
                    in_doubt += 1
                    continue
                if (entry, job_id) in looked:
                    looked_then_deleted += 1
                    continue
                violations.append(("untrue?", entry, job_id, outcome, "deleted"))
    for key, got in by_pair.items():
        violations.append(("row of nothing asked", key, got))
    if deleted - asked:
        violations.append(("deleted unasked", sorted(deleted - asked)))
    if any(c > 1 for c in sim.delete_counts.values()):
        violations.append(("deleted twice", [i for i, c in sim.delete_counts.items() if c > 1]))
    # A job deleted that every entry naming it was told is absent: someone's call deleted it.
    entries_of: dict[str, list[str]] = {}
    for entry, ids in added.items():
        for job_id in dict.fromkeys(ids):
            entries_of.setdefault(job_id, []).append(entry)
    absent_shared = 0
    for job_id in deleted:
        said = [o for e in entries_of.get(job_id, []) for o in [*rowsof(rows, e, job_id)]]
        doubted = any(r["error_msg"].startswith(ANSWER_LOST) for r in rows
                      if r["job_id"] == job_id and r["outcome"] == "failed")  # fmt: skip
        if said and "deleted" not in said and not doubted:
            violations.append(("deleted but all absent", job_id, entries_of[job_id], said))
        if "absent" in said:
            absent_shared += 1
    return {"violations": violations, "outcomes": outcomes, "entries": len(added),
            "pairs": sum(len(set(i)) for i in added.values()), "rows": len(rows),
            "deleted": len(deleted), "never_existed_deleted_answer_lost": unknowable,
            "failed_in_doubt_deleted": in_doubt, "looked_there_then_deleted": looked_then_deleted,
            "absent_on_deleted_shared": absent_shared,
            "events_absent": sum(1 for e in events if e.get("event") == "job.absent")}  # fmt: skip


def rowsof(rows: list[dict[str, str]], entry: str, job_id: str) -> list[str]:
    return [r["outcome"] for r in rows
            if r["job_id"] == job_id and entry in r["entry"].split(",")]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=150)
    parser.add_argument("--entries", type=int, default=160)
    parser.add_argument("--chaos", type=float, default=40.0)
    parser.add_argument("--lost", type=float, default=0.15)
    parser.add_argument("--settle", type=float, default=240.0)
    parser.add_argument("--max-deliveries", type=int, default=50)
    sys.exit(anyio.run(chaos, parser.parse_args()))


if __name__ == "__main__":
    main()
