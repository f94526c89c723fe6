"""serve's pieces for many projects: what an entry names, where it is sent, which entries
wait on which (project, id), the pause of one endpoint, the bounded labels (no I/O), and a
handed-back entry's delivery given back (real Redis). The whole path (processes, Redis,
two simulators) is tests/test_serve_regions.py."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from tests.fakes import FakeClock
from worker.api.projects import IamUnavailable, ProjectNotFound
from worker.errors import ApiUnavailable, NoSuchApi, ServerError
from worker.pacing.breaker import BreakerGate
from worker.service.consumer import StreamConsumer
from worker.service.inflight import InFlight
from worker.service.layout import ONE_PROJECT, StreamLayout, aimed, decode_entry
from worker.service.lookups import Asking, RegionLookups
from worker.service.metrics import OTHER, Places, ServiceMetrics
from worker.service.regions import Paused, RegionRouter
from worker.targets import Address, LookupFailed, Target, Targets, endpoint_for
from worker.types import Batch, Outcome, Result

HOME = Target("project-a", "https://modelarts.cn-north-4.myhuaweicloud.com", "cn-north-4")
AWAY = Target("project-b", "https://modelarts.cn-south-1.myhuaweicloud.com", "cn-south-1")


def test_an_entry_may_name_project_and_region_each_held_to_its_rule() -> None:
    message = decode_entry("1-0", {b"id": b"job-1", b"project_id": b"project-b",
                                   b"region": b"cn-south-1"})  # fmt: skip
    assert message.ids == ("job-1",) and message.problem is None
    assert message.address == Address(project_id="project-b", region="cn-south-1")
    plain = decode_entry("2-0", {b"id": b"job-1"})
    assert plain.address is None and plain.ids == ("job-1",)
    bad = decode_entry("3-0", {b"id": b"job-1", b"region": b"North 4"})
    assert bad.ids == () and bad.refused
    assert bad.problem is not None and bad.problem.startswith("region must")
    assert [(r.raw, r.reason) for r in bad.rejections] == [("job-1", bad.problem)]
    plain_http = decode_entry("4-0", {b"id": b"job-1", b"project_id": b"p",
                                      b"endpoint": b"http://example.com"})  # fmt: skip
    assert plain_http.problem is not None and "loopback" in plain_http.problem
    huge = decode_entry("5-0", {b"id": b"job-1", b"project_id": b"p" * 100_000})
    assert huge.problem == "project_id is 100000 characters long"


def test_an_entry_is_sent_to_its_project_or_refused_with_the_reason() -> None:
    targets = Targets(HOME, allowed=["project-a", "project-b"])
    named = decode_entry("1-0", {"id": "job-1", "project_id": "project-b",
                                 "region": "cn-south-1"})  # fmt: skip
    assert aimed(named, targets).target == AWAY
    # Naming the default's own place is the default: its events and labels as before.
    own = decode_entry("2-0", {"id": "job-1", "project_id": "project-a"})
    assert aimed(own, targets).target is None and not aimed(own, targets).refused
    stranger = aimed(decode_entry("3-0", {"ids": '["job-1", "job-2"]',
                                          "project_id": "project-z"}), targets)  # fmt: skip
    assert stranger.refused and stranger.ids == ()
    assert stranger.problem == "project project-z is not in allowed_projects"
    assert [(r.raw, r.reason) for r in stranger.rejections] == [
        ("job-1", stranger.problem), ("job-2", stranger.problem)
    ]  # fmt: skip
    nowhere = aimed(decode_entry("4-0", {"id": "job-1", "region": "cn-east-3"}), targets)
    assert nowhere.refused and nowhere.problem == (
        "names region cn-east-3 but no project_id (a project id belongs to one region)"
    )
    alone = aimed(decode_entry("5-0", {"id": "job-1", "project_id": "project-b"}), None)
    assert alone.refused and alone.problem == ONE_PROJECT


def test_with_no_allowed_projects_serve_sends_to_the_default_only() -> None:
    """What assembly.serve_targets builds from an empty allowed_projects."""
    targets = Targets(HOME, allowed=[HOME.project_id])
    assert aimed(decode_entry("1-0", {"id": "job-1"}), targets).target is None
    other = aimed(decode_entry("2-0", {"id": "job-1", "project_id": "project-b"}), targets)
    assert other.refused


def test_the_same_id_for_two_projects_is_two_jobs_each_waited_on_alone() -> None:
    inflight = InFlight()
    home = aimed(decode_entry("1-0", {"id": "job-1"}), Targets(HOME, allowed=["project-a"]))
    away = aimed(decode_entry("2-0", {"id": "job-1", "project_id": "project-b",
                                      "region": "cn-south-1"}),
                 Targets(HOME, allowed=["project-a", "project-b"]))  # fmt: skip
    assert inflight.add(home, 1).send == ("job-1",)
    assert inflight.add(away, 1).send == ("job-1",)  # not folded into the default's
    done = inflight.settle([Result("job-1", Outcome.DELETED, target=AWAY)])
    assert [d.entry_id for d in done] == ["2-0"] and "1-0" in inflight
    assert inflight.entries_of("job-1") == ("1-0",) and inflight.entries_of("job-1", AWAY) == ()
    assert list(inflight.release(["job-1"], None)) == ["1-0"] and len(inflight) == 0


class _Lane:
    """A lane that answers each batch as the test says: ``answer(True)`` lets one through,
    ``answer(False)`` ends one ``ApiUnavailable`` (naming ``unsure`` as sent unanswered)."""

    def __init__(self, clock: FakeClock) -> None:
        self.seen: list[tuple[str, frozenset[str]]] = []
        self._answers: list[bool] = []
        self._given = anyio.Event()
        self.gate = BreakerGate(clock=clock)
        self.unsure: frozenset[str] = frozenset()

    def answer(self, *answers: bool) -> None:
        self._answers.extend(answers)
        self._given.set()

    async def process(self, batch: Batch) -> None:
        self.seen.append((batch.batch_id, batch.unsure))
        while not self._answers:
            if self._given.is_set():  # spent: wait for the next answer
                self._given = anyio.Event()
            await self._given.wait()
        if not self._answers.pop(0):
            exc = ApiUnavailable(ServerError("503"), batch_id=batch.batch_id, open_ids=len(batch))
            exc.unsure = self.unsure
            raise exc


async def _send(router: RegionRouter, batch: Batch, into: list[BaseException]) -> None:
    """``batch`` through ``router``; an ``ApiUnavailable`` (or ``Paused``) kept in ``into``."""
    try:
        await router.process(batch)
    except ApiUnavailable as exc:
        into.append(exc)


def _router(lanes: dict[Target | None, _Lane], said: list[str], **kw: Any) -> RegionRouter:
    return RegionRouter(
        lane=lambda target: lanes[target], gate=lambda target: lanes[target].gate,
        place=lambda target: target or HOME,
        on_pause=lambda target, error: said.append(f"paused {target}"),
        on_resume=lambda target: said.append(f"resumed {target}"), **kw,
    )  # fmt: skip


@pytest.mark.anyio
async def test_a_paused_endpoint_keeps_one_probe_and_hands_back_the_rest_the_others_served() -> (
    None
):
    clock = FakeClock()
    home, away = _Lane(clock), _Lane(clock)
    said: list[str] = []
    router = _router({None: home, AWAY: away}, said)
    home.answer(True)
    await router.process(Batch("h1", ("a",)))
    handed: list[BaseException] = []
    async with anyio.create_task_group() as group:
        away.unsure = frozenset({"x"})  # its first try's answer was lost
        away.answer(False)
        group.start_soon(_send, router, Batch("b1", ("x",), target=AWAY), handed)
        await anyio.wait_all_tasks_blocked()  # b1 failed, and waits to go again
        assert said == [f"paused {AWAY}"] and router.probes == 1 and not handed
        await _send(router, Batch("b2", ("y",), target=AWAY), handed)
        assert [type(e) for e in handed] == [Paused]  # handed back unsent
        home.answer(True)
        await router.process(Batch("h2", ("c",)))  # the other endpoint is served meanwhile
        away.answer(True)  # the region is back: the probe is answered
    assert not [e for e in handed if not isinstance(e, Paused)]
    assert away.seen == [("b1", frozenset()), ("b1", frozenset({"x"}))]  # never called absent
    assert said == [f"paused {AWAY}", f"resumed {AWAY}"] and router.handed_back == 1
    assert [b for b, _ in home.seen] == ["h1", "h2"]
    assert dict(router.down()) == {None: False, AWAY: False}


@pytest.mark.anyio
async def test_a_stop_ends_the_probe_with_its_ids_left_open_and_their_doubt_kept() -> None:
    clock = FakeClock()
    home, away = _Lane(clock), _Lane(clock)
    stopping = False
    router = _router({None: home, AWAY: away}, [], stopping=lambda: stopping)
    home.answer(True)
    await router.process(Batch("h1", ("a",)))
    failed: list[BaseException] = []
    async with anyio.create_task_group() as group:
        away.unsure = frozenset({"x"})
        away.answer(False)
        group.start_soon(_send, router, Batch("b1", ("x",), target=AWAY), failed)
        await anyio.wait_all_tasks_blocked()
        stopping = True
        away.unsure = frozenset()
        away.answer(False)
    (error,) = failed
    assert isinstance(error, ApiUnavailable) and not isinstance(error, Paused)
    assert error.unsure == {"x"}


@pytest.mark.anyio
async def test_with_one_endpoint_met_its_batches_wait_for_it_as_before() -> None:
    """One project's serve is unchanged: no batch is handed back or held as a probe, however
    its API fares; each ends ApiUnavailable when its attempts are spent, and nothing says a
    region paused (it said so, and resumed, though nothing was ever handed back)."""
    lane = _Lane(FakeClock())
    said: list[str] = []
    router = _router({None: lane}, said)
    failed: list[BaseException] = []
    lane.answer(False)
    await _send(router, Batch("b1", ("x",)), failed)
    async with anyio.create_task_group() as group:
        group.start_soon(_send, router, Batch("b2", ("y",)), failed)
        group.start_soon(_send, router, Batch("b3", ("z",)), failed)
        await anyio.wait_all_tasks_blocked()
        assert [b for b, _ in lane.seen] == ["b1", "b2", "b3"]  # both went in
        lane.answer(False, False)
    assert [type(e) for e in failed] == [ApiUnavailable] * 3
    assert router.handed_back == 0 and router.probes == 0
    lane.answer(True)
    await router.process(Batch("b4", ("w",)))
    assert said == [] and not router.paused


class _Refusing:
    """A lane whose gateway does not know the project: the 404 of a wrong region."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.release = anyio.Event()

    async def process(self, batch: Batch) -> None:
        self.seen.append(batch.batch_id)
        await self.release.wait()
        raise NoSuchApi("404 APIGW.0101", http_status=404)


