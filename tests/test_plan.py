"""Plans: the seal (keyed and not), tamper/expiry/foreign refusals, and run --plan end to end."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import hmac
import math
import shlex
import stat
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import orjson
import pytest
from anyio.abc import Process
from hypothesis import given
from hypothesis import strategies as st

from tests import e2e
from tests.conftest import IN_CI, REDIS_URL
from tests.e2e import SIM_PROJECT, kill_when, reaper, reaper_env, results, start_reaper
from tests.gateway import Gateway, serve_gateway
from tests.tty import Terminal
from worker.discovery.filters import Filters
from worker.discovery.plan import (
    PlanHeader,
    PlanRefused,
    PlanWriter,
    check_fraction,
    open_plan,
)
from worker.errors import ConfigError, InputUnreadable
from worker.settings import load_settings, read_plan_key
from worker.simulator import FaultConfig, Simulator, SimulatorConfig, run_simulator
from worker.types import JobRecord, iso

T = TypeVar("T")
NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
ENDPOINT = "https://modelarts.cn-north-4.myhuaweicloud.com"
KEY = b"0123456789abcdef0123456789abcdef"


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


def write(path: Path, n: int = 3, *, key: bytes | None = None, **kw: Any) -> PlanHeader:
    args: dict[str, Any] = {
        "project_id": "proj-1", "endpoint": ENDPOINT, "filters": Filters(status="FINISHED"),
        "inventory_size": 10, "now": NOW, "ttl": timedelta(hours=24),
    }  # fmt: skip
    args.update(kw)
    with PlanWriter(path, key=key) as writer:
        for record in make_records(n):
            writer.add(record)
        return writer.seal(**args)


def ids_of(path: Path, key: bytes | None = None) -> list[str]:
    with open_plan(path, key=key) as plan:
        return list(plan.ids())


# -- the seal ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY], ids=["digest", "hmac"])
def test_the_seal_covers_every_byte_before_it(tmp_path: Path, key: bytes | None) -> None:
    path = tmp_path / "plan"
    header = write(path, key=key)
    lines = path.read_bytes().splitlines(keepends=True)
    body, seal = b"".join(lines[:-1]), lines[-1].decode().strip()
    assert lines[0] == b"devserver-reaper plan v2\n" and len(lines) == 1 + 1 + 3 + 1
    if key is None:
        assert seal == "seal sha256:" + hashlib.sha256(body).hexdigest()
    else:
        assert seal == "seal hmac-sha256:" + hmac.new(key, body, hashlib.sha256).hexdigest()
    assert header.seal == seal.removeprefix("seal ") and header.keyed is (key is not None)


def test_a_written_plan_reads_back_in_its_order_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "plan"
    written = write(path, 5)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with open_plan(path, key=None) as plan:
        assert list(plan.ids()) == [f"job-{i}" for i in range(5)]  # as listed, not sorted
        assert plan.header == written and len(plan) == 5
        assert plan.filters == Filters(status="FINISHED")
        assert "job-0" in plan.reviewed and "job-9" not in plan.reviewed
        job = plan.reviewed.get("job-1")
        assert job is not None and (job.status, job.name) == ("FINISHED", "n1")
        assert plan.reviewed.names()["job-2"] == "n2"
        copy = plan._scratch.path
    assert not copy.exists()  # the private copy goes with the plan
    assert "job-0" not in repr(written) and "jobs=5" in repr(written)


def _edit_line(number: int, change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        lines = raw.splitlines(keepends=True)
        data = orjson.loads(lines[number])
        change(data)
        lines[number] = orjson.dumps(data, option=orjson.OPT_SORT_KEYS) + b"\n"
        return b"".join(lines)

    return edit


EDITS: dict[str, Callable[[bytes], bytes]] = {
    "id": _edit_line(2, lambda d: d.update(id="job-9")),
    "filter": _edit_line(1, lambda d: d["filters"].update(status=None)),
    "expiry": _edit_line(1, lambda d: d.update(expires_at="2026-06-20T00:00:00.000Z")),
    "inventory": _edit_line(1, lambda d: d.update(inventory_size=10**6)),
    "added-job": lambda raw: raw.replace(b"\nseal ", b'\n{"create_at":null,"id":"job-x",'
                                         b'"name":null,"status":null,"type":null,'
                                         b'"update_at":null,"user_name":null}\nseal '),
    "dropped-job": lambda raw: b"".join(
        line for line in raw.splitlines(keepends=True) if b'"job-1"' not in line),
    "project": _edit_line(1, lambda d: d.update(project_id="proj-2")),
}  # fmt: skip


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
@pytest.mark.parametrize("key", [None, KEY], ids=["digest", "hmac"])
def test_any_edit_to_a_plan_is_refused_as_altered(
    tmp_path: Path, edit: str, key: bytes | None
) -> None:
    path = tmp_path / "plan"
    write(path, key=key)
    path.write_bytes(EDITS[edit](path.read_bytes()))
    with pytest.raises(PlanRefused, match="altered"):
        open_plan(path, key=key)


def reseal(raw: bytes, key: bytes | None) -> bytes:
    """What someone who can write the plan does after editing it: seal it again."""
    body = raw[: raw.rindex(b"seal ")]
    if key is None:
        return body + b"seal sha256:" + hashlib.sha256(body).hexdigest().encode() + b"\n"
    mac = hmac.new(key, body, hashlib.sha256).hexdigest().encode()
    return body + b"seal hmac-sha256:" + mac + b"\n"


@pytest.mark.parametrize("edit", ["filter", "inventory", "added-job", "expiry"])
def test_a_widened_plan_re_sealed_without_the_key_is_refused(tmp_path: Path, edit: str) -> None:
    """Issue 24: anyone who could write the plan widened it and recomputed the digest."""
    path = tmp_path / "plan"
    write(path, key=KEY)
    widened = EDITS[edit](path.read_bytes())
    if edit == "added-job":  # a careful forger counts the job it adds
        widened = _edit_line(1, lambda d: d.update(jobs=4))(widened)
    for forged in (reseal(widened, None), reseal(widened, b"another key, 32 bytes long......")):
        path.write_bytes(forged)
        with pytest.raises(PlanRefused, match=r"without a plan key|altered"):
            open_plan(path, key=KEY)
    # Without a key the same forgery passes: that is what "checked for accidents" means.
    path.write_bytes(reseal(widened, None))
    with open_plan(path, key=None):
        pass


def test_a_keyed_plan_needs_its_key_and_an_unkeyed_one_is_refused_by_a_keyed_run(
    tmp_path: Path,
) -> None:
    keyed, plain = tmp_path / "keyed", tmp_path / "plain"
    write(keyed, key=KEY)
    write(plain)
    with pytest.raises(PlanRefused, match=r"none is given to check it with: .* --plan-key-file"):
        open_plan(keyed, key=None)
    with pytest.raises(PlanRefused, match="sealed without a plan key, and this run has one"):
        open_plan(plain, key=KEY)
    assert ids_of(keyed, KEY) == ids_of(plain) == ["job-0", "job-1", "job-2"]


@pytest.mark.usefixtures("clean_env")
def test_a_plan_key_file_is_read_stripped_and_one_too_short_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "key"
    good.write_bytes(KEY + b"\n")
    assert read_plan_key(load_settings(plan_key_file=good)) == KEY
    assert read_plan_key(load_settings()) is None
    short = tmp_path / "short"
    short.write_bytes(b"hunter2\n")
    with pytest.raises(ConfigError, match="fewer than 16 bytes") as refused:
        read_plan_key(load_settings(plan_key_file=short))
    assert "hunter2" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"--plan-key-file .*nope cannot be read: no such file"):
        read_plan_key(load_settings(plan_key_file=tmp_path / "nope"))


def test_the_old_format_a_cut_short_or_foreign_file_is_refused_a_missing_one_unreadable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "plan"
    path.write_bytes(b'{"version": 1, "jobs": [], "digest": "sha256:00"}')
    with pytest.raises(PlanRefused, match=r"old format.*run discover again"):
        open_plan(path, key=None)
    write(path)
    path.write_bytes(path.read_bytes()[:-90])
    with pytest.raises(PlanRefused, match=r"cut short|altered"):
        open_plan(path, key=None)
    path.write_text("id-1\nid-2\n")
    with pytest.raises(PlanRefused, match="not a devserver-reaper plan"):
        open_plan(path, key=None)
    with pytest.raises(InputUnreadable):
        open_plan(tmp_path / "nope", key=None)


def test_a_well_sealed_plan_with_a_bad_id_or_a_job_twice_is_still_refused(
    tmp_path: Path,
) -> None:
    """A careless tool that re-seals what it edits cannot smuggle an invalid id in."""
    path = tmp_path / "plan"
    write(path)
    path.write_bytes(reseal(EDITS["id"](path.read_bytes()).replace(b"job-9", b"bad id!"), None))
    with pytest.raises(PlanRefused, match="not 1 to 64"):
        open_plan(path, key=None)
    write(path)
    twice = _edit_line(3, lambda d: d.update(id="job-0"))(path.read_bytes())
    path.write_bytes(reseal(twice, None))
    with pytest.raises(PlanRefused, match="twice"):
        open_plan(path, key=None)


def test_a_re_sealed_plan_that_lives_past_the_cap_is_refused(tmp_path: Path) -> None:
    """The 30-day cap was checked only when a plan was made: a year, re-sealed, passed."""
    path = tmp_path / "plan"
    write(path)
    longer = _edit_line(1, lambda d: d.update(expires_at="2027-06-01T12:00:00.000Z"))
    path.write_bytes(reseal(longer(path.read_bytes()), None))
    with pytest.raises(PlanRefused, match="longer than 30 days"):
        open_plan(path, key=None)


# -- verify ------------------------------------------------------------------------------------


def test_verify_refuses_another_project_endpoint_an_expired_plan_and_one_over_the_cap(
    tmp_path: Path,
) -> None:
    plan = write(tmp_path / "plan")
    ok: dict[str, Any] = {"project_id": "proj-1", "endpoint": ENDPOINT + "/",
                          "now": NOW + timedelta(hours=23)}  # fmt: skip
    plan.verify(**ok)
    with pytest.raises(PlanRefused, match="project proj-1, not proj-2"):
        plan.verify(**{**ok, "project_id": "proj-2"})
    with pytest.raises(PlanRefused, match="endpoint"):
        plan.verify(**{**ok, "endpoint": "https://modelarts.cn-east-3.myhuaweicloud.com"})
    with pytest.raises(PlanRefused, match="expired"):
        plan.verify(**{**ok, "now": NOW + timedelta(hours=24)})
    # Made "in the future" (re-sealed by hand to outlive the 30-day cap): refused.
    plan.verify(**{**ok, "now": NOW - timedelta(minutes=9)})
    with pytest.raises(PlanRefused, match="still to come"):
        plan.verify(**{**ok, "now": NOW - timedelta(minutes=11)})
    plan.verify(**ok, max_fraction=0.3)
    with pytest.raises(PlanRefused, match="max_fraction"):
        plan.verify(**ok, max_fraction=0.29)
    # Counted again at apply time: the smaller of the two inventories is the one that holds.
    with pytest.raises(PlanRefused, match="3 of 5 jobs"):
        plan.verify(**ok, max_fraction=0.3, inventory=5)


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


def test_a_time_to_live_beyond_thirty_days_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="time to live"):
        write(tmp_path / "plan", ttl=timedelta(days=31))
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing left behind


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


@asynccontextmanager
async def finished_plan(
    tmp_path: Path, *, jobs: int, seed: int, ttl: str = "24h"
) -> AsyncIterator[tuple[Simulator, Path, dict[str, str], list[str], Path]]:
    """A simulated project and ``discover``'s plan of its FINISHED jobs (living ``ttl``): the
    simulator, the plan's path, the environment pointing at it, the ids the plan holds, and a
    path for a run's ``--results``."""
    async with run_simulator(SimulatorConfig(jobs=jobs, seed=seed)) as sim:
        path, env = tmp_path / "plan", reaper_env(sim.url)
        made = await reaper(["discover", "--status", "FINISHED", "--plan", str(path),
                             "--plan-ttl", ttl], env)  # fmt: skip
        assert made.code == 0, made.stderr
        yield sim, path, env, ids_of(path), tmp_path / "results.jsonl"


