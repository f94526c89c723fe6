"""What the audit trail says is what happened, whatever failed around the run: the real
command in a subprocess, against the simulator over loopback HTTP."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e import kill_when, reaper, reaper_env, results, start_reaper, write_ids
from worker.simulator import FaultConfig, SimulatorConfig, run_simulator
from worker.simulator.config import FAULT_KINDS

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # each test runs the real command


def fast(src: Path, *more: str) -> list[str]:
    return ["run", "-i", str(src), "--yes", "--batch-size", "10", "--concurrency", "4",
            "--rate", "2000", "--burst", "50", "--max-attempts", "30", *more]  # fmt: skip


fault_mixes = st.tuples(*(st.sampled_from([0.0, 0.05, 0.1]) for _ in FAULT_KINDS)).map(
    lambda shares: FaultConfig(**dict(zip(FAULT_KINDS, shares, strict=True)))
)


@pytest.mark.timeout(900)  # six real runs: 20 s each on a loaded 2-core machine
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(faults=fault_mixes, seed=st.integers(min_value=0, max_value=2**16))
async def test_the_summary_counts_as_deleted_exactly_what_the_api_deleted(
    tmp_path_factory: pytest.TempPathFactory, faults: FaultConfig, seed: int
) -> None:
    """Under a random fault script (500s and resets after the delete was applied, bodies
    cut short, ...), ``deleted`` in the summary, the results file and the ``job.deleted``
    events is the simulator's deleted set: a job whose answer was lost is ``deleted`` with
    ``confirmed`` false, never ``absent``."""
    tmp = tmp_path_factory.mktemp("faults")
    async with run_simulator(SimulatorConfig(jobs=150, seed=seed, faults=faults)) as sim:
        src = write_ids(tmp / "ids.txt", sim.job_ids())
        out = tmp / "results.jsonl"
        # back-offs a tenth as long: a mix of every fault at 0.1 slept 40-70 s of its run
        env = reaper_env(sim.url, REAPER_RETRY_BASE_DELAY="0.05")
        done = await reaper(fast(src, "--results", str(out)), env)
        assert done.code == 0, done.stderr
        summary = done.summary()
        rows = results(out)
        deleted = {row["job_id"] for row in rows if row["outcome"] == "deleted"}
        unconfirmed = {row["job_id"] for row in rows if row["confirmed"] is False}
        assert summary["deleted"] == len(sim.deleted) == len(deleted)
        assert deleted == sim.deleted
        assert summary["absent"] == 0
        assert summary["unconfirmed"] == len(unconfirmed)
        events = done.events("job.deleted")
        assert {e["job_id"] for e in events} == sim.deleted
        assert {e["job_id"] for e in events if e["confirmed"] is False} == unconfirmed
        if faults.error_after or faults.reset_after or faults.truncated:
            applied_unseen = sum(sim.stats.faults[kind] for kind in
                                 ("error_after", "reset_after", "truncated"))  # fmt: skip
            assert bool(unconfirmed) == bool(applied_unseen)


async def test_ids_in_flight_when_a_run_was_killed_end_deleted_unconfirmed_on_resume(
    tmp_path: Path,
) -> None:
    """kill -9 while the simulator holds the answers of DELETEs it has applied; the run
    resumed on the ledger finds those jobs gone and calls them deleted (unconfirmed), and
    the ledger's report counts every deletion."""
    faults = FaultConfig(latency_ms=3000.0, latency_jitter=False)
    async with run_simulator(SimulatorConfig(jobs=60, seed=3, faults=faults)) as sim:
        real = sim.job_ids()
        src = write_ids(tmp_path / "ids.txt", [*real, "ghost-1"])
        ledger = tmp_path / "ledger.db"
        env = reaper_env(sim.url)
        process = await start_reaper(fast(src, "--ledger", str(ledger)), env)
        async with process:
            # two batches applied, their answers held
            await kill_when(process, lambda: len(sim.deleted) >= 20)
        in_flight = set(sim.deleted)
        sim.set_faults(FaultConfig())  # the answers without the held latency, for the resume
        out = tmp_path / "results.jsonl"
        done = await reaper(fast(src, "--ledger", str(ledger), "--results", str(out)), env)
        assert done.code == 0, done.stderr
        by_id = {row["job_id"]: row for row in results(out)}
        assert {i for i, row in by_id.items() if row["confirmed"] is False} == in_flight
        assert {i for i, row in by_id.items() if row["outcome"] == "deleted"} == set(real)
        assert by_id["ghost-1"]["outcome"] == "absent"
        assert sim.deleted == set(real)
        assert done.summary()["unconfirmed"] == len(in_flight)
        report = await reaper(["report", "--ledger", str(ledger)], env)
        assert f"of the deleted, unconfirmed: {len(in_flight)}" in report.stdout
        export = await reaper(["report", "--ledger", str(ledger), "--format", "jsonl"], env)
        exported = [orjson.loads(line) for line in export.stdout.splitlines()]
        assert sum(row["confirmed"] is False for row in exported) == len(in_flight)


