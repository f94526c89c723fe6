"""One root exception and a small tree that tells transient failures from permanent ones.

aiohttp's exceptions are translated into these in one place (``worker.api.client``); the retry
policy decides by type alone.
"""

from __future__ import annotations

import os
from typing import ClassVar


def file_problem(exc: OSError) -> str:
    """Why a file cannot be opened, in the words every command uses for it: "no such file",
    "is a directory", "permission denied", else the system's own words in lower case; an
    error of ours (``worker.private_files``: "belongs to another user ...") as it says."""
    if exc.strerror and exc.errno is not None and exc.strerror != os.strerror(exc.errno):
        return exc.strerror
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return (exc.strerror or type(exc).__name__).lower()


class ReaperError(Exception):
    """Root of every error this package raises on purpose."""

    stops_at_once: ClassVar[bool] = True
    """When it ends a run: cancel the calls in flight (True), or let them finish within the
    grace period so the outcomes they reach are recorded (False)."""


class ConfigError(ReaperError):
    """Settings are invalid or contradict each other (exit 78)."""


class NotAStream(ConfigError):
    """A key serve reads or writes as a stream, or the fleet's rate keeps beside it, holds
    another type (Redis said ``WRONGTYPE``): someone else's key, left as it is. ``serve``
    pauses unready naming it; ``run`` ends 78."""


class UsageError(ReaperError):
    """The command line asks for something that cannot be done (exit 64)."""


class InputUnreadable(ReaperError):
    """The input file does not exist or cannot be read (exit 66)."""


class ResultsUnwritable(ReaperError):
    """``--results`` could not be written midway: the run stops (exit 75), its outcomes so
    far kept in the ledger and the events. The calls in flight finish first: their jobs are
    deleted either way, and their records must reach the events."""

    stops_at_once = False


class LedgerUnwritable(ReaperError):
    """The ledger (``--ledger``, or the temporary one a run without it spills to past
    100,000 ids) could not be written midway (a full disk): the run stops as on SIGTERM
    (exit 75). An id marked sent before stays sent in the ledger, so the run that resumes
    on it after the disk is freed settles it (found gone: ``deleted``, unconfirmed); one
    whose mark did not go in was not sent. The calls in flight finish first: their jobs
    are deleted either way."""

    stops_at_once = False


class EventsUnwritable(ReaperError):
    """The event stream was closed (``| head``) or filled (a full disk) midway: the run
    stops as on SIGTERM (exit 75). The calls in flight finish first, and their outcomes
    reach the ledger and ``--results``; the events of what is done from then on are lost,
    and the records of deleted jobs are in no other place, so nothing more is sent."""

    stops_at_once = False


class OutcomeConflict(ReaperError):
    """An id was given a second terminal outcome, or one it was never due: a bug in the
    caller, never ignored."""


class ApiError(ReaperError):
    """An API call did not succeed. Carries what the server said, never a secret."""

    stops_at_once = False
    """One call refused (a 401, a gateway's 404, a certificate) says nothing of the DELETEs
    of other batches already on the wire: the API may apply them, so they finish within the
    grace period and their outcomes are recorded. Nothing more is sent."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        error_msg: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.error_code = error_code
        self.error_msg = error_msg
        self.request_id = request_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.args[0]!r}, http_status={self.http_status}, "
            f"error_code={self.error_code!r}, request_id={self.request_id!r})"
        )


class TransientError(ApiError):
    """Worth another attempt: the same request may succeed later."""


class ThrottledError(TransientError):
    """429: the quota is spent. ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ServerError(TransientError):
    """5xx: the server failed; it may or may not have applied the request."""


class NetworkError(TransientError):
    """The connection failed or was reset; the request may or may not have been applied."""


class ApiTimeout(NetworkError):
    """No answer within the connect or read timeout."""


class MalformedResponse(TransientError):
    """The answer was cut short or is not the JSON the API documents."""


class CircuitOpenError(TransientError):
    """Nothing was sent: the API kept failing and the circuit breaker held the call back
    (its probe failed, or the run began to stop while it waited)."""


class PermanentError(ApiError):
    """Sending the same request again cannot help."""


