"""The DevServer jobs API client: sign, send, classify.

One call is one attempt. Retrying is the dispatcher's business; this module's job is to
make every attempt correct: signed afresh with the keys valid *now*, sent with exactly the
headers that were signed, its body read to the end so the connection is reused. What
happened is classified by :mod:`worker.api.answers`, into the types of :mod:`worker.errors`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Protocol, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from worker.api.answers import (
    Answer,
    Call,
    JobPage,
    aware,
    http_date,
    parse_checked_page,
    parse_deleted,
    parse_page,
    parse_retry_after,
    parse_shown,
    raise_for_status,
    raise_transport,
    request_id_of,
    secrets_of,
)
from worker.api.credentials import Credentials, CredentialSource, Reloadable
from worker.api.session import USER_AGENT, make_session
from worker.api.signer import QueryValue, sign
from worker.errors import AnswerTooLarge, ApiError, AuthError
from worker.types import DeleteResult, JobRecord

__all__ = [
    "USER_AGENT",
    "ApiClient",
    "JobPage",
    "ProbeResult",
    "make_session",
    "parse_retry_after",
]

JSON_CONTENT_TYPE = "application/json;charset=utf-8"
PROBE_JOB_ID = "devserver-reaper-check"
"""A valid id that names no job: ``check`` lists it to prove the keys work, deleting nothing."""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What ``check`` reports: the call worked, and how far the server's clock is from ours.

    ``skew_s`` is server minus local, in seconds; the API refuses signatures more than
    15 minutes off. ``None`` when the server sent no usable ``Date``.
    """

    request_id: str | None
    http_status: int
    server_date: datetime | None
    skew_s: float | None


class Api(Protocol):
    """The three calls, as ``ApiClient`` makes them: what decorators of it implement."""

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult: ...

    async def get_job(self, job_id: str) -> JobRecord: ...

    async def list_jobs(self, **filters: str | int | bool) -> JobPage: ...


class ApiClient:
    """Signed calls to ``/v1/{project_id}/dev-servers/jobs`` over one shared session."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        endpoint: str,
        project_id: str,
        credentials: CredentialSource,
        utcnow: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        base = URL(endpoint.rstrip("/"))
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError("endpoint must be an http(s) URL with a host")
        self._session = session
        self._endpoint = str(base)
        self._origin = f"{base.scheme}://{base.raw_authority}"
        self._prefix = base.raw_path.rstrip("/")
        self._host = base.host_port_subcomponent or base.raw_host or ""
        self._project_id = project_id
        self._credentials = credentials
        self._utcnow = utcnow
        self._outcomes: Counter[str] = Counter()
        self._answered = False  # has the API answered a call with a 2xx yet?

    @property
    def calls(self) -> int:
        """Attempts made so far, whatever their outcome."""
        return sum(self._outcomes.values())

    @property
    def outcomes(self) -> dict[str, int]:
        """Attempts by outcome class: ``ok`` or the name of the error raised."""
        return dict(self._outcomes)

    def __repr__(self) -> str:
        by_class = ", ".join(f"{name}={count}" for name, count in sorted(self._outcomes.items()))
        return (
            f"ApiClient(endpoint={self._endpoint!r}, project={self._project_id!r}, "
            f"calls={self.calls}, outcomes={{{by_class}}})"
        )

    # -- the four calls ----------------------------------------------------------------

    async def delete_jobs(self, ids: Sequence[str]) -> DeleteResult:
        """Delete a batch. The result holds the records the server says it deleted."""
        if not ids:
            raise ValueError("delete_jobs needs at least one id")
        body = orjson.dumps({"job_ids": list(ids)})
        return await self._request("DELETE", self._jobs_path(), (), parse_deleted, body)

    async def list_jobs(self, **filters: str | int | bool) -> JobPage:
        """List jobs matching ``id``, ``name``, ``type``, ``status``, ``visible`` or paging
        parameters; each keyword becomes one query parameter."""
        return await self._request("GET", self._jobs_path(), tuple(filters.items()), parse_page)

    async def get_job(self, job_id: str) -> JobRecord:
        """Show one job; :class:`~worker.errors.NotFound` when it does not exist.

        A 404 without a ModelArts error code means that too, but only once the API has
        answered this client: before, it may be a proxy's page for a wrong endpoint path."""
        path = f"{self._jobs_path()}/{quote(job_id, safe='')}"
        return await self._request("GET", path, (), parse_shown, names_job=self._answered)

    async def probe(self) -> ProbeResult:
        """One signed read-only call, for ``check``: proves the keys and measures clock skew.

        Local time is taken halfway between sending and receiving, the best estimate of when
        the server stamped its ``Date`` (which has one-second resolution anyway).
        """
        sent = self._utcnow()
        query = (("id", PROBE_JOB_ID),)
        answer = await self._request("GET", self._jobs_path(), query, parse_checked_page)
        received = self._utcnow()
        server_date = http_date(answer.headers.get("Date"))
        skew: float | None = None
        if server_date is not None:
            local = sent + (received - sent) / 2
            skew = (server_date - aware(local)).total_seconds()
        return ProbeResult(
            request_id=answer.request_id,
            http_status=answer.status,
            server_date=server_date,
            skew_s=skew,
        )

    # -- one attempt -----------------------------------------------------------------

    def _jobs_path(self) -> str:
        return f"{self._prefix}/v1/{quote(self._project_id, safe='')}/dev-servers/jobs"

    async def _request(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, QueryValue]],
        parse: Callable[[Answer, Call], _T],
        body: bytes = b"",
        *,
        names_job: bool = False,
    ) -> _T:
        """One attempt: sign afresh, send, read to the end, classify, parse.

        Counted by outcome class, a malformed 200 included.
        """
        credentials = await self._credentials.current()
        attempt = partial(self._attempt, method, path, query, body, names_job=names_job)
        try:
            try:
                answer, call = await attempt(credentials)
            except AuthError as exc:
                if not await keys_replaced(self._credentials, exc, credentials):
                    raise
                self._outcomes[type(exc).__name__] += 1
                answer, call = await attempt(await self._credentials.current())
            result = parse(answer, call)
        except ApiError as exc:
            self._outcomes[type(exc).__name__] += 1
            raise
        self._outcomes["ok"] += 1
        self._answered = True
        return result

    async def _attempt(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, QueryValue]],
        body: bytes,
        credentials: Credentials,
        *,
        names_job: bool,
    ) -> tuple[Answer, Call]:
        """Sign with ``credentials``, send, and raise for the status."""
        call = Call(method=method, path=path, secrets=secrets_of(credentials))
        answer = await self._send(method, path, query, body, credentials, call)
        raise_for_status(answer, call, self._utcnow, names_job=names_job)
        return answer, call

    async def _send(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, QueryValue]],
        body: bytes,
        credentials: Credentials,
        call: Call,
    ) -> Answer:
        headers = {"X-Project-Id": self._project_id, "User-Agent": USER_AGENT}
        if body:
            headers["Content-Type"] = JSON_CONTENT_TYPE
        return await send_signed(
            self._session,
            SignedRequest(method, self._origin, self._host, path, query, headers, body),
            credentials,
            call,
            self._utcnow(),
        )


