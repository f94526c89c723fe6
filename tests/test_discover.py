"""discover: durations and filters (known answers, Hypothesis), paging, and the real command."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from tests.e2e import list_endpoint, paced_reader, reaper, reaper_env
from tests.fakes import FakeClock
from worker.discovery.filters import Filters, parse_duration, parse_instant
from worker.discovery.guard import PacedReader
from worker.discovery.plan import open_plan
from worker.discovery.scan import Scan, scan_jobs
from worker.errors import ApiUnavailable
from worker.simulator import JOBS_EPOCH_MS, Job, SimulatorConfig, run_simulator
from worker.types import JobRecord

EPOCH = datetime.fromtimestamp(JOBS_EPOCH_MS / 1000, tz=UTC)  # 2026-06-01T00:00:00Z
NOW = datetime(2026, 6, 1, tzinfo=UTC)


def record(**fields: Any) -> JobRecord:
    return JobRecord.from_api({"id": "job-1", **fields})


# -- durations and cut-offs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45), ("2w", 14 * 86400),
     ("1d12h", 129600), (" 7D ", 7 * 86400)],
)  # fmt: skip
def test_durations_have_known_lengths(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "text", ["", "30", "d", "1y", "3mo", "-1d", "0d", "1.5h", "30 d", "6M", "1Y", "2d6M"]
)
def test_durations_without_a_fixed_length_or_unit_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@given(st.integers(1, 5000), st.sampled_from(["w", "d", "h", "m", "s"]))  # to 96 years
def test_a_duration_is_its_number_times_its_unit(n: int, unit: str) -> None:
    per = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}[unit]
    assert parse_duration(f"{n}{unit}").total_seconds() == n * per


def test_a_cut_off_is_a_duration_before_now_or_a_date_taken_as_utc() -> None:
    assert parse_instant("30d", NOW) == NOW - timedelta(days=30)
    assert parse_instant("2026-01-31", NOW) == datetime(2026, 1, 31, tzinfo=UTC)
    assert parse_instant("2026-01-31T12:00:00Z", NOW) == datetime(2026, 1, 31, 12, tzinfo=UTC)
    offset = parse_instant("2026-01-31T12:00:00+02:00", NOW)
    assert offset == datetime(2026, 1, 31, 10, tzinfo=UTC)
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_instant("last tuesday", NOW)


# -- filters -------------------------------------------------------------------------------


def test_server_side_filters_become_the_query_and_are_checked_again() -> None:
    filters = Filters(status="FINISHED", type="COMMON", name_glob="x*")
    assert filters.server_queries() == [{"status": "FINISHED", "type": "COMMON"}]
    assert filters.mismatch(record(status="FINISHED", type="COMMON", name="xy")) is None
    assert "status" in (filters.mismatch(record(status="FAILED", type="COMMON", name="x")) or "")
    assert filters.mismatch(record(status="FINISHED", type="COMMON", name="yx")) is not None


def test_status_and_type_ignore_case_and_several_words_mean_any_of_them() -> None:
    """``--status finished`` matched nothing, ``--status A --status B`` kept only B, and
    ``--status A,B`` matched nothing at all."""
    assert Filters(status="finished").status == ("FINISHED",)
    several = Filters(status=("finished", "FAILED,failed"), type=" common ")
    assert several.status == ("FINISHED", "FAILED") and several.type == ("COMMON",)
    assert several.server_queries() == [
        {"status": "FINISHED", "type": "COMMON"},
        {"status": "FAILED", "type": "COMMON"},
    ]
    for status in ("FINISHED", "failed", " Failed "):
        assert several.matches(record(status=status, type="Common"))
    why = several.mismatch(record(status="PROCESSING", type="COMMON"))
    assert why is not None and "not 'FINISHED' or 'FAILED'" in why
    assert Filters.from_json(several.to_json()) == several
    with pytest.raises(ValueError, match="not a job status"):
        Filters(status="FINISHED;DROP")
    with pytest.raises(ValueError, match="blank"):
        Filters(status=" , ")


def test_name_glob_regex_and_user_name_select_by_name_and_owner() -> None:
    assert Filters(name_glob="diag-*").matches(record(name="diag-7"))
    assert not Filters(name_glob="diag-*").matches(record(name="DIAG-7"))  # case-sensitive
    assert Filters(name_regex=r"-0+7$").matches(record(name="diag-007"))
    assert not Filters(name_regex=r"^x").matches(record(name=None))  # no name: no match
    assert Filters(user_name="bob").matches(record(user_name="bob"))
    assert not Filters(user_name="bob").matches(record(user_name="bobby"))


def test_age_window_is_strict_and_reads_the_chosen_time_field() -> None:
    cut = datetime(2026, 5, 1, tzinfo=UTC)
    ms = int(cut.timestamp() * 1000)
    older = Filters(older_than=cut)
    assert older.matches(record(create_at=ms - 1))
    assert not older.matches(record(create_at=ms))  # the instant itself is not "older"
    assert not older.matches(record())  # unknown time: not a match
    on_update = Filters(older_than=cut, time_field="update_at")
    assert not on_update.matches(record(create_at=ms - 10, update_at=ms + 10))
    newer = Filters(newer_than=cut)
    assert newer.matches(record(create_at=ms + 1)) and not newer.matches(record(create_at=ms))


def test_a_job_time_before_2010_is_broken_and_matches_no_age_window() -> None:
    """``create_at: 0``, or seconds where milliseconds belong, read as 1970: such jobs were
    "older than" any cut-off and selected."""
    older = Filters(older_than=datetime(2026, 5, 1, tzinfo=UTC))
    seconds = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    for broken in (0, seconds, 1):
        assert not older.matches(record(create_at=broken))
        assert "not a plausible job time" in (older.mismatch(record(create_at=broken)) or "")
    assert older.matches(record(create_at=seconds * 1000))
    assert not Filters(newer_than=datetime(2000, 1, 1, tzinfo=UTC)).matches(record(create_at=0))


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"name_regex": "("}, "regular expression"), ({"status": " "}, "blank"),
     ({"id": "bad id"}, "id must be"), ({"time_field": "created"}, "time_field"),
     ({"older_than": datetime(2026, 1, 1, tzinfo=UTC),
       "newer_than": datetime(2026, 2, 1, tzinfo=UTC)}, "empty"),
     ({"older_than": datetime(2026, 1, 1)}, "time zone")],
)  # fmt: skip
def test_filters_that_cannot_mean_anything_are_refused(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Filters(**fields)


instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
words = st.none() | st.text(st.characters(codec="utf-8"), min_size=1).filter(str.strip)
job_words = st.none() | st.lists(
    st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,10}", fullmatch=True), min_size=1, max_size=3
).map(",".join)


@given(
    status=job_words, type_=job_words, glob=words, user=words, older=st.none() | instants,
    field=st.sampled_from(["create_at", "update_at"]),
)  # fmt: skip
def test_filters_survive_their_json_form_unchanged(
    status: str | None, type_: str | None, glob: str | None, user: str | None,
    older: datetime | None, field: Any,
) -> None:  # fmt: skip
    filters = Filters(status=status, type=type_, name_glob=glob, user_name=user,
                      older_than=older, time_field=field)  # fmt: skip
    assert Filters.from_json(orjson.loads(orjson.dumps(filters.to_json()))) == filters


def test_filters_json_with_an_unknown_member_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        Filters.from_json({"status": "FINISHED", "colour": "red"})


# -- paging ----------------------------------------------------------------------------------


def reader_for(url: str, *, attempts: int = 4) -> AbstractAsyncContextManager[PacedReader]:
    return paced_reader(url, attempts=attempts)


class Collect:
    """A scan's sink: what one pass handed over."""

    def __init__(self) -> None:
        self.records: list[JobRecord] = []

    def add(self, record: JobRecord) -> None:
        self.records.append(record)


