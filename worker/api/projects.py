"""The project id of a region, found in IAM as the official SDK finds it when none is set.

The SDK's ``BasicCredentials`` without a project id asks IAM for the projects named after
the region (``GET /v3/projects?name={region}``, KeystoneListProjects), signed with the same
AK/SK, and takes the one it gets. So does :func:`lookup_project`, with these differences:

* the IAM endpoint: the caller's override (the ``iam_endpoint`` setting, which also reads
  the SDK's ``HUAWEICLOUD_SDK_IAM_ENDPOINT``), else the region's own
  (``https://iam.{region}.myhuaweicloud.com``) for the regions the SDK lists, else the global
  ``https://iam.myhuaweicloud.com``, as the SDK does;
* only projects whose ``name`` is the region count (a server that ignored the filter must
  not hand us some other project), and the id must be a project id's shape, since it goes
  into every URL and the ledger;
* errors say what to do, and map to the documented exit codes: no project of that name, or
  more than one, is a configuration error (78, :class:`ProjectNotFound`,
  :class:`ProjectAmbiguous`); a 401/403 is :class:`IamRefused` (77), naming the permission
  ``iam:projects:listProjects``; IAM that cannot be reached, times out, throttles or fails
  with 5xx after a few attempts is :class:`IamUnavailable` (69);
* keys read from files that IAM refuses are read again once (a rotated Secret), as the
  client does for the API.

:class:`ProjectCache` keeps each answer for the life of the process (one IAM call per IAM
endpoint, region and access key, shared by concurrent callers); a failure is not kept, so the next
caller asks again. The id of a region's project never changes, so nothing expires.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import anyio
import orjson
from yarl import URL

from worker.api.answers import Answer, Call, raise_for_status, request_id_of, secrets_of
from worker.api.client import SignedRequest, keys_replaced, send_signed
from worker.api.credentials import Credentials, CredentialSource
from worker.api.session import USER_AGENT
from worker.errors import (
    ApiError,
    ApiTimeout,
    AuthError,
    ConfigError,
    NotTls,
    PermanentError,
    ReaperError,
    ServerError,
    ThrottledError,
    TlsError,
    TransientError,
    certificate_fix,
)
from worker.targets import normal_endpoint
from worker.types import PROJECT_ID_RE

GLOBAL_IAM_ENDPOINT = "https://iam.myhuaweicloud.com"
PROJECTS_PATH = "/v3/projects"
LIST_PERMISSION = "iam:projects:listProjects"
"""The IAM action an IAM user's policy must allow for the look-up (an account may always)."""

IAM_REGIONS = frozenset({
    "af-south-1", "ae-ad-1", "ap-southeast-1", "ap-southeast-2", "ap-southeast-3",
    "ap-southeast-4", "cn-east-2", "cn-east-3", "cn-east-4", "cn-east-5", "cn-north-1",
    "cn-north-2", "cn-north-4", "cn-north-9", "cn-north-12", "cn-south-1", "cn-south-2",
    "cn-southwest-2", "eu-west-0", "la-north-2", "la-south-2", "me-east-1", "my-kualalumpur-1",
    "na-mexico-1", "ru-moscow-1", "sa-brazil-1", "tr-west-1",
})  # fmt: skip
"""Regions with an IAM endpoint of their own in the SDK (3.1.219, ``auth/endpoint.py``), all
``https://iam.{region}.myhuaweicloud.com`` (``ap-southeast-1`` too: ``.com``, not ``.cn``)."""

ATTEMPTS = 3
MAX_WAIT_S = 10.0
"""The longest a throttled look-up waits for IAM's ``Retry-After`` before its next attempt."""
ATTEMPT_S = 30.0
"""The longest one attempt may take, its whole answer read (the session's read timeout is
between two reads: an answer that trickles in would hold the command before it began)."""
MAX_ANSWER_BYTES = 1 << 20
"""The most of an answer read: IAM's project list of one name is a few hundred bytes, and
a URL that serves a file instead must not fill the memory (400 MB took 9 GB)."""


def iam_endpoint_for(region: str) -> str:
    """The SDK's IAM endpoint for ``region``: its own, or the global one."""
    if region in IAM_REGIONS:
        return f"https://iam.{region}.myhuaweicloud.com"
    return GLOBAL_IAM_ENDPOINT


