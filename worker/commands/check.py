"""``devserver-reaper check``: one signed read-only call; deletes nothing.

Says whether the endpoint answers, whether the credentials are accepted, and how far the
local clock is from the server's (a request more than 15 minutes off is rejected).
"""

from __future__ import annotations

import argparse
import sys

import anyio

from worker.api.client import ApiClient
from worker.api.projects import ProjectLookupFailed
from worker.errors import ApiError, AuthError, ConfigError, NoSuchApi, NotTls, TlsError
from worker.exit_codes import ExitCode
from worker.settings import Settings

SKEW_WARNING_S = 300.0


def main(args: argparse.Namespace, settings: Settings) -> int:
    from worker.terminal.output import for_people_on

    # The report is stdout's; events (which credential source answered, a warning) go to
    # stderr, so they never land in the middle of it.
    for_people_on(sys.stderr, log_format=settings.log_format, log_level=settings.log_level)
    try:
        settings.require_api()
        return anyio.run(check, settings)
    except ConfigError as exc:  # settings, or a CA bundle the session cannot load
        print(f"devserver-reaper check: {exc}", file=sys.stderr)
        return ExitCode.CONFIG


async def check(settings: Settings) -> int:
    from worker import wiring

    out = sys.stdout
    endpoint = settings.api_endpoint
    async with wiring.session(settings, concurrency=1) as session:
        try:
            credentials = await wiring.credentials(settings, session)
            choice = await wiring.resolve_project(settings, session, credentials)
        except ProjectLookupFailed as exc:  # the keys are fine; IAM could not say the project
            heading, code = _lookup_failed(exc)
            out.write(f"result       {heading}: {exc}\nfix          {exc.fix}\n")
            return code
        except ConfigError as exc:
            out.write(f"result       NOT CONFIGURED: {exc}\n")
            return ExitCode.CONFIG
        except AuthError as exc:
            out.write(f"result       CREDENTIALS REFUSED: {_describe(exc)}\n")
            return ExitCode.NO_PERMISSION
        except ApiError as exc:
            out.write(f"result       CREDENTIALS UNAVAILABLE: {_describe(exc)}\n")
            return ExitCode.UNAVAILABLE
        keys = await credentials.current()
        out.write(f"endpoint     {endpoint}\n")
        out.write(f"project      {choice.project_id} (from {choice.source})\n")
        out.write(f"credentials  {credentials.name} (access key {_mask(keys.ak)})\n")
        client = ApiClient(
            session=session, endpoint=endpoint, project_id=choice.project_id,
            credentials=credentials,
        )  # fmt: skip
        try:
            probe = await client.probe()
        except AuthError as exc:
            out.write(f"result       REJECTED: {_describe(exc)}\n")
            return ExitCode.NO_PERMISSION
        except NoSuchApi as exc:
            out.write(f"result       NO SUCH API: {_describe(exc)}\n")
            return ExitCode.CONFIG
        except NotTls as exc:
            out.write(f"result       NOT TLS: {exc}\n")
            return ExitCode.UNAVAILABLE
        except TlsError as exc:
            out.write(f"result       TLS REFUSED: {exc}\n")
            return ExitCode.UNAVAILABLE
        except ApiError as exc:
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


def _lookup_failed(exc: ProjectLookupFailed) -> tuple[str, int]:
    """What ``check`` calls a failed look-up of the project in IAM, and its exit code."""
    if isinstance(exc, ConfigError):
        return "PROJECT NOT FOUND", ExitCode.CONFIG
    if isinstance(exc, AuthError):
        return "IAM REFUSED", ExitCode.NO_PERMISSION
    return "IAM UNREACHABLE", ExitCode.UNAVAILABLE


def _mask(ak: str) -> str:
    """An access key is not secret, but show only enough of it to recognise it."""
    return ak[:4] + "…" if len(ak) > 4 else "…"


def _describe(exc: ApiError) -> str:
    """What the API said, each part once: ``HTTP 401 APIGW.0301: <its message>`` and the
    request id on a line of its own (to quote to support), then the usual fix."""
    from worker.terminal.failure import fix_for

    if exc.http_status is not None:
        said = " ".join(str(part) for part in (exc.http_status, exc.error_code) if part)
        text = f"HTTP {said}: {exc.error_msg or 'no message'}"
    else:
        text = str(exc)
    if exc.request_id:
        text += f"\nrequest id   {exc.request_id}"
    fix = fix_for(exc, "check")
    return text + (f"\nfix          {fix}" if fix else "")
