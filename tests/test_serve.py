"""serve, in-process: entry decoding, in-flight tracking, acks, dead letters, health, metrics.

Real Redis (under the test's own key prefix) and the simulator on loopback; the service
itself runs through ``worker.commands.serve.serve`` with a stop event instead of a signal.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import anyio
import anyio.abc
import orjson
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from yarl import URL

from tests.conftest import REDIS_URL
from tests.e2e import until
from tests.fakes import FakeClock
from tests.gateway import Gateway, serve_gateway
from worker.commands.serve import serve
from worker.errors import ApiTimeout, AuthError, ServerError, ThrottledError
from worker.service import journal as journal_module
from worker.service.consumer import Settled, StreamConsumer, handed_back_error, settled_ids
from worker.service.health import Health, build_app
from worker.service.inflight import HandBack, InFlight, Released
from worker.service.layout import Message, StreamLayout, decode_entry
from worker.service.metrics import (
    CALLS,
    DEAD_REASONS,
    RETRY_REASONS,
    ServiceMetrics,
    status_class,
)
from worker.settings import Settings
from worker.simulator import FaultConfig, Simulator, SimulatorConfig, run_simulator
from worker.types import Outcome, Result

pytestmark = pytest.mark.usefixtures("clean_env")


# -- pure pieces ----------------------------------------------------------------------------


def test_an_entry_with_id_ids_or_both_yields_its_valid_ids_once_in_order() -> None:
    message = decode_entry("1-0", {b"id": b"a", b"ids": b'["b", "a", "c"]'})
    assert message.ids == ("a", "b", "c")
    assert message.rejections == () and message.problem is None


def test_invalid_ids_are_rejections_with_reasons_and_never_ids() -> None:
    """Each invalid value once, at its first position, as a valid id named twice is one id:
    every value an entry names gets one outcome (an invalid one named twice had two)."""
    message = decode_entry("1-0", {b"ids": b'["ok", "no way", 7, "", "no way", 7, "ok"]'})
    assert message.ids == ("ok",)
    assert [(r.raw, r.line) for r in message.rejections] == [("no way", 2), ("7", 3), ("", 4)]
    assert "invalid character" in message.rejections[0].reason
    assert message.rejections[1].reason == "not a string but int"


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({b"other": b"x"}, "entry has neither id nor ids"),
        ({b"ids": b"[not json"}, "ids is not valid JSON"),
        ({b"ids": b'{"a": 1}'}, "ids is not a JSON list"),
        ({b"ids": b"[]"}, "entry names no ids"),
        ({b"ids": orjson.dumps([f"i{n}" for n in range(1001)])}, "entry names 1001 ids"),
    ],
)
def test_an_unreadable_entry_says_why_and_carries_no_ids(
    fields: dict[bytes, bytes], problem: str
) -> None:
    message = decode_entry("1-0", fields)
    assert message.ids == ()
    assert message.problem is not None and message.problem.startswith(problem)


def test_the_payload_kept_for_the_dead_letter_stream_is_escaped_text() -> None:
    message = decode_entry("1-0", {b"id": b"\x1b[31mred\xff"})
    assert "\\x1b" in message.payload and "\x1b" not in message.payload


def test_layout_names_every_key_after_the_stream() -> None:
    layout = StreamLayout("q", "g")
    assert (layout.dead, layout.outcomes, layout.ratelimit, layout.last_error) == (
        "q:dead", "q:outcomes", "q:ratelimit", "q:lasterror",
    )  # fmt: skip


def _result(job_id: str, outcome: Outcome = Outcome.DELETED) -> Result:
    return Result(job_id=job_id, outcome=outcome)


def test_an_entry_finishes_only_when_all_its_ids_have_an_outcome() -> None:
    inflight = InFlight()
    assert inflight.add(Message("1-0", ("a", "b")), 1).send == ("a", "b")
    assert inflight.settle([_result("a")]) == []
    done = inflight.settle([_result("b")])
    assert [d.entry_id for d in done] == ["1-0"] and done[0].failures == ()
    assert len(inflight) == 0 and inflight.open_ids == 0


def test_an_id_in_two_entries_is_sent_once_and_settles_both() -> None:
    inflight = InFlight()
    inflight.add(Message("1-0", ("a",)), 1)
    assert inflight.add(Message("2-0", ("a", "b")), 1).send == ("b",)
    assert inflight.entries_of("a") == ("1-0", "2-0")
    assert [d.entry_id for d in inflight.settle([_result("a")])] == ["1-0"]
    failed = inflight.settle([_result("b", Outcome.FAILED)])
    assert [d.entry_id for d in failed] == ["2-0"]
    assert [f.job_id for f in failed[0].failures] == ["b"]


def test_an_entry_without_valid_ids_is_finished_on_admission_and_repeats_are_no_ops() -> None:
    inflight = InFlight()
    admission = inflight.add(Message("1-0", (), problem="bad"), 2)
    assert admission.send == () and admission.finished is not None
    assert admission.finished.deliveries == 2
    inflight.add(Message("2-0", ("a",)), 1)
    assert inflight.add(Message("2-0", ("a",)), 1).send == ()  # a reclaim of our own entry


def test_a_released_entry_is_forgotten_once_none_of_its_ids_is_in_flight() -> None:
    """An entry whose batch is handed back while another of its ids is still in flight is
    held until that id settles: its outcome is the entry's, and it says so in its ids done
    (forgetting it at once sent that id again on the next delivery: two outcomes)."""
    inflight = InFlight()
    inflight.add(Message("1-0", ("a", "b")), 1)
    inflight.add(Message("2-0", ("c",)), 1)
    assert inflight.release(["a"]) == {"1-0": Released(["a"], [], waiting=True)}
    assert inflight.entries_of("b") == ("1-0",)  # b is not in the batch: still in flight
    (late,) = inflight.settle([_result("b")])
    assert late.entry_id == "1-0" and late.released == Released(["a"], ["b"], first=False)
    assert len(inflight) == 1 and "2-0" in inflight
    assert inflight.release(["c"]) == {"2-0": Released(["c"], [])}
    assert repr(inflight) == "InFlight(entries=0, open_ids=0, on_wire=0, looking=0)"


def test_a_looks_failure_is_no_answer_for_an_entry_that_joined_it_and_may_delete() -> None:
    """A look (an entry given up reads x) goes out; F, fresh, names x meanwhile and waits on
    it. The look finding x there is not F's answer (nobody sent F's DELETE): no outcome, x
    still waited on by both, to be sent. Without F, or found gone, it is the answer."""
    inflight = InFlight()
    inflight.add(Message("1-0", ("x", "y"), look=("x", "y")), 2)
    inflight.looking(["x", "y"])
    assert inflight.add(Message("2-0", ("x",)), 1).send == ()  # F waits on the look
    assert inflight.not_theirs(_result("x", Outcome.FAILED))
    assert inflight.entries_of("x") == ("1-0", "2-0")
    assert not inflight.not_theirs(_result("y", Outcome.FAILED))  # only the look's entry
    assert not inflight.not_theirs(_result("x", Outcome.FAILED))  # once: x is sent now
    assert inflight.asked(["x", "y"]) == ("x",) and inflight.asked(["x", "y"]) == ()
    inflight.looking(["x"])
    assert not inflight.not_theirs(_result("x", Outcome.ABSENT))  # gone: theirs too
    inflight.settle([_result("x", Outcome.ABSENT)])
    inflight.add(Message("3-0", ("x",)), 1)  # fresh after the look answered: its own call
    assert inflight.asked(["x"]) == ()


def test_an_entry_released_for_the_api_says_which_of_its_ids_are_done() -> None:
    """An entry kept pending once for a refused id, then released when the API gave out:
    its last error lost the ids already done, so its next delivery sent them again."""
    inflight = InFlight()
    message = Message("1-0", ("b", "c", "d", "e"), settled=("a",))
    inflight.add(message, 2)
    assert inflight.settle([_result("b"), _result("e", Outcome.FAILED)]) == []
    cause = ServerError("503", http_status=503)
    why = HandBack(cause, "API unavailable")
    released = inflight.release(["c", "d"], why=why)
    assert released == {"1-0": Released(ids=["c", "d"], done=["a", "b"], why=why)}
    kept = handed_back_error(released["1-0"])
    assert settled_ids(kept) == {"a", "b"}
    assert orjson.loads(kept)["ids"] == ["c", "d"]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (None, "2xx"),
        (ThrottledError("429", http_status=429), "4xx"),
        (AuthError("401", http_status=401), "4xx"),
        (ServerError("503", http_status=503), "5xx"),
        (ApiTimeout("slow"), "timeout"),
    ],
)
def test_status_class_comes_from_the_status_else_the_error_type(error: Any, expected: str) -> None:
    assert status_class(error) == expected


def series(text: str) -> int:
    return sum(len(family.samples) for family in text_string_to_metric_families(text))


def test_metrics_series_do_not_grow_with_traffic() -> None:
    """Every label value exists from the start: 100,000 observations add no series."""
    from prometheus_client import generate_latest

    metrics = ServiceMetrics()
    before = series(generate_latest(metrics.registry).decode())
    errors = [None, ThrottledError("t", http_status=429), ServerError("s", http_status=500),
              ApiTimeout("x"), AuthError("a", http_status=403)]  # fmt: skip
    for n in range(100_000):
        metrics.outcome(list(Outcome)[n % 5])
        metrics.call(CALLS[n % 2], errors[n % 5], (n % 700) / 10, 1.7e9 + n)
        metrics.retry(RETRY_REASONS[n % len(RETRY_REASONS)])
        metrics.dead(DEAD_REASONS[n % 3])
        metrics.batch_size.observe(n % 1000 + 1)
    text = generate_latest(metrics.registry).decode()
    assert series(text) == before
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "devserver_reaper_throttled" in families
    ids = {s.labels["outcome"]: s.value for s in families["devserver_reaper_ids"].samples
           if s.name.endswith("_total")}  # fmt: skip
    assert ids == {o.value: 20_000 for o in Outcome}
    assert families["devserver_reaper_last_success_timestamp_seconds"].samples[0].value >= 1.7e9


@pytest.mark.anyio
async def test_probes_say_live_and_ready_for_the_right_reasons() -> None:
    clock = FakeClock(autojump=False)
    health = Health(clock, stale_after=5)
    redis_up = True

    async def ping() -> object:
        if not redis_up:
            raise ConnectionError("down")
        return True

    app = build_app(health, ServiceMetrics(), ping=ping)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:

            async def status(path: str) -> int:
                async with http.get(path) as response:
                    return response.status

            assert await status("/healthz") == 503  # the loop has not started
            health.loop_running = True
            assert await status("/healthz") == 200
            clock.advance(6)
            assert await status("/healthz") == 503  # no progress for longer than stale_after
            health.progress()
            assert await status("/healthz") == 200
            assert await status("/readyz") == 200
            health.observe_call(AuthError("refused", http_status=401))
            assert await status("/readyz") == 503
            assert await status("/healthz") == 200  # unready is not dead
            health.observe_call(ServerError("later", http_status=500))  # keys were accepted
            assert await status("/readyz") == 200
            redis_up = False
            assert await status("/readyz") == 503
            redis_up = True
            health.draining = True
            assert await status("/readyz") == 503
    finally:
        await runner.cleanup()


# -- the service, in-process -----------------------------------------------------------------


@dataclass
class Running:
    sim: Simulator
    settings: Settings
    redis: aioredis.Redis
    layout: StreamLayout
    stop: anyio.Event
    port: int = 0
    code: int | None = None
    logs: list[MutableMapping[str, Any]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def enqueue(self, ids: list[str]) -> list[str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.xadd(self.layout.stream, {"id": job_id})
            return [e.decode() for e in await pipe.execute()]

    async def pending(self) -> int:
        info = await self.redis.xpending(self.layout.stream, self.layout.group)
        return int(info["pending"])

    def events(self, name: str) -> list[MutableMapping[str, Any]]:
        return [e for e in self.logs if e.get("event") == name]


@asynccontextmanager
async def running(
    prefix: str, sim_config: SimulatorConfig, *, path: str = "", **overrides: Any
) -> AsyncIterator[Running]:
    """``path``: appended to the simulator's URL in the endpoint (a prefix it does not know)."""
    async with run_simulator(sim_config) as sim:
        values: dict[str, Any] = {
            "endpoint": sim.url + path,
            "project_id": sim.config.project_id,
            "ak": sim.config.ak,
            "sk": sim.config.sk,
            "stream": prefix + "ids",
            "group": "reapers",
            "consumer": "c1",
            "http_port": 0,
            "rate": 200.0,
            "burst": 5,
            "batch_size": 20,
            "grace": 2.0,
        } | overrides
        settings = Settings(**values)
        client = aioredis.Redis.from_url(REDIS_URL)
        state = Running(sim, settings, client, StreamLayout(settings.stream, settings.group),
                        anyio.Event())  # fmt: skip
        ready = anyio.Event()

        def on_ready(port: int) -> None:
            state.port = port
            ready.set()

        async def service() -> None:
            state.code = await serve(
                settings, sim.url, stop=state.stop, on_ready=on_ready, http_host="127.0.0.1"
            )

        try:
            with capture_logs() as logs:
                state.logs = logs
                async with anyio.create_task_group() as group:
                    group.start_soon(service)
                    with anyio.fail_after(10):
                        await ready.wait()
                    yield state
                    state.stop.set()
        finally:
            await client.aclose()