@pytest.mark.anyio
async def test_a_named_project_its_endpoint_refuses_pauses_that_project_not_the_replica() -> None:
    """An entry naming an allowed project at the wrong region must not stop the others: its
    404 becomes its own pause (entries pending, one probe at a time); the default project's
    404 still goes up to pause the replica, as it always has."""
    clock = FakeClock()
    stray = Target("project-b", HOME.endpoint, "cn-north-4")  # project-b is not there
    home, refusing = _Lane(clock), _Refusing()
    said: list[str] = []
    router = RegionRouter(
        lane=lambda target: refusing if target == stray else home,
        gate=lambda target: home.gate, place=lambda target: target or HOME,
        on_pause=lambda target, error: said.append(f"paused {target}"),
    )  # fmt: skip
    refusing.release.set()
    with pytest.raises(ApiUnavailable) as first:
        await router.process(Batch("s1", ("x",), target=stray))
    assert isinstance(first.value.cause, NoSuchApi) and said == [f"paused {stray}"]
    refusing.release = anyio.Event()
    handed: list[BaseException] = []
    async with anyio.create_task_group() as group:
        group.start_soon(_send, router, Batch("s2", ("y",), target=stray), handed)
        await anyio.wait_all_tasks_blocked()
        await _send(router, Batch("s3", ("z",), target=stray), handed)
        assert [type(e) for e in handed] == [Paused] and refusing.seen == ["s1", "s2"]
        home.answer(True, True)
        await router.process(Batch("h1", ("a",)))  # the same endpoint's default: served
        await router.process(Batch("h2", ("b",)))
        refusing.release.set()
    assert [b for b, _ in home.seen] == ["h1", "h2"] and dict(router.down())[stray] is True
    home_refused = RegionRouter(lane=lambda target: refusing, gate=lambda target: home.gate,
                                place=lambda target: HOME)  # fmt: skip
    with pytest.raises(NoSuchApi):
        await home_refused.process(Batch("d1", ("a",)))


