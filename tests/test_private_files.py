"""Output files never follow a link another user planted, and are private (issue 24, point 1).

Two Unix users, as the attack needs: the attacker step runs as ``nobody`` through ``setpriv``
and plants links in a shared sticky directory (owned by the attacker, as a team's shared
folder is owned by whoever made it, so the kernel's ``protected_symlinks`` would not save
us either); then a real ``run`` subprocess, as root, writes its results and ledger there.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.e2e import reaper, reaper_env, results, write_ids
from worker.ledger import Ledger
from worker.private_files import claim_private, open_output
from worker.simulator import SimulatorConfig, run_simulator

SETPRIV = shutil.which("setpriv")
two_users = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv to act as two users"
)


def as_nobody(*argv: str) -> None:
    """Run ``argv`` as the attacker: ``nobody``, with no supplementary groups."""
    assert SETPRIV is not None
    subprocess.run(
        [SETPRIV, "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", *argv],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip


@pytest.fixture
def shared() -> Iterator[Path]:
    """A sticky, world-writable directory owned by the attacker, reachable by everyone."""
    base = Path(tempfile.mkdtemp(prefix="reaper-shared-"))
    base.chmod(0o755)
    folder = base / "shared"
    folder.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    folder.chmod(0o1777)
    try:
        yield folder
    finally:
        shutil.rmtree(base)


@pytest.fixture
def victims(tmp_path: Path) -> dict[str, Path]:
    """Root's private files that the links lead to."""
    found = {}
    for name in ("shadow", "keys"):
        path = tmp_path / name
        path.write_text(f"{name}: precious\n")
        path.chmod(0o600)
        found[name] = path
    return found


PLANTED = {
    "results.jsonl": 64,  # --results: a usage error, before any call
    "ledger.sqlite": 78,  # the ledger and its files: a configuration error
    "ledger.sqlite-wal": 78,
    "ledger.sqlite-shm": 78,
    "ledger.sqlite.lock": 78,
}


@two_users
@pytest.mark.anyio
@pytest.mark.parametrize("planted", sorted(PLANTED))
async def test_a_run_as_root_never_writes_through_a_link_another_user_planted(
    shared: Path, victims: dict[str, Path], tmp_path: Path, planted: str
) -> None:
    as_nobody("ln", "-s", str(victims["shadow"]), str(shared / planted))
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(
            ["run", "-i", str(ids), "--yes", "--results", str(shared / "results.jsonl"),
             "--ledger", str(shared / "ledger.sqlite")],
            reaper_env(sim.url),
        )  # fmt: skip
        assert done.code == PLANTED[planted], done.stderr + done.stdout
        assert "symbolic link" in done.stderr + done.stdout
        assert sim.deleted == set()  # refused before any call
    assert victims["shadow"].read_text() == "shadow: precious\n"
    assert stat.S_IMODE(victims["shadow"].stat().st_mode) == 0o600
    assert (shared / planted).is_symlink()  # left for the operator to look at


@two_users
@pytest.mark.anyio
async def test_the_events_file_is_not_written_through_a_planted_link_either(
    shared: Path, victims: dict[str, Path], tmp_path: Path
) -> None:
    as_nobody("ln", "-s", str(victims["keys"]), str(shared / "events.jsonl"))
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(
            ["run", "-i", str(ids), "--yes", "--events", str(shared / "events.jsonl")],
            reaper_env(sim.url),
        )
        assert done.code == 64, done.stderr + done.stdout
        assert sim.deleted == set()
    assert victims["keys"].read_text() == "keys: precious\n"
    mine = tmp_path / "events.jsonl"
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(["run", "-i", str(ids), "--yes", "--events", str(mine)],
                            reaper_env(sim.url))  # fmt: skip
        assert done.code == 0, done.stderr
    assert stat.S_IMODE(mine.stat().st_mode) == 0o600  # job names and users: nobody else's


