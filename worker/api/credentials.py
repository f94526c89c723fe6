"""Where signing keys come from. The client asks a ``CredentialSource`` before every attempt.

``resolve_credentials`` looks in these places, in this order (``auto``), or only in the one
``credential_source`` names:

1. ``settings``: ``--ak``/``--sk``/``--security-token``, ``REAPER_*``, the config file, and
   the ``*_file`` settings (a mounted Secret). Keys read from files are read again when a
   file changes and when the API refuses them (401/403): a rotated Secret reaches a running
   ``serve`` without a restart (``credentials.reloaded`` says which file), and ends its
   pause on refused keys as soon as the files hold others (``FileCredentials.rotated``).
2. ``env``: ``HUAWEICLOUD_SDK_AK``, ``_SK`` and ``_SECURITY_TOKEN``, taken together or not at
   all.
3. ``profile``: the ``[basic]`` section of ``HUAWEICLOUD_SDK_CREDENTIALS_FILE`` or
   ``~/.huaweicloud/credentials``. A federated profile (``idp_id``, ``id_token_file``) is
   refused by name rather than skipped.
4. ``pod-identity``: CCE pod identity (``HC_CONTAINER_CREDENTIALS_FULL_URI`` and its token file).
5. ``metadata``: the ECS metadata service, the node's agency, which every pod on the node
   could use: inside a Kubernetes pod ``auto`` never falls back to it; name it to use it.

How this differs from the SDK, and why: the SDK's chain is environment, profile, metadata,
with explicit arguments outside the chain. Here the settings come first because they are the
operator's explicit choice for this tool; each place gives an access key and its secret key
together (the SDK variables are never mixed with ``REAPER_*`` into a mismatched pair, and a
``HUAWEICLOUD_SDK_SECURITY_TOKEN`` never rides along on permanent keys from elsewhere); pod
identity is tried before the node's metadata, and not at all by the SDK's older versions;
``HUAWEICLOUD_SDK_REGION`` is not read (the SDK uses it for endpoint overrides).

Checks on every place: an access key must have an access key's shape (a file of something
else is refused, not sent in the ``Authorization`` header); a key file must be a regular file
(a FIFO does not hang the run) and gets a warning when others can read it; the metadata and
pod-identity URLs must be ``https`` or a link-local or loopback address (``worker.api.secrets``).

Failure policy, so that exit codes mean what docs/reference.md says:

* nothing found, or a source half configured (an AK without its SK): ``ConfigError`` (78),
  naming every place tried and why it did not apply, never a value;
* a credential service that cannot be reached, times out or fails with 5xx:
  ``CredentialsUnavailable``, a ``TransientError`` (69: run again later). Every call is bounded
  by a short timeout and a small number of attempts, so a dead metadata service fails fast;
* a credential service that answers 4xx (no agency bound, a rejected pod token):
  ``CredentialsRefused``, an ``AuthError`` (77).

In ``auto`` mode the metadata service is only a last guess (the process may not run on ECS at
all): when no connection to it can be made, that is one line of the ``ConfigError``; once it
was reached, a timeout or a 5xx is an outage (69), as when it is asked for by name.
"""

from __future__ import annotations

import configparser
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

import aiohttp
import anyio
import structlog

from worker.api.secrets import (
    access_key_problem,
    file_identity,
    read_key_file,
    service_url_problem,
)
from worker.errors import AuthError, ConfigError, ReaperError, TransientError
from worker.types import holds_control


@dataclass(frozen=True, slots=True)
class Credentials:
    """One set of keys. ``sk`` and ``security_token`` never show in ``repr``."""

    ak: str
    sk: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)
    expires_at: datetime | None = None


class CredentialSource(Protocol):
    """Hands out keys that are valid now; refreshes temporary ones before they expire."""

    @property
    def name(self) -> str:
        """Where the keys came from (``settings``, ``environment``, ``profile`` ...)."""
        ...

    async def current(self) -> Credentials: ...


@runtime_checkable
class Reloadable(Protocol):
    """A source that can look again when the API refuses its keys (a rotated key file)."""

    async def refused(self, used: Credentials) -> bool:
        """The API refused ``used`` (401/403): look again. True when the keys are now
        different, so the refused call is worth one more try."""
        ...


