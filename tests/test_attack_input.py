"""Attacks on what an input line or a stream entry names (issue 25), through the real path:
two simulator processes holding the *same* job ids (one seed) under two projects, the real
``run``, ``enqueue`` and ``serve``, real Redis. A line or entry naming a field twice, or a
field under a spelling no reader reads, must not have its id deleted in the default project
(or another id deleted): each is rejected with the reason, and neither simulator sees a
DELETE for it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import orjson
import pytest
import redis.asyncio as aioredis

from tests.test_attack_projects import _run, home_and_away, served_until_settled, twins
from tests.test_multiregion import _env as run_env
from tests.test_serve_regions import rows

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]


def test_run_a_line_naming_a_field_twice_the_last_null_or_under_a_spaced_name_is_rejected(
    tmp_path: Path,
) -> None:
    """``"project_id": "proj-away"`` then ``"project_id": null`` (a JSON reader keeps the
    null) went to the default project: the duplicate check looked only at a value that was
    not null. ``"project id"`` (a space) and ``"project_id "`` spelled no field the check
    knew, so the key was ignored and the id deleted at home; ``"ID"`` beside ``"id"`` named
    a second id nobody read. Each is rejected now; the home project deletes only the plain
    line's id, the other project (same ids) nothing."""
    with home_and_away(tmp_path) as (home, away):
        ids = home.ids
        lines = [
            f'{{"id": "{ids[0]}", "project_id": "proj-away", "project_id": null}}',
            f'{{"id": "{ids[1]}", "project id": "proj-away"}}',
            f'{{"id": "{ids[2]}", "project_id ": "proj-away"}}',
            f'{{"id": "{ids[3]}", "ID": "{ids[5]}"}}',
            f'{{"id": "{ids[4]}"}}',
        ]
        source = tmp_path / "in.jsonl"
        source.write_text("\n".join(lines) + "\n")
        code, events, err = _run(tmp_path, home.url, source)
        assert home.control("/_sim/deleted")["ids"] == [ids[4]], err
        assert away.control("/_sim/deleted")["ids"] == []
        assert code == 1
        rejected = {e["line"]: e["reason"] for e in events if e.get("event") == "job.rejected"}
        assert rejected == {
            1: "names 'project_id' twice: which one is meant is not clear (a JSON reader "
            "would keep the last)",
            2: "names 'project id', which is not read: the field is 'project_id'",
            3: "names 'project_id ', which is not read: the field is 'project_id'",
            4: "names 'ID', which is not read: the field is 'id'",
        }


async def _xadd(client: aioredis.Redis, stream: str, *pairs: str | bytes) -> None:
    """An entry holding its fields as given, a field twice included (``xadd`` takes a dict)."""
    await client.execute_command("XADD", stream, "*", *pairs)  # type: ignore[no-untyped-call]


