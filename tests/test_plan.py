"""Plans: the canonical digest, tamper/expiry/foreign refusals, and run --plan end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.e2e import SIM_PROJECT, reaper, reaper_env, results
from worker.discovery.filters import Filters
from worker.discovery.plan import (
    Plan,
    PlanRefused,
    check_fraction,
    digest_of,
    read_plan,
    write_plan,
)
from worker.errors import InputUnreadable
from worker.simulator import SimulatorConfig, run_simulator
from worker.types import JobRecord

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
ENDPOINT = "https://modelarts.cn-north-4.myhuaweicloud.com"


def make_plan(n: int = 3, **kw: Any) -> Plan:
    records = make_records(n)
    args: dict[str, Any] = {
        "project_id": "proj-1", "endpoint": ENDPOINT, "filters": Filters(status="FINISHED"),
        "records": records, "inventory_size": 10, "now": NOW, "ttl": timedelta(hours=24),
    }  # fmt: skip
    args.update(kw)
    return Plan.create(**args)


# -- the digest --------------------------------------------------------------------------------


def test_digest_is_sha256_of_the_sorted_compact_body_without_the_digest() -> None:
    body = {"b": [1, "x"], "a": None, "digest": "ignored"}
    raw = b'devserver-reaper plan v1\n{"a":null,"b":[1,"x"]}'
    assert digest_of(body) == "sha256:" + hashlib.sha256(raw).hexdigest()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=10,
)  # fmt: skip


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6), st.randoms())
def test_digest_ignores_member_order_but_not_content(body: dict[str, Any], rng: Any) -> None:
    items = list(body.items())
    rng.shuffle(items)
    assert digest_of(dict(items)) == digest_of(body)
    assert digest_of({**body, "extra-member": 1}) != digest_of(body)


def test_same_selection_in_another_order_makes_the_same_plan() -> None:
    plan = make_plan(5)
    shuffled = make_plan(5, records=list(reversed(make_records(5))))
    assert plan.digest == shuffled.digest and plan.ids == tuple(sorted(plan.ids))


def make_records(n: int) -> list[JobRecord]:
    return [
        JobRecord.from_api(
            {
                "id": f"job-{i}",
                "status": "FINISHED",
                "type": "COMMON",
                "name": f"n{i}",
                "create_at": 1_700_000_000_000 + i,
            }
        )
        for i in range(n)
    ]


# -- files -----------------------------------------------------------------------------------


def test_a_written_plan_reads_back_equal_and_is_private(tmp_path: Path) -> None:
    plan = make_plan()
    path = tmp_path / "plan.json"
    write_plan(path, plan)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = read_plan(path)
    assert back.to_json() == plan.to_json()
    assert back.ids == ("job-0", "job-1", "job-2")
    assert back.filters == Filters(status="FINISHED")
    assert "job-0" not in repr(back) and "jobs=3" in repr(back)


def _edit(path: Path, change: Any) -> None:
    data = orjson.loads(path.read_bytes())
    change(data)
    path.write_bytes(orjson.dumps(data))


@pytest.mark.parametrize(
    "change",
    [lambda d: d["jobs"][0].update(id="job-9"), lambda d: d["filters"].update(status="FAILED"),
     lambda d: d.update(expires_at="2099-01-01T00:00:00.000Z"), lambda d: d.update(note="hi"),
     lambda d: d["jobs"].pop(), lambda d: d.update(project_id="proj-2"), lambda d: d.pop("digest")],
    ids=["id", "filter", "expiry", "added-member", "dropped-job", "project", "no-digest"],
)  # fmt: skip
def test_any_edit_to_a_plan_is_refused_as_altered(tmp_path: Path, change: Any) -> None:
    path = tmp_path / "plan.json"
    write_plan(path, make_plan())
    _edit(path, change)
    with pytest.raises(PlanRefused, match="altered"):
        read_plan(path)


def test_a_cut_short_or_foreign_file_is_refused_and_a_missing_one_is_unreadable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "plan.json"
    write_plan(path, make_plan())
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(PlanRefused, match="not JSON"):
        read_plan(path)
    path.write_text("[1, 2]")
    with pytest.raises(PlanRefused, match="not a JSON object"):
        read_plan(path)
    with pytest.raises(InputUnreadable):
        read_plan(tmp_path / "nope.json")


def test_a_well_sealed_plan_with_a_bad_id_is_still_refused(tmp_path: Path) -> None:
    """A careless tool that re-seals what it edits cannot smuggle an invalid id in."""
    path = tmp_path / "plan.json"
    write_plan(path, make_plan())
    data = orjson.loads(path.read_bytes())
    data["jobs"][0]["id"] = "bad id!"
    data["digest"] = digest_of(data)
    path.write_bytes(orjson.dumps(data))
    with pytest.raises(PlanRefused, match="not a valid plan"):
        read_plan(path)


def test_a_re_sealed_plan_that_lives_past_the_cap_is_refused(tmp_path: Path) -> None:
    """The 30-day cap was checked only when a plan was made: a year, re-sealed, passed."""
    path = tmp_path / "plan.json"
    write_plan(path, make_plan())
    data = orjson.loads(path.read_bytes())
    data["expires_at"] = data["created_at"].replace(str(NOW.year), str(NOW.year + 1), 1)
    data["digest"] = digest_of(data)
    path.write_bytes(orjson.dumps(data))
    with pytest.raises(PlanRefused, match="longer than 30 days"):
        read_plan(path)


# -- verify ------------------------------------------------------------------------------------


def test_verify_refuses_another_project_endpoint_an_expired_plan_and_one_over_the_cap() -> None:
    plan = make_plan()
    ok = {"project_id": "proj-1", "endpoint": ENDPOINT + "/", "now": NOW + timedelta(hours=23)}
    plan.verify(**ok)  # type: ignore[arg-type]
    with pytest.raises(PlanRefused, match="project proj-1, not proj-2"):
        plan.verify(**{**ok, "project_id": "proj-2"})  # type: ignore[arg-type]
    with pytest.raises(PlanRefused, match="endpoint"):
        plan.verify(**{**ok, "endpoint": "https://modelarts.cn-east-3.myhuaweicloud.com"})  # type: ignore[arg-type]
    with pytest.raises(PlanRefused, match="expired"):
        plan.verify(**{**ok, "now": NOW + timedelta(hours=24)})  # type: ignore[arg-type]
    # Made "in the future" (re-sealed by hand to outlive the 30-day cap): refused.
    plan.verify(**{**ok, "now": NOW - timedelta(minutes=9)})  # type: ignore[arg-type]
    with pytest.raises(PlanRefused, match="still to come"):
        plan.verify(**{**ok, "now": NOW - timedelta(minutes=11)})  # type: ignore[arg-type]
    plan.verify(**ok, max_fraction=0.3)  # type: ignore[arg-type]
    with pytest.raises(PlanRefused, match="max_fraction"):
        plan.verify(**ok, max_fraction=0.29)  # type: ignore[arg-type]


@given(st.integers(0, 1000), st.integers(0, 1000), st.floats(0.001, 1.0))
def test_fraction_check_refuses_exactly_when_the_share_is_exceeded(
    selected: int, inventory: int, fraction: float
) -> None:
    over = selected > fraction * inventory
    try:
        check_fraction(selected, inventory, fraction)
    except PlanRefused:
        assert over
    else:
        assert not over


def test_a_time_to_live_beyond_thirty_days_is_refused() -> None:
    with pytest.raises(ValueError, match="time to live"):
        make_plan(ttl=timedelta(days=31))


# -- run --plan end to end ----------------------------------------------------------------------


async def discover_plan(url: str, path: Path, *extra: str) -> None:
    done = await reaper(
        ["discover", "--status", "FINISHED", "--name-glob", "common-*", "--plan", str(path),
         *extra],
        reaper_env(url),
    )  # fmt: skip
    assert done.code == 0, done.stderr
    assert done.stdout == ""


async def apply_plan(url: str, path: Path, out: Path) -> dict[str, dict[str, Any]]:
    """``run --plan`` to the end (exit 0): its results file's rows, by id."""
    done = await reaper(
        ["run", "--plan", str(path), "--yes", "--results", str(out), "--rate", "1000",
         "--burst", "50"],
        reaper_env(url),
    )  # fmt: skip
    assert done.code == 0, done.stderr
    return {row["job_id"]: row for row in results(out)}