def test_labels_come_from_the_settings_never_from_what_an_entry_names() -> None:
    places = Places(HOME, ["project-b"], ["cn-south-1"])
    assert places.of(None) == ("project-a", "cn-north-4")
    assert places.of(AWAY) == ("project-b", "cn-south-1")
    assert places.of(Target("project-b", "https://x.example", "zz-made-up")) == (
        "project-b", OTHER
    )  # fmt: skip
    assert places.of(Target("project-z", "https://x.example")) == (OTHER, "")
    metrics = ServiceMetrics(places=places)
    before = len(next(iter(metrics.registry.collect())).samples)
    for n in range(300):
        metrics.outcome(Outcome.DELETED, target=Target("project-b", "https://x.example",
                                                       f"zz-r{n}"))  # fmt: skip
    samples = next(iter(metrics.registry.collect())).samples  # ids_total
    assert len(samples) - before == 4  # one place met: its 4 outcomes (no _created series)


@pytest.mark.anyio
async def test_an_entry_handed_back_unsent_has_its_delivery_given_back(
    redis_client: Any, redis_prefix: str
) -> None:
    """A paused region's entries are handed back with nothing tried: the reclaim that takes
    them up again must not count a delivery more, or a long outage of one region would
    dead-letter ids never sent. Given back, the reclaim counts the one it makes."""
    layout = StreamLayout(redis_prefix + "ids", "g")
    consumer = StreamConsumer(redis_client, layout, "c1")
    await consumer.ensure_group()
    await redis_client.xadd(layout.stream, {"id": "job-1"})
    await redis_client.xadd(layout.stream, {"id": "job-2"})
    (first, _), (second, _) = await consumer.read_new(10, 100)
    assert await consumer.give_back([first]) == 1
    assert await consumer.deliveries([first, second]) == {first: 0, second: 1}
    _, taken = await consumer.reclaim(0, "0-0", 10)
    assert [e for e, _ in taken] == [first, second]
    assert await consumer.deliveries([first, second]) == {first: 1, second: 2}