@pytest.mark.anyio
async def test_serve_an_entry_naming_id_or_project_id_twice_is_dead_lettered_its_ids_rejected(
    redis_prefix: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Redis keeps a field given twice (``XADD s * id a id b``); redis-py's reply was a dict
    keeping the last, so ``b`` was deleted and ``a`` never had an outcome, and an entry
    naming ``project_id`` twice was sent to whichever came last. Each such entry is
    dead-lettered now, naming the field and showing both values, every id it names a
    ``rejected`` outcome; neither simulator deletes any of them."""
    stream = redis_prefix + "ids"
    north, south = twins(tmp_path)
    try:
        ids = north.ids
        await _xadd(redis_client, stream, "id", ids[0], "id", ids[1])
        await _xadd(redis_client,
            stream, "id", ids[2], "project_id", "project-a",
            "project_id", "project-b", "region", south.region, "endpoint", south.url,
        )  # fmt: skip
        await _xadd(
            redis_client, stream, "ids", orjson.dumps([ids[3]]), "ids", orjson.dumps([ids[4]])
        )
        await redis_client.xadd(stream, {"id": ids[5]})
        await served_until_settled(
            redis_client, stream, north, tmp_path, 6, "--allowed-projects", "project-a,project-b"
        )
        assert (await north.control("deleted"))["ids"] == [ids[5]]
        assert (await south.control("deleted"))["ids"] == []
        outcomes = {r["job_id"]: r for r in await rows(redis_client, stream + ":outcomes")}
        assert {i: outcomes[i]["outcome"] for i in ids[:5]} == dict.fromkeys(ids[:5], "rejected")
        said = "which one is meant is not clear (Redis keeps each, a reader the last)"
        dead = await rows(redis_client, stream + ":dead")
        assert [d["reason"] for d in dead] == [
            f"names 'id' twice: {said}",
            f"names 'project_id' twice: {said}",
            f"names 'ids' twice: {said}",
        ]
        assert orjson.loads(dead[0]["payload"]) == {"id": ids[0], "id (2)": ids[1]}
    finally:
        north.stop()
        south.stop()


@pytest.mark.anyio
async def test_ctrl_c_while_iam_is_asked_for_the_settings_project_says_so(
    tmp_path: Path,
) -> None:
    """Ctrl-C while the settings' project is looked up in IAM exited 75 with the status
    line erased and nothing said; it says one line now, as Ctrl-C at the prompt does. The
    simulator's IAM runs on this test's loop, held until the process has exited, so IAM
    never answers."""
    from tests.e2e import write_ids
    from tests.test_projects import by_region
    from tests.tty import Terminal
    from worker.simulator import SimulatorConfig, run_simulator

    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        term = Terminal(["run", "-i", str(ids), "--yes"], by_region(sim.url))
        term.expect_on_screen("looking up the project of region cn-north-4 in IAM")
        term.type(b"\x03")
        code = term.wait()  # on the loop: IAM cannot answer before the process is gone
        await anyio.sleep(0)
        assert len(sim.job_ids()) == 3
    assert code == 75, term.screen_text()
    assert (
        "interrupted while IAM was asked for the project of region cn-north-4: nothing was sent"
        in term.lines()
    ), term.screen_text()


def test_one_endpoint_spelled_with_its_default_port_is_one_place_and_full_width_is_refused(
    tmp_path: Path,
) -> None:
    """``https://…:443`` and ``https://HOST/`` are one server: the project named at both was
    refused the second time as sent to two places. A host in full-width letters is the
    ASCII host to a client (IDNA), so the check that a public endpoint is the named
    region's did not see that ``ｍｏｄｅｌａｒｔｓ.cn-south-1…`` is cn-south-1's: it was
    accepted labelled cn-north-4. Through the CLI's dry run (nothing is sent)."""
    east = "modelarts.cn-east-3.myhuaweicloud.com"
    south = "ｍｏｄｅｌａｒｔｓ.cn-south-1.myhuaweicloud.com"
    lines = [
        {"id": "job-1", "project_id": "proj-away", "region": "cn-east-3",
         "endpoint": f"https://{east}:443"},
        {"id": "job-2", "project_id": "proj-away", "region": "cn-east-3",
         "endpoint": f"https://{east.upper()}/"},
        {"id": "job-3", "project_id": "proj-x", "region": "cn-north-4",
         "endpoint": f"https://{south}"},
    ]  # fmt: skip
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    done = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--input", str(source), "--dry-run"],
        env=run_env("http://127.0.0.1:9"), capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    events = [orjson.loads(line) for line in done.stdout.splitlines() if line.startswith(b"{")]
    skipped = [e["job_id"] for e in events if e.get("event") == "job.skipped"]
    rejected = [e["reason"] for e in events if e.get("event") == "job.rejected"]
    assert skipped == ["job-1", "job-2"], done.stderr.decode()
    assert rejected == ["endpoint must be ASCII (an internationalised host name in its xn-- form)"]
