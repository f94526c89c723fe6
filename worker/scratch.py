"""Scratch folders in the temporary directory that a ``kill -9`` does not leave behind.

A run keeps private copies there: a sealed plan's verified jobs, the selection ``run
--select`` seals, the ids a run without a ledger has seen. Each is removed when the process
ends, but a process killed outright (``SIGKILL``, the OOM killer) removes nothing, and a
plan's copy names every job it holds. So a folder is made holding an exclusive ``flock``
on itself, which the kernel lets go however the process ends; and each new folder's maker
first removes the folders of its kind (same prefix, same user) whose lock it can take,
since their process is gone. A folder still in use is never touched: its lock is held.
``discover --plan``'s spool of the jobs it lists, and the plan being written, are private
files beside the plan, locked and swept the same way (``locked_file``).

The names end ``.XXXXXXXX`` (a dot, not the dash of versions that held no lock), so the
folder of a running process of such a version is never taken for a stale one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class Scratch:
    """A private folder (``0700``, from ``mkdtemp``) and the lock that says it is in use."""

    def __init__(self, kind: str) -> None:
        """Make a folder ``devserver-reaper-<kind>.XXXXXXXX`` in the temporary directory,
        after removing those of the same kind whose process is gone. ``OSError`` when the
        temporary directory cannot take it."""
        prefix = f"devserver-reaper-{kind}."
        sweep(prefix)
        while True:
            path = Path(tempfile.mkdtemp(prefix=prefix))
            fd = os.open(path, _DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits while a sweep that opened it decides
            if _still_there(path, fd):  # else that sweep took it for a dead one's
                break
            os.close(fd)
        self.path = path
        self._lock: int | None = fd

    def remove(self) -> None:
        """Remove the folder and what is in it; then let go of the lock. Idempotent."""
        if self._lock is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)
        self._lock = None

    def __repr__(self) -> str:
        return f"Scratch({str(self.path)!r}, {'held' if self._lock is not None else 'removed'})"


def _still_there(path: Path, fd: int) -> bool:
    """The folder ``fd`` holds is still the one at ``path`` (not removed meanwhile)."""
    held = os.fstat(fd)
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    return held.st_nlink > 0 and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def locked_file(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A private file (``0600``, from ``mkstemp``) named ``prefix...suffix`` in ``folder``,
    after removing those of the same name whose process is gone; its descriptor holds the
    lock that says it is in use until it is closed (or its process dies). A prefix too long
    for the folder's names (one made of a long file name) is cut short to fit."""
    prefix = _fitting(folder, prefix, suffix)
    sweep(prefix, folder, suffix=suffix)
    while True:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits while a sweep that opened it decides
        if _still_there(Path(name), fd):  # else that sweep took it for a dead one's
            return fd, Path(name)
        os.close(fd)


_RANDOM = 8
"""The letters ``mkstemp`` puts between a name's prefix and its suffix."""


def _fitting(folder: Path, prefix: str, suffix: str) -> str:
    """``prefix``, or its first bytes and its last character, so that ``prefix``, the
    random letters and ``suffix`` make a name the folder takes: a file named near the
    longest name allowed (255 bytes) still has a file beside it, never ``ENAMETOOLONG``."""
    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    raw = os.fsencode(prefix)
    room = longest - _RANDOM - len(os.fsencode(suffix))
    if len(raw) <= room:
        return prefix
    return os.fsdecode(raw[: room - 1] + raw[-1:])


def sweep(prefix: str, where: Path | None = None, *, suffix: str | None = None) -> list[Path]:
    """Remove the folders named ``prefix...`` in ``where`` (the temporary directory), or
    with a ``suffix`` the files named ``prefix...suffix``, that are ours and not locked by a
    living process; returns those removed. Never raises: one that cannot be looked at or
    removed is left."""
    folder = Path(where if where is not None else tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = [
            e for e in os.scandir(folder)
            if e.name.startswith(prefix) and (suffix is None or e.name.endswith(suffix))
        ]  # fmt: skip
    except OSError:
        return removed
    kind, flags = (stat.S_ISDIR, _DIRECTORY) if suffix is None else (stat.S_ISREG, _FILE)
    for entry in entries:
        with contextlib.suppress(OSError):
            info = entry.stat(follow_symlinks=False)
            if not kind(info.st_mode) or info.st_uid != os.geteuid():
                continue
            fd = os.open(entry.path, flags)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: in use
                if suffix is None:
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
            finally:
                os.close(fd)
    return removed