@dataclass(frozen=True, slots=True)
class FoundProject:
    """IAM's answer for one region: the id, and where and how it was found."""

    project_id: str
    region: str
    iam_endpoint: str
    trace_id: str | None  # X-IAM-Trace-Id (else X-Request-Id): what IAM support asks for


# -- errors, each with the fix a person needs ---------------------------------------------------


class ProjectLookupFailed(ReaperError):
    """Why the project id of a region could not be found in IAM; ``fix`` says what to do."""

    fix: str = ""


class ProjectNotFound(ProjectLookupFailed, ConfigError):
    """IAM knows no project named after the region, for these keys (78)."""


class ProjectAmbiguous(ProjectLookupFailed, ConfigError):
    """IAM has more than one project of that name (78)."""


class IamNotThere(ProjectLookupFailed, ConfigError):
    """What answered at the IAM endpoint is not IAM's project list (a wrong URL) (78)."""


class IamRefused(ProjectLookupFailed, AuthError):
    """IAM refused the keys (401) or the permission to list projects (403) (77)."""


class IamUnavailable(ProjectLookupFailed, TransientError):
    """IAM could not be reached, or kept failing, throttling or timing out (69)."""


_SET_PROJECT = "or set project_id (--project-id, REAPER_PROJECT_ID) to skip the look-up"


_E = TypeVar("_E", bound=ProjectLookupFailed)


def _failed(kind: type[_E], message: str, fix: str, **fields: Any) -> _E:
    error = kind(message, **fields)
    error.fix = fix
    return error


# -- one look-up ----------------------------------------------------------------------------------

Sleep = Callable[[float], Awaitable[None]]


async def lookup_project(
    *,
    session: aiohttp.ClientSession,
    credentials: CredentialSource,
    region: str,
    iam_endpoint: str | None = None,
    utcnow: Callable[[], datetime] = lambda: datetime.now(UTC),
    attempts: int = ATTEMPTS,
    attempt_s: float = ATTEMPT_S,
    sleep: Sleep = anyio.sleep,
    ca_bundle: str | None = None,
) -> FoundProject:
    """Ask IAM for the project named ``region`` and return its id (see the module docstring).

    ``iam_endpoint``: an override; None takes the SDK's endpoint for the region. Transient
    failures (network, timeouts, 429, 5xx) are tried ``attempts`` times in all, a short
    back-off apart (``sleep`` is injectable for tests), each within ``attempt_s``.
    ``ca_bundle``: the CA bundle the session trusts, as named (``--ca-bundle FILE``), for
    the cure of a certificate refused."""
    attempts = max(1, attempts)
    endpoint = (iam_endpoint or iam_endpoint_for(region)).rstrip("/")
    base = URL(endpoint)
    if base.scheme not in ("http", "https") or not base.host:
        raise ValueError("iam_endpoint must be an http(s) URL with a host")
    request = SignedRequest(
        method="GET",
        origin=f"{base.scheme}://{base.raw_authority}",
        host=base.host_port_subcomponent or base.raw_host or "",
        path=base.raw_path.rstrip("/") + PROJECTS_PATH,
        query=(("name", region),),
        headers={"User-Agent": USER_AGENT},
    )
    asked = f"GET {endpoint}{PROJECTS_PATH}?name={region}"
    last: ApiError | None = None
    retried_keys = False
    attempt = 0
    while attempt < attempts:
        attempt += 1
        keys = await credentials.current()
        call = Call(method="GET", path=request.path, secrets=secrets_of(keys))
        try:
            answer = await _send_within(attempt_s, session, request, keys, call, utcnow())
            raise_for_status(answer, call, utcnow)
        except AuthError as exc:
            if not retried_keys and await keys_replaced(credentials, exc, keys):
                retried_keys, attempt = True, attempt - 1  # the new keys get a try of their own
                continue
            raise _refused(exc, asked, region) from None
        except TlsError as exc:  # exit 69, as the API's own TLS failures
            fix = (
                f"check iam_endpoint (REAPER_IAM_ENDPOINT): {endpoint} answers in plain HTTP, "
                "not TLS (a wrong port, or a proxy)"
                if isinstance(exc, NotTls)
                else certificate_fix(endpoint, ca_bundle)
            )
            raise _failed(
                IamUnavailable, f"{asked}: {exc}", f"{fix}, {_SET_PROJECT}",
                http_status=exc.http_status,
            ) from None  # fmt: skip
        except PermanentError as exc:  # a 404 or another 4xx: not IAM's project list here
            raise _failed(
                IamNotThere, f"{asked}: {_said(exc)}: not IAM's project list",
                f"check iam_endpoint (REAPER_IAM_ENDPOINT), {_SET_PROJECT}",
            ) from None  # fmt: skip
        except TransientError as exc:
            last = exc
            if attempt < attempts:
                await sleep(_wait(exc, attempt))
            continue
        return _project_of(answer, call, asked, region, endpoint)
    # No HTTP answer at all: a TLS port spoken to in plain HTTP closes (or says nothing an
    # HTTP client can read), which waiting will not mend.
    no_answer = not isinstance(last, ThrottledError | ServerError)
    if (
        base.scheme == "http"
        and no_answer
        and await speaks_tls(base.raw_host or "", base.port or 80)
    ):
        raise _failed(
            IamUnavailable,
            f"{asked}: {_said(last)}: {SPEAKS_TLS}",
            f"check iam_endpoint (REAPER_IAM_ENDPOINT): {endpoint} answers in TLS, not plain "
            f"HTTP (use https://), {_SET_PROJECT}",
        )
    raise _failed(
        IamUnavailable,
        f"IAM did not answer the look-up of the project id of region {region} ({asked}, "
        f"{attempts} attempt{'s' * (attempts != 1)}): {_said(last)}",
        f"run again later; check that {endpoint} is reachable from here (proxy, firewall) "
        f"and iam_endpoint, {_SET_PROJECT}",
        http_status=None if last is None else last.http_status,
    )