@pytest.mark.anyio
async def test_ids_are_deleted_outcomes_written_and_entries_acked(redis_prefix: str) -> None:
    async with running(redis_prefix, SimulatorConfig(jobs=120)) as svc:
        ids = svc.sim.job_ids()
        await svc.enqueue(ids[:100])
        named = [*ids[100:], "bad id!", ids[100], "bad id!"]  # each named twice: one row each
        await svc.redis.xadd(svc.layout.stream, {"ids": orjson.dumps(named)})
        await until(lambda: _true(len(svc.sim.deleted) == 120))
        await until(lambda: _zero(svc.pending()))
        outcomes: Any = await svc.redis.xrange(svc.layout.outcomes)
        dead: Any = await svc.redis.xrange(svc.layout.dead)
    assert svc.code == 0
    assert set(svc.sim.delete_counts) == set(ids)
    rows = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in outcomes]
    assert sorted(r["job_id"] for r in rows if r["outcome"] == "deleted") == sorted(ids)
    assert [r["job_id"] for r in rows if r["outcome"] == "rejected"] == ["bad id!"]
    assert all(r["entry"] and r["batch_id"] for r in rows if r["outcome"] == "deleted")
    assert len(dead) == 1 and dead[0][1][b"reason"] == b"invalid ids"
    rejected = orjson.loads(dead[0][1][b"rejected"])
    assert [(r["job_id"], r["position"]) for r in rejected] == [("bad id!", 21)]
    assert "bad id!" not in svc.sim.sent_counts
    assert len(svc.events("job.deleted")) == 120
    assert len(svc.events("job.rejected")) == 1
    assert svc.events("serve.stopped")[0]["acked"] == 101


async def _true(value: bool) -> bool:
    return value


async def _equal(value: Any, expected: int) -> bool:
    return bool(await value == expected)


def _failed_calls(svc: Running) -> list[MutableMapping[str, Any]]:
    """Every Redis call that failed, as said: the outage's first loudly, the rest quietly."""
    return svc.events("serve.redis_unreachable") + svc.events("serve.redis_error")


def _refused_writes(svc: Running, operation: str) -> list[MutableMapping[str, Any]]:
    return [e for e in _failed_calls(svc) if e["operation"] == operation]


async def _all_read_and(svc: Running, *, pending: int) -> bool:
    """Has the group read every entry of the stream, and ``pending`` of them are pending?"""
    groups: Any = await svc.redis.xinfo_groups(svc.layout.stream)
    (group,) = groups
    return bool(group["lag"] == 0 and group["pending"] == pending)


async def _zero(value: Any) -> bool:
    return bool(await value == 0)