@pytest.mark.anyio
async def test_a_plan_applied_after_changes_deletes_the_rest_and_skips_what_changed(
    tmp_path: Path,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=400, seed=21)) as sim:
        path = tmp_path / "plan.json"
        await discover_plan(sim.url, path)
        planned = ids_of(path)
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


PLAN_LIVES_FIRST, PLAN_LIVES_MOST = 3, 60
"""How long (s) a plan a test lets expire lives at least, and at most. Waiting for its end
is most of such a test's time (a plan of 12 s: 13 s of a 14 s test), and discover and the
run's first DELETE take about a second on a quiet machine; on a loaded one they may take
longer than the plan lives, and the test is tried again, afresh, on a plan living twice as
long, or half again as long as that try took, if longer. A test starts at twice what the
last one in this process took (``_TOOK``), so a loaded machine does not cost each a try."""

_TOOK = [0.0]
"""Seconds from discover's start to the first DELETE (or to the plan's end, when it came
first) in the last try of this process: only how long the next plan lives hangs on it."""


class StartedTooLate(Exception):
    """The run's first DELETE had not gone out when its plan expired: nothing was tried.
    ``took``: seconds from discover's start to then."""

    def __init__(self, took: float) -> None:
        super().__init__(f"no DELETE within {took:.1f} s")
        self.took = took


