"""Files the worker writes (``--results``, its rewrite, the ledger and its lock): private, and
never reached through a link another user planted.

A run often writes into a shared directory, sometimes as root. Another user who can write
there can plant ``results.jsonl -> /etc/shadow`` or a hard link to a file of ours, and a
plain ``open(path, "wb")`` truncates the file it leads to. So every output is opened here:

* with ``O_NOFOLLOW``: a symbolic link another user made is refused (``ELOOP``); one that
  root or we made (``/dev/stdout``) is followed to what already exists, never created;
* refused when it is not a regular file or when it has other hard links; where a stream is
  fine (``--results``, ``--events``), a named pipe is too;
* refused when another user made it (a file or a named pipe planted in advance: they would
  read our job data or change the ledger, and a pipe with no reader would hold the run);
* created ``0600`` (job data is nobody else's business); an existing file keeps its mode;
* truncated only once opened and checked, never by ``O_TRUNC`` on a path we have not looked at;
* replaced atomically through a ``mkstemp`` file (``O_EXCL``, ``0600``) that takes the mode
  and owner of the file it replaces.

The errors are ``OSError`` with a ``strerror`` fit for the user, so callers report them as they
report any file that cannot be opened.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

PRIVATE = 0o600
_NEW = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def _refusal(code: int, path: Path, why: str) -> OSError:
    return OSError(code, why, str(path))


def _trusted(uid: int) -> bool:
    """Root or we: the kernel's ``protected_symlinks`` rule, applied in every directory."""
    return uid in (0, os.geteuid())


def _owned(path: Path) -> bool:
    """The name itself (not what a link leads to) was made by root or by us: a link such as
    ``/dev/stdout`` or ``/proc/self/fd/1``, or the user's own named pipe."""
    try:
        return _trusted(os.lstat(path).st_uid)
    except OSError:
        return False


def _planted_pipe(path: Path) -> OSError:
    return _refusal(errno.EPERM, path, "is a named pipe another user made, never written to")


