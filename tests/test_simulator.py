"""The built-in ModelArts DevServer jobs simulator, over real HTTP on loopback.

Every other test and every benchmark trusts what this server says, so these tests pin its
contract: signing is checked like the gateway does, the quota answers 429 with Retry-After,
bad batches are refused whole, deletes apply at most once, and each fault is what it claims.
"""

from __future__ import annotations

import email.utils
import math
import re
import signal
import sys
import types
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
import yarl
from multidict import CIMultiDict

from worker.api.signer import sign
from worker.simulator import (
    FAULT_KINDS,
    JOB_STATUSES,
    JOB_TYPES,
    JOBS_EPOCH_MS,
    Fault,
    FaultConfig,
    Simulator,
    SimulatorConfig,
    run_simulator,
)
from worker.simulator.faults import FaultPlan
from worker.simulator.quota import TokenBucket, WindowCount, retry_after_seconds

PROJECT = "demo-project"
JOBS = f"/v1/{PROJECT}/dev-servers/jobs"
JSON = {"Content-Type": "application/json;charset=utf-8"}
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class FakeTime:
    """A monotonic clock and a wall clock that move only when told."""

    def __init__(self, wall: datetime = NOW) -> None:
        self.mono = 1000.0
        self.epoch = wall.timestamp()

    def clock(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.epoch

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.epoch += seconds


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # force_close: a fresh connection per call, so aiohttp never silently resends a DELETE
    # after a dropped keep-alive connection and each fault is seen exactly as served.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


async def call(
    session: aiohttp.ClientSession,
    sim: Simulator,
    method: str,
    path: str,
    *,
    payload: Any = None,
    body: bytes | None = None,
    query: Iterable[tuple[str, str]] = (),
    ak: str = "DEMOAK",
    sk: str = "demo-secret-key",
    when: datetime | None = None,
    headers: dict[str, str] | None = None,
    security_token: str | None = None,
    sent_body: bytes | None = None,
) -> Answer:
    """One request signed with ``worker.api.signer.sign``; ``sent_body`` tampers after signing."""
    if body is None:
        body = b"" if payload is None else orjson.dumps(payload)
    host = yarl.URL(sim.url).raw_authority
    signed = sign(
        method=method,
        host=host,
        path=path,
        query=list(query),
        headers={**JSON, **(headers or {})} if body else dict(headers or {}),
        body=body,
        ak=ak,
        sk=sk,
        when=when or datetime.now(UTC),
        security_token=security_token,
    )
    url = yarl.URL(sim.url + path + (f"?{signed.query}" if signed.query else ""), encoded=True)
    data = body if sent_body is None else sent_body
    async with session.request(method, url, data=data or None, headers=signed.headers) as r:
        return Answer(r.status, CIMultiDict(r.headers), await r.read())


async def delete(session: aiohttp.ClientSession, sim: Simulator, ids: list[str]) -> Answer:
    return await call(session, sim, "DELETE", JOBS, payload={"job_ids": ids})


# -- signed calls and the delete contract ------------------------------------------------


@pytest.mark.anyio
async def test_delete_removes_exactly_the_existing_ids_and_reports_only_those(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=10)) as sim:
        ids = sim.job_ids()
        first = await delete(session, sim, ids[:2])
        assert first.status == 200
        wanted = [*ids[2:5], "never-existed", ids[0], ids[3]]  # a stranger, a gone one, a repeat
        answer = await delete(session, sim, wanted)
        assert answer.status == 200
        body = answer.json()
        assert [record["id"] for record in body["data"]] == ids[2:5]
        assert (body["current"], body["pages"], body["size"], body["total"]) == (1, 1, 3, 3)
        record = body["data"][0]
        assert set(record) == {
            "id", "name", "user_name", "description", "type", "status", "abnormal_count",
            "create_at", "update_at",
        }  # fmt: skip
        assert isinstance(record["create_at"], int)
        assert isinstance(record["abnormal_count"], int)
        assert sim.deleted == set(ids[:5])
        assert sim.delete_counts == dict.fromkeys(ids[:5], 1)
        assert sim.job_ids() == ids[5:]
        assert sim.stats.deletions == 5
        assert sim.stats.delete_calls == 2


