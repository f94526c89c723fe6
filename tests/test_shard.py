"""Sharded one-shot runs: `run --shard I/N` takes its part of the ids, `report` merges the parts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.e2e import reaper, reaper_env, write_ids
from worker.errors import ConfigError
from worker.input.shard import Shard, ShardFilter
from worker.simulator import SimulatorConfig, run_simulator
from worker.types import Candidate, Rejection

IDS = st.text(alphabet="abcdef0123456789-_", min_size=1, max_size=40)


@given(st.lists(IDS, max_size=200), st.integers(min_value=1, max_value=16))
def test_the_shards_of_a_count_partition_any_ids(ids: list[str], count: int) -> None:
    owners = [[index for index in range(count) if Shard(index, count).owns(i)] for i in ids]
    assert all(len(found) == 1 for found in owners)


def test_which_shard_owns_an_id_is_the_same_in_every_process() -> None:
    """Known answers: a salted hash (``hash()``) would make two pods disagree."""
    assert [index for index in range(4) if Shard(index, 4).owns("job-1")] == [3]
    assert [index for index in range(4) if Shard(index, 4).owns("job-2")] == [2]
    assert [index for index in range(7) if Shard(index, 7).owns("6f0c2a")] == [2]


def test_the_shards_split_ids_nearly_evenly() -> None:
    counts = Counter(
        next(i for i in range(4) if Shard(i, 4).owns(f"job-{n}")) for n in range(20_000)
    )
    assert min(counts.values()) > 0.9 * 5_000


@pytest.mark.parametrize(
    ("text", "environ", "shard"),
    [
        ("0/4", {}, Shard(0, 4)),
        (" 3 / 4 ", {}, Shard(3, 4)),
        ("auto/4", {"JOB_COMPLETION_INDEX": "2"}, Shard(2, 4)),
        ("0/1", {}, Shard(0, 1)),
    ],
)
def test_a_shard_is_read_as_index_over_count(
    text: str, environ: dict[str, str], shard: Shard
) -> None:
    assert Shard.parse(text, environ) == shard


@pytest.mark.parametrize(
    ("text", "environ", "says"),
    [
        ("4/4", {}, "below the count"),
        ("1/0", {}, "1 to 10,000"),
        ("2", {}, "INDEX/COUNT"),
        ("-1/4", {}, "INDEX/COUNT"),
        ("a/b", {}, "INDEX/COUNT"),
        ("auto/4", {}, "JOB_COMPLETION_INDEX"),
        ("auto/4", {"JOB_COMPLETION_INDEX": "x"}, "JOB_COMPLETION_INDEX"),
        ("auto/4", {"JOB_COMPLETION_INDEX": "4"}, "below the count"),
    ],
)
def test_a_shard_that_cannot_be_is_refused_in_words(
    text: str, environ: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        Shard.parse(text, environ)


def test_shard_0_alone_reports_the_invalid_lines_and_each_counts_what_it_leaves() -> None:
    entries: list[Candidate | Rejection] = [Candidate(f"job-{n}", n) for n in range(100)]
    entries.append(Rejection("bad!", 101, "not an id"))
    filters = [ShardFilter(Shard(index, 3)) for index in range(3)]
    kept = [list(f.select(entries)) for f in filters]
    assert [any(isinstance(e, Rejection) for e in got) for got in kept] == [True, False, False]
    for got, f in zip(kept, filters, strict=True):
        assert len(got) + f.others == len(entries)
    assert sum(len(got) for got in kept) == len(entries)
    assert repr(filters[1]) == f"ShardFilter(shard=1/3, others={filters[1].others})"


@pytest.mark.anyio
async def test_four_shards_delete_every_id_once_and_report_merges_their_ledgers(
    tmp_path: Path,
) -> None:
    """Four processes over one input, each with its own ledger, against one simulator."""
    async with run_simulator(SimulatorConfig(jobs=800, quota=2000, burst=200)) as sim:
        real = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", [*real, "not valid!", *real[:50]])
        ledgers = [tmp_path / f"ledger-{i}.db" for i in range(4)]
        summaries: dict[int, dict[str, object]] = {}

        async def one(i: int) -> None:
            done = await reaper(
                ["run", "-i", str(src), "--yes", "--shard", f"{i}/4", "--ledger",
                 str(ledgers[i]), "--batch-size", "20", "--rate", "500", "--burst", "50"],
                reaper_env(sim.url),
            )  # fmt: skip
            assert done.code == (1 if i == 0 else 0), done.stderr  # 1: the rejected line
            summaries[i] = done.summary()

        async with anyio.create_task_group() as group:
            for i in range(4):
                group.start_soon(one, i)
        assert sim.deleted == set(real)
        assert sum(int(str(s["deleted"])) for s in summaries.values()) == len(real)
        assert {s["shard"] for s in summaries.values()} == {f"{i}/4" for i in range(4)}
        # Each shard read every line and left the others' ids to them.
        lines = len(real) + 1 + 50
        for s in summaries.values():
            owned = sum(int(str(s[k])) for k in ("deleted", "rejected", "repeated"))
            assert owned + int(str(s["other_shards"])) == lines

        report = await reaper(
            ["report", *map(str, ledgers), "--format", "jsonl"], reaper_env(sim.url)
        )
        assert report.code == 0, report.stderr
        rows = [orjson.loads(line) for line in report.stdout.splitlines()]
        by_id = Counter(row["job_id"] for row in rows if row["outcome"] != "rejected")
        assert set(by_id) == set(real)
        assert max(by_id.values()) == 1
        assert sum(row["outcome"] == "rejected" for row in rows) == 1

        merged = await reaper(["report", *map(str, ledgers)], reaper_env(sim.url))
        assert merged.code == 0, merged.stderr
        assert f"  deleted   {len(real):>12}" in merged.stdout
        assert "(shard 3/4)" in merged.stdout


@pytest.mark.anyio
async def test_a_ledger_is_for_one_shard_and_report_refuses_one_shard_twice(
    tmp_path: Path,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=40)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        ledger = tmp_path / "ledger.db"
        first = await reaper(
            ["run", "-i", str(src), "--yes", "--shard", "0/2", "--ledger", str(ledger)],
            reaper_env(sim.url),
        )
        assert first.code == 0, first.stderr
        other = await reaper(
            ["run", "-i", str(src), "--yes", "--shard", "1/2", "--ledger", str(ledger)],
            reaper_env(sim.url),
        )
        assert other.code == 78
        assert "shard" in other.stderr + other.stdout
        twice = await reaper(["report", str(ledger), str(ledger)], reaper_env(sim.url))
        assert twice.code == 0  # the same file named twice is read once
        copy = tmp_path / "copy.db"
        copy.write_bytes(ledger.read_bytes())
        both = await reaper(["report", str(ledger), str(copy)], reaper_env(sim.url))
        assert both.code == 64
        assert "both shard 0/2" in both.stderr


@pytest.mark.anyio
async def test_a_pod_of_an_indexed_job_takes_its_shard_and_must_say_it_is_sharded(
    tmp_path: Path,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=60)) as sim:
        real = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", real)
        unsharded = await reaper(
            ["run", "-i", str(src), "--yes"], reaper_env(sim.url, JOB_COMPLETION_INDEX="1")
        )
        assert unsharded.code == 78
        assert "--shard auto/COUNT" in unsharded.stdout + unsharded.stderr
        assert sim.deleted == set()
        done = await reaper(
            ["run", "-i", str(src), "--yes", "--shard", "auto/3"],
            reaper_env(sim.url, JOB_COMPLETION_INDEX="1"),
        )
        assert done.code == 0, done.stderr
        assert done.summary()["shard"] == "1/3"
        assert sim.deleted == {job for job in real if Shard(1, 3).owns(job)}


@pytest.mark.anyio
async def test_shards_given_a_redis_url_share_one_rate_limit(
    tmp_path: Path, redis_prefix: str
) -> None:
    """Two shards at --rate 10 against a quota of 12 calls/s: apart they would ask 20 calls/s;
    through one limit in Redis they ask 10 together. (At --rate 20 against 22 the quota's
    room was a tenth: a loaded host's jitter alone had 8 calls refused together, where apart
    they had 5.)"""
    from tests.conftest import REDIS_URL

    config = SimulatorConfig(jobs=600, quota=12, burst=2)
    async with run_simulator(config) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        env = reaper_env(sim.url, REAPER_REDIS_URL=REDIS_URL, REAPER_STREAM=redis_prefix + "ids")

        async def one(i: int) -> None:
            done = await reaper(
                ["run", "-i", str(src), "--yes", "--shard", f"{i}/2", "--batch-size", "5",
                 "--rate", "10", "--burst", "1", "--concurrency", "4"],
                env,
            )  # fmt: skip
            assert done.code == 0, done.stderr

        async with anyio.create_task_group() as group:
            for i in range(2):
                group.start_soon(one, i)
        assert sim.deleted == set(sim_ids := src.read_text().split())
        assert len(sim_ids) == 600
        # Apart, each slows itself after refusals but is still refused (40 and 49 calls of
        # 161 and 170 when tried); together they never ask more than the quota (0 of 121).
        assert sim.stats.throttled <= 1, sim.stats


@pytest.mark.anyio
async def test_shards_on_auto_share_one_estimate_and_a_later_leader_starts_from_it(
    tmp_path: Path, redis_prefix: str
) -> None:
    """Two shards on --rate auto with a redis_url: one runs the controller for both (a
    ``rate.leader``); when it ends first, the other takes the lease over from the estimate
    stored in Redis (``restored``), never from scratch."""
    from tests.conftest import REDIS_URL

    config = SimulatorConfig(jobs=300, quota=30, burst=2)
    async with run_simulator(config) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        env = reaper_env(sim.url, REAPER_REDIS_URL=REDIS_URL, REAPER_STREAM=redis_prefix + "ids")
        leaders: list[dict[str, Any]] = []

        async def one(i: int) -> None:
            done = await reaper(
                ["run", "-i", str(src), "--yes", "--shard", f"{i}/2", "--batch-size", "2",
                 "--rate", "auto", "--concurrency", "4"],
                env,
            )  # fmt: skip
            assert done.code == 0, done.stderr
            leaders.extend(done.events("rate.leader"))

        async with anyio.create_task_group() as group:
            for i in range(2):
                group.start_soon(one, i)
        assert sim.deleted == set(src.read_text().split())
    assert leaders, "no shard ran the controller"
    assert sum(not e["restored"] for e in leaders) == 1, leaders  # learnt from scratch once


@pytest.mark.anyio
@pytest.mark.parametrize("given", ["environment", "flag"])
async def test_a_run_whose_shared_limit_redis_does_not_answer_sends_nothing_and_exits_69(
    tmp_path: Path, given: str
) -> None:
    """As REAPER_REDIS_URL or as ``run --redis-url`` (reference.md and fleet.md offer both;
    run refused the flag, 64, as serve's only)."""
    async with run_simulator(SimulatorConfig(jobs=20)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        url = "redis://user:hunter2@127.0.0.1:1/0"  # nothing listens on port 1
        argv = ["run", "-i", str(src), "--yes"]
        if given == "flag":
            done = await reaper([*argv, "--redis-url", url], reaper_env(sim.url))
        else:
            done = await reaper(argv, reaper_env(sim.url, REAPER_REDIS_URL=url))
        assert done.code == 69, done.stderr
        assert "redis://user@127.0.0.1:1/0" in done.stderr
        assert "hunter2" not in done.stdout + done.stderr
        assert sim.deleted == set()