async def scan(
    reader: PacedReader, queries: list[dict[str, str]] | None = None, **kw: Any
) -> tuple[Scan, list[JobRecord]]:
    """``scan_jobs`` with a fresh ``Collect`` per pass: the scan and the last pass's jobs."""
    passes: list[Collect] = []

    def sink() -> Collect:
        passes.append(Collect())
        return passes[-1]

    found = await scan_jobs(reader, queries or [{}], clock=FakeClock(), new_sink=sink, **kw)
    return found, passes[-1].records


@pytest.mark.anyio
async def test_scan_reads_every_page_and_each_job_once() -> None:
    async with run_simulator(SimulatorConfig(jobs=1050, seed=3)) as sim:
        async with reader_for(sim.url) as reader:
            found, records = await scan(reader, page_size=100)
        assert found.complete and found.pages == 11 and found.passes == 1
        assert sorted(r.id for r in records) == sorted(sim.job_ids())
        assert sim.stats.list_calls == 11
        assert reader.calls == 11


@pytest.mark.anyio
async def test_scan_passes_server_filters_on_every_page() -> None:
    async with run_simulator(SimulatorConfig(jobs=600, seed=4)) as sim:
        finished = {j.id for j in sim.store.jobs.values() if j.status == "FINISHED"}
        async with reader_for(sim.url) as reader:
            found, records = await scan(reader, [{"status": "FINISHED"}], page_size=50)
        assert {r.id for r in records} == finished
        assert found.pages == -(-len(finished) // 50)


def _job_record(n: int) -> dict[str, Any]:
    return {"id": f"job-{n}", "name": f"n{n}", "status": "FINISHED", "type": "COMMON"}


@asynccontextmanager
async def scripted_api(answers: list[tuple[int, dict[str, Any]]]) -> AsyncIterator[str]:
    """A list endpoint that answers from a script (the last answer repeats); not signed."""
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.query))
        status, body = answers[min(len(seen), len(answers)) - 1]
        return web.json_response(body, status=status, headers={"X-Request-Id": f"r{len(seen)}"})

    async with list_endpoint(handler) as url:
        yield url


