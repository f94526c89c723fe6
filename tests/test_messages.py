"""What a person reads when a command refuses: the flag they typed (``--name-regex``, not the
setting's field ``name_regex``), the same words for the same trouble in every command, and
no word twice. In-process: the point is the message, not the process."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker.cli import build_parser, dispatch
from worker.commands.discover import filters_from_args
from worker.errors import ConfigError, UsageError
from worker.settings import load_settings

pytestmark = pytest.mark.usefixtures("clean_env")

DATA = Path(__file__).resolve().parent / "data"


def said(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """The exit code and stderr of ``devserver-reaper ARGV``, run in this process."""
    code = dispatch(build_parser().parse_args(list(argv)))
    return code, capsys.readouterr().err


def test_a_bad_filter_is_named_by_the_flag_typed() -> None:
    args = build_parser().parse_args(["discover", "--name-regex", "("])
    with pytest.raises(UsageError) as refused:
        filters_from_args(args, datetime(2026, 6, 1, tzinfo=UTC))
    assert str(refused.value).startswith("--name-regex is not a regular expression: missing )")
    window = ["discover", "--older-than", "2026-01-01", "--newer-than", "2026-02-01"]
    with pytest.raises(UsageError, match=r"^--newer-than must be before --older-than: "):
        filters_from_args(build_parser().parse_args(window), datetime(2026, 6, 1, tzinfo=UTC))


def test_a_bad_protect_rule_says_protect_once(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(protect="nmae:x")
    assert str(refused.value).startswith("--protect 'nmae:x': 'nmae' is not a kind of rule")
    monkeypatch.setenv("REAPER_PROTECT", "nmae:x")
    with pytest.raises(ConfigError, match=r"^REAPER_PROTECT 'nmae:x': 'nmae' is not a kind"):
        load_settings()


def test_plan_show_names_the_plan_key_flag_and_a_missing_file_as_other_commands_do(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    keyed = str(DATA / "plan-v2-keyed.plan")
    code, err = said(capsys, "plan", "show", keyed)
    assert code == 64
    assert "give the key it was made with, --plan-key-file FILE (or REAPER_PLAN_KEY_FILE" in err
    assert "plan_key_file is set" not in err
    gone = tmp_path / "gone.key"
    assert said(capsys, "plan", "show", keyed, "--plan-key-file", str(gone)) == (
        78,
        f"devserver-reaper plan: --plan-key-file {gone} cannot be read: no such file\n",
    )
    with pytest.MonkeyPatch.context() as env:  # named as given: here, a variable
        env.setenv("REAPER_PLAN_KEY_FILE", str(gone))
        code, err = said(capsys, "plan", "show", keyed)
    assert (
        err == f"devserver-reaper plan: REAPER_PLAN_KEY_FILE {gone} cannot be read: no such file\n"
    )
    assert said(capsys, "plan", "show", str(tmp_path / "nope")) == (
        66,
        f"devserver-reaper plan: cannot read plan {tmp_path / 'nope'}: no such file\n",
    )


def test_help_names_a_plan_as_the_readme_does_not_as_json() -> None:
    """A plan is a header line, job lines and a seal: ``plan.json`` in the examples said
    otherwise (and a JSON tool given one fails)."""
    from tests.test_cli import _subcommands

    helps = {name: parser.format_help() for name, parser in _subcommands().items()}
    assert all("plan.json" not in text for text in helps.values())
    assert all("--plan plan.txt" in helps[name] for name in ("run", "discover"))


def test_a_slow_run_shows_its_rate_not_zero() -> None:
    """Below 0.5 ids/s the display said ``0 ids/s``: a run that had stopped, to a reader."""
    from worker.terminal.progress import Snapshot, rate

    slow = Snapshot(done=3, total=10, ids_per_s=0.3, eta_s=None, counts=(), retries=0)
    assert slow.figures() == "3 / 10 · 0.3 ids/s"
    assert [rate(r) for r in (0.0, 0.004, 0.01, 0.06, 0.96, 1.0, 2.34, 9.96, 1234.4)] == [
        "0", "<0.01", "0.01", "0.06", "0.96", "1", "2.3", "10", "1,234",
    ]  # fmt: skip


def test_a_rate_under_one_is_shown_as_it_is_not_rounded_up_to_one() -> None:
    """0.96 ids/s was shown ``1.0``, and the summary's figure, rounded to a tenth in
    run.summary before it was shown, said 1 where the run did 0.96: two significant figures
    in the progress line and the summary."""
    from worker.terminal.progress import Snapshot
    from worker.terminal.summary import RunEnd

    slow = Snapshot(done=3, total=10, ids_per_s=0.96, eta_s=None, counts=(), retries=0)
    assert slow.figures() == "3 / 10 · 0.96 ids/s"
    fields = {"deleted": 24, "duration_s": 25.0, "ids_per_s": 0.96, "exit_code": 0}
    assert "  rate             0.96 ids/s" in RunEnd(fields).text().splitlines()


@pytest.mark.parametrize(
    ("total", "read", "exact", "said"),
    [(None, 0, False, "stopped before any of the input was read"),
     (None, 7, False, "stopped before the end of the input was read"),
     (0, 0, True, "stopped after the input was done: none of its ids is left to do")],
)  # fmt: skip
def test_a_run_stopped_by_a_closed_output_says_only_what_it_knows_of_its_input(
    total: int | None, read: int, exact: bool, said: str
) -> None:
    """``true | run -i - | head -1`` said "part of the input is not done" of an empty one."""
    from worker.terminal.summary import RunEnd

    fields = {"deleted": 0, "open": 0, "duration_s": 0.1, "ids_per_s": 0.0, "exit_code": 75,
              "error": "the events cannot be written to stdout (Broken pipe)"}  # fmt: skip
    end = RunEnd(fields, total=total, exact_total=exact, read=read, command="r -i -")
    lines = end.text().splitlines()
    assert said in lines and not any("part of the input" in line for line in lines)
    assert ("run again: r -i -" in lines) == (not exact)


def test_a_run_whose_plan_expired_midway_says_how_many_were_not_sent_and_what_to_do() -> None:
    from worker.terminal.summary import RunEnd

    fields = {"deleted": 2, "skipped": 4, "skipped_by_reason": {"plan_expired": 4},
              "duration_s": 13.0, "ids_per_s": 0.46, "exit_code": 1}  # fmt: skip
    lines = RunEnd(fields, total=6, exact_total=True, read=6).text().splitlines()
    assert "  skipped                 4  (plan_expired 4)" in lines
    assert ("the plan has expired: 4 of its jobs were not sent; run discover "
            "again, review the new plan and run it") in lines  # fmt: skip


def test_a_protect_file_that_cannot_be_read_is_named_as_given_with_the_same_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "protect_file PATH cannot be read: No such file or directory" whatever was
    typed, where every other file says the flag and "no such file"."""
    from worker import wiring

    gone = tmp_path / "gone.txt"
    with pytest.raises(ConfigError) as refused:
        wiring.protection(load_settings(protect_file=str(gone)))
    assert str(refused.value) == f"--protect-file {gone} cannot be read: no such file"
    monkeypatch.setenv("REAPER_PROTECT_FILE", str(tmp_path))
    with pytest.raises(ConfigError) as refused:
        wiring.protection(load_settings())
    assert str(refused.value) == f"REAPER_PROTECT_FILE {tmp_path} cannot be read: is a directory"
    (tmp_path / "empty.txt").write_text("")
    monkeypatch.setenv("REAPER_PROTECT_FILE", str(tmp_path / "empty.txt"))
    with pytest.raises(ConfigError, match=r"^REAPER_PROTECT_FILE .* or leave REAPER_PROTECT_F"):
        wiring.protection(load_settings())


