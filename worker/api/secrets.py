"""Checks on where keys come from: key files, the shape of an access key, and the URLs of the
credential services that hand out temporary keys.

Pure functions and one file read; shared by the settings (at start) and by the credential
sources (when a rotated key file is read again). Messages never quote a secret.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from worker.errors import ConfigError, file_problem
from worker.types import holds_control

SECRET_FILE_LIMIT = 64 * 1024

ACCESS_KEY_RE = re.compile(r"[A-Za-z0-9]{4,32}")
"""An access key: letters and digits, 20 of them on Huawei Cloud. Shorter than a secret key
(40), so an ``ak_file`` pointed at the secret key's file, or at any other file, is refused
instead of sending its content in the ``Authorization`` header, which is not secret."""


def access_key_problem(ak: str) -> str | None:
    """Why ``ak`` cannot be an access key, or ``None``. Never quotes it."""
    if ACCESS_KEY_RE.fullmatch(ak):
        return None
    return (
        f"is not an access key: {len(ak)} characters, where an access key is 4 to 32 letters "
        "and digits (20 on Huawei Cloud); is the file or variable the right one?"
    )


@dataclass(frozen=True, slots=True)
class KeyFile:
    """What a key file held, and a warning when others may read it (as ssh warns)."""

    text: str
    warning: str | None = None


def read_key_file(setting: str, path: Path, *, called: str | None = None) -> KeyFile:
    """A secret from a file (a mounted Kubernetes Secret, through its links), stripped of
    white space and of a leading byte-order mark.

    Opened non-blocking, so a FIFO or a device put in its place fails at once instead of
    hanging the run; anything but a regular file is refused. ``ConfigError`` when it cannot
    be used, naming the file ``called`` (as the user gave it: ``--sk-file``; the ``setting``
    by default); errors never quote the content."""
    kind, setting = setting, called or setting
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{setting} {path} cannot be read: {file_problem(exc)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{setting} {path} is not a regular file")
        raw = _read_at_most(fd, SECRET_FILE_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(f"{setting} {path} cannot be read: {file_problem(exc)}") from None
    finally:
        os.close(fd)
    if len(raw) > SECRET_FILE_LIMIT:
        raise ConfigError(f"{setting} {path} is larger than {SECRET_FILE_LIMIT} bytes")
    try:
        text = raw.decode("utf-8-sig").strip()  # a byte-order mark (Notepad's) is no key's
    except UnicodeDecodeError:
        raise ConfigError(f"{setting} {path} is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{setting} {path} is empty")
    problem = _content_problem(kind, text)
    if problem is not None:  # said of the file: a variable or a flag did not give the key
        raise ConfigError(f"{setting} {path} {problem}")
    return KeyFile(text, _exposure(setting, path, info))


KEY_FILES = ("ak_file", "sk_file", "security_token_file")
"""The settings naming a file that holds one key: one line of printable text."""


def _content_problem(setting: str, text: str) -> str | None:
    """Why a key file's ``text`` cannot be the key its ``setting`` asks for, or ``None``;
    checked here so the error names the file, not the setting it fills (``ak``). Never
    quotes it."""
    if setting == "ak_file":
        return access_key_problem(text)
    if setting in KEY_FILES and holds_control(text):
        return "holds a control character (two lines?): a key is one line of text"
    return None


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _exposure(setting: str, path: Path, info: os.stat_result) -> str | None:
    """ssh's rule, softened to a warning: a key file others can read. Readable by a group
    we belong to is accepted (Kubernetes' ``fsGroup`` makes a mounted Secret 0440)."""
    mode = stat.S_IMODE(info.st_mode)
    ours = info.st_gid == os.getegid() or info.st_gid in os.getgroups()
    if mode & stat.S_IROTH or (mode & stat.S_IRGRP and not ours):
        return (
            f"{setting} {path} is readable by others (mode {mode:04o}): anyone who can read it "
            f"holds the key; chmod 600 it (or give the Secret defaultMode 0400)"
        )
    return None


def file_identity(path: Path) -> tuple[int, int, int, int, int] | None:
    """What changes when a key file is replaced or rewritten (a Secret's rotation swaps the
    link it is reached through): device, inode, size and modification time; and when it is
    made readable (a ``chmod`` moves only the status change time)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def service_url_problem(url: str) -> str | None:
    """Why ``url`` may not receive a pod's token or hand out keys, or ``None``: a credential
    service is reached over ``https``, or over plain ``http`` only on a link-local or
    loopback address, where no one on the way can read the token."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http(s) URL such as http://169.254.169.254"
    if parts.username is not None or parts.password is not None:
        return "must not carry a user name or password"
    if parts.scheme == "https":
        return None
    host = parts.hostname
    if host in ("localhost", "localhost.localdomain"):
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "plain http:// is allowed only to a link-local or loopback address; use https://"
    if address.is_link_local or address.is_loopback:
        return None
    return "plain http:// is allowed only to a link-local or loopback address; use https://"
