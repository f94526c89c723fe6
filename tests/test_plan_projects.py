"""Plans of several projects (``discover --project``, format v3), and old plans unchanged.

A v3 plan names its projects, one section each; its jobs are applied each to its own
project, and every check of one project's plan holds per project. A plan made without
``--project`` is the v2 plan it always was, byte for byte, and the files written by the
version before this one still open and verify.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from tests.e2e import SIM_PROJECT, reaper, reaper_env
from tests.test_plan import ENDPOINT, KEY, NOW, _edit_line, make_records, reseal, write
from worker.discovery.filters import Filters
from worker.discovery.plan import (
    PlanRefused,
    PlanSection,
    PlanWriter,
    open_plan,
    write_plan,
)
from worker.discovery.projects import Defaults, ProjectSpec, parse_spec, resolve_targets
from worker.errors import UsageError
from worker.simulator import Simulator, SimulatorConfig, run_simulator
from worker.targets import Target

DATA = Path(__file__).parent / "data"
SOUTH = "https://modelarts.cn-south-1.myhuaweicloud.com"


# -- old plans ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"), [("plan-v2-keyed.plan", KEY), ("plan-v2-unkeyed.plan", None)]
)
def test_a_plan_the_last_version_wrote_still_opens_and_verifies(
    tmp_path: Path, name: str, key: bytes | None
) -> None:
    """Files written before plans could name projects, kept as they were written."""
    path = tmp_path / name
    shutil.copy(DATA / name, path)
    with open_plan(path, key=key) as plan:
        header = plan.header
        assert not header.named
        assert (header.project_id, header.endpoint, header.inventory_size) == (
            "proj-1", ENDPOINT, 10,
        )  # fmt: skip
        assert list(plan.ids()) == [f"job-{i}" for i in range(header.jobs)]
        assert [job for job, _ in plan.entries()] == list(plan.ids())
        header.verify(project_id="proj-1", endpoint=ENDPOINT, now=NOW + timedelta(hours=1))
        with pytest.raises(PlanRefused, match="plan is for project proj-1, not proj-2"):
            header.verify(project_id="proj-2", endpoint=ENDPOINT, now=NOW)


def test_a_plan_of_one_project_is_written_byte_for_byte_as_before(tmp_path: Path) -> None:
    write(tmp_path / "keyed", 3, key=KEY, review={"by_type": {"COMMON": 3}})
    write(tmp_path / "unkeyed", 2)
    assert (tmp_path / "keyed").read_bytes() == (DATA / "plan-v2-keyed.plan").read_bytes()
    assert (tmp_path / "unkeyed").read_bytes() == (DATA / "plan-v2-unkeyed.plan").read_bytes()


# -- plans that name their projects ----------------------------------------------------------------


def write_named(
    path: Path, sizes: tuple[int, ...] = (3, 2), *, key: bytes | None = None
) -> list[str]:
    """A v3 plan of one section per size: proj-0 at ENDPOINT, proj-1 at SOUTH ...; its ids."""
    records = make_records(sum(sizes))
    parts = []
    start = 0
    for index, size in enumerate(sizes):
        writer = PlanWriter(path, key=key)
        for record in records[start : start + size]:
            writer.add(record)
        start += size
        endpoint = ENDPOINT if index == 0 else SOUTH
        region = "cn-north-4" if index == 0 else "cn-south-1"
        section = PlanSection(f"proj-{index}", endpoint, 10 * (index + 1), 0, True,
                              {"by_type": {"COMMON": size}, "selected": size}, region)  # fmt: skip
        parts.append((section, writer))
    try:
        write_plan(path, key=key, filters=Filters(status="FINISHED"), now=NOW,
                   ttl=timedelta(hours=24), parts=parts, named=True)  # fmt: skip
    finally:
        for _, writer in parts:
            writer.close()
    return [record.id for record in records]


def test_a_named_plan_keeps_each_job_in_its_project(tmp_path: Path) -> None:
    path = tmp_path / "plan"
    ids = write_named(path, (3, 2), key=KEY)
    assert path.read_bytes().startswith(b"devserver-reaper plan v3\n")
    with open_plan(path, key=KEY) as plan:
        header = plan.header
        assert header.named and header.jobs == 5
        assert [(s.project_id, s.endpoint, s.region, s.jobs, s.inventory_size)
                for s in header.sections] == [
            ("proj-0", ENDPOINT, "cn-north-4", 3, 10), ("proj-1", SOUTH, "cn-south-1", 2, 20),
        ]  # fmt: skip
        assert list(plan.entries()) == [(ids[0], 0), (ids[1], 0), (ids[2], 0), (ids[3], 1),
                                        (ids[4], 1)]  # fmt: skip
        assert [job in plan.reviewed_in(0) for job in ids] == [True] * 3 + [False] * 2
        assert [job in plan.reviewed_in(1) for job in ids] == [False] * 3 + [True] * 2
        assert plan.reviewed_in(1).get(ids[0]) is None
        assert all(job in plan.reviewed for job in ids)
        assert plan.section_of("proj-1", SOUTH + "/") == 1
        assert plan.section_of("proj-1", ENDPOINT) is None
        assert header.review["by_type"] == {"COMMON": 5}  # the sections added up
        with pytest.raises(ValueError, match="names 2 projects"):
            _ = header.project_id


def test_a_named_plan_is_applied_to_its_own_projects_each_within_max_fraction(
    tmp_path: Path,
) -> None:
    path = tmp_path / "plan"
    write_named(path, (3, 2))
    with open_plan(path, key=None) as plan:
        header = plan.header
        # The run's own project and endpoint are not compared: the plan names its own.
        header.verify(project_id="elsewhere", endpoint="https://x.example", now=NOW)
        header.verify(project_id=None, endpoint=None, now=NOW, allowed={"proj-0", "proj-1"})
        with pytest.raises(PlanRefused, match="names project proj-1, which is not in allowed"):
            header.verify(project_id=None, endpoint=None, now=NOW, allowed={"proj-0"})
        # 3 of 10 in proj-0 and 2 of 20 in proj-1: 0.2 refuses the first, by name.
        header.verify(project_id=None, endpoint=None, now=NOW, max_fraction=0.3)
        with pytest.raises(PlanRefused, match=r"^in project proj-0 \(cn-north-4\): 3 of 10"):
            header.verify(project_id=None, endpoint=None, now=NOW, max_fraction=0.2)


def _move_a_job(header: dict[str, Any]) -> None:
    header["projects"][0]["jobs"] -= 1
    header["projects"][1]["jobs"] += 1


NAMED_EDITS = {
    # A job moved from one project to the other: the counts say where sections end.
    "moved-job": _edit_line(1, _move_a_job),
    "project": _edit_line(1, lambda d: d["projects"][1].update(project_id="proj-9")),
    "endpoint": _edit_line(1, lambda d: d["projects"][1].update(endpoint="https://evil.example")),
    "inventory": _edit_line(1, lambda d: d["projects"][0].update(inventory_size=10**6)),
}  # fmt: skip


@pytest.mark.parametrize("edit", list(NAMED_EDITS))
def test_any_edit_to_a_named_plan_is_refused(tmp_path: Path, edit: str) -> None:
    path = tmp_path / "plan"
    write_named(path, key=KEY)
    changed = NAMED_EDITS[edit](path.read_bytes())
    for forged in (changed, reseal(changed, None)):
        path.write_bytes(forged)
        with pytest.raises(PlanRefused, match=r"altered|without a plan key"):
            open_plan(path, key=KEY)


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda d: d["projects"][1].update(endpoint="http://evil.example"), "plain http://"),
        (lambda d: d["projects"][1].update(project_id="proj-0", endpoint=ENDPOINT),
         "names one project at one endpoint twice"),
        (lambda d: d.update(jobs=6), "jobs is not the sum"),
        (lambda d: d["projects"][0].update(region="North 4"), "region is not a region"),
        (lambda d: d["projects"][0].pop("region"), "does not have the planned fields"),
        (lambda d: d.update(projects=[]), "projects is not a list of 1 to"),
    ],
    ids=["plain-http", "twice", "jobs", "region", "field", "none"],
)  # fmt: skip
def test_a_named_plan_whose_projects_break_the_rules_is_refused_even_when_sealed(
    tmp_path: Path, edit: Any, said: str
) -> None:
    """A plan sealed without a key can be re-sealed by anyone: where it sends is still held
    to the rules the settings' endpoint is, and its counts must add up."""
    path = tmp_path / "plan"
    write_named(path)
    path.write_bytes(reseal(_edit_line(1, edit)(path.read_bytes()), None))
    with pytest.raises(PlanRefused, match=said):
        open_plan(path, key=None)