SPEAKS_TLS = "the server speaks TLS (is the endpoint https://?)"
"""The reverse of the client's "the server did not speak TLS (is the endpoint http://?)"."""
PROBE_S = 2.0


async def speaks_tls(host: str, port: int, *, within: float = PROBE_S) -> bool:
    """Does ``host:port`` complete a TLS handshake? Asked only once plain HTTP there got no
    answer: nothing is sent, and the certificate is not checked, since only whether the
    port speaks TLS at all is asked."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with anyio.fail_after(within):
            stream = await anyio.connect_tcp(
                host.strip("[]"), port, tls=True, ssl_context=context,
                tls_standard_compatible=False,
            )  # fmt: skip
            await stream.aclose()
    except (OSError, ssl.SSLError, TimeoutError, anyio.BrokenResourceError):
        return False
    return True


async def _send_within(
    seconds: float,
    session: aiohttp.ClientSession,
    request: SignedRequest,
    keys: Credentials,
    call: Call,
    when: datetime,
) -> Answer:
    """One attempt, its answer read whole (at most ``MAX_ANSWER_BYTES``) within ``seconds``."""
    try:
        with anyio.fail_after(seconds):
            return await send_signed(session, request, keys, call, when, limit=MAX_ANSWER_BYTES)
    except TimeoutError:
        raise ApiTimeout(f"{call.describe()}: no whole answer within {seconds:g} s") from None


def _wait(exc: ApiError, attempt: int) -> float:
    """Back-off before the next attempt: IAM's ``Retry-After`` (bounded), else 0.5 s, 1 s."""
    hint = exc.retry_after if isinstance(exc, ThrottledError) else None
    return min(hint, MAX_WAIT_S) if hint is not None else 0.5 * 2 ** (attempt - 1)


def _said(exc: ApiError | None) -> str:
    if exc is None:
        return "no attempt"
    if exc.http_status is None:
        return str(exc.error_msg or exc)
    said = " ".join(str(part) for part in (exc.error_code, exc.error_msg) if part)
    return f"HTTP {exc.http_status}" + (f" {said}" if said else "")


def _refused(exc: AuthError, asked: str, region: str) -> IamRefused:
    trace = f", request id {exc.request_id}" if exc.request_id else ""
    if exc.http_status == 403:
        return _failed(
            IamRefused,
            f"IAM refused to list the projects ({asked}: {_said(exc)}{trace}): the keys lack "
            f"the permission {LIST_PERMISSION}, which finding the project id of region "
            f"{region} needs",
            f"grant the keys' user a policy allowing {LIST_PERMISSION}, {_SET_PROJECT}",
            http_status=403, error_code=exc.error_code, request_id=exc.request_id,
        )  # fmt: skip
    return _failed(
        IamRefused,
        f"IAM refused the keys ({asked}: {_said(exc)}{trace})",
        "check the access key and secret key, and that iam_endpoint (REAPER_IAM_ENDPOINT) "
        f"is this account's IAM; {_SET_PROJECT}",
        http_status=exc.http_status, error_code=exc.error_code, request_id=exc.request_id,
    )  # fmt: skip


