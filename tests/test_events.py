"""EventLog's batch fast path: the same JSON objects as structlog, or structlog itself."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from worker import logsetup
from worker.outcomes.events import EventLog, rejection_event, result_event
from worker.types import JobRecord, Outcome, Rejection, Result, _parse_time, iso

_STAMP = re.compile(rb'"timestamp":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"')

RECORD = JobRecord.from_api(
    {"id": "job-1", "name": "n\u00e9\"x", "user_name": None, "description": "multi\nline",
     "type": "COMMON", "status": "DELETED", "abnormal_count": 0,
     "create_at": 1749536420547, "update_at": "2025-06-10T06:20:21Z"}
)  # fmt: skip
RESULTS = [
    Result("job-1", Outcome.DELETED, attempts=1, batch_id="b-1", http_status=200,
           request_id="req-1", record=RECORD),
    Result("job-2", Outcome.DELETED, attempts=1, batch_id="b-1", request_id=None),
    Result("job-3", Outcome.ABSENT, attempts=2, batch_id="b-1"),
    Result("job-4", Outcome.FAILED, attempts=3, batch_id="b-2", http_status=400,
           error_code="ModelArts.0001", error_msg="bad \u202e \"id\"", request_id=None),
    Result("job-5", Outcome.FAILED, attempts=1, batch_id="b-2"),
    Result("job-6", Outcome.SKIPPED, reason="dry-run"),
    Result("bad\x1b[31m\udcff id", Outcome.REJECTED, reason="invalid characters", line=7),
]  # fmt: skip
REJECTIONS = [
    Rejection(raw="\u202egnp.exe\n\udcff", line=3, reason="invalid characters"),
    Rejection(raw="x" * 200, line=4, reason="longer than 64 characters"),
]


class CountingBytes(io.BytesIO):
    """The binary stream under stdout, counting the writes it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.wrapper: io.TextIOWrapper | None = None

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def _json_stream(level: str = "info") -> tuple[io.TextIOWrapper, CountingBytes]:
    binary = CountingBytes()
    text = io.TextIOWrapper(binary, encoding="utf-8", write_through=True)
    binary.wrapper = text  # a wrapper that is collected closes the stream under it
    logsetup.configure(fmt="json", level=level, stream=text)
    return text, binary


def _lines(data: bytes) -> list[bytes]:
    """The lines with the (per-event vs per-batch) timestamp value made equal."""
    return [_STAMP.sub(b'"timestamp":"T"', line) for line in data.splitlines()]


def _structlog_then_fast(level: str = "info") -> tuple[list[bytes], list[bytes], EventLog]:
    _, binary = _json_stream(level)
    structlog.contextvars.bind_contextvars(run_id="run-42", worker="w\u00e9")
    events = EventLog(sink=logsetup.json_sink())
    for result in RESULTS:
        events.result(result)  # one event at a time: structlog's processor chain
    for rejection in REJECTIONS:
        events.rejected(rejection)
    slow = binary.getvalue()
    events.results(RESULTS)
    events.rejections(REJECTIONS)
    fast = binary.getvalue()[len(slow) :]
    return _lines(slow), _lines(fast), events


def test_fast_path_writes_byte_for_byte_what_structlog_writes_for_every_event_kind() -> None:
    slow, fast, events = _structlog_then_fast()
    assert events.fast_batches == 2
    assert len(slow) == len(RESULTS) + len(REJECTIONS)
    assert fast == slow  # same keys, same order, same values, same escaping
    objects = [orjson.loads(line) for line in fast]
    assert [o["event"] for o in objects] == [
        "job.deleted", "job.deleted", "job.absent", "job.failed", "job.failed", "job.skipped",
        "job.rejected", "job.rejected", "job.rejected",
    ]  # fmt: skip
    deleted = objects[0]
    assert deleted["create_at"] == "2025-06-10T06:20:20.547Z"
    assert deleted["update_at"] == "2025-06-10T06:20:21.000Z"
    assert deleted["user_name"] is None and deleted["name"] == 'n\u00e9"x'
    assert deleted["run_id"] == "run-42" and deleted["level"] == "info"
    assert objects[3]["level"] == "warning" and objects[3]["error_code"] == "ModelArts.0001"
    assert objects[6]["job_id"] == "bad\\x1b[31m\\udcff id"
    assert objects[7]["job_id"] == "\\u202egnp.exe\\n\\udcff"