async def _answer(lookups: RegionLookups, named: Address) -> Target | str | LookupFailed:
    """What ``lookups`` says of ``named`` once IAM has answered (it is asked beside)."""
    found = await lookups.find(named)
    while isinstance(found, LookupFailed) and isinstance(found.error, Asking):
        await anyio.wait_all_tasks_blocked()
        found = await lookups.find(named)
    return found


@pytest.mark.anyio
async def test_a_region_alone_is_looked_up_once_a_failure_held_then_asked_again() -> None:
    """serve's look-up of an entry's region (worker.service.lookups): IAM is asked once for a
    region found, beside the caller (which is told to wait, and woken by the answer), the
    project held to allowed_projects; a failure is held for the region (no call for each
    entry) and asked again after the hold, IAM unreachable waking the intake once to read
    the entries left pending."""
    asked: list[str] = []
    answers: dict[str, list[Exception | str]] = {
        "cn-south-1": ["project-b"],
        "cn-east-3": [ProjectNotFound("IAM has no project named cn-east-3")],
        "cn-west-9": ["project-z"],
        "eu-west-0": [IamUnavailable("IAM did not answer"), "project-c"],
    }

    async def lookup(region: str) -> str:
        asked.append(region)
        answer = answers[region].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    clock = FakeClock()
    failed: list[LookupFailed] = []
    targets = Targets(HOME, allowed=["project-a", "project-b", "project-c"])
    targets.look_up_with(lookup)
    lookups = RegionLookups(targets, clock, retry_s=30, on_failed=failed.append)
    async with anyio.create_task_group() as group:
        await group.start(lookups.run)
        south = Address(region="cn-south-1", endpoint="http://127.0.0.1:1")
        waiting = await lookups.find(south)
        assert isinstance(waiting, LookupFailed) and waiting.later  # its entry waits
        assert waiting.reason == "the project of region cn-south-1 is being looked up in IAM"
        assert not lookups.due(clock.now())  # not answered yet
        for _ in range(3):
            found = await _answer(lookups, south)
            assert found == Target("project-b", "http://127.0.0.1:1", "cn-south-1")
        assert asked == ["cn-south-1"]
        assert lookups.due(clock.now()) and not lookups.due(clock.now())  # the answer woke it

        stranger = await _answer(lookups, Address(region="cn-west-9"))
        assert stranger == "project project-z is not in allowed_projects"

        nowhere = await _answer(lookups, Address(region="cn-east-3"))
        assert isinstance(nowhere, LookupFailed) and not nowhere.later
        assert nowhere.reason.endswith("IAM has no project named cn-east-3")
        assert await lookups.find(Address(region="cn-east-3")) is nowhere  # held: not asked
        lookups.due(clock.now())

        down = await _answer(lookups, Address(region="eu-west-0"))
        assert isinstance(down, LookupFailed) and down.later
        assert await lookups.find(Address(region="eu-west-0")) is down
        assert asked.count("eu-west-0") == 1
        assert [f.region for f in failed] == ["cn-east-3", "eu-west-0"]
        assert lookups.due(clock.now())  # the answer (a failure) is an answer
        assert not lookups.due(clock.now())
        await clock.sleep(30)
        assert lookups.due(clock.now()) and not lookups.due(clock.now())  # once
        found = await _answer(lookups, Address(region="eu-west-0"))
        assert found == Target("project-c", endpoint_for("eu-west-0"), "eu-west-0")
        assert asked.count("eu-west-0") == 2
        group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_each_region_waiting_on_iam_wakes_the_intake_when_its_own_hold_is_over() -> None:
    """Two regions' look-ups failing 10 s apart: the first hold's end woke the intake, and
    the second region's entries, read again then and still held, were never woken for at
    the end of their own hold (they waited for a reclaim instead)."""

    async def lookup(region: str) -> str:
        raise IamUnavailable("IAM did not answer")

    clock = FakeClock()
    targets = Targets(HOME, allowed=["project-a", "project-b", "project-c"])
    targets.look_up_with(lookup)
    lookups = RegionLookups(targets, clock, retry_s=30)
    async with anyio.create_task_group() as group:
        await group.start(lookups.run)
        first = await _answer(lookups, Address(region="eu-west-0"))
        await clock.sleep(10)
        second = await _answer(lookups, Address(region="cn-east-3"))
        assert isinstance(first, LookupFailed) and isinstance(second, LookupFailed)
        assert lookups.due(clock.now())  # their answers
        await clock.sleep(20)
        assert lookups.due(clock.now()) and not lookups.due(clock.now())  # eu-west-0's hold
        assert await lookups.find(Address(region="cn-east-3")) is second  # still held
        assert lookups.asked == 2  # held: IAM not asked again for it
        await clock.sleep(9)
        assert not lookups.due(clock.now())
        await clock.sleep(1)
        assert lookups.due(clock.now())  # cn-east-3's hold is over: its entries are read again
        group.cancel_scope.cancel()
