"""Input sources: every format, gzip, stdin, rejections with line numbers, bounded memory."""

from __future__ import annotations

import csv
import errno
import gc
import gzip
import io
import json
import os
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from worker.errors import InputUnreadable, UsageError
from worker.input.intake import validate
from worker.input.sources import Entry, detect_format, read_chunks, read_entries
from worker.types import JOB_ID_RE, Candidate, Rejection

FORMATS = ("text", "jsonl", "csv", "json")
job_ids = st.from_regex(JOB_ID_RE, fullmatch=True)


class Trickle(io.RawIOBase):
    """A stream that hands out at most ``step`` bytes per read, like a slow pipe.

    Reads falling at every possible place pin that no entry depends on where a read ends.
    """

    def __init__(self, data: bytes, step: int) -> None:
        super().__init__()
        self._data = memoryview(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        count = self._step if size < 0 else min(size, self._step)
        chunk, self._data = self._data[:count], self._data[count:]
        return bytes(chunk)

    read1 = read


class FailingStream(io.RawIOBase):
    """Delivers ``data``, then fails the next read with EIO (a disk or NFS error)."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data: bytes | None = data

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._data is None:
            raise OSError(errno.EIO, "Input/output error")
        data, self._data = self._data, None
        return data

    read1 = read


def read(data: bytes, fmt: str = "text", max_line_bytes: int = 4096) -> list[Entry]:
    return list(read_entries("-", fmt, stdin=io.BytesIO(data), max_line_bytes=max_line_bytes))


def shown(entries: list[Entry]) -> list[tuple[int, str] | tuple[int, str, str]]:
    """Entries as (line, id) for candidates and (line, raw, reason) for rejections."""
    return [
        (e.line, e.job_id) if isinstance(e, Candidate) else (e.line, e.raw, e.reason)
        for e in entries
    ]


def write(ids: list[str], fmt: str) -> bytes:
    """``ids`` in ``fmt``, varying the shapes each format allows."""
    if fmt == "text":
        return "".join(f"{job_id}\n" for job_id in ids).encode()
    if fmt == "jsonl":
        shapes = [
            lambda i: json.dumps(i),
            lambda i: json.dumps({"id": i, "name": "n"}),
            lambda i: json.dumps({"job_id": i}),
        ]
        return "".join(shapes[n % 3](i) + "\n" for n, i in enumerate(ids)).encode()
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["name", "job_id", "status"])
        writer.writerows([f"name,{n}", job_id, "RUNNING"] for n, job_id in enumerate(ids))
        return out.getvalue().encode()
    return json.dumps([{"id": i} if n % 2 else i for n, i in enumerate(ids)], indent=1).encode()


# --- format detection --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ids.txt", "text"),
        ("ids.ids", "text"),
        ("ids", "text"),
        ("-", "text"),
        ("ids.log", "text"),
        ("ids.jsonl", "jsonl"),
        ("ids.ndjson", "jsonl"),
        ("ids.csv", "csv"),
        ("IDS.CSV", "csv"),
        ("ids.json", "json"),
        ("ids.txt.gz", "text"),
        ("ids.gz", "text"),
        ("ids.jsonl.gz", "jsonl"),
        ("ids.csv.GZ", "csv"),
        ("/data/v1.2/ids.json.gz", "json"),
        ("/data/v1.json/ids", "text"),
    ],
)
def test_format_follows_the_file_name_looking_through_gz(name: str, expected: str) -> None:
    assert detect_format(name) == expected


def test_an_explicit_format_wins_over_the_name_and_stdin() -> None:
    assert detect_format("ids.txt", "csv") == "csv"
    assert detect_format("-", "json") == "json"


def test_an_unknown_explicit_format_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown input format 'xml'"):
        detect_format("ids.txt", "xml")


# --- text -----------------------------------------------------------------------------------


def test_text_skips_blank_lines_and_comments_and_strips_whitespace() -> None:
    data = b"# ids to delete\n\n  job-1  \n\tjob_2\r\n   \n  # indented comment\njob-3"
    assert shown(read(data)) == [(3, "job-1"), (4, "job_2"), (7, "job-3")]


def test_text_comments_are_whole_lines_only() -> None:
    """A trailing comment is not guessed away: the line is rejected, never half-read."""
    assert shown(read(b"job-1 # old\n")) == [
        (1, "job-1 # old", "invalid character ' ' at position 6")
    ]


def test_text_drops_a_utf8_byte_order_mark() -> None:
    assert shown(read(b"\xef\xbb\xbfjob-1\njob-2\n")) == [(1, "job-1"), (2, "job-2")]


def test_text_rejects_invalid_ids_with_line_and_reason_and_keeps_going() -> None:
    data = b"ok-1\n" + b"x" * 65 + b"\nbad/id\nok-2\n"
    assert shown(read(data)) == [
        (1, "ok-1"),
        (2, "x" * 65, "too long (65 characters; at most 64)"),
        (3, "bad/id", "invalid character '/' at position 4"),
        (4, "ok-2"),
    ]


def test_a_line_that_is_not_utf8_is_rejected_and_the_rest_is_read() -> None:
    assert shown(read(b"ok-1\nab\xff\xfecd\nok-2\n")) == [
        (1, "ok-1"),
        (2, "ab\ufffd\ufffdcd", "not valid UTF-8"),
        (3, "ok-2"),
    ]


def test_a_line_over_the_limit_is_rejected_and_the_next_line_is_read() -> None:
    data = b"ok-1\n" + b"y" * 100 + b"\nok-2\n" + b"z" * 11
    assert shown(read(data, max_line_bytes=10)) == [
        (1, "ok-1"),
        (2, "y" * 10, "line longer than 10 bytes"),
        (3, "ok-2"),
        (4, "z" * 10, "line longer than 10 bytes"),
    ]


def test_a_line_of_exactly_the_limit_is_read_even_with_crlf() -> None:
    assert shown(read(b"0123456789\r\nabc\r\n", max_line_bytes=10)) == [
        (1, "0123456789"),
        (2, "abc"),
    ]


def test_an_empty_input_has_no_entries_in_any_format() -> None:
    for fmt in FORMATS:
        assert read(b"", fmt) == []


# --- JSON Lines -----------------------------------------------------------------------------


def test_jsonl_reads_strings_and_objects_with_id_or_job_id() -> None:
    data = (
        b'"job-1"\n{"id": "job-2", "name": "x"}\n\n{"job_id": "job-3"}\n{"id":"j4","job_id":"j4"}\n'
    )
    assert shown(read(data, "jsonl")) == [(1, "job-1"), (2, "job-2"), (4, "job-3"), (5, "j4")]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"job-1", "not JSON: Expecting value"),
        (b'{"id": "a"', "not JSON: Expecting ',' delimiter"),
        (b'{"name": "a"}', "object has no 'id' or 'job_id'"),
        (b'{"id": 12}', "'id' is not a string (got a number)"),
        (b'{"job_id": null}', "'job_id' is not a string (got null)"),
        (b'{"id": ["a"]}', "'id' is not a string (got an array)"),
        (b'{"id": "a", "job_id": "b"}', "the object's 'id' and 'job_id' differ"),
        (b"42", "expected a string or an object with 'id' or 'job_id', got a number"),
        (b"true", "expected a string or an object with 'id' or 'job_id', got a boolean"),
        (b'["a"]', "expected a string or an object with 'id' or 'job_id', got an array"),
    ],
)
def test_jsonl_rejects_each_bad_line_with_its_reason(line: bytes, reason: str) -> None:
    assert shown(read(b'"ok"\n' + line + b'\n"ok2"\n', "jsonl")) == [
        (1, "ok"),
        (2, line.decode(), reason),
        (3, "ok2"),
    ]


TWICE = "which one is meant is not clear (a JSON reader would keep the last)"


@pytest.mark.parametrize(
    ("line", "named"),
    [
        (b'{"id": "a", "id": "b"}', "'id' twice"),
        (b'{"id": "a", "id": "a"}', "'id' twice"),
        (b'{"job_id": "a", "x": 1, "job_id": "b", "job_id": "c"}', "'job_id' 3 times"),
        (b'{"id": "a", "project_id": "p", "project_id": "q"}', "'project_id' twice"),
        (b'{"id": "a", "region": "cn-north-4", "region": "cn-east-3"}', "'region' twice"),
        (b'{"id": "a", "endpoint": "https://a", "endpoint": "https://b"}', "'endpoint' twice"),
        (b'{"id": "a", "\\u0069d": "b"}', "'id' twice"),
    ],
)
def test_jsonl_a_line_naming_a_field_it_is_read_for_twice_is_rejected(
    line: bytes, named: str
) -> None:
    """Which id, or which project, a line means would be the parser's last-wins guess: for
    a tool that deletes, the line is refused with the reason; in a JSON array too."""
    reason = f"names {named}: {TWICE}"
    assert shown(read(b'"ok"\n' + line + b'\n"ok2"\n', "jsonl")) == [
        (1, "ok"),
        (2, line.decode(), reason),
        (3, "ok2"),
    ]
    assert shown(read(b"[" + line + b"]", "json")) == [(1, line.decode(), reason)]


def test_jsonl_keys_named_twice_elsewhere_are_not_a_field_named_twice() -> None:
    """Only the line's own fields count: the same name nested, as a value, or another key
    repeated leaves the line as it was read."""
    data = (
        b'{"id": "a", "meta": {"id": "x", "id": "y"}}\n{"id": "b", "name": "id"}\n'
        b'{"id": "c", "note": "n", "note": "m"}\n{"id": "d", "name": "\\"quoted\\""}\n'
    )
    assert shown(read(data, "jsonl")) == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]


def test_jsonl_values_the_parser_refuses_are_rejected_not_fatal() -> None:
    """Nesting past the recursion limit makes Python's parser raise RecursionError, not
    JSONDecodeError: it once killed the reader thread and left the run waiting for ever."""
    data = b'"ok-1"\n' + b"[" * 2000 + b"]" * 2000 + b'\n"ok-2"\n'
    assert [(e.line, getattr(e, "reason", None)) for e in read(data, "jsonl")] == [
        (1, None),
        (2, "not JSON: nested too deeply"),
        (3, None),
    ]


def test_jsonl_string_ids_are_validated_exactly_as_written() -> None:
    """Inside JSON quotes the spaces are part of the value: rejected, not stripped."""
    assert shown(read(b'" job-1"\n', "jsonl")) == [
        (1, " job-1", "invalid character ' ' at position 1")
    ]


def test_jsonl_non_utf8_and_over_long_lines_are_rejected() -> None:
    data = b'"a\xffb"\n"' + b"q" * 50 + b'"\n"ok"\n'
    assert shown(read(data, "jsonl", max_line_bytes=20)) == [
        (1, '"a\ufffdb"', "not valid UTF-8"),
        (2, '"' + "q" * 19, "line longer than 20 bytes"),
        (3, "ok"),
    ]


# --- CSV ------------------------------------------------------------------------------------


def test_csv_reads_the_id_column_with_physical_line_numbers() -> None:
    data = (
        b"name,ID ,status\n"
        b"first,job-1,RUNNING\n"
        b'"two\nline name", job-2 ,STOPPED\n'
        b"\n"
        b",,\n"
        b"last,job-3,RUNNING\n"
    )
    assert shown(read(data, "csv")) == [(2, "job-1"), (3, "job-2"), (7, "job-3")]


def test_csv_accepts_a_job_id_column() -> None:
    assert shown(read(b"job_id\nj1\nj2\n", "csv")) == [(2, "j1"), (3, "j2")]


def test_csv_without_an_id_column_is_a_usage_error_naming_the_columns_found() -> None:
    with pytest.raises(
        UsageError, match=r"no 'id' or 'job_id' column \(columns found: 'name', 'uuid'\)"
    ):
        read(b"name,uuid\nx,job-1\n", "csv")


def test_csv_without_a_header_is_a_usage_error_not_a_silently_lost_first_id() -> None:
    with pytest.raises(UsageError, match="columns found: 'job-1'"):
        read(b"job-1\njob-2\n", "csv")


def test_csv_rows_missing_the_field_or_with_bad_ids_are_rejected() -> None:
    data = b"name,id\nonly-name\nx,bad id\ny,\nz,job-9\n"
    assert shown(read(data, "csv")) == [
        (2, "only-name", "row has no 'id' field (it has 1; the header has 2)"),
        (3, "bad id", "invalid character ' ' at position 4"),
        (4, "", "empty"),
        (5, "job-9"),
    ]


def test_csv_rows_with_more_fields_than_the_header_are_rejected_naming_them() -> None:
    """An unquoted comma shifts every column after it, the project's included: the row is
    refused, its line and its extra fields named, not read by position."""
    data = b"id,name,project_id\nj1,x,p\nj2,a,b,proj-x\nj3,x,p,\nj4,x,p,1,2,3,4\nj5,x,p\n"
    assert shown(read(data, "csv")) == [
        (2, "j1"),
        (3, "j2,a,b,proj-x", "row has 4 fields, the header 3: the fields beyond it ('proj-x') "
                             "name no column (an unquoted comma shifts the columns after it)"),
        (4, "j3,x,p,", "row has 4 fields, the header 3: the fields beyond it ('') name no "
                       "column (an unquoted comma shifts the columns after it)"),
        (5, "j4,x,p,1,2,3,4", "row has 7 fields, the header 3: the fields beyond it ('1', '2', "
                              "'3', … (4 in all)) name no column (an unquoted comma shifts the "
                              "columns after it)"),
        (6, "j5"),
    ]  # fmt: skip


def test_csv_with_both_id_columns_rejects_rows_where_they_differ() -> None:
    assert shown(read(b"id,job_id\na,a\nb,c\n", "csv")) == [
        (2, "a"),
        (3, "b,c", "the 'id' and 'job_id' fields differ"),
    ]


def test_csv_bad_lines_become_rejections_in_order() -> None:
    data = b"id\nj1\n\xff\xff\n" + b"w" * 40 + b"\nj2\na\rb\nj3\n"
    assert shown(read(data, "csv", max_line_bytes=30)) == [
        (2, "j1"),
        (3, "\ufffd\ufffd", "not valid UTF-8"),
        (4, "w" * 30, "line longer than 30 bytes"),
        (5, "j2"),
        (6, "a\rb", "not valid CSV: new-line character seen in unquoted field"),
        (7, "j3"),
    ]


# --- JSON array -----------------------------------------------------------------------------


def test_json_array_line_is_the_element_index() -> None:
    data = b'[\n  "job-1",\n  {"id": "job-2"},\n  {"job_id": "job-3", "x": [1, {"y": "]"}]}\n]\n'
    assert shown(read(data, "json")) == [(1, "job-1"), (2, "job-2"), (3, "job-3")]


def test_json_array_empty_and_trailing_comma_are_accepted() -> None:
    assert read(b" [ ] ", "json") == []
    assert shown(read(b'["a", "b",]', "json")) == [(1, "a"), (2, "b")]


def test_json_array_bad_elements_are_rejected_and_parsing_resumes() -> None:
    data = b'["ok-1", bad, 7, {"id": "x,]"}, {\'id\': 1}, "ok 2", "ok-3"]'
    assert shown(read(data, "json")) == [
        (1, "ok-1"),
        (2, "bad", "not JSON: Expecting value"),
        (3, "7", "expected a string or an object with 'id' or 'job_id', got a number"),
        (4, "x,]", "invalid character ',' at position 2"),
        (5, "{'id': 1}", "not JSON: Expecting property name enclosed in double quotes"),
        (6, "ok 2", "invalid character ' ' at position 3"),
        (7, "ok-3"),
    ]


def test_json_array_elements_the_parser_refuses_are_rejected_and_parsing_resumes() -> None:
    """Too deep a nesting (RecursionError), and an integer of over 4,300 digits (ValueError:
    an element is parsed before its length is checked): rejected, and the array goes on."""
    deep, long_number = b"[" * 1500 + b"]" * 1500, b"7" * 4400
    data = b'["ok-1", ' + deep + b", " + long_number + b', "ok-2"]'
    assert [(e.line, getattr(e, "reason", None)) for e in read(data, "json")] == [
        (1, None),
        (2, "not JSON: nested too deeply"),
        (3, "element longer than 4096 characters"),
        (4, None),
    ]


def test_json_array_non_utf8_bytes_reject_only_their_element() -> None:
    assert shown(read(b'["a\xffb", "ok"]', "json")) == [
        (1, "a\udcffb", "not valid UTF-8"),
        (2, "ok"),
    ]


def test_json_array_over_long_elements_are_rejected_whatever_their_shape() -> None:
    data = (
        b'["'
        + b"s" * 500
        + b'", {"id": "a", "pad": "'
        + b"p" * 500
        + b'"}, ['
        + b"1," * 300
        + b'1], "ok"]'
    )
    entries = read(data, "json", max_line_bytes=64)
    assert [(e.line, getattr(e, "reason", e)) for e in entries] == [
        (1, "element longer than 64 characters"),
        (2, "element longer than 64 characters"),
        (3, "element longer than 64 characters"),
        (4, Candidate("ok", 4)),
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"id": "a"}', r"not a JSON array \(it starts with '\{'\); .* jsonl"),
        (b'["a", "b"', r"ends before the closing '\]' \(element 2"),
        (b'["a" "b"]', r"expected ',' or '\]', found '\"' \(element 1, character offset 5\)"),
        (b'["a", [1, "b"', r"does not resume after it \(element 2, character offset 6\)"),
        (b'["a", "unterminated', r"does not resume after it \(element 2, character offset 6\)"),
        (b'["a"] ["b"]', r"unexpected data after the closing '\]'"),
    ],
)
def test_a_json_array_broken_beyond_repair_is_unreadable_naming_the_place(
    data: bytes, message: str
) -> None:
    with pytest.raises(InputUnreadable, match=message):
        read(data, "json")


def test_a_broken_json_array_yields_the_elements_before_the_break() -> None:
    entries = read_entries("-", "json", stdin=io.BytesIO(b'["a", "b", [oops'))
    assert [next(entries), next(entries)] == [Candidate("a", 1), Candidate("b", 2)]
    with pytest.raises(InputUnreadable, match="element 3"):
        next(entries)


# --- gzip -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_when_gzipped_by_name(fmt: str, tmp_path: Path) -> None:
    ids = ["job-1", "job-2", "job-3"]
    plain = tmp_path / f"ids.{fmt}"
    plain.write_bytes(write(ids, fmt))
    packed = tmp_path / f"ids.{fmt}.gz"
    packed.write_bytes(gzip.compress(write(ids, fmt)))
    assert shown(list(read_entries(str(packed)))) == shown(list(read_entries(str(plain))))
    assert [e.job_id for e in read_entries(str(packed)) if isinstance(e, Candidate)] == ids


def test_gzip_is_detected_by_its_magic_bytes_whatever_the_name(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    path.write_bytes(gzip.compress(b"job-1\njob-2\n"))
    assert shown(list(read_entries(str(path)))) == [(1, "job-1"), (2, "job-2")]
    assert shown(read(gzip.compress(b'["a"]'), "json")) == [(1, "a")]


def test_a_gz_name_over_plain_content_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt.gz"
    path.write_bytes(b"job-1\n")
    with pytest.raises(InputUnreadable, match=r"ids\.txt\.gz: not gzip"):
        list(read_entries(str(path)))


def test_a_truncated_gzip_yields_whole_lines_then_is_unreadable_naming_the_line() -> None:
    ids = [f"job-{n:06d}" for n in range(50_000)]
    packed = gzip.compress("".join(f"{i}\n" for i in ids).encode())
    entries = read_entries("-", stdin=io.BytesIO(packed[: len(packed) // 2]))
    got: list[str] = []

    def drain() -> None:
        for entry in entries:
            assert isinstance(entry, Candidate)
            got.append(entry.job_id)

    with pytest.raises(InputUnreadable, match="gzip stream is truncated or corrupt") as caught:
        drain()
    assert 0 < len(got) < len(ids)
    assert got == ids[: len(got)]  # no half id, nothing skipped
    assert f"after line {len(got)} " in str(caught.value)


def test_a_gzip_truncated_in_its_trailer_is_still_unreadable() -> None:
    packed = gzip.compress(b"job-1\njob-2\n")
    with pytest.raises(InputUnreadable, match="truncated or corrupt"):
        read(packed[:-4])


# --- stdin and files ------------------------------------------------------------------------


def test_dash_reads_sys_stdin_buffer_as_text_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = io.TextIOWrapper(io.BytesIO(b"job-1\n# c\njob-2\n"))
    monkeypatch.setattr(sys, "stdin", fake)
    assert shown(list(read_entries("-"))) == [(1, "job-1"), (3, "job-2")]


@pytest.mark.parametrize(
    ("data", "fmt"),
    [(b'{"id": "job-1"}\n{"job_id": "job-2"}\n', "jsonl"), (b'\n  "job-1"\n"job-2"\n', "jsonl"),
     (b' ["job-1", {"id": "job-2"}]', "json"), (b"job-1\njob-2\n", "text")],
)  # fmt: skip
def test_stdin_with_no_format_named_is_read_as_its_first_bytes_say(data: bytes, fmt: str) -> None:
    """``discover --output jsonl | run --input -`` rejected every line, read as text."""
    named = shown(list(read_entries("-", fmt, stdin=io.BytesIO(data))))
    assert [entry[1] for entry in named] == ["job-1", "job-2"]
    for packed in (data, gzip.compress(data)):
        for stdin in (io.BytesIO(packed), Trickle(packed, 3)):
            assert shown(list(read_entries("-", stdin=stdin))) == named  # type: ignore[arg-type]
    for marked in (b"\xef\xbb\xbf" + data, gzip.compress(b"\xef\xbb\xbf" + data)):
        assert shown(list(read_entries("-", stdin=Trickle(marked, 1)))) == named  # type: ignore[arg-type]
    as_text = list(read_entries("-", "text", stdin=io.BytesIO(b'{"id": "job-1"}\n')))
    assert not isinstance(as_text[0], Candidate)  # a format named is never second-guessed


def test_a_byte_order_mark_that_arrives_alone_does_not_end_the_input() -> None:
    """A pipe that delivered the mark in a read of its own ended the text reader there:
    every id after it was silently dropped, exit 0 with nothing read."""
    data = b"\xef\xbb\xbfjob-1\njob-2\n"
    for step in (1, 3):
        entries = read_entries("-", "text", stdin=Trickle(data, step))  # type: ignore[arg-type]
        assert shown(list(entries)) == [(1, "job-1"), (2, "job-2")]


def test_a_json_array_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """The gzip check reads two bytes first, so the array reader's first read ended inside
    the mark, which it then never stripped: the file was "not a JSON array" (66)."""
    source = tmp_path / "ids.json"
    source.write_bytes(b'\xef\xbb\xbf["job-1", "job-2"]')
    assert [e.job_id for e in read_entries(str(source))] == ["job-1", "job-2"]  # type: ignore[union-attr]


def test_stdin_is_not_closed_by_the_reader() -> None:
    stdin = io.BytesIO(b"job-1\n")
    with read_entries("-", stdin=stdin) as entries:
        assert list(entries) == [Candidate("job-1", 1)]
    assert not stdin.closed


def test_a_missing_file_is_unreadable_at_once() -> None:
    with pytest.raises(InputUnreadable, match=r"cannot read input /no/such/ids\.txt: no such file"):
        read_entries("/no/such/ids.txt")


def test_a_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(InputUnreadable, match="is a directory"):
        read_entries(str(tmp_path))


def test_a_path_through_a_file_is_unreadable_with_the_system_reason(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputUnreadable, match="not a directory"):
        read_entries(str(tmp_path / "file" / "ids.txt"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its mode")
def test_a_file_without_read_permission_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    path.write_text("job-1\n")
    path.chmod(0)
    with pytest.raises(InputUnreadable, match="permission denied"):
        read_entries(str(path))


def test_a_read_error_midway_is_unreadable_naming_the_line_reached() -> None:
    entries = read_entries("-", stdin=FailingStream(b"job-1\njob-2\njob-"))  # type: ignore[arg-type]
    assert [next(entries), next(entries)] == [Candidate("job-1", 1), Candidate("job-2", 2)]
    with pytest.raises(InputUnreadable, match="read failed after line 2: input/output error"):
        next(entries)


def test_the_reader_shows_where_it_is_and_closes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    path.write_text("a\nb\nc\n")
    entries = read_entries(str(path))
    assert repr(entries) == f"EntryReader(path='{path}', format=text, at='line 0', open)"
    next(entries)
    assert "at='line 1', open" in repr(entries)
    entries.close()
    assert "closed" in repr(entries)
    with pytest.raises(StopIteration):
        next(entries)


def test_the_reader_closes_its_file_when_exhausted_or_dropped_unstarted(tmp_path: Path) -> None:
    """An unstarted reader still holds an open file: dropping it must not leak (warnings fail)."""
    path = tmp_path / "ids.json"
    path.write_text('["a"]')
    entries = read_entries(str(path))
    assert list(entries) == [Candidate("a", 1)]
    assert repr(entries).endswith("at='element 1', closed)")
    dropped = read_entries(str(path))
    del dropped
    gc.collect()


def test_read_chunks_groups_entries_in_order() -> None:
    entries = read_entries("-", stdin=io.BytesIO(b"".join(b"j%d\n" % n for n in range(7))))
    chunks = list(read_chunks(entries, 3))
    assert [[e.line for e in chunk] for chunk in chunks] == [[1, 2, 3], [4, 5, 6], [7]]
    with pytest.raises(ValueError, match="at least 1"):
        next(read_chunks(iter([]), 0))


# --- memory ---------------------------------------------------------------------------------


def lines_file(path: Path, count: int) -> Path:
    with path.open("w") as out:
        out.writelines(f"job-{n:07d}\n" for n in range(count))
    return path


def peak_traced(path: Path, fmt: str = "auto") -> tuple[int, int]:
    """(entries, peak bytes allocated while reading them all)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        count = sum(1 for _ in read_entries(str(path), fmt))
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def peak_blocks(path: Path) -> tuple[int, int]:
    """(entries, most allocator blocks in use, sampled every 1000 entries, above the start).

    ``sys.getallocatedblocks`` costs nothing per allocation, unlike tracemalloc, which would
    make a million lines take ten seconds; anything kept per entry would show as a block.
    """
    gc.collect()
    base = sys.getallocatedblocks()
    highest = 0
    count = 0
    for count, _ in enumerate(read_entries(str(path)), start=1):
        if count % 1000 == 0:
            highest = max(highest, sys.getallocatedblocks() - base)
    return count, highest


def test_memory_does_not_grow_with_the_number_of_lines(tmp_path: Path) -> None:
    small = lines_file(tmp_path / "small.txt", 100_000)
    large = lines_file(tmp_path / "large.txt", 1_000_000)
    count, peak = peak_traced(small)
    assert count == 100_000
    assert peak < 2_000_000
    small_count, small_blocks = peak_blocks(small)
    large_count, large_blocks = peak_blocks(large)
    assert (small_count, large_count) == (100_000, 1_000_000)
    # Keeping even one object per id would add 900,000 blocks.
    assert large_blocks - small_blocks < 5_000, (small_blocks, large_blocks)


@pytest.mark.parametrize("fmt", ["text", "jsonl", "csv"])
def test_a_50_mb_line_is_rejected_without_being_held(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / "long"
    with path.open("wb") as out:
        out.write(b"id\n" if fmt == "csv" else b"")
        for _ in range(50):
            out.write(b"x" * 1_000_000)
        out.write(b'\n"ok"\n' if fmt == "jsonl" else b"\nok\n")
    tracemalloc.start()
    try:
        entries = list(read_entries(str(path), fmt))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    first = 2 if fmt == "csv" else 1
    assert [(e.line, getattr(e, "reason", None)) for e in entries] == [
        (first, "line longer than 4096 bytes"),
        (first + 1, None),
    ]
    assert peak < 1_000_000, peak


def test_a_50_mb_json_element_is_rejected_without_being_held(tmp_path: Path) -> None:
    path = tmp_path / "long.json"
    with path.open("wb") as out:
        out.write(b'["a", "')
        for _ in range(50):
            out.write(b'x\\"' * 333_333)  # escaped quotes must not end the string early
        out.write(b'", "b"]')
    tracemalloc.start()
    try:
        entries = list(read_entries(str(path)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert shown(entries)[0] == (1, "a")
    assert entries[1].line == 2
    assert getattr(entries[1], "reason", None) == "element longer than 4096 characters"
    assert shown(entries)[2] == (3, "b")
    assert peak < 1_000_000, peak


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(job_ids, max_size=40),
    fmt=st.sampled_from(FORMATS),
    packed=st.booleans(),
    step=st.integers(min_value=1, max_value=97),
)
def test_ids_written_in_any_format_read_back_the_same_in_order(
    ids: list[str], fmt: str, packed: bool, step: int
) -> None:
    data = write(ids, fmt)
    if packed:
        data = gzip.compress(data)
    entries = list(read_entries("-", fmt, stdin=Trickle(data, step)))  # type: ignore[arg-type]
    assert all(isinstance(e, Candidate) for e in entries)
    assert [e.job_id for e in entries if isinstance(e, Candidate)] == ids


def text_oracle(data: bytes, limit: int) -> list[tuple[int, str] | tuple[int, str, str]]:
    """What the text reader must produce, computed the simple way (whole input in memory)."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out: list[Entry] = []
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix(b"\r")
        if len(line) > limit:
            raw = line[: min(limit, 256)].decode("utf-8", "replace")
            out.append(Rejection(raw, number, f"line longer than {limit} bytes"))
            continue
        try:
            text = line.decode().strip()
        except UnicodeDecodeError:
            out.append(Rejection(line.decode("utf-8", "replace"), number, "not valid UTF-8"))
            continue
        if text and not text.startswith("#"):
            out.append(validate(text, number))
    return shown(out)


REFUSED_WHOLE = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff", b"devserver-reaper plan v")
"""How an input the text reader refuses whole starts: a UTF-16 or UTF-32 byte order mark,
a plan's first line."""


@settings(max_examples=200, deadline=None)
@example(lines=[b"\xff\xfe"], newline=b"\n", final=False, limit=24, step=1)
@example(lines=[b"devserver-reaper plan v1"], newline=b"\n", final=True, limit=24, step=3)
@given(
    lines=st.lists(
        st.one_of(job_ids.map(str.encode), st.binary(max_size=30), st.just(b"#c"), st.just(b"")),
        max_size=30,
    ),
    newline=st.sampled_from([b"\n", b"\r\n"]),
    final=st.booleans(),
    limit=st.integers(min_value=1, max_value=24),
    step=st.integers(min_value=1, max_value=40),
)
def test_text_lines_match_the_simple_reading_however_the_reads_fall(
    lines: list[bytes], newline: bytes, final: bool, limit: int, step: int
) -> None:
    lines = [line.replace(b"\n", b"") for line in lines]
    data = newline.join(lines) + (newline if final and lines else b"")
    assume(not data.startswith(b"\x1f\x8b"))  # gzip's magic: read as gzip, tested apart
    reader = read_entries("-", "text", stdin=Trickle(data, step), max_line_bytes=limit)  # type: ignore[arg-type]
    if data.startswith(REFUSED_WHOLE):  # no line of it read: the input is refused, in words
        with pytest.raises(InputUnreadable):
            list(reader)
        return
    assert shown(list(reader)) == text_oracle(data, limit)


json_elements = st.one_of(
    job_ids,
    st.text(max_size=12),
    st.builds(lambda i: {"id": i}, job_ids),
    st.builds(lambda i: {"job_id": i, "n": [1, {"x": "]"}]}, job_ids),
    st.integers(),
    st.floats(allow_nan=False),
    st.none(),
    st.lists(st.text(max_size=3), max_size=3),
)


def json_oracle(values: list[object]) -> list[tuple[int, str]]:
    """The same values as JSON Lines, read by the (separately pinned) JSONL reader."""
    lines = b"".join(json.dumps(value).encode() + b"\n" for value in values)
    entries = read_entries("-", "jsonl", stdin=io.BytesIO(lines))
    return [(e.line, e.job_id if isinstance(e, Candidate) else e.reason) for e in entries]


@settings(max_examples=150, deadline=None)
@given(values=st.lists(json_elements, max_size=20), step=st.integers(min_value=1, max_value=30))
def test_a_json_array_reads_like_the_same_values_as_json_lines(
    values: list[object], step: int
) -> None:
    """Element by element, over reads of any size, the array parser agrees with json.loads."""
    data = json.dumps(values, indent=1, ensure_ascii=step % 2 == 0).encode()
    entries = read_entries("-", "json", stdin=Trickle(data, step))  # type: ignore[arg-type]
    got = [(e.line, e.job_id if isinstance(e, Candidate) else e.reason) for e in entries]
    assert got == json_oracle(values)


@pytest.mark.anyio
async def test_a_reader_that_fails_unexpectedly_ends_the_input_it_never_hangs() -> None:
    """The pipeline reads in a thread of its own; an exception no source expected (a bug)
    still reaches the run, as the input being unreadable, after the chunks read before it."""
    import anyio

    from worker.pipeline import read_in_background

    def entries() -> Iterator[Entry]:
        yield Candidate("job-1", 1)
        yield Candidate("job-2", 2)
        raise RuntimeError("a bug in a reader")

    items: list[object] = []
    with anyio.fail_after(10):
        async with read_in_background(entries(), size=1) as chunks:
            items = [item async for item in chunks]
    assert [item for item in items if isinstance(item, list)] == [
        [Candidate("job-1", 1)],
        [Candidate("job-2", 2)],
    ]
    (error,) = [item for item in items if isinstance(item, BaseException)]
    assert isinstance(error, InputUnreadable)
    assert "RuntimeError: a bug in a reader" in str(error)


@pytest.mark.parametrize(
    "data",
    [b"id,name\njob-1,a\njob-2,b\n", b"JOB_ID\njob-1\njob-2\n", b" Id \njob-1\njob-2\n",
     b"\n\n name , id \n a,job-1\nb,job-2\n", b'"id"\n"job-1"\n"job-2"\n',
     b'"job_id","name"\n"job-1","a"\n"job-2","b"\n'],
)  # fmt: skip
def test_csv_on_stdin_is_read_as_csv_and_its_header_is_not_an_id(data: bytes) -> None:
    """Piped CSV was read as text: its header line went to the API as an id."""
    for stdin in (io.BytesIO(data), Trickle(data, 2)):
        entries = list(read_entries("-", stdin=stdin))  # type: ignore[arg-type]
        assert [e.job_id for e in entries if isinstance(e, Candidate)] == ["job-1", "job-2"]
        assert all(isinstance(e, Candidate) for e in entries)


def test_more_than_64_kib_of_leading_white_space_does_not_end_the_sniff() -> None:
    """The sniff gave up after 64 KiB of blank lines, and a JSON array after them was read
    as text: every element a rejected line."""
    blank = b"\n" * 70_000 + b" \t\r\n" * 20_000
    for data, fmt in ((blank + b'["job-1", "job-2"]', "json"),
                      (b"\xef\xbb\xbf" + blank + b'{"id": "job-1"}\n{"id": "job-2"}\n', "jsonl"),
                      (blank + b"job-1\njob-2\n", "text")):  # fmt: skip
        entries = list(read_entries("-", stdin=Trickle(data, 4096)))  # type: ignore[arg-type]
        assert [e.job_id for e in entries if isinstance(e, Candidate)] == ["job-1", "job-2"], fmt
        assert all(isinstance(e, Candidate) for e in entries)
    text = list(read_entries("-", stdin=io.BytesIO(b"\n" * 70_000 + b"job-1\nbad id!\n")))
    assert [e.line for e in text] == [70_001, 70_002]  # line numbers still true
    wide = b'["' + b'", "'.join(b"job-%d" % n for n in range(20_000)) + b'"]'  # one long line
    assert len(list(read_entries("-", stdin=Trickle(wide, 1000)))) == 20_000  # type: ignore[arg-type]