@pytest.mark.anyio
async def test_a_server_that_ignores_paging_stops_the_scan_with_a_warning() -> None:
    """It keeps answering page 1 of 3, to current= and to offset= alike: three calls, not an
    endless loop, and said out loud."""
    page = {"current": 1, "pages": 3, "size": 2, "total": 6,
            "data": [_job_record(1), _job_record(2)]}  # fmt: skip
    warnings: list[tuple[str, dict[str, Any]]] = []
    async with scripted_api([(200, page)]) as url, reader_for(url) as reader:
        found, records = await scan(reader, warn=lambda event, **f: warnings.append((event, f)))
    assert not found.complete and "ignored paging" in (found.reason or "")
    assert [r.id for r in records] == ["job-1", "job-2"]
    assert reader.calls == 3
    assert [event for event, _ in warnings] == ["discover.paging_ignored"]


@pytest.mark.anyio
async def test_a_server_that_never_stops_paging_hits_the_hard_stop() -> None:
    def page(n: int) -> dict[str, Any]:
        return {"current": n, "pages": 10**9, "data": [_job_record(n)]}

    script = [(200, page(n)) for n in range(1, 6)]
    warnings: list[str] = []
    async with scripted_api(script) as url, reader_for(url) as reader:
        found, _ = await scan(reader, max_pages=3, warn=lambda e, **f: warnings.append(e))
    assert found.pages == 3 and not found.complete
    assert warnings == ["discover.too_many_pages"]