class StaticCredentials:
    """Keys given once, in settings or the environment."""

    def __init__(self, credentials: Credentials, name: str = "settings") -> None:
        self._credentials = credentials
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def current(self) -> Credentials:
        return self._credentials

    def __repr__(self) -> str:
        return f"StaticCredentials(name={self._name!r}, ak={self._credentials.ak!r})"


KEY_NAMES = ("ak", "sk", "security_token")
FileIdentity = tuple[int, int, int, int, int] | None  # ``file_identity``'s: None when unseen


class FileCredentials:
    """Keys of which some were read from files (``ak_file``, ``sk_file`` ...): a mounted Secret.

    Kubernetes rotates a Secret by swapping the link its files are reached through, so a file
    is read again when what it names changes (device, inode, size, times: one ``stat`` per
    file per call) and whenever the API refuses the keys. Each reload that changes the keys is
    a ``credentials.reloaded`` event naming the files; a file caught half rotated (missing,
    empty, not yet an access key) keeps the old keys, is said once
    (``credentials.reload_failed``), and is read again when it changes or the keys are refused.
    A file read again that others can read is warned about as at start
    (``settings.key_file_exposed``), once per change of it.

    ``rotated()`` is for a pause on refused keys (``serve``): it tells when the files hold
    keys other than those refused, so the pause can end there.
    """

    def __init__(
        self,
        values: Mapping[str, str | None],
        files: Mapping[str, Path],
        *,
        name: str = "settings",
    ) -> None:
        self._values = {key: values.get(key) for key in KEY_NAMES}
        self._files = {key: Path(path) for key, path in files.items() if key in KEY_NAMES}
        self._seen = self._identities()
        self._warned = dict(self._seen)  # exposed files are warned about once per change
        self._looked: bytes | None = None  # a digest of what a pause's look last read
        self._broken: dict[str, FileIdentity] | None = None  # as they were when a read failed
        self._refused: Credentials | None = None  # the keys the API refused last
        self._name = name
        self._credentials = self._build(self._values)
        self._log = structlog.get_logger("devserver_reaper")
        self.reloads = 0

    @property
    def name(self) -> str:
        return self._name

    @staticmethod
    def _build(values: Mapping[str, str | None]) -> Credentials:
        ak, sk = values["ak"], values["sk"]
        if not ak or not sk:
            raise ConfigError("settings: an access key and its secret key are both needed")
        problem = access_key_problem(ak)
        if problem:
            raise ConfigError(f"settings: the AK {problem}")
        return Credentials(ak, sk, values["security_token"] or None)

    async def current(self) -> Credentials:
        self._look()
        return self._credentials

    async def refused(self, used: Credentials) -> bool:
        self._refused = used
        self._reload("refused", self._identities())
        return self._credentials != used

    def rotated(self) -> tuple[str, ...]:
        """The key files that now hold keys other than those the API refused last (read in,
        so the next call signs with them), as ``ak_file PATH``; empty when none, or when
        nothing was refused. While the refused keys are the ones held, a look is a ``stat``
        and a read per file (``_rewritten``), so a pause can look every second: a file
        touched, or the same keys swapped in, read the same and end nothing. Each change is
        told once (the keys told of count as refused from then)."""
        self._look(deep=self._refused is not None and self._refused == self._credentials)
        refused, fresh = self._refused, self._credentials
        if refused is None or refused == fresh:
            return ()
        self._refused = fresh
        return tuple(
            f"{key}_file {path}" for key, path in self._files.items()
            if getattr(refused, key) != getattr(fresh, key)
        )  # fmt: skip

    def _identities(self) -> dict[str, FileIdentity]:
        return {key: file_identity(path) for key, path in self._files.items()}

    def _look(self, deep: bool = False) -> None:
        """Read the files again if what they name moved since they were read, or since a
        read of them failed (a file caught half rotated is said once, not at every look);
        ``deep``: or if, moved or not, they hold other text than was read."""
        now = self._identities()
        moved = now != self._seen and now != self._broken
        rewritten = deep and self._rewritten()  # what it read is kept, moved or not
        if moved or rewritten:
            self._reload("changed", now)

    def _rewritten(self) -> bool:
        """Do the files hold other text than was read from them, and other than at the last
        such look? What ``stat`` cannot tell when one was rewritten in place with a key of
        the same length (an AK is always 20 characters) within one tick of the file
        system's clock (4 ms on ext4, 1 s or 2 s on some): no time moves. A file that
        cannot be read counts as its error, so a file caught half written is read in (and
        said) once, not at every look. What was looked at is kept as a digest only."""
        found: list[str] = []
        for key, path in self._files.items():
            try:
                found.append(read_key_file(f"{key}_file", path).text)
            except ConfigError as exc:
                found.append(f"\0{exc}")  # no key starts with NUL: a key file refuses it
        digest = hashlib.blake2b("\n".join(found).encode("utf-8", "surrogatepass")).digest()
        if digest == self._looked:
            return False
        self._looked = digest
        return found != [self._values[key] for key in self._files]

    def _reload(self, why: str, seen: dict[str, FileIdentity]) -> None:
        """Read every file; ``seen``: what they named just before (stat before read, so a
        file replaced in between is read again at the next look, never missed)."""
        values = dict(self._values)
        exposed: dict[str, str] = {}
        try:
            for key, path in self._files.items():
                read = read_key_file(f"{key}_file", path)
                values[key] = read.text
                if read.warning is not None:
                    exposed[key] = read.warning
            fresh = self._build(values)
        except ConfigError as exc:
            self._broken = seen
            self._log.warning("credentials.reload_failed", reason=why, error=str(exc))
            return  # the old keys, until the files are whole again
        self._seen, self._broken = seen, None
        for key, warning in exposed.items():  # as at start, for a file rotated in exposed
            if self._warned.get(key) != seen.get(key):
                self._warned[key] = seen.get(key)
                self._log.warning("settings.key_file_exposed", error=warning)
        if fresh == self._credentials:
            return
        changed = [
            f"{key}_file {path}" for key, path in self._files.items()
            if values[key] != self._values[key]
        ]  # fmt: skip
        self._values, self._credentials = values, fresh
        self.reloads += 1
        self._log.info("credentials.reloaded", source=self._name, files=changed, reason=why)

    def __repr__(self) -> str:
        files = ", ".join(f"{key}_file={str(path)!r}" for key, path in self._files.items())
        return (
            f"FileCredentials(name={self._name!r}, ak={self._credentials.ak!r}, {files}, "
            f"reloads={self.reloads})"
        )


