"""``report --output FILE`` as a crash, a signal and another user meet it: the export
appears under its name only once whole (written beside it, then renamed), and every
refusal of a file that is not ours to write stays. The real command in a subprocess."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import signalled
from tests.test_private_files import SETPRIV, as_nobody, shared, two_users
from tests.test_report import fill, report

pytestmark = pytest.mark.usefixtures("clean_env")
__all__ = ["shared"]  # the fixture, used by name

_HALTED_MIDWAY = (
    "import runpy, sys\n"
    "import worker.commands.report as report\n"
    "whole = report.write_jsonl\n"
    "class Halting:\n"
    "    def __init__(self, out):\n"
    "        self.out = out\n"
    "    def write(self, data):\n"
    "        self.out.write(data)\n"
    "        self.out.flush()\n"
    "        sys.stderr.write('midway\\n'); sys.stderr.flush()\n"
    "        sys.stdin.read()\n"
    "def halted(ledger, out, **kwargs):\n"
    "    return whole(ledger, Halting(out), **kwargs)\n"
    "report.write_jsonl = halted\n"
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n"
)
"""``python -m worker ARGS`` whose jsonl export writes its first row (flushed to the file),
says ``midway`` on stderr, and waits on stdin for ever: a report caught mid-write."""


@pytest.mark.anyio
@pytest.mark.parametrize("before", [None, b"the export of yesterday\n"])
async def test_an_export_killed_mid_write_leaves_no_part_under_its_name(
    tmp_path: Path, before: bytes | None
) -> None:
    """``kill -9`` while the export is written: nothing under its name (or the file that was
    there, whole); the next report writes it whole and removes the dead one's part. The
    part used to be left under the name, as if it were the whole ledger (one row of four)."""
    ledger = tmp_path / "ledger.sqlite"
    fill(ledger).close()
    export = tmp_path / "export.jsonl"
    if before is not None:
        export.write_bytes(before)
        export.chmod(0o640)
    args = ["report", "--ledger", str(ledger), "--format", "jsonl", "--output", str(export)]
    command = [sys.executable, "-c", _HALTED_MIDWAY, *args]
    code, _, _ = await signalled(command, None, [(b"midway", signal.SIGKILL)])
    assert code == -signal.SIGKILL
    if before is None:
        assert not export.exists(), export.read_bytes()
    else:
        assert export.read_bytes() == before
    whole = report(*args[1:])
    assert whole.returncode == 0, whole.stderr
    assert len(export.read_bytes().splitlines()) == 5  # four settled ids, one rejected line
    assert stat.S_IMODE(export.stat().st_mode) == (0o600 if before is None else 0o640)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export"))
    assert left == [], left


@pytest.mark.anyio
async def test_an_export_through_our_own_link_killed_mid_write_leaves_its_file_whole(
    tmp_path: Path,
) -> None:
    """``export.jsonl -> exports/dec.jsonl``, our own link: ``kill -9`` mid-write leaves
    the file it leads to as it was, byte for byte; the next report replaces that file whole
    (its mode kept) and leaves the link a link. It used to be written in place through the
    link: the dead one's first row under the file's name, yesterday's export gone."""
    ledger = tmp_path / "ledger.sqlite"
    fill(ledger).close()
    (tmp_path / "exports").mkdir()
    target = tmp_path / "exports" / "dec.jsonl"
    target.write_bytes(b"the export of yesterday\n")
    target.chmod(0o640)
    export = tmp_path / "export.jsonl"
    export.symlink_to(Path("exports") / "dec.jsonl")
    args = ["report", "--ledger", str(ledger), "--format", "jsonl", "--output", str(export)]
    command = [sys.executable, "-c", _HALTED_MIDWAY, *args]
    code, _, _ = await signalled(command, None, [(b"midway", signal.SIGKILL)])
    assert code == -signal.SIGKILL
    assert target.read_bytes() == b"the export of yesterday\n"
    whole = report(*args[1:])
    assert whole.returncode == 0, whole.stderr
    assert len(target.read_bytes().splitlines()) == 5  # four settled ids, one rejected line
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.readlink(export) == str(Path("exports") / "dec.jsonl")
    left = [p.name for d in (tmp_path, target.parent) for p in d.iterdir() if p.name[0] == "."]
    assert left == [], left


