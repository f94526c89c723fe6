"""The signer against the official SDK's, byte for byte, and ``verify`` against tampering.

Every expected ``Authorization`` here is computed at test time by
``huaweicloudsdkcore.signer.signer.Signer`` (a pinned test-only dependency), never copied
from a previous run. The SDK is imported inside the tests: importing its credentials module
writes ``~/.huaweicloud``, and conftest points ``HOME`` at a temporary folder only once the
session has started.

Where we differ from the SDK: only where the SDK raises. Query values of one key that Python
cannot compare (a string and a number) make the SDK's ``sort()`` raise ``TypeError``; we
order them by kind instead (``test_incomparable_query_values_sign_where_the_sdk_raises``).
"""

from __future__ import annotations

import copy
import json
import operator
import string
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.api.signer import (
    ALGORITHM,
    QueryValue,
    Signed,
    canonical_query,
    format_sdk_date,
    parse_authorization,
    parse_sdk_date,
    sign,
    verify,
)

AK = "HPUAEXAMPLEAK0000001"
SK = "exampleSecretKey/With+Symbols=0123456789"
TOKEN = "temporary-security-token-" + "x" * 40
PROJECT = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"
HOST = "modelarts.cn-north-4.myhuaweicloud.com"
WHEN = datetime(2025, 6, 10, 6, 20, 20, tzinfo=UTC)
JOBS = f"/v1/{PROJECT}/dev-servers/jobs"
JSON_TYPE = "application/json;charset=utf-8"


def sdk_sign(
    *,
    method: str,
    host: str,
    path: str,
    query: list[tuple[str, Any]],
    headers: dict[str, str],
    body: bytes,
    ak: str,
    sk: str,
    when: datetime,
    security_token: str | None = None,
) -> dict[str, str]:
    """The headers the official SDK sends for this request (its signer, its credentials)."""
    from huaweicloudsdkcore.auth.credentials import BasicCredentials
    from huaweicloudsdkcore.sdk_request import SdkRequest

    header_params = dict(headers)
    header_params.setdefault("X-Sdk-Date", format_sdk_date(when))
    request = SdkRequest(
        method=method,
        schema="https",
        host=host,
        resource_path=path,
        query_params=copy.deepcopy(query),  # the SDK sorts list values in place
        header_params=header_params,
        body=body,
    )
    # BasicCredentials writes its project id into X-Project-Id: give it the request's own.
    credentials = BasicCredentials(ak, sk, headers.get("X-Project-Id"))
    if security_token is not None:
        credentials = credentials.with_security_token(security_token)
    signed = credentials.sign_request(request)
    return dict(signed.header_params)


def ours(
    *,
    method: str,
    host: str,
    path: str,
    query: list[tuple[str, Any]],
    headers: dict[str, str],
    body: bytes,
    ak: str,
    sk: str,
    when: datetime,
    security_token: str | None = None,
) -> Signed:
    return sign(
        method=method,
        host=host,
        path=path,
        query=copy.deepcopy(query),
        headers=headers,
        body=body,
        ak=ak,
        sk=sk,
        when=when,
        security_token=security_token,
    )


# -- known answers: the three calls the worker makes ---------------------------------------

