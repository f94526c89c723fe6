"""AK/SK request signing, ``SDK-HMAC-SHA256``, exactly as Huawei Cloud's SDK does it.

A pure function: no clock, no I/O. The caller passes the time, so every attempt is signed
afresh and tests can pin it. The steps follow the SDK's signer one to one; the differential
test in ``tests/test_signer.py`` holds us to the official signer byte for byte.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

ALGORITHM = "SDK-HMAC-SHA256"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

QueryValue = str | int | float | bool | list[str | int | float | bool]


@dataclass(frozen=True, slots=True)
class Signed:
    """What signing adds to a request: the headers to send and the query as sent.

    Neither the headers (they carry ``X-Security-Token``) nor the canonical request (it
    repeats them) show in ``repr``.
    """

    headers: dict[str, str] = field(repr=False)
    query: str
    canonical_request: str = field(repr=False)


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
    """Pairs sorted by key then value, unreserved-only encoding, booleans as true/false.

    The order is the SDK's: it sorts the ``(key, value)`` tuples natively, so numbers sort
    as numbers (``9`` before ``10``) and a list value is compared as the list it was given,
    then its items are sorted and emitted as ``str(item)`` (so ``True`` inside a list stays
    ``True``, as in the SDK). Only ``list`` is a list, as in the SDK.
    """
    parts: list[str] = []
    for key, value in sorted(pairs, key=lambda pair: (pair[0], _order(pair[1]))):
        encoded_key = _encode(key)
        if isinstance(value, list):
            parts.extend(
                f"{encoded_key}={_encode(str(item))}" for item in sorted(value, key=_order)
            )
        else:
            parts.append(f"{encoded_key}={_encode(_query_text(value))}")
    return "&".join(parts)


_OrderKey = tuple[int, Any]


def _order(value: object) -> _OrderKey:
    # Python's own ordering for the values the SDK can compare (numbers with numbers, strings
    # with strings, lists element-wise); a fixed order across kinds, where the SDK would
    # raise TypeError.
    if isinstance(value, str):
        return (1, value)
    if isinstance(value, int | float):
        return (0, value)
    if isinstance(value, list):
        return (2, tuple(_order(item) for item in value))
    return (3, str(value))


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
    ``X-Security-Token`` when given, and ``Authorization``. Like the SDK, an ``X-Sdk-Date``
    already in ``headers`` is kept: pass a request's own headers, never a previous
    attempt's signed ones, or the retry goes out with the old date.
    """
    if not ak or not sk:
        raise ValueError("signing needs both an access key and a secret key")

    out: dict[str, str] = dict(headers)
    # The SDK looks up "Content-Type" in this exact spelling; so do we, to sign the same.
    content_type = out.get("Content-Type")
    if content_type and not content_type.startswith(("application/json", "application/bson")):
        out["X-Sdk-Content-Sha256"] = "UNSIGNED-PAYLOAD"
    sdk_date = _get(out, "X-Sdk-Date")
    if sdk_date is None:
        sdk_date = signed_date = format_sdk_date(when)
        out["X-Sdk-Date"] = sdk_date
    else:  # the caller's own date, signed as the SDK signs it: parsed, then re-formatted
        signed_date = format_sdk_date(parse_sdk_date(sdk_date))
    if _get(out, "Host") is None:
        out["Host"] = host
    if security_token:
        out["X-Security-Token"] = security_token
    out = {name: str(value).strip() for name, value in out.items()}

    query_text = canonical_query(query)
    canonical, signed_list = _canonical_request(method, path, query_text, out, body)
    signature = _signature(sk, signed_date, canonical)
    out["Authorization"] = (
        f"{ALGORITHM} Access={ak}, SignedHeaders={signed_list}, Signature={signature}"
    )
    return Signed(headers=out, query=query_text, canonical_request=canonical)


def _canonical_request(
    method: str, path: str, query_text: str, headers: Mapping[str, str], body: bytes
) -> tuple[str, str]:
    """Steps 2 to 7: the canonical request and the signed-header list, from final headers.

    ``headers`` are the ones on the wire (already trimmed). Every name without ``_`` is
    signed; an ``X-Sdk-Content-Sha256`` among them stands in for the body's hash.
    """
    signed_names = sorted(name.lower() for name in headers if "_" not in name)
    lowered = {name.lower(): value for name, value in headers.items()}
    canonical_headers = "".join(f"{name}:{lowered[name]}\n" for name in signed_names)
    if not body:
        payload_hash = EMPTY_SHA256
    else:
        payload_hash = _get(headers, "X-Sdk-Content-Sha256") or hashlib.sha256(body).hexdigest()
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
    return canonical, signed_list


def _signature(sk: str, date: str, canonical: str) -> str:
    """Steps 8 and 9. ``date`` is ``X-Sdk-Date`` as :func:`format_sdk_date` writes it: the SDK
    signs the date re-formatted from its parsed form, which for a date we wrote ourselves is
    the date itself (and ``strptime`` is the slowest step of signing, so it is skipped)."""
    string_to_sign = "\n".join((ALGORITHM, date, hashlib.sha256(canonical.encode()).hexdigest()))
    return hmac.new(sk.encode(), string_to_sign.encode(), hashlib.sha256).hexdigest()


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

    ``headers`` are the headers received; only those named in ``SignedHeaders`` take part,
    as they arrived: nothing is added, so an ``X-Sdk-Content-Sha256`` counts only when it
    was signed. A missing or malformed ``X-Sdk-Date`` fails the check rather than raising.
    """
    received = {name.lower(): str(value).strip() for name, value in headers.items()}
    subset: dict[str, str] = {}
    for name in authorization.signed_headers:
        if name not in received:
            return False
        subset[name] = received[name]
    try:
        date = format_sdk_date(parse_sdk_date(subset["x-sdk-date"]))
    except (KeyError, ValueError):
        return False
    canonical, _ = _canonical_request(method, path, canonical_query(query), subset, body)
    return hmac.compare_digest(_signature(sk, date, canonical), authorization.signature)
