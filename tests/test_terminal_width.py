"""What a person sees on a terminal narrower than the text, and on one resized mid-run.

An SRE at 80 columns found sentences cut mid-word (the terminal wrapping them), a progress
bar of the old width left behind after the window was made narrower, and ``serve`` taking
three rows per job. Each is tried here on a real pseudo-terminal (pyte reads it back), and
the resize in tmux, which reflows its lines on a resize as most terminals do.
"""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import pytest

from tests.e2e import reaper_env
from tests.tty import Terminal
from worker.discovery.plan import UNKEYED
from worker.simulator import SimulatorConfig, run_simulator

_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-B]|[78=>])")
_COMMAND = re.compile(r"^\s*(?:[a-z ]+:\s+)?devserver-reaper [a-z]+(?: |$)")


def written_lines(raw: bytes) -> list[str]:
    """Each line the program wrote, as the terminal shows it before wrapping it: escape
    sequences out, and only what the last carriage return left."""
    text = _ESCAPE.sub("", raw.decode(errors="replace")).replace("\r\n", "\n")
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


def overflowing(term: Terminal) -> list[str]:
    """The lines of prose wider than the terminal (which it cut wherever the edge fell).
    A command to copy is left whole: a terminal's own wrap is copied back as one line."""
    return [line for line in written_lines(term.raw)
            if len(line) > term.columns and not _COMMAND.match(line)]  # fmt: skip


def cut_words(sentence: str, term: Terminal) -> list[str]:
    """The words of ``sentence`` not seen whole on the screen."""
    seen = set(" ".join(term.lines()).split())
    return [word for word in sentence.split() if word not in seen]


@pytest.mark.anyio
@pytest.mark.parametrize("columns", [80, 60, 40])
async def test_the_unkeyed_plan_and_the_prompt_break_between_words(
    tmp_path: Path, columns: int
) -> None:
    """``plan.unkeyed``, the plan's review and the prompt for a plan of one project, at
    80, 60 and 40 columns: every line fits (a continuation indented under its label's
    value), every word whole; the commands to copy are not broken."""
    async with run_simulator(SimulatorConfig(jobs=3)) as sim:
        env = reaper_env(sim.url, REAPER_LOG_FORMAT="auto")
        cwd = str(tmp_path)

        def discover() -> tuple[int, Terminal]:
            term = Terminal(["discover", "--all", "--plan", "plan.txt"], env, columns=columns,
                            cwd=cwd)  # fmt: skip
            return term.wait(), term

        def answer_no() -> tuple[int, Terminal]:
            term = Terminal(["run", "--plan", "plan.txt"], env, columns=columns, cwd=cwd)
            term.expect("them: ")
            term.type(b"no\n")
            return term.wait(), term

        made, review = await anyio.to_thread.run_sync(discover)
        assert made == 0, review.screen_text()
        declined, prompt = await anyio.to_thread.run_sync(answer_no)
        assert declined == 64 and not sim.deleted, prompt.screen_text()
    for term in (review, prompt):
        assert overflowing(term) == [], term.screen_text()
        assert cut_words(UNKEYED.replace("its seal guards", ""), term) == []
    rows = review.lines()
    sealed = next(n for n, row in enumerate(rows) if row.startswith("  sealed"))
    assert rows[sealed].startswith("  sealed   with no plan key:")
    assert rows[sealed + 1].startswith(" " * 11 + rows[sealed + 1].strip())  # under its value
    assert "next: devserver-reaper run --plan plan.txt --dry-run" in written_lines(review.raw)
    said = "This cannot be undone. (with each job re-read on a listing page first) not confirmed:"
    assert cut_words(said, prompt) == []
    duration = next(n for n, row in enumerate(prompt.lines()) if row.startswith("  duration"))
    assert prompt.lines()[duration + 1].startswith(" " * 14)  # under the value, not column 0