@two_users
@pytest.mark.anyio
async def test_files_a_run_creates_in_a_shared_directory_are_private_and_keep_their_mode(
    shared: Path, tmp_path: Path
) -> None:
    """Created 0600 whatever the umask; a results file the owner opened up (0640) is still
    0640 after the run rewrote it from the ledger; the attacker can read none of them."""
    out, ledger = shared / "results.jsonl", shared / "ledger.sqlite"
    async with run_simulator(SimulatorConfig(jobs=6)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        args = ["run", "-i", str(ids), "--yes", "--results", str(out), "--ledger", str(ledger)]
        done = await reaper(args, reaper_env(sim.url))
        assert done.code == 0, done.stderr
        for path in shared.iterdir():
            assert stat.S_IMODE(path.lstat().st_mode) == 0o600, path.name
        with pytest.raises(subprocess.CalledProcessError):
            as_nobody("cat", str(out))
        out.chmod(0o640)
        again = await reaper(args, reaper_env(sim.url))
        assert again.code == 0, again.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert {row["job_id"] for row in results(out)} == set(ids.read_text().split())


def test_a_hard_link_to_another_file_is_refused_not_truncated(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("keep me\n")
    (tmp_path / "results.jsonl").hardlink_to(precious)
    with pytest.raises(OSError, match="other hard links"):
        open_output(tmp_path / "results.jsonl")
    with pytest.raises(OSError, match="other hard links"):
        claim_private(tmp_path / "results.jsonl")
    assert precious.read_text() == "keep me\n"


def test_a_link_root_or_we_made_is_followed_to_what_exists(tmp_path: Path) -> None:
    """``--results /dev/stdout`` (root's link, to a pipe, a terminal or a redirected file)
    still works; our own link too; neither creates the file it names."""
    with open_output(Path("/dev/stdout"), append=True) as handle:
        assert handle.fileno() > 2
    mine = tmp_path / "to-null"
    mine.symlink_to("/dev/null")
    with open_output(mine) as handle:
        handle.write(b"gone\n")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        open_output(dangling)
    assert not (tmp_path / "nowhere").exists()


def test_a_ledger_opened_in_a_directory_is_private_even_under_a_wide_umask(
    tmp_path: Path,
) -> None:
    old = os.umask(0)
    try:
        ledger = Ledger.open(
            tmp_path / "l.sqlite", project_id="p", endpoint="https://x", run_id="r1"
        )
        try:
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        finally:
            ledger.close()
    finally:
        os.umask(old)
    assert set(modes) >= {"l.sqlite", "l.sqlite.lock", "l.sqlite-wal", "l.sqlite-shm"}
    assert set(modes.values()) == {0o600}


@two_users
@pytest.mark.anyio
async def test_a_fifo_another_user_planted_gets_no_job_data_and_does_not_hang_the_run(
    shared: Path, tmp_path: Path
) -> None:
    """``mkfifo results.jsonl`` in the shared folder: with a reader, root's results (job ids,
    names, users) would flow to the attacker; without one, the run would wait forever."""
    as_nobody("mkfifo", "-m", "666", str(shared / "results.jsonl"))
    as_nobody("mkfifo", "-m", "666", str(shared / "events.jsonl"))
    stolen = shared / "stolen"
    reader = subprocess.Popen(
        [SETPRIV or "setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
         "sh", "-c", f"cat {shared / 'results.jsonl'} > {stolen}"],
    )  # fmt: skip
    try:
        async with run_simulator(SimulatorConfig(jobs=3)) as sim:
            ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
            for flag in ("--results", "--events"):  # events: no reader, a hang today
                with anyio.fail_after(60):
                    done = await reaper(
                        ["run", "-i", str(ids), "--yes", flag, str(shared / f"{flag[2:]}.jsonl")],
                        reaper_env(sim.url),
                    )
                assert done.code == 64, done.stderr + done.stdout
                assert "another user" in done.stderr, done.stderr
            assert sim.deleted == set()
    finally:
        reader.kill()
        reader.wait()
    assert not stolen.exists() or stolen.read_bytes() == b""
    mine = tmp_path / "mine.fifo"
    os.mkfifo(mine)  # the user's own pipe is still a fine place for results
    reader_end = os.open(mine, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with open_output(mine) as handle:
            handle.write(b"ok\n")
        assert os.read(reader_end, 16) == b"ok\n"
    finally:
        os.close(reader_end)


OWNED_BY_ATTACKER = {
    "results.jsonl": 64,
    "events.jsonl": 64,
    "ledger.sqlite": 78,
    "ledger.sqlite-wal": 78,
    "ledger.sqlite-shm": 78,
    "ledger.sqlite.lock": 78,
    "ledger.sqlite-journal": 78,  # SQLite would play a "hot" journal back into the ledger
}


@two_users
@pytest.mark.anyio
@pytest.mark.parametrize("planted", sorted(OWNED_BY_ATTACKER))
async def test_a_file_another_user_made_in_advance_is_not_written_into(
    shared: Path, tmp_path: Path, planted: str
) -> None:
    """No link at all: nobody ``touch``es the name first and opens it up (0666). Written into,
    the file stays the attacker's, who reads the job data (or edits the ledger) at will."""
    as_nobody("sh", "-c", f"umask 0; touch {shared / planted}")
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        done = await reaper(
            ["run", "-i", str(ids), "--yes", "--results", str(shared / "results.jsonl"),
             "--events", str(shared / "events.jsonl"), "--ledger", str(shared / "ledger.sqlite")],
            reaper_env(sim.url),
        )  # fmt: skip
        assert done.code == OWNED_BY_ATTACKER[planted], done.stderr + done.stdout
        assert "another user" in done.stderr, done.stderr
        assert sim.deleted == set()  # refused before any call
    leaked = subprocess.run(
        [SETPRIV or "setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
         "cat", str(shared / planted)],
        capture_output=True, check=False, timeout=30,
    ).stdout  # fmt: skip
    assert not any(job_id.encode() in leaked for job_id in ids.read_text().split())


def test_a_scratch_folder_is_swept_only_once_no_process_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``worker.scratch``: a folder whose lock went with its process (closed here, as the
    kernel closes it on ``kill -9``) is removed by the next maker of its kind; one still
    held, one of another kind, one of a version that held no lock and a link are not."""
    from worker.scratch import Scratch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = Scratch("plan")
    (dead.path / "plan.sqlite").write_bytes(b"jobs")
    os.close(dead._lock or -1)  # its process died: the lock is gone, the folder is not
    dead._lock = None
    held, other = Scratch("plan"), Scratch("ledger")
    older = tmp_path / "devserver-reaper-plan-abcdefgh"  # made by a version without locks
    older.mkdir()
    (tmp_path / "devserver-reaper-plan.link").symlink_to(older)
    fresh = Scratch("plan")
    assert not dead.path.exists()
    assert held.path.is_dir() and other.path.is_dir() and older.is_dir() and fresh.path.is_dir()
    assert stat.S_IMODE(fresh.path.stat().st_mode) == 0o700
    for scratch in (held, other, fresh):
        scratch.remove()
        assert not scratch.path.exists()
    assert "removed" in repr(fresh)