@two_users
@pytest.mark.parametrize("kind", ["another user's file", "a file with a hard link"])
def test_an_export_through_our_own_link_to_a_file_not_ours_alone_is_refused(
    shared: Path, tmp_path: Path, kind: str
) -> None:
    """Our own link leading to another user's file (open to all) or to one with other hard
    links: refused (64), the file kept, the link a link, nothing left beside either."""
    ledger = tmp_path / "ledger.sqlite"
    fill(ledger).close()
    target = shared / "dec.csv"
    if kind == "another user's file":
        as_nobody("sh", "-c", f"umask 0; echo keep me > {target}")
    else:
        target.write_text("keep me\n")
        (shared / "other").hardlink_to(target)
    export = tmp_path / "export.csv"
    export.symlink_to(target)
    done = report("--ledger", str(ledger), "--format", "csv", "--output", str(export))
    assert done.returncode == 64, done.stderr
    assert "Traceback" not in done.stderr
    assert target.read_text() == "keep me\n" and export.is_symlink()
    left = [p.name for d in (tmp_path, shared) for p in d.iterdir() if p.name[0] == "."]
    assert left == [], left


@pytest.mark.parametrize("name", ["/dev/stdout", "/proc/self/fd/1"])
def test_an_export_to_stdout_redirected_to_a_file_is_written_through_not_replaced(
    tmp_path: Path, name: str
) -> None:
    """``report --output /dev/stdout >file``: a file descriptor's link is no link of ours to
    resolve: the file the shell opened is written in place (its inode kept, the shell's
    descriptor still on it), never replaced beside it."""
    ledger = tmp_path / "ledger.sqlite"
    fill(ledger).close()
    out = tmp_path / "out.jsonl"
    out.write_text("head\n")
    before = out.stat().st_ino
    with out.open("a") as sink:
        done = subprocess.run(
            [sys.executable, "-m", "worker", "report", "--ledger", str(ledger),
             "--format", "jsonl", "--output", name],
            stdout=sink, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.stat().st_ino == before
    assert len(out.read_text().splitlines()) == 5
    assert [p.name for p in tmp_path.iterdir() if p.name[0] == "."] == []


def _over_yesterday(tmp_path: Path, script: str) -> tuple[Path, list[str]]:
    """``export.jsonl`` holding the export of yesterday, and ``python -c script report``
    exporting a ledger's jsonl there."""
    ledger = tmp_path / "ledger.sqlite"
    fill(ledger).close()
    export = tmp_path / "export.jsonl"
    export.write_bytes(b"the export of yesterday\n")
    args = ["report", "--ledger", str(ledger), "--format", "jsonl", "--output", str(export)]
    return export, [sys.executable, "-c", script, *args]


@pytest.mark.anyio
async def test_an_export_stopped_again_and_again_exits_75_saying_it_once(tmp_path: Path) -> None:
    """A SIGTERM mid-write, then 301 more of Ctrl-C and SIGTERM while its exit unwinds (a
    person or a supervisor that insists): 75, one line, the name left as it was. Each used
    to raise again where the first one's exit was unwinding: "Exception ignored in:
    <generator object LedgerView._stream>" with a traceback, the line twice, or the process
    killed by the signal once the interpreter had put the system's handlers back (-15)."""
    export, command = _over_yesterday(tmp_path, _HALTED_MIDWAY)
    insisting = [(b"", signal.SIGTERM), (b"", signal.SIGINT)] * 150
    steps = [(b"midway", signal.SIGTERM), *insisting]
    code, _, err = await signalled(command, None, steps)
    assert code == 75, err[-2000:]
    assert err.count("stopped by") == 1, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    assert export.read_bytes() == b"the export of yesterday\n"


_RENAMED = (
    "import os, runpy, sys\n"
    "whole = os.replace\n"
    "def replace(part, name, **kwargs):\n"
    "    whole(part, name, **kwargs)\n"
    "    if str(name).endswith('export.jsonl'):\n"
    "        sys.stderr.write('renamed\\n'); sys.stderr.flush()\n"
    "        sys.stdin.read()\n"
    "os.replace = replace\n"
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n"
)
"""``python -m worker ARGS`` that, once the export is renamed over its name, says
``renamed`` on stderr and waits on stdin for ever: a report stopped as it ends."""


@pytest.mark.anyio
async def test_an_export_stopped_once_renamed_whole_is_said_to_stand(tmp_path: Path) -> None:
    """A SIGTERM after the export was renamed over its name, whole: 75, and the line says
    the export stands. It said "EXPORT is not left in part", as of a stop mid-write, of a
    file written whole: read as nothing written, the export is made again, or distrusted."""
    export, command = _over_yesterday(tmp_path, _RENAMED)
    code, _, err = await signalled(command, None, [(b"renamed", signal.SIGTERM)])
    assert code == 75, err[-2000:]
    assert len(export.read_bytes().splitlines()) == 5
    assert f"stopped by SIGTERM after {export} was written whole: it stands" in err, err
    assert "not left in part" not in err and "Traceback" not in err, err


def test_an_export_over_a_hard_link_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    """A name with other hard links is refused as before (64), not replaced beside them."""
    ledger = tmp_path / "ledger.sqlite"
    fill(ledger).close()
    precious = tmp_path / "precious"
    precious.write_text("keep me\n")
    export = tmp_path / "export.csv"
    export.hardlink_to(precious)
    done = report("--ledger", str(ledger), "--format", "csv", "--output", str(export))
    assert done.returncode == 64, done.stderr
    assert "has other hard links" in done.stderr and "Traceback" not in done.stderr
    assert precious.read_text() == export.read_text() == "keep me\n"


@two_users
@pytest.mark.parametrize("planted", ["link", "file", "fifo"])
def test_an_export_over_what_another_user_planted_is_refused(
    shared: Path, tmp_path: Path, planted: str
) -> None:
    """In a shared directory, a link, a file (left open to all) or a named pipe another user
    made under the export's name: refused (64), never written, nor replaced."""
    ledger = tmp_path / "ledger.sqlite"
    fill(ledger).close()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    export = shared / "export.csv"
    make = {
        "link": f"ln -s {victim} {export}",
        "file": f"umask 0; echo theirs > {export}",
        "fifo": f"mkfifo -m 0666 {export}",
    }[planted]
    as_nobody("sh", "-c", make)
    done = report("--ledger", str(ledger), "--format", "csv", "--output", str(export))
    assert done.returncode == 64, done.stderr
    assert "Traceback" not in done.stderr
    assert victim.read_text() == "precious\n"
    info = os.lstat(export)
    assert info.st_uid != 0  # still theirs: not replaced by ours
    if planted == "file":
        assert export.read_text() == "theirs\n"
    assert [p.name for p in shared.iterdir()] == ["export.csv"]  # no part left beside it


def test_an_export_to_our_own_pipe_or_to_stdout_is_streamed_as_before(tmp_path: Path) -> None:
    """A named pipe of ours and ``/dev/stdout`` are written to as streams (no file beside
    them, nothing renamed over them): the reader gets the whole export."""
    ledger = tmp_path / "ledger.sqlite"
    fill(ledger).close()
    to_stdout = report("--ledger", str(ledger), "--format", "jsonl", "--output", "/dev/stdout")
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert len(to_stdout.stdout.splitlines()) == 5
    fifo = tmp_path / "export.fifo"
    os.mkfifo(fifo, 0o600)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        done = report("--ledger", str(ledger), "--format", "jsonl", "--output", str(fifo))
        out, _ = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert done.returncode == 0, done.stderr
    assert out.splitlines() == to_stdout.stdout.encode().splitlines()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@two_users
def test_an_export_whose_folder_cannot_be_written_is_refused_saying_why(shared: Path) -> None:
    """A file we may write in a folder we may not: the export is written beside it first,
    so it cannot be; 64, saying the folder is why, and the file left as it was (not
    "Permission denied" of a file its user may write)."""
    ledger = shared / "ledger.sqlite"
    fill(ledger).close()
    ledger.chmod(0o644)
    folder = shared.parent / "theirs"
    folder.mkdir(mode=0o755)
    export = folder / "export.csv"
    export.write_text("open to all\n")
    export.chmod(0o666)
    done = subprocess.run(
        [SETPRIV or "setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
         sys.executable, "-m", "worker", "report", "--ledger", str(ledger), "--format", "csv",
         "--output", str(export)],
        capture_output=True, text=True, timeout=60, check=False, cwd=shared,
    )  # fmt: skip
    assert done.returncode == 64, done.stderr
    assert f"its folder {folder} cannot be written" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert export.read_text() == "open to all\n"


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["e" * 255, "é" * 127], ids=["255 letters", "254 bytes"])
async def test_an_export_under_a_name_near_the_longest_allowed_is_written(
    tmp_path: Path, name: str
) -> None:
    """A name the file system takes (up to 255 bytes) is written whole, as before the export
    was written beside its name: the file beside it has a name cut to fit (the cut inside a
    letter of two bytes, for the second), not ``File name too long`` of a name that is not
    (64 since 398da2c for any name over 237 bytes). The part a kill -9 left is swept."""
    ledger = tmp_path / "ledger.sqlite"
    fill(ledger).close()
    export = tmp_path / name
    args = ["report", "--ledger", str(ledger), "--format", "jsonl", "--output", str(export)]
    command = [sys.executable, "-c", _HALTED_MIDWAY, *args]
    code, _, err = await signalled(command, None, [(b"midway", signal.SIGKILL)])
    assert code == -signal.SIGKILL, err
    (part,) = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(os.fsencode(part.name)) <= 255 and not export.exists()
    for _ in range(2):  # the second replaces the first
        done = report(*args[1:])
        assert done.returncode == 0, done.stderr
        assert len(export.read_bytes().splitlines()) == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