# -- errors -----------------------------------------------------------------------------------


class CredentialsUnavailable(TransientError):
    """A credential service could not be reached or failed: worth trying again later (69).

    ``reached`` says whether a connection was ever made: a metadata service that answered
    5xx or went quiet is having an outage; one that nothing answers is likely not there."""

    reached: bool = True


class CredentialsRefused(AuthError):
    """A credential service answered 4xx: the pod token or the ECS agency is wrong (77)."""


# -- refreshing temporary keys ------------------------------------------------------------------

Clock = Callable[[], datetime]
Fetch = Callable[[], Awaitable[Credentials]]
SourceName = Literal["auto", "settings", "env", "profile", "pod-identity", "metadata"]


def utc_now() -> datetime:
    return datetime.now(UTC)


class RefreshingCredentials(CredentialSource):
    """Temporary keys, fetched again when less than ``refresh_before`` of their life remains.

    The refresh happens on the caller's path (there is no background task to own): the first
    caller to find the keys due takes the lock and fetches; callers arriving meanwhile get the
    old keys at once if they are still good for ``min_validity``, or wait on the lock and get
    the new ones. So concurrent callers share one fetch, and nothing is ever signed with keys
    that expire within ``min_validity``. A failed fetch keeps the old keys while they last and is
    tried again ``retry_interval`` later; once they are too old, ``current()`` raises the
    fetch's error (``CredentialsUnavailable`` or ``CredentialsRefused``).
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        name: str,
        utcnow: Clock = utc_now,
        refresh_before: timedelta = timedelta(minutes=40),
        min_validity: timedelta = timedelta(seconds=60),
        retry_interval: timedelta = timedelta(seconds=30),
        initial: Credentials | None = None,
    ) -> None:
        self._fetch = fetch
        self._name = name
        self._utcnow = utcnow
        self._refresh_before = refresh_before
        self._min_validity = min_validity
        self._retry_interval = retry_interval
        self._lock = anyio.Lock()
        self._credentials: Credentials | None = None
        self._refresh_at: datetime | None = None
        self._retry_at: datetime | None = None
        self._last_error: ReaperError | None = None
        self.fetches = 0
        self.failures = 0
        if initial is not None:
            self._install(initial, utcnow())

    @property
    def name(self) -> str:
        return self._name

    @property
    def expires_at(self) -> datetime | None:
        return None if self._credentials is None else self._credentials.expires_at

    async def current(self) -> Credentials:
        credentials = self._credentials
        now = self._utcnow()
        if (
            credentials is not None
            and self._usable(credentials, now)
            and (not self._due(now) or self._lock.locked() or self._backing_off(now))
        ):
            return credentials  # good keys, or a refresh in flight that they can wait for
        seen = self.fetches
        async with self._lock:
            credentials = self._credentials
            now = self._utcnow()
            usable = credentials is not None and self._usable(credentials, now)
            if credentials is not None and usable:
                if not self._due(now) or self._backing_off(now):
                    return credentials  # another caller refreshed, or failed, while we waited
            elif self.fetches != seen and self._last_error is not None:
                raise self._last_error  # the fetch we waited for failed: do not pile on
            return await self._refresh(credentials)

    async def _refresh(self, old: Credentials | None) -> Credentials:
        self.fetches += 1
        started = self._utcnow()
        try:
            fresh = await self._fetch()
            if not self._usable(fresh, self._utcnow()):
                raise CredentialsUnavailable(
                    f"{self._name}: the new temporary credentials expire within "
                    f"{self._min_validity.total_seconds():.0f} s"
                )
        except ReaperError as exc:
            self.failures += 1
            self._last_error = exc
            self._retry_at = started + self._retry_interval
            if old is not None and self._usable(old, self._utcnow()):
                return old
            raise
        self._last_error = None
        self._retry_at = None
        self._install(fresh, self._utcnow())
        return fresh

    def _install(self, credentials: Credentials, now: datetime) -> None:
        """Keep the keys and decide when to renew them: ``refresh_before`` ahead of expiry.

        Keys issued for less than ``refresh_before`` would be due at once, and every call
        would fetch again; those are renewed halfway through their life instead.
        """
        self._credentials = credentials
        expires = credentials.expires_at
        if expires is None:
            self._refresh_at = None
            return
        refresh_at = expires - self._refresh_before
        self._refresh_at = refresh_at if refresh_at > now else now + (expires - now) / 2

    def _due(self, now: datetime) -> bool:
        return self._credentials is None or (
            self._refresh_at is not None and now > self._refresh_at
        )

    def _usable(self, credentials: Credentials, now: datetime) -> bool:
        expires = credentials.expires_at
        return expires is None or expires - now >= self._min_validity

    def _backing_off(self, now: datetime) -> bool:
        return self._retry_at is not None and now < self._retry_at

    def __repr__(self) -> str:
        ak = None if self._credentials is None else self._credentials.ak
        expires = None if self.expires_at is None else self.expires_at.isoformat()
        return (
            f"RefreshingCredentials(name={self._name!r}, ak={ak!r}, expires_at={expires!r}, "
            f"fetches={self.fetches}, failures={self.failures})"
        )


# -- talking to a credential service ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Http:
    """How to call a credential service: bounded time, bounded attempts."""

    session: aiohttp.ClientSession
    timeout: float
    attempts: int
    retry_delay: float = 0.1

    async def call(
        self, method: str, url: str, *, origin: str, headers: Mapping[str, str], body: Any = None
    ) -> tuple[int, bytes]:
        """Send, retrying connection failures, timeouts and 5xx; return a status below 500.

        The connect timeout is short: the services are link-local, and an unroutable
        169.254.169.254 must not hold a laptop for the full read timeout.
        """
        timeout = aiohttp.ClientTimeout(total=self.timeout, sock_connect=min(self.timeout, 1.0))
        why = "no attempt"
        reached = False
        for attempt in range(1, self.attempts + 1):
            try:
                async with self.session.request(
                    method,
                    url,
                    headers=dict(headers),
                    json=body,
                    timeout=timeout,
                    allow_redirects=False,
                ) as response:
                    content = await response.read()
            except aiohttp.ConnectionTimeoutError:
                why = "cannot connect (no answer to the connection)"
            except TimeoutError:
                why = f"no answer within {self.timeout:g} s"
                reached = True
            except aiohttp.ClientConnectorError as exc:
                why = f"cannot connect ({exc.strerror or type(exc).__name__})"
            except aiohttp.ClientError as exc:
                why = type(exc).__name__
                reached = True
            else:
                if response.status < 500:
                    return response.status, content
                why = f"HTTP {response.status}"
                reached = True
            if attempt < self.attempts:
                await anyio.sleep(self.retry_delay * attempt)
        error = CredentialsUnavailable(f"{origin}: {why} (after {self.attempts} attempts)")
        error.reached = reached
        raise error


def _origin(url: str) -> str:
    """A URL fit for an error message: scheme, host and path, never a query."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # never a user name or password
    return f"{parts.scheme}://{host}{parts.path}"