def test_fast_path_keeps_level_filtering() -> None:
    slow, fast, _ = _structlog_then_fast(level="warning")
    assert fast == slow
    assert {orjson.loads(line)["level"] for line in fast} == {"warning"}
    assert len(fast) == 2 + 1 + len(REJECTIONS)


def test_a_field_wins_over_a_context_variable_of_the_same_name_in_both_paths() -> None:
    _, binary = _json_stream()
    structlog.contextvars.bind_contextvars(batch_id="from-context", run_id="r")
    events = EventLog(sink=logsetup.json_sink())
    events.result(RESULTS[2])
    slow = binary.getvalue()
    events.results([RESULTS[2]])
    fast = binary.getvalue()[len(slow) :]
    assert _lines(fast) == _lines(slow)
    assert orjson.loads(fast)["batch_id"] == "b-1"


_EVERY_FIELD = sorted(
    {key for result in RESULTS for key in result_event(result)[2]}
    | {key for rejection in REJECTIONS for key in rejection_event(rejection)[2]}
)


@pytest.mark.parametrize("name", ["level", "timestamp", "event", *_EVERY_FIELD])
def test_a_context_variable_named_like_an_added_key_or_a_field_renders_as_structlog_does(
    name: str,
) -> None:
    _, binary = _json_stream()
    structlog.contextvars.bind_contextvars(run_id="r", **{name: "from-context"})
    events = EventLog(sink=logsetup.json_sink())
    for result in RESULTS:
        events.result(result)
    slow = binary.getvalue()
    events.results(RESULTS)
    fast = binary.getvalue()[len(slow) :]
    assert events.fast_batches == 1
    assert _lines(fast) == _lines(slow)


def test_a_batch_is_one_write_with_one_timestamp() -> None:
    _, binary = _json_stream()
    events = EventLog(sink=logsetup.json_sink())
    before = binary.writes
    events.results(RESULTS)
    assert binary.writes == before + 1
    stamps = {orjson.loads(line)["timestamp"] for line in binary.getvalue().splitlines()}
    assert len(stamps) == 1


def test_capture_logs_sees_every_event_of_a_batch() -> None:
    _json_stream()
    events = EventLog(sink=logsetup.json_sink())
    with capture_logs() as captured:
        events.results(RESULTS)
        events.rejections(REJECTIONS)
    assert events.fast_batches == 0
    assert [c["event"] for c in captured].count("job.rejected") == 1 + len(REJECTIONS)
    assert len(captured) == len(RESULTS) + len(REJECTIONS)
    assert captured[0]["job_id"] == "job-1" and captured[0]["create_at"].endswith(".547Z")
    # after the block the JSON configuration is in force again, and so is the fast path
    events.results(RESULTS[:1])
    assert events.fast_batches == 1


def test_console_output_and_foreign_configurations_go_through_structlog() -> None:
    out = io.StringIO()
    logsetup.configure(fmt="console", stream=out)
    events = EventLog(sink=logsetup.json_sink())
    events.results(RESULTS[:1])
    assert events.fast_batches == 0 and "job.deleted" in out.getvalue()
    assert logsetup.json_sink() is None

    _json_stream()
    assert logsetup.json_sink() is not None
    structlog.configure(processors=[structlog.processors.JSONRenderer()])
    assert logsetup.json_sink() is None