@pytest.mark.anyio
async def test_every_answer_has_a_unique_request_id_and_a_date(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        answers = [
            await call(session, sim, "GET", JOBS),
            await call(session, sim, "GET", f"{JOBS}/nope"),
            await call(session, sim, "GET", JOBS, sk="wrong"),
            await call(session, sim, "GET", "/v1/other/unknown"),
        ]
        async with session.get(sim.url + "/_sim/stats") as r:
            answers.append(Answer(r.status, CIMultiDict(r.headers), await r.read()))
        assert [a.status for a in answers] == [200, 404, 401, 404, 200]
        request_ids = [a.headers["X-Request-Id"] for a in answers]
        assert all(request_ids)
        assert len(set(request_ids)) == len(request_ids)
        for answer in answers:
            assert email.utils.parsedate_to_datetime(answer.headers["Date"]).year >= 2024
            assert answer.headers["Content-Type"].startswith("application/json")


@pytest.mark.anyio
async def test_a_request_signed_by_the_official_sdk_is_accepted(
    session: aiohttp.ClientSession,
) -> None:
    from huaweicloudsdkcore.sdk_request import SdkRequest
    from huaweicloudsdkcore.signer.signer import Signer

    async with run_simulator(SimulatorConfig(jobs=4)) as sim:
        ids = sim.job_ids()
        host = yarl.URL(sim.url).raw_authority
        body = orjson.dumps({"job_ids": ids[:2]})
        request = SdkRequest(
            method="DELETE",
            schema="http",
            host=host,
            resource_path=JOBS,
            query_params=[],
            header_params={**JSON, "X-Project-Id": PROJECT},
            body=body,
        )
        Signer(types.SimpleNamespace(ak="DEMOAK", sk="demo-secret-key")).sign(request)
        async with session.delete(sim.url + JOBS, data=body, headers=request.header_params) as r:
            assert r.status == 200, await r.text()
            data = (await r.json())["data"]
        assert [record["id"] for record in data] == ids[:2]

        listing = SdkRequest(
            method="GET",
            schema="http",
            host=host,
            resource_path=JOBS,
            query_params=[("status", "FINISHED"), ("name", "a b/c")],
            header_params={"X-Project-Id": PROJECT},
            body="",
        )
        Signer(types.SimpleNamespace(ak="DEMOAK", sk="demo-secret-key")).sign(listing)
        url = yarl.URL(sim.url + listing.uri, encoded=True)
        async with session.get(url, headers=listing.header_params) as r:
            assert r.status == 200, await r.text()
        assert sim.stats.signature_failures == 0


@pytest.mark.anyio
async def test_query_parameters_take_part_in_the_signature(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        job_id = sim.job_ids()[0]
        ok = await call(session, sim, "GET", JOBS, query=[("id", job_id), ("name", "x y&z")])
        assert ok.status == 200
        host = yarl.URL(sim.url).raw_authority
        signed = sign(
            method="GET",
            host=host,
            path=JOBS,
            query=[("id", job_id)],
            headers={},
            body=b"",
            ak="DEMOAK",
            sk="demo-secret-key",
            when=datetime.now(UTC),
        )
        url = yarl.URL(f"{sim.url}{JOBS}?id=other", encoded=True)
        async with session.get(url, headers=signed.headers) as r:
            assert r.status == 401


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        ("wrong sk", {"sk": "not-the-secret"}),
        ("unknown ak", {"ak": "SOMEONEELSE"}),
        ("tampered body", {"sent_body": b'{"job_ids": ["a", "b"]}'}),
        # Offsets, not instants: collection can happen minutes before the test runs.
        ("stale date", {"when": -timedelta(minutes=16)}),
        ("future date", {"when": timedelta(minutes=16)}),
    ],
)
async def test_bad_signatures_get_401_and_change_nothing(
    session: aiohttp.ClientSession, case: str, kwargs: dict[str, Any]
) -> None:
    async with run_simulator(SimulatorConfig(jobs=3, sk="s3cret-sim-key")) as sim:
        ids = sim.job_ids()
        kwargs.setdefault("sk", "s3cret-sim-key")
        if isinstance(kwargs.get("when"), timedelta):
            kwargs = {**kwargs, "when": datetime.now(UTC) + kwargs["when"]}
        answer = await call(session, sim, "DELETE", JOBS, payload={"job_ids": ids}, **kwargs)
        assert answer.status == 401, case
        body = answer.json()
        assert body["error_code"] == "APIGW.0301"
        assert body["error_msg"].startswith("Incorrect IAM authentication information")
        assert "s3cret-sim-key" not in answer.body.decode()
        if "date" in case:
            assert "request expired" in body["error_msg"]
        assert sim.job_ids() == ids
        assert sim.stats.signature_failures == 1


@pytest.mark.anyio
async def test_missing_or_foreign_authorization_gets_401(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=1)) as sim:
        async with session.get(sim.url + JOBS) as r:
            assert r.status == 401
            assert (await r.json())["error_code"] == "APIGW.0301"
        headers = {
            "Authorization": "AWS4-HMAC-SHA256 Credential=x",
            "X-Sdk-Date": "20260101T000000Z",
        }
        async with session.get(sim.url + JOBS, headers=headers) as r:
            assert r.status == 401
        assert sim.stats.signature_failures == 2


@pytest.mark.anyio
async def test_security_token_is_accepted_only_when_signed(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=2)) as sim:
        signed = await call(session, sim, "GET", JOBS, security_token="temporary-token")
        assert signed.status == 200
        host = yarl.URL(sim.url).raw_authority
        plain = sign(method="GET", host=host, path=JOBS, headers={}, body=b"", ak="DEMOAK",
                     sk="demo-secret-key", when=datetime.now(UTC))  # fmt: skip
        headers = {**plain.headers, "X-Security-Token": "slipped-in"}
        async with session.get(sim.url + JOBS, headers=headers) as r:
            assert r.status == 401


@pytest.mark.anyio
async def test_without_signature_checking_unsigned_calls_are_served(
    session: aiohttp.ClientSession,
) -> None:
    async with (
        run_simulator(SimulatorConfig(jobs=2, check_signature=False)) as sim,
        session.get(sim.url + JOBS) as r,
    ):
        assert r.status == 200
        assert (await r.json())["total"] == 2


@pytest.mark.anyio
async def test_another_project_or_path_is_a_gateway_404(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=2)) as sim:
        ids = sim.job_ids()
        other = await call(
            session, sim, "DELETE", "/v1/other-project/dev-servers/jobs", payload={"job_ids": ids}
        )
        assert other.status == 404
        assert other.json()["error_code"] == "APIGW.0101"
        assert sim.job_ids() == ids
        unknown = await call(session, sim, "GET", f"/v2/{PROJECT}/whatever")
        assert unknown.status == 404
        assert unknown.json()["error_code"] == "APIGW.0101"


# -- quota -------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["seconds", "date", "off"])
async def test_quota_answers_429_with_retry_after_per_mode(
    session: aiohttp.ClientSession, mode: str
) -> None:
    """Burst 2 at 0.25 calls/s: the third call waits 4 s for its token, on a scripted clock."""
    time = FakeTime()
    config = SimulatorConfig(jobs=1, quota=0.25, burst=2, retry_after=mode)  # type: ignore[arg-type]
    async with run_simulator(config, clock=time.clock, wall=time.wall) as sim:
        statuses = [(await call(session, sim, "GET", JOBS, when=NOW)).status for _ in range(2)]
        assert statuses == [200, 200]
        refused = await call(session, sim, "GET", JOBS, when=NOW)
        assert refused.status == 429
        assert refused.json()["error_code"] == "APIGW.0308"
        header = refused.headers.get("Retry-After")
        if mode == "seconds":
            assert header == "4"
        elif mode == "date":
            assert header is not None
            assert email.utils.parsedate_to_datetime(header) == NOW + timedelta(seconds=4)
        else:
            assert header is None
        time.advance(3.0)
        assert (await call(session, sim, "GET", JOBS, when=NOW)).status == 429
        time.advance(1.0)
        assert (await call(session, sim, "GET", JOBS, when=NOW)).status == 200
        assert sim.stats.throttled == 2
        assert sim.stats.calls == 5


@pytest.mark.anyio
async def test_quota_counts_every_call_and_a_throttled_delete_applies_nothing(
    session: aiohttp.ClientSession,
) -> None:
    time = FakeTime()
    config = SimulatorConfig(jobs=3, quota=1, burst=1)
    async with run_simulator(config, clock=time.clock, wall=time.wall) as sim:
        ids = sim.job_ids()
        assert (await call(session, sim, "GET", f"{JOBS}/{ids[0]}", when=NOW)).status == 200
        refused = await call(session, sim, "DELETE", JOBS, payload={"job_ids": ids}, when=NOW)
        assert refused.status == 429
        assert refused.headers["Retry-After"] == "1"
        assert sim.job_ids() == ids