def test_an_exclude_file_that_cannot_be_read_is_called_exclude_not_the_input(
    tmp_path: Path,
) -> None:
    """``run --plan P --exclude nope`` said "cannot read input nope", of a plan that reads
    fine: every message of the exclude file's reading names ``--exclude``."""
    from worker.commands.planned import read_excluded
    from worker.errors import InputUnreadable
    from worker.input.sources import read_entries

    gone = tmp_path / "nope"
    with pytest.raises(InputUnreadable) as refused:
        read_excluded(str(gone))
    assert str(refused.value) == f"cannot read --exclude {gone}: no such file"
    table = tmp_path / "keep.csv"
    table.write_text("name,owner\nx,y\n")
    with pytest.raises(UsageError, match=rf"^--exclude {table}: the CSV header has no 'id'"):
        read_excluded(str(table))
    with pytest.raises(InputUnreadable, match=rf"^cannot read input {gone}: no such file$"):
        read_entries(str(gone))


@pytest.mark.parametrize(
    ("flags", "env", "config", "said"),
    [
        (["--protect", "nmae:prod-*"], {}, None,
         "--protect 'nmae:prod-*': 'nmae' is not a kind of rule"),
        ([], {"REAPER_PROTECT": "id:bad id"}, None, "REAPER_PROTECT 'id:bad id': not a valid"),
        (["--protect", "prod-*"], {"REAPER_PROTECT": "id:bad id"}, None,
         "REAPER_PROTECT 'id:bad id': not a valid"),
        (["--protect", "prod-*"], {}, 'protect = ["nmae:x"]',
         "c.toml: protect 'nmae:x': 'nmae' is not a kind of rule"),
        (["--protected-types", "COMMON"], {"REAPER_PROTECTED_TYPES": "a b"}, None,
         "REAPER_PROTECTED_TYPES each entry must be a job type or status"),
        ([], {}, 'protected_statuses = "FINISHED, bad word"',
         "c.toml: protected_statuses each entry must be a job type or status"),
    ],
    ids=["flag", "environment", "environment-beside-a-flag", "config-beside-a-flag",
         "types-environment-beside-a-flag", "statuses-config"],
)  # fmt: skip
def test_a_bad_protect_rule_names_the_flag_variable_or_file_that_gave_it(
    tmp_path: Path, flags: list[str], env: dict[str, str], config: str | None, said: str
) -> None:
    """A bad rule given to ``--protect`` (or the types and statuses) by the environment was
    said as "protect (REAPER_PROTECT or the config file)", and beside a good ``--protect``
    as the flag's: rules add up over every source, and the source was lost on the way. Each
    source's rules are checked as that source gave them, and named so."""
    from tests.test_cli import run_worker

    (tmp_path / "ids.txt").write_text("job-1\n")
    if config is not None:
        (tmp_path / "c.toml").write_text(config + "\n")
        env = {**env, "REAPER_CONFIG": "c.toml"}
    done = run_worker("run", "-i", "ids.txt", "--dry-run", *flags, env=env, cwd=tmp_path)
    assert done.returncode == 78, done.stderr
    assert done.stderr.splitlines()[0].startswith(f"devserver-reaper: {said}"), done.stderr