def parse_temporary(body: bytes, origin: str) -> Credentials:
    """Read the JSON of the metadata service or pod identity (the SDK's field names)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise CredentialsUnavailable(f"{origin}: the answer is not JSON") from None
    if isinstance(data, dict):
        data = data.get("credential") or data.get("credentials") or data
    if not isinstance(data, dict):
        raise CredentialsUnavailable(f"{origin}: the answer holds no credential object")

    def pick(*keys: str) -> str | None:
        for key in keys:
            value = data.get(key)
            if isinstance(value, str) and value:
                return value
        return None

    ak = pick("access", "accessKeyId", "access_key_id")
    sk = pick("secret", "secretAccessKey", "secret_access_key")
    token = pick("securitytoken", "securityToken", "security_token")
    expires = pick("expires_at", "expiration")
    missing = [n for n, v in (("access", ak), ("secret", sk), ("expires_at", expires)) if not v]
    if missing or ak is None or sk is None or expires is None:
        raise CredentialsUnavailable(f"{origin}: the answer has no {', '.join(missing)}")
    try:
        when = datetime.fromisoformat(expires.replace("Z", "+00:00"))
    except ValueError:
        raise CredentialsUnavailable(f"{origin}: expires_at is not an ISO-8601 time") from None
    return Credentials(ak, sk, token, when if when.tzinfo else when.replace(tzinfo=UTC))


class _Metadata:
    """ECS metadata: a session token (PUT), then the agency's temporary keys (GET)."""

    SESSION_PATH = "/meta-data/latest/api/token"
    KEY_PATH = "/openstack/latest/securitykey"
    SESSION_TTL = "21600"

    def __init__(self, http: _Http, base_url: str) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._token: str | None = None

    async def _session_token(self) -> str | None:
        url = self._base + self.SESSION_PATH
        status, body = await self._http.call(
            "PUT",
            url,
            origin=f"ECS metadata {_origin(url)}",
            headers={"X-Metadata-Token-Ttl-Seconds": self.SESSION_TTL},
        )
        if status == 200:
            return body.decode("utf-8", "replace").strip()
        if status in (404, 405):
            return None  # an older service without session tokens, as the SDK allows
        raise CredentialsRefused(f"ECS metadata {_origin(url)}: HTTP {status}", http_status=status)

    async def fetch(self) -> Credentials:
        url = self._base + self.KEY_PATH
        origin = f"ECS metadata {_origin(url)}"
        for fresh_token in (False, True):
            if self._token is None or fresh_token:
                self._token = await self._session_token()
            headers = {} if self._token is None else {"X-Metadata-Token": self._token}
            status, body = await self._http.call("GET", url, origin=origin, headers=headers)
            if status == 200:
                return parse_temporary(body, origin)
            if status != 401 or fresh_token:
                break  # 401 once means the session token expired: get a new one and retry
        self._token = None
        hint = " (is an agency bound to this ECS?)" if status == 404 else ""
        raise CredentialsRefused(f"{origin}: HTTP {status}{hint}", http_status=status)


