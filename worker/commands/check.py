"""``devserver-reaper check``: one signed read-only call; deletes nothing.

Says whether the endpoint answers, whether the credentials are accepted, and how far the
local clock is from the server's (a request more than 15 minutes off is rejected).
"""

from __future__ import annotations

import argparse
import sys

import anyio

from worker.errors import ApiError, AuthError, ConfigError, NetworkError, TlsError
from worker.exit_codes import ExitCode
from worker.settings import Settings

SKEW_WARNING_S = 300.0


def main(args: argparse.Namespace, settings: Settings) -> int:
    try:
        settings.require_api()
    except ConfigError as exc:
        print(f"devserver-reaper check: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    return anyio.run(check, settings)


async def check(settings: Settings) -> int:
    from worker.client import ApiClient, make_session
    from worker.credentials import Credentials, StaticCredentials

    endpoint = settings.api_endpoint
    credentials = StaticCredentials(
        Credentials(
            ak=settings.ak or "",
            sk=settings.sk.get_secret_value() if settings.sk else "",
            security_token=(
                settings.security_token.get_secret_value() if settings.security_token else None
            ),
        )
    )
    out = sys.stdout
    out.write(f"endpoint     {endpoint}\nproject      {settings.project_id}\n")
    out.write(f"credentials  {credentials.name} (access key {_mask(settings.ak or '')})\n")
    async with make_session(
        concurrency=1,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        ca_bundle=settings.ca_bundle,
    ) as session:
        client = ApiClient(
            session=session,
            endpoint=endpoint,
            project_id=settings.project_id or "",
            credentials=credentials,
        )
        try:
            probe = await client.probe()
        except AuthError as exc:
            out.write(f"result       REJECTED: {_describe(exc)}\n")
            return ExitCode.NO_PERMISSION
        except TlsError as exc:
            out.write(f"result       TLS REFUSED: {exc}\n")
            return ExitCode.UNAVAILABLE
        except (NetworkError, ApiError) as exc:
            out.write(f"result       UNREACHABLE: {_describe(exc)}\n")
            return ExitCode.UNAVAILABLE
    out.write(f"result       OK (HTTP {probe.http_status}, request id {probe.request_id})\n")
    if probe.skew_s is None:
        out.write("clock skew   unknown (no Date header)\n")
    else:
        note = ""
        if abs(probe.skew_s) > SKEW_WARNING_S:
            note = "  WARNING: requests more than 15 min off are rejected; fix the clock"
        out.write(f"clock skew   {probe.skew_s:+.1f}s (server minus local){note}\n")
    return ExitCode.OK


def _mask(ak: str) -> str:
    """An access key is not secret, but show only enough of it to recognise it."""
    return ak[:4] + "…" if len(ak) > 4 else "…"


def _describe(exc: ApiError) -> str:
    parts = [str(exc)]
    if exc.http_status:
        parts.append(f"HTTP {exc.http_status}")
    if exc.error_code:
        parts.append(exc.error_code)
    if exc.request_id:
        parts.append(f"request id {exc.request_id}")
    return "; ".join(parts)
