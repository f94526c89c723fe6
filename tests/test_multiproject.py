"""Many projects in one run (issue 25), stage by stage: an input line naming its project,
region or endpoint; batches of one target each; the ledger keeping each id's target (and
refusing an id named for two projects); outcomes carrying the target; lanes per target."""

from __future__ import annotations

import csv
import io
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream
from hypothesis import given
from hypothesis import strategies as st

from tests.fakes import FakeClock
from worker.batcher import Batcher
from worker.clock import MonotonicClock
from worker.errors import ApiUnavailable, AuthError, ConfigError, ServerError
from worker.input.sources import Entry, read_entries
from worker.lanes import Lanes
from worker.ledger import Ledger, TemporaryLedger, open_readonly
from worker.outcomes.events import result_event
from worker.outcomes.schema import EVENT_FIELDS, TARGET
from worker.pipeline import ONE_PROJECT, targeted
from worker.routing import Router, Stamped
from worker.settings import Settings
from worker.targets import Address, Target, Targets, endpoint_for, limit_key
from worker.terminal.summary import RunEnd
from worker.types import Batch, Candidate, Outcome, Rejection, Result

pytestmark = [pytest.mark.usefixtures("clean_env"), pytest.mark.anyio]

REPO = Path(__file__).resolve().parent.parent
HOME = Target("proj-a", "http://127.0.0.1:8001", "cn-north-4")
AWAY = Target("proj-b", "http://127.0.0.1:8002", "cn-east-3")


def read(data: str, fmt: str) -> list[Entry]:
    return list(read_entries("-", fmt, stdin=io.BytesIO(data.encode())))


def where(entry: Entry) -> tuple[object, ...]:
    if isinstance(entry, Rejection):
        return (entry.line, "rejected", entry.reason)
    return (entry.line, entry.job_id, entry.address)


# -- input ------------------------------------------------------------------------------------


def test_a_json_line_may_name_project_region_and_endpoint_beside_the_id() -> None:
    entries = read(
        '{"id": "j1"}\n'
        '{"id": "j2", "project_id": "proj-b", "region": "cn-east-3"}\n'
        '{"job_id": "j3", "endpoint": "http://127.0.0.1:9/", "project_id": "p"}\n'
        '"j4"\n'
        '{"id": "j5", "project_id": "", "region": null}\n',
        "jsonl",
    )
    assert [where(e) for e in entries] == [
        (1, "j1", None),
        (2, "j2", Address(project_id="proj-b", region="cn-east-3")),
        (3, "j3", Address(project_id="p", endpoint="http://127.0.0.1:9")),
        (4, "j4", None),
        (5, "j5", None),
    ]


def test_a_bad_project_region_or_endpoint_on_a_line_rejects_it_with_the_rule() -> None:
    entries = read(
        '{"id": "j1", "project_id": "a/b"}\n'
        '{"id": "j2", "region": "North"}\n'
        '{"id": "j3", "endpoint": "http://example.com"}\n'
        '{"id": "j4", "project_id": 7}\n'
        '{"id": "bad id", "project_id": "p"}\n',
        "jsonl",
    )
    assert [where(e) for e in entries] == [
        (1, "rejected", "project_id must be 1 to 64 letters, digits and hyphens"),
        (2, "rejected", "region must look like cn-north-4 (lower-case letters, digits, hyphens)"),
        (3, "rejected", "endpoint plain http:// is accepted only for loopback hosts; use https://"),
        (4, "rejected", "'project_id' is not a string (got a number)"),
        (5, "rejected", "invalid character ' ' at position 4"),
    ]


def test_csv_columns_name_the_target_and_an_empty_field_names_none() -> None:
    entries = read("id,Project_ID,region\nj1,proj-b,cn-east-3\nj2,,\nj3,bad/p,\nj4,proj-c\n", "csv")
    assert [where(e) for e in entries] == [
        (2, "j1", Address(project_id="proj-b", region="cn-east-3")),
        (3, "j2", None),
        (4, "rejected", "project_id must be 1 to 64 letters, digits and hyphens"),
        (5, "rejected", "row has no 'region' field (it has 2; the header has 3)"),
    ]