DELETE_BODY = json.dumps(
    {"job_ids": ["8c2e7f1a-0b5d-4a7e-9f3c-1d2e3f4a5b6c", "0f9e8d7c-6b5a-4321-8765-43210fedcba9"]}
).encode()
CALLS = {
    "delete": ("DELETE", JOBS, [], {"Content-Type": JSON_TYPE, "X-Project-Id": PROJECT}),
    "list": (
        "GET",
        JOBS,
        [
            ("status", "FINISHED"),
            ("type", "COMMON"),
            ("name", "nightly job #1"),
            ("visible", True),
            ("id", "8c2e7f1a-0b5d-4a7e-9f3c-1d2e3f4a5b6c"),
        ],
        {"X-Project-Id": PROJECT},
    ),
    "show": ("GET", JOBS + "/8c2e7f1a-0b5d-4a7e-9f3c-1d2e3f4a5b6c", [], {"X-Project-Id": PROJECT}),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("token", [None, TOKEN], ids=["aksk", "temporary"])
@pytest.mark.parametrize("host", [HOST, HOST + ":8443", "127.0.0.1:18080"])
def test_the_worker_calls_sign_exactly_as_the_sdk(call: str, token: str | None, host: str) -> None:
    """DELETE, list and show, with and without a security token, default and other ports:
    the same headers on the wire as the SDK, Authorization included."""
    method, path, query, headers = CALLS[call]
    body = DELETE_BODY if method == "DELETE" else b""
    request: dict[str, Any] = {
        "method": method, "host": host, "path": path, "query": query, "headers": headers,
        "body": body, "ak": AK, "sk": SK, "when": WHEN, "security_token": token,
    }  # fmt: skip
    expected = sdk_sign(**request)
    signed = ours(**request)

    assert signed.headers == expected
    assert signed.headers["Host"] == host
    assert signed.headers["X-Sdk-Date"] == "20250610T062020Z"
    names = parse_authorization(signed.headers["Authorization"]).signed_headers
    assert ("x-security-token" in names) == (token is not None)
    assert "x-project-id" in names
    assert ("content-type" in names) == (method == "DELETE")


def test_the_list_query_is_sent_in_canonical_form() -> None:
    """The query sent is the signed one: sorted, ``%20`` for space, booleans lower-case."""
    _, path, query, headers = CALLS["list"]
    signed = ours(
        method="GET", host=HOST, path=path, query=query, headers=headers, body=b"",
        ak=AK, sk=SK, when=WHEN,
    )  # fmt: skip
    assert signed.query == (
        "id=8c2e7f1a-0b5d-4a7e-9f3c-1d2e3f4a5b6c&name=nightly%20job%20%231"
        "&status=FINISHED&type=COMMON&visible=true"
    )


def test_delete_signs_the_documented_header_list() -> None:
    """The DELETE call signs content-type, host, x-project-id and x-sdk-date, nothing else."""
    method, path, query, headers = CALLS["delete"]
    signed = ours(
        method=method, host=HOST, path=path, query=query, headers=headers,
        body=DELETE_BODY, ak=AK, sk=SK, when=WHEN,
    )  # fmt: skip
    auth = parse_authorization(signed.headers["Authorization"])
    assert auth.access_key == AK
    assert auth.signed_headers == ("content-type", "host", "x-project-id", "x-sdk-date")
    assert len(auth.signature) == 64
    assert signed.headers["Authorization"].startswith(f"{ALGORITHM} Access={AK}, SignedHeaders=")


# -- the differential property -------------------------------------------------------------

RESERVED_HEADERS = {
    "host", "x-sdk-date", "x-security-token", "authorization", "content-type",
    "x-sdk-content-sha256", "x-project-id",
}  # fmt: skip
PRINTABLE = st.characters(blacklist_categories=("Cc", "Cs"))

path_piece = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "-._~", max_size=6),
    st.text(alphabet=" !$&'()*+,;=:@[]?#", max_size=3),
    st.text(alphabet=PRINTABLE, max_size=3),
    st.sampled_from(
        ["%2F", "%20", "%41", "%25", "%2f", "%FF", "%e4%b8%ad", "%", "%zz", "%4", "中文", "é"]
    ),
)
segment = st.lists(path_piece, max_size=4).map("".join)
ALNUM = string.ascii_letters + string.digits


def word(first: str, rest: str, max_size: int) -> st.SearchStrategy[str]:
    """One of ``first`` then up to ``max_size`` of ``rest``: what ``[first][rest]{0,n}``
    matches, drawn as text (``st.from_regex`` drew the same set at twice the cost)."""
    return st.builds(
        operator.add, st.sampled_from(first), st.text(alphabet=rest, max_size=max_size)
    )