@pytest.mark.anyio
async def test_refused_credentials_make_it_unready_and_pause_without_exiting(
    redis_prefix: str,
) -> None:
    """A 401: /readyz 503, /healthz still 200, the entries stay pending, and the service is
    still running (paused) until told to stop; then it exits 0."""
    async with running(redis_prefix, SimulatorConfig(jobs=5), sk="not-the-secret") as svc:
        await svc.enqueue(svc.sim.job_ids())
        await until(lambda: _true(bool(svc.events("serve.paused"))))
        async with aiohttp.ClientSession() as http:
            async with http.get(svc.url("/readyz")) as response:
                assert response.status == 503
                assert (await response.json())["credentials"] is False
            async with http.get(svc.url("/healthz")) as response:
                assert response.status == 200
            async with http.get(svc.url("/metrics")) as response:  # what the alerts read
                families = {
                    f.name: f for f in text_string_to_metric_families(await response.text())
                }
            assert families["devserver_reaper_ready"].samples[0].value == 0
            assert families["devserver_reaper_credentials_refused"].samples[0].value == 1
        assert await svc.pending() == 5
        assert svc.code is None  # still running
        calls = svc.sim.stats.calls
        await anyio.sleep(0.3)
        assert svc.sim.stats.calls == calls  # paused: no calls in a loop
    assert svc.code == 0
    assert "not-the-secret" not in repr(svc.logs)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("config", "given"),
    [
        # The gateway's 404 (a wrong project id): an APIGW code, no job error.
        (SimulatorConfig(jobs=5), {"project_id": "other-project"}),
        # A web server's HTML 404 for a path prefix it does not know: no error code at all.
        (SimulatorConfig(jobs=5, unknown_path="html"), {"path": "/modelarts"}),
    ],
    ids=["gateway-404", "bare-html-404"],
)
async def test_a_404_that_names_no_job_pauses_it_unready_with_entries_pending(
    redis_prefix: str, config: SimulatorConfig, given: dict[str, str]
) -> None:
    """A 404 that carries no ModelArts job error is no answer about any job: nothing is
    settled "absent", the entries stay pending, and the service pauses, unready."""
    async with running(redis_prefix, config, **given) as svc:
        await svc.enqueue(svc.sim.job_ids())
        await until(lambda: _true(bool(svc.events("serve.paused"))))
        async with aiohttp.ClientSession() as http, http.get(svc.url("/readyz")) as response:
            assert response.status == 503
        assert await svc.pending() == 5
        assert svc.events("serve.paused")[0]["reason"] == "NoSuchApi"
        outcomes: Any = await svc.redis.xrange(svc.layout.outcomes)
    assert outcomes == [] and not svc.events("job.absent")
    assert svc.sim.deleted == set()


@pytest.mark.anyio
@pytest.mark.parametrize("refusal", ["html404", "401"])
async def test_a_refusal_pauses_it_only_once_the_delete_on_the_wire_is_settled(
    redis_prefix: str, refusal: str
) -> None:
    """One batch's DELETE is refused (a bare 404, a 401) while another's is on the wire and
    applied, on an independent fake of the API: the pause lets that one finish, so its
    jobs are settled ``deleted`` with their records and their entries acknowledged; the
    refused batch's entries stay pending."""
    gateway = Gateway.with_jobs(40, script=lambda n, ids: f"late-{refusal}" if n == 1 else "slow")
    async with (
        serve_gateway(gateway) as url,
        running(redis_prefix, SimulatorConfig(jobs=1), endpoint=url) as svc,
    ):
        await svc.enqueue(gateway.job_ids())
        await until(lambda: _true(bool(svc.events("serve.paused"))))
        await until(lambda: _equal(svc.pending(), 20))
        outcomes: Any = await svc.redis.xrange(svc.layout.outcomes)
        assert gateway.delete_calls == 2 and len(gateway.deleted) == 20
    rows = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in outcomes]
    assert {r["job_id"] for r in rows if r["outcome"] == "deleted"} == gateway.deleted
    assert {e["job_id"] for e in svc.events("job.deleted")} == gateway.deleted


@pytest.mark.anyio
async def test_jobs_a_lost_answer_deleted_before_the_api_gave_out_end_deleted_on_redelivery(
    redis_prefix: str,
) -> None:
    """A DELETE applied and answered 502, then 503 until the retries run out: the entries
    stay pending. Delivered again once the API is back, the jobs are gone by our own
    hand: they end ``deleted`` (unconfirmed), not ``absent``."""
    script = {1: "error_after", 2: "unavailable"}
    gateway = Gateway.with_jobs(10, script=lambda n, ids: script.get(n, "ok"))
    settings: dict[str, Any] = {
        "max_attempts": 2, "reclaim_after": 0.2, "batch_size": 10, "concurrency": 1,
    }  # fmt: skip
    async with (
        serve_gateway(gateway) as url,
        running(redis_prefix, SimulatorConfig(jobs=1), endpoint=url, **settings) as svc,
    ):
        await svc.enqueue(gateway.job_ids())
        await until(lambda: _equal(svc.redis.xlen(svc.layout.outcomes), 10), timeout=30)
        outcomes: Any = await svc.redis.xrange(svc.layout.outcomes)
    rows = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in outcomes]
    assert gateway.delete_calls >= 3 and len(gateway.deleted) == 10
    assert {r["job_id"]: r["outcome"] for r in rows} == dict.fromkeys(gateway.deleted, "deleted")
    assert {e["job_id"] for e in svc.events("job.deleted") if e["confirmed"] is False} == (
        gateway.deleted
    )


@pytest.mark.anyio
async def test_metrics_parse_and_count_the_real_path(redis_prefix: str) -> None:
    """1,000 ids through the real path: the exposition parses, counts them, and has the
    same number of series as a registry that saw nothing (so traffic adds none)."""
    from prometheus_client import generate_latest

    async with running(redis_prefix, SimulatorConfig(jobs=1000), rate=1000.0,
                       batch_size=50) as svc:  # fmt: skip
        await svc.enqueue(svc.sim.job_ids())
        await until(lambda: _true(len(svc.sim.deleted) == 1000), timeout=30)
        await until(lambda: _zero(svc.pending()))
        async with aiohttp.ClientSession() as http, http.get(svc.url("/metrics")) as response:
            assert response.status == 200
            text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ids = {s.labels["outcome"]: s.value for s in families["devserver_reaper_ids"].samples
           if s.name.endswith("_total")}  # fmt: skip
    assert ids["deleted"] == 1000
    calls = {(s.labels["call"], s.labels["status_class"]): s.value
             for s in families["devserver_reaper_api_calls"].samples
             if s.name.endswith("_total")}  # fmt: skip
    assert calls[("delete", "2xx")] == 20
    assert families["devserver_reaper_pending_entries"].samples[0].value == 0
    assert families["devserver_reaper_consumer_lag"].samples[0].value == 0
    assert families["devserver_reaper_ready"].samples[0].value == 1
    assert series(text) == series(generate_latest(ServiceMetrics().registry).decode())


@pytest.mark.anyio
async def test_protected_jobs_survive_serve_whatever_the_queue_says(redis_prefix: str) -> None:
    """Protection holds in serve too: by id (no call) and by status (one show call)."""
    async with running(
        redis_prefix, SimulatorConfig(jobs=30, seed=4), protected_statuses="PROCESSING"
    ) as svc:
        ids = svc.sim.job_ids()
        busy = [i for i in ids if svc.sim.store.jobs[i].status == "PROCESSING"]
        assert busy, "the seeded inventory has PROCESSING jobs"
        await svc.enqueue(ids)
        await until(lambda: _true(len(svc.events("job.skipped")) == len(busy)))
        await until(lambda: _true(len(svc.sim.deleted) == len(ids) - len(busy)))
        await until(lambda: _zero(svc.pending()))
    assert svc.code == 0
    assert set(busy).isdisjoint(svc.sim.sent_counts)
    assert set(svc.sim.job_ids()) == set(busy)
    skipped = svc.events("job.skipped")
    assert {e["job_id"] for e in skipped} == set(busy)
    assert {e["reason"] for e in skipped} == {"protected"}


class RedisProxy:
    """A TCP relay to the real Redis that can be cut: while cut, every connection through it
    is closed and new ones are closed on arrival, as when Redis goes away. A connection being
    made as the cut came (the relay's connect upstream yields) once slipped past it and
    answered between failures, ending the outage the test counts: 10 outages said, not 1."""

    def __init__(self, target: str) -> None:
        url = URL(target)
        self._host, self._port, self._db = url.host or "127.0.0.1", url.port or 6379, url.path
        self._streams: set[anyio.abc.ByteStream] = set()
        self.cut = False
        self.url = ""

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
        self.url = f"redis://127.0.0.1:{port}{self._db}"
        task_status.started()
        async with listener:
            await listener.serve(self._relay)

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        if self.cut:
            await client.aclose()
            return
        upstream = await anyio.connect_tcp(self._host, self._port)
        self._streams |= {client, upstream}
        if self.cut:  # cut while connecting: go_away closed the streams it knew, not these
            await client.aclose()
            await upstream.aclose()
            return

        async def pump(source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream) -> None:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                                     anyio.ClosedResourceError, OSError):  # fmt: skip
                async for chunk in source:
                    if self.cut:  # a connection that slipped past the cut relays nothing
                        break
                    await sink.send(chunk)
            await source.aclose()
            await sink.aclose()

        async with client, upstream, anyio.create_task_group() as group:
            group.start_soon(pump, client, upstream)
            group.start_soon(pump, upstream, client)
        self._streams -= {client, upstream}

    async def go_away(self) -> None:
        self.cut = True
        for stream in list(self._streams):
            await stream.aclose()