class AuthError(PermanentError):
    """401/403: credentials or permission rejected. Stops the whole run (exit 77)."""


class NotFound(PermanentError):
    """404 from the service: the job does not exist."""


class NoSuchApi(PermanentError):
    """404 from the API gateway (an ``APIGW.*`` code): the call itself does not exist there,
    for a wrong project id, region or endpoint path. No job can be found absent through it,
    so it stops the whole run (exit 78) with every id left open."""


class ClientError(PermanentError):
    """Any other 4xx: the request itself is wrong (an invalid id, too large a batch ...)."""


def another_job(job_id: str, other: str) -> ApiError:
    """The show call of ``job_id`` answered with the record of ``other``: nothing is known of
    ``job_id``, neither that it is there nor that it is gone, and no rule may pass it on
    another job's name, type or status."""
    said = f"the show call of job {job_id} answered with the record of job {other}"
    return ApiError(said, http_status=200, error_msg=said)


class AnswerTooLarge(PermanentError):
    """The answer ran past what the caller reads of it (IAM's project list, a few hundred
    bytes, is read up to a limit): not the answer it asked for."""


class TlsError(PermanentError):
    """The server's certificate was refused. Reported at once, never retried."""


def certificate_fix(of: str, bundle: str | None) -> str:
    """The cure of a certificate of ``of`` refused: its CA given with ``--ca-bundle``, or,
    where a bundle was given (``bundle``: as it was named, and its path), that CA added to
    it: "give its CA with --ca-bundle FILE" said to one who gave it said nothing."""
    if bundle is None:
        return f"give the CA of {of} with --ca-bundle FILE"
    return (f"add the CA that signed the certificate of {of} to {bundle} (PEM), which does "
            f"not hold it, or check that {of} is the host meant (a name the certificate "
            "does not carry is refused too)")  # fmt: skip


class NotTls(TlsError):
    """An ``https://`` endpoint answered in plain HTTP: it does not speak TLS at all."""


AMBIGUOUS: tuple[type[ApiError], ...] = (ServerError, NetworkError, MalformedResponse)
"""Failures after which a DELETE may have been applied: reconcile before trusting them."""


class ApiUnavailable(ReaperError):
    """The API stayed unreachable or unavailable after every retry (exit 69).

    The ids of the batch stay open: nothing is known about them, so a later run finishes them.
    """

    stops_at_once = False
    """The calls of other batches already on the wire finish first (within the grace
    period): a DELETE the API applies is gone either way, and its records must be logged."""

    def __init__(self, cause: ApiError, *, batch_id: str, open_ids: int) -> None:
        super().__init__(f"API unavailable after retries (batch {batch_id}): {cause}")
        self.cause = cause
        self.batch_id = batch_id
        self.open_ids = open_ids
        self.unsure: frozenset[str] = frozenset()
        """Of the open ids: those sent in an attempt without a readable answer, whose jobs
        may be gone by that attempt (set by the dispatcher; ``serve`` keeps them with the
        entry, so its next delivery does not call them absent)."""


class TakenOver(ApiUnavailable):
    """``serve``: a batch not sent, because entries holding its ids are no longer pending
    under this replica (it stalled, unseen, past ``reclaim_after``, and another took them
    over). Their ids are the taker's to send and record; a DELETE from here would find the
    jobs the taker deleted gone and call them ``absent``. Not the API's doing: no endpoint
    is paused for it."""

    def __init__(self, entries: frozenset[str]) -> None:
        super().__init__(ApiError("taken over by another replica"), batch_id="", open_ids=0)
        self.entries = entries
        """The entries taken over: nothing of theirs is written from here."""


class RedisUnavailable(ReaperError):
    """The Redis a run paces through (the rate limit it shares with other processes), or the
    one ``enqueue`` writes to, did not answer at the start (exit 69): nothing was sent.
    ``cause``: the kind of failure (``ConnectionError``, ``TimeoutError`` ...)."""

    def __init__(self, message: str, *, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause


class RedisCertificateRefused(RedisUnavailable):
    """A ``rediss://`` Redis whose TLS certificate was refused (not signed by a CA trusted
    here, or for another host): it answered, and asking again changes nothing."""