# -- what --project names -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("cn-south-1", ProjectSpec("cn-south-1", region="cn-south-1")),
        ("0a1b2c3d", ProjectSpec("0a1b2c3d", project_id="0a1b2c3d")),
        ("0a1b@cn-south-1", ProjectSpec("0a1b@cn-south-1", "0a1b", "cn-south-1")),
        ("0a1b@http://127.0.0.1:9/", ProjectSpec("0a1b@http://127.0.0.1:9/", "0a1b", None,
                                                 "http://127.0.0.1:9")),
        ("cn-south-1@http://[::1]:9", ProjectSpec("cn-south-1@http://[::1]:9", None,
                                                  "cn-south-1", "http://[::1]:9")),
        ("ab-cd@cn-north-4", ProjectSpec("ab-cd@cn-north-4", "ab-cd", "cn-north-4")),
    ],
)  # fmt: skip
def test_a_project_is_named_by_region_id_or_both(text: str, spec: ProjectSpec) -> None:
    assert parse_spec(text) == spec


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", "give REGION, ID, ID@REGION"),
        ("id@", "give REGION, ID, ID@REGION"),
        ("bad id", "the project id must be 1 to 64"),
        ("0a1b@http://evil.example", "the endpoint plain http://"),
        ("0a1b@cn-north-4x!", "the region must look like"),
        ("cn-south-1@0a1b", "after a region, '@' takes an endpoint URL"),
    ],
)
def test_a_project_named_wrong_is_refused_saying_how(text: str, said: str) -> None:
    with pytest.raises(UsageError, match=said.replace("(", r"\(")):
        parse_spec(text)