async def on_a_plan_that_expires(tmp: Path, attempt: Callable[[str, Path], Awaitable[T]]) -> T:
    """``attempt(ttl, folder)``: the test, on a plan living ``ttl``, its files in ``folder``
    (a new one each try); tried again on a longer plan while it raises ``StartedTooLate``."""
    lives = max(PLAN_LIVES_FIRST, math.ceil(2 * _TOOK[0]))
    while lives <= PLAN_LIVES_MOST:
        folder = tmp / f"living-{lives}s"
        folder.mkdir()
        try:
            return await attempt(f"{lives}s", folder)
        except StartedTooLate as late:
            lives = max(2 * lives, math.ceil(1.5 * late.took))
    raise AssertionError(
        f"no run sent a DELETE before its plan expired ({PLAN_LIVES_MOST} s at most)"
    )


async def held_past_expiry(
    gateway: Gateway, url: str, path: Path, run: list[str], *, ttl: str
) -> tuple[int | None, str, str]:
    """``run --plan`` of a plan of ``gateway``'s FINISHED jobs living ``ttl`` at ``path``, its
    first DELETE's answer held (``gateway.hold``) until the plan has certainly expired: the
    run's exit code, stdout and stderr."""
    process, expires = await first_delete_out(gateway, url, path, run, ttl=ttl)
    await past(expires)  # the answer waits for the plan's end
    gateway.hold.set()
    stdout, stderr = await e2e.read_all(process)
    return process.returncode, stdout, stderr


async def first_delete_out(
    gateway: Gateway, url: str, path: Path, run: list[str], *, ttl: str
) -> tuple[Process, datetime]:
    """A plan of ``gateway``'s FINISHED jobs living ``ttl``, written to ``path``, and
    ``run --plan`` of it started with ``run``'s flags, once its first DELETE has gone out:
    the process, and when the plan expires. ``StartedTooLate`` when the plan expired before
    the run's first DELETE went out."""
    started = time.monotonic()
    made = await reaper(["discover", "--status", "FINISHED", "--all", "--plan", str(path),
                         "--plan-ttl", ttl], reaper_env(url))  # fmt: skip
    assert made.code == 0, made.stderr
    with open_plan(path, key=None) as plan:
        expires = plan.header.expires_at
    process = await start_reaper(["run", "--plan", str(path), *run], reaper_env(url))

    async def first_sent() -> bool:
        return gateway.delete_calls == 1 or process.returncode is not None

    await e2e.until(first_sent)
    if gateway.delete_calls == 0 and datetime.now(UTC) >= expires:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await e2e.read_all(process)
        _TOOK[0] = time.monotonic() - started
        raise StartedTooLate(_TOOK[0])
    assert gateway.delete_calls == 1, "the run ended before it sent a DELETE"
    _TOOK[0] = time.monotonic() - started
    return process, expires


async def past(instant: datetime) -> None:
    """Until ``instant`` and a second more: it has certainly passed."""
    await anyio.sleep((instant - datetime.now(UTC)).total_seconds() + 1)


async def killed_mid_delete(
    gateway: Gateway, url: str, tmp: Path, *, ttl: str
) -> tuple[list[str], Path, datetime]:
    """``run --plan`` on a ledger (batches of two) of a plan of ``gateway``'s jobs living
    ``ttl``, killed (SIGKILL) while its first DELETE is out: the ``run`` arguments to resume
    it with, the results file they name, and when the plan expires."""
    path, ledger, out = tmp / "plan.json", tmp / "ledger.db", tmp / "out.jsonl"
    run = ["--yes", "--batch-size", "2", "--concurrency", "1", "--rate", "1000", "--burst",
           "50", "--ledger", str(ledger)]  # fmt: skip
    process, expires = await first_delete_out(gateway, url, path, run, ttl=ttl)
    process.kill()
    await e2e.read_all(process)
    return ["run", "--plan", str(path), *run, "--results", str(out)], out, expires


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_a_plan_that_expires_mid_run_sends_no_more_deletes_and_a_new_plan_takes_the_rest(
    tmp_path: Path,
) -> None:
    """A plan of six jobs that lives seconds, run in batches of two: the first DELETE's
    answer is held until the plan has certainly expired. Nothing more is sent on it: the
    four left end ``skipped`` (``plan_expired``), exit 1, the summary saying to plan anew. A
    new plan, run on the same ledger, deletes those four."""
    await on_a_plan_that_expires(tmp_path, _expires_mid_run)


async def _expires_mid_run(ttl: str, tmp_path: Path) -> None:
    gateway = Gateway.with_jobs(6, script=lambda call, _ids: "hold" if call == 1 else "ok")
    ledger, out = tmp_path / "ledger.db", tmp_path / "results.jsonl"
    run = ["--yes", "--batch-size", "2", "--concurrency", "1", "--rate", "1000", "--burst",
           "50", "--ledger", str(ledger), "--results", str(out)]  # fmt: skip
    async with serve_gateway(gateway) as url:
        code, stdout, stderr = await held_past_expiry(
            gateway, url, tmp_path / "plan.json", run, ttl=ttl
        )
        assert code == 1, stderr
        assert gateway.delete_calls == 1 and len(gateway.asked) == 2
        rows = {row["job_id"]: row for row in results(out)}
        left = set(gateway.jobs)
        assert {rows[i]["outcome"] for i in gateway.asked} == {"deleted"}
        assert {(rows[i]["outcome"], rows[i]["reason"]) for i in left} == {
            ("skipped", "plan_expired")
        }
        assert len(left) == 4 and "expired" in rows[min(left)]["error_msg"]
        summary = [orjson.loads(line) for line in stdout.splitlines() if "run.summary" in line]
        assert summary[0]["skipped_by_reason"] == {"plan_expired": 4}

        again = tmp_path / "plan2.json"
        made = await reaper(["discover", "--status", "FINISHED", "--all", "--plan", str(again)],
                            reaper_env(url))  # fmt: skip
        assert made.code == 0, made.stderr
        done = await reaper(["run", "--plan", str(again), *run], reaper_env(url))
        assert done.code == 0, done.stderr
        assert gateway.jobs == {} and gateway.delete_calls == 3
        assert done.summary()["deleted"] == 4