@pytest.mark.anyio
async def test_list_calls_are_retried_on_transient_errors_and_give_up_as_unavailable() -> None:
    ok = {"current": 1, "pages": 1, "data": [_job_record(1)]}
    busy = {"error_code": "APIGW.0202", "error_msg": "unavailable"}
    async with scripted_api([(503, busy), (429, busy), (200, ok)]) as url, reader_for(url) as r:
        _, records = await scan(r)
    assert [x.id for x in records] == ["job-1"] and r.retries == 2
    async with scripted_api([(503, busy)]) as url, reader_for(url, attempts=3) as r:
        with pytest.raises(ApiUnavailable):
            await scan(r)
    assert r.calls == 3


@asynccontextmanager
async def shrinking_listing(
    jobs: int, *, delete: int, every_pass: bool
) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """Offset paging over ``jobs`` jobs, pages of 50; right after the first page of the first
    pass (of every pass, with ``every_pass``), ``delete`` jobs from the front go away."""
    listing = [_job_record(n) for n in range(jobs)]
    firsts = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal firsts
        start = (int(request.query.get("current", "1")) - 1) * 50
        body = {"current": start // 50 + 1, "pages": -(-len(listing) // 50), "size": 50,
                "total": len(listing), "data": listing[start : start + 50]}  # fmt: skip
        if start == 0:
            firsts += 1
            if firsts == 1 or every_pass:
                del listing[:delete]
        return web.json_response(body, headers={"X-Request-Id": "r"})

    async with list_endpoint(handler) as url:
        yield url, listing


@pytest.mark.anyio
async def test_a_listing_that_moved_under_the_scan_is_read_again_until_it_holds_still() -> None:
    """300 of 2,600 jobs deleted mid-scan at pages of 50: offset paging skipped 300 jobs and
    the scan still said complete. Now the moved pass is thrown away and read again."""
    async with shrinking_listing(2600, delete=300, every_pass=False) as (url, listing):
        warnings: list[str] = []
        async with reader_for(url) as reader:
            found, records = await scan(reader, warn=lambda e, **f: warnings.append(e))
        assert found.complete and found.passes == 2 and warnings == ["discover.listing_moved"]
        assert [r.id for r in records] == [job["id"] for job in listing]  # none missed


@pytest.mark.anyio
async def test_a_listing_that_never_holds_still_is_reported_incomplete_with_why() -> None:
    async with shrinking_listing(2600, delete=30, every_pass=True) as (url, _):
        async with reader_for(url) as reader:
            found, _records = await scan(reader, max_passes=3)
        assert not found.complete and found.passes == 3
        assert "kept changing over 3 passes" in (found.reason or "")


# -- the command ------------------------------------------------------------------------------


def expected(jobs: list[Job], **want: Any) -> set[str]:
    """The selection, computed straight from the simulator's jobs (not through Filters)."""
    out = set()
    for job in jobs:
        if "status" in want and job.status != want["status"]:
            continue
        if "type" in want and job.type != want["type"]:
            continue
        if "before_ms" in want and not job.create_at < want["before_ms"]:
            continue
        if "user" in want and job.user_name != want["user"]:
            continue
        if "regex" in want and not re.search(want["regex"], job.name):
            continue
        out.add(job.id)
    return out


@pytest.mark.anyio
async def test_discover_prints_exactly_the_matching_ids_and_logs_to_stderr() -> None:
    """Every FINISHED diagnosis job older than 30 days (counted from the seeded epoch)."""
    async with run_simulator(SimulatorConfig(jobs=1200, seed=8)) as sim:
        cutoff = EPOCH - timedelta(days=30)
        before_ms = JOBS_EPOCH_MS - 30 * 86400_000
        jobs = list(sim.store.jobs.values())
        want = expected(jobs, status="FINISHED", type="ASCEND_DIAGNOSIS", before_ms=before_ms)
        done = await reaper(
            ["discover", "--status", "FINISHED", "--type", "ASCEND_DIAGNOSIS",
             "--older-than", cutoff.isoformat(), "--page-size", "40"],
            reaper_env(sim.url),
        )  # fmt: skip
        assert done.code == 0, done.stderr
        assert set(done.stdout.split()) == want and len(done.stdout.split()) == len(want)
        assert 20 < len(want) < 1200
        summary = [orjson.loads(x) for x in done.stderr.splitlines() if "discover.summary" in x]
        assert summary[0]["selected"] == len(want) and summary[0]["inventory_size"] == 1200
        assert summary[0]["run_id"]  # every event carries the run's id, as the reference says
        assert sim.stats.delete_calls == 0