def test_plain_ids_and_an_id_only_csv_are_read_as_they_always_were() -> None:
    assert [where(e) for e in read("j1\nj2\n", "text")] == [(1, "j1", None), (2, "j2", None)]
    assert [where(e) for e in read("job_id,name\nj1,x\n", "csv")] == [(2, "j1", None)]


async def test_resolving_rejects_an_unknown_place_and_a_project_outside_the_list() -> None:
    targets = Targets(HOME, allowed=("proj-a", "proj-b"))
    candidates = [
        Candidate("j1", 1),
        Candidate("j2", 2, Address(project_id="proj-b", endpoint=AWAY.endpoint)),
        Candidate("j3", 3, Address(project_id="proj-z")),
        Candidate("j4", 4, Address(region="cn-east-3")),
    ]
    rejections: list[Rejection] = []
    kept = await targeted(candidates, targets, rejections)
    assert [(c.job_id, c.target) for c in kept] == [
        ("j1", None),
        ("j2", Target("proj-b", AWAY.endpoint, None)),
    ]
    assert rejections == [
        Rejection("j3", 3, "project proj-z is not in allowed_projects"),
        Rejection(
            "j4", 4, "names region cn-east-3 but no project_id (a project id belongs to one region)"
        ),
    ]


# -- batching ---------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(0, 40), st.sampled_from([None, HOME, AWAY])), max_size=200),
       st.integers(1, 7))  # fmt: skip
def test_a_batch_holds_one_target_only_and_every_id_lands_in_exactly_one(
    items: list[tuple[int, Target | None]], size: int
) -> None:
    batcher = Batcher(size, prefix="t")
    batches: list[Batch] = []
    for number, target in items:
        batch = batcher.add(f"j{number}", target)
        if batch is not None:
            batches.append(batch)
    while (last := batcher.flush()) is not None:
        batches.append(last)
    got = sorted((job_id, str(b.target)) for b in batches for job_id in b.ids)
    assert got == sorted((f"j{n}", str(t)) for n, t in items)
    for batch in batches:
        assert 1 <= len(batch) <= size
    assert len({b.batch_id for b in batches}) == len(batches)


# -- the ledger -------------------------------------------------------------------------------


def _ledger(path: Path, run_id: str) -> Ledger:
    return Ledger.open(path, project_id=HOME.project_id, endpoint=HOME.endpoint, run_id=run_id)


