"""The DevServer jobs API client: sign, send, classify.

One call is one attempt. Retrying is the dispatcher's business; this module's job is to
make every attempt correct (signed afresh with the keys valid *now*, sent with exactly the
headers that were signed, its body read to the end so the connection is reused) and to
turn whatever happened into one of the types in :mod:`worker.errors`. Every aiohttp and OS
exception is translated here and nowhere else, so the retry policy can decide by type.

Secrets never leave: messages are built from the method, path, status and what the server
said, and anything the server echoes back is scrubbed of the keys before it is kept.
"""

from __future__ import annotations

import re
import ssl
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn, Protocol, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
from multidict import CIMultiDictProxy
from yarl import URL

from worker.credentials import Credentials, CredentialSource
from worker.errors import (
    ApiError,
    ApiTimeout,
    AuthError,
    ClientError,
    MalformedResponse,
    NetworkError,
    NotFound,
    ServerError,
    ThrottledError,
    TlsError,
)
from worker.http import USER_AGENT, make_session
from worker.signer import QueryValue, sign
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
_ERROR_TEXT_LIMIT = 200
_SECONDS_RE = re.compile(r"\d+(?:\.\d+)?")
_UNPRINTABLE_RE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]+")
_ERROR_KEYS = (("error_code", "error_msg"), ("errorCode", "errorMsg"), ("code", "message"))


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` as seconds from ``now``: delay-seconds or an HTTP date.

    ``None`` when absent or unparseable (a negative number is unparseable: RFC 9110 allows
    digits only), so the caller falls back to its own backoff. A date in the past is 0.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _SECONDS_RE.fullmatch(text):
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True, slots=True)
class JobPage:
    """One answer of the list call: the records and the paging envelope around them."""

    records: tuple[JobRecord, ...]
    current: int | None
    pages: int | None
    size: int | None
    total: int | None
    request_id: str | None


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


@dataclass(frozen=True, slots=True)
class _Answer:
    """A response read to the end."""

    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    body: bytes
    request_id: str | None


@dataclass(frozen=True, slots=True)
class _Call:
    """What an error message may say about the request: never a header, never a key."""

    method: str
    path: str
    secrets: tuple[str, ...]

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def describe(self) -> str:
        return f"{self.method} {self.path}"


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
        return await self._request("DELETE", self._jobs_path(), (), _deleted, body)

    async def list_jobs(self, **filters: str | int | bool) -> JobPage:
        """List jobs matching ``id``, ``name``, ``type``, ``status``, ``visible`` or paging
        parameters; each keyword becomes one query parameter."""
        return await self._request("GET", self._jobs_path(), tuple(filters.items()), _page)

    async def get_job(self, job_id: str) -> JobRecord:
        """Show one job; :class:`~worker.errors.NotFound` when it does not exist."""
        path = f"{self._jobs_path()}/{quote(job_id, safe='')}"
        return await self._request("GET", path, (), _shown)

    async def probe(self) -> ProbeResult:
        """One signed read-only call, for ``check``: proves the keys and measures clock skew.

        Local time is taken halfway between sending and receiving, the best estimate of when
        the server stamped its ``Date`` (which has one-second resolution anyway).
        """
        sent = self._utcnow()
        query = (("id", PROBE_JOB_ID),)
        answer = await self._request("GET", self._jobs_path(), query, _checked_page)
        received = self._utcnow()
        server_date = _http_date(answer.headers.get("Date"))
        skew: float | None = None
        if server_date is not None:
            local = sent + (received - sent) / 2
            skew = (server_date - _aware(local)).total_seconds()
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
        parse: Callable[[_Answer, _Call], _T],
        body: bytes = b"",
    ) -> _T:
        """One attempt: sign afresh, send, read to the end, classify, parse.

        Counted by outcome class, a malformed 200 included.
        """
        credentials = await self._credentials.current()
        call = _Call(method=method, path=path, secrets=_secrets(credentials))
        try:
            answer = await self._send(method, path, query, body, credentials, call)
            _raise_for_status(answer, call, self._utcnow)
            result = parse(answer, call)
        except ApiError as exc:
            self._outcomes[type(exc).__name__] += 1
            raise
        self._outcomes["ok"] += 1
        return result

    async def _send(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, QueryValue]],
        body: bytes,
        credentials: Credentials,
        call: _Call,
    ) -> _Answer:
        headers = {"X-Project-Id": self._project_id, "User-Agent": USER_AGENT}
        if body:
            headers["Content-Type"] = JSON_CONTENT_TYPE
        signed = sign(
            method=method,
            host=self._host,
            path=path,
            query=query,
            headers=headers,
            body=body,
            ak=credentials.ak,
            sk=credentials.sk,
            when=self._utcnow(),
            security_token=credentials.security_token,
        )
        target = self._origin + path + (f"?{signed.query}" if signed.query else "")
        url = URL(target, encoded=True)
        status: int | None = None
        request_id: str | None = None
        try:
            async with self._session.request(
                method,
                url,
                headers=signed.headers,
                data=body or None,
                allow_redirects=False,
            ) as response:
                status = response.status
                request_id = _request_id(response.headers, call)
                data = await response.read()
                return _Answer(
                    status=status,
                    reason=response.reason,
                    headers=response.headers,
                    body=data,
                    request_id=request_id,
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            _raise_transport(exc, call, status, request_id)


# -- classification: the one place aiohttp and the OS become worker.errors ---------------


def _raise_transport(
    exc: BaseException, call: _Call, status: int | None, request_id: str | None
) -> NoReturn:
    """Translate a transport failure. ``status`` is set when it broke while reading a body.

    Raised ``from None``: aiohttp's exceptions hold the request, headers and all, and a
    chained cause would carry the ``Authorization`` header into any traceback.
    """
    error_type: type[ApiError]
    if isinstance(
        exc,
        aiohttp.ClientSSLError | ssl.SSLCertVerificationError | aiohttp.ServerFingerprintMismatch,
    ):
        error_type, what = TlsError, "TLS certificate refused"
    elif isinstance(exc, TimeoutError):
        error_type, what = ApiTimeout, "timed out"
    elif isinstance(exc, aiohttp.ClientResponseError):
        error_type, what = MalformedResponse, "invalid HTTP response"
    else:
        # ClientPayloadError, ServerDisconnectedError, ClientOSError, refused, reset, other
        # ssl.SSLError after the handshake, and any other aiohttp.ClientError.
        error_type, what = NetworkError, "network error"
    detail = call.scrub(_printable(f"{type(exc).__name__}: {exc}"))
    message = f"{call.describe()}: {what} ({detail})"
    raise error_type(message, http_status=status, error_msg=detail, request_id=request_id) from None


def _raise_for_status(answer: _Answer, call: _Call, utcnow: Callable[[], datetime]) -> None:
    """Raise the error an HTTP status means; return quietly on 2xx."""
    status = answer.status
    if 200 <= status < 300:
        return
    error_code, error_msg = _error_fields(answer, call)
    fields: dict[str, Any] = {
        "http_status": status,
        "error_code": error_code,
        "error_msg": error_msg,
        "request_id": answer.request_id,
    }
    said = " ".join(part for part in (error_code, error_msg) if part)
    message = f"{call.describe()}: HTTP {status}" + (f" {said}" if said else "")
    if answer.request_id:
        message += f" (request_id={answer.request_id})"
    if status == 429:
        retry_after = parse_retry_after(answer.headers.get("Retry-After"), utcnow())
        raise ThrottledError(message, retry_after=retry_after, **fields)
    if status >= 500:
        raise ServerError(message, **fields)
    if status in (401, 403):
        raise AuthError(message, **fields)
    if status == 404:
        raise NotFound(message, **fields)
    # Other 4xx, and 1xx/3xx that should never reach us (redirects are not followed: they
    # would replay a signed request elsewhere).
    raise ClientError(message, **fields)


def _error_fields(answer: _Answer, call: _Call) -> tuple[str | None, str | None]:
    """``error_code``/``error_msg`` in whichever spelling the body uses, or its text."""
    try:
        data = orjson.loads(answer.body) if answer.body else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        candidates = [data]
        if isinstance(data.get("error"), dict):
            candidates.append(data["error"])
        for candidate in candidates:
            for code_key, msg_key in _ERROR_KEYS:
                code, msg = candidate.get(code_key), candidate.get(msg_key)
                if code is not None or msg is not None:
                    return _clean(code, call), _clean(msg, call)
    text = answer.body.decode("utf-8", errors="replace") if answer.body else ""
    return None, _clean(text or answer.reason, call)


def _clean(value: object, call: _Call) -> str | None:
    """Server text made safe to log: printable, bounded, with our keys scrubbed out."""
    if value is None:
        return None
    text = call.scrub(_printable(str(value)))[:_ERROR_TEXT_LIMIT].strip()
    return text or None


def _printable(text: str) -> str:
    return _UNPRINTABLE_RE.sub(" ", text)


def _request_id(headers: Mapping[str, str], call: _Call) -> str | None:
    value = headers.get("X-Request-Id")  # the proxy is case-insensitive: X-Request-ID too
    if not value:
        return None
    return call.scrub(_printable(value)).strip()[:128] or None


def _secrets(credentials: Credentials) -> tuple[str, ...]:
    values = (credentials.ak, credentials.sk, credentials.security_token)
    # Longest first, so a key that contains another is scrubbed whole.
    return tuple(sorted((v for v in values if v), key=len, reverse=True))


# -- parsing a 2xx body ------------------------------------------------------------------


def _malformed(answer: _Answer, call: _Call, what: str) -> MalformedResponse:
    detail = call.scrub(_printable(what))[:_ERROR_TEXT_LIMIT]
    return MalformedResponse(
        f"{call.describe()}: HTTP {answer.status} but {detail}",
        http_status=answer.status,
        error_msg=detail,
        request_id=answer.request_id,
    )


def _json_object(answer: _Answer, call: _Call) -> dict[str, Any]:
    try:
        data = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        raise _malformed(answer, call, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise _malformed(answer, call, "the body is not a JSON object")
    return data


def _envelope(answer: _Answer, call: _Call) -> dict[str, Any]:
    data = _json_object(answer, call)
    if not isinstance(data.get("data"), list):
        raise _malformed(answer, call, "'data' is not a list")
    return data


def _records(envelope: dict[str, Any], answer: _Answer, call: _Call) -> tuple[JobRecord, ...]:
    return tuple(_record(raw, index, answer, call) for index, raw in enumerate(envelope["data"]))


def _record(raw: object, index: int, answer: _Answer, call: _Call) -> JobRecord:
    if not isinstance(raw, dict):
        raise _malformed(answer, call, f"job record {index} is not an object")
    try:
        return JobRecord.from_api(raw)
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        field = _offending_field(raw)
        raise _malformed(answer, call, f"job record {index}: field {field!r}: {exc}") from None


def _offending_field(raw: Mapping[str, Any]) -> str:
    """Which field made ``JobRecord.from_api`` fail: each is tried alone beside a good id."""
    job_id = raw.get("id")
    if not isinstance(job_id, str) or not job_id:
        return "id"
    for key in ("abnormal_count", "create_at", "update_at"):
        try:
            JobRecord.from_api({"id": "probe", key: raw.get(key)})
        except (ValueError, TypeError, OverflowError, OSError):
            return key
    return "?"


def _deleted(answer: _Answer, call: _Call) -> DeleteResult:
    return DeleteResult(
        records=_records(_envelope(answer, call), answer, call),
        request_id=answer.request_id,
        http_status=answer.status,
    )


def _shown(answer: _Answer, call: _Call) -> JobRecord:
    """The show call answers with the job itself; a ``data`` wrapper is tolerated."""
    data = _json_object(answer, call)
    nested = data.get("data")
    if "id" not in data and isinstance(nested, dict):
        data = nested
    return _record(data, 0, answer, call)


def _checked_page(answer: _Answer, call: _Call) -> _Answer:
    """The probe wants the headers, but a body that is not the envelope still fails it."""
    _page(answer, call)
    return answer


def _page(answer: _Answer, call: _Call) -> JobPage:
    """The list envelope. Paging numbers are informative only: one that is not an integer
    is dropped to ``None`` rather than failing a call whose records are fine."""
    envelope = _envelope(answer, call)

    def number(key: str) -> int | None:
        value = envelope.get(key)
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        return None

    return JobPage(
        records=_records(envelope, answer, call),
        current=number("current"),
        pages=number("pages"),
        size=number("size"),
        total=number("total"),
        request_id=answer.request_id,
    )


def _http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return _aware(parsedate_to_datetime(value))
    except (TypeError, ValueError, IndexError):
        return None


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
