"""The simulator's HTTP face: aiohttp handlers that translate requests to ``Simulator`` calls.

Order of checks for an API call, as a gateway in front of a service would do them:
signature (401), quota (429), project id (404), then the service: validation (400), faults,
the change itself; an answer past the quota check leaves once the drawn latency, counted
from the call's arrival, is over. Every answer carries ``X-Request-Id`` and ``Date``. No per-call
logging: benchmarks push tens of thousands of calls per second through here.
"""

from __future__ import annotations

import email.utils
import functools
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import orjson
from aiohttp import web

from worker.simulator import iam
from worker.simulator.faults import Fault
from worker.simulator.jobs import JOB_TYPES, Job
from worker.simulator.quota import retry_after_seconds
from worker.simulator.state import Simulator
from worker.types import JOB_ID_RE

SIMULATOR_KEY = web.AppKey("simulator", Simulator)

JOBS_PATH = "/v1/{project_id}/dev-servers/jobs"
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000
CREATED_BY = "sim-user"
_FILTERS = ("id", "name", "type", "status", "visible")

# Error codes. The delete call's own codes are not documented; these only have the
# documented shape ({"error_code": "ModelArts.XXXX", "error_msg": ...}).
INVALID_PARAMETER = "ModelArts.0101"
REJECTED_BATCH = "ModelArts.6310"
JOB_NOT_FOUND = "ModelArts.6305"
INTERNAL_ERROR = "ModelArts.0001"
UNAVAILABLE = "APIGW.0202"
AUTH_FAILED = "APIGW.0301"
FORBIDDEN = "APIGW.0302"  # the IAM user is not authorized to access the API
THROTTLED = "APIGW.0308"
NO_SUCH_API = "APIGW.0101"


class _Refused(Exception):
    """A request the service answers with an error; carries the response to send."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


_Self = TypeVar("_Self")
_Method = Callable[[_Self, web.Request], Awaitable[web.Response]]


def _answers_refusals_method(handler: _Method[_Self]) -> _Method[_Self]:
    """Turn a ``_Refused`` raised anywhere in ``handler`` into its response."""

    @functools.wraps(handler)
    async def wrapper(self: _Self, request: web.Request) -> web.Response:
        try:
            return await handler(self, request)
        except _Refused as refused:
            return refused.response

    return wrapper


_ARRIVED = web.RequestKey("arrived", float)  # event-loop time the call reached its handler
_DUE = web.RequestKey("due", float)  # when its answer may leave, if a latency was drawn


def _api_call(handler: _Method[_Api]) -> _Method[_Api]:
    """An API call: refusals become their responses, and the answer leaves no sooner than
    the latency ``_Api._admit`` drew, counted from the call's arrival.

    The call's own work (signature, validation, the change, the answer's body) happens
    inside that time, as on a server whose latency is what its clients measure. Slept on
    top of the work instead, the simulator's CPU per call would be part of every client's
    round trip, and no client could reach the latency ceiling however cheap it was."""
    answer = _answers_refusals_method(handler)

    @functools.wraps(handler)
    async def wrapper(self: _Api, request: web.Request) -> web.Response:
        arrived = request[_ARRIVED] = anyio.current_time()
        response = await answer(self, request)
        due = request.get(_DUE)
        if due is not None:
            wait = due - anyio.current_time()
            if wait > 0:
                await anyio.sleep(wait)
            self.sim.stats.latency_served_s += anyio.current_time() - arrived
        return response

    return wrapper


def _json(sim: Simulator, status: int, payload: Any, **headers: str) -> web.Response:
    """A JSON answer; ``payload`` is serialised unless it is ``bytes`` already."""
    headers["X-Request-Id"] = sim.next_request_id()
    return web.Response(
        status=status,
        body=payload if isinstance(payload, bytes) else orjson.dumps(payload),
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def _number(value: object, kind: type | tuple[type, ...] = (int, float)) -> bool:
    """``value`` is a JSON number of ``kind`` (int, or int or float), not a bool."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _error(sim: Simulator, status: int, code: str, msg: str, **headers: str) -> web.Response:
    if status == 400:
        sim.stats.bad_requests += 1
    return _json(sim, status, {"error_code": code, "error_msg": msg}, **headers)


def _envelope(
    jobs: Sequence[Job], *, current: int = 1, pages: int = 1, total: int | None = None
) -> bytes:
    """The paged answer of the list and delete calls, byte for byte what ``orjson.dumps``
    makes of ``{"current", "data": [records], "pages", "size", "total"}``, but joined from
    each job's ``record_json``: serialising 50 records per call was about a tenth of the
    simulator's CPU per delete call (py-spy), now spent once, when the job is made."""
    size = len(jobs)
    return b"".join((
        b'{"current":%d,"data":[' % current,
        b",".join([job.record_json for job in jobs]),
        b'],"pages":%d,"size":%d,"total":%d}' % (pages, size, size if total is None else total),
    ))  # fmt: skip