paths = st.builds(
    lambda project, segments, slash: f"/v1/{project}/" + "/".join(segments) + slash,
    st.text(alphabet=ALNUM + "-", min_size=1, max_size=64),  # [A-Za-z0-9-]{1,64}
    st.lists(segment, min_size=0, max_size=4),
    st.sampled_from(["", "/", "//"]),
)

query_text = st.text(alphabet=PRINTABLE, max_size=8) | st.sampled_from(
    ["", "a b", "a+b", "a&b=c", "%20", "~-._", "é", "中", "true"]
)
# One kind per key, as a real query has it: the SDK's sort() raises on str-vs-int.
query_kind = st.sampled_from(["str", "bool", "int", "float", "list_str", "list_int", "list_bool"])
scalar_for_kind: dict[str, st.SearchStrategy[Any]] = {
    "str": query_text,
    "bool": st.booleans(),
    "int": st.integers(min_value=-(10**12), max_value=10**12),
    "float": st.floats(allow_nan=False, allow_infinity=False, width=32),
    "list_str": st.lists(query_text, max_size=3),
    "list_int": st.lists(st.integers(-100, 100), max_size=3),
    "list_bool": st.lists(st.booleans(), max_size=3),
}


@st.composite
def queries(draw: st.DrawFn) -> list[tuple[str, Any]]:
    keys = draw(st.lists(query_text, max_size=4, unique=True))
    pairs: list[tuple[str, Any]] = []
    for key in keys:
        kind = draw(query_kind)
        values = draw(st.lists(scalar_for_kind[kind], min_size=1, max_size=3))
        pairs.extend((key, value) for value in values)
    return draw(st.permutations(pairs))


header_name = word(string.ascii_letters, ALNUM + "-", 12) | st.builds(
    lambda head, tail: f"{head}_{tail}",  # [A-Za-z][A-Za-z0-9]{0,5}_[A-Za-z0-9_-]{0,5}
    word(string.ascii_letters, ALNUM, 5),
    st.text(alphabet=ALNUM + "_-", max_size=5),
)
header_value = st.builds(
    lambda left, core, right: left + core + right,
    st.sampled_from(["", " ", "  ", "\t"]),
    st.text(alphabet=PRINTABLE, max_size=12),
    st.sampled_from(["", " ", "\t "]),
)


@st.composite
def header_sets(draw: st.DrawFn) -> dict[str, str]:
    names = draw(
        st.lists(header_name, max_size=5, unique_by=str.lower).filter(
            lambda found: not RESERVED_HEADERS & {name.lower() for name in found}
        )
    )
    return {name: draw(header_value) for name in names}


content_types = st.sampled_from(
    [
        None,
        JSON_TYPE,
        "application/json",
        "application/bson",
        "text/plain",
        "application/octet-stream",
        "multipart/form-data; boundary=x",
    ]
)
bodies = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=48),
    st.lists(st.uuids().map(str), max_size=3).map(
        lambda ids: json.dumps({"job_ids": ids}).encode()
    ),
)
hosts = st.sampled_from([HOST, HOST + ":8443", "127.0.0.1:8080", "[::1]:9000", "example.com"])
methods = st.sampled_from(["GET", "DELETE", "POST", "PUT", "PATCH", "HEAD", "delete", "get"])
secret_keys = st.text(alphabet=PRINTABLE, min_size=1, max_size=24)
tokens = st.none() | st.text(alphabet=string.ascii_letters + string.digits + "+/=", min_size=1)
times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31))


def _changed(text: str, index: int) -> str:
    """``text`` with the character at ``index`` replaced by a non-hex, non-space letter."""
    replacement = "Z" if text[index] != "Z" else "q"
    return text[:index] + replacement + text[index + 1 :]


