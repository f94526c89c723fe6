"""The real command against an independent fake of the API (``tests.gateway``), which fails
as a gateway in trouble might rather than as our simulator does: what the audit trail says
must still be what the fake did."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import orjson
import pytest

from tests.e2e import kill_when, reaper, reaper_env, results, start_reaper, write_ids
from tests.gateway import Gateway, Script, serve_gateway

pytestmark = pytest.mark.anyio


def deleted_at_least(gateway: Gateway, count: int) -> bool:
    return len(gateway.deleted) >= count


def at_most_in_a_row(faults: list[str], failing: set[str], most: int, seed: int) -> Script:
    """Draw each DELETE's answer from ``faults``, but never a ``failing`` one to a call
    after ``most`` failures in a row, nor to ids whose last ``most`` calls all failed: no
    batch can use up ``--max-attempts`` and the breaker (8 in a row) never opens, so a
    run always finishes however the kills shift the draws."""
    rng = random.Random(seed)
    row = 0
    by_id: Counter[str] = Counter()

    def script(call: int, ids: Sequence[str]) -> str:
        nonlocal row
        fault = rng.choice(faults)
        if fault in failing and (row >= most or any(by_id[i] >= most for i in ids)):
            fault = "ok"
        failed = fault in failing
        row = row + 1 if failed else 0
        for job_id in ids:
            by_id[job_id] = by_id[job_id] + 1 if failed else 0
        return fault

    return script


def fast(src: Path, *more: str) -> list[str]:
    return ["run", "-i", str(src), "--yes", "--batch-size", "10", "--concurrency", "2",
            "--rate", "2000", "--burst", "50", "--max-attempts", "6", *more]  # fmt: skip


async def test_the_cap_holds_over_kills_when_a_guard_rechecks_the_jobs(tmp_path: Path) -> None:
    """``--max-deletions 20`` with a protection rule that reads each job: killed with two
    DELETEs applied and their answers held, then run twice more on the ledger. The jobs
    the dead run deleted end ``deleted`` (unconfirmed), not ``skipped`` for the cap, and
    the fake deletes 20 jobs in all, not 20 more each time the count is lost."""
    gateway = Gateway.with_jobs(60, script=lambda n, ids: "hold" if n <= 2 else "ok")
    async with serve_gateway(gateway) as url:
        src = write_ids(tmp_path / "ids.txt", gateway.job_ids())
        ledger, out = tmp_path / "ledger.db", tmp_path / "results.jsonl"
        env = reaper_env(url)
        args = fast(src, "--ledger", str(ledger), "--max-deletions", "20",
                    "--protect", "name:keep-*")  # fmt: skip
        async with await start_reaper(args, env) as process:
            await kill_when(process, lambda: len(gateway.deleted) >= 20)
        in_flight = set(gateway.deleted)
        gateway.hold.set()
        done = await reaper([*args, "--results", str(out)], env)
        assert done.code == 1, done.stderr  # the rest skipped by the cap
        rows = {row["job_id"]: row for row in results(out)}
        assert {i for i, r in rows.items() if r["outcome"] == "deleted"} == in_flight
        assert all(rows[i]["confirmed"] is False for i in in_flight)
        assert done.summary()["deleted"] == 20
        for _ in range(2):
            again = await reaper(args, env)
            assert again.summary()["max_deletions_left"] == 0, again.stdout
        assert gateway.deleted == in_flight and len(gateway.deleted) == 20


@pytest.mark.parametrize(("refusal", "code"), [("html404", 78), ("apigw404", 78), ("401", 77)])
async def test_a_run_stopped_by_a_refusal_keeps_the_outcome_of_a_delete_on_the_wire(
    tmp_path: Path, refusal: str, code: int
) -> None:
    """One DELETE is refused (a bare 404, the gateway's 404, a 401) while another is on
    the wire and applied: the run stops with nothing more sent, but the jobs that DELETE
    removed end ``deleted`` with their records, not open with nothing said of them."""
    gateway = Gateway.with_jobs(40, script=lambda n, ids: f"late-{refusal}" if n == 1 else "slow")
    async with serve_gateway(gateway) as url:
        src = write_ids(tmp_path / "ids.txt", gateway.job_ids())
        out = tmp_path / "results.jsonl"
        done = await reaper(fast(src, "--results", str(out)), reaper_env(url))
        assert done.code == code, done.stderr
        assert len(gateway.deleted) == 10 and gateway.delete_calls == 2
        deleted = {row["job_id"] for row in results(out) if row["outcome"] == "deleted"}
        assert deleted == gateway.deleted
        assert {event["job_id"] for event in done.events("job.deleted")} == gateway.deleted
        summary = done.summary()
        assert (summary["deleted"], summary["open"]) == (10, 30)


@pytest.mark.parametrize(("cap", "protect"), [(None, False), (70, False), (70, True)])
async def test_kill_9_three_times_then_resume_each_id_one_true_outcome(
    tmp_path: Path, cap: int | None, protect: bool
) -> None:
    """DELETEs that are applied and then answered slowly, with a 502, a reset or a cut
    body; the run killed three times in a row as the fake deletes, then resumed to the end.
    The results file holds one line per id; ``deleted`` is exactly what the fake deleted
    (the lost answers unconfirmed), nothing outside the input is touched, and the cap
    holds over every run, with or without a guard reading each job first."""
    faults = ["slow", "slow", "error_after", "reset_after", "cut", "ok"]
    script = at_most_in_a_row(faults, {"error_after", "reset_after", "cut"}, most=3, seed=18)
    gateway = Gateway.with_jobs(150, script=script)
    gateway.jobs.update(Gateway.with_jobs(20, prefix="other").jobs)  # never in the input
    async with serve_gateway(gateway) as url:
        ids = [i for i in gateway.job_ids() if i.startswith("job-")]
        src = write_ids(tmp_path / "ids.txt", ids)
        ledger, out = tmp_path / "ledger.db", tmp_path / "results.jsonl"
        env = reaper_env(url)
        more = [] if cap is None else ["--max-deletions", str(cap)]
        more += ["--protect", "name:keep-*"] if protect else []  # a look-up before each DELETE
        args = fast(src, "--ledger", str(ledger), "--results", str(out), *more)
        for enough in (15, 30, 45):
            async with await start_reaper(args, env) as process:
                await kill_when(process, partial(deleted_at_least, gateway, enough))
        done = await reaper(args, env)
        assert done.code == (0 if cap is None else 1), done.stderr
        rows = results(out)
        assert sorted(row["job_id"] for row in rows) == ids
        deleted = {row["job_id"] for row in rows if row["outcome"] == "deleted"}
        assert deleted == gateway.deleted
        assert gateway.asked <= set(ids)
        assert len(gateway.deleted) == (150 if cap is None else cap)
        unconfirmed = {row["job_id"] for row in rows if row["confirmed"] is False}
        report = await reaper(["report", "--ledger", str(ledger), "--format", "jsonl"], env)
        exported = [orjson.loads(line) for line in report.stdout.splitlines()]
        assert {row["job_id"] for row in exported if row.get("confirmed") is False} == unconfirmed
        assert sum(row["outcome"] == "deleted" for row in exported) == len(gateway.deleted)


async def test_a_dry_run_between_a_kill_and_the_resume_forgets_nothing(tmp_path: Path) -> None:
    """Killed with two DELETEs applied and their answers held; a dry run on the same ledger
    to see what is left; then the resume. The dry run sends nothing and settles nothing
    for good: the resume still calls the dead run's jobs ``deleted`` (unconfirmed), not
    ``absent``, and the cap still counts them."""
    gateway = Gateway.with_jobs(60, script=lambda n, ids: "hold" if n <= 2 else "ok")
    async with serve_gateway(gateway) as url:
        src = write_ids(tmp_path / "ids.txt", gateway.job_ids())
        ledger, out = tmp_path / "ledger.db", tmp_path / "results.jsonl"
        env = reaper_env(url)
        args = fast(src, "--ledger", str(ledger), "--max-deletions", "30")
        async with await start_reaper(args, env) as process:
            await kill_when(process, partial(deleted_at_least, gateway, 20))
        in_flight = set(gateway.deleted)
        gateway.hold.set()
        calls = gateway.calls
        dry = await reaper([*args, "--dry-run"], env)
        assert dry.code == 0, dry.stderr
        assert gateway.calls == calls
        done = await reaper([*args, "--results", str(out)], env)
        rows = {row["job_id"]: row for row in results(out)}
        assert {i for i, r in rows.items() if r["confirmed"] is False} == in_flight
        assert len(gateway.deleted) == 30, done.summary()
