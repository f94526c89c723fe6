"""Id validation, the escaping of rejected ids, and de-duplication (pure logic)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.input.intake import escape, validate
from worker.types import JOB_ID_RE, Candidate, Rejection

VALID_CHARS = string.ascii_letters + string.digits + "-_"


@pytest.mark.parametrize(
    "job_id",
    ["a", "A", "0", "-", "_", "job-0001_x", "x" * 64, "0f5c3c2a-0d52-4bfc-9a0e-1e4b6c2d9f10"],
)
def test_validate_accepts_ids_of_1_to_64_letters_digits_dash_underscore(job_id: str) -> None:
    assert validate(job_id, 7) == Candidate(job_id, 7)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("x" * 65, "too long (65 characters; at most 64)"),
        ("ab cd", "invalid character ' ' at position 3"),
        ("a/b", "invalid character '/' at position 2"),
        ("a\tb", "invalid character '\\t' at position 2"),
        ("\x1b[31m", "invalid character '\\x1b' at position 1"),
        ("jоb", "invalid character 'о' (U+043E) at position 2"),  # Cyrillic o
        ("a\u202eb", "invalid character '\\u202e' (U+202E) at position 2"),
        ("ab\udcff", "not valid UTF-8"),
        ("é" * 100, "invalid character 'é' (U+00E9) at position 1"),
    ],
)
def test_validate_rejects_with_a_reason_naming_the_problem(raw: str, reason: str) -> None:
    assert validate(raw, 3) == Rejection(raw, 3, reason)


def test_an_invalid_character_is_reported_before_the_length() -> None:
    rejection = validate("x" * 70 + "!", 1)
    assert isinstance(rejection, Rejection)
    assert rejection.reason == "invalid character '!' at position 71"


def test_validate_is_not_fooled_by_a_trailing_newline() -> None:
    """``re.match(...$)`` would accept "abc\\n"; the validator must not."""
    assert isinstance(validate("abc\n", 1), Rejection)


@given(st.text(max_size=80))
def test_validate_accepts_exactly_the_strings_the_job_id_regex_matches(raw: str) -> None:
    result = validate(raw, 1)
    if JOB_ID_RE.fullmatch(raw):
        assert result == Candidate(raw, 1)
    else:
        assert isinstance(result, Rejection)
        assert result.raw == raw
        assert result.reason


@given(st.text(alphabet=VALID_CHARS, min_size=1, max_size=64))
def test_validate_accepts_every_id_built_from_the_allowed_alphabet(job_id: str) -> None:
    assert validate(job_id, 1) == Candidate(job_id, 1)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("abc", "abc"),
        ("a b", "a b"),
        ("a\nb", "a\\nb"),
        ("\x1b[2J", "\\x1b[2J"),
        ("back\\slash", "back\\\\slash"),
        ("\u202eevil", "\\u202eevil"),
        ("\udcff", "\\udcff"),
        ("\U000e0001", "\\U000e0001"),
        ("jоb", "jоb"),  # printable non-ASCII is kept: the reason names its code point
    ],
)
def test_escape_keeps_printables_and_escapes_the_rest(raw: str, shown: str) -> None:
    assert escape(raw) == shown


def test_escape_truncates_a_long_id_with_an_ellipsis() -> None:
    shown = escape("x" * 10_000, limit=20)
    assert shown == "x" * 19 + "…"


def test_escape_does_not_cut_an_escape_sequence_in_half() -> None:
    shown = escape("abcdefg\x1bzzzz", limit=10)
    assert shown == "abcdefg…"


def test_escape_leaves_a_string_of_exactly_the_limit_alone() -> None:
    assert escape("y" * 80) == "y" * 80


@given(st.text(max_size=300), st.integers(min_value=1, max_value=100))
def test_escape_is_printable_encodable_and_within_the_limit(raw: str, limit: int) -> None:
    shown = escape(raw, limit)
    assert len(shown) <= limit
    assert shown.isprintable()
    shown.encode("utf-8")  # no lone surrogate survives: JSON loggers refuse them
    if len(raw) <= limit and raw.isprintable() and "\\" not in raw:
        assert shown == raw


def test_escape_refuses_a_limit_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        escape("abc", 0)