def open_private_fd(path: Path, flags: int = os.O_RDWR, *, streams: bool = False) -> int:
    """Open (creating ``0600`` if needed) the regular file at ``path`` without following a
    link; ``flags`` is ``O_RDWR`` or ``O_WRONLY``, plus ``O_APPEND`` if wanted. With
    ``streams``, a pipe or a device found there is fine too (``/dev/full``). Raises
    ``OSError`` (``ELOOP``: a link; ``EMLINK``: other hard links; ``EINVAL``: not a file;
    ``EPERM``: a file or named pipe another user made)."""
    # Non-blocking, so a named pipe with no reader is looked at before we wait on it.
    waiting = os.O_NONBLOCK if streams else 0
    try:
        fd = os.open(path, flags | _NEW | waiting, PRIVATE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refusal(
                errno.ELOOP, path, "is a symbolic link, which is never followed (name the file)"
            ) from None
        if exc.errno != errno.ENXIO:
            raise
        if not _owned(path):  # a pipe with no reader yet: ours is waited on, no one else's
            raise _planted_pipe(path) from None
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _check_regular(fd, path, streams)
        _check_owner(fd, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_owner(fd: int, path: Path) -> None:
    """A file or named pipe the path itself names (not one reached through root's
    ``/dev/stdout``, which may be what the shell that ran ``sudo`` made) must be root's or
    ours: another user who made it in advance keeps reading, or changing, what we write."""
    info = os.fstat(fd)
    if stat.S_ISCHR(info.st_mode) or _trusted(info.st_uid):
        return
    if stat.S_ISFIFO(info.st_mode):
        raise _planted_pipe(path)
    raise _refusal(
        errno.EPERM, path,
        f"belongs to another user (uid {info.st_uid}), who could read or change what is "
        "written to it: remove it or name another file",
    )  # fmt: skip


def _check_regular(fd: int, path: Path, streams: bool = False) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        if streams and (stat.S_ISFIFO(info.st_mode) or stat.S_ISCHR(info.st_mode)):
            return
        raise _refusal(errno.EINVAL, path, "is not a regular file")
    if info.st_nlink > 1:
        raise _refusal(errno.EMLINK, path, "has other hard links, so it is refused")


def claim_private(path: Path) -> None:
    """Make sure ``path`` is our regular file (created ``0600`` if missing), not a link."""
    os.close(open_private_fd(path))


def check_existing(path: Path) -> None:
    """A file SQLite may read if it is there (a rollback ``-journal`` it would play back into
    the ledger): absent is fine, present must be ours as ``claim_private`` says; never created."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refusal(
                errno.ELOOP, path, "is a symbolic link, which is never followed"
            ) from None
        raise
    try:
        _check_regular(fd, path)
        _check_owner(fd, path)
    finally:
        os.close(fd)


def open_output(path: Path, *, append: bool = False) -> IO[bytes]:
    """An output stream for ``path``: a private regular file, truncated unless ``append``.
    A link is followed only when root or we made it (``--results /dev/stdout``), and then
    only to something that already exists."""
    more = os.O_APPEND if append else 0
    try:
        fd = open_private_fd(path, os.O_WRONLY | more, streams=True)
    except OSError as exc:
        if exc.errno != errno.ELOOP or not _owned(path):
            raise
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | more)
    try:
        _check_regular(fd, path, streams=True)
        if stat.S_ISREG(os.fstat(fd).st_mode) and not append:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    # Through ``open`` so the stream's ``name`` is the path, for messages; the opener hands
    # over the descriptor already checked (its flags, O_TRUNC among them, are not used).
    return open(path, "ab" if append else "wb", opener=lambda _name, _flags: fd)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[IO[bytes] | None]:
    """Write a new version of the regular file at ``path``: yields a stream to a ``mkstemp``
    file beside it (locked while we write it: the next writer sweeps one a kill -9 left)
    that takes the old file's mode (and owner, when we may), and renames it over ``path``
    when the block ends without an error. ``rename`` replaces the name itself,
    so even a link planted meanwhile is replaced, not followed. Yields ``None`` when
    ``path`` is not a regular file (a link, ``/dev/stdout``, a pipe): it is left alone."""
    try:
        old = os.lstat(path)
    except FileNotFoundError:
        old = None
    if old is not None and not stat.S_ISREG(old.st_mode):
        yield None
        return
    from worker.scratch import locked_file

    # Locked while we live: the next writer of this name removes the part a kill -9 left.
    fd, temporary = locked_file(path.parent, f".{path.name}.", ".partial")
    out = os.fdopen(fd, "wb")
    try:
        with out:
            if old is not None:
                os.fchmod(fd, stat.S_IMODE(old.st_mode))
                if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                    with contextlib.suppress(OSError):  # only root may give a file away
                        os.fchown(fd, old.st_uid, old.st_gid)
            yield out
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


_DESCRIPTORS = (Path("/proc"), Path("/dev"))


def _own_link_target(path: Path) -> Path | None:
    """The regular file our own link at ``path`` leads to (through links of ours only), when
    it lies in a folder we may write; None for anything else: no link, one another user
    made, a file descriptor's link (``/dev/stdout``, ``/proc/self/fd/1``), a pipe, a device."""
    if not os.path.islink(path):
        return None
    for _ in range(40):  # the kernel's own limit on links in a row
        path = Path(os.path.realpath(path.parent)) / path.name
        if any(path.is_relative_to(top) for top in _DESCRIPTORS):
            return None
        if not os.path.islink(path) or not _owned(path):
            break
        path = path.parent / os.readlink(path)
    else:
        return None
    try:
        regular = stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return None
    writable = os.access(path.parent, os.W_OK | os.X_OK)
    return path if regular and writable else None


@contextlib.contextmanager
def written_whole(path: Path) -> Iterator[IO[bytes]]:
    """An output for ``path`` that appears under its name only once written whole: for a
    regular file, or none yet, a file beside it renamed over the name at the end
    (:func:`replacing`; on an error, a signal or a ``kill -9`` the name keeps what it had),
    after the refusals of :func:`open_output` (another user's file, other hard links, one
    we may not write). Our own link to a regular file in a folder we may write is followed
    and that file replaced so, the link left as it is. A named pipe, a device or a file
    descriptor's link (``/dev/stdout``, the user's own FIFO) is no file to replace:
    :func:`open_output`'s stream, as it is."""
    path = _own_link_target(path) or path
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.close(open_private_fd(path, os.O_WRONLY))  # refused as open_output refuses
    except FileNotFoundError:
        pass
    begun = False
    try:
        with replacing(path) as out:
            if out is not None:
                begun = True
                yield out
                return
    except PermissionError as exc:  # no file of ours beside it: a folder we may not write
        if begun:
            raise
        raise _refusal(
            errno.EACCES, path,
            f"its folder {path.parent} cannot be written ({exc.strerror}): a file is "
            "written beside its name, then renamed over it",
        ) from None  # fmt: skip
    with open_output(path) as stream:
        yield stream
