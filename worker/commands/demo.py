"""``devserver-reaper demo``: the whole tour, with no cloud account, in about ten seconds.

Starts the built-in simulator in this process (a few hundred jobs, a quota, about 10 % of
calls failing the ways a real API fails), then walks the recommended flow against it, one
narrated line a step and one line of what came of it: check the credentials, discover a
selection into a plan, read the plan, dry-run it, run it with a ledger (stopped by Ctrl-C,
as a person or a pod eviction would stop it) and run it again to finish, run a file
of ids whose bad lines are there on purpose, and read the ledger. Each step is the real
command's code; only the narration is the demo's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import tempfile
from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import structlog
from pydantic import SecretStr

from worker.exit_codes import ExitCode
from worker.settings import Settings
from worker.stdio import Report

DEMO_AK = "DEMOAK"
DEMO_SK = "demo-secret-key"  # the simulator's own key; not a secret
DEMO_PROJECT = "demo-project"
STEPS = 8


def main(args: argparse.Namespace, settings: Settings) -> int:
    from worker import logsetup

    summaries = Summaries()
    logsetup.configure_for_people(render=summaries, write=lambda line: None)
    return anyio.run(demo, args.jobs, settings, summaries)


class Summaries:
    """A structlog processor that keeps each command's summary event and shows no event:
    the demo narrates instead."""

    def __init__(self) -> None:
        self.last: dict[str, dict[str, Any]] = {}

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        name = str(event.get("event", ""))
        if name.endswith(".summary"):
            self.last[name] = dict(event)
        raise structlog.DropEvent

    def __repr__(self) -> str:
        return f"Summaries({sorted(self.last)})"


async def _interrupt_after(sim: Any, deleted: int) -> None:
    """Ctrl-C, as a person would press it, once ``deleted`` jobs are gone."""
    while len(sim.deleted) < deleted:  # noqa: ASYNC110 (the simulator has no event to wait on)
        await anyio.sleep(0.005)
    os.kill(os.getpid(), signal.SIGINT)


def write_demo_input(path: Path, job_ids: list[str]) -> dict[str, int]:
    """A file of ids with the lines real files hold: ids that never existed, repeats,
    comments, and invalid lines (rejected on purpose, never sent)."""
    ghosts = [f"00000000-0000-4000-8000-{n:012d}" for n in range(5)]  # never existed
    invalid = ["not a job id!", "x" * 65, "semi;colon"]
    lines = ["# devserver-reaper demo input: one id per line, # starts a comment", ""]
    lines += job_ids + ghosts + invalid + job_ids[:5]  # the last five are repeats
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"jobs": len(job_ids), "ghosts": len(ghosts), "invalid": len(invalid), "repeats": 5}


def _say(step: int, text: str) -> None:
    sys.stderr.write(f"[{step}/{STEPS}] {text}\n")
    sys.stderr.flush()


def _came(text: str) -> None:
    sys.stderr.write(f"      → {text}\n")
    sys.stderr.flush()


def _counts(summary: dict[str, Any], *names: str) -> str:
    return ", ".join(f"{name} {summary.get(name, 0):,}" for name in names if summary.get(name))


async def demo(jobs: int, settings: Settings, summaries: Summaries | None = None) -> int:
    from worker.commands import check, discover
    from worker.commands.run import RunRequest, run_async
    from worker.discovery.guard import Protection
    from worker.discovery.plan import open_plan
    from worker.ledger import open_readonly
    from worker.logsetup import new_run_id
    from worker.simulator import FaultConfig, SimulatorConfig, run_simulator

    seen = summaries if summaries is not None else Summaries()
    faults = FaultConfig(
        error_after=0.03, unavailable=0.03, reset_before=0.02, truncated=0.02, latency_ms=15.0
    )
    config = SimulatorConfig(
        project_id=DEMO_PROJECT, ak=DEMO_AK, sk=DEMO_SK, jobs=jobs, seed=7, quota=40.0, burst=5,
        faults=faults,
    )  # fmt: skip
    async with run_simulator(config) as sim:
        given = settings.model_fields_set
        tour = settings.model_copy(
            update={
                "endpoint": sim.url, "project_id": DEMO_PROJECT, "ak": DEMO_AK,
                "sk": SecretStr(DEMO_SK), "security_token": None, "yes": True,
                "dry_run": False, "ledger": None, "deadline": None,
                # A tour, not a race: small batches, under the simulator's quota.
                "rate": settings.rate if "rate" in given else 30.0,
                "batch_size": settings.batch_size if "batch_size" in given else 20,
                "concurrency": settings.concurrency if "concurrency" in given else 4,
                "max_attempts": max(settings.max_attempts, 8),
            }
        )  # fmt: skip
        with (
            tempfile.TemporaryDirectory(prefix="reaper-demo-") as tmp,
            contextlib.ExitStack() as stack,
        ):
            here = Path(tmp)
            plan_path, ledger = here / "plan.txt", here / "reaper.db"
            _say(1, f"simulate: a fake ModelArts project of {jobs} jobs at {sim.url}, quota "
                    "40 calls/s, about 10% of calls failing as a real API can")  # fmt: skip
            _came(f"export REAPER_ENDPOINT={sim.url} REAPER_PROJECT_ID={DEMO_PROJECT} "
                  f"REAPER_AK={DEMO_AK} REAPER_SK={DEMO_SK}   (a fake's keys)")  # fmt: skip

            _say(2, "check: one signed read-only call; deletes nothing")
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                code = await check.check(tour, Report("check"))
            result = [line for line in printed.getvalue().splitlines() if line[:6] in
                      ("result", "clock ")]  # fmt: skip
            _came("; ".join(" ".join(line.split()) for line in result))
            if code != ExitCode.OK:
                return code

            _say(3, "discover --status FINISHED --older-than 30d --plan plan.txt: choose by "
                    "what jobs are, and seal the choice for review")  # fmt: skip
            from worker.cli import build_parser

            argv = ["discover", "--status", "FINISHED", "--older-than", "30d",
                    "--plan", str(plan_path)]  # fmt: skip
            request = discover.DiscoverRequest.from_args(
                build_parser().parse_args(argv), datetime.now(UTC)
            )
            code = await discover.discover(request, tour, Protection(), io.StringIO())
            found = seen.last.get("discover.summary", {})
            _came(f"{found.get('selected', 0):,} of the project's "
                  f"{found.get('inventory_size', 0):,} jobs selected")  # fmt: skip
            if code != ExitCode.OK:
                return code

            plan = stack.enter_context(open_plan(plan_path, key=None))
            _say(4, "plan show plan.txt: the review (by type, status, user, age); run --plan "
                    "refuses the plan edited, expired or for another project")  # fmt: skip
            by_type = plan.header.review.get("by_type", {})
            types = ", ".join(f"{t} {n}" for t, n in sorted(by_type.items(), key=lambda x: -x[1]))
            hours = (plan.header.expires_at - datetime.now(UTC)).total_seconds() / 3600
            _came(f"{len(plan):,} jobs: {types}; valid for {hours:.0f} h")

            _say(5, "run --plan plan.txt --dry-run: what would go; sends nothing")
            dry = tour.model_copy(update={"dry_run": True})
            await run_async(RunRequest(str(plan_path), plan=True), dry, new_run_id(), sim.url,
                            plan=plan)  # fmt: skip
            _came(f"would delete {seen.last['run.summary'].get('would_delete', 0):,}; the "
                  f"simulator still holds {len(sim.job_ids()):,} jobs")  # fmt: skip

            _say(6, "run --plan plan.txt --ledger reaper.db, interrupted by Ctrl-C once 40 "
                    "jobs are gone (calls already sent finish and count), then the same "
                    "command again: it resumes")  # fmt: skip
            for attempt in ("first", "again"):
                again = tour.model_copy(update={"ledger": ledger})
                async with anyio.create_task_group() as group:
                    if attempt == "first":
                        group.start_soon(_interrupt_after, sim, 40)
                    code = await run_async(RunRequest(str(plan_path), plan=True), again,
                                           new_run_id(), sim.url, plan=plan)  # fmt: skip
                    group.cancel_scope.cancel()
                ran = seen.last["run.summary"]
                did = _counts(ran, "deleted", "absent", "failed", "skipped", "already_done")
                _came(f"{attempt}: {did}; open {ran['open']:,}; exit {code}")
            if code != ExitCode.OK:
                return code

            _say(7, "run -i ids.txt --ledger reaper.db: a file with ids that never existed, "
                    "repeats and 3 bad lines, there on purpose")  # fmt: skip
            ids_file = here / "ids.txt"
            write_demo_input(ids_file, sim.job_ids())
            again = tour.model_copy(update={"ledger": ledger})
            code = await run_async(RunRequest(str(ids_file), results=str(here / "results.jsonl")),
                                   again, new_run_id(), sim.url)  # fmt: skip
            ran = seen.last["run.summary"]
            _came(f"{_counts(ran, 'deleted', 'absent', 'rejected', 'repeated')}; exit {code}, "
                  "as meant: it says some lines were rejected")  # fmt: skip

            _say(8, "report --ledger reaper.db: what the ledger holds, even while a run has it")
            with open_readonly(ledger) as view:
                held, runs = view.counts(), view.runs()
            _came(f"{_counts(held, 'deleted', 'absent', 'failed')}, rejected lines "
                  f"{held['rejected_lines']}, open {held['open']}; {len(runs)} runs")  # fmt: skip
            left = len(sim.job_ids())
    done = code in (ExitCode.OK, ExitCode.SOME_FAILED) and left == 0
    sys.stderr.write(
        ("demo: done, every job deleted, each id with one outcome. " if done else
         f"demo: {left} jobs left on the simulator (exit {code}). ")
        + "Next: devserver-reaper simulate, paste its export line, and try any command.\n"
    )  # fmt: skip
    return ExitCode.OK if done else code