async def keys_replaced(source: CredentialSource, refusal: AuthError, used: Credentials) -> bool:
    """Keys refused (401/403) by a source that can look again (a rotated Secret), which
    found others: the refused call did nothing on the server, so it goes once more."""
    if refusal.http_status not in (401, 403) or not isinstance(source, Reloadable):
        return False
    return await source.refused(used)


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """One request to sign and send: ``origin`` is ``scheme://host[:port]``, ``host`` the
    ``Host`` header's value, ``path`` already percent-encoded as it goes on the wire."""

    method: str
    origin: str
    host: str
    path: str
    query: Sequence[tuple[str, QueryValue]]
    headers: Mapping[str, str]
    body: bytes = b""


async def send_signed(
    session: aiohttp.ClientSession,
    request: SignedRequest,
    credentials: Credentials,
    call: Call,
    when: datetime,
    *,
    limit: int | None = None,
) -> Answer:
    """Sign ``request`` with ``credentials`` at ``when``, send it, and read the answer to
    the end; a transport failure is raised as the error tree's (``raise_transport``).
    ``limit``: read no more than this many bytes of the body (``AnswerTooLarge`` past it).

    Every signed call goes through here: the DevServer jobs API and IAM's project list."""
    signed = sign(
        method=request.method,
        host=request.host,
        path=request.path,
        query=request.query,
        headers=request.headers,
        body=request.body,
        ak=credentials.ak,
        sk=credentials.sk,
        when=when,
        security_token=credentials.security_token,
    )
    target = request.origin + request.path + (f"?{signed.query}" if signed.query else "")
    url = URL(target, encoded=True)
    status: int | None = None
    request_id: str | None = None
    try:
        async with session.request(
            request.method,
            url,
            headers=signed.headers,
            data=request.body or None,
            allow_redirects=False,
        ) as response:
            status = response.status
            request_id = request_id_of(response.headers, call)
            data = await (response.read() if limit is None else _read_at_most(response, limit))
            if data is None:
                said = f"an answer larger than {limit} bytes"
                raise AnswerTooLarge(
                    f"{call.describe()}: HTTP {status}: {said}",
                    http_status=status, error_msg=said, request_id=request_id,
                )  # fmt: skip
            return Answer(
                status=status,
                reason=response.reason,
                headers=response.headers,
                body=data,
                request_id=request_id,
            )
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise_transport(exc, call, status, request_id)


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None (nothing more read) once it is longer than ``limit`` bytes."""
    if (response.content_length or 0) > limit:
        return None
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


# -- classification: the one place aiohttp and the OS become worker.errors ---------------
