"""docs/reference.md is the contract: it names every setting, exit code, event and flag the
code has. A setting, an exit code or an event added without a word there fails here."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from worker.cli import build_parser
from worker.exit_codes import ExitCode
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
DOCS = "".join(page.read_text(encoding="utf-8") for page in (ROOT / "docs").glob("*.md"))
EMITTED = re.compile(
    r"\b_?(?:info|warning|error|note|notify|warn|debug|exception|critical)\(\s*\"([a-z_]+\.[a-z_]+)\""
)


def _section(title: str) -> str:
    """The text of the ``## title`` section of the reference."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", REFERENCE, re.M | re.S)
    assert match, title
    return match.group(1)


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_in_the_settings_table(name: str) -> None:
    assert f"`{name}`" in _section("Settings"), name


@pytest.mark.parametrize("code", [int(code) for code in ExitCode])
def test_every_exit_code_is_in_the_exit_code_table(code: int) -> None:
    assert re.search(rf"^\| {code} \|", _section("Exit codes"), re.M), code


def test_every_event_the_code_writes_is_documented() -> None:
    written = {
        name
        for source in (ROOT / "worker").rglob("*.py")
        for name in EMITTED.findall(source.read_text(encoding="utf-8"))
    }
    assert len(written) > 20  # the pattern still finds the events
    missing = sorted(name for name in written if name not in DOCS)
    assert not missing, f"events written but in no page of docs/: {missing}"


def test_every_flag_of_run_is_in_its_table_or_a_setting() -> None:
    sub = next(
        action for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ).choices["run"]  # fmt: skip
    settings = _section("Settings")
    run = _section("Commands")
    for action in sub._actions:
        long = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
        if not long:
            continue
        field = long[0].removeprefix("--").replace("-", "_")
        known = f"`{long[0]}" in run or f"`{field}`" in settings or long[0] == "--config"
        assert known, long[0]  # --config: the settings' own paragraph