@pytest.mark.anyio
async def test_control_endpoint_changes_the_quota_at_once(
    session: aiohttp.ClientSession,
) -> None:
    time = FakeTime()
    async with run_simulator(SimulatorConfig(jobs=1), clock=time.clock, wall=time.wall) as sim:
        for _ in range(5):
            assert (await call(session, sim, "GET", JOBS, when=NOW)).status == 200
        async with session.post(sim.url + "/_sim/quota", json={"quota": 2, "burst": 3}) as r:
            assert r.status == 200
            assert await r.json() == {"quota": 2.0, "burst": 3}
        statuses = [(await call(session, sim, "GET", JOBS, when=NOW)).status for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        sim.set_quota(0)
        assert (await call(session, sim, "GET", JOBS, when=NOW)).status == 200


@pytest.mark.anyio
async def test_control_endpoint_refuses_a_quota_or_burst_that_is_not_a_number(
    session: aiohttp.ClientSession,
) -> None:
    """``{"quota": true}`` was taken as 1.0 call/s (JSON's true is Python's 1) and
    ``{"burst": true}`` as a burst of 1: each is a 400 naming the field, the quota unchanged."""
    async with run_simulator(SimulatorConfig(jobs=1, quota=5, burst=2)) as sim:
        for body, field in [
            ({"quota": True}, "quota"),
            ({"quota": False}, "quota"),
            ({"quota": "2"}, "quota"),
            ({"quota": None}, "quota"),
            ({"quota": 2, "burst": True}, "burst"),
            ({"quota": 2, "burst": 2.0}, "burst"),
        ]:
            async with session.post(sim.url + "/_sim/quota", json=body) as r:
                assert r.status == 400, body
                assert field in (await r.json())["error_msg"], body
        assert (sim.config.quota, sim.config.burst) == (5.0, 2)


@pytest.mark.anyio
async def test_arrivals_say_when_each_call_met_the_quota_and_whether_it_passed(
    session: aiohttp.ClientSession,
) -> None:
    time = FakeTime()
    config = SimulatorConfig(jobs=1, quota=1, burst=1)
    async with run_simulator(config, clock=time.clock, wall=time.wall) as sim:
        assert (await call(session, sim, "GET", JOBS, when=NOW)).status == 200
        time.advance(0.5)
        assert (await call(session, sim, "GET", JOBS, when=NOW)).status == 429
        time.advance(0.5)
        assert (await call(session, sim, "GET", JOBS, when=NOW)).status == 200
        async with session.get(sim.url + "/_sim/arrivals") as r:
            seen = await r.json()
        assert seen["checked"] == [1000.0, 1000.5, 1001.0]  # the gateway's clock
        assert seen["accepted"] == [True, False, True]
        assert len(seen["arrived"]) == 3  # the handler's own (event-loop) time
        async with session.get(sim.url + "/_sim/arrivals") as r:
            assert await r.json() == {"arrived": [], "checked": [], "accepted": []}  # taken


@pytest.mark.anyio
@pytest.mark.parametrize(("kind", "then"), [("fixed", 5), ("sliding", 1)])
async def test_a_window_count_answers_429_to_the_windows_end(
    session: aiohttp.ClientSession, kind: str, then: int
) -> None:
    """``--quota 0.5 --window 10``: 5 calls a window of 10 s over HTTP, on a scripted
    clock, one each 0.5 s from the window's start. The sixth, 3 s in, waits 7 s: to the
    window's end (fixed), or until the first call counted leaves it (sliding). Then a fixed
    window takes 5 again at once; a sliding one 1 (the next leaves 0.5 s later)."""
    time = FakeTime()
    config = SimulatorConfig(jobs=1, quota=0.5, window_s=10.0, window_kind=kind)  # type: ignore[arg-type]
    async with run_simulator(config, clock=time.clock, wall=time.wall) as sim:
        for _ in range(5):
            assert (await call(session, sim, "GET", JOBS, when=NOW)).status == 200
            time.advance(0.5)
        time.advance(0.5)  # 3 s in
        refused = await call(session, sim, "GET", JOBS, when=NOW)
        assert refused.status == 429
        assert refused.headers["Retry-After"] == "7"
        time.advance(6.999)
        assert (await call(session, sim, "GET", JOBS, when=NOW)).status == 429
        time.advance(0.001)
        statuses = [(await call(session, sim, "GET", JOBS, when=NOW)).status for _ in range(6)]
        assert statuses == [200] * then + [429] * (6 - then)
        async with session.get(sim.url + "/_sim/stats") as r:
            stats = await r.json()
        assert (stats["window_s"], stats["window_kind"]) == (10.0, kind)


def test_window_count_known_answers() -> None:
    """As ``tests.fakes.FixedWindow`` and ``SlidingWindow`` count (the fakes the controller's
    virtual-time tests run against): a fixed window's windows from its start, every call
    past the count refused to the window's end; a sliding one's to its oldest call's expiry
    (a refused call not counted)."""
    fixed = WindowCount(2.0, 2.0, "fixed", now=1.0)  # 4 calls a window: [1, 3), [3, 5), ...
    assert [fixed.try_acquire(1.5) for _ in range(4)] == [0.0] * 4
    assert fixed.try_acquire(2.5) == pytest.approx(0.5)
    assert fixed.try_acquire(3.0) == 0.0
    assert fixed.try_acquire(9.2) == 0.0  # windows skipped: [9, 11) counts 1
    assert fixed.count == 1
    sliding = WindowCount(1.0, 3.0, "sliding", now=0.0)  # 3 calls in any 3 s
    assert [sliding.try_acquire(t) for t in (0.0, 1.0, 2.0)] == [0.0] * 3
    assert sliding.try_acquire(2.5) == pytest.approx(0.5)  # the call at 0 leaves at 3
    assert sliding.try_acquire(3.0) == 0.0
    assert sliding.try_acquire(3.5) == pytest.approx(0.5)
    assert "sliding" in repr(sliding) and "limit=3" in repr(sliding)


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"window_s": 10.0}, "--window counts --quota x --window calls: it needs a --quota"),
        ({"window_s": 10.0, "quota": 30.0, "burst": 2}, "--burst is a token bucket's"),
        ({"window_s": 10.0, "quota": 0.01}, "counts 0.1 calls a window: it must count from 1"),
        ({"window_s": 3600.0, "quota": 1000.0}, "counts 3,600,000 calls a window"),
        ({"window_s": math.inf, "quota": 1.0}, "--window must be from 0 (a token bucket) to 3,600"),
        ({"window_s": math.nan, "quota": 1.0}, "--window must be from 0"),
        ({"window_s": -1.0, "quota": 1.0}, "--window must be from 0"),
        ({"window_s": 10.0, "quota": 1.0, "window_kind": "rolling"}, "--window-kind must be"),
    ],
)  # fmt: skip
def test_a_window_that_cannot_count_is_refused_in_the_flags_words(
    fields: dict[str, Any], said: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(said)):
        SimulatorConfig(**fields)