def _drop_connection(request: web.Request) -> web.Response:
    """Close the connection without an answer: the client sees a disconnect.

    Writing the returned response to the closed transport fails with a ``ConnectionError``,
    which aiohttp swallows quietly, so nothing is sent and nothing is logged.
    """
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=500)


class _Api:
    """The handlers, bound to one simulator."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def _admit(self, request: web.Request) -> bytes:
        """Gateway checks shared by every API call; returns the body or raises ``_Refused``."""
        sim = self.sim
        config = sim.config
        sim.stats.calls += 1
        body = await request.read()
        reason = sim.signature_refused(request.method, request.raw_path, request.headers, body)
        if reason is not None:
            msg = f"Incorrect IAM authentication information: {reason}"
            raise _Refused(_error(sim, 401, AUTH_FAILED, msg))
        checked = sim.clock()
        wait = sim.bucket.try_acquire(checked)
        sim.arrivals.append((request[_ARRIVED], checked, wait <= 0))
        if wait > 0:
            sim.stats.throttled += 1
            headers: dict[str, str] = {}
            if config.retry_after == "seconds":
                headers["Retry-After"] = str(retry_after_seconds(wait))
            elif config.retry_after == "date":
                when = math.ceil(sim.wall() + wait)
                headers["Retry-After"] = email.utils.formatdate(when, usegmt=True)
            msg = "The throttling threshold has been reached: policy user over ratelimit"
            raise _Refused(_error(sim, 429, THROTTLED, msg, **headers))
        if config.forbidden:
            msg = "The IAM user is not authorized to access the API."
            raise _Refused(_error(sim, 403, FORBIDDEN, msg))
        if request.match_info["project_id"] != config.project_id:
            raise _Refused(_no_such_api(sim))
        delay = sim.faults.latency()
        if delay > 0:  # waited for by ``_api_call``, once the answer is made
            sim.stats.latency_calls += 1
            sim.stats.latency_s += delay
            request[_DUE] = request[_ARRIVED] + delay
        return body

    def _bad(self, msg: str) -> _Refused:
        return _Refused(_error(self.sim, 400, INVALID_PARAMETER, msg))

    # -- DELETE /v1/{project_id}/dev-servers/jobs ---------------------------------------
    async def delete(self, request: web.Request) -> web.Response:
        stats = self.sim.stats
        if stats.first_delete_at is None:
            stats.first_delete_at = self.sim.clock()
        stats.delete_calls += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            return await self._delete(request)
        finally:
            stats.in_flight -= 1
            stats.last_delete_at = self.sim.clock()

    @_api_call
    async def _delete(self, request: web.Request) -> web.Response:
        sim = self.sim
        body = await self._admit(request)
        ids = self._job_ids(body)
        fault = sim.faults.draw()
        if fault is not Fault.NONE:
            sim.stats.faults[fault.value] += 1
        if fault is Fault.ERROR_BEFORE:
            return _error(sim, 500, INTERNAL_ERROR, "Internal server error")
        if fault is Fault.UNAVAILABLE:
            return _error(sim, 503, UNAVAILABLE, "The backend service is unavailable")
        if fault is Fault.RESET_BEFORE:
            return _drop_connection(request)
        removed = sim.store.delete(ids)
        sim.stats.deletions += len(removed)
        if fault is Fault.ERROR_AFTER:
            return _error(sim, 500, INTERNAL_ERROR, "Internal server error")
        if fault is Fault.RESET_AFTER:
            return _drop_connection(request)
        response = _json(sim, 200, _envelope(removed))
        if fault is Fault.TRUNCATED:
            # Same status and Content-Type, body cut mid-JSON; Content-Length follows the cut,
            # so the client reads it all and then fails to decode, instead of hanging.
            full = response.body
            assert isinstance(full, bytes)
            response.body = full[: max(1, len(full) // 2)]
        return response

    def _job_ids(self, body: bytes) -> list[str]:
        """The ``job_ids`` of a DELETE body, or a 400 that names no single id."""
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise self._bad("The request body is not valid JSON") from None
        ids = payload.get("job_ids") if isinstance(payload, dict) else None
        if not isinstance(ids, list):
            raise self._bad("job_ids is required and must be a list")
        if not ids:
            raise self._bad("job_ids must not be empty")
        config = self.sim.config
        if len(ids) > config.max_batch:
            raise self._bad(f"job_ids holds more than {config.max_batch} ids")
        for job_id in ids:
            if not isinstance(job_id, str) or JOB_ID_RE.fullmatch(job_id) is None:
                raise self._bad("job_ids holds an invalid id")
        reject = config.reject_ids
        if reject and not reject.isdisjoint(ids):
            msg = "Some jobs cannot be deleted in their current state"
            raise _Refused(_error(self.sim, 400, REJECTED_BATCH, msg))
        return ids

    # -- GET /v1/{project_id}/dev-servers/jobs ------------------------------------------
    @_api_call
    async def list(self, request: web.Request) -> web.Response:
        sim = self.sim
        sim.stats.list_calls += 1
        await self._admit(request)
        query = request.query
        # Exact matches; a blank value filters nothing, as if the parameter were absent.
        filters = {key: query[key] for key in _FILTERS if query.get(key)}
        offset, limit, current = self._paging(query)
        found = sim.store.query(filters)
        page = found[offset : offset + limit]
        return _json(
            sim,
            200,
            _envelope(
                page,
                current=current,
                pages=max(1, math.ceil(len(found) / limit)),
                total=len(found),
            ),
        )

    def _paging(self, query: Mapping[str, str]) -> tuple[int, int, int]:
        """``current``/``size`` (1-based pages) or ``offset``/``limit``.

        Not in the API reference nor the SDK (which has no paging parameters for this call);
        the envelope's ``current/pages/size/total`` suggest the server pages. Here a page
        holds 500 records unless asked otherwise, so a client that pages can be tested.
        """

        def number(name: str, default: int, low: int, high: int) -> int:
            text = query.get(name)
            if text is None or text == "":
                return default
            try:
                value = int(text)
            except ValueError:
                raise self._bad(f"{name} must be an integer") from None
            if not low <= value <= high:
                raise self._bad(f"{name} must be within {low}..{high}")
            return value

        if "offset" in query or "limit" in query:
            limit = number("limit", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
            offset = number("offset", 0, 0, 2**31)
            return offset, limit, offset // limit + 1
        size = number("size", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        current = number("current", 1, 1, 2**31)
        return (current - 1) * size, size, current

    # -- GET /v1/{project_id}/dev-servers/jobs/{job_id} ---------------------------------
    @_api_call
    async def show(self, request: web.Request) -> web.Response:
        sim = self.sim
        sim.stats.show_calls += 1
        await self._admit(request)
        job = sim.store.jobs.get(request.match_info["job_id"])
        if job is None:
            return _error(sim, 404, JOB_NOT_FOUND, "job not found")
        return _json(sim, 200, job.detail())

    # -- POST /v1/{project_id}/dev-servers/jobs -----------------------------------------
    @_api_call
    async def create(self, request: web.Request) -> web.Response:
        sim = self.sim
        sim.stats.create_calls += 1
        job = self._create(await self._admit(request))
        return _json(sim, 200, job.record())

    def _create(self, body: bytes) -> Job:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise self._bad("The request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise self._bad("The request body must be a JSON object")
        name = payload.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise self._bad("name is required: 1 to 64 characters")
        job_type = payload.get("type", "COMMON")
        if job_type not in JOB_TYPES:
            raise self._bad(f"type must be one of {', '.join(JOB_TYPES)}")
        description = payload.get("description") or ""
        server_ids = payload.get("server_ids") or []
        items = payload.get("items") or []
        if not isinstance(description, str):
            raise self._bad("description must be a string")
        if not isinstance(server_ids, list) or not all(isinstance(s, str) for s in server_ids):
            raise self._bad("server_ids must be a list of strings")
        if not isinstance(items, list):
            raise self._bad("items must be a list")
        if not isinstance(payload.get("is_reboot", False), bool):
            raise self._bad("is_reboot must be a boolean")
        return self.sim.store.create(
            name=name,
            description=description,
            job_type=job_type,
            server_ids=server_ids,
            items=items,
            user_name=CREATED_BY,
            now_ms=int(self.sim.wall() * 1000),
        )


_NOT_FOUND_PAGE = "<html><head><title>404 Not Found</title></head><body>Not Found</body></html>"


def _no_such_api(sim: Simulator) -> web.Response:
    msg = "The API does not exist or has not been published in the environment"
    return _error(sim, 404, NO_SUCH_API, msg)


class _Control:
    """Test-only endpoints under ``/_sim/``: no signature, no quota, not counted in calls."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def _bad(self, msg: str) -> _Refused:
        return _Refused(_error(self.sim, 400, INVALID_PARAMETER, msg))

    async def _object(self, request: web.Request) -> dict[str, Any]:
        try:
            payload = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            raise self._bad("not JSON") from None
        if not isinstance(payload, dict):
            raise self._bad("not a JSON object")
        return payload

    async def stats(self, request: web.Request) -> web.Response:
        sim = self.sim
        out = sim.stats.as_dict()
        out["deleted"] = len(sim.deleted)
        out["jobs"] = len(sim.store.jobs)
        out["quota"] = sim.config.quota
        out["burst"] = sim.config.burst
        out["window_s"] = sim.config.window_s
        out["window_kind"] = sim.config.window_kind
        return _json(sim, 200, out)

    async def deleted(self, request: web.Request) -> web.Response:
        ids = sorted(self.sim.deleted)
        return _json(self.sim, 200, {"ids": ids, "count": len(ids)})

    async def jobs(self, request: web.Request) -> web.Response:
        ids = self.sim.job_ids()
        return _json(self.sim, 200, {"ids": ids, "count": len(ids)})

    @_answers_refusals_method
    async def add_jobs(self, request: web.Request) -> web.Response:
        """``{"count": n, ...fields}``: ``fields`` pin job fields such as ``status``."""
        payload = await self._object(request)
        count = payload.pop("count", 0)
        if not _number(count, int) or count < 0:
            raise self._bad("count must be an integer >= 0")
        try:
            ids = self.sim.add_jobs(count, **payload)
        except TypeError as exc:
            raise self._bad(str(exc)) from None
        return _json(self.sim, 200, {"ids": ids, "count": len(ids)})

    @_answers_refusals_method
    async def quota(self, request: web.Request) -> web.Response:
        """``{"quota": q, "burst": b}``: a new, full bucket (or window count) at once."""
        payload = await self._object(request)
        quota = payload.get("quota", 0)
        burst = payload.get("burst")
        # JSON's true is Python's 1: a bool is no number here, not a quota of 1 call/s.
        if not _number(quota) or not 0 <= quota < math.inf:
            raise self._bad("quota must be a number >= 0 (calls/s)")
        if burst is not None and (not _number(burst, int) or burst < 1):
            raise self._bad("burst must be an integer >= 1")
        try:
            self.sim.set_quota(float(quota), burst)
        except ValueError as exc:  # a window that cannot count it (the simulator's window)
            raise self._bad(str(exc)) from None
        config = self.sim.config
        return _json(self.sim, 200, {"quota": config.quota, "burst": config.burst})

    async def arrivals(self, request: web.Request) -> web.Response:
        """The gateway's view of the calls since the last read (the read takes them): when
        each reached its handler and when its quota was checked (the simulator's monotonic
        clock, the same as a client's on this host), and whether it was accepted."""
        taken = self.sim.take_arrivals()
        return _json(self.sim, 200, {
            "arrived": [a for a, _, _ in taken],
            "checked": [c for _, c, _ in taken],
            "accepted": [ok for _, _, ok in taken],
        })  # fmt: skip

    @_answers_refusals_method
    async def status(self, request: web.Request) -> web.Response:
        """``{"id": ..., "status": ...}``: change one job's status (plan tests)."""
        payload = await self._object(request)
        job_id, status = payload.get("id"), payload.get("status")
        if not isinstance(job_id, str) or not isinstance(status, str):
            raise self._bad("id and status are needed")
        if job_id not in self.sim.store.jobs:
            return _error(self.sim, 404, JOB_NOT_FOUND, "job not found")
        self.sim.set_status(job_id, status)
        return _json(self.sim, 200, self.sim.store.jobs[job_id].record())