async def test_a_bare_404_from_a_wrong_endpoint_path_stops_78_with_every_id_open(
    tmp_path: Path,
) -> None:
    """``--endpoint`` with a path prefix the server does not know, answered by a web
    server's HTML 404 with no error code: no id is ``absent``, the run stops 78 with every
    id open in the ledger, and ``check`` on the same endpoint says why (78 too)."""
    async with run_simulator(SimulatorConfig(jobs=30, unknown_path="html")) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        ledger = tmp_path / "ledger.db"
        env = reaper_env(sim.url + "/modelarts")
        done = await reaper(fast(src, "--ledger", str(ledger)), env)
        assert done.code == 78, done.stderr
        summary = done.summary()
        assert (summary["absent"], summary["deleted"], summary["open"]) == (0, 0, 30)
        assert not done.events("job.absent")
        assert "not an answer of the ModelArts API" in summary["error"]
        report = await reaper(["report", "--ledger", str(ledger)], env)
        assert "open (read or sent, no outcome yet): 30" in report.stdout
        check = await reaper(["check"], env)
        assert check.code == 78 and "NO SUCH API" in check.stdout
        assert sim.deleted == set()


async def test_a_reader_that_closes_the_pipe_stops_the_run_75_with_every_outcome_kept(
    tmp_path: Path,
) -> None:
    """``run ... | head -1``: the event stream breaks after its first line. The run stops
    as on SIGTERM (75), with no traceback; every job the API deleted has its outcome in
    the ledger and the results file, and a resume finishes the rest."""
    faults = FaultConfig(latency_ms=40.0, latency_jitter=False)
    async with run_simulator(SimulatorConfig(jobs=400, seed=5, faults=faults)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        ledger, out = tmp_path / "ledger.db", tmp_path / "results.jsonl"
        env = reaper_env(sim.url)
        args = ["run", "-i", str(src), "--yes", "--ledger", str(ledger), "--results", str(out),
                "--batch-size", "10", "--concurrency", "2", "--rate", "100"]  # fmt: skip
        read_end, write_end = os.pipe()  # a real pipe, its reader closed as `head` closes it
        process = await anyio.open_process(
            [sys.executable, "-m", "worker", *args], env=env, stdin=None, stdout=write_end
        )
        os.close(write_end)
        async with process:
            assert process.stderr is not None
            first = b""
            with anyio.fail_after(30):
                while b"\n" not in first:
                    first += await anyio.to_thread.run_sync(os.read, read_end, 1)
                while sim.stats.deletions == 0:  # the run is deleting when the pipe closes
                    await anyio.sleep(0.01)
            os.close(read_end)  # what `head -1` does once it has its line
            stderr = b""
            with anyio.fail_after(30):
                async for chunk in process.stderr:
                    stderr += chunk
                code = await process.wait()
        assert code == 75, stderr.decode()
        assert b"Traceback" not in stderr and b"Error" not in stderr
        assert b"cannot be written to stdout (Broken pipe)" in stderr
        assert 0 < len(sim.deleted) < 400
        rows = results(out)
        assert {row["job_id"] for row in rows if row["outcome"] == "deleted"} == sim.deleted
        again = await reaper(fast(src, "--ledger", str(ledger), "--results", str(out)), env)
        assert again.code == 0, again.stderr
        assert {row["job_id"] for row in results(out)} == set(sim.job_ids()) | sim.deleted
        assert sim.job_ids() == [] and max(sim.delete_counts.values()) == 1


async def test_a_full_disk_under_the_event_stream_stops_75_before_any_call(
    tmp_path: Path,
) -> None:
    """Events to ``/dev/full``: the first write fails (ENOSPC). Nothing is deleted whose
    record could not be logged: the run stops 75 before any call, every id open. In
    Python's development mode nothing is left unclosed: the input's reader thread closes
    its stream when the run stops reading (it warned ``Unclosed MemoryObjectSendStream``)."""
    async with run_simulator(SimulatorConfig(jobs=30)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        ledger = tmp_path / "ledger.db"
        dev = [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-m", "worker"]
        with open("/dev/full", "wb") as full:
            done = await anyio.run_process(
                [*dev, *fast(src, "--ledger", str(ledger))],
                env=reaper_env(sim.url), stdout=full, check=False,
            )  # fmt: skip
        stderr = done.stderr.decode()
        assert done.returncode == 75, stderr
        assert "Traceback" not in stderr
        assert "ResourceWarning" not in stderr and "Unclosed" not in stderr, stderr
        assert "cannot be written to stdout (No space left on device)" in stderr
        assert sim.stats.delete_calls == 0
        export = await reaper(["report", "--ledger", str(ledger), "--format", "jsonl"],
                              reaper_env(sim.url))  # fmt: skip
        assert export.code == 0 and export.stdout == ""  # nothing settled, nothing lost


async def test_the_deletion_cap_holds_over_a_kill_9_and_a_resume_on_one_ledger(
    tmp_path: Path,
) -> None:
    """``--max-deletions 50``, killed after 20 or more deletions, resumed on the same
    ledger with the same cap: 50 jobs deleted in all, not 50 more. The resumed run's
    summary says how much of the cap is left (none) and what the dead run spent of it."""
    faults = FaultConfig(latency_ms=150.0, latency_jitter=False)
    async with run_simulator(SimulatorConfig(jobs=200, seed=8, faults=faults)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        ledger = tmp_path / "ledger.db"
        env = reaper_env(sim.url)
        args = fast(src, "--ledger", str(ledger), "--max-deletions", "50")
        process = await start_reaper(args, env)
        async with process:
            await kill_when(process, lambda: len(sim.deleted) >= 20)
        first = len(sim.deleted)
        assert 20 <= first < 50
        sim.set_faults(FaultConfig())
        done = await reaper(args, env)
        assert done.code == 1, done.stderr  # 1: ids left skipped by the cap
        summary = done.summary()
        assert len(sim.deleted) == 50
        assert summary["max_deletions_left"] == 0
        assert summary["sent_by_earlier_runs"] >= first
        assert summary["skipped_by_reason"] == {"max_deletions": 150}
        again = await reaper(args, env)  # a third run on the ledger deletes nothing more
        assert len(sim.deleted) == 50 and again.summary()["max_deletions_left"] == 0


@pytest.mark.parametrize(
    ("redirect", "code", "said_on", "words"),
    [
        (">&-", 64, "stderr", "stdout (>&-) is closed"),
        ("2>&-", 64, "stdout", "stderr (2>&-) is closed"),
        (">&- 2>&-", 64, None, ""),
        ("<&-", 66, "stdout", "stdin is closed (<&-)"),  # with --input -
    ],
)
async def test_a_standard_stream_closed_at_start_is_refused_in_words_not_a_traceback(
    tmp_path: Path, redirect: str, code: int, said_on: str | None, words: str
) -> None:
    """Nothing is sent: the simulator sees no call. A closed descriptor is occupied at
    once, so the ledger opened later never takes its number."""
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        source = "-" if redirect == "<&-" else str(src)
        line = shlex.join([sys.executable, "-m", "worker", "run", "-i", source, "--yes",
                           "--ledger", str(tmp_path / "ledger.db")])  # fmt: skip
        done = await anyio.run_process(
            ["bash", "-c", f"exec {line} {redirect}"], env=reaper_env(sim.url), check=False
        )
        out, err = done.stdout.decode(), done.stderr.decode()
        assert done.returncode == code, (out, err)
        assert "Traceback" not in out + err
        if said_on is not None:
            assert words in (out if said_on == "stdout" else err)
        assert sim.stats.calls == 0


async def test_an_empty_protect_file_stops_the_run_78_before_any_call(tmp_path: Path) -> None:
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        (tmp_path / "protect.txt").write_bytes(b"")
        env = reaper_env(sim.url, REAPER_PROTECT_FILE=str(tmp_path / "protect.txt"))
        done = await reaper(fast(src), env)
        assert done.code == 78, done.stderr
        assert "is empty: it protects nothing" in done.stdout + done.stderr
        assert sim.stats.calls == 0 and sim.deleted == set()


async def test_an_https_endpoint_answering_plain_http_is_said_to_not_speak_tls(
    tmp_path: Path,
) -> None:
    """Not "TLS certificate refused": no certificate was ever shown. One attempt, no
    retry, nothing deleted; ``check`` says the same."""
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        src = write_ids(tmp_path / "ids.txt", sim.job_ids())
        env = reaper_env(sim.url.replace("http://", "https://"))
        done = await reaper(fast(src), env)
        assert done.code == 69, done.stderr
        error = done.summary()["error"]
        assert "the server did not speak TLS" in error and "certificate" not in error
        check = await reaper(["check"], env)
        assert check.code == 69 and "NOT TLS" in check.stdout
        assert sim.stats.calls == 0 and sim.deleted == set()


def profile_env(tmp_path: Path, project_id: str) -> dict[str, str]:
    """The SDK's profile file names the project; no setting does."""
    profile = tmp_path / "credentials"
    profile.write_text(f"[basic]\nak = DEMOAK\nsk = demo-secret-key\nproject_id = {project_id}\n")
    env = reaper_env("http://127.0.0.1:9", HUAWEICLOUD_SDK_CREDENTIALS_FILE=str(profile))
    for key in ("REAPER_PROJECT_ID", "REAPER_AK", "REAPER_SK"):
        env.pop(key)
    return env


def test_the_confirmation_names_the_project_the_profile_file_gives(tmp_path: Path) -> None:
    """It read ``project None`` when the project id came from the profile file."""
    from tests.tty import Terminal

    src = write_ids(tmp_path / "ids.txt", ["job-1"])
    term = Terminal(["run", "-i", str(src)], profile_env(tmp_path, "proj-from-profile"))
    term.expect("Type 'yes'")
    term.type(b"no\n")
    assert term.wait() == 64
    assert "proj-from-profile" in term.text() and "None" not in term.text()


@pytest.mark.parametrize("project_id", ["a/b", "x" * 65, "proj id", "p%2Fq"])
async def test_a_bad_project_id_in_the_profile_file_is_refused_78_like_the_setting(
    tmp_path: Path, project_id: str
) -> None:
    src = write_ids(tmp_path / "ids.txt", ["job-1"])
    done = await reaper(fast(src), profile_env(tmp_path, project_id))
    assert done.code == 78, done.stderr
    assert "project_id must be 1 to 64 letters, digits and hyphens" in done.stdout + done.stderr


async def test_a_bad_project_id_in_the_profile_file_is_refused_78_even_with_a_region(
    tmp_path: Path,
) -> None:
    """With a ``region`` too, the profile's bad project id is still the error (78), said
    before anything is asked: it was taken for no project at all, and IAM was asked for the
    region's instead (here an IAM that does not answer: 69, naming IAM, not the profile)."""
    src = write_ids(tmp_path / "ids.txt", ["job-1"])
    env = profile_env(tmp_path, "a/b")
    env.update(REAPER_REGION="cn-north-4", REAPER_IAM_ENDPOINT="http://127.0.0.1:9")
    done = await reaper(fast(src), env)
    assert done.code == 78, done.stderr
    assert "project_id must be 1 to 64 letters, digits and hyphens" in done.stdout + done.stderr
    assert "IAM" not in done.stderr, done.stderr