class _PodIdentity:
    """CCE pod identity: POST with the projected token, read again on every fetch (it rotates)."""

    def __init__(self, http: _Http, uri: str, token_file: Path) -> None:
        self._http = http
        self._uri = uri
        self._token_file = token_file

    async def fetch(self) -> Credentials:
        origin = f"pod identity {_origin(self._uri)}"
        try:
            token = (await anyio.Path(self._token_file).read_text(encoding="utf-8")).strip()
        except OSError as exc:
            raise CredentialsUnavailable(
                f"pod identity: token file {self._token_file} cannot be read ({exc.strerror})"
            ) from None
        if not token:
            raise CredentialsUnavailable(f"pod identity: token file {self._token_file} is empty")
        status, body = await self._http.call(
            "POST", self._uri, origin=origin, headers={"Authorization": token}, body={}
        )
        if status != 200:
            raise CredentialsRefused(f"{origin}: HTTP {status}", http_status=status)
        return parse_temporary(body, origin)


# -- the profile file ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Profile:
    """The ``[basic]`` section of the SDK's credentials file."""

    path: Path
    ak: str | None
    sk: str | None = field(repr=False)
    project_id: str | None
    security_token: str | None = field(default=None, repr=False)
    federated: tuple[str, ...] = ()  # idp_id, id_token_file: what this tool does not do
    iam_endpoint: str | None = None  # where the SDK looks a region's project id up