def test_a_logger_of_the_callers_gets_every_event() -> None:
    _json_stream()
    seen: list[tuple[str, dict[str, object]]] = []

    class Recorder:
        def info(self, event: str, **fields: object) -> None:
            seen.append((event, fields))

        warning = info

    events = EventLog(logger=Recorder(), sink=logsetup.json_sink())
    events.results(RESULTS)
    assert events.fast_batches == 0
    assert [job for _, f in seen for job in [f["job_id"]]][:3] == ["job-1", "job-2", "job-3"]


def test_a_text_stream_without_bytes_gets_json_lines_on_both_paths() -> None:
    out = io.StringIO()
    logsetup.configure(fmt="json", stream=out)
    events = EventLog(sink=logsetup.json_sink())
    events.result(RESULTS[0])
    slow = out.getvalue()
    events.results(RESULTS[:1])
    fast = out.getvalue()[len(slow) :]
    assert events.fast_batches == 1
    assert slow.startswith('{"job_id":"job-1"')
    assert _lines(fast.encode()) == _lines(slow.encode())


def test_the_fast_path_is_the_sink_the_log_is_given_not_a_global() -> None:
    """An ``EventLog`` given no sink writes every event through structlog even while the
    JSON output is configured: the sink is passed in by the command, never looked up."""
    _, binary = _json_stream()
    given, unsunk = EventLog(sink=logsetup.json_sink()), EventLog()
    given.results(RESULTS[:2])
    through_sink = binary.getvalue()
    unsunk.results(RESULTS[:2])
    assert (given.fast_batches, unsunk.fast_batches) == (1, 0)
    assert _lines(binary.getvalue()[len(through_sink) :]) == _lines(through_sink)


def test_repr_shows_the_fast_path_state() -> None:
    _json_stream()
    events = EventLog(sink=logsetup.json_sink())
    events.results(RESULTS[:2])
    assert repr(events) == "EventLog(fast_batches=1, sink=JsonSink(min_level=INFO, active=True))"
    assert repr(logsetup.json_sink()) == "JsonSink(min_level=INFO, active=True)"


# -- job records: times kept as given, rendered like iso(datetime) ------------------------


_TIMES = st.one_of(
    st.integers(min_value=-(2**33) * 1000, max_value=2**33 * 1000),
    st.integers(min_value=0, max_value=2**33 * 1000).map(str),
    st.integers().map(lambda n: f" {n} "),
    st.floats(allow_nan=False, min_value=-1e14, max_value=1e14),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat().replace("+00:00", "Z")),
    st.sampled_from(["", None, True, "1.5", "\u00b2", "2025-06-10", "soon", 2**70, [1]]),
)


def _old(value: object) -> tuple[str | None, datetime | None] | type[Exception]:
    try:
        when = _parse_time(value)
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        return type(exc)
    return iso(when), when


def _new(value: object) -> tuple[str | None, datetime | None] | type[Exception]:
    try:
        record = JobRecord.from_api({"id": "job", "create_at": value})
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        return type(exc)
    return record.event_fields()["create_at"], record.create_at


@given(_TIMES)
def test_a_record_time_renders_and_validates_exactly_as_a_parsed_datetime_did(
    value: object,
) -> None:
    """create_at kept as epoch ms: the same ISO string, datetime and rejections as before."""
    assert _new(value) == _old(value)


def test_epoch_milliseconds_stay_ints_until_asked() -> None:
    record = JobRecord.from_api({"id": "j", "create_at": 1749536420547, "update_at": "-1"[1:]})
    assert record.create_stamp == 1749536420547 and record.update_stamp == 1
    assert record.create_at == datetime(2025, 6, 10, 6, 20, 20, 547000, tzinfo=UTC)
    assert record.event_fields()["update_at"] == "1970-01-01T00:00:00.001Z"
    before_1970 = JobRecord.from_api({"id": "j", "create_at": -1})
    assert before_1970.event_fields()["create_at"] == "1969-12-31T23:59:59.999Z"