def libfaketime() -> str:
    """The path of libfaketime (Debian's ``faketime``), to preload; skipped without it,
    except under ``CI=true`` (``.ci/run`` installs it)."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    found += glob.glob("/usr/lib/faketime/libfaketime.so.1")
    if not found:
        if IN_CI:
            pytest.fail("libfaketime is required under CI=true (apt-get install faketime)")
        pytest.skip("no libfaketime on this machine (Debian: apt-get install faketime)")
    return found[0]


@pytest.mark.anyio
@pytest.mark.timeout(240)
async def test_a_plan_past_its_expires_at_on_the_system_s_clock_sends_no_more_deletes(
    tmp_path: Path,
) -> None:
    """The system's clock runs fifteen times as fast as the run's monotonic one (libfaketime
    in the run's process alone; the simulator keeps real time): a plan living 120 s is past
    its ``expires_at`` on the system's clock 8 s after the run started (its first DELETE
    goes out 1.7 s in at load 6), while its own clock says 112 s are left, and would till
    the run's end. No DELETE reaches the simulator once
    the plan has certainly expired on the system's clock: the jobs left end ``skipped``
    (``plan_expired``), exit 1. Counted on the run's clock alone, the plan lasted the run:
    every job was deleted, exit 0."""
    speed, ttl = 15, 120.0
    env_faked = {"LD_PRELOAD": libfaketime(), "FAKETIME": f"+0 x{speed}",
                 "FAKETIME_DONT_FAKE_MONOTONIC": "1"}  # fmt: skip
    started = time.monotonic()
    async with finished_plan(tmp_path, jobs=160, seed=61, ttl=f"{ttl:g}s") as planned:
        sim, path, env, ids, out = planned
        with open_plan(path, key=None) as plan:
            expires = plan.header.expires_at.timestamp()
        # Paced so that sending them all takes about 50 s: long past the plan's end on the
        # system's clock, well within it on the run's.
        assert len(ids) >= 40
        run = ["run", "--plan", str(path), "--yes", "--batch-size", "1", "--concurrency", "1",
               "--rate", "2", "--burst", "1", "--results", str(out)]  # fmt: skip
        process = await start_reaper(run, {**env, **env_faked})
        await e2e.until(e2e.deletes_sent(sim, 1))
        # libfaketime started the process's clock before its first DELETE: the system's time
        # it reads is at least speed * (t - first) + first from then on, so by this instant
        # the plan has certainly expired there. A DELETE sent just before may be on the way.
        first = time.time()
        certainly = (expires + (speed - 1) * first) / speed + 1.0
        await anyio.sleep(certainly - time.time())
        sent_by_then = sim.stats.delete_calls
        stdout, stderr = await e2e.read_all(process)
        elapsed = time.monotonic() - started
    assert elapsed < ttl * 0.75, "the plan could have expired on the run's own clock too"
    assert process.returncode == 1, stderr
    assert sim.stats.delete_calls == sent_by_then, "DELETEs went out on an expired plan"
    rows = {row["job_id"]: row for row in results(out)}
    outcomes = Counter((row["outcome"], row.get("reason")) for row in rows.values())
    assert set(rows) == set(ids)
    assert outcomes[("deleted", None)] == sent_by_then >= 1
    assert outcomes[("skipped", "plan_expired")] == len(ids) - sent_by_then >= 10
    summary = [orjson.loads(line) for line in stdout.splitlines() if "run.summary" in line]
    assert summary[0]["skipped_by_reason"] == {"plan_expired": len(ids) - sent_by_then}


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_batches_waiting_for_a_token_when_their_plan_expires_end_at_once(
    tmp_path: Path,
) -> None:
    """A plan living 12 s, run one job a batch, four at a time, at 0.5 calls/s: when it
    expires, four batches wait for their DELETE's token. Each waited its turn, 2 s apart,
    to be refused then (``plan_expired``): the last was handed back some 6 s after the
    expiry. Now they end at the expiry, with the jobs no batch had taken yet. Counted on the
    run's own clock: ``run.stats`` comes every 0.5 s of it, and at most four fall among the
    ``plan_expired`` skips (a dozen did; at load 12 writing the skips spanned more than one)."""
    async with finished_plan(tmp_path, jobs=80, seed=62, ttl="12s") as planned:
        sim, path, env, ids, out = planned
        run = ["run", "--plan", str(path), "--yes", "--batch-size", "1", "--concurrency", "4",
               "--rate", "0.5", "--burst", "1", "--stats-interval", "0.5", "--results",
               str(out)]  # fmt: skip
        done = await reaper(run, env)
    assert done.code == 1, done.stderr
    rows = {row["job_id"]: row for row in results(out)}
    outcomes = Counter((row["outcome"], row.get("reason")) for row in rows.values())
    assert set(rows) == set(ids) and sim.stats.delete_calls == outcomes[("deleted", None)] >= 1
    assert outcomes[("skipped", "plan_expired")] == len(ids) - sim.stats.delete_calls >= 8
    order = [event["event"] + ":" + str(event.get("reason")) for event in done.events()]
    expired = [n for n, said in enumerate(order) if said == "job.skipped:plan_expired"]
    between = order[expired[0] : expired[-1]]
    assert between.count("run.stats:None") <= 4, between
    assert order.count("run.stats:None") >= 10  # the clock ticked all through the run


@pytest.mark.anyio
@pytest.mark.timeout(120)
@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
async def test_a_plan_that_expires_while_a_delete_goes_unanswered_reads_its_jobs(
    tmp_path: Path, applied: bool
) -> None:
    """A plan of four jobs in batches of two: the first DELETE's answer, a 502 (the two jobs
    removed) or a 503 (nothing done), is held until the plan has certainly expired. Its
    retry may not go out on an expired plan, but its jobs are read first: gone by that
    DELETE, they end ``deleted`` (unconfirmed, ``answer_lost``), as any job found gone after
    an unanswered DELETE does, not ``skipped`` (``plan_expired``, 'not sent'), which no new
    plan could take up (discover lists no job that is gone); still there, ``skipped``
    (``plan_expired``) saying a DELETE went out unanswered, its attempt kept. The two never
    sent end skipped, 'before its DELETE went out'."""
    first = "hold_error_after" if applied else "hold_unavailable"

    async def attempt(ttl: str, tmp: Path) -> tuple[Gateway, Path, int | None, str]:
        gateway = Gateway.with_jobs(4, script=lambda call, _ids: first if call == 1 else "ok")
        out = tmp / "results.jsonl"
        run = ["--yes", "--batch-size", "2", "--concurrency", "1", "--rate", "1000", "--burst",
               "50", "--ledger", str(tmp / "ledger.db"), "--results", str(out)]  # fmt: skip
        async with serve_gateway(gateway) as url:
            code, _stdout, stderr = await held_past_expiry(
                gateway, url, tmp / "plan.json", run, ttl=ttl
            )
        return gateway, out, code, stderr

    gateway, out, code, stderr = await on_a_plan_that_expires(tmp_path, attempt)
    assert code == 1, stderr
    assert gateway.delete_calls == 1 and len(gateway.asked) == 2
    assert len(gateway.deleted) == (2 if applied else 0)
    rows = {row["job_id"]: row for row in results(out)}
    sent = {i: rows[i] for i in gateway.asked}
    if applied:
        assert {(row["outcome"], row["reason"], row["confirmed"]) for row in sent.values()} == {
            ("deleted", "answer_lost", False)
        }
    else:
        assert {(row["outcome"], row["reason"], row["attempts"]) for row in sent.values()} == {
            ("skipped", "plan_expired", 1)
        }
        assert all("went out unanswered" in row["error_msg"] for row in sent.values()), sent
    unsent = {i: rows[i] for i in gateway.job_ids() if i not in gateway.asked}
    assert len(unsent) == 2
    assert {(row["outcome"], row["reason"]) for row in unsent.values()} == {
        ("skipped", "plan_expired")
    }
    assert all("before its DELETE went out" in row["error_msg"] for row in unsent.values())


@pytest.mark.anyio
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["applied", "not-applied", "applied-at-a-terminal"])
async def test_a_run_killed_with_a_delete_unanswered_and_resumed_after_its_plan_expired_settles_it(
    tmp_path: Path, how: str
) -> None:
    """A run on a ledger is killed (SIGKILL) while its first DELETE, of two of the plan's four
    jobs, waits for its answer; the plan expires before the run is resumed on the ledger. The
    resumed run sends nothing, but reads the two: gone by that DELETE, ``deleted``
    (unconfirmed, ``answer_lost``); still there, ``skipped`` (``plan_expired``), the attempt
    kept; the two never sent end ``skipped`` (``plan_expired``); exit 1, nothing left open.
    On the code before, the resumed run was refused (64, 'plan expired'), and the two stayed
    ``sent`` in the ledger for good: a new plan cannot take up a job that is gone, so no run
    could ever say what became of them. Resumed at a terminal without ``--yes``, it asks
    nothing (on the code before this, it asked to 'delete up to 4 jobs': none would be)."""
    applied = how.startswith("applied")
    first = "hold" if applied else "hold_unavailable"

    async def attempt(ttl: str, tmp: Path) -> tuple[Gateway, Path]:
        gateway = Gateway.with_jobs(4, script=lambda call, _ids: first if call == 1 else "ok")
        async with serve_gateway(gateway) as url:
            resumed, out, expires = await killed_mid_delete(gateway, url, tmp, ttl=ttl)
            await past(expires)
            if how.endswith("terminal"):
                term = Terminal([r for r in resumed if r != "--yes"], reaper_env(url), columns=300)
                prompted = await anyio.to_thread.run_sync(
                    lambda: term.answer_if_asked("This cannot be undone.", b"no\n")
                )
                assert not prompted, term.screen_text()
                assert await anyio.to_thread.run_sync(term.wait) == 1, term.screen_text()
                lines = [line for line in term.lines() if line]
                assert not any("About to delete" in line for line in lines), lines
                asked = (
                    f"nothing to ask: the plan expired at {iso(expires)}, "
                    "so no DELETE goes out on it"
                )
                assert asked in lines, lines
            else:
                done = await reaper(resumed, reaper_env(url))
                assert done.code == 1, done.stderr
            assert gateway.delete_calls == 1, "a DELETE went out on an expired plan"
        return gateway, out

    gateway, out = await on_a_plan_that_expires(tmp_path, attempt)
    sent = set(gateway.asked)
    assert len(sent) == 2 and len(gateway.deleted) == (2 if applied else 0)
    rows = {row["job_id"]: row for row in results(out)}
    assert set(rows) == set(gateway.job_ids()) | set(gateway.deleted)
    said = {(rows[i]["outcome"], rows[i]["reason"], rows[i]["attempts"] > 0) for i in sent}
    assert said == {
        ("deleted", "answer_lost", True) if applied else ("skipped", "plan_expired", True)
    }
    unsent = {(r["outcome"], r["reason"]) for i, r in rows.items() if i not in sent}
    assert unsent == {("skipped", "plan_expired")}
    ledger = str(out.parent / "ledger.db")  # killed_mid_delete's
    report = await reaper(["report", "--ledger", ledger, "--format", "jsonl"], {})
    assert report.code == 0, report.stderr
    assert len(report.stdout.splitlines()) == 4  # every id with its outcome: none left open


@pytest.mark.anyio
@pytest.mark.timeout(120)
@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
async def test_a_job_a_killed_run_sent_then_struck_out_on_resume_is_read_not_called_skipped(
    tmp_path: Path, applied: bool
) -> None:
    """A run on a ledger is killed while its first DELETE, of two jobs, waits for its answer;
    the run is resumed with one of the two struck out (``--exclude``), and the other
    protected by id. Neither is sent again, but each is read first: gone by that DELETE, it
    ends ``deleted`` (unconfirmed, ``answer_lost``), not ``skipped`` (``excluded``,
    ``protected``), which would tell whoever struck it out that the job is still there; still
    there, ``skipped`` with the rule's reason, the attempt kept. On the code before, both
    ended ``skipped`` unread, gone or not."""
    first = "hold" if applied else "hold_unavailable"
    sent: list[set[str]] = []  # the ids of each DELETE

    def script(call: int, ids: Sequence[str]) -> str:
        sent.append(set(ids))
        return first if call == 1 else "ok"

    gateway = Gateway.with_jobs(4, script=script)
    async with serve_gateway(gateway) as url:
        resumed, out, _expires = await killed_mid_delete(gateway, url, tmp_path, ttl="1h")
        struck, protected = sorted(gateway.asked)
        exclude = tmp_path / "exclude.txt"
        exclude.write_text(struck + "\n")
        rules = ["--exclude", str(exclude), "--protect", f"id:{protected}"]
        done = await reaper([*resumed, *rules], reaper_env(url))
    assert sent[0] == {struck, protected} and len(sent) == 2
    assert not {struck, protected} & sent[1]  # never sent again
    rows = {row["job_id"]: row for row in results(out)}
    said = {(rows[i]["outcome"], rows[i]["reason"], rows[i]["attempts"]) for i in sent[0]}
    if applied:
        assert said == {("deleted", "answer_lost", 1)}, rows
        assert done.code == 0, done.stderr
    else:
        assert said == {("skipped", "excluded", 1), ("skipped", "protected", 1)}, rows
    assert {rows[i]["outcome"] for i in rows if i not in (struck, protected)} == {"deleted"}


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
        planned = ids_of(path)
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
            other = sim.job_ids()[-1]
            path.write_bytes(_edit_line(2, lambda d: d.update(id=other))(path.read_bytes()))
        elif how == "tampered-filter":
            path.write_bytes(EDITS["filter"](path.read_bytes()))
        elif how in ("expired", "other-project"):
            write(
                path, 5, project_id="other-project" if how == "other-project" else SIM_PROJECT,
                endpoint=sim.url, now=datetime.now(UTC) - timedelta(hours=2 if how == "expired"
                                                                     else 0),
                ttl=timedelta(hours=1), inventory_size=200,
            )  # fmt: skip
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


@pytest.mark.anyio
async def test_a_plan_at_an_endpoint_path_of_other_case_is_refused_as_the_docs_say(
    tmp_path: Path, repo_root: Path
) -> None:
    """A path is case-sensitive (two routes of one gateway), scheme and host are not: the
    refusal a user sees is the one docs/cleanup.md quotes, said before anything is sent."""
    path, made_at = tmp_path / "plan", "https://apig.example.com/ModelArts"
    header = write(path, 5, project_id=SIM_PROJECT, endpoint=made_at, now=datetime.now(UTC))
    header.verify(project_id=SIM_PROJECT, endpoint="HTTPS://APIG.Example.com:443/ModelArts/",
                  now=datetime.now(UTC))  # fmt: skip
    done = await reaper(["run", "--plan", str(path), "--yes"],
                        reaper_env("https://apig.example.com/modelarts"))  # fmt: skip
    assert done.code == 64, done.stderr
    said = done.stderr.strip()
    assert said == (f"devserver-reaper run: plan is for endpoint {made_at}, not "
                    "https://apig.example.com/modelarts: refusing to apply it")  # fmt: skip
    assert done.events("run.usage_error")
    assert f"`{said}`" in (repo_root / "docs" / "cleanup.md").read_text(encoding="utf-8")


@pytest.mark.anyio
@pytest.mark.parametrize("endpoint", ["http://[127.0.0.1]", "http://[::1"])
async def test_a_plan_whose_endpoint_cannot_be_read_is_refused_in_words(
    tmp_path: Path, endpoint: str
) -> None:
    """A plan of one project whose header names an endpoint no URL reader takes (sealed
    without a key, anyone can write one) is refused (64) saying so, by ``run --plan`` and by
    ``plan show``. On the code before, ``run`` ended with a ValueError traceback (exit 1):
    the endpoint was compared with the run's before it was held to any rule."""
    path = tmp_path / "plan"
    write(path, 2, project_id=SIM_PROJECT, endpoint=endpoint, now=datetime.now(UTC))
    said = f"plan {path} is not a valid plan: its endpoint is not a URL with a host that can be"
    for command in (["run", "--plan", str(path), "--yes"], ["plan", "show", str(path)]):
        done = await reaper(command, reaper_env("http://127.0.0.1:9"))
        assert (done.code, "Traceback" in done.stderr) == (64, False), done.stderr
        assert said in done.stderr, done.stderr