def test_the_quota_changed_under_a_window_keeps_counting_over_it() -> None:
    """``set_quota`` (``/_sim/quota``) keeps the window: a count of the new quota over it,
    from now; a quota of 0 is no limit (no window); a burst is refused (no bucket)."""
    time = FakeTime()
    sim = Simulator(SimulatorConfig(jobs=0, quota=1.0, window_s=10.0), clock=time.clock)
    sim.set_quota(0.3)
    assert [sim.bucket.try_acquire(time.clock()) for _ in range(4)][-1] > 0  # 3 a window
    with pytest.raises(ValueError, match="--burst"):
        sim.set_quota(0.3, burst=5)
    sim.set_quota(0)
    assert sim.config.window_s == 0 and sim.bucket.try_acquire(time.clock()) == 0.0


def test_a_quota_back_after_no_limit_is_counted_over_the_window_again() -> None:
    """``/_sim/quota`` 0 (no limit) and then a quota again: the window counts it, as the
    simulator was started (a token bucket took its place: the window was dropped)."""
    time = FakeTime()
    sim = Simulator(SimulatorConfig(jobs=0, quota=1.0, window_s=10.0, window_kind="sliding"),
                    clock=time.clock)  # fmt: skip
    sim.set_quota(0)
    sim.set_quota(0.3)
    assert (sim.config.window_s, sim.config.window_kind) == (10.0, "sliding")
    assert isinstance(sim.bucket, WindowCount) and sim.bucket.limit == 3


def test_token_bucket_known_answers() -> None:
    bucket = TokenBucket(rate=2.0, capacity=3, now=0.0)
    assert [bucket.try_acquire(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_acquire(0.0) == pytest.approx(0.5)
    assert bucket.try_acquire(0.25) == pytest.approx(0.25)
    assert bucket.try_acquire(0.5) == 0.0
    assert bucket.try_acquire(100.0) == 0.0
    assert bucket.tokens == pytest.approx(2.0)  # refilled to capacity, one taken
    assert "rate=2" in repr(bucket)
    unlimited = TokenBucket(rate=0.0, capacity=1, now=0.0)
    assert all(unlimited.try_acquire(0.0) == 0.0 for _ in range(1000))


@pytest.mark.parametrize(("wait", "expected"), [(0.001, 1), (1.0, 1), (1.2, 2), (59.9, 60)])
def test_retry_after_rounds_up_to_whole_seconds_at_least_one(wait: float, expected: int) -> None:
    assert retry_after_seconds(wait) == expected


# -- refused batches ---------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("case", "body"),
    [
        ("too many ids", {"job_ids": ["{0}", "{1}", "{2}", "{3}"]}),
        ("id with a space", {"job_ids": ["{0}", "bad id"]}),
        ("id too long", {"job_ids": ["{0}", "x" * 65]}),
        ("empty id", {"job_ids": ["{0}", ""]}),
        ("id not a string", {"job_ids": ["{0}", 7]}),
        ("empty list", {"job_ids": []}),
        ("job_ids missing", {"ids": ["{0}"]}),
        ("job_ids not a list", {"job_ids": "{0}"}),
        ("body not an object", ["{0}"]),
        ("body not json", None),
    ],
)
async def test_bad_batches_get_400_naming_no_id_and_delete_nothing(
    session: aiohttp.ClientSession, case: str, body: Any
) -> None:
    async with run_simulator(SimulatorConfig(jobs=4, max_batch=3)) as sim:
        ids = sim.job_ids()
        text = orjson.dumps(body).decode() if body is not None else '{"job_ids": ['
        for index, job_id in enumerate(ids):
            text = text.replace(f"{{{index}}}", job_id)
        answer = await call(session, sim, "DELETE", JOBS, body=text.encode())
        assert answer.status == 400, case
        error = answer.json()
        assert error["error_code"].startswith("ModelArts.")
        assert not any(job_id in error["error_msg"] for job_id in [*ids, "bad id", "x" * 65])
        assert sim.job_ids() == ids
        assert sim.stats.bad_requests == 1


@pytest.mark.anyio
async def test_a_batch_holding_a_reject_id_is_refused_whole(
    session: aiohttp.ClientSession,
) -> None:
    ids = Simulator(SimulatorConfig(jobs=4)).job_ids()  # the same ids: seeded
    async with run_simulator(SimulatorConfig(jobs=4, reject_ids=frozenset({ids[2]}))) as sim:
        assert sim.job_ids() == ids
        refused = await delete(session, sim, ids)
        assert refused.status == 400
        error = refused.json()
        assert error["error_code"].startswith("ModelArts.")
        assert not any(job_id in error["error_msg"] for job_id in ids)
        assert sim.job_ids() == ids
        accepted = await delete(session, sim, [ids[0], ids[1], ids[3]])
        assert accepted.status == 200
        assert sim.job_ids() == [ids[2]]


@pytest.mark.anyio
async def test_max_batch_ids_exactly_are_accepted(session: aiohttp.ClientSession) -> None:
    async with run_simulator(SimulatorConfig(jobs=5, max_batch=5)) as sim:
        answer = await delete(session, sim, sim.job_ids())
        assert answer.status == 200
        assert answer.json()["total"] == 5


def _old_envelope(
    records: list[dict[str, Any]], current: int = 1, pages: int = 1, total: int | None = None
) -> bytes:
    """How the list and delete answers were made before the records were serialised once."""
    return orjson.dumps({
        "current": current, "data": records, "pages": pages, "size": len(records),
        "total": len(records) if total is None else total,
    })  # fmt: skip


@pytest.mark.anyio
async def test_delete_and_list_answer_byte_for_byte_what_serialising_the_records_gives(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=1100)) as sim:
        odd = sim.add_jobs(2, name='quo"te\\ \u00e9\u65e5 \U0001f600', description="a\nb\t</>",
                           abnormal_count=7, create_at=0, update_at=2**53)  # fmt: skip
        sim.set_status(odd[1], "STOPPED")  # a replaced job: its record is made again
        ids = sim.job_ids()
        records = {job_id: sim.store.jobs[job_id].record() for job_id in ids}
        assert records[odd[1]]["status"] == "STOPPED"

        listed = await call(session, sim, "GET", JOBS, query=[("current", "2")])
        assert listed.body == _old_envelope(
            [records[i] for i in ids[500:1000]], current=2, pages=3, total=1102
        )
        one = await call(session, sim, "GET", JOBS, query=[("id", odd[0])])
        assert one.body == _old_envelope([records[odd[0]]])
        empty = await call(session, sim, "GET", JOBS, query=[("current", "9")])
        assert empty.body == _old_envelope([], current=9, pages=3, total=1102)

        wanted = [ids[3], "never-existed", *odd, ids[3], ids[1099]]
        deleted = await delete(session, sim, wanted)
        assert deleted.status == 200
        assert deleted.body == _old_envelope([records[i] for i in (ids[3], *odd, ids[1099])])
        again = await delete(session, sim, wanted)
        assert again.body == _old_envelope([])