@pytest.mark.anyio
async def test_outcomes_wait_out_a_redis_outage_and_every_entry_is_settled(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis goes away for longer than a shutdown would wait for it, while deletes are in
    flight: the outcomes reached meanwhile are written once it is back, and every entry is
    acknowledged. (Giving up on them left their entries held in memory for good: never
    settled, never sent again, and skipped by the service's own reclaim.)"""
    monkeypatch.setattr(journal_module, "SETTLE_TIMEOUT_S", 0.2)
    proxy = RedisProxy(REDIS_URL)
    config = SimulatorConfig(jobs=80, faults=FaultConfig(latency_ms=150, latency_jitter=False))
    async with anyio.create_task_group() as relay:
        await relay.start(proxy.serve)
        async with running(redis_prefix, config, redis_url=proxy.url, batch_size=5,
                           concurrency=4, rate=1000.0, reclaim_after=0.5) as svc:  # fmt: skip
            ids = svc.sim.job_ids()
            await svc.enqueue(ids)
            await until(lambda: _true(len(svc.sim.deleted) >= 10))
            await proxy.go_away()
            # An outcome reached in flight is refused by Redis; the outage then lasts five
            # times what a shutdown would wait for it (a longer one only tests more).
            await until(lambda: _true(bool(_refused_writes(svc, "outcomes"))))
            await anyio.sleep(5 * journal_module.SETTLE_TIMEOUT_S)
            proxy.cut = False
            await until(lambda: _true(len(svc.sim.deleted) == len(ids)), timeout=30)
            await until(lambda: _zero(svc.pending()), timeout=30)
            outcomes: Any = await svc.redis.xrange(svc.layout.outcomes)
        relay.cancel_scope.cancel()
    assert svc.code == 0
    rows = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in outcomes]
    assert sorted(r["job_id"] for r in rows) == sorted(ids)  # one outcome each
    assert {r["outcome"] for r in rows} == {"deleted"}
    assert set(svc.sim.sent_counts) == set(ids) and set(svc.sim.sent_counts.values()) == {1}


@pytest.mark.anyio
async def test_an_entry_settled_here_and_still_being_acked_is_not_reclaimed_and_sent_again(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acks cannot get through for a while (reads can) and entries idle past
    ``reclaim_after``: the reclaim that meets them takes back none of those this replica
    has settled and is still acking. They had left the in-flight map, so it used to send
    their ids again, for a second outcome ("absent") beside the first."""
    finish = StreamConsumer.finish
    refused: list[str] = []
    refused_until = anyio.current_time() + 2.0

    async def unreachable_for_a_while(self: StreamConsumer, done: Any) -> Settled:
        if anyio.current_time() < refused_until:
            refused.append(done.entry_id)
            raise redis.exceptions.ConnectionError("ack refused for the test")
        return await finish(self, done)

    monkeypatch.setattr(StreamConsumer, "finish", unreachable_for_a_while)
    async with running(redis_prefix, SimulatorConfig(jobs=10), batch_size=5,
                       reclaim_after=0.3) as svc:  # fmt: skip
        ids = svc.sim.job_ids()
        await svc.enqueue(ids)
        await until(lambda: _true(len(svc.sim.deleted) == len(ids)))
        await until(lambda: _zero(svc.pending()))
        outcomes: Any = await svc.redis.xrange(svc.layout.outcomes)
    assert svc.code == 0
    assert refused  # acks were refused while the reclaim ran
    assert set(svc.sim.sent_counts.values()) == {1}, svc.sim.sent_counts
    rows = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in outcomes]
    assert sorted(r["job_id"] for r in rows) == sorted(ids)


@pytest.mark.anyio
async def test_every_dead_lettered_entry_is_logged_with_its_reason(redis_prefix: str) -> None:
    """Entries with invalid ids or none readable go to the dead-letter stream at once; each
    says so in a serve.dead_lettered event, as the over-delivered ones do (they were
    counted in the metrics but logged nothing). An entry naming no id at all (``[]``) was
    acknowledged without a trace."""
    async with running(redis_prefix, SimulatorConfig(jobs=2)) as svc:
        await svc.redis.xadd(svc.layout.stream, {"foo": "bar"})
        await svc.redis.xadd(svc.layout.stream, {"ids": orjson.dumps(["bad id!"])})
        await svc.redis.xadd(svc.layout.stream, {"ids": "[]"})
        await svc.enqueue(svc.sim.job_ids())
        await until(lambda: _true(len(svc.sim.deleted) == 2))
        await until(lambda: _zero(svc.pending()))
        dead: Any = await svc.redis.xrange(svc.layout.dead)
    logged = svc.events("serve.dead_lettered")
    assert sorted(e["entry"] for e in logged) == sorted(f[b"entry"].decode() for _, f in dead)
    reasons = {e["reason"] for e in logged}
    assert "invalid ids" in reasons and "entry names no ids" in reasons and len(reasons) == 3


@pytest.mark.anyio
async def test_ids_the_api_is_never_up_for_end_failed_once_with_the_error_kept(
    redis_prefix: str,
) -> None:
    """Every call 503: each delivery's batch ends ApiUnavailable and its entry is left
    pending. Once delivered more than max_deliveries times, the entry is dead-lettered
    with that error and its ids end failed, one outcome each (they were dead-lettered with
    no outcome and an empty last_error)."""
    config = SimulatorConfig(jobs=4, faults=FaultConfig(unavailable=1.0))
    async with running(redis_prefix, config, max_attempts=1, max_deliveries=2,
                       reclaim_after=0.2, batch_size=2) as svc:  # fmt: skip
        ids = svc.sim.job_ids()
        await svc.enqueue(ids)
        await until(lambda: _true(len(svc.events("serve.dead_lettered")) == 4), timeout=30)
        await until(lambda: _zero(svc.pending()))
        outcomes: Any = await svc.redis.xrange(svc.layout.outcomes)
        dead: Any = await svc.redis.xrange(svc.layout.dead)
    rows = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in outcomes]
    assert sorted(r["job_id"] for r in rows) == sorted(ids)
    assert {r["outcome"] for r in rows} == {"failed"}
    assert {r["http_status"] for r in rows} == {"503"}
    assert sorted(e["job_id"] for e in svc.events("job.failed")) == sorted(ids)
    for _, fields in dead:
        error = orjson.loads(fields[b"last_error"])
        assert error["http_status"] == 503
        assert error["ids"] == [orjson.loads(fields[b"payload"])["id"]]  # its own id only
        assert b"max_deliveries 2" in fields[b"reason"]


@pytest.mark.anyio
async def test_a_stop_does_not_wait_out_the_grace_period_for_dispatchers_waiting_for_a_token(
    redis_prefix: str,
) -> None:
    """One call every 100 s and a minute of grace: after the first id, both dispatchers
    wait for tokens with nothing on the wire, so a stop ends the service at once, their
    entries left pending (it used to wait the whole grace period)."""
    async with running(redis_prefix, SimulatorConfig(jobs=5), rate=0.01, burst=1,
                       batch_size=1, concurrency=2, grace=60.0) as svc:  # fmt: skip
        await svc.enqueue(svc.sim.job_ids())
        await until(lambda: _true(len(svc.sim.deleted) == 1))
        # Every entry is read and the first acked: both dispatchers hold one and wait for a
        # token, two wait. Pending alone was 4 also with the first not acked yet and the
        # last not read, which the stop then left unread (3 pending at the end).
        await until(lambda: _all_read_and(svc, pending=4))
        svc.stop.set()
        await until(lambda: _true(svc.code is not None), timeout=20)
        assert await svc.pending() == 4
    assert svc.code == 0
    assert len(svc.sim.deleted) == 1


def _short_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pauses on refused credentials of 50-100 ms instead of 30 s and more."""
    from functools import partial

    from worker.service import service as service_module

    short = partial(service_module.ServiceConfig, auth_pause=0.05, auth_pause_max=0.1)
    monkeypatch.setattr(service_module, "ServiceConfig", short)


@pytest.mark.anyio
async def test_pauses_on_refused_credentials_count_no_deliveries_and_fail_nothing(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials refused through many more pauses than max_deliveries: each new round
    read its own pending entries again with XREADGROUP ... 0, which counted a delivery,
    so the entries were dead-lettered and their ids ended job.failed, never tried with
    working credentials. The entries stay pending, delivered once."""
    _short_pauses(monkeypatch)
    async with running(redis_prefix, SimulatorConfig(jobs=5), sk="not-the-secret",
                       max_deliveries=2) as svc:  # fmt: skip
        await svc.enqueue(svc.sim.job_ids())
        await until(lambda: _true(len(svc.events("serve.paused")) >= 6))
        pending: Any = await svc.redis.xpending_range(
            svc.layout.stream, svc.layout.group, "-", "+", 10
        )
        dead = await svc.redis.xlen(svc.layout.dead)
    assert svc.code == 0
    assert not svc.events("job.failed") and not svc.events("serve.dead_lettered")
    assert dead == 0
    assert len(pending) == 5 and {p["times_delivered"] for p in pending} == {1}


@pytest.mark.anyio
async def test_a_round_after_a_pause_reads_nothing_new_before_its_own_entries_are_answered(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries enqueued during an outage of the credentials are not read (and held) by a
    replica that tries its own entries again after each pause and is refused again."""
    _short_pauses(monkeypatch)
    async with running(redis_prefix, SimulatorConfig(jobs=10), sk="not-the-secret",
                       batch_size=5) as svc:  # fmt: skip
        ids = svc.sim.job_ids()
        await svc.enqueue(ids[:5])
        await until(lambda: _true(bool(svc.events("serve.paused"))))
        await svc.enqueue(ids[5:])
        paused = len(svc.events("serve.paused"))
        await until(lambda: _true(len(svc.events("serve.paused")) >= paused + 4))
        assert await svc.pending() == 5
    assert svc.code == 0


def _stale_after(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """/healthz turns 503 after ``seconds`` without a heartbeat instead of 30 s."""
    from worker.service.service import ServiceConfig

    monkeypatch.setattr(ServiceConfig, "stale_after", property(lambda self: seconds))


async def _status(svc: Running, path: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(svc.url(path)) as response:
        return response.status


@pytest.mark.anyio
async def test_a_replica_waiting_for_the_rate_limit_stays_live(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One call every 100 s: after the first id the dispatcher waits for a token and the
    intake for room in the dispatch queue, so no id moves for far longer than stale_after.
    That is a known, bounded wait, not a hang: /healthz stays 200 (it went 503, and the
    liveness probe restarted a healthy pod)."""
    _stale_after(monkeypatch, 0.5)
    async with running(redis_prefix, SimulatorConfig(jobs=5), rate=0.01, burst=1,
                       batch_size=1, concurrency=1) as svc:  # fmt: skip
        await svc.enqueue(svc.sim.job_ids())
        await until(lambda: _true(len(svc.sim.deleted) == 1))
        await anyio.sleep(2.0)  # four times stale_after with nothing moving
        assert await _status(svc, "/healthz") == 200
        assert len(svc.sim.deleted) == 1  # still waiting
    assert svc.code == 0


@pytest.mark.anyio
async def test_a_redis_outage_leaves_it_live_and_unready(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis away for longer than stale_after: the replica waits it out unready, not
    dead (it went 503 on /healthz too, a restart loop for an outage of Redis)."""
    _stale_after(monkeypatch, 0.5)
    proxy = RedisProxy(REDIS_URL)
    async with anyio.create_task_group() as relay:
        await relay.start(proxy.serve)
        async with running(redis_prefix, SimulatorConfig(jobs=5),
                           redis_url=proxy.url) as svc:  # fmt: skip
            await svc.enqueue(svc.sim.job_ids())
            await until(lambda: _true(len(svc.sim.deleted) == 5))
            await proxy.go_away()
            await anyio.sleep(2.0)  # four times stale_after
            assert await _status(svc, "/healthz") == 200
            assert await _status(svc, "/readyz") == 503
            proxy.cut = False
            await until(lambda: _zero(svc.pending()))
        relay.cancel_scope.cancel()
    assert svc.code == 0


@pytest.mark.anyio
async def test_deleting_the_stream_key_while_it_runs_is_survived_and_calls_in_flight_settle(
    redis_prefix: str,
) -> None:
    """DEL of the stream while the intake blocks in XREADGROUP and calls are in flight: the
    read answers UNBLOCKED, which crashed serve (exit 1, a traceback) and lost the events
    of the ids being deleted. The group and stream are created again, the calls on the
    wire settle and log their outcome, and entries added afterwards are consumed."""
    config = SimulatorConfig(jobs=13, faults=FaultConfig(latency_ms=1000, latency_jitter=False))
    async with running(redis_prefix, config, batch_size=5, concurrency=2) as svc:
        ids = svc.sim.job_ids()
        await svc.enqueue(ids[:10])
        await until(lambda: _equal(svc.pending(), 10))  # all read, the calls in flight
        await svc.redis.delete(svc.layout.stream)
        await until(lambda: _true(bool(svc.events("serve.group_recreated"))))
        await until(lambda: _true(len(svc.events("job.deleted")) == 10))
        await svc.enqueue(ids[10:])
        await until(lambda: _true(len(svc.sim.deleted) == 13))
        await until(lambda: _zero(svc.pending()))
    assert svc.code == 0
    assert sorted(e["job_id"] for e in svc.events("job.deleted")) == sorted(ids)


@pytest.mark.anyio
async def test_serve_on_a_key_of_another_type_exits_78_without_a_traceback(
    redis_prefix: str,
) -> None:
    """--stream naming a string key: XGROUP CREATE answers WRONGTYPE, which was a traceback
    and exit 1; it is a setting to fix (78), said in one serve.config_error event."""
    stream = redis_prefix + "wt"
    await _set(stream, "hello")
    error = await _serve_config_error(stream)
    assert stream in error and "not a stream" in error


@pytest.mark.anyio
async def test_serve_on_a_position_key_of_another_type_names_it_in_its_78(
    redis_prefix: str,
) -> None:
    """``{stream}:position`` a string at start: exit 78 said only "group: a key of the queue
    holds another type", not which key to mend."""
    stream = redis_prefix + "pk"
    await _set(stream + ":position", "hello")
    error = await _serve_config_error(stream)
    assert f"{stream}:position" in error and "not a hash" in error


NO_API = ["--endpoint", "http://127.0.0.1:9", "--project-id", "p1", "--ak", "TESTAK"]
"""Settings that pass serve's checks; nothing listens there, and no test here calls it."""


async def _serve_config_error(stream: str, *flags: str, **variables: str) -> str:
    """``serve`` as a process that must exit 78 with one ``serve.config_error`` and no
    traceback; the error it gives (the event's; stderr says it once more to a person)."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("REAPER_", "HUAWEICLOUD_"))}
    env["REAPER_SK"] = "SK"  # not --sk: a flag is visible in ps, and says so
    env.update(variables)
    with anyio.fail_after(60):  # a serve that took the settings would run until killed
        done = await anyio.run_process(
            [sys.executable, "-m", "worker", "serve", "--stream", stream, *NO_API, *flags,
             "--redis-url", REDIS_URL, "--http-port", "0", "--log-format", "json"],
            env=env, check=False,
        )  # fmt: skip
    assert done.returncode == 78, done.stderr
    assert b"Traceback" not in done.stderr + done.stdout
    lines = (done.stderr + done.stdout).splitlines()
    events = [orjson.loads(line) for line in lines if line.startswith(b"{")]
    (error,) = [e for e in events if e["event"] == "serve.config_error"]
    assert f"devserver-reaper serve: {error['error']}".encode() in done.stderr
    return str(error["error"])


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("variable", "word"), [("REAPER_DRY_RUN", "dry_run"), ("REAPER_MAX_DELETIONS", "max_deletions")]
)
async def test_serve_refuses_settings_only_a_run_can_keep(
    redis_prefix: str, variable: str, word: str
) -> None:
    """``serve --dry-run`` acknowledged every entry as skipped (the queue drained, nothing
    deleted); ``--max-deletions`` was a cap per replica, spent ids acknowledged as skipped.
    The flags are not serve's (a usage error); set any other way (here the environment, as
    a ConfigMap shared with the CronJob would) they are 78, before Redis is touched."""
    stream = redis_prefix + "runonly"
    error = await _serve_config_error(stream, **{variable: "5" if "MAX" in variable else "true"})
    assert error.startswith(f"{word} is for run")
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        assert not await client.exists(stream)
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_the_shared_auto_rate_pauses_no_longer_than_max_retry_after(
    redis_prefix: str,
) -> None:
    """One 429 saying ``Retry-After: 3000`` held every replica for 30 s whatever
    ``--max-retry-after`` said: serve built its shared limiter without it. The pause is
    the leader's, published in ``{key}:pace`` on the Redis server's clock (which a fake
    clock cannot move, so it is read there): 2 s past the Redis time of the reservation
    that reported the refusal. The first call of a fresh fleet, refused, pauses it too (a
    new leader took a call sent within one interval of its start for one sent before)."""
    from worker.pacing.fleet import FleetRateController
    from worker.pacing.shared import FleetKeys
    from worker.wiring import shared_limiter

    clock = FakeClock()
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = FleetKeys.of(redis_prefix + "ratelimit")
    try:
        settings = Settings(rate="auto", max_retry_after=2.0)
        limiter = shared_limiter(settings, client, keys.tat, clock)
        assert isinstance(limiter, FleetRateController)
        await limiter.acquire()  # the fleet's first call, sent at once; refused:
        limiter.feedback(throttled=True, latency_s=0.0, retry_after=3000.0)
        before = await client.time()
        await limiter.reserve()  # the next call's reservation reports it
        after = await client.time()
        published = int(await client.hget(keys.pace, "pause_until") or 0) / 1e6
        low, high = before[0] + before[1] / 1e6, after[0] + after[1] / 1e6
        assert low + 2.0 <= published <= high + 2.0, (low, published, high)
    finally:
        await client.delete(*keys.all())
        await client.aclose()


async def _set(key: str, value: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.set(key, value)
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_a_redelivered_entry_sends_again_only_its_ids_without_an_outcome(
    redis_prefix: str,
) -> None:
    """An ids entry with one id the API refuses (400): the entry is kept pending for it and
    delivered again, until dead-lettered. Its good ids were sent again on every delivery
    and logged and written again (deleted, then absent, absent). Now each has one outcome,
    one call, and only the refused id is tried again."""
    async with run_simulator(SimulatorConfig(jobs=3)) as probe:  # the seeded ids
        poison = probe.job_ids()[1]
    config = SimulatorConfig(jobs=3, reject_ids=frozenset({poison}))
    async with running(redis_prefix, config, max_deliveries=3, reclaim_after=0.2) as svc:
        ids = svc.sim.job_ids()
        assert poison in ids
        await svc.redis.xadd(svc.layout.stream, {"ids": orjson.dumps(ids)})
        await until(lambda: _true(bool(svc.events("serve.dead_lettered"))), timeout=30)
        outcomes: Any = await svc.redis.xrange(svc.layout.outcomes)
    assert svc.code == 0
    rows = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in outcomes]
    assert sorted((r["job_id"], r["outcome"]) for r in rows) == sorted(
        [(i, "deleted") for i in ids if i != poison] + [(poison, "failed")]
    )
    assert not svc.events("job.absent")
    good = [i for i in ids if i != poison]
    assert all(svc.sim.sent_counts[i] == 1 for i in good), svc.sim.sent_counts
    assert [e["job_id"] for e in svc.events("job.failed")] == [poison]
    assert len(svc.events("job.deleted")) == 2


def _million_ids_entry() -> dict[Any, Any]:
    """A producer's bug: one entry of a million ids, about 4 MB."""
    return {b"ids": orjson.dumps([f"job-{n:07d}" for n in range(1_000_000)])}


def test_an_entry_above_the_size_bound_is_refused_without_being_parsed() -> None:
    """Parsing a 4 MB entry took a replica from 75 to 165 MB, past the pod's limit, on every
    start. It is refused on its size now; decoding it allocates next to nothing."""
    import tracemalloc

    from worker.service.layout import MAX_ENTRY_BYTES

    fields = _million_ids_entry()
    assert len(fields[b"ids"]) > 4_000_000
    tracemalloc.start()
    try:
        message = decode_entry("1-0", fields)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message.ids == () and message.problem is not None
    assert message.problem.startswith("entry holds") and str(MAX_ENTRY_BYTES) in message.problem
    assert peak < 1_000_000, peak  # parsing it took over 60 MB
    assert len(message.payload) < 3000  # what the dead letter keeps of it is bounded too


def _serve_s_reader(stack: contextlib.AsyncExitStack) -> Any:
    """The client ``serve`` reads entries with, as it builds it."""
    from worker.assembly import build_service_redis, service_config

    settings = Settings(redis_url=REDIS_URL)
    config = replace(service_config(settings), block=30.0)  # traced reads: slow under load
    return build_service_redis(stack, settings, config)[1]


async def _read_each_way(
    client: Any, consumer: StreamConsumer, fields: dict[Any, Any]
) -> list[tuple[Message, int]]:
    """Write one entry; read it as new, as our own pending one, and reclaimed. For each
    read: the entry decoded, and the peak of the memory Python allocated for it."""
    import tracemalloc

    async def new() -> list[Any]:
        return await consumer.read_new(10, 100)

    async def own() -> list[Any]:
        return (await consumer.read_own("-", 10))[0]

    async def reclaimed() -> list[Any]:
        return (await consumer.reclaim(0, "0-0", 10))[1]

    await consumer.ensure_group()
    written = (await client.xadd(consumer.layout.stream, fields)).decode()
    del fields
    seen: list[tuple[Message, int]] = []
    for read in (new, own, reclaimed):
        tracemalloc.start()
        try:
            ((entry_id, got),) = await read()
            assert entry_id == written and got is not None
            message = decode_entry(entry_id, got)
            del got
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        seen.append((message, peak))
    await client.delete(consumer.layout.stream)
    return seen


@pytest.mark.anyio
@pytest.mark.parametrize(
    "entry",
    [  # entries of about n bytes
        lambda n: {b"ids": b"[" + b'"job-0000001",' * (n // 14) + b'"job-0000002"]'},
        lambda n: {b"id": b"job-1", **{b"f%07d" % i: b"x" * 100 for i in range(n // 108)}},
    ],
    ids=["one huge field", "many small fields"],
)
async def test_serve_reads_an_entry_past_the_bound_in_memory_that_does_not_grow_with_it(
    redis_client: Any, redis_prefix: str, entry: Callable[[int], dict[Any, Any]]
) -> None:
    """redis-py read an entry whole before ``decode_entry`` refused it: 16 times the entry
    took 16 times the memory. Read as serve reads (``entry_reader``), new, pending and
    reclaimed, an entry eight times larger costs about the same, is refused with its true
    size, and its dead letter says what it said when it was read whole."""
    from worker.service.layout import MAX_ENTRY_BYTES, entry_size

    layout = StreamLayout(redis_prefix + "ids", "g")
    async with contextlib.AsyncExitStack() as stack:
        consumer = StreamConsumer(redis_client, layout, "c1", reader=_serve_s_reader(stack))
        small = await _read_each_way(redis_client, consumer, entry(256 * 1024))
        large = await _read_each_way(redis_client, consumer, entry(2048 * 1024))
    whole = entry(2048 * 1024)
    said = f"entry holds {entry_size(whole)} bytes; at most {MAX_ENTRY_BYTES}"
    for (message, peak), (_, small_peak) in zip(large, small, strict=True):
        assert message == decode_entry(message.entry_id, whole)  # the same refusal, payload
        assert message.problem == said
        assert peak < 2 * small_peak, (peak, small_peak)  # read whole: 8 times


@pytest.mark.anyio
async def test_an_entry_within_the_bound_is_read_whole_by_the_bounded_reader(
    redis_client: Any, redis_prefix: str
) -> None:
    """1,000 ids of 64 characters (the most an entry may name) come through intact."""
    layout = StreamLayout(redis_prefix + "ids", "g")
    ids = [f"{n:064d}" for n in range(1000)]
    fields = {b"ids": orjson.dumps(ids), b"note": b"n" * 60_000}
    async with contextlib.AsyncExitStack() as stack:
        consumer = StreamConsumer(redis_client, layout, "c1", reader=_serve_s_reader(stack))
        await consumer.ensure_group()
        await redis_client.xadd(layout.stream, fields)
        ((_, got),) = await consumer.read_new(10, 100)
    assert got == fields
    assert decode_entry("1-0", got).ids == tuple(ids)


@pytest.mark.anyio
async def test_a_four_megabyte_entry_is_dead_lettered_while_other_ids_flow(
    redis_prefix: str,
) -> None:
    async with running(redis_prefix, SimulatorConfig(jobs=5)) as svc:
        await svc.redis.xadd(svc.layout.stream, _million_ids_entry())
        await svc.enqueue(svc.sim.job_ids())
        await until(lambda: _true(len(svc.sim.deleted) == 5))
        await until(lambda: _zero(svc.pending()))
        dead: Any = await svc.redis.xrange(svc.layout.dead)
    assert svc.code == 0
    (entry,) = dead
    assert entry[1][b"reason"].startswith(b"entry holds")
    assert [e["reason"] for e in svc.events("serve.dead_lettered")] == [
        entry[1][b"reason"].decode()
    ]


@pytest.mark.anyio
async def test_an_entry_of_many_small_fields_is_dead_lettered_with_its_head_only(
    redis_prefix: str,
) -> None:
    """3 MB in 400,000 fields of one byte: the bound refused it, but only after every field
    was escaped into the payload kept with the dead letter, which took a replica from 78 to
    245 MB and wrote a 5.5 MB payload, larger than the entry, into the dead-letter stream.
    Now the payload shows the first fields and says how many more there were. Here 40,000
    fields (about 300 KB, over twice the bound), a tenth of the cost: with every field
    escaped again (the head not taken) it still fails. The 3 MB entry took over 15 s to
    read on a loaded machine and failed within its bound at load 14."""
    count = 40_000
    fields: dict[Any, Any] = {f"f{n}": "x" for n in range(count)}
    async with running(redis_prefix, SimulatorConfig(jobs=2)) as svc:
        await svc.redis.xadd(svc.layout.stream, fields)
        await svc.enqueue(svc.sim.job_ids())
        # the bound only stops a hang
        await until(lambda: _true(len(svc.sim.deleted) == 2), timeout=90)
        await until(lambda: _zero(svc.pending()), timeout=90)
        dead: Any = await svc.redis.xrange(svc.layout.dead)
    (entry,) = dead
    assert entry[1][b"reason"].startswith(b"entry holds")
    payload = orjson.loads(entry[1][b"payload"])
    assert len(entry[1][b"payload"]) < 64 * 1024
    assert payload["f0"] == "x" and payload["..."] == f"{count - len(payload) + 1} more fields"


def _outages_over(svc: Running) -> bool:
    return len(svc.events("serve.redis_back")) == len(svc.events("serve.redis_unreachable"))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@r.example:6380/3", "redis://r.example:6380/3"),
        ("rediss://reaper:hunter2@r.example/0?db=1", "rediss://reaper@r.example/0"),
        ("unix:///run/redis.sock?db=2&password=hunter2", "unix:///run/redis.sock"),
    ],
)
def test_the_redis_named_in_events_never_carries_its_password(url: str, shown: str) -> None:
    from worker.service.outage import redis_where

    assert redis_where(url) == shown


@pytest.mark.anyio
async def test_a_redis_outage_is_said_once_then_counted_quietly(redis_prefix: str) -> None:
    """Redis away until three calls have failed: one serve.redis_unreachable naming the Redis,
    the failed calls counted in the metrics and said only at debug level, and one
    serve.redis_back when it answers again. It was a warning per failed call (several a
    second), naming no Redis."""
    from worker.service.outage import redis_where

    proxy = RedisProxy(REDIS_URL)
    async with anyio.create_task_group() as relay:
        await relay.start(proxy.serve)
        async with running(redis_prefix, SimulatorConfig(jobs=5), redis_url=proxy.url) as svc:
            await svc.enqueue(svc.sim.job_ids())
            await until(lambda: _zero(svc.pending()))
            await proxy.go_away()
            # Away until two calls have failed after the one that said so (a fixed second
            # and a half saw too few on a loaded machine; counting the announcements too
            # was met by three short outages, none of whose later failures was waited for).
            await until(lambda: _true(len(svc.events("serve.redis_error")) >= 2), timeout=60)
            proxy.cut = False
            await until(lambda: _true(bool(svc.events("serve.redis_back"))))
            await until(lambda: _true(_outages_over(svc)))
            async with aiohttp.ClientSession() as http, http.get(svc.url("/metrics")) as answer:
                text = await answer.text()
        relay.cancel_scope.cancel()
    # One outage, said once (a pooled connection the outage broke may fail once more when
    # next used, after Redis is back: a second, true, short outage).
    down = svc.events("serve.redis_unreachable")
    assert 1 <= len(down) <= 3, down
    assert {e["redis"] for e in down} == {redis_where(proxy.url)} == {proxy.url}
    failed = svc.events("serve.redis_error")
    assert {e["log_level"] for e in failed} == {"debug"} and len(failed) >= 2
    counted = sum(e["failed_calls"] for e in svc.events("serve.redis_back"))
    assert counted == len(down) + len(failed)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["devserver_reaper_redis_errors"].samples[0].value == counted


@pytest.mark.anyio
@pytest.mark.parametrize("replaced", ["stream", "outcomes", "ratelimit", "pace", "position"])
async def test_a_queue_key_replaced_by_another_type_pauses_it_unready_until_mended(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch, replaced: str
) -> None:
    """The stream (or the outcomes stream) replaced by a string while serve runs: a read or
    a write answered WRONGTYPE, a traceback and exit 1 (then 78 on every restart). Now the
    replica pauses, unready (/readyz says which check fails), with an event naming the key,
    and takes up work again once the key is a stream again. The same for the rate limit's
    string (a hash there was a traceback too), the fleet's pace beside it, and the
    position's hash (a list there paused it naming no key at all)."""
    _short_pauses(monkeypatch)
    async with running(redis_prefix, SimulatorConfig(jobs=6)) as svc:
        ids = svc.sim.job_ids()
        await svc.enqueue(ids[:2])
        await until(lambda: _zero(svc.pending()))
        await until(lambda: _true(len(svc.sim.deleted) == 2))
        if replaced == "pace":  # the fleet's rate, beside the bucket
            key = svc.layout.ratelimit + ":pace"
        else:
            key = getattr(svc.layout, replaced)
        await svc.redis.delete(key)
        if replaced == "stream":  # the blocked read is answered UNBLOCKED, the stream made
            await until(lambda: _true(bool(svc.events("serve.group_recreated"))))
        if replaced == "ratelimit":
            await svc.redis.hset(key, "a", "hash")
        elif replaced == "position":
            await svc.redis.rpush(key, "a list")
        else:
            await svc.redis.set(key, "not a stream")  # and UNBLOCKED again: a traceback
        if replaced != "stream":
            await svc.enqueue(ids[2:4])  # their outcomes cannot be written, or no call paced
        await until(lambda: _true(bool(svc.events("serve.paused"))))
        async with aiohttp.ClientSession() as http, http.get(svc.url("/readyz")) as answer:
            assert answer.status == 503
            assert (await answer.json())["stream"] is False
        assert await _status(svc, "/healthz") == 200
        assert svc.code is None  # paused, not ended
        await svc.redis.delete(key)  # mended: the service makes the stream again itself
        await until(lambda: _true(len(svc.sim.deleted) >= 2))
        if replaced == "stream":
            await until(lambda: _true(len(svc.events("serve.group_recreated")) >= 2))
        await svc.enqueue(ids[4:])
        await until(lambda: _true(set(ids[4:]) <= svc.sim.deleted), timeout=20)
        await until(lambda: _ready(svc), timeout=5)
    assert svc.code == 0
    paused = svc.events("serve.paused")[0]
    assert paused["reason"] == "NotAStream" and paused["keys"] == [key]
    assert not [e for e in svc.logs if e.get("exc_info")]


@pytest.mark.anyio
async def test_a_dead_letter_stream_of_another_type_loses_no_dead_letter(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dead-letter key a string when an unreadable entry comes: the XADD and the XACK
    were one MULTI, which does not roll back, so the entry was acknowledged and its dead
    letter never written, with no event to say it. Now the entry stays pending until the
    key is mended, then is dead-lettered."""
    _short_pauses(monkeypatch)
    async with running(redis_prefix, SimulatorConfig(jobs=2)) as svc:
        await svc.redis.set(svc.layout.dead, "not a stream")
        await svc.redis.xadd(svc.layout.stream, {"ids": "[not json"})
        await until(lambda: _true(bool(svc.events("serve.paused"))))
        assert await svc.pending() == 1
        await svc.redis.delete(svc.layout.dead)
        await svc.enqueue(svc.sim.job_ids())
        await until(lambda: _true(len(svc.sim.deleted) == 2))
        await until(lambda: _zero(svc.pending()))
        dead: Any = await svc.redis.xrange(svc.layout.dead)
    assert [f[b"reason"] for _, f in dead] == [b"ids is not valid JSON"]
    assert len(svc.events("serve.dead_lettered")) == 1


async def _ready(svc: Running) -> bool:
    return await _status(svc, "/readyz") == 200


@pytest.mark.anyio
@pytest.mark.parametrize("interval", [0.3, 0.0])
async def test_serve_says_where_it_stands_every_stats_interval(
    redis_prefix: str, interval: float
) -> None:
    """A log reader saw per-id lines but never the whole: serve.stats now says the ids by
    outcome (in the interval and since start), ids/s, lag, pending, dead letters and the
    rate; a stats_interval of 0 switches it off."""
    async with running(redis_prefix, SimulatorConfig(jobs=30), stats_interval=interval) as svc:
        await svc.enqueue(svc.sim.job_ids())
        await svc.redis.xadd(svc.layout.stream, {"ids": "not json"})
        await until(lambda: _true(len(svc.sim.deleted) == 30))
        await until(lambda: _zero(svc.pending()))
        if interval:
            await until(lambda: _true(_said_all(svc, 30)))
        else:
            await anyio.sleep(0.6)
    said = svc.events("serve.stats")
    if not interval:
        assert said == []
        return
    last = said[-1]
    assert sum(e["deleted"] for e in said) == last["deleted_total"] == 30
    assert (last["lag"], last["pending"], last["dead_lettered_total"]) == (0, 0, 1)
    assert last["rate"] == 200.0 and last["in_flight"] == 0


@pytest.mark.anyio
@pytest.mark.parametrize(("rate", "starts_at"), [(200.0, 200.0), ("auto", 2.0)])
async def test_serve_stats_say_the_rate_the_limiter_starts_at_before_any_call(
    redis_prefix: str, rate: float | str, starts_at: float
) -> None:
    """A limiter is made on its first call: until the queue gave serve an id, every
    serve.stats said ``"rate": 0``, as if it were paced to nothing. It says the rate the
    limiter starts at: the fixed rate, or where ``--rate auto`` begins."""
    config = SimulatorConfig(jobs=3)
    async with running(redis_prefix, config, stats_interval=0.1, rate=rate) as svc:
        await until(lambda: _true(len(svc.events("serve.stats")) >= 2))
        assert svc.sim.stats.calls == 0  # nothing was sent: no limiter made yet
    said = svc.events("serve.stats")
    assert [e["rate"] for e in said] == [starts_at] * len(said)


def _said_all(svc: Running, n: int) -> bool:
    said = svc.events("serve.stats")
    return bool(said) and said[-1]["deleted_total"] == n and said[-1]["pending"] == 0


@pytest.mark.anyio
async def test_a_redis_that_never_answers_at_start_up_is_named_once_then_exit_69(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Start-up waits STARTUP_WAIT_S for Redis: one serve.redis_unreachable naming it, the
    failed pings counted, then serve.redis_unavailable and 69 (a warning per ping before)."""
    from worker.commands import serve as serve_module

    monkeypatch.setattr(serve_module, "STARTUP_WAIT_S", 1.0)
    values: dict[str, Any] = {
        "endpoint": "http://127.0.0.1:9", "project_id": "p1", "ak": "TESTAK", "sk": "SK",
        "redis_url": "redis://127.0.0.1:1/0", "http_port": 0,
    }  # fmt: skip
    settings = Settings(**values)
    with capture_logs() as logs:
        code = await serve(settings, "http://127.0.0.1:9", http_host="127.0.0.1")
    assert code == 69
    (said,) = [e for e in logs if e["event"] == "serve.redis_unreachable"]
    assert said["redis"] == "redis://127.0.0.1:1/0" and said["operation"] == "ping"
    (gave_up,) = [e for e in logs if e["event"] == "serve.redis_unavailable"]
    quiet = [e for e in logs if e["event"] == "serve.redis_error"]
    assert gave_up["failed_calls"] == len(quiet) + 1 >= 2


@pytest.mark.anyio
async def test_an_over_delivered_entry_naming_a_project_not_allowed_gives_its_ids_an_outcome(
    redis_prefix: str, redis_client: aioredis.Redis
) -> None:
    """An entry past ``max_deliveries`` (its readers died) that names a project outside
    ``allowed_projects`` (say the list was narrowed meanwhile): it was refused (its ids
    taken out as rejections) and then given up, which writes ``failed`` for its ids, of
    which none were left: dead-lettered with no outcome for any id. Now its ids end
    ``rejected`` with the reason, as a refused entry's always do."""
    stream = redis_prefix + "ids"
    await redis_client.xgroup_create(stream, "reapers", id="0", mkstream=True)
    entry = await redis_client.xadd(stream, {"id": "job-z1", "project_id": "project-z"})
    await redis_client.xreadgroup("reapers", "ghost", {stream: ">"})
    for _ in range(2):  # three deliveries to readers that died each time
        await redis_client.xclaim(stream, "reapers", "ghost", 0, [entry])
    async with running(redis_prefix, SimulatorConfig(jobs=1), max_deliveries=2,
                       reclaim_after=0.2) as svc:  # fmt: skip
        await until(lambda: _true(bool(svc.events("serve.dead_lettered"))), timeout=30)
        await until(lambda: _zero(svc.pending()))
        outcomes: Any = await svc.redis.xrange(svc.layout.outcomes)
    rows = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in outcomes]
    assert [(r["job_id"], r["outcome"]) for r in rows] == [("job-z1", "rejected")]
    assert rows[0]["error_msg"] == "project project-z is not in allowed_projects"
    assert svc.sim.deleted == set()


@pytest.mark.anyio
async def test_a_note_of_ids_sent_of_another_type_is_named_in_the_pause(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone else's key where an entry's note of ids sent goes (a hash): the note before
    the DELETE cannot be written, so serve pauses unready, as for any key of the queue of
    another type, and names that key (``keys``, and the message of the pauses after); it
    named none, and the pause after said nothing was wrong any more. Mended, it goes on."""
    _short_pauses(monkeypatch)
    async with running(redis_prefix, SimulatorConfig(jobs=1)) as svc:
        (job,) = svc.sim.job_ids()
        async with svc.redis.pipeline(transaction=True) as pipe:  # read with the key there
            pipe.xadd(svc.layout.stream, {"id": job}, id="1-1")
            pipe.hset(svc.layout.sending("1-1"), "someone", "else")
            await pipe.execute()
        note = svc.layout.sending("1-1")
        await until(lambda: _true(len(svc.events("serve.paused")) >= 2))
        assert not svc.sim.deleted
        await svc.redis.delete(note)
        await until(lambda: _true(job in svc.sim.deleted))
        await until(lambda: _zero(svc.pending()))
    first, second = svc.events("serve.paused")[:2]
    assert first["reason"] == second["reason"] == "NotAStream"
    assert first["keys"] == second["keys"] == [note]
    assert note in second["error"]
    assert not [e for e in svc.logs if e.get("exc_info")]


@pytest.mark.anyio
async def test_an_entry_naming_ids_twice_rejects_a_value_that_is_no_list_too(
    redis_prefix: str,
) -> None:
    """``XADD s * ids '["job-a"]' ids '"job-b"' ids 'x y'``: refused for the field named
    twice, ``job-a`` rejected with that reason, and the two values that are no JSON list
    each one ``rejected`` outcome saying so: they had none (every id an entry names gets an
    outcome), though the dead letter shows them."""
    async with running(redis_prefix, SimulatorConfig(jobs=1)) as svc:
        await svc.redis.execute_command(  # type: ignore[no-untyped-call]
            "XADD", svc.layout.stream, "*", "ids", '["job-a"]', "ids", '"job-b"', "ids", "x y"
        )
        await until(lambda: _zero(svc.pending()))
        await until(lambda: _true(len(svc.events("serve.dead_lettered")) == 1))
        outcomes: Any = await svc.redis.xrange(svc.layout.outcomes)
    rows = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in outcomes]
    assert sorted((r["job_id"], r["outcome"], r["error_msg"]) for r in rows) == [
        ('"job-b"', "rejected", "ids is not a JSON list"),
        ("job-a", "rejected", "names 'ids' 3 times: which one is meant is not clear "
                              "(Redis keeps each, a reader the last)"),
        ("x y", "rejected", "ids is not valid JSON"),
    ]  # fmt: skip
    assert not svc.sim.sent_counts


@pytest.mark.anyio
async def test_an_id_named_beside_a_rejected_value_of_the_same_text_is_still_sent_again(
    redis_prefix: str,
) -> None:
    """``{"ids": [1, "1"]}``: the number 1 is rejected (its row says ``1``), the string "1"
    is an id, which the API refuses (kept pending, tried again). The rejected row's mark on
    the entry's note (``=1``) read on the next delivery as id 1 done: it was never sent
    again and the entry was acked with id 1 given no outcome. Its mark is ``=!1`` now."""
    config = SimulatorConfig(jobs=1, reject_ids=frozenset({"1"}))
    async with running(redis_prefix, config, max_deliveries=2, reclaim_after=0.2) as svc:
        await svc.redis.xadd(svc.layout.stream, {"ids": '[1, "1"]'})
        await until(lambda: _true(bool(svc.events("job.rejected"))), timeout=30)  # read
        await until(lambda: _zero(svc.pending()), timeout=30)
        outcomes: Any = await svc.redis.xrange(svc.layout.outcomes)
    rows = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in outcomes]
    assert sorted((r["job_id"], r["outcome"]) for r in rows) == [("1", "failed"), ("1", "rejected")]
    assert [e["job_id"] for e in svc.events("job.failed")] == ["1"]  # on its last delivery
    assert len(svc.events("serve.dead_lettered")) == 1
    assert len(svc.events("job.rejected")) == 1