def build_app(sim: Simulator) -> web.Application:
    """The aiohttp application serving ``sim``: the four job calls, IAM's project list
    (``worker.simulator.iam``) and ``/_sim/`` controls."""
    app = web.Application()
    app[SIMULATOR_KEY] = sim
    api = _Api(sim)
    control = _Control(sim)

    async def unknown(request: web.Request) -> web.Response:
        if sim.config.unknown_path == "html":  # a web server's page: no error code at all
            return web.Response(status=404, text=_NOT_FOUND_PAGE, content_type="text/html")
        return _no_such_api(sim)

    router = app.router
    router.add_route("DELETE", JOBS_PATH, api.delete)
    router.add_get(JOBS_PATH, api.list, allow_head=False)
    router.add_post(JOBS_PATH, api.create)
    router.add_get(JOBS_PATH + "/{job_id}", api.show, allow_head=False)
    router.add_get(iam.PROJECTS_PATH, iam.list_projects, allow_head=False)
    router.add_get("/_sim/stats", control.stats, allow_head=False)
    router.add_get("/_sim/deleted", control.deleted, allow_head=False)
    router.add_get("/_sim/jobs", control.jobs, allow_head=False)
    router.add_get("/_sim/arrivals", control.arrivals, allow_head=False)
    router.add_post("/_sim/jobs", control.add_jobs)
    router.add_post("/_sim/quota", control.quota)
    router.add_post("/_sim/status", control.status)
    router.add_route("*", "/{tail:.*}", unknown)
    return app