# -- list, show, create ------------------------------------------------------------------


@pytest.mark.anyio
async def test_list_filters_match_exactly(session: aiohttp.ClientSession) -> None:
    async with run_simulator(SimulatorConfig(jobs=20)) as sim:
        stopped = sim.add_jobs(3, status="STOPPED", type="COMMON")
        named = sim.add_jobs(1, name="the-one", status="STOPPED", type="ASCEND_DIAGNOSIS")
        hidden = sim.add_jobs(2, visible=False)

        async def ids(*query: tuple[str, str]) -> list[str]:
            answer = await call(session, sim, "GET", JOBS, query=query)
            assert answer.status == 200
            body = answer.json()
            assert body["total"] == len(body["data"]) == body["size"]
            return [record["id"] for record in body["data"]]

        assert await ids(("status", "STOPPED")) == [*stopped, *named]
        assert await ids(("status", "STOPPED"), ("type", "COMMON")) == stopped
        assert await ids(("name", "the-one")) == named
        assert await ids(("name", "the-on")) == []
        assert await ids(("id", stopped[1])) == [stopped[1]]
        assert await ids(("id", "missing")) == []
        assert await ids(("visible", "false")) == hidden
        assert len(await ids(("visible", "true"))) == 24
        assert len(await ids(("status", ""))) == 26  # blank filters nothing
        records = (await call(session, sim, "GET", JOBS, query=[("type", "COMMON")])).json()
        assert {record["type"] for record in records["data"]} == {"COMMON"}
        assert sim.stats.list_calls == 10


@pytest.mark.anyio
async def test_list_pages_by_current_size_and_by_offset_limit(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=1203)) as sim:
        every = sim.job_ids()

        async def page(*query: tuple[str, str]) -> dict[str, Any]:
            answer = await call(session, sim, "GET", JOBS, query=query)
            assert answer.status == 200
            body: dict[str, Any] = answer.json()
            return body

        first = await page()
        assert (first["current"], first["pages"], first["size"], first["total"]) == (
            1, 3, 500, 1203,
        )  # fmt: skip
        seen: list[str] = []
        current, pages = 1, 1
        while current <= pages:
            body = await page(("current", str(current)), ("size", "500"))
            pages = body["pages"]
            seen += [record["id"] for record in body["data"]]
            current += 1
        assert seen == every
        assert len((await page(("current", "3")))["data"]) == 203
        assert (await page(("current", "4")))["data"] == []
        window = await page(("offset", "1000"), ("limit", "100"))
        assert [r["id"] for r in window["data"]] == every[1000:1100]
        assert (window["current"], window["pages"], window["total"]) == (11, 13, 1203)
        for bad in [("size", "0"), ("size", "x"), ("current", "0"), ("limit", "1001")]:
            assert (await call(session, sim, "GET", JOBS, query=[bad])).status == 400


