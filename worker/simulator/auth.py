"""Server-side check of ``SDK-HMAC-SHA256``: what the API gateway does before anything else.

Pure: the caller passes the request's parts and the wall-clock time. The answer is ``None``
(accepted) or the reason for a 401, worded like the gateway's and never holding a secret.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from urllib.parse import parse_qsl

from worker.api.signer import parse_authorization, parse_sdk_date, verify


@functools.lru_cache(maxsize=256)
def _signed_at(sdk_date: str) -> float:
    # strptime is the slowest step of a check, and a busy client sends the same date
    # (one-second resolution) many times over.
    return parse_sdk_date(sdk_date).timestamp()


def check_request(
    *,
    method: str,
    raw_path: str,
    headers: Mapping[str, str],
    body: bytes,
    ak: str,
    sk: str,
    now: float,
    max_skew_s: float,
) -> str | None:
    """Verify one request's signature; ``raw_path`` is the path and query as received.

    ``headers`` must look names up case-insensitively (aiohttp's ``CIMultiDictProxy`` does).
    """
    header = headers.get("Authorization")
    if not header:
        return "Authorization header is missing"
    try:
        authorization = parse_authorization(header)
    except ValueError:
        return "Authorization header is malformed"
    if authorization.access_key != ak:
        return "the access key is unknown"
    sdk_date = headers.get("X-Sdk-Date")
    if not sdk_date:
        return "X-Sdk-Date header is missing"
    try:
        signed_at = _signed_at(sdk_date)
    except ValueError:
        return "X-Sdk-Date header is malformed"
    if abs(now - signed_at) > max_skew_s:
        return "request expired"
    if "X-Security-Token" in headers and "x-security-token" not in authorization.signed_headers:
        return "X-Security-Token is not signed"
    path, _, raw_query = raw_path.partition("?")
    try:
        good = verify(
            method=method,
            path=path,
            query=parse_qsl(raw_query, keep_blank_values=True),
            headers=headers,
            body=body,
            authorization=authorization,
            sk=sk,
        )
    except ValueError:
        good = False
    if not good:
        return "the signature does not match"
    return None
