"""What the API answered, turned into values or into the error tree of ``worker.errors``.

Every aiohttp and OS exception, every status and every body is classified here and nowhere
else, so the retry policy can decide by type. Messages are built from the method, path,
status and what the server said; anything the server echoes back is scrubbed of the keys.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from worker.api.credentials import Credentials
from worker.errors import (
    ApiError,
    ApiTimeout,
    AuthError,
    ClientError,
    MalformedResponse,
    NetworkError,
    NoSuchApi,
    NotFound,
    NotTls,
    ServerError,
    ThrottledError,
    TlsError,
)
from worker.types import DeleteResult, JobRecord

_ERROR_TEXT_LIMIT = 200
_GATEWAY = "APIGW."  # the API gateway's own codes: its 404 is "no such API", not "no such job"
_SERVICE = "ModelArts."  # the service's codes: its 404 is about a job
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
    offset: int | None = None  # a server that pages by offset/limit says where it started
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """A response read to the end."""

    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    body: bytes
    request_id: str | None


@dataclass(frozen=True, slots=True)
class Call:
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


def raise_transport(
    exc: BaseException, call: Call, status: int | None, request_id: str | None
) -> NoReturn:
    """Translate a transport failure. ``status`` is set when it broke while reading a body.

    Raised ``from None``: aiohttp's exceptions hold the request, headers and all, and a
    chained cause would carry the ``Authorization`` header into any traceback.
    """
    error_type: type[ApiError]
    if _not_tls(exc):
        error_type, what = NotTls, "the server did not speak TLS (is the endpoint http://?)"
    elif isinstance(
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


_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL",
                      "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"})  # fmt: skip
"""OpenSSL's reasons when the first bytes back are not a TLS record: a plain-HTTP answer."""


def _not_tls(exc: BaseException) -> bool:
    """Did an https:// call meet a server answering in plain HTTP?"""
    error = getattr(exc, "os_error", None) if isinstance(exc, aiohttp.ClientSSLError) else exc
    return isinstance(error, ssl.SSLError) and getattr(error, "reason", None) in _NOT_TLS


def raise_for_status(
    answer: Answer, call: Call, utcnow: Callable[[], datetime], *, names_job: bool = False
) -> None:
    """Raise the error an HTTP status means; return quietly on 2xx.

    A 404 is ``NotFound`` (no such job) only when its body carries a ModelArts error, or
    ``names_job``: the call is the show call of one job, to an API that has answered this
    client before. Any other 404 (the gateway's ``APIGW.*``, a proxy's HTML page, a path
    prefix the server does not know) says nothing about any job: ``NoSuchApi``."""
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
        code = error_code or ""
        if code.startswith(_SERVICE) or (names_job and not code.startswith(_GATEWAY)):
            raise NotFound(message, **fields)
        if not code.startswith(_GATEWAY):
            message += (
                ": not an answer of the ModelArts API (no ModelArts error code); check the "
                "endpoint, its path and the project id"
            )
        raise NoSuchApi(message, **fields)
    # Other 4xx, and 1xx/3xx that should never reach us (redirects are not followed: they
    # would replay a signed request elsewhere).
    raise ClientError(message, **fields)


def _error_fields(answer: Answer, call: Call) -> tuple[str | None, str | None]:
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


def _clean(value: object, call: Call) -> str | None:
    """Server text made safe to log: printable, bounded, with our keys scrubbed out."""
    if value is None:
        return None
    text = call.scrub(_printable(str(value)))[:_ERROR_TEXT_LIMIT].strip()
    return text or None


def _printable(text: str) -> str:
    return _UNPRINTABLE_RE.sub(" ", text)


def request_id_of(
    headers: Mapping[str, str], call: Call, header: str = "X-Request-Id"
) -> str | None:
    """The id the server gave the request (``header``: IAM's is ``X-IAM-Trace-Id``), made
    safe to log as any server text is: a header can echo what we sent, keys included."""
    value = headers.get(header)  # the proxy is case-insensitive: X-Request-ID too
    if not value:
        return None
    return call.scrub(_printable(value)).strip()[:128] or None


def secrets_of(credentials: Credentials) -> tuple[str, ...]:
    values = (credentials.ak, credentials.sk, credentials.security_token)
    # Longest first, so a key that contains another is scrubbed whole.
    return tuple(sorted((v for v in values if v), key=len, reverse=True))


# -- parsing a 2xx body ------------------------------------------------------------------


def _malformed(answer: Answer, call: Call, what: str) -> MalformedResponse:
    detail = call.scrub(_printable(what))[:_ERROR_TEXT_LIMIT]
    return MalformedResponse(
        f"{call.describe()}: HTTP {answer.status} but {detail}",
        http_status=answer.status,
        error_msg=detail,
        request_id=answer.request_id,
    )


def _json_object(answer: Answer, call: Call) -> dict[str, Any]:
    try:
        data = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        raise _malformed(answer, call, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise _malformed(answer, call, "the body is not a JSON object")
    return data


def _envelope(answer: Answer, call: Call) -> dict[str, Any]:
    data = _json_object(answer, call)
    if not isinstance(data.get("data"), list):
        raise _malformed(answer, call, "'data' is not a list")
    return data


def _records(envelope: dict[str, Any], answer: Answer, call: Call) -> tuple[JobRecord, ...]:
    return tuple(_record(raw, index, answer, call) for index, raw in enumerate(envelope["data"]))


def _record(raw: object, index: int, answer: Answer, call: Call) -> JobRecord:
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


def parse_deleted(answer: Answer, call: Call) -> DeleteResult:
    """The records a 200 says it deleted, and whether its envelope says they are all of
    them: ``total`` above the records listed, or more than one page, is a part; ``total``
    also says how many of them it did not list."""
    envelope = _envelope(answer, call)
    records = _records(envelope, answer, call)
    total, pages = _number(envelope.get("total")), _number(envelope.get("pages"))
    part = (total is not None and total > len(records)) or (pages is not None and pages > 1)
    return DeleteResult(
        records=records,
        request_id=answer.request_id,
        http_status=answer.status,
        whole=not part,
        untold=None if total is None else max(0, total - len(records)),
    )


def _number(value: object) -> int | None:
    """An envelope's paging number, or ``None`` when it is not an integer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def parse_shown(answer: Answer, call: Call) -> JobRecord:
    """The show call answers with the job itself; a ``data`` wrapper is tolerated."""
    data = _json_object(answer, call)
    nested = data.get("data")
    if "id" not in data and isinstance(nested, dict):
        data = nested
    return _record(data, 0, answer, call)


def parse_checked_page(answer: Answer, call: Call) -> Answer:
    """The probe wants the headers, but a body that is not the envelope still fails it."""
    parse_page(answer, call)
    return answer


def parse_page(answer: Answer, call: Call) -> JobPage:
    """The list envelope. Paging numbers are informative only: one that is not an integer
    is dropped to ``None`` rather than failing a call whose records are fine."""
    envelope = _envelope(answer, call)

    def number(key: str) -> int | None:
        return _number(envelope.get(key))

    return JobPage(
        records=_records(envelope, answer, call),
        current=number("current"),
        pages=number("pages"),
        size=number("size"),
        total=number("total"),
        request_id=answer.request_id,
        offset=number("offset"),
        limit=number("limit"),
    )


def http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return aware(parsedate_to_datetime(value))
    except (TypeError, ValueError, IndexError):
        return None


def aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