@settings(max_examples=500, deadline=None)
@given(
    method=methods,
    host=hosts,
    path=paths,
    query=queries(),
    extra=header_sets(),
    content_type=content_types,
    content_type_name=st.sampled_from(["Content-Type", "content-type"]),
    body=bodies,
    ak=st.text(alphabet=string.ascii_uppercase + string.digits, min_size=1, max_size=20),
    sk=secret_keys,
    token=tokens,
    when=times,
)
def test_authorization_equals_the_sdk_and_verify_catches_every_single_change(
    method: str,
    host: str,
    path: str,
    query: list[tuple[str, Any]],
    extra: dict[str, str],
    content_type: str | None,
    content_type_name: str,
    body: bytes,
    ak: str,
    sk: str,
    token: str | None,
    when: datetime,
) -> None:
    """Differential: our Authorization equals the SDK's for any request; ``verify`` accepts
    what we signed and rejects one changed character in the body, any signed header value,
    the path, or the SK."""
    headers = {"X-Project-Id": path.split("/")[2], **extra}
    if content_type is not None:
        headers[content_type_name] = content_type
    request: dict[str, Any] = {
        "method": method, "host": host, "path": path, "query": query, "headers": headers,
        "body": body, "ak": ak, "sk": sk, "when": when, "security_token": token,
    }  # fmt: skip
    expected = sdk_sign(**request)
    signed = ours(**request)
    assert signed.headers["Authorization"] == expected["Authorization"]
    assert signed.headers["X-Sdk-Date"] == format_sdk_date(when)

    # What the server sees: the headers we send and the query as parsed from the wire.
    received = signed.headers
    wire_query = parse_qsl(signed.query, keep_blank_values=True)
    auth = parse_authorization(received["Authorization"])

    def check(
        *, path: str = path, headers: dict[str, str] = received, body: bytes = body, sk: str = sk
    ) -> bool:
        return verify(
            method=method, path=path, query=wire_query, headers=headers, body=body,
            authorization=auth, sk=sk,
        )  # fmt: skip

    if canonical_query(wire_query) != signed.query:
        # Only numbers repeated under one key: the SDK signs them in numeric order (9 before
        # 10), a server that sees text sorts "10" first. The worker never sends such a query.
        assert any(isinstance(v, int | float | list) for _, v in query)
        assert not check()
        return
    assert check()

    for index in range(len(sk)):
        assert not check(sk=_changed(sk, index))
    for index in range(len(path)):
        assert not check(path=_changed(path, index))
    for name in auth.signed_headers:
        original = next(key for key in received if key.lower() == name)
        value = received[original]
        for index in range(max(len(value), 1)):
            tampered = _changed(value, index) if value else "Z"
            assert not check(headers={**received, original: tampered}), (name, index)
    unsigned_payload = "x-sdk-content-sha256" in auth.signed_headers
    if not body:
        assert not check(body=b"Z")
    elif unsigned_payload:
        # A non-JSON Content-Type makes the SDK send X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD:
        # by design the signature then does not cover the body.
        assert check(body=bytes([body[0] ^ 1]) + body[1:])
    else:
        for index in {0, len(body) // 2, len(body) - 1}:
            flipped = body[:index] + bytes([body[index] ^ 1]) + body[index + 1 :]
            assert not check(body=flipped)


def test_numbers_under_one_key_sort_as_numbers_like_the_sdk() -> None:
    """``n=9`` before ``n=10``, as the SDK's native sort has it (a text sort would not)."""
    pairs: list[tuple[str, QueryValue]] = [("n", 10), ("n", 9), ("m", [3, 20, 1])]
    expected = sdk_sign(
        method="GET", host=HOST, path="/v1/p/x", query=list(pairs), headers={}, body=b"",
        ak=AK, sk=SK, when=WHEN,
    )  # fmt: skip
    signed = ours(
        method="GET", host=HOST, path="/v1/p/x", query=list(pairs), headers={}, body=b"",
        ak=AK, sk=SK, when=WHEN,
    )  # fmt: skip
    assert signed.query == "m=1&m=3&m=20&n=9&n=10"
    assert signed.headers["Authorization"] == expected["Authorization"]


def test_incomparable_query_values_sign_where_the_sdk_raises() -> None:
    """The one documented difference: a key with a string and a number. The SDK's sort
    raises TypeError; we sign, numbers before strings, the same every time."""
    pairs: list[tuple[str, QueryValue]] = [("k", "b"), ("k", 2), ("k", "a")]
    with pytest.raises(TypeError):
        sdk_sign(
            method="GET", host=HOST, path="/v1/p/x", query=list(pairs), headers={}, body=b"",
            ak=AK, sk=SK, when=WHEN,
        )  # fmt: skip
    assert canonical_query(pairs) == "k=2&k=a&k=b"
    assert canonical_query(reversed(pairs)) == "k=2&k=a&k=b"


def test_a_list_value_is_not_sorted_in_place() -> None:
    """Unlike the SDK, signing leaves the caller's list as it was."""
    values: list[str | int | float | bool] = ["b", "a"]
    assert canonical_query([("k", values)]) == "k=a&k=b"
    assert values == ["b", "a"]


# -- dates ------------------------------------------------------------------------------


def test_every_call_gets_the_date_of_its_own_time() -> None:
    """A retry signed a second later carries a new X-Sdk-Date and a new signature; the
    same time signs the same (signing is a pure function)."""
    method, path, query, headers = CALLS["delete"]

    def at(when: datetime) -> Signed:
        return ours(
            method=method, host=HOST, path=path, query=query, headers=headers,
            body=DELETE_BODY, ak=AK, sk=SK, when=when,
        )  # fmt: skip

    first, again, later = at(WHEN), at(WHEN), at(WHEN + timedelta(seconds=1))
    assert first.headers == again.headers
    assert later.headers["X-Sdk-Date"] == "20250610T062021Z"
    assert later.headers["Authorization"] != first.headers["Authorization"]
    assert "X-Sdk-Date" not in headers  # the caller's headers are not touched


def test_an_aware_time_is_signed_in_utc() -> None:
    """X-Sdk-Date is UTC whatever the zone of the time given; a naive time counts as UTC."""
    beijing = WHEN.astimezone(timezone(timedelta(hours=8)))
    assert format_sdk_date(beijing) == "20250610T062020Z"
    assert format_sdk_date(WHEN.replace(tzinfo=None)) == "20250610T062020Z"


@given(st.datetimes(min_value=datetime(1900, 1, 1), timezones=st.timezones() | st.just(UTC)))
def test_sdk_date_round_trips_to_the_second(when: datetime) -> None:
    """parse(format(t)) is t in UTC without its microseconds."""
    assert parse_sdk_date(format_sdk_date(when)) == when.astimezone(UTC).replace(microsecond=0)


@pytest.mark.parametrize(
    "bad", ["", "2025-06-10T06:20:20Z", "20250610T062020", "20250610 062020Z", "20251310T062020Z"]
)
def test_a_malformed_sdk_date_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - strptime's own messages vary
        parse_sdk_date(bad)


# -- parse_authorization and verify's refusals ---------------------------------------------


def test_parse_authorization_splits_the_three_fields() -> None:
    auth = parse_authorization(
        "SDK-HMAC-SHA256 Access=AK1, SignedHeaders=host;x-sdk-date, Signature=ab12"
    )
    assert (auth.access_key, auth.signed_headers, auth.signature) == (
        "AK1",
        ("host", "x-sdk-date"),
        "ab12",
    )


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("", "unsupported signing algorithm"),
        ("AWS4-HMAC-SHA256 Credential=x, SignedHeaders=host, Signature=ab", "unsupported"),
        ("SDK-HMAC-SM3 Access=a, SignedHeaders=host, Signature=ab", "unsupported"),
        ("SDK-HMAC-SHA256 Access=a, SignedHeaders=host", "lacks Signature"),
        ("SDK-HMAC-SHA256 SignedHeaders=host, Signature=ab", "lacks Access"),
        ("SDK-HMAC-SHA256 Access=a, Signature=ab", "lacks SignedHeaders"),
        ("SDK-HMAC-SHA256 Access=a, SignedHeaders, Signature=ab", "malformed"),
        ("SDK-HMAC-SHA256", "malformed"),
    ],
)
def test_parse_authorization_refuses_what_is_not_ours(value: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_authorization(value)


def _signed_delete(content_type: str = JSON_TYPE) -> Signed:
    return ours(
        method="DELETE", host=HOST, path=JOBS, query=[],
        headers={"Content-Type": content_type, "X-Project-Id": PROJECT},
        body=DELETE_BODY, ak=AK, sk=SK, when=WHEN, security_token=TOKEN,
    )  # fmt: skip


def _verify(headers: dict[str, str], body: bytes = DELETE_BODY) -> bool:
    authorization = next(v for k, v in headers.items() if k.lower() == "authorization")
    return verify(
        method="DELETE", path=JOBS, query=[], headers=headers, body=body,
        authorization=parse_authorization(authorization), sk=SK,
    )  # fmt: skip


def test_verify_accepts_received_header_names_in_any_case() -> None:
    """HTTP header names are case-insensitive; a server may hand them over lower-cased."""
    signed = _signed_delete()
    assert _verify({name.lower(): value for name, value in signed.headers.items()})


def test_verify_refuses_a_missing_signed_header_or_a_bad_date_without_raising() -> None:
    signed = _signed_delete()
    without_token = {k: v for k, v in signed.headers.items() if k != "X-Security-Token"}
    assert not _verify(without_token)
    assert not _verify({**signed.headers, "X-Sdk-Date": "not a date"})


def test_verify_refuses_a_signature_that_does_not_sign_the_date() -> None:
    """An Authorization whose SignedHeaders omit x-sdk-date cannot be checked for age."""
    signed = _signed_delete()
    auth = parse_authorization(signed.headers["Authorization"])
    trimmed = tuple(name for name in auth.signed_headers if name != "x-sdk-date")
    forged = f"{ALGORITHM} Access={AK}, SignedHeaders={';'.join(trimmed)}, Signature=00"
    assert not _verify({**signed.headers, "Authorization": forged})


def test_an_unsigned_payload_header_added_in_transit_does_not_cover_a_new_body() -> None:
    """X-Sdk-Content-Sha256 stands in for the body hash only when it was signed."""
    signed = _signed_delete()
    assert not _verify(
        {**signed.headers, "X-Sdk-Content-Sha256": "UNSIGNED-PAYLOAD"}, body=b'{"job_ids":[]}'
    )


def test_a_non_json_request_we_signed_verifies() -> None:
    """text/plain makes the signer add X-Sdk-Content-Sha256; verify does not add it twice."""
    signed = _signed_delete(content_type="text/plain")
    assert signed.headers["X-Sdk-Content-Sha256"] == "UNSIGNED-PAYLOAD"
    assert _verify(signed.headers)


def test_signing_without_keys_is_refused() -> None:
    for ak, sk in (("", SK), (AK, "")):
        with pytest.raises(ValueError, match="access key and a secret key"):
            sign(
                method="GET", host=HOST, path=JOBS, headers={}, body=b"",
                ak=ak, sk=sk, when=WHEN,
            )  # fmt: skip


def test_signed_repr_shows_no_security_token() -> None:
    signed = _signed_delete()
    assert TOKEN in signed.headers["X-Security-Token"]
    assert TOKEN not in repr(signed)
    assert SK not in repr(signed)