def profile_path(environ: Mapping[str, str]) -> Path:
    """``HUAWEICLOUD_SDK_CREDENTIALS_FILE``, else ``~/.huaweicloud/credentials``."""
    explicit = environ.get("HUAWEICLOUD_SDK_CREDENTIALS_FILE")
    if explicit:
        return Path(explicit)
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".huaweicloud" / "credentials"


def read_profile(environ: Mapping[str, str]) -> Profile | None:
    """The profile's ``[basic]`` section, ``None`` when there is no file or no such section.

    Its ``project_id`` is for the command line to use when no setting names one.
    """
    path = profile_path(environ)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        return None
    except (OSError, configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"profile {path} cannot be read: {type(exc).__name__}") from None
    if not parser.has_section("basic"):
        return None
    section = parser["basic"]

    def get(key: str) -> str | None:
        value = section.get(key, "").strip()
        if holds_control(value):
            raise ConfigError(f"profile {path}: {key} holds a control character (a line break?)")
        return value or None

    federated = tuple(key for key in FEDERATED_KEYS if get(key))
    return Profile(
        path,
        get("ak"),
        get("sk"),
        get("project_id"),
        get("security_token"),
        federated,
        get("iam_endpoint"),
    )


FEDERATED_KEYS = ("idp_id", "id_token_file")


# -- resolving --------------------------------------------------------------------------------

AUTO_ORDER: tuple[SourceName, ...] = ("settings", "env", "profile", "pod-identity", "metadata")


def _pair(ak: str | None, sk: str | None, token: str | None, where: str) -> Credentials | None:
    """Keys from a static place, whole; ``ConfigError`` when only half of them are there or
    the access key is not one."""
    if not ak and not sk:
        if token:
            raise ConfigError(f"{where}: a security token is set without an AK and SK")
        return None
    if not ak or not sk:
        have, lack = ("AK", "SK") if ak else ("SK", "AK")
        raise ConfigError(f"{where}: the {have} is set but the {lack} is not")
    problem = access_key_problem(ak)
    if problem:
        raise ConfigError(f"{where}: the AK {problem}")
    return Credentials(ak, sk, token or None)


def in_kubernetes(environ: Mapping[str, str]) -> bool:
    """A pod: the kubelet gives every container ``KUBERNETES_SERVICE_HOST``."""
    return bool(environ.get("KUBERNETES_SERVICE_HOST"))


def _service_url(url: str, what: str) -> str:
    problem = service_url_problem(url)
    if problem:
        raise ConfigError(f"{what} {_origin(url)}: {problem}")
    return url


