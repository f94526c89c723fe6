"""The real command against answers that speak of other jobs than the ones asked about, and
input lines that name more ids than they are read for: what is deleted must be what the
rules looked at, and every id named must end with an outcome."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import reaper, reaper_env, results, write_ids
from tests.gateway import Gateway, always, serve_gateway
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = pytest.mark.anyio


def fast(src: Path, *more: str) -> list[str]:
    return ["run", "-i", str(src), "--yes", "--rate", "2000", "--burst", "50",
            "--max-attempts", "3", *more]  # fmt: skip


async def test_a_show_call_answered_with_another_job_does_not_clear_a_protected_one(
    tmp_path: Path,
) -> None:
    """``--protect 'prod-*'`` and a file naming ``prod-db``, a job the listing has not caught
    up with, whose show call answers with the record of ``job-0000`` (unprotected): the
    rule never saw ``prod-db``, so it is not deleted (``failed``, not checked), and
    ``job-0001`` beside it is."""
    gateway = Gateway.with_jobs(3)
    gateway.jobs["prod-db"] = {"id": "prod-db", "name": "prod-db", "type": "COMMON",
                               "status": "FINISHED", "create_at": 1749536420547}  # fmt: skip
    gateway.unlisted.add("prod-db")
    gateway.shows["prod-db"] = "job-0000"
    async with serve_gateway(gateway) as url:
        src = write_ids(tmp_path / "ids.txt", ["prod-db", "job-0001"])
        out = tmp_path / "results.jsonl"
        done = await reaper(fast(src, "--protect", "prod-*", "--results", str(out)),
                            reaper_env(url))  # fmt: skip
    assert "prod-db" not in gateway.asked, done.stdout
    assert gateway.deleted == {"job-0001"}
    rows = {row["job_id"]: row for row in results(out)}
    assert rows["prod-db"]["outcome"] == "failed"
    assert "job-0000" in rows["prod-db"]["error_msg"]
    assert rows["job-0001"]["outcome"] == "deleted"
    assert done.code == 1, done.stderr


async def test_a_delete_answer_naming_jobs_nobody_asked_for_reports_only_the_asked(
    tmp_path: Path,
) -> None:
    """Each DELETE's 200 lists, beside the jobs it removed, records of three jobs nobody
    asked for (and it did not remove): none of them is reported, every asked id ends
    ``deleted`` once, and what the results say is what the fake removed."""
    gateway = Gateway.with_jobs(30, script=lambda n, ids: "extra")
    async with serve_gateway(gateway) as url:
        asked = gateway.job_ids()[:12]
        src = write_ids(tmp_path / "ids.txt", asked)
        out = tmp_path / "results.jsonl"
        done = await reaper(fast(src, "--batch-size", "4", "--results", str(out)),
                            reaper_env(url))  # fmt: skip
    assert done.code == 0, done.stderr
    rows = results(out)
    assert sorted(row["job_id"] for row in rows) == asked
    assert {row["outcome"] for row in rows} == {"deleted"}
    assert gateway.deleted == set(asked) and done.summary()["deleted"] == 12


async def test_a_json_line_naming_a_list_of_ids_beside_its_id_is_rejected_not_half_read(
    tmp_path: Path,
) -> None:
    """``{"id": A, "ids": [B]}`` (serve's entry spelling) and ``{"id": C, "job_ids": [D]}``
    (the API's body's): run read A and C and dropped B and D without a word, no outcome,
    no count. Each line is now ``rejected`` naming the key, and nothing of it is sent."""
    async with run_simulator(SimulatorConfig(jobs=6, seed=39)) as sim:
        a, b, c, d, e = sim.job_ids()[:5]
        src = tmp_path / "ids.jsonl"
        src.write_text(
            f'{{"id": "{a}", "ids": ["{b}"]}}\n{{"id": "{c}", "job_ids": ["{d}"]}}\n'
            f'{{"id": "{e}"}}\n'
        )
        out = tmp_path / "results.jsonl"
        done = await reaper(fast(src, "--results", str(out)), reaper_env(sim.url))
        assert done.code == 1, done.stderr
        rows = results(out)
        rejected = [row for row in rows if row["outcome"] == "rejected"]
        assert [row["line"] for row in rejected] == [1, 2]
        assert "'ids'" in rejected[0]["reason"] and "'job_ids'" in rejected[1]["reason"]
        assert sim.deleted == {e}


async def test_jobs_a_200_leaves_out_after_the_run_read_them_are_deleted_unconfirmed(
    tmp_path: Path,
) -> None:
    """``--protect 'prod-*'`` makes the run read each job just before its DELETE; the 200
    deletes all four but lists two. The other two existed when that call went, and are gone
    after it: ``deleted``, ``confirmed`` false, ``reason`` ``not_listed``, not ``absent`` (a
    deletion of ours told as somebody else's)."""
    gateway = Gateway.with_jobs(4, script=always("partial"))
    async with serve_gateway(gateway) as url:
        src = write_ids(tmp_path / "ids.txt", gateway.job_ids())
        out = tmp_path / "results.jsonl"
        done = await reaper(fast(src, "--protect", "prod-*", "--results", str(out)),
                            reaper_env(url))  # fmt: skip
    assert gateway.deleted == set(gateway.asked) and len(gateway.deleted) == 4
    rows = {row["job_id"]: row for row in results(out)}
    assert {row["outcome"] for row in rows.values()} == {"deleted"}
    lost = {job_id for job_id, row in rows.items() if row["confirmed"] is False}
    assert len(lost) == 2, rows
    assert {rows[job_id]["reason"] for job_id in lost} == {"not_listed"}
    summary = done.summary()
    assert (summary["deleted"], summary["unconfirmed"], summary["absent"]) == (4, 2, 0)
    assert done.code == 0, done.stderr


async def test_jobs_a_paged_200_leaves_out_are_deleted_unconfirmed_and_a_ghost_stays_absent(
    tmp_path: Path,
) -> None:
    """No rule reads the jobs. The first DELETE's 200 lists one of the four it deleted, on an
    envelope that says there are four (``total``, ``pages``): the three left out are
    ``deleted`` unconfirmed (``not_listed``). The second batch's 200 is whole and does not
    list ``ghost``, never a job: taken at its word, that one is ``absent``."""
    gateway = Gateway.with_jobs(4, script=lambda call, _ids: "paged" if call == 1 else "ok")
    async with serve_gateway(gateway) as url:
        src = write_ids(tmp_path / "ids.txt", [*gateway.job_ids(), "ghost"])
        out = tmp_path / "results.jsonl"
        done = await reaper(fast(src, "--batch-size", "4", "--concurrency", "1",
                                 "--results", str(out)), reaper_env(url))  # fmt: skip
    assert len(gateway.deleted) == 4
    rows = {row["job_id"]: row for row in results(out)}
    assert rows.pop("ghost")["outcome"] == "absent"
    assert {row["outcome"] for row in rows.values()} == {"deleted"}
    assert sorted(str(row["reason"]) for row in rows.values()) == ["None", *["not_listed"] * 3]
    summary = done.summary()
    assert (summary["deleted"], summary["unconfirmed"], summary["absent"]) == (4, 3, 1)


async def test_a_show_call_answered_with_another_job_after_a_200_ends_the_id_failed_unsent(
    tmp_path: Path,
) -> None:
    """The 200 to ``job-0000``'s DELETE does not list it, and its show call answers with the
    record of ``job-0001``: that says nothing of ``job-0000``, neither "still there" (sent
    again, and in the end ``failed`` as a job that "still exists") nor gone. It ends
    ``failed``, naming the other job, after the one DELETE; ``job-0001`` is never touched."""
    gateway = Gateway.with_jobs(2, script=always("partial"))
    gateway.shows["job-0000"] = "job-0001"
    async with serve_gateway(gateway) as url:
        src = write_ids(tmp_path / "ids.txt", ["job-0000"])
        out = tmp_path / "results.jsonl"
        done = await reaper(fast(src, "--results", str(out)), reaper_env(url))
    assert gateway.delete_calls == 1, done.stdout
    assert gateway.asked == {"job-0000"} and "job-0001" in gateway.jobs
    (row,) = results(out)
    assert row["outcome"] == "failed"
    assert "record of job job-0001" in row["error_msg"]
    assert done.code == 1, done.stderr


async def test_a_paged_200_that_also_leaves_out_a_ghost_calls_none_deleted_past_its_count(
    tmp_path: Path,
) -> None:
    """One DELETE of four jobs and ``ghost`` (never a job): its 200 lists one record on an
    envelope that counts four deleted (``total``). Four ids it left out are gone, one more
    than the three deletions it did not list: one of them, unknown which, it did not
    delete. None is called ``deleted`` on that answer's word (the ghost would be, a deletion
    that never was): they end ``absent``, the ambiguity in ``error_msg``. No id the API did
    not delete is ``deleted``, and the run's count of deletions is not above the API's."""
    gateway = Gateway.with_jobs(4, script=always("paged"))
    async with serve_gateway(gateway) as url:
        src = write_ids(tmp_path / "ids.txt", [*gateway.job_ids(), "ghost"])
        out = tmp_path / "results.jsonl"
        done = await reaper(fast(src, "--batch-size", "5", "--concurrency", "1",
                                 "--results", str(out)), reaper_env(url))  # fmt: skip
    assert gateway.delete_calls == 1 and len(gateway.deleted) == 4, done.stderr
    rows = {row["job_id"]: row for row in results(out)}
    assert set(rows) == {*gateway.deleted, "ghost"}
    said_deleted = {job_id for job_id, row in rows.items() if row["outcome"] == "deleted"}
    assert said_deleted <= gateway.deleted, rows["ghost"]
    assert done.summary()["deleted"] <= len(gateway.deleted)
    left_out = {job_id for job_id, row in rows.items() if row["outcome"] == "absent"}
    assert len(left_out) == 4 and "ghost" in left_out
    assert all("3 deletions" in rows[job_id]["error_msg"] for job_id in left_out), rows
    assert done.code == 0, done.stderr


async def test_report_says_a_not_listed_deletion_came_after_a_200_not_a_lost_answer(
    tmp_path: Path,
) -> None:
    """A paged 200 lists one of the four jobs it deleted: three rows ``not_listed`` on the
    ledger, no answer lost. ``report`` said of all unconfirmed deletions 'gone after a call
    whose answer was lost', untrue of these: it now counts them apart, by reason."""
    gateway = Gateway.with_jobs(4, script=always("paged"))
    ledger = tmp_path / "ledger.db"
    async with serve_gateway(gateway) as url:
        src = write_ids(tmp_path / "ids.txt", gateway.job_ids())
        done = await reaper(fast(src, "--batch-size", "4", "--ledger", str(ledger)),
                            reaper_env(url))  # fmt: skip
        assert done.code == 0 and done.summary()["unconfirmed"] == 3, done.stderr
        report = await reaper(["report", "--ledger", str(ledger)], reaper_env(url))
    assert report.code == 0, report.stderr
    (line,) = [line for line in report.stdout.splitlines() if "unconfirmed" in line]
    assert line.startswith("of the deleted, unconfirmed: 3 "), line
    assert "answer was lost" not in line and "3 gone after a 200" in line, line
