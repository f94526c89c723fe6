"""AK/SK request signing, ``SDK-HMAC-SHA256``, exactly as Huawei Cloud's SDK does it.

A pure function: no clock, no I/O. The caller passes the time, so every attempt is signed
afresh and tests can pin it. The steps follow ``API-NOTES.md`` one to one; the differential
test in ``tests/test_signer.py`` holds us to the official signer byte for byte.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, unquote

ALGORITHM = "SDK-HMAC-SHA256"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

QueryValue = str | int | float | bool | Sequence[str | int | float | bool]


@dataclass(frozen=True, slots=True)
class Signed:
    """What signing adds to a request: the headers to send and the query as sent."""

    headers: dict[str, str]
    query: str
    canonical_request: str


def format_sdk_date(when: datetime) -> str:
    """``X-Sdk-Date`` for an aware or naive-UTC datetime."""
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime(DATE_FORMAT)


def parse_sdk_date(value: str) -> datetime:
    """The inverse of :func:`format_sdk_date`; raises ``ValueError`` on a malformed date."""
    return datetime.strptime(value, DATE_FORMAT).replace(tzinfo=UTC)


def _encode(text: str) -> str:
    # RFC 3986 unreserved characters stay; everything else (space included) is %XX of UTF-8.
    return quote(text, safe="~")


def canonical_uri(path: str) -> str:
    """Decode the path, encode each segment, always end with ``/``."""
    uri = "/".join(_encode(segment) for segment in unquote(path).split("/"))
    return uri if uri.endswith("/") else uri + "/"


def _query_text(value: str | int | float | bool) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def canonical_query(pairs: Iterable[tuple[str, QueryValue]]) -> str:
    """Pairs sorted by key then value, unreserved-only encoding, booleans as true/false."""
    parts: list[str] = []
    for key, value in sorted(pairs, key=lambda pair: (pair[0], _sort_key(pair[1]))):
        encoded_key = _encode(key)
        if isinstance(value, str | int | float | bool):
            parts.append(f"{encoded_key}={_encode(_query_text(value))}")
        else:
            parts.extend(
                f"{encoded_key}={_encode(str(item))}"
                for item in sorted(value, key=_sort_key)
            )
    return "&".join(parts)


def _sort_key(value: object) -> tuple[int, str]:
    # The SDK sorts (key, value) tuples; values of one key share a type in practice, and the
    # string form orders them the same way for the types the API uses.
    return (0, value) if isinstance(value, str) else (1, str(value))  # type: ignore[return-value]


def sign(
    *,
    method: str,
    host: str,
    path: str,
    query: Iterable[tuple[str, QueryValue]] = (),
    headers: Mapping[str, str],
    body: bytes,
    ak: str,
    sk: str,
    when: datetime,
    security_token: str | None = None,
) -> Signed:
    """Sign one request and return the headers to send.

    ``host`` is the ``Host`` header value: the host name with ``:port`` when the port is not
    the scheme's default. ``headers`` are the request's own headers (``Content-Type``,
    ``X-Project-Id`` ...); the result holds them, trimmed, plus ``Host``, ``X-Sdk-Date``,
    ``X-Security-Token`` when given, and ``Authorization``.
    """
    if not ak or not sk:
        raise ValueError("signing needs both an access key and a secret key")

    out: dict[str, str] = {}
    for name, value in headers.items():
        out[name] = value
    content_type = _get(out, "Content-Type")
    if content_type and not content_type.startswith(("application/json", "application/bson")):
        out["X-Sdk-Content-Sha256"] = "UNSIGNED-PAYLOAD"
    sdk_date = _get(out, "X-Sdk-Date")
    if sdk_date is None:
        sdk_date = format_sdk_date(when)
        out["X-Sdk-Date"] = sdk_date
    if _get(out, "Host") is None:
        out["Host"] = host
    if security_token:
        out["X-Security-Token"] = security_token

    signed_names = sorted(name.lower() for name in out if "_" not in name)
    lowered = {name.lower(): str(value).strip() for name, value in out.items()}
    out = {name: str(value).strip() for name, value in out.items()}
    canonical_headers = "".join(f"{name}:{lowered[name]}\n" for name in signed_names)

    if not body:
        payload_hash = EMPTY_SHA256
    else:
        payload_hash = _get(out, "X-Sdk-Content-Sha256") or hashlib.sha256(body).hexdigest()

    query_text = canonical_query(query)
    signed_list = ";".join(signed_names)
    canonical = "\n".join(
        (
            method.upper(),
            canonical_uri(path),
            query_text,
            canonical_headers,
            signed_list,
            payload_hash,
        )
    )
    string_to_sign = "\n".join(
        (ALGORITHM, sdk_date, hashlib.sha256(canonical.encode()).hexdigest())
    )
    signature = hmac.new(sk.encode(), string_to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (
        f"{ALGORITHM} Access={ak}, SignedHeaders={signed_list}, Signature={signature}"
    )
    return Signed(headers=out, query=query_text, canonical_request=canonical)


def _get(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


@dataclass(frozen=True, slots=True)
class Authorization:
    """The parts of an ``Authorization: SDK-HMAC-SHA256 ...`` header."""

    access_key: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str) -> Authorization:
    """Split an ``Authorization`` header; ``ValueError`` when it is not ours."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise ValueError(f"unsupported signing algorithm {algorithm!r}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        key, sep, val = part.strip().partition("=")
        if not sep:
            raise ValueError("malformed Authorization header")
        fields[key] = val
    try:
        return Authorization(
            access_key=fields["Access"],
            signed_headers=tuple(fields["SignedHeaders"].split(";")),
            signature=fields["Signature"],
        )
    except KeyError as exc:
        raise ValueError(f"Authorization header lacks {exc.args[0]}") from None


def verify(
    *,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
    authorization: Authorization,
    sk: str,
) -> bool:
    """Recompute the signature the way the server does and compare in constant time.

    ``headers`` are the headers received; only those named in ``SignedHeaders`` take part.
    """
    received = {name.lower(): value for name, value in headers.items()}
    subset: dict[str, str] = {}
    for name in authorization.signed_headers:
        if name not in received:
            return False
        subset[name] = received[name]
    if "x-sdk-date" not in subset:
        return False
    expected = sign(
        method=method,
        host=subset.get("host", ""),
        path=path,
        query=query,
        headers=subset,
        body=body,
        ak=authorization.access_key,
        sk=sk,
        when=parse_sdk_date(subset["x-sdk-date"]),
    )
    theirs = parse_authorization(expected.headers["Authorization"]).signature
    return hmac.compare_digest(theirs, authorization.signature)