def _project_of(answer: Answer, call: Call, asked: str, region: str, endpoint: str) -> FoundProject:
    trace = request_id_of(answer.headers, call, "X-IAM-Trace-Id") or answer.request_id
    where = f"{asked}" + (f", X-IAM-Trace-Id {trace}" if trace else "")
    try:
        data = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        data = None
    projects = data.get("projects") if isinstance(data, dict) else None
    if not isinstance(projects, list):
        raise _failed(
            IamNotThere, f"{where}: HTTP {answer.status} but not IAM's project list",
            f"check iam_endpoint (REAPER_IAM_ENDPOINT), {_SET_PROJECT}",
        )  # fmt: skip
    named = [
        p for p in projects
        if isinstance(p, dict) and p.get("name") == region and isinstance(p.get("id"), str)
    ]  # fmt: skip
    if not named:
        raise _failed(
            ProjectNotFound,
            f"IAM has no project named {region} for these keys ({where})",
            f"check the region (--region, REAPER_REGION) and that the account has opened it, "
            f"{_SET_PROJECT}",
        )  # fmt: skip
    ids = sorted({str(p["id"]) for p in named})
    if len(ids) > 1:
        raise _failed(
            ProjectAmbiguous,
            f"IAM has {len(ids)} projects named {region} ({', '.join(ids)}; {where})",
            "set project_id (--project-id, REAPER_PROJECT_ID) to the one to use",
        )
    if not PROJECT_ID_RE.fullmatch(ids[0]):
        raise _failed(
            IamNotThere,
            f"{where}: the project id IAM gave is not 1 to 64 letters, digits and hyphens",
            f"check iam_endpoint (REAPER_IAM_ENDPOINT), {_SET_PROJECT}",
        )
    return FoundProject(ids[0], region, endpoint, trace)


# -- the process's cache ------------------------------------------------------------------------


class ProjectCache:
    """Each region's project id, looked up in IAM once per process per IAM endpoint and
    access key (as the SDK keys its cache by access key and region: another account's keys
    see other projects). The access key is part of the key only, never shown.

    Concurrent callers for one region share one look-up; a failed look-up is not kept."""

    def __init__(self) -> None:
        self._found: dict[tuple[str, str, str], FoundProject] = {}
        self._latest: dict[tuple[str, str], FoundProject] = {}
        self._locks: dict[tuple[str, str, str], anyio.Lock] = {}
        self.lookups = 0

    @staticmethod
    def _place(region: str, iam_endpoint: str | None) -> tuple[str, str]:
        return (normal_endpoint(iam_endpoint or iam_endpoint_for(region)), region)

    def get(
        self, region: str, iam_endpoint: str | None = None, access_key: str | None = None
    ) -> FoundProject | None:
        """What an earlier look-up found, without asking IAM: for ``access_key``, or (None)
        for the keys that asked last (the process's own, which the settings give)."""
        place = self._place(region, iam_endpoint)
        if access_key is None:
            return self._latest.get(place)
        return self._found.get((*place, access_key))

    async def resolve(
        self,
        *,
        session: aiohttp.ClientSession,
        credentials: CredentialSource,
        region: str,
        iam_endpoint: str | None = None,
        **options: Any,
    ) -> FoundProject:
        """The cached answer, or :func:`lookup_project`'s (``options`` are its own)."""
        place = self._place(region, iam_endpoint)
        key = (*place, (await credentials.current()).ak)
        found = self._found.get(key)
        if found is not None:
            return found
        lock = self._locks.setdefault(key, anyio.Lock())
        async with lock:
            found = self._found.get(key)
            if found is None:
                self.lookups += 1
                found = await lookup_project(
                    session=session,
                    credentials=credentials,
                    region=region,
                    iam_endpoint=place[0],
                    **options,
                )
                self._found[key] = self._latest[place] = found
        return found

    def __repr__(self) -> str:
        known = ", ".join(
            f"{region}={found.project_id}" for (_, region), found in self._latest.items()
        )
        return f"ProjectCache(lookups={self.lookups}, known={{{known}}})"


PROCESS_CACHE = ProjectCache()
"""The one cache a process uses (``worker.wiring``); tests make their own."""