@pytest.mark.anyio
async def test_show_returns_the_job_with_details_and_404_when_absent(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        ids = sim.job_ids()
        shown = await call(session, sim, "GET", f"{JOBS}/{ids[0]}")
        assert shown.status == 200
        job = shown.json()
        assert job["id"] == ids[0]
        assert {"items", "tasks", "template_id"} <= set(job)
        assert job["status"] in JOB_STATUSES
        await delete(session, sim, [ids[0]])
        for job_id in (ids[0], "never-was"):
            missing = await call(session, sim, "GET", f"{JOBS}/{job_id}")
            assert missing.status == 404
            assert missing.json() == {"error_code": "ModelArts.6305", "error_msg": "job not found"}
        assert sim.stats.show_calls == 3


@pytest.mark.anyio
async def test_create_makes_a_job_that_list_show_and_delete_see(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(SimulatorConfig(jobs=0)) as sim:
        payload = {
            "name": "upgrade-node-7",
            "description": "drivers",
            "server_ids": ["srv-1", "srv-2"],
            "type": "ASCEND_SOFTWARE_UPGRADE",
            "is_reboot": False,
            "items": [{"name": "driver", "version": "24.1"}],
        }
        created = await call(session, sim, "POST", JOBS, payload=payload)
        assert created.status == 200
        record = created.json()
        assert UUID4.fullmatch(record["id"])
        assert (record["name"], record["type"], record["status"]) == (
            "upgrade-node-7", "ASCEND_SOFTWARE_UPGRADE", "PROCESSING",
        )  # fmt: skip
        assert record["create_at"] == record["update_at"] > JOBS_EPOCH_MS
        assert sim.job_ids() == [record["id"]]
        shown = (await call(session, sim, "GET", f"{JOBS}/{record['id']}")).json()
        assert shown["items"] == payload["items"]
        assert [task["server_id"] for task in shown["tasks"]] == ["srv-1", "srv-2"]
        bad = await call(session, sim, "POST", JOBS, payload={**payload, "type": "NOPE"})
        assert bad.status == 400
        assert (await delete(session, sim, [record["id"]])).json()["total"] == 1
        assert sim.stats.create_calls == 2


# -- faults ------------------------------------------------------------------------------

FAULT_EFFECTS = {
    # kind: (HTTP status or None for a dropped connection, whether the delete is applied)
    "error_before": (500, False),
    "error_after": (500, True),
    "unavailable": (503, False),
    "reset_before": (None, False),
    "reset_after": (None, True),
    "truncated": (200, True),
}


@pytest.mark.anyio
@pytest.mark.parametrize("kind", FAULT_KINDS)
async def test_each_fault_kind_is_observable_from_a_raw_client(
    session: aiohttp.ClientSession, kind: str
) -> None:
    status, applied = FAULT_EFFECTS[kind]
    only: dict[str, Any] = {kind: 1.0}
    config = SimulatorConfig(jobs=3, faults=FaultConfig(**only))
    async with run_simulator(config) as sim:
        ids = sim.job_ids()[:2]
        if status is None:
            # aiohttp itself resends an idempotent request once after a disconnect, so the
            # client may have called twice; every call it made met the fault.
            with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
                await delete(session, sim, ids)
            assert sim.stats.faults[kind] == sim.stats.delete_calls >= 1
        else:
            answer = await delete(session, sim, ids)
            assert answer.status == status
            if status >= 500:
                code = answer.json()["error_code"]
                assert code == ("ModelArts.0001" if status == 500 else "APIGW.0202")
            else:
                assert answer.headers["Content-Type"].startswith("application/json")
                assert int(answer.headers["Content-Length"]) == len(answer.body)
                assert answer.body.startswith(b'{"current":1')
                with pytest.raises(orjson.JSONDecodeError):
                    orjson.loads(answer.body)
            assert sim.stats.faults[kind] == sim.stats.delete_calls == 1
        assert (sim.deleted == set(ids)) is applied
        assert set(sim.stats.faults) == {kind}
        # The server survives its own faults and answers the next call.
        assert (await call(session, sim, "GET", JOBS)).status == 200


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["reset_before", "reset_after"])
async def test_a_reset_closes_the_connection_without_a_single_byte(kind: str) -> None:
    only: dict[str, Any] = {kind: 1.0}
    async with run_simulator(SimulatorConfig(jobs=2, faults=FaultConfig(**only))) as sim:
        ids = sim.job_ids()
        url = yarl.URL(sim.url)
        body = orjson.dumps({"job_ids": ids})
        signed = sign(
            method="DELETE",
            host=url.raw_authority,
            path=JOBS,
            headers={**JSON, "Content-Length": str(len(body))},
            body=body,
            ak="DEMOAK",
            sk="demo-secret-key",
            when=datetime.now(UTC),
        )
        head = "".join(f"{name}: {value}\r\n" for name, value in signed.headers.items())
        request = f"DELETE {JOBS} HTTP/1.1\r\n{head}\r\n".encode() + body
        received = b""
        with anyio.fail_after(10):
            async with await anyio.connect_tcp(url.host or "", url.port or 0) as stream:
                await stream.send(request)
                try:
                    while True:
                        received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                    pass
        assert received == b""
        assert sim.stats.faults[kind] == 1
        assert (sim.deleted == set(ids)) is (kind == "reset_after")


@pytest.mark.anyio
async def test_faults_never_apply_a_delete_twice(session: aiohttp.ClientSession) -> None:
    """Resending every batch until it answers 200 deletes each job exactly once."""
    config = SimulatorConfig(jobs=60, seed=7, faults=FaultConfig.spread(0.6))
    async with run_simulator(config) as sim:
        ids = sim.job_ids()
        reported: list[str] = []
        for start in range(0, len(ids), 5):
            batch = ids[start : start + 5]
            for _ in range(100):
                try:
                    answer = await delete(session, sim, batch)
                    records = answer.json()["data"] if answer.status == 200 else None
                except (aiohttp.ClientError, orjson.JSONDecodeError):
                    records = None
                if records is not None:
                    reported += [record["id"] for record in records]
                    break
        assert sim.deleted == set(ids)
        assert set(sim.delete_counts.values()) == {1}
        assert set(reported) < set(ids)  # faults after the delete lose some reports
        assert sum(sim.stats.faults.values()) > 0


@pytest.mark.anyio
async def test_max_in_flight_counts_concurrent_deletes(session: aiohttp.ClientSession) -> None:
    config = SimulatorConfig(jobs=8, faults=FaultConfig(latency_ms=1000, latency_jitter=False))
    async with run_simulator(config) as sim:
        ids = sim.job_ids()
        async with anyio.create_task_group() as tg:
            for index in range(4):
                tg.start_soon(delete, session, sim, ids[2 * index : 2 * index + 2])
            with anyio.fail_after(30):
                while sim.stats.in_flight < 4:
                    await anyio.sleep(0.01)
        assert sim.stats.max_in_flight == 4
        assert sim.stats.in_flight == 0
        assert sim.job_ids() == []


@pytest.mark.anyio
async def test_a_calls_work_is_done_within_its_latency_not_before_it(
    session: aiohttp.ClientSession,
) -> None:
    """Latency counts from the call's arrival, as a client measures a server's: the jobs
    are gone while the answer is still held back, so the simulator's own work is inside
    the latency instead of added to every round trip."""
    config = SimulatorConfig(jobs=2, faults=FaultConfig(latency_ms=60_000, latency_jitter=False))
    async with run_simulator(config) as sim:
        ids = sim.job_ids()
        answers: list[Answer] = []

        async def send() -> None:
            answers.append(await delete(session, sim, ids))

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            with anyio.fail_after(30):
                while sim.deleted != set(ids):  # done well before the minute is up
                    await anyio.sleep(0.01)
            assert answers == []  # and the answer is still held back
            assert sim.stats.in_flight == 1
            tg.cancel_scope.cancel()
        assert sim.stats.latency_calls == 1


@pytest.mark.anyio
async def test_stats_sum_the_latency_applied_to_calls_that_reach_the_latency_step(
    session: aiohttp.ClientSession,
) -> None:
    """Fixed 2 ms: every call past the gateway (a 400 too) is delayed; 401s and 429s are not."""
    time = FakeTime()
    faults = FaultConfig(latency_ms=2, latency_jitter=False)
    config = SimulatorConfig(jobs=3, quota=0.25, burst=6, faults=faults)
    async with run_simulator(config, clock=time.clock, wall=time.wall) as sim:
        ids = sim.job_ids()
        other = "/v1/other-project/dev-servers/jobs"
        statuses = [
            (await call(session, sim, "GET", JOBS, when=NOW)).status,
            (await call(session, sim, "GET", f"{JOBS}/{ids[0]}", when=NOW)).status,
            (await call(session, sim, "POST", JOBS, payload={"name": "n"}, when=NOW)).status,
            (await call(session, sim, "DELETE", JOBS, payload={"job_ids": ids}, when=NOW)).status,
            (await call(session, sim, "DELETE", JOBS, payload={"job_ids": []}, when=NOW)).status,
            (await call(session, sim, "GET", JOBS, sk="wrong", when=NOW)).status,
            (await call(session, sim, "GET", other, when=NOW)).status,
            (await call(session, sim, "GET", JOBS, when=NOW)).status,
        ]
        assert statuses == [200, 200, 200, 200, 400, 401, 404, 429]
        async with session.get(sim.url + "/_sim/stats") as r:
            stats = await r.json()
    expected = 0.0
    for _ in range(5):
        expected += 0.002
    assert (stats["latency_calls"], stats["latency_s"]) == (5, expected)
    assert (sim.stats.latency_calls, sim.stats.latency_s) == (5, expected)
    assert stats["latency_served_s"] >= expected - 1e-6  # a sleep never ends early


@pytest.mark.anyio
async def test_stats_time_the_span_from_the_first_delete_to_the_last_answer(
    session: aiohttp.ClientSession,
) -> None:
    """The same clock for every client: benchmarks time each side by the simulator's view."""
    time = FakeTime()
    async with run_simulator(SimulatorConfig(jobs=4), clock=time.clock, wall=time.wall) as sim:
        ids = sim.job_ids()
        assert sim.stats.as_dict()["delete_span_s"] == 0.0
        assert (await call(session, sim, "GET", JOBS, when=NOW)).status == 200
        time.advance(5.0)  # a list call before the first DELETE does not count
        # at 1005.0, 1006.5 and 1006.75; the refused one (400) is answered too, so it counts
        for batch, status, pause in ((ids[:2], 200, 1.5), (ids[2:], 200, 0.25), ([], 400, 0)):
            answer = await call(session, sim, "DELETE", JOBS, payload={"job_ids": batch}, when=NOW)
            assert answer.status == status
            time.advance(pause)
        time.advance(9.0)
        assert (await call(session, sim, "GET", JOBS, when=NOW)).status == 200
        async with session.get(sim.url + "/_sim/stats") as r:
            stats = await r.json()
    assert stats["delete_span_s"] == pytest.approx(1.75)
    assert stats["first_delete_at"] == pytest.approx(1005.0)


@pytest.mark.anyio
async def test_stats_sum_exactly_the_exponential_latencies_drawn(
    session: aiohttp.ClientSession,
) -> None:
    """The sum is of the seeded draws themselves, not the nominal mean times the calls."""
    faults = FaultConfig(latency_ms=2)
    async with run_simulator(SimulatorConfig(jobs=40, seed=7, faults=faults)) as sim:
        ids = sim.job_ids()
        for index in range(0, 40, 4):
            answer = await delete(session, sim, ids[index : index + 4])
            assert answer.status == 200
        async with session.get(sim.url + "/_sim/stats") as r:
            stats = await r.json()
    plan = FaultPlan(faults, seed=7)
    expected = 0.0
    for _ in range(10):
        expected += plan.latency()
    assert stats["latency_calls"] == 10
    assert stats["latency_s"] == expected
    assert stats["latency_served_s"] >= expected - 1e-6
    assert stats["latency_s"] != pytest.approx(10 * 0.002, rel=1e-6)
    async with run_simulator(SimulatorConfig(jobs=2)) as idle:
        assert (await delete(session, idle, idle.job_ids())).status == 200
        assert (idle.stats.latency_calls, idle.stats.latency_s) == (0, 0.0)
        assert idle.stats.latency_served_s == 0.0


def test_fault_draws_are_seeded_and_follow_the_probabilities() -> None:
    config = FaultConfig(error_before=0.1, reset_after=0.2, truncated=0.3)
    first = [FaultPlan(config, seed=3).draw() for _ in range(1)]
    plan_a, plan_b = FaultPlan(config, seed=3), FaultPlan(config, seed=3)
    draws_a = [plan_a.draw() for _ in range(20_000)]
    assert draws_a == [plan_b.draw() for _ in range(20_000)]
    assert draws_a[:1] == first
    other = FaultPlan(config, seed=4)
    assert [other.draw() for _ in range(200)] != draws_a[:200]
    share = {fault: draws_a.count(fault) / len(draws_a) for fault in Fault}
    assert share[Fault.ERROR_BEFORE] == pytest.approx(0.1, abs=0.015)
    assert share[Fault.RESET_AFTER] == pytest.approx(0.2, abs=0.015)
    assert share[Fault.TRUNCATED] == pytest.approx(0.3, abs=0.015)
    assert share[Fault.NONE] == pytest.approx(0.4, abs=0.015)
    assert share[Fault.UNAVAILABLE] == 0.0
    assert all(FaultPlan(FaultConfig(), seed=1).draw() is Fault.NONE for _ in range(100))


def test_latency_is_fixed_or_exponential_around_the_mean() -> None:
    fixed = FaultPlan(FaultConfig(latency_ms=40, latency_jitter=False), seed=0)
    assert {fixed.latency() for _ in range(10)} == {0.04}
    jitter = FaultPlan(FaultConfig(latency_ms=40), seed=0)
    samples = [jitter.latency() for _ in range(20_000)]
    assert sum(samples) / len(samples) == pytest.approx(0.04, rel=0.05)
    assert len(set(samples)) > 1000
    assert FaultPlan(FaultConfig(), seed=0).latency() == 0.0


def test_fault_config_validation() -> None:
    spread = FaultConfig.spread(0.6, latency_ms=5)
    assert [getattr(spread, k) for k in FAULT_KINDS] == [pytest.approx(0.1)] * 6
    assert spread.latency_ms == 5
    bad_configs: list[dict[str, Any]] = [
        {"error_before": 1.5},
        {"truncated": -0.1},
        {"error_after": 0.6, "reset_before": 0.6},
        {"latency_ms": -1},
    ]
    for bad in bad_configs:
        with pytest.raises(ValueError):  # noqa: PT011
            FaultConfig(**bad)
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        FaultConfig.spread(2)


# -- state, determinism, controls --------------------------------------------------------


def test_seeded_jobs_are_deterministic_and_realistic() -> None:
    first, again, other = (Simulator(SimulatorConfig(jobs=200, seed=s)) for s in (5, 5, 6))
    assert first.job_ids() == again.job_ids()
    assert [j.record() for j in first.store.jobs.values()] == [
        j.record() for j in again.store.jobs.values()
    ]
    assert set(first.job_ids()).isdisjoint(other.job_ids())
    records = [job.record() for job in first.store.jobs.values()]
    assert all(UUID4.fullmatch(r["id"]) for r in records)
    assert {r["type"] for r in records} == set(JOB_TYPES)
    assert {r["status"] for r in records} == set(JOB_STATUSES)
    spread_start = JOBS_EPOCH_MS - 90 * 24 * 3600 * 1000
    assert all(spread_start <= r["create_at"] <= r["update_at"] <= JOBS_EPOCH_MS for r in records)
    ages = sorted(r["create_at"] for r in records)
    assert ages[-1] - ages[0] > 60 * 24 * 3600 * 1000  # spread over the window, not bunched
    assert all((r["abnormal_count"] > 0) == (r["status"] == "FAILED") for r in records)
    # add_jobs continues the same seeded stream, with pinned fields
    assert first.add_jobs(2, status="FINISHED") == again.add_jobs(2, status="FINISHED")
    assert {first.store.jobs[i].status for i in first.job_ids()[-2:]} == {"FINISHED"}
    with pytest.raises(TypeError, match="unknown job fields"):
        first.add_jobs(1, colour="red")


def test_set_status_and_reprs_hide_the_secret_key() -> None:
    config = SimulatorConfig(jobs=2, sk="top-secret-sk")
    sim = Simulator(config)
    job_id = sim.job_ids()[0]
    sim.set_status(job_id, "STOPPED")
    assert sim.store.jobs[job_id].status == "STOPPED"
    with pytest.raises(KeyError):
        sim.set_status("missing", "STOPPED")
    for text in (repr(config), repr(sim), repr(sim.store), repr(sim.faults), repr(sim.stats)):
        assert "top-secret-sk" not in text
    assert "jobs=2" in repr(sim)


@pytest.mark.parametrize(
    "bad",
    [{"project_id": "no spaces"}, {"sk": ""}, {"jobs": -1}, {"quota": -1}, {"burst": 0},
     {"retry_after": "never"}, {"max_batch": 0}, {"max_skew_s": 0}],
)  # fmt: skip
def test_simulator_config_rejects_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        SimulatorConfig(**bad)


@pytest.mark.anyio
async def test_stats_and_control_endpoints(session: aiohttp.ClientSession) -> None:
    async with run_simulator(SimulatorConfig(jobs=4)) as sim:
        ids = sim.job_ids()
        await call(session, sim, "GET", JOBS)
        await call(session, sim, "GET", f"{JOBS}/{ids[0]}")
        await call(session, sim, "POST", JOBS, payload={"name": "n", "type": "COMMON"})
        await delete(session, sim, ids[:2])
        await call(session, sim, "GET", JOBS, sk="wrong")
        await delete(session, sim, ["bad id"])

        async with session.get(sim.url + "/_sim/stats") as r:
            stats = await r.json()
        assert {k: stats[k] for k in (
            "calls", "delete_calls", "list_calls", "show_calls", "create_calls", "deletions",
            "throttled", "signature_failures", "bad_requests", "deleted", "max_in_flight",
        )} == {
            "calls": 6, "delete_calls": 2, "list_calls": 2, "show_calls": 1, "create_calls": 1,
            "deletions": 2, "throttled": 0, "signature_failures": 1, "bad_requests": 1,
            "deleted": 2, "max_in_flight": 1,
        }  # fmt: skip
        assert stats["faults"] == dict.fromkeys(FAULT_KINDS, 0)
        assert not sim.stats.faults  # empty until a fault fires

        async with session.get(sim.url + "/_sim/deleted") as r:
            assert (await r.json())["ids"] == sorted(ids[:2])
        async with session.post(sim.url + "/_sim/jobs", json={"count": 3, "status": "FAILED"}) as r:
            added = (await r.json())["ids"]
        assert len(added) == 3
        assert all(sim.store.jobs[i].status == "FAILED" for i in added)
        async with session.get(sim.url + "/_sim/jobs") as r:
            assert (await r.json())["ids"] == sim.job_ids()
        async with session.post(sim.url + "/_sim/jobs", json={"count": -1}) as r:
            assert r.status == 400
        async with session.post(
            sim.url + "/_sim/status", json={"id": added[0], "status": "X"}
        ) as r:
            assert r.status == 200
        assert sim.store.jobs[added[0]].status == "X"
        assert sim.stats.calls == 6  # control calls are not API calls


# -- the command -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_simulate_command_prints_ready_line_answers_and_exits_0_on_sigterm(
    tmp_path: Any, session: aiohttp.ClientSession
) -> None:
    ids_file = tmp_path / "ids.txt"
    command = [
        sys.executable, "-m", "worker", "simulate", "--port", "0", "--jobs", "7", "--seed", "3",
        "--sk", "cmd-secret-key", "--ids-file", str(ids_file), "--fault-rate", "0",
    ]  # fmt: skip
    async with await anyio.open_process(command) as process:
        assert process.stdout is not None and process.stderr is not None
        buffer = b""
        with anyio.fail_after(60):
            while b"\n" not in buffer:
                buffer += await process.stdout.receive()
        line = buffer.decode().splitlines()[0]
        match = re.fullmatch(r"simulator listening on (http://\S+) project=(\S+) ak=(\S+)", line)
        assert match, line
        assert match.group(2, 3) == ("demo-project", "DEMOAK")
        url = match.group(1)
        assert (
            ids_file.read_text().splitlines()
            == Simulator(SimulatorConfig(jobs=7, seed=3)).job_ids()
        )

        remote = types.SimpleNamespace(url=url)
        answer = await call(session, remote, "GET", JOBS, sk="cmd-secret-key")  # type: ignore[arg-type]
        assert answer.status == 200
        assert answer.json()["total"] == 7

        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            code = await process.wait()
            rest = b""
            async for chunk in process.stdout:
                rest += chunk
            errors = b""
            async for chunk in process.stderr:
                errors += chunk
        assert code == 0, errors
        assert b"cmd-secret-key" not in buffer + rest + errors
        assert b"simulator stopped" in errors


@pytest.mark.slow
@pytest.mark.anyio
async def test_simulate_command_rejects_bad_flags_with_64() -> None:
    command = [sys.executable, "-m", "worker", "simulate", "--port", "0", "--fault-rate", "3"]
    with anyio.fail_after(60):
        result = await anyio.run_process(command, check=False)
    assert result.returncode == 64
    assert b"--fault-rate must be a number from 0 to 1, not 3" in result.stderr