def test_plan_and_input_are_mutually_exclusive() -> None:
    from worker.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["run", "--plan", "p.json", "--input", "ids.txt"])
    assert exited.value.code == 64


# -- keys, exclusions, policies and the review, end to end --------------------------------------


@pytest.mark.anyio
async def test_max_fraction_is_checked_against_the_jobs_the_project_holds_at_apply_time(
    tmp_path: Path,
) -> None:
    """A plan sealed without a key cannot vouch for its ``inventory_size``: the run counts
    the project again, and 100 planned jobs out of 150 left is over 0.5, whatever it says."""
    async with run_simulator(SimulatorConfig(jobs=400, seed=23)) as sim:
        path = tmp_path / "plan"
        done = await reaper(["discover", "--type", "COMMON", "--plan", str(path)],
                            reaper_env(sim.url))  # fmt: skip
        assert done.code == 0, done.stderr
        planned = set(ids_of(path))
        others = [i for i in sim.job_ids() if i not in planned]
        sim.store.delete(others[: len(others) - len(planned) // 2])
        refused = await reaper(["run", "--plan", str(path), "--max-fraction", "0.5", *FAST_RUN],
                               reaper_env(sim.url))  # fmt: skip
        assert refused.code == 64, refused.stderr
        assert "exceeds max_fraction 0.5" in refused.stderr
        assert sim.stats.delete_calls == 0


FAST_RUN = ["--yes", "--rate", "1000", "--burst", "50"]


@pytest.mark.anyio
async def test_a_plan_sealed_with_a_key_is_applied_only_with_that_key(tmp_path: Path) -> None:
    """... and the next command ``plan show`` prints names the key: pasted as printed, it
    runs (it was refused, 64, for want of the key; the folder's space is quoted)."""
    folder = tmp_path / "the plans"
    folder.mkdir()
    key, other = folder / "plan.key", tmp_path / "other.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    other.write_bytes(b"x" * 32)
    async with run_simulator(SimulatorConfig(jobs=60, seed=24)) as sim:
        path = folder / "plan"
        env = reaper_env(sim.url)
        done = await reaper(["discover", "--status", "FINISHED", "--all", "--plan", str(path),
                             "--plan-key-file", str(key)], env)  # fmt: skip
        assert done.code == 0, done.stderr
        assert "plan.unkeyed" not in done.stderr
        shown = await reaper(["plan", "show", str(path), "--plan-key-file", str(key)], env)
        dry = next(line for line in shown.stdout.splitlines() if line.startswith("next: "))
        words = shlex.split(dry.removeprefix("next: ").partition("   (")[0])
        assert words[:2] == ["devserver-reaper", "run"]
        pasted = await reaper(words[1:], env)
        assert pasted.code == 0, pasted.stderr
        assert pasted.summary()["would_delete"] == len(ids_of(path, KEY)) > 0
        for extra in ([], ["--plan-key-file", str(other)]):
            refused = await reaper(["run", "--plan", str(path), *FAST_RUN, *extra], env)
            assert refused.code == 64, refused.stderr
        assert sim.stats.delete_calls == 0
        applied = await reaper(["run", "--plan", str(path), *FAST_RUN, "--plan-key-file",
                                str(key)], env)  # fmt: skip
        assert applied.code == 0, applied.stderr
        assert applied.summary()["deleted"] == len(ids_of(path, KEY)) > 0
        unkeyed = await reaper(["discover", "--all", "--plan", str(path)], env)
        assert "plan.unkeyed" in unkeyed.stderr  # said out loud: checked for accidents only


@pytest.mark.anyio
async def test_a_plan_sealed_with_no_key_is_said_to_guard_against_accidents_only(
    tmp_path: Path,
) -> None:
    """A plan written with no plan key can be widened and sealed again by anyone who can
    write it (the seal is a plain digest). ``plan show`` said "checked for accidents only"
    and ``run --plan`` nothing at all: both now say plainly what it guards against and what
    not, and how to stop it; a run given a plan key refuses it (64), nothing sent."""
    key = tmp_path / "plan.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    async with finished_plan(tmp_path, jobs=30, seed=63) as (sim, path, env, ids, _out):
        path.write_bytes(reseal(EDITS["inventory"](path.read_bytes()), None))  # widened, resealed
        shown = await reaper(["plan", "show", str(path)], env)
        dry = await reaper(["run", "--plan", str(path), "--dry-run"], env)
        keyed = await reaper(["run", "--plan", str(path), *FAST_RUN, "--plan-key-file",
                              str(key)], env)  # fmt: skip
    assert shown.code == 0, shown.stderr
    review = " ".join(shown.stdout.split())
    assert ("sealed with no plan key: it guards against accidents, not against anyone who "
            "can write the file (they can change it and seal it again); make and apply plans "
            "with --plan-key-file to stop that") in review  # fmt: skip
    assert dry.code == 0, dry.stderr
    (warned,) = dry.events("plan.unkeyed")
    assert warned["level"] == "warning"
    assert warned["reason"] == (
        f"plan {path} is sealed with no plan key: its seal guards against accidents, not "
        "against anyone who can write the file (they can change it and seal it again); make "
        "and apply plans with --plan-key-file to stop that"
    )
    assert dry.summary()["would_delete"] == len(ids)
    assert keyed.code == 64 and "sealed without a plan key" in keyed.stderr
    assert sim.stats.delete_calls == 0


@pytest.mark.anyio
async def test_exclude_drops_ids_after_review_and_says_so_in_the_summary_and_results(
    tmp_path: Path,
) -> None:
    async with finished_plan(tmp_path, jobs=80, seed=25) as (sim, path, env, planned, out):
        struck = planned[1::7]
        (tmp_path / "keep.txt").write_text("# kept after review\n" + "\n".join(struck) + "\n")
        done = await reaper(["run", "--plan", str(path), "--exclude", str(tmp_path / "keep.txt"),
                             "--results", str(out), *FAST_RUN], env)  # fmt: skip
        assert done.code == 0, done.stderr
        rows = {row["job_id"]: row for row in results(out)}
        assert {i for i, r in rows.items() if r["reason"] == "excluded"} == set(struck)
        assert set(struck) <= set(sim.store.jobs) and set(planned) - set(struck) <= sim.deleted
        assert done.summary()["skipped_by_reason"] == {"excluded": len(struck)}
        assert done.events("run.started")[0]["excluded"] == len(struck)
        bad = tmp_path / "bad.txt"
        bad.write_text("not an id!\n")
        refused = await reaper(["run", "--plan", str(path), "--exclude", str(bad), *FAST_RUN],
                               env)  # fmt: skip
        assert refused.code == 64 and "line 1" in refused.stderr


@pytest.mark.anyio
async def test_an_exclude_line_that_strikes_out_no_planned_job_refuses_the_run_64(
    tmp_path: Path,
) -> None:
    """A reviewer strikes a job out as ``0A92...`` (the plan holds ``0a92...``: ids are
    compared exactly) or with a typo. The run used to take the file, say ``excluded: 2`` in
    ``run.started`` and delete both jobs; now it refuses (64) before any DELETE, naming the
    lines, and with discover's filters refuses the id that differs only in case."""
    keep = tmp_path / "keep.txt"
    async with finished_plan(tmp_path, jobs=40, seed=25) as (sim, path, env, planned, _):
        upper = planned[0].upper()
        typo = planned[1][:-1] + ("0" if planned[1][-1] != "0" else "1")
        assert upper != planned[0]
        for line in (upper, typo):
            keep.write_text(line + "\n")
            refused = await reaper(["run", "--plan", str(path), "--exclude", str(keep),
                                    *FAST_RUN], env)  # fmt: skip
            assert refused.code == 64, refused.stderr
            assert line in refused.stderr and "struck out" in refused.stderr
            assert (f"the plan holds {planned[0]}" in refused.stderr) == (line == upper)
        keep.write_text(upper + "\n")
        selected = await reaper(["run", "--status", "FINISHED", "--exclude", str(keep),
                                 *FAST_RUN], env)  # fmt: skip
        assert selected.code == 64 and f"the plan holds {planned[0]}" in selected.stderr
        assert not sim.deleted and sim.stats.delete_calls == 0


@pytest.mark.anyio
async def test_run_with_discover_s_filters_selects_seals_and_applies_in_one_go(
    tmp_path: Path,
) -> None:
    """The nightly policy: ``run --status FINISHED --older-than ...`` with protection, a cap
    and max_fraction, no list of ids anywhere."""
    async with run_simulator(SimulatorConfig(jobs=300, seed=26)) as sim:
        env = reaper_env(sim.url)
        jobs = sim.store.jobs
        want = {i for i, j in jobs.items() if j.status in ("FINISHED", "FAILED")
                and not j.name.startswith("common-")}  # fmt: skip
        out = tmp_path / "results.jsonl"
        done = await reaper(["run", "--status", "finished", "--status", "FAILED", "--protect",
                             "common-*", "--max-fraction", "0.9", "--results", str(out),
                             *FAST_RUN], env)  # fmt: skip
        assert done.code == 0, done.stderr
        assert {r["job_id"] for r in results(out) if r["outcome"] == "deleted"} == want
        assert done.events("run.selected")[0]["jobs"] == len(want)
        assert not any(j.name.startswith("common-") for i, j in jobs.items() if i in sim.deleted)
        capped = await reaper(["run", "--status", "PROCESSING", "--max-deletions", "5",
                               *FAST_RUN], env)  # fmt: skip
        assert capped.summary()["deleted"] == 5
        over = await reaper(["run", "--all", "--max-fraction", "0.5", *FAST_RUN], env)
        assert over.code == 64 and "max_fraction" in over.stderr
        mixed = await reaper(["run", "--status", "FAILED", "--input", "-", *FAST_RUN], env)
        assert mixed.code == 64


@pytest.mark.anyio
async def test_plan_show_and_discover_on_a_table_give_the_review_and_the_next_command(
    tmp_path: Path,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=120, seed=27)) as sim:
        env = reaper_env(sim.url)
        finished = [j for j in sim.store.jobs.values() if j.status == "FINISHED"]
        path = tmp_path / "plan"
        done = await reaper(["discover", "--status", "FINISHED", "--all", "--plan", str(path),
                             "--protect", "common-*", "-o", "table"], env)  # fmt: skip
        assert done.code == 0, done.stderr
        shown = await reaper(["plan", "show", str(path)], env)
        assert shown.code == 0, shown.stderr
        assert shown.stdout == done.stdout  # discover on a terminal shows what plan show does
        kept = [j for j in finished if not j.name.startswith("common-")]
        assert f"{len(kept):,} jobs planned" in shown.stdout
        for user in {j.user_name for j in kept}:
            count = sum(j.user_name == user for j in kept)
            assert any(line.split() == [user, f"{count:,}"] for line in shown.stdout.splitlines())
        protected = len(finished) - len(kept)
        assert f"left out by protection: {protected:,}" in shown.stdout
        assert f"devserver-reaper run --plan {path}" in shown.stdout
        assert "no plan key" in shown.stdout and "estimated time to delete" in shown.stdout
        path.write_bytes(path.read_bytes().replace(b'"FINISHED"', b'"FAILED"', 1))
        altered = await reaper(["plan", "show", str(path)], env)
        assert altered.code == 64 and "altered" in altered.stderr
        table = await reaper(["discover", "--status", "FINISHED", "-o", "table"], env)
        assert table.code == 0 and table.stdout.startswith("ID ")
        assert f"{len(finished):,} jobs selected" in table.stdout and "next:" in table.stdout


@pytest.mark.anyio
async def test_a_dry_run_of_a_plan_checks_the_live_jobs_and_sends_no_delete(
    tmp_path: Path,
) -> None:
    """As ``kubectl --dry-run=server``: would delete N, would skip M, and why."""
    async with finished_plan(tmp_path, jobs=200, seed=28) as (sim, path, env, planned, out):
        changed, gone, kept = planned[3], planned[9], planned[20]
        sim.set_status(changed, "PROCESSING")
        sim.store.delete([gone])
        done = await reaper(["run", "--plan", str(path), "--dry-run", "--results", str(out),
                             "--protect", f"id:{kept}", "--protect", "never-*"], env)  # fmt: skip
        assert done.code == 0, done.stderr
        assert sim.stats.delete_calls == 0 and set(sim.store.jobs) >= set(planned) - {gone}
        summary = done.summary()
        assert summary["would_delete"] == len(planned) - 3 and summary["absent"] == 1
        # it reads the jobs: its name rule is checked, its count no upper bound
        assert summary["unchecked_rules"] == [] and "not checked" not in done.stderr
        assert summary["skipped_by_reason"] == {
            "dry_run": len(planned) - 3, "plan_mismatch": 1, "protected": 1}  # fmt: skip
        rows = {row["job_id"]: row for row in results(out)}
        assert rows[changed]["reason"] == "plan_mismatch" and rows[gone]["outcome"] == "absent"
        # Checked on listing pages, but the two no fresh page held (the id rule reads none).
        assert summary["checks"]["by_listing"] == len(planned) - 3
        assert summary["checks"]["by_show"] == 2 == sim.stats.show_calls


@pytest.mark.anyio
async def test_the_copy_of_a_plan_a_kill_9_left_is_removed_by_the_next_not_a_live_one(
    tmp_path: Path,
) -> None:
    """``kill -9`` during ``run --plan`` leaves the run's private copy of the plan (every
    job it names) in the temporary directory. The next ``run --plan`` removes it; a copy a
    living run still holds is left alone by another command that opens a plan."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()

    def copies() -> set[Path]:
        return set(scratch.glob("devserver-reaper-plan*"))

    async with run_simulator(SimulatorConfig(jobs=60, seed=21)) as sim:
        path = tmp_path / "plan"
        await discover_plan(sim.url, path)
        # Every call now waits 10 s: each run is caught at its first reads, its copy made.
        sim.set_faults(FaultConfig(latency_ms=10_000.0, latency_jitter=False))
        env = reaper_env(sim.url, TMPDIR=str(scratch))
        args = ["run", "--plan", str(path), "--yes", "--rate", "1000"]
        # Calls of this run's own (discover's listing calls were counted too): its first
        # call comes after its copy is whole, so a kill then leaves a whole copy behind.
        before = sim.stats.calls
        killed = await start_reaper(args, env)
        async with killed:
            await kill_when(killed, lambda: bool(copies()) and sim.stats.calls > before)
        (stale,) = copies()
        assert (stale / "plan.sqlite").exists()  # what the bug left behind
        before = sim.stats.calls
        living = await start_reaper(args, env)
        async with living:
            with anyio.fail_after(30):
                while not copies() - {stale} or sim.stats.calls <= before:
                    await anyio.sleep(0.01)
            assert stale not in copies()  # the next run removed the dead one's copy
            (held,) = copies()
            shown = await reaper(["plan", "show", str(path)], env)
            assert shown.code == 0, shown.stderr
            assert living.returncode is None and copies() == {held}  # its copy is kept
            living.kill()
            await living.wait()
        assert sim.deleted == set()


@pytest.mark.anyio
@pytest.mark.parametrize("command", ["run", "enqueue"])
@pytest.mark.parametrize("name", ["plan.jsonl", "plan.txt"])
async def test_a_plan_given_as_an_input_of_ids_is_refused_not_its_jobs_deleted_unchecked(
    tmp_path: Path, redis_prefix: str, redis_client: Any, command: str, name: str
) -> None:
    """``--input plan.jsonl`` where ``--plan`` was meant: its job lines hold an ``id``, so the
    JSON Lines reader took them as ids and run deleted every job the plan names with no seal,
    expiry or re-check (a job gone PROCESSING since the review was deleted too), and enqueue
    put them on the stream for serve. A plan is never read as ids, in any format: 66, saying
    to give it as --plan, nothing sent or enqueued."""
    async with run_simulator(SimulatorConfig(jobs=30, seed=22)) as sim:
        path = tmp_path / name
        env = reaper_env(sim.url)
        done = await reaper(["discover", "--all", "--plan", str(path)], env)
        assert done.code == 0, done.stderr
        planned = ids_of(path)
        sim.set_status(planned[0], "PROCESSING")  # changed since the review
        stream = redis_prefix + "ids"
        asked = (
            ["--stream", stream, "--redis-url", REDIS_URL] if command == "enqueue" else ["--yes"]
        )
        formats = ["--input-format", "jsonl"] if name.endswith(".txt") else []
        applied = await reaper([command, "--input", str(path), *formats, *asked], env)
        assert applied.code == 66, applied.stdout + applied.stderr
        assert f"give it to run as --plan {path}" in applied.stdout + applied.stderr
        assert "Traceback" not in applied.stderr
        assert set(planned) <= set(sim.store.jobs)  # nothing deleted
        if command == "enqueue":
            assert await redis_client.exists(stream) == 0


@pytest.mark.anyio
async def test_discover_on_a_full_disk_says_so_and_leaves_no_plan_nor_its_spool(
    tmp_path: Path,
) -> None:
    """The plan's spool past a full disk (a file size limit) raised an OSError traceback,
    exit 1, and the spool's last flush failing in its clean-up left the jobs it had listed
    beside the plan path. Now: 64 in words, no plan and no spool; and stdout full the same."""
    async with run_simulator(SimulatorConfig(jobs=300, seed=5)) as sim:
        env = reaper_env(sim.url)
        plan = tmp_path / "plans" / "plan.txt"
        plan.parent.mkdir()
        done = await reaper(["discover", "--all", "--plan", str(plan)], env, files_up_to=20_000)
        assert done.code == 64, done.stderr
        assert "Traceback" not in done.stderr
        assert "no plan was written" in done.stderr
        assert list(plan.parent.iterdir()) == []
        line = shlex.join([sys.executable, "-m", "worker", "discover", "--all", "-o", "ids"])
        full = await anyio.run_process(["bash", "-c", f"{line} > /dev/full"], env=env, check=False)
        assert full.returncode == 64, full.stderr
        assert b"Traceback" not in full.stderr
        assert b"cannot write stdout: no space left on device" in full.stderr