@pytest.mark.anyio
async def test_specs_resolve_to_targets_asking_iam_only_for_a_region_alone() -> None:
    asked: list[str] = []

    async def look_up(region: str) -> str:
        asked.append(region)
        return f"iam-{region}"

    defaults = Defaults("http://127.0.0.1:9", "cn-north-4", "home")
    specs = [parse_spec(text) for text in (
        "cn-north-4", "cn-south-1", "p1", "p2@cn-south-1", "p3@cn-north-4",
        "cn-east-3@https://x.example", "home", "cn-south-1",
    )]  # fmt: skip
    targets = await resolve_targets(specs, defaults, look_up, endpoints={"https://x.example"})
    assert targets == [
        Target("home", "http://127.0.0.1:9", "cn-north-4"),  # the settings' own: no IAM call
        Target("iam-cn-south-1", "https://modelarts.cn-south-1.myhuaweicloud.com", "cn-south-1"),
        Target("p1", "http://127.0.0.1:9", "cn-north-4"),
        Target("p2", "https://modelarts.cn-south-1.myhuaweicloud.com", "cn-south-1"),
        Target("p3", "http://127.0.0.1:9", "cn-north-4"),
        Target("iam-cn-east-3", "https://x.example", "cn-east-3"),
    ]  # "home" and the second cn-south-1 were the same project at the same endpoint
    assert asked == ["cn-south-1", "cn-east-3", "cn-south-1"]  # the cache is IAM's, not this
    with pytest.raises(UsageError, match="project p1 is not in allowed_projects"):
        await resolve_targets(specs, defaults, look_up, allowed={"home", "iam-cn-south-1"},
                              endpoints={"https://x.example"})  # fmt: skip
    asked.clear()  # an endpoint the settings do not list: refused before IAM is asked
    with pytest.raises(UsageError, match=r"endpoint https://x\.example is not one the settings"):
        await resolve_targets(specs[5:], defaults, look_up)
    assert asked == []
    with pytest.raises(UsageError, match="neither --region nor --endpoint is set"):
        await resolve_targets([parse_spec("p1")], Defaults(None, None, None), look_up)


# -- discover --project, end to end ---------------------------------------------------------------


@asynccontextmanager
async def two_regions() -> AsyncIterator[tuple[Simulator, Simulator]]:
    """cn-north-4 (the settings' own, 6 jobs) and cn-south-1 (IAM knows it, 4 jobs)."""
    north = SimulatorConfig(jobs=6, seed=1)
    south = SimulatorConfig(jobs=4, seed=3, project_id="south-project", region="cn-south-1")
    async with run_simulator(north) as home, run_simulator(south) as away:
        yield home, away