@pytest.mark.anyio
async def test_a_plan_applied_after_changes_deletes_the_rest_and_skips_what_changed(
    tmp_path: Path,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=400, seed=21)) as sim:
        path = tmp_path / "plan.json"
        await discover_plan(sim.url, path)
        planned = list(read_plan(path).ids)
        want = {j.id for j in sim.store.jobs.values()
                if j.status == "FINISHED" and j.name.startswith("common-")}  # fmt: skip
        assert set(planned) == want and len(want) > 20
        changed, gone = planned[:3], planned[3]
        for job_id in changed:
            sim.set_status(job_id, "PROCESSING")
        sim.store.delete([gone])
        extra = sim.add_jobs(5, status="FINISHED", name="common-late")[0]  # not in the plan
        rows = await apply_plan(sim.url, path, tmp_path / "results.jsonl")
        assert set(rows) == set(planned)
        for job_id in changed:
            assert rows[job_id]["outcome"] == "skipped"
            assert rows[job_id]["reason"] == "plan_mismatch"
            assert "PROCESSING" in rows[job_id]["error_msg"]
            assert job_id in sim.store.jobs
        assert rows[gone]["outcome"] == "absent"
        rest = set(planned) - set(changed) - {gone}
        assert {rows[i]["outcome"] for i in rest} == {"deleted"} and sim.deleted >= rest
        assert extra in sim.store.jobs
        # No changed or gone id was ever sent (the test's own delete of ``gone`` counts once).
        assert set(sim.sent_counts) == rest | {gone} and sim.sent_counts[gone] == 1


