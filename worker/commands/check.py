"""``devserver-reaper check``: one signed read-only call; deletes nothing.

Says whether the endpoint answers, whether the credentials are accepted, and how far the
local clock is from the server's (a request more than 15 minutes off is rejected).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import anyio

from worker.api.client import ApiClient
from worker.api.projects import IamNotThere, ProjectAmbiguous, ProjectLookupFailed
from worker.errors import (
    ApiError,
    AuthError,
    ConfigError,
    NoSuchApi,
    NotTls,
    ReaperError,
    TlsError,
)
from worker.exit_codes import ExitCode
from worker.settings import Settings
from worker.stdio import Report
from worker.stops import cancelled_on_stop

SKEW_WARNING_S = 300.0

Failures = tuple[tuple[type[ReaperError], str, ExitCode], ...]
"""What ``check`` says when a step fails: a kind of error, its heading, its exit code; the
first kind that matches wins."""

LOOKUP_FAILED: Failures = (
    (IamNotThere, "NOT IAM", ExitCode.CONFIG),  # what answered is not IAM's project list
    (ProjectAmbiguous, "PROJECT AMBIGUOUS", ExitCode.CONFIG),  # two or more of that name
    (ConfigError, "PROJECT NOT FOUND", ExitCode.CONFIG),
    (AuthError, "IAM REFUSED", ExitCode.NO_PERMISSION),
    (ReaperError, "IAM UNREACHABLE", ExitCode.UNAVAILABLE),
)
"""The project of a region, looked up in IAM: the keys are fine, IAM could not say it."""

CREDENTIALS_FAILED: Failures = (
    (ConfigError, "NOT CONFIGURED", ExitCode.CONFIG),
    (AuthError, "CREDENTIALS REFUSED", ExitCode.NO_PERMISSION),
    (ApiError, "CREDENTIALS UNAVAILABLE", ExitCode.UNAVAILABLE),
)

PROBE_FAILED: Failures = (
    (AuthError, "REJECTED", ExitCode.NO_PERMISSION),
    (NoSuchApi, "NO SUCH API", ExitCode.CONFIG),
    (NotTls, "NOT TLS", ExitCode.UNAVAILABLE),
    (TlsError, "TLS REFUSED", ExitCode.UNAVAILABLE),
    (ApiError, "UNREACHABLE", ExitCode.UNAVAILABLE),
)


def main(args: argparse.Namespace, settings: Settings) -> int:
    from worker.terminal.failure import refused
    from worker.terminal.output import for_people_on

    # The report is stdout's; events (which credential source answered, a warning) go to
    # stderr, so they never land in the middle of it.
    for_people_on(sys.stderr, log_format=settings.log_format, log_level=settings.log_level)
    try:
        settings.require_api()
        out = Report("check")
        try:
            return anyio.run(cancelled_on_stop, partial(check, settings, out), _stopped)
        finally:
            out.close()
    except ConfigError as exc:  # settings, or a CA bundle the session cannot load
        return refused("check", exc)


async def check(settings: Settings, out: Report) -> int:
    from worker import wiring

    endpoint = settings.api_endpoint
    async with wiring.session(settings, concurrency=1) as session:
        try:
            credentials = await wiring.credentials(settings, session)
            choice = await wiring.resolve_project(settings, session, credentials)
        except ProjectLookupFailed as exc:  # the keys are fine; IAM could not say the project
            return _result(out, exc, LOOKUP_FAILED, f"{exc}\nfix          {exc.fix}")
        except (ConfigError, ApiError) as exc:
            return _result(out, exc, CREDENTIALS_FAILED)
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
        except ApiError as exc:
            return _result(out, exc, PROBE_FAILED)
    out.write(f"result       OK (HTTP {probe.http_status}, request id {probe.request_id})\n")
    if probe.skew_s is None:
        out.write("clock skew   unknown (no Date header)\n")
    else:
        note = ""
        if abs(probe.skew_s) > SKEW_WARNING_S:
            note = "  WARNING: requests more than 15 min off are rejected; fix the clock"
        out.write(f"clock skew   {probe.skew_s:+.1f}s (server minus local){note}\n")
    return ExitCode.OK


def _stopped(signal: str) -> None:
    """A stop said on stderr (the report is stdout's): a check changes nothing either way."""
    sys.stderr.write(f"devserver-reaper check: stopped by {signal} before the check was "
                     "done; nothing was changed\n")  # fmt: skip


def _result(out: Report, exc: ReaperError, table: Failures, text: str | None = None) -> int:
    """The ``result`` row for ``exc``: the heading of its first kind in ``table``, then
    ``text`` (by default :func:`_describe`'s); return the exit code of that kind."""
    heading, code = next((h, c) for kind, h, c in table if isinstance(exc, kind))
    out.write(f"result       {heading}: {_describe(exc) if text is None else text}\n")
    return code


def _mask(ak: str) -> str:
    """An access key is not secret, but show only enough of it to recognise it."""
    return ak[:4] + "…" if len(ak) > 4 else "…"


def _describe(exc: ReaperError) -> str:
    """What the API said, each part once: ``HTTP 401 APIGW.0301: <its message>`` and the
    request id on a line of its own (to quote to support), then the usual fix. A TLS error,
    or one of the settings, says it all in its own words."""
    from worker.terminal.failure import fix_for

    if not isinstance(exc, ApiError) or isinstance(exc, TlsError):
        return str(exc)
    if exc.http_status is not None:
        said = " ".join(str(part) for part in (exc.http_status, exc.error_code) if part)
        text = f"HTTP {said}: {exc.error_msg or 'no message'}"
    else:
        text = str(exc)
    if exc.request_id:
        text += f"\nrequest id   {exc.request_id}"
    fix = fix_for(exc, "check")
    return text + (f"\nfix          {fix}" if fix else "")