def test_the_ledger_keeps_each_ids_target_and_refuses_an_id_named_for_two_projects(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    with _ledger(path, "run-1") as ledger:
        admission = ledger.admit(
            [
                Candidate("j1", 1),
                Candidate("j2", 2, target=AWAY),
                Candidate("j2", 3, target=AWAY),  # the same line again: repeated
                Candidate("j1", 4, target=AWAY),  # the default's id, for another project
                Candidate("j3", 5, target=HOME),  # the default named: the same place
                Candidate("j3", 6),
            ]
        )
        assert [c.job_id for c in admission.new] == ["j1", "j2", "j3"]
        assert [c.line for c in admission.repeated] == [3, 6]
        assert [(r.raw, r.line) for r in admission.conflicts] == [("j1", 4)]
        assert admission.conflicts[0].reason.startswith(
            "id read before for project proj-a at http://127.0.0.1:8001: one id is one job"
        )
        ledger.record(
            [
                Result("j1", Outcome.DELETED, 1, "b-1", 200),
                Result("j2", Outcome.ABSENT, 1, "b-2", 404, target=AWAY),
            ]
        )
    with _ledger(path, "run-2") as again:  # a later run: the same rule, from the file
        admission = again.admit([Candidate("j2", 1), Candidate("j3", 2, target=HOME)])
        assert admission.conflicts[0].reason.startswith(
            "id read before for project proj-b at cn-east-3"
        )
        assert [c.job_id for c in admission.new] == ["j3"]
    with open_readonly(path) as view:
        assert [(r.job_id, r.target) for r in view.results()] == [
            ("j1", None),
            ("j2", AWAY),
        ]


def test_a_ledger_from_before_many_projects_is_read_and_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with _ledger(path, "run-1") as ledger:
        ledger.admit([Candidate("j1", 1), Candidate("j2", 2)])
        ledger.record([Result("j1", Outcome.DELETED, 1, "b-1", 200)])
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE ids DROP COLUMN target")  # as the older version made it
    conn.execute("DROP TABLE targets")
    conn.commit()
    conn.close()
    with open_readonly(path) as view:  # read as it is: every id the default's
        assert [(r.job_id, r.target) for r in view.results()] == [("j1", None)]
    with _ledger(path, "run-2") as ledger:  # the writer adds the column and the table
        admission = ledger.admit([Candidate("j2", 1), Candidate("j9", 2, target=AWAY)])
        assert [c.job_id for c in admission.new] == ["j2", "j9"]
        ledger.record([Result("j9", Outcome.DELETED, 1, "b-2", 200, target=AWAY)])
    with open_readonly(path) as view:
        assert [(r.job_id, r.target) for r in view.results()] == [("j1", None), ("j9", AWAY)]


@pytest.mark.parametrize("memory_ids", [100, 2])
def test_without_a_ledger_an_id_named_for_two_projects_is_refused_too(memory_ids: int) -> None:
    """In memory, and once the temporary ledger has moved its ids to disk."""
    with TemporaryLedger.open(memory_ids=memory_ids, default=HOME) as ledger:
        first = ledger.admit([Candidate("j1", 1), Candidate("j2", 2, target=AWAY)])
        assert [c.job_id for c in first.new] == ["j1", "j2"]
        second = ledger.admit(
            [
                Candidate("j1", 3, target=HOME),  # the default, named: the same place
                Candidate("j2", 4),  # read for proj-b, now for the default: refused
                Candidate("j3", 5, target=AWAY),
                Candidate("j3", 6),  # within the chunk
            ]
        )
        assert [c.line for c in second.new] == [5]
        assert [c.line for c in second.repeated] == [3]
        assert [(r.line, r.reason[:39]) for r in second.conflicts] == [
            (4, "id read before for project proj-b at cn"),
            (6, "id read before for project proj-b at cn"),
        ]


# -- outcomes ---------------------------------------------------------------------------------


def test_an_outcome_carries_project_and_region_only_when_its_line_named_them() -> None:
    plain = Result("j1", Outcome.ABSENT, 1, "b-1", 404)
    named = Result("j2", Outcome.ABSENT, 1, "b-1", 404, target=AWAY)
    assert "project_id" not in plain.row()
    assert "project_id" not in result_event(plain)[2]
    assert named.row()["project_id"] == "proj-b"
    assert named.row()["region"] == "cn-east-3"
    assert result_event(named)[2] == {
        "job_id": "j2",
        "batch_id": "b-1",
        "project_id": "proj-b",
        "region": "cn-east-3",
    }
    assert set(TARGET) <= EVENT_FIELDS


class _Journal:
    def __init__(self) -> None:
        self.settled: list[Result] = []

    async def sent(self, batch_id: str, ids: Sequence[str], attempt: int) -> None:
        pass

    async def unsent(self, batch_id: str, ids: Sequence[str]) -> None:
        pass

    async def retrying(self, batch_id: str, attempt: int, delay_s: float, reason: str) -> None:
        pass

    async def finished(self, results: Sequence[Result]) -> None:
        self.settled.extend(results)


async def test_a_named_targets_journal_stamps_its_outcomes() -> None:
    inner = _Journal()
    await Stamped(inner, AWAY).finished([Result("j1", Outcome.ABSENT)])
    assert [r.target for r in inner.settled] == [AWAY]


# -- routing ----------------------------------------------------------------------------------


class _Lane:
    """Ends every id absent, or raises ``ApiUnavailable`` when its endpoint is down."""

    def __init__(self, target: Target | None, down: set[str], journal: _Journal) -> None:
        self.target = target
        self._down = down
        self._journal = journal
        self.batches: list[str] = []

    async def process(self, batch: Batch) -> None:
        self.batches.append(batch.batch_id)
        endpoint = (self.target or HOME).endpoint
        if endpoint in self._down:
            cause = ServerError(f"{endpoint} gave out", http_status=503)
            raise ApiUnavailable(cause, batch_id=batch.batch_id, open_ids=len(batch))
        await self._journal.finished([Result(i, Outcome.ABSENT) for i in batch.ids])


async def test_an_endpoint_that_gives_out_stops_its_own_batches_only() -> None:
    down: set[str] = {AWAY.endpoint}
    journal = _Journal()
    lanes: dict[Target | None, _Lane] = {}
    said: list[str] = []

    def lane(target: Target | None) -> _Lane:
        return lanes.setdefault(target, _Lane(target, down, journal))

    router = Router(default=HOME, lane=lane, on_out=lambda place, exc: said.append(place.endpoint))
    await router.process(Batch("b1", ("h1",)))
    await router.process(Batch("b2", ("a1", "a2"), target=AWAY))
    await router.process(Batch("b3", ("a3",), target=AWAY))  # not sent: its endpoint is down
    await router.process(Batch("b4", ("h2",), target=HOME))
    assert [r.job_id for r in journal.settled] == ["h1", "h2"]
    assert lanes[AWAY].batches == ["b2"]
    assert said == [AWAY.endpoint]
    assert router.left_open == 1
    assert list(router.down) == [AWAY.endpoint]
    assert "down=[http://127.0.0.1:8002]" in repr(router)
    # the default's endpoint too: nothing the run has met answers, so the run stops
    down.add(HOME.endpoint)
    with pytest.raises(ApiUnavailable):
        await router.process(Batch("b5", ("h3",)))


async def test_a_one_endpoint_run_stops_at_its_outage_as_it_always_did() -> None:
    journal = _Journal()
    router = Router(default=HOME, lane=lambda t: _Lane(t, {HOME.endpoint}, journal))
    with pytest.raises(ApiUnavailable):
        await router.process(Batch("b1", ("h1",)))


def test_lanes_keep_a_limiter_per_project_and_endpoint_and_a_breaker_per_endpoint() -> None:
    settings = Settings.model_validate({"rate": 7})
    lanes = Lanes(settings, default=HOME, clock=FakeClock())
    twin = Target("proj-c", HOME.endpoint, "cn-north-4")  # another project, same endpoint
    assert lanes.limiter(None) is lanes.limiter(HOME)
    assert lanes.limiter(twin) is not lanes.limiter(HOME)
    assert lanes.limiter(AWAY) is not lanes.limiter(HOME)
    assert lanes.gate(twin) is lanes.gate(HOME)
    assert lanes.gate(AWAY) is not lanes.gate(HOME)
    assert lanes.rate == pytest.approx(21)
    assert lanes.transport(AWAY) is None  # no session: a dry run reads nothing


def test_the_shared_limit_key_is_the_old_one_for_the_default_and_per_place_else() -> None:
    assert limit_key("s:ratelimit", Target("proj-a", HOME.endpoint, None), HOME) == "s:ratelimit"
    assert limit_key("s:ratelimit", AWAY, HOME) == "s:ratelimit:proj-b@http://127.0.0.1:8002"
    assert limit_key("s:ratelimit", HOME, None) == "s:ratelimit:proj-a@http://127.0.0.1:8001"


async def test_a_run_of_one_project_rejects_a_line_naming_a_project_never_sending_it() -> None:
    """Until the run routes by target (no ``Targets`` given), a named project is refused:
    sent to the default project it would delete in the wrong place."""
    rejections: list[Rejection] = []
    kept = await targeted([Candidate("j1", 1, Address(project_id="p"))], None, rejections)
    assert kept == []
    assert rejections == [Rejection("j1", 1, ONE_PROJECT)]


# -- report -----------------------------------------------------------------------------------


def _report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "report", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_report_merges_the_ledgers_of_two_projects_counting_each_under_its_own(
    tmp_path: Path,
) -> None:
    """Once refused (64); now each project's ids are counted and exported under it."""
    first, second = tmp_path / "a.db", tmp_path / "b.db"
    with Ledger.open(first, project_id="proj-a", endpoint=HOME.endpoint, run_id="r1",
                     region="cn-north-4") as ledger:  # fmt: skip
        ledger.admit([Candidate("j1", 1), Candidate("j2", 2, target=AWAY)])
        ledger.record(
            [
                Result("j1", Outcome.DELETED, 1, "b-1", 200),
                Result("j2", Outcome.FAILED, 6, "b-2", 503, target=AWAY),
            ]
        )
    with Ledger.open(second, project_id="proj-c", endpoint=AWAY.endpoint, run_id="r2") as ledger:
        ledger.admit([Candidate("j3", 1), Candidate("j4", 2)])
        ledger.record([Result("j3", Outcome.ABSENT, 1, "b-1", 404)])
    summary = _report(str(first), str(second))
    assert summary.returncode == 0, summary.stderr
    assert "project_id  several: see by project" in summary.stdout
    assert "  proj-a  cn-north-4  deleted 1 absent 0 failed 0 skipped 0 open 0" in summary.stdout
    assert "  proj-b  cn-east-3  deleted 0 absent 0 failed 1 skipped 0 open 0" in summary.stdout
    assert f"  proj-c  {AWAY.endpoint}  deleted 0 absent 1 failed 0 skipped 0 open 1" in (
        summary.stdout
    )
    rows = [orjson.loads(line) for line in _report(str(first), str(second), "--format", "jsonl")
            .stdout.splitlines()]  # fmt: skip
    assert [(r["job_id"], r["project_id"], r["region"]) for r in rows] == [
        ("j1", "proj-a", "cn-north-4"),
        ("j2", "proj-b", "cn-east-3"),
        ("j3", "proj-c", None),
    ]
    table = _report(str(first), str(second), "--format", "csv").stdout
    assert list(csv.DictReader(io.StringIO(table)))[1]["project_id"] == "proj-b"


def test_report_of_one_projects_ledger_is_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "one.db"
    with _ledger(path, "r1") as ledger:
        ledger.admit([Candidate("j1", 1)])
        ledger.record([Result("j1", Outcome.DELETED, 1, "b-1", 200)])
    assert "by project" not in _report(str(path)).stdout
    assert "project_id" not in orjson.loads(_report(str(path), "--format", "jsonl").stdout)
    assert "project_id" not in _report(str(path), "--format", "csv").stdout.splitlines()[0]


def test_two_copies_of_one_projects_shard_are_still_refused(tmp_path: Path) -> None:
    paths = [tmp_path / "s0.db", tmp_path / "s0-again.db"]
    for n, path in enumerate(paths):
        Ledger.open(path, project_id="proj-a", endpoint=HOME.endpoint, run_id=f"r{n}",
                    shard="0/2").close()  # fmt: skip
    refused = _report(*map(str, paths))
    assert refused.returncode == 64
    assert "are both shard 0/2" in refused.stderr


class _Hanging:
    """A lane whose calls hang until released (a region whose API stopped answering)."""

    def __init__(self, journal: _Journal) -> None:
        self.release = anyio.Event()
        self.started = 0
        self._journal = journal

    async def process(self, batch: Batch) -> None:
        self.started += 1
        await self.release.wait()
        await self._journal.finished([Result(i, Outcome.ABSENT) for i in batch.ids])


async def test_a_hanging_region_holds_its_share_of_the_dispatchers_and_no_more() -> None:
    """Four dispatchers, two regions, the hanging one's batches first: they hold three of
    them, never the fourth, and the rest wait in the router; the other region's batches all
    go through meanwhile, and once the hanging region answers, every batch it held back is
    sent too."""
    journal = _Journal()
    hanging = _Hanging(journal)
    home = _Lane(None, set(), journal)

    def lane(target: Target | None) -> _Lane | _Hanging:
        return hanging if target == AWAY else home

    router = Router(default=HOME, lane=lane, concurrency=4)
    batches = [Batch(f"a{n}", (f"a{n}",), target=AWAY) for n in range(6)]
    batches += [Batch(f"h{n}", (f"h{n}",)) for n in range(20)]
    send, receive = anyio.create_memory_object_stream[Batch](1)

    async def dispatcher(mine: MemoryObjectReceiveStream[Batch]) -> None:
        async with mine:
            async for batch in mine:
                await router.process(batch)

    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(dispatcher, receive.clone())
        receive.close()
        async with send:
            for batch in batches:
                await send.send(batch)
        with anyio.fail_after(5):
            while len(journal.settled) < 20:  # every home batch, while away hangs
                await anyio.sleep(0.01)
        assert hanging.started == 3  # all but the last dispatcher, before home came
        assert router.deferred == 3
        hanging.release.set()
    assert sorted(r.job_id for r in journal.settled) == sorted(b.ids[0] for b in batches)
    assert hanging.started == 6


async def _cancel_once_blocked(scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` once every task waits: what it was doing then waited, not ran late."""
    await anyio.wait_all_tasks_blocked()
    scope.cancel()


async def test_a_region_past_its_waiting_room_makes_its_dispatcher_wait() -> None:
    """Back-pressure: past ``defer_ids`` waiting ids of one endpoint, the dispatcher that
    brings one more waits for room instead of the router holding ever more."""
    journal = _Journal()
    hanging = _Hanging(journal)
    router = Router(default=HOME, lane=lambda target: hanging, concurrency=1, defer_ids=2)
    async with anyio.create_task_group() as group:
        group.start_soon(router.process, Batch("a0", ("a0",), target=AWAY))
        await anyio.wait_all_tasks_blocked()  # a0 in its lane, which hangs
        await router.process(Batch("a1", ("a1",), target=AWAY))  # waits in the router
        await router.process(Batch("a2", ("a2",), target=AWAY))
        with anyio.CancelScope() as waited:
            group.start_soon(_cancel_once_blocked, waited)
            await router.process(Batch("a3", ("a3",), target=AWAY))
        assert waited.cancelled_caught  # no room: it waited
        hanging.release.set()
    assert [r.job_id for r in journal.settled] == ["a0", "a1", "a2"]


async def test_a_one_project_run_keeps_every_dispatcher_for_its_project() -> None:
    """No line named a project: nothing is held back, as before many projects."""
    journal = _Journal()
    hanging = _Hanging(journal)
    router = Router(default=HOME, lane=lambda target: hanging, concurrency=4)
    async with anyio.create_task_group() as group:
        for n in range(4):
            group.start_soon(router.process, Batch(f"h{n}", (f"h{n}",)))
        with anyio.fail_after(5):
            while hanging.started < 4:
                await anyio.sleep(0.01)
        assert router.deferred == 0
        hanging.release.set()
    assert len(journal.settled) == 4


async def test_with_redis_each_project_paces_through_a_shared_limit_of_its_own(
    redis_prefix: str, redis_client: Any
) -> None:
    """The settings' project keeps the key a one-project fleet shares; another project at
    another endpoint gets a key of its own, so replicas share each quota, never one
    project's with another's (real Redis)."""
    base = f"{redis_prefix}ids:ratelimit"
    settings = Settings.model_validate({"rate": 0.5, "burst": 1})
    lanes = Lanes(settings, default=HOME, clock=MonotonicClock(), redis=redis_client,
                  limit_base=base)  # fmt: skip
    assert lanes.limiter(None) is lanes.limiter(HOME)
    await lanes.limiter(None).acquire()
    await lanes.limiter(AWAY).acquire()
    away_key = f"{base}:proj-b@http://127.0.0.1:8002"
    assert await redis_client.exists(base) == 1  # taken from: held until it refills (2 s)
    assert await redis_client.exists(away_key) == 1
    keys = [key.decode() async for key in redis_client.scan_iter(match=redis_prefix + "*")]
    # each bucket, and beside it the rates its processes were given (rate.mismatch)
    assert sorted(keys) == sorted([base, f"{base}:specs", away_key, f"{away_key}:specs"])


async def test_a_line_naming_a_region_alone_gets_its_project_from_the_lookup_once() -> None:
    """IAM's answer for a region, asked once a run; a failure is the lines' reason."""
    asked: list[str] = []

    async def lookup(region: str) -> str:
        asked.append(region)
        if region == "cn-south-1":
            raise ConfigError("IAM knows no project named cn-south-1")
        return f"proj-{region}"

    targets = Targets(HOME, lookup=lookup)
    candidates = [
        Candidate("j1", 1, Address(region="cn-east-3")),
        Candidate("j2", 2, Address(region="cn-east-3")),
        Candidate("j3", 3, Address(region="cn-south-1")),
        Candidate("j4", 4, Address(region="cn-south-1")),
        Candidate("j5", 5, Address(endpoint="http://127.0.0.1:9")),  # no region to look up
    ]
    rejections: list[Rejection] = []
    kept = await targeted(candidates, targets, rejections)
    east = Target("proj-cn-east-3", endpoint_for("cn-east-3"), "cn-east-3")
    assert [(c.job_id, c.target) for c in kept] == [("j1", east), ("j2", east)]
    assert [(r.line, r.reason) for r in rejections] == [
        (3, "the project of region cn-south-1 was not found in IAM: IAM knows no project "
            "named cn-south-1"),
        (4, "the project of region cn-south-1 was not found in IAM: IAM knows no project "
            "named cn-south-1"),
        (5, "names endpoint http://127.0.0.1:9 but no project_id (a project id belongs to one "
            "region)"),
    ]  # fmt: skip
    assert asked == ["cn-east-3", "cn-south-1"]


def test_the_summary_a_person_sees_has_a_line_per_project_when_the_input_named_them() -> None:
    fields = {
        "deleted": 5, "absent": 1, "open": 3, "duration_s": 1.0, "ids_per_s": 5.0,
        "exit_code": 69,
        "projects": [
            {"project_id": "proj-a", "region": "cn-north-4", "endpoint": HOME.endpoint,
             "deleted": 5, "absent": 1, "failed": 0, "skipped": 0, "out": False},
            {"project_id": "proj-b", "region": None, "endpoint": AWAY.endpoint,
             "deleted": 0, "absent": 0, "failed": 0, "skipped": 0, "out": True},
        ],
    }  # fmt: skip
    text = RunEnd(fields).text()
    assert "  by project:\n    proj-a (cn-north-4): deleted 5, absent 1\n" in text
    assert f"    proj-b ({AWAY.endpoint}): taken out: its ids left open\n" in text
    assert "by project" not in RunEnd({**fields, "projects": None}).text()


class _Refusing:
    """A lane whose API answers every call with ``status`` (401 or 403)."""

    def __init__(self, status: int) -> None:
        self.status = status

    async def process(self, batch: Batch) -> None:
        raise AuthError(f"HTTP {self.status}", http_status=self.status)


async def test_a_403_takes_its_project_out_alone_and_a_401_stops_the_run() -> None:
    """Permissions may be granted project by project: a 403 is the project's, and the run
    ends 77 after the others finish; a 401 refuses the key, which signs for all."""
    journal = _Journal()
    home = _Lane(None, set(), journal)
    said: list[str] = []
    router = Router(default=HOME, lane=lambda t: _Refusing(403) if t == AWAY else home,
                    on_out=lambda place, exc: said.append(place.project_id))  # fmt: skip
    await router.process(Batch("h1", ("h1",)))
    await router.process(Batch("a1", ("a1",), target=AWAY))
    await router.process(Batch("a2", ("a2",), target=AWAY))  # not sent: its project is out
    await router.process(Batch("h2", ("h2",)))
    assert [r.job_id for r in journal.settled] == ["h1", "h2"]
    assert said == ["proj-b"]
    assert router.left_open == 1
    assert isinstance(router.failure, AuthError)
    key_refused = Router(default=HOME, lane=lambda t: _Refusing(401) if t == AWAY else home)
    await key_refused.process(Batch("h3", ("h3",)))
    with pytest.raises(AuthError):
        await key_refused.process(Batch("a3", ("a3",), target=AWAY))