@pytest.mark.anyio
async def test_a_job_that_changed_outside_the_plan_s_filters_is_not_deleted(
    tmp_path: Path,
) -> None:
    """A plan made with ``--all`` (or filters that do not look at the status) used to delete
    a job that had become PROCESSING since the review: it still "matched"."""
    async with run_simulator(SimulatorConfig(jobs=30, seed=22)) as sim:
        path = tmp_path / "plan.json"
        done = await reaper(["discover", "--all", "--plan", str(path)], reaper_env(sim.url))
        assert done.code == 0, done.stderr
        planned = list(read_plan(path).ids)
        restarted, renamed, reowned = planned[:3]
        was = sim.store.jobs[restarted].status
        sim.set_status(restarted, "RESTARTING" if was != "RESTARTING" else "PROCESSING")
        sim.store.jobs[renamed] = dataclasses.replace(sim.store.jobs[renamed], name="prod-db")
        sim.store.jobs[reowned] = dataclasses.replace(sim.store.jobs[reowned], user_name="eve")
        rows = await apply_plan(sim.url, path, tmp_path / "results.jsonl")
        for job_id, field in ((restarted, "status"), (renamed, "name"), (reowned, "user_name")):
            row = rows[job_id]
            assert (row["outcome"], row["reason"]) == ("skipped", "plan_mismatch")
            assert rows[job_id]["error_msg"].startswith(f"{field} was ")
        assert set(sim.store.jobs) == {restarted, renamed, reowned}
        assert {rows[i]["outcome"] for i in planned[3:]} == {"deleted"}


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["tampered-id", "tampered-filter", "expired", "other-project",
                                 "over-fraction"])  # fmt: skip
async def test_a_plan_that_may_not_be_applied_is_refused_before_any_delete(
    tmp_path: Path, how: str
) -> None:
    async with run_simulator(SimulatorConfig(jobs=200, seed=22)) as sim:
        path = tmp_path / "plan.json"
        await discover_plan(sim.url, path)
        extra: list[str] = []
        if how == "tampered-id":
            _edit(path, lambda d: d["jobs"][0].update(id=sim.job_ids()[-1]))
        elif how == "tampered-filter":
            _edit(path, lambda d: d["filters"].update(name_glob="*"))
        elif how in ("expired", "other-project"):
            plan = read_plan(path)
            records = [JobRecord.from_api({"id": i, "status": "FINISHED", "name": "common-x"})
                       for i in plan.ids]  # fmt: skip
            write_plan(path, Plan.create(
                project_id="other-project" if how == "other-project" else SIM_PROJECT,
                endpoint=sim.url, filters=plan.filters, records=records,
                inventory_size=plan.inventory_size,
                now=datetime.now(UTC) - timedelta(hours=2 if how == "expired" else 0),
                ttl=timedelta(hours=1),
            ))  # fmt: skip
        else:
            extra = ["--max-fraction", "0.05"]
        before = sim.stats.calls
        done = await reaper(["run", "--plan", str(path), "--yes", *extra], reaper_env(sim.url))
        assert done.code == 64, done.stderr
        assert "refusing" in done.stderr or "altered" in done.stderr or "expired" in done.stderr \
            or "max_fraction" in done.stderr  # fmt: skip
        assert sim.stats.delete_calls == 0
        assert sim.stats.calls == before  # not even a read
        assert len(sim.job_ids()) == 200


def test_plan_and_input_are_mutually_exclusive() -> None:
    from worker.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["run", "--plan", "p.json", "--input", "ids.txt"])
    assert exited.value.code == 64