@pytest.mark.anyio
async def test_an_id_the_api_lists_that_run_would_refuse_is_left_out_with_a_warning(
    tmp_path: Path,
) -> None:
    """Printed, ``old-1\\nvictim-1`` piped into ``run`` deleted ``victim-1``, which nobody
    selected; written into a plan, it made ``run --plan`` refuse the whole plan."""
    async with run_simulator(SimulatorConfig(jobs=5, seed=9)) as sim:
        first = next(iter(sim.store.jobs.values()))
        for bad in ("old-1\nvictim-1", "has space", "x" * 65):
            sim.store.jobs[bad] = dataclasses.replace(first, id=bad, name="diag-a")
        sim.store.jobs["victim-1"] = dataclasses.replace(first, id="victim-1", name="prod-db")
        done = await reaper(["discover", "--name", "diag-a"], reaper_env(sim.url))
        assert done.code == 0, done.stderr
        assert done.stdout == ""
        events = [orjson.loads(x) for x in done.stderr.splitlines()]
        warned = [e for e in events if e["event"] == "discover.invalid_id"]
        assert sorted(w["job_id"] for w in warned) == sorted(["old-1\\nvictim-1", "has space",
                                                              "x" * 65])  # fmt: skip
        summary = [e for e in events if e["event"] == "discover.summary"]
        assert summary[0]["invalid_ids"] == 3 and summary[0]["selected"] == 0
        plan = tmp_path / "plan.json"
        done = await reaper(["discover", "--all", "--plan", str(plan)], reaper_env(sim.url))
        assert done.code == 0, done.stderr
        with open_plan(plan, key=None) as sealed:
            planned = set(sealed.ids())
        assert planned == set(sim.store.jobs) - {"old-1\nvictim-1", "has space", "x" * 65}
        applied = await reaper(["run", "--plan", str(plan), "--dry-run"], reaper_env(sim.url))
        assert applied.code == 0, applied.stderr


@pytest.mark.anyio
async def test_discover_jsonl_holds_full_records_selected_by_regex_and_user() -> None:
    async with run_simulator(SimulatorConfig(jobs=400, seed=9)) as sim:
        want = expected(list(sim.store.jobs.values()), user="bob", regex=r"^common-0000[0-9]")
        done = await reaper(
            ["discover", "--user-name", "bob", "--name-regex", "^common-0000[0-9]",
             "--output", "jsonl"],
            reaper_env(sim.url),
        )  # fmt: skip
        assert done.code == 0, done.stderr
        rows = [orjson.loads(line) for line in done.stdout.splitlines()]
        assert {row["id"] for row in rows} == want and want
        job = sim.store.jobs[rows[0]["id"]]
        assert rows[0]["name"] == job.name and rows[0]["user_name"] == "bob"
        assert rows[0]["create_at"].endswith("Z")