@pytest.mark.parametrize("given", ["flag", "environment"])
def test_a_bad_rule_in_a_protect_file_names_the_file_and_its_line(
    tmp_path: Path, given: str
) -> None:
    """A mistyped rule in a protect file said "protect rule 'nmae:prod-*': 'nmae' is not a
    kind of rule", and not where it was: the other rules' file, the flag's rules or the
    config's. It names the file as given, and the line, as other files' errors do."""
    from tests.test_cli import run_worker

    (tmp_path / "ids.txt").write_text("job-1\n")
    rules = tmp_path / "keep.txt"
    rules.write_text("# the team's\nid:job-2\n\nnmae:prod-*   # the live ones\n")
    flag = ["--protect-file", str(rules)] if given == "flag" else []
    env = {} if given == "flag" else {"REAPER_PROTECT_FILE": str(rules)}
    done = run_worker("run", "-i", "ids.txt", "--dry-run", *flag, env=env, cwd=tmp_path)
    assert done.returncode == 78, done.stderr
    named = "--protect-file" if given == "flag" else "REAPER_PROTECT_FILE"
    assert done.stderr.splitlines()[0] == (
        f"devserver-reaper run: {named} {rules}, line 4: protect rule 'nmae:prod-*': 'nmae' "
        "is not a kind of rule (id:ID or name:GLOB; for a name that holds a colon, "
        "name:nmae:prod-*)"
    )
