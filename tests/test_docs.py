"""The documentation leads: a short README that links every page, and links that resolve."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [a or b for a, b in LINK.findall(text)]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def test_the_readme_is_an_entry_point_of_at_most_300_lines() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail under docs/"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    assert PAGES, "docs/ holds no page"
    linked = {(ROOT / link.split("#")[0]).resolve() for link in _links(README)}
    missing = [page.name for page in PAGES if page.resolve() not in linked]
    assert not missing, f"pages the README does not link: {missing}"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve_inside_the_repository(page: Path) -> None:
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto: ...
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page.resolve()
        if not target.is_relative_to(ROOT):
            broken.append(f"{link} (outside the repository)")
        elif not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no such heading)")
    assert not broken, f"{page.name}: {broken}"


def test_nothing_in_the_repository_names_a_file_outside_it() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    outside = ["SPEC" + ".md", "API-NOTES" + ".md", "STYLE" + ".md", "../" + "shared"]
    found = []
    for name in tracked:
        path = ROOT / name
        if path.suffix in {".png", ".lock"} or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{name}: {word}" for word in outside if word in text]
    assert not found, found


def test_the_anchor_rule_is_githubs() -> None:
    assert _anchor("`run`") == "run"
    assert _anchor("Health and metrics (`--http-port`, default 8080)") == (
        "health-and-metrics---http-port-default-8080"
    )
    assert _anchor("Exit codes") == "exit-codes"


def _commands() -> dict[str, argparse.ArgumentParser]:
    from worker.cli import build_parser

    return next(
        action for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ).choices  # fmt: skip


EXAMPLE = re.compile(r"devserver-reaper\s+([a-z]+)((?:[^\n`|;#]|\\\n)*)")
FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_flag_an_example_gives_is_one_its_command_takes(page: Path) -> None:
    """``devserver-reaper CMD ... --flag`` in a page, fenced or inline: the flag is CMD's,
    or the user pasting it gets a usage error (64) the page did not promise."""
    commands = _commands()
    text = page.read_text(encoding="utf-8")
    wrong = []
    for match in EXAMPLE.finditer(text):
        if (command := commands.get(match.group(1))) is None:
            continue
        takes = set(command._option_string_actions)
        for sub in command._actions:  # plan show
            if isinstance(sub, argparse._SubParsersAction):
                takes |= {f for p in sub.choices.values() for f in p._option_string_actions}
        line = text.count("\n", 0, match.start()) + 1
        wrong += [f"{page.name}:{line}: {match.group(1)} {flag}"
                  for flag in FLAG.findall(match.group(2)) if flag not in takes]  # fmt: skip
    assert not wrong, wrong


def test_every_flag_in_a_commands_table_of_the_reference_is_one_it_takes() -> None:
    """reference.md's ``### `run``` (or ``### `serve` and `enqueue```) rows name flags the
    command accepts: ``--redis-url`` was documented for run, which refused it (64)."""
    commands = _commands()
    reference = (DOCS / "reference.md").read_text(encoding="utf-8")
    sections = re.finditer(r"^### `([a-z` ]+)`[^\n]*\n(.*?)(?=^##)", reference, re.M | re.S)
    wrong, seen = [], 0
    for section in sections:
        names = [n.split()[0] for n in re.split(r"`? and `?", section.group(1))]
        parsers = [commands[name] for name in names if name in commands]
        for row in re.findall(r"^\| (.*?) \|", section.group(2), re.M):
            for flag in re.findall(r"`(--[\w-]+)", row):
                seen += 1
                if not any(flag in p._option_string_actions for p in parsers):
                    wrong.append(f"{section.group(1)}: {flag}")
    assert seen > 20  # the pattern still finds the tables' flags
    assert not wrong, wrong