@pytest.mark.anyio
async def test_discover_without_any_filter_is_refused_unless_all_is_given() -> None:
    async with run_simulator(SimulatorConfig(jobs=30, seed=1)) as sim:
        refused = await reaper(["discover"], reaper_env(sim.url))
        assert refused.code == 64 and "--all" in refused.stderr
        assert sim.stats.list_calls == 0
        everything = await reaper(["discover", "--all"], reaper_env(sim.url))
        assert everything.code == 0 and set(everything.stdout.split()) == set(sim.job_ids())


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("filters", "jobs"),
    [(["--name-regex", "."], 30), (["--older-than", "2099-01-01"], 30),
     (["--newer-than", "1970-01-01"], 30), (["--name-regex", "."], 1)],
)  # fmt: skip
async def test_filters_that_match_every_job_need_all_too(
    tmp_path: Path, filters: list[str], jobs: int
) -> None:
    """``--name-regex .`` is no filter at all, spelt another way: it selected every job
    without ``--all`` (in a project of one job too)."""
    async with run_simulator(SimulatorConfig(jobs=jobs, seed=1)) as sim:
        plan = tmp_path / "plan.json"
        refused = await reaper(["discover", *filters, "--plan", str(plan)], reaper_env(sim.url))
        assert refused.code == 64, refused.stderr
        assert f"match every job the project holds ({jobs})" in refused.stderr
        assert refused.stdout == "" and not plan.exists()
        meant = await reaper(["discover", *filters, "--all"], reaper_env(sim.url))
        assert meant.code == 0 and set(meant.stdout.split()) == set(sim.job_ids())


@pytest.mark.anyio
async def test_discover_exits_78_when_the_gateway_does_not_know_the_project() -> None:
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        done = await reaper(
            ["discover", "--all"], reaper_env(sim.url, REAPER_PROJECT_ID="other-project")
        )
    assert done.code == 78, done.stderr
    assert done.stdout == ""


@pytest.mark.anyio
async def test_a_listing_that_fails_leaves_no_spool_beside_the_plan(tmp_path: Path) -> None:
    # The jobs go to a hidden spool beside the plan until it is sealed: a listing that
    # fails (here 78, a project the gateway does not know) used to leave it there.
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        for argv, env in (
            ([], {"REAPER_PROJECT_ID": "other-project"}),
            (["--project", "other-project"], {}),
        ):
            plan = tmp_path / "plan.json"
            done = await reaper(
                ["discover", "--all", "--plan", str(plan), *argv], reaper_env(sim.url, **env)
            )
            assert done.code == 78, done.stderr
            assert list(tmp_path.iterdir()) == [], argv


@pytest.mark.anyio
async def test_a_plan_path_that_cannot_be_written_is_64_before_any_listing(
    tmp_path: Path,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        for plan in (tmp_path / "missing" / "plan.json", tmp_path, ""):
            done = await reaper(["discover", "--all", "--plan", str(plan)], reaper_env(sim.url))
            assert done.code == 64, done.stderr
            assert "--plan" in done.stderr and "Traceback" not in done.stderr
        assert sim.stats.list_calls == 0  # it used to list the whole inventory first


@pytest.mark.anyio
async def test_discover_refuses_a_selection_over_max_fraction_and_writes_no_plan(
    tmp_path: Path,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=100, seed=2)) as sim:
        plan = tmp_path / "plan.json"
        done = await reaper(
            ["discover", "--status", "FINISHED", "--plan", str(plan), "--max-fraction", "0.2"],
            reaper_env(sim.url),
        )
        assert done.code == 64, done.stderr
        assert "max_fraction" in done.stderr and not plan.exists()
        assert done.stdout == ""


@pytest.mark.parametrize(
    "argv",
    [["--older-than", "yesterday"], ["--status", "X", "--plan-ttl", "90d"],
     ["--name-regex", "("], ["--status", "X", "--page-size", "0"],
     ["--older-than", "6M"], ["--older-than", "200000w"],
     ["--older-than", "0001-01-01T00:00:00+01:00"], ["--newer-than", "9999-12-31T23:59:59-01:00"],
     ["--status", "X", "--plan", "p.json", "--plan-ttl", "999999999w"]],
)  # fmt: skip
def test_discover_usage_errors_exit_64_before_any_call(argv: list[str]) -> None:
    import subprocess
    import sys

    env = reaper_env("http://127.0.0.1:9")  # nothing listens: a call would fail differently
    done = subprocess.run([sys.executable, "-m", "worker", "discover", *argv], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 64, done.stderr