def both(home: Simulator, away: Simulator) -> list[str]:
    return ["--project", f"{SIM_PROJECT}@{home.url}", "--project", f"cn-south-1@{away.url}",
            "--iam-endpoint", away.url]  # fmt: skip


async def plan_both(plan: Path, home: Simulator, away: Simulator, *filters: str) -> None:
    """``discover`` of both projects into ``plan`` (``--all`` unless ``filters``): it must work."""
    made = await reaper(["discover", *(filters or ("--all",)), "--plan", str(plan),
                         *both(home, away)], reaper_env(home.url))  # fmt: skip
    assert made.code == 0, made.stderr


@pytest.mark.anyio
async def test_discover_scans_each_project_into_one_plan_naming_each(tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    async with two_regions() as (home, away):
        done = await reaper(
            ["discover", "--all", "--plan", str(plan), *both(home, away)], reaper_env(home.url)
        )
        assert done.code == 0, done.stderr
        assert (home.stats.list_calls > 0, away.stats.list_calls > 0) == (True, True)
        assert away.stats.iam_calls == 1
        shown = await reaper(["plan", "show", str(plan)], reaper_env(home.url))
        with open_plan(plan, key=None) as sealed:
            sections = [(s.project_id, s.endpoint, s.region, s.jobs, s.inventory_size)
                        for s in sealed.header.sections]  # fmt: skip
            entries = list(sealed.entries())
    assert sections == [(SIM_PROJECT, home.url, None, 6, 6),
                        ("south-project", away.url, "cn-south-1", 4, 4)]  # fmt: skip
    assert entries == [(job, 0) for job in home.job_ids()] + [(job, 1) for job in away.job_ids()]
    summaries = [orjson.loads(line) for line in done.stderr.splitlines()
                 if '"discover.summary"' in line]  # fmt: skip
    assert [(s["project_id"], s["region"], s["selected"]) for s in summaries] == [
        (SIM_PROJECT, None, 6),
        ("south-project", "cn-south-1", 4),
    ]
    assert shown.code == 0, shown.stderr
    assert "10 jobs in 2 projects, each sent only to its own" in shown.stdout
    assert "  project  south-project (cn-south-1)\n" in shown.stdout


@pytest.mark.anyio
async def test_max_fraction_and_protection_hold_in_each_project(tmp_path: Path) -> None:
    """Three of six FINISHED in one project is half; three of four in the other: a cap of
    0.6 refuses the whole discovery, naming the project over it, and writes nothing."""
    plan = tmp_path / "plan"
    async with two_regions() as (home, away):
        finished = [
            [job.name for job in sim.store.jobs.values() if job.status == "FINISHED"]
            for sim in (home, away)
        ]
        args = ["discover", "--status", "FINISHED", "--plan", str(plan), *both(home, away)]
        refused = await reaper([*args, "--max-fraction", "0.6"], reaper_env(home.url))
        assert not plan.exists()
        protected = await reaper([*args, "--protect", "name:common-*"], reaper_env(home.url))
        assert protected.code == 0, protected.stderr
        with open_plan(plan, key=None) as sealed:
            kept = [(s.jobs, sum(s.review["protected"].values())) for s in sealed.header.sections]
            planned = [
                [sealed.reviewed_in(section).get(job).name for job in sealed.ids(section)]  # type: ignore[union-attr]
                for section in range(2)
            ]
    assert finished == [
        ["ascend-software-upgrade-000002", "common-000003", "common-000005"],
        ["service-deploy-000001", "common-000002", "ascend-software-upgrade-000004"],
    ], "the seeds chose these jobs"
    assert refused.code == 64, refused.stderr
    assert "in project south-project (cn-south-1): 3 of 4 jobs selected (75.0%)" in refused.stderr
    assert kept == [(1, 2), (2, 1)]
    assert planned == [["ascend-software-upgrade-000002"],
                       ["service-deploy-000001", "ascend-software-upgrade-000004"]]  # fmt: skip


@pytest.mark.anyio
async def test_discover_of_several_projects_prints_lines_that_name_their_project(
    tmp_path: Path,
) -> None:
    async with two_regions() as (home, away):
        rows = await reaper(["discover", "--all", *both(home, away)], reaper_env(home.url))
        ids = await reaper(["discover", "--all", "-o", "ids", *both(home, away)],
                           reaper_env(home.url))  # fmt: skip
        assert home.stats.list_calls + away.stats.list_calls == 2  # the refusal listed nothing
    assert rows.code == 0, rows.stderr  # not a terminal: JSON Lines, not bare ids
    places = {
        (r["project_id"], r["endpoint"]) for r in map(orjson.loads, rows.stdout.split("\n")[:-1])
    }
    assert places == {(SIM_PROJECT, home.url), ("south-project", away.url)}
    assert ids.code == 64
    assert "-o ids prints ids alone, which do not say their project" in ids.stderr


@pytest.mark.anyio
async def test_a_project_outside_allowed_projects_is_refused_before_any_listing() -> None:
    async with two_regions() as (home, away):
        env = reaper_env(home.url, REAPER_ALLOWED_PROJECTS=SIM_PROJECT)
        done = await reaper(["discover", "--all", *both(home, away)], env)
        assert home.stats.list_calls + away.stats.list_calls == 0
    assert done.code == 64, done.stderr
    assert "project south-project is not in allowed_projects" in done.stderr


def named_env(url: str, **extra: str) -> dict[str, str]:
    """The run's environment with no project of its own: the plan names them."""
    env = reaper_env(url, **extra)
    del env["REAPER_PROJECT_ID"], env["REAPER_ENDPOINT"]
    return env


@pytest.mark.anyio
async def test_run_applies_a_named_plan_each_job_in_its_own_project_alone(
    tmp_path: Path,
) -> None:
    """The plan's FINISHED jobs go, each to its own project's endpoint; nothing else is sent
    anywhere (no 404 for a job sent to the wrong project), and the same command resumes."""
    plan, ledger, out = tmp_path / "plan", tmp_path / "run.db", tmp_path / "results.jsonl"
    async with two_regions() as (home, away):
        planned = [
            {job.id for job in sim.store.jobs.values() if job.status == "FINISHED"}
            for sim in (home, away)
        ]
        await plan_both(plan, home, away, "--status", "FINISHED")
        args = ["run", "--plan", str(plan), "--yes", "--ledger", str(ledger),
                "--results", str(out)]  # fmt: skip
        done = await reaper(args, named_env(home.url))
        assert done.code == 0, done.stderr
        assert [home.deleted, away.deleted] == planned
        assert (home.stats.bad_requests, away.stats.bad_requests) == (0, 0)
        assert all(count == 1 for sim in (home, away) for count in sim.sent_counts.values())
        again = await reaper(args, named_env(home.url))
        assert again.code == 0, again.stderr
    summary = done.summary()
    assert [(p["project_id"], p["deleted"]) for p in summary["projects"]] == [
        (SIM_PROJECT, 3),
        ("south-project", 3),
    ]
    rows = {row["job_id"]: row for row in map(orjson.loads, out.read_text().splitlines())}
    assert {job for job, row in rows.items() if row["project_id"] == "south-project"} == planned[1]
    assert again.summary()["already_done"] == 6


@pytest.mark.anyio
async def test_a_named_plan_is_recounted_per_project_when_it_is_applied(tmp_path: Path) -> None:
    """FINISHED is 3 of 6 and 3 of 4 when discovered under a cap of 0.8; once the other job
    of the south project is gone, its 3 are all it holds, and the run refuses (64) before
    any DELETE, naming that project."""
    plan = tmp_path / "plan"
    async with two_regions() as (home, away):
        await plan_both(plan, home, away, "--status", "FINISHED", "--max-fraction", "0.8")
        other = [job.id for job in away.store.jobs.values() if job.status != "FINISHED"]
        gone = await reaper(
            ["run", "-i", "-", "--yes"],
            reaper_env(away.url, REAPER_PROJECT_ID="south-project"),
            stdin="\n".join(other).encode(),
        )
        assert gone.code == 0, gone.stderr
        deletes = away.stats.delete_calls
        done = await reaper(["run", "--plan", str(plan), "--yes", "--max-fraction", "0.8"],
                            named_env(home.url))  # fmt: skip
        assert (home.stats.delete_calls, away.stats.delete_calls) == (0, deletes)
    assert done.code == 64, done.stderr
    assert "in project south-project (cn-south-1): 3 of 3 jobs selected" in done.stderr


@pytest.mark.anyio
async def test_a_named_plan_outside_allowed_projects_is_refused_before_any_call(
    tmp_path: Path,
) -> None:
    plan = tmp_path / "plan"
    async with two_regions() as (home, away):
        await plan_both(plan, home, away)
        listed = home.stats.list_calls + away.stats.list_calls
        env = named_env(home.url, REAPER_ALLOWED_PROJECTS=SIM_PROJECT)
        done = await reaper(["run", "--plan", str(plan), "--yes"], env)
        assert home.stats.calls + away.stats.calls == listed  # not one more
    assert done.code == 64, done.stderr
    assert "plan names project south-project, which is not in allowed_projects" in done.stderr


@pytest.mark.anyio
@pytest.mark.parametrize("named", [False, True], ids=["one-project", "projects"])
async def test_discover_into_a_pipe_closed_early_ends_quietly(tmp_path: Path, named: bool) -> None:
    """``discover | head -1``: the reader has seen enough; exit 0, no traceback (it was a
    BrokenPipeError's traceback and exit 1 before)."""
    async with run_simulator(SimulatorConfig(jobs=3000, seed=1)) as sim:
        which = ["--project", f"{SIM_PROJECT}@{sim.url}"] if named else []
        command = [sys.executable, "-m", "worker", "discover", "--all", "-o", "jsonl", *which]
        script = f'{shlex.join(command)} 2>"$0" | head -1 >/dev/null; echo "${{PIPESTATUS[0]}}"'
        done = await anyio.run_process(
            ["bash", "-c", script, str(tmp_path / "stderr")], env=reaper_env(sim.url),
            check=False,
        )  # fmt: skip
    assert done.stdout.decode().strip() == "0"
    assert "Traceback" not in (tmp_path / "stderr").read_text()


def test_a_named_plans_ids_carry_their_project_and_are_checked_there_alone(
    tmp_path: Path,
) -> None:
    from worker.discovery.applied import plan_candidates, plan_check, plan_default
    from worker.targets import Targets

    path = tmp_path / "plan"
    ids = write_named(path, (3, 2))
    with open_plan(path, key=None) as plan:
        default = plan_default(plan)
        targets = Targets(default)
        routed = [(c.job_id, c.line, targets.of(c.address)) for c in plan_candidates(plan)]  # type: ignore[arg-type]
        south = Target("proj-1", SOUTH, "cn-south-1")
        assert default == Target("proj-0", ENDPOINT, "cn-north-4")
        assert routed == [(job, n, default) for n, job in enumerate(ids[:3], 1)] + [
            (job, n, south) for n, job in enumerate(ids[3:], 4)
        ]
        held = {
            name: [job for job in ids if job in plan_check(plan, frozenset(), target).reviewed]
            for name, target in (("own", None), ("south", south),
                                 ("other", Target("proj-9", SOUTH, None)))
        }  # fmt: skip
    assert held == {"own": ids[:3], "south": ids[3:], "other": []}


def test_a_plan_of_one_projects_ids_name_no_project(tmp_path: Path) -> None:
    from worker.discovery.applied import plan_candidates, plan_check

    path = tmp_path / "plan"
    write(path, 3)
    with open_plan(path, key=None) as plan:
        assert [(c.job_id, c.line, c.address) for c in plan_candidates(plan)] == [
            ("job-0", 1, None), ("job-1", 2, None), ("job-2", 3, None),
        ]  # fmt: skip
        assert "job-2" in plan_check(plan, frozenset(), Target("x", SOUTH)).reviewed


@pytest.mark.anyio
async def test_the_table_of_each_project_says_what_lists_them_all() -> None:
    async with run_simulator(SimulatorConfig(jobs=60, seed=1)) as sim:
        done = await reaper(
            ["discover", "--all", "-o", "table", "--project", f"{SIM_PROJECT}@{sim.url}"],
            reaper_env(sim.url),
        )
    assert done.code == 0, done.stderr
    assert f"project {SIM_PROJECT} at {sim.url}: 60 of 60 jobs selected\n" in done.stdout
    assert "... 10 more (-o jsonl lists them all)\n" in done.stdout  # -o ids is refused here


@pytest.mark.anyio
async def test_on_a_terminal_the_prompt_names_each_project_and_asks_for_their_number(
    tmp_path: Path,
) -> None:
    """Above confirm_project_over a person types the number of projects the plan names, not
    one project's id; 'yes' sends nothing."""
    from tests.tty import Terminal

    plan = tmp_path / "plan"

    def answer(keys: bytes, env: dict[str, str]) -> tuple[int, list[str]]:
        term = Terminal(["run", "--plan", str(plan)], env)
        term.expect("This cannot be undone.")
        term.type(keys)
        return term.wait(), term.lines()

    async with two_regions() as (home, away):
        await plan_both(plan, home, away)
        env = named_env(home.url, REAPER_LOG_FORMAT="auto", REAPER_CONFIRM_PROJECT_OVER="5")
        refused, seen = await anyio.to_thread.run_sync(answer, b"yes\n", env)
        assert (len(home.deleted), len(away.deleted)) == (0, 0)
        accepted, _ = await anyio.to_thread.run_sync(answer, b"2 projects\n", env)
        assert (len(home.deleted), len(away.deleted)) == (6, 4)
    assert refused == 64 and accepted == 0
    assert (
        f"  project     {SIM_PROJECT} at {home.url}: 6 jobs; south-project (cn-south-1): 4 jobs"
        in seen
    )
    assert (
        "This cannot be undone. Type '2 projects' to delete them, each in its own project: yes"
        in seen
    )


@pytest.mark.anyio
async def test_a_dry_run_of_a_named_plan_reads_each_project_and_deletes_nothing(
    tmp_path: Path,
) -> None:
    plan = tmp_path / "plan"
    async with two_regions() as (home, away):
        await plan_both(plan, home, away)
        listed = (home.stats.list_calls, away.stats.list_calls)
        done = await reaper(["run", "--plan", str(plan), "--dry-run"], named_env(home.url))
        assert (home.stats.delete_calls, away.stats.delete_calls) == (0, 0)
        assert home.stats.list_calls > listed[0] and away.stats.list_calls > listed[1]
    assert done.code == 0, done.stderr
    summary = done.summary()
    assert summary["would_delete"] == 10
    assert [(p["project_id"], p["skipped"]) for p in summary["projects"]] == [
        (SIM_PROJECT, 6),
        ("south-project", 4),
    ]


# -- two projects sharing a job id ----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_plan_of_two_projects_sharing_a_job_id_is_refused_saying_so_not_altered(
    tmp_path: Path,
) -> None:
    """Two projects may hold jobs of one id (two simulators of one seed do). discover lists
    each in its own project; run cannot send one id to two projects in one run, and says
    that, not that a plan discover wrote and sealed "was altered"."""
    plan = tmp_path / "plan"
    north = SimulatorConfig(jobs=3, seed=5)
    south = SimulatorConfig(jobs=3, seed=5, project_id="south-project", region="cn-south-1")
    async with run_simulator(north) as home, run_simulator(south) as away:
        shared = sorted(set(home.store.jobs) & set(away.store.jobs))
        assert shared
        await plan_both(plan, home, away)
        done = await reaper(["run", "--plan", str(plan), "--yes"], named_env(home.url))
        shown = await reaper(["plan", "show", str(plan)], reaper_env(home.url))
        assert (home.stats.delete_calls, away.stats.delete_calls) == (0, 0)
    assert done.code == 64, done.stderr
    said = (
        f"lists job {shared[0]} in two projects, {SIM_PROJECT} at {home.url} and south-project "
        "(cn-south-1): one run sends an id to one project, so it cannot apply this plan; "
        "discover each project into a plan of its own (--project) and run each"
    )
    assert said in done.stderr and "altered" not in done.stderr
    assert said in shown.stderr


def test_a_plan_listing_a_job_twice_in_one_project_was_altered(tmp_path: Path) -> None:
    path = tmp_path / "plan"
    ids = write_named(path, (3, 2))
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[2]  # the second job of proj-0 made a copy of its first
    path.write_bytes(reseal(b"\n".join(lines), None))
    with pytest.raises(PlanRefused, match=f"lists job {ids[0]} twice in one project: it was "
                                          "altered"):  # fmt: skip
        open_plan(path, key=None)
