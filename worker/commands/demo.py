"""``devserver-reaper demo``: the whole tour, with no cloud account.

Starts the built-in simulator in this process on a free port with a few hundred jobs, a
quota and some faults; writes an input file with those ids plus a few lines that show the
safety rails (ids that do not exist, duplicates, invalid lines, comments); then runs the real
``run`` path against it and prints the summary.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import anyio
from pydantic import SecretStr

from worker.exit_codes import ExitCode
from worker.settings import Settings

DEMO_AK = "DEMOAK"
DEMO_SK = "demo-secret-key"  # the simulator's own key; not a secret
DEMO_PROJECT = "demo-project"


def main(args: argparse.Namespace, settings: Settings) -> int:
    from worker import logsetup

    logsetup.configure(fmt=settings.log_format, level=settings.log_level)
    return anyio.run(demo, args.jobs, settings)


def write_demo_input(path: Path, job_ids: list[str]) -> dict[str, int]:
    """The demo's input: real ids, plus lines that exercise every outcome but failure."""
    ghosts = [f"00000000-0000-4000-8000-{n:012d}" for n in range(5)]  # never existed
    invalid = ["not a job id!", "x" * 65, "semi;colon"]
    lines = ["# devserver-reaper demo input: one id per line, # starts a comment", ""]
    lines += job_ids + ghosts + invalid + job_ids[:5]  # the last five are repeats
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"jobs": len(job_ids), "ghosts": len(ghosts), "invalid": len(invalid), "repeats": 5}


async def demo(jobs: int, settings: Settings) -> int:
    from worker.commands.run import RunRequest, run_async
    from worker.logsetup import new_run_id
    from worker.simulator import FaultConfig, SimulatorConfig, run_simulator

    faults = FaultConfig(
        error_after=0.03, unavailable=0.03, reset_before=0.02, truncated=0.02, latency_ms=15.0
    )
    config = SimulatorConfig(
        project_id=DEMO_PROJECT, ak=DEMO_AK, sk=DEMO_SK, jobs=jobs, seed=7, quota=40.0, burst=5,
        faults=faults,
    )  # fmt: skip
    async with run_simulator(config) as sim:
        with tempfile.TemporaryDirectory(prefix="reaper-demo-") as tmp:
            ids_file = Path(tmp) / "ids.txt"
            shape = write_demo_input(ids_file, sim.job_ids())
            sys.stderr.write(
                f"demo: simulator at {sim.url} holds {jobs} jobs (quota 40 calls/s, ~10% faults)\n"
                f"demo: input {ids_file}: {shape['jobs']} real ids, {shape['ghosts']} that never "
                f"existed, {shape['repeats']} repeats, {shape['invalid']} invalid lines\n"
            )
            given = settings.model_fields_set
            run_settings = settings.model_copy(
                update={
                    "endpoint": sim.url,
                    "project_id": DEMO_PROJECT,
                    "ak": DEMO_AK,
                    "sk": SecretStr(DEMO_SK),
                    "security_token": None,
                    "yes": True,
                    "dry_run": False,
                    "ledger": None,
                    # A tour, not a race: small batches so there are enough calls to watch.
                    "rate": settings.rate if "rate" in given else 30.0,
                    "batch_size": settings.batch_size if "batch_size" in given else 20,
                    "concurrency": settings.concurrency if "concurrency" in given else 4,
                    "max_attempts": max(settings.max_attempts, 8),
                }
            )
            request = RunRequest(input=str(ids_file), results=str(Path(tmp) / "results.jsonl"))
            code = await run_async(request, run_settings, new_run_id(), sim.url)
            left = len(sim.job_ids())
    why = "some lines were rejected on purpose" if code == ExitCode.SOME_FAILED else "see README"
    sys.stderr.write(f"demo: run exit code {code} ({why}); jobs left on the simulator: {left}\n")
    return ExitCode.OK if code in (ExitCode.OK, ExitCode.SOME_FAILED) and left == 0 else code