async def resolve_credentials(
    *,
    ak: str | None,
    sk: str | None,
    security_token: str | None,
    environ: Mapping[str, str],
    session: aiohttp.ClientSession,
    metadata_url: str = "http://169.254.169.254",
    source: SourceName = "auto",
    files: Mapping[str, Path] | None = None,
    settings_name: str = "settings",
    timeout: float = 5.0,  # noqa: ASYNC109 - per call to a credential service, not overall
    attempts: int = 2,
    utcnow: Clock = utc_now,
    refresh_before: timedelta = timedelta(minutes=40),
    min_validity: timedelta = timedelta(seconds=60),
) -> CredentialSource:
    """Find keys in the order of the module docstring (or only in ``source``), and return a
    source whose ``name`` says where they came from.

    ``files`` names the key files the settings' keys were read from: those are read again
    on rotation (``FileCredentials``). Temporary keys are fetched once here, so a broken
    service shows at start-up, not at the first DELETE. Raises ``ConfigError`` naming what
    was tried when nothing is found; see the module docstring for the other errors.
    """
    http = _Http(session, timeout, max(1, attempts))
    tried: list[str] = []
    order = AUTO_ORDER if source == "auto" else (source,)

    async def refreshing(fetch: Fetch, name: str, first: Credentials) -> RefreshingCredentials:
        source = RefreshingCredentials(
            fetch,
            name=name,
            utcnow=utcnow,
            refresh_before=refresh_before,
            min_validity=min_validity,
            initial=first,
        )
        await source.current()  # refetches once, then refuses, keys that are already expiring
        return source

    for kind in order:
        if kind == "settings":
            found = _pair(ak, sk, security_token, "settings (--ak/--sk, REAPER_AK/REAPER_SK)")
            if found and files:
                values = {"ak": found.ak, "sk": found.sk, "security_token": found.security_token}
                return FileCredentials(values, files, name=settings_name)
            if found:
                return StaticCredentials(found, settings_name)
            tried.append("settings: no ak/sk")
        elif kind == "env":
            found = _pair(
                environ.get("HUAWEICLOUD_SDK_AK"),
                environ.get("HUAWEICLOUD_SDK_SK"),
                environ.get("HUAWEICLOUD_SDK_SECURITY_TOKEN"),
                "environment (HUAWEICLOUD_SDK_*)",
            )
            if found:
                return StaticCredentials(found, "environment")
            tried.append("environment: HUAWEICLOUD_SDK_AK/SK not set")
        elif kind == "profile":
            profile = read_profile(environ)
            where = f"profile {profile_path(environ)}"
            found = None
            if profile is not None and profile.federated:
                raise ConfigError(
                    f"{where} [basic]: a federated profile ({', '.join(profile.federated)}) is "
                    "not supported; give an AK/SK, or use pod identity or the ECS agency"
                )
            if profile is not None:
                found = _pair(profile.ak, profile.sk, profile.security_token, f"{where} [basic]")
            if found:
                return StaticCredentials(found, "profile")
            tried.append(f"{where}: {'no file' if profile is None else 'no [basic] ak/sk'}")
        elif kind == "pod-identity":
            uri = environ.get("HC_CONTAINER_CREDENTIALS_FULL_URI")
            token_file = environ.get("HC_CONTAINER_AUTHORIZATION_TOKEN_FILE")
            if uri and token_file:
                uri = _service_url(uri, "pod identity: HC_CONTAINER_CREDENTIALS_FULL_URI")
                pod = _PodIdentity(http, uri, Path(token_file))
                return await refreshing(pod.fetch, "pod-identity", await pod.fetch())
            if uri or token_file:
                raise ConfigError(
                    "pod identity: HC_CONTAINER_CREDENTIALS_FULL_URI and "
                    "HC_CONTAINER_AUTHORIZATION_TOKEN_FILE must be set together"
                )
            tried.append("pod identity: HC_CONTAINER_CREDENTIALS_FULL_URI not set")
        elif kind == "metadata":
            if source == "auto" and in_kubernetes(environ):
                tried.append(
                    "ECS metadata: not used by auto inside a Kubernetes pod (it is the node's "
                    "agency, open to every pod there); set credential_source=metadata to use it"
                )
                continue
            metadata = _Metadata(http, _service_url(metadata_url, "metadata_url"))
            try:
                first = await metadata.fetch()
            except CredentialsUnavailable as exc:
                if source != "auto" or exc.reached:
                    raise  # reached, then failed: an outage, worth trying again later (69)
                tried.append(str(exc))
            except CredentialsRefused as exc:
                if source != "auto":
                    raise
                tried.append(str(exc))
            else:
                return await refreshing(metadata.fetch, "metadata", first)
        else:
            raise ConfigError(f"unknown credential source {kind!r}; use one of auto, {AUTO_ORDER}")
    raise ConfigError("no credentials found; tried: " + "; ".join(tried))
