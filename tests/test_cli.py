"""The command line's contract: one flag per setting, exit 64 on usage errors, 78 on invalid
settings, ``--help`` everywhere, no secret echoed, and a start that imports no heavy library.

Exit codes are checked on the real ``python -m worker`` in a subprocess. Every case here
fails before any command runs (parsing or settings), so nothing touches the network.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from worker.cli import COMMAND_SETTINGS, SETTING_FLAGS, build_parser, settings_overrides
from worker.exit_codes import ExitCode
from worker.settings import Settings

CANARY = "CANARY-s3cr3t-5d2c8a"
HEAVY = ("aiohttp", "pydantic", "pydantic_settings", "structlog", "redis", "rich", "orjson")


def run_worker(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m worker ARGS`` with none of the developer's REAPER_/HUAWEICLOUD_ variables."""
    clean = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("REAPER_", "HUAWEICLOUD_", "HC_CONTAINER_"))
    }
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        env=clean,
        cwd=cwd or Path(__file__).resolve().parent.parent,
        timeout=60,
        check=False,
    )


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


# -- the flag table --------------------------------------------------------------------


def test_every_setting_has_a_flag_and_every_flag_a_setting() -> None:
    """Adding a setting without its flag (or a flag without a setting) fails here."""
    flags = {flag.removeprefix("--").replace("-", "_") for flag, _, _ in SETTING_FLAGS}
    assert flags == set(Settings.model_fields)
    assert len(SETTING_FLAGS) == len(flags), "a flag is listed twice"


def test_every_setting_flag_is_offered_by_some_command_and_every_command_is_listed() -> None:
    offered = {flag for flags in COMMAND_SETTINGS.values() for flag in flags}
    assert offered == {flag for flag, _, _ in SETTING_FLAGS}
    assert set(COMMAND_SETTINGS) == set(_subcommands())


@pytest.mark.parametrize("command", sorted(COMMAND_SETTINGS))
def test_each_settings_flag_reaches_the_setting_of_its_name(command: str) -> None:
    """``--batch-size 3`` arrives as ``batch_size=3``, typed as the table says."""
    kinds = {flag: kind for flag, kind, _ in SETTING_FLAGS}
    needs = {"run": ["--input", "-"], "enqueue": ["--input", "-"], "plan": ["show", "p"]}
    required = needs.get(command, [])
    for flag in COMMAND_SETTINGS[command]:
        kind = kinds[flag]
        argv = [command, *required, flag] if kind == "bool" else [command, *required, flag, "7"]
        overrides = settings_overrides(build_parser().parse_args(argv))
        name = flag.removeprefix("--").replace("-", "_")
        assert overrides == {name: True if kind == "bool" else kind("7")}, flag
        assert name in Settings.model_fields


def test_flags_not_given_are_not_overrides() -> None:
    """A flag left out must not hide the environment or the config file (None = not given)."""
    assert settings_overrides(build_parser().parse_args(["check"])) == {}


# -- --help --------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(COMMAND_SETTINGS))
def test_help_of_every_command_works_and_lists_its_settings(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: devserver-reaper {command}")
    for flag in COMMAND_SETTINGS[command]:
        assert flag in text, flag


def test_top_level_help_and_version_exit_zero() -> None:
    helped = run_worker("--help")
    assert helped.returncode == 0, helped.stderr
    for command in COMMAND_SETTINGS:
        assert command in helped.stdout
    version = run_worker("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("devserver-reaper ")


def test_importing_the_cli_and_printing_help_imports_no_heavy_library() -> None:
    """``--help`` must start fast: only the standard library until a command runs. Checked
    on sys.modules in a fresh interpreter, never with a stopwatch."""
    probe = (
        "import json, sys\n"
        "import worker.cli\n"
        "after_import = sorted(sys.modules)\n"
        "try:\n"
        "    worker.cli.build_parser().parse_args(['run', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps([after_import, sorted(sys.modules)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    after_import, after_help = json.loads(done.stdout.strip().splitlines()[-1])
    for loaded in (after_import, after_help):
        roots = {name.split(".")[0] for name in loaded}
        assert not roots & set(HEAVY), sorted(roots & set(HEAVY))
    assert "worker.cli" in after_import  # the probe did import what it checks


# -- exit codes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["no-such-command"],
        ["run"],
        ["run", "--input", "ids.txt", "--batch-size", "many"],
        ["run", "--input", "ids.txt", "--input-format", "xml"],
        ["run", "--input", "ids.txt", "--no-such-flag"],
        ["check", "--rate"],
    ],
    ids=[
        "no-command",
        "unknown-command",
        "missing-input",
        "bad-int",
        "bad-choice",
        "unknown-flag",
        "missing-value",
    ],
)
def test_usage_errors_exit_64(argv: list[str]) -> None:
    done = run_worker(*argv)
    assert done.returncode == 64, done.stderr
    assert ExitCode.USAGE.value == 64
    assert "usage: devserver-reaper" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["enqueue", "--input", "ids.txt", "--sk", CANARY],
        ["demo", f"--sk={CANARY}"],
        ["run", "--input", "ids.txt", f"--s={CANARY}"],
        ["check", "--secret-key", CANARY],
    ],
    ids=["flag-the-command-lacks", "flag-with-equals", "abbreviation", "misspelt"],
)
def test_a_usage_error_never_echoes_a_secret(argv: list[str]) -> None:
    """argparse would repeat the unrecognised words, the secret among them; we name flags."""
    done = run_worker(*argv)
    assert done.returncode == 64
    assert "unknown flag" in done.stderr or "is a flag of" in done.stderr
    assert CANARY not in done.stderr + done.stdout


def test_invalid_settings_exit_78_naming_the_field_not_the_secret(tmp_path: Path) -> None:
    done = run_worker(
        "run", "--input", "ids.txt", "--batch-size", "0", "--sk", CANARY,
        env={"REAPER_SECURITY_TOKEN": CANARY, "HUAWEICLOUD_SDK_AK": CANARY},
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 78
    assert ExitCode.CONFIG.value == 78
    assert done.stderr == "devserver-reaper: --batch-size must be at least 1, not 0\n"
    assert CANARY not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_a_flag_overrides_the_environment_even_into_an_error(tmp_path: Path) -> None:
    """REAPER_BATCH_SIZE=10 is valid; the flag that replaces it is not: 78, so the flag won."""
    done = run_worker(
        "run", "--input", "ids.txt", "--batch-size", "5000",
        env={"REAPER_BATCH_SIZE": "10"}, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 78
    assert "--batch-size must be at most 1,000, not 5,000" in done.stderr


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["check", "--project-id", "not_valid!"], {}, "--project-id"),
        (["check", "--sk-file", "."], {"REAPER_SK": CANARY}, "--sk-file . is not a regular"),
        (["check", "--config", "missing.toml"], {}, "missing.toml"),
        (["check"], {"REAPER_CONFIG": "gone.toml"}, "REAPER_CONFIG"),
        (["check", "--endpoint", "http://example.com"], {}, "endpoint"),
        (["check", "--log-format", "xml"], {}, "--log-format must be one of 'auto', 'json' or"),
        (["check"], {"REAPER_RATE": "fast"}, "rate (REAPER_RATE or the config file) must be a"),
    ],
    ids=[
        "project-id",
        "sk-file-is-a-directory",
        "config-flag-missing",
        "config-env-missing",
        "plain-http",
        "log-format",
        "env-rate",
    ],
)
def test_each_kind_of_bad_setting_exits_78(
    tmp_path: Path, argv: list[str], env: dict[str, str], named: str
) -> None:
    done = run_worker(*argv, env=env, cwd=tmp_path)
    assert done.returncode == 78, done.stderr
    assert named in done.stderr
    assert CANARY not in done.stderr


@pytest.mark.parametrize(
    ("argv", "env", "said"),
    [
        (["--deadline", "-5"], {}, "--deadline must be more than 0 seconds, not -5"),
        (["--grace", "-1"], {}, "--grace must be at least 0 seconds, not -1"),
        (["--read-timeout", "601"], {}, "--read-timeout must be at most 600 seconds, not 601"),
        (["--recheck-max-age", "0.5"], {}, "--recheck-max-age must be at least 1 second, not 0.5"),
        (["--max-fraction", "1.5"], {}, "--max-fraction must be at most 1, not 1.5"),
        (["--concurrency", "300"], {}, "--concurrency must be at most 256, not 300"),
        (
            ["--rate", "-5"], {},
            "--rate must be a number of calls per second (more than 0, at most 10,000) or "
            "'auto', not -5",
        ),
        (
            [], {"REAPER_STATS_INTERVAL": "-60"},
            "stats_interval (REAPER_STATS_INTERVAL or the config file) must be at least 0 "
            "seconds, not -60",
        ),
        ([], {"REAPER_BATCH_SIZE": "2.5"}, "must be a whole number, not 2.5"),
        ([], {"REAPER_MAX_ATTEMPTS": CANARY}, "must be a whole number"),  # text: never said
    ],
    ids=["deadline", "grace", "read-timeout", "recheck-max-age",
         "max-fraction", "concurrency", "rate", "env-stats-interval", "env-batch-size",
         "env-text"],
)  # fmt: skip
def test_a_number_out_of_range_is_said_in_the_users_words(
    tmp_path: Path, argv: list[str], env: dict[str, str], said: str
) -> None:
    """``--deadline -5`` said "must be more than 0.0": pydantic's limit, as a float, no unit
    and not what was wrong with it. A number's limit is said as people write it, in seconds
    for a duration, and the number given with it (text given is never repeated)."""
    done = run_worker("run", "--input", "ids.txt", *argv, env=env, cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert done.returncode == 78, done.stderr
    assert lines[0].startswith("devserver-reaper: ") and lines[0].endswith(said), lines
    assert CANARY not in done.stderr


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--deadline", "abc"], "--deadline must be a number of seconds"),
        (["--batch-size", "2.5"], "--batch-size must be a whole number, not 2.5"),
        (["--max-attempts", CANARY], "--max-attempts must be a whole number"),
    ],
    ids=["text", "not-whole", "secret-text"],
)
def test_a_setting_flag_that_is_no_number_is_said_in_words_not_argparses(
    tmp_path: Path, argv: list[str], said: str
) -> None:
    """argparse said "argument --deadline: invalid float value: 'abc'": its words, and what
    was typed repeated (a secret pasted in the wrong place too). Still 64, as the command
    line's parse; said as the settings say a number out of range."""
    done = run_worker("run", "--input", "ids.txt", *argv, cwd=tmp_path)
    assert done.returncode == 64, done.stderr
    assert done.stderr.splitlines()[-1] == f"devserver-reaper run: {said}"
    assert CANARY not in done.stderr


@pytest.mark.parametrize(
    ("argv", "env", "toml", "said"),
    [
        (["--deadline", "inf"], {}, "",
         "--deadline must be a finite number of seconds (more than 0), not inf"),
        (["--deadline", "nan"], {}, "",
         "--deadline must be a finite number of seconds (more than 0), not nan"),
        (["--deadline", "1e999"], {}, "",
         "--deadline must be a finite number of seconds (more than 0), not inf"),
        (["--connect-timeout=-inf"], {}, "",
         "--connect-timeout must be a finite number of seconds (more than 0, at most 300), "
         "not -inf"),
        ([], {"REAPER_RECLAIM_AFTER": "Infinity"}, "",
         "reclaim_after (REAPER_RECLAIM_AFTER or the config file) must be a finite number of "
         "seconds (more than 0), not inf"),
        ([], {"REAPER_MAX_FRACTION": "nan"}, "",
         "max_fraction (REAPER_MAX_FRACTION or the config file) must be a finite number (more "
         "than 0, at most 1), not nan"),
        (["--rate", "inf"], {}, "",
         "--rate must be a number of calls per second (more than 0, at most 10,000) or "
         "'auto', not inf"),
        ([], {}, "stats_interval = inf\n",
         "stats_interval (REAPER_STATS_INTERVAL or the config file) must be a finite number of "
         "seconds (at least 0), not inf"),
        ([], {}, "max_deletions = inf\n",
         "max_deletions (REAPER_MAX_DELETIONS or the config file) must be a whole number (at "
         "least 0), not inf"),
    ],
    ids=["deadline-inf", "deadline-nan", "deadline-overflow", "connect-timeout", "env-reclaim",
         "env-max-fraction", "rate", "toml-stats-interval", "toml-max-deletions"],
)  # fmt: skip
def test_an_infinite_or_nan_number_is_refused_in_the_words_of_its_range(
    tmp_path: Path, argv: list[str], env: dict[str, str], toml: str, said: str
) -> None:
    """``--deadline inf`` was taken (a run with no deadline, said as a number), as were
    ``nan`` and ``1e999`` for any setting whose limits let them by: refused (78) like a number
    out of range, in the words of the setting's range, with what was given."""
    if toml:
        (tmp_path / "reaper.toml").write_text(toml, encoding="utf-8")
        argv = [*argv, "--config", "reaper.toml"]
    done = run_worker("run", "--input", "ids.txt", "--dry-run", *argv, env=env, cwd=tmp_path)
    assert done.returncode == 78, done.stderr
    assert done.stderr == f"devserver-reaper: {said}\n"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--page-size", "0"], "--page-size must be from 1 to 1,000, not 0"),
        (["--plan-ttl", "40d"], "--plan-ttl must be at most 30d, not 40d"),
    ],
)
def test_discovers_own_numbers_out_of_range_say_what_was_given(
    tmp_path: Path, argv: list[str], said: str
) -> None:
    """They said "--page-size: 1 to 1000" and "--plan-ttl: at most 30d": the rule, not that
    it was broken, nor by what."""
    done = run_worker("discover", "--all", *argv, cwd=tmp_path)
    assert done.returncode == 64, done.stderr
    assert said in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--page-size", CANARY], "--page-size must be a whole number"),
        (["--page-size", "2.5"], "--page-size must be a whole number, not 2.5"),
    ],
    ids=["secret-text", "not-whole"],
)
def test_discovers_page_size_that_is_no_number_is_said_in_words_never_repeated(
    tmp_path: Path, argv: list[str], said: str
) -> None:
    """4351e92 put the setting flags' numbers in words; discover's own --page-size kept
    argparse's "argument --page-size: invalid int value: 'CANARY-...'", repeating what was
    typed (a key pasted in the wrong place too). Said as the setting flags say it, 64."""
    done = run_worker("discover", "--all", *argv, cwd=tmp_path)
    assert done.returncode == 64, done.stderr
    assert done.stderr.splitlines()[-1] == f"devserver-reaper discover: {said}"
    assert CANARY not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--older-than", CANARY], "--older-than: not a duration or an ISO-8601 date"),
        (["--newer-than", CANARY + "M"], "--newer-than: not a duration or an ISO-8601 date"),
        (["--all", "--plan-ttl", CANARY], "--plan-ttl: not a duration (use a number"),
        (["--older-than", "6M"], "--older-than: not a duration: months and years are not"),
        (["--older-than", "0d"], "--older-than: a duration must be more than 0, not 0d"),
    ],
    ids=["older-than", "newer-than", "plan-ttl", "months", "zero"],
)
def test_discovers_durations_and_dates_that_do_not_parse_are_never_repeated(
    tmp_path: Path, argv: list[str], said: str
) -> None:
    """discover's --older-than, --newer-than and --plan-ttl repeated what was typed when it
    did not parse ("not a duration or an ISO-8601 date: 'CANARY-...'"): a key pasted in the
    wrong place went to the terminal and the event log. Only what parses as a duration is
    repeated (0d, which is out of range), as the setting flags repeat only numbers."""
    done = run_worker("discover", *argv, cwd=tmp_path)
    assert done.returncode == 64, done.stderr
    assert said in done.stdout + done.stderr
    assert CANARY not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("argv", "env", "code", "said"),
    [
        (["run", "--ledger", "nope/l.db"], {}, 78,
         "--ledger nope/l.db: the directory nope does not exist"),
        (["run"], {"REAPER_LEDGER": "nope/l.db"}, 78,
         "REAPER_LEDGER nope/l.db: the directory nope does not exist"),
        (["run", "--results", "nope/r.jsonl"], {}, 64,
         "--results nope/r.jsonl: the directory nope does not exist"),
        (["run", "--events", "nope/e.jsonl"], {}, 64,
         "--events nope/e.jsonl: the directory nope does not exist"),
        (["discover", "--all", "--plan", "nope/p.json"], {}, 64,
         "--plan nope/p.json: the directory nope does not exist"),
    ],
    ids=["ledger-flag", "ledger-env", "results", "events", "discover-plan"],
)  # fmt: skip
def test_a_missing_directory_is_a_settings_78_and_a_command_lines_own_path_64(
    tmp_path: Path, argv: list[str], env: dict[str, str], code: int, said: str
) -> None:
    """The ledger is a setting (a flag, REAPER_LEDGER or the config file): a directory it
    names that does not exist is invalid configuration, 78, as any invalid setting is.
    --results, --events and discover's --plan are the command line's own: 64, as
    reference.md's exit codes say. The ledger's message said 'ledger PATH: directory ...',
    not the setting as it was given."""
    (tmp_path / "ids.txt").write_text("job-1\n")
    more = ["-i", "ids.txt", "--dry-run"] if argv[0] == "run" else []
    done = run_worker(*argv, *more, env=env, cwd=tmp_path)
    assert done.returncode == code, done.stderr
    assert said in done.stdout + done.stderr
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["serve", "--stream", ""], "--stream must be the name of a Redis Stream, not empty"),
        (["serve", "--consumer", ""], "--consumer must be a consumer name, not empty"),
        (["serve", "--group", " "], "--group must be the name of a consumer group, not empty"),
        (["run", "-i", "ids.txt", "--shard="], "--shard must be I/N (such as 0/4) or auto/N, "
         "not empty"),
        (["run", "-i", "ids.txt", "--allowed-projects", ""],
         "--allowed-projects must be project ids, comma-separated, not empty"),
        (["run", "-i", "ids.txt", "--sk-file", ""], "--sk-file must be a file path, not empty"),
        (["run", "-i", "ids.txt", "--protect", "x", "--protect", ""],
         "--protect must be a rule: id:ID, name:GLOB, a glob, or an id-or-name, not empty"),
    ],
    ids=["stream", "consumer", "group-blank", "shard", "allowed-projects", "sk-file",
         "protect"],
)  # fmt: skip
def test_a_setting_flag_given_empty_is_a_usage_error_naming_what_it_takes(
    tmp_path: Path, argv: list[str], said: str
) -> None:
    """``serve --stream ''`` said pydantic's "String should have at least 1 character" (78),
    and ``--allowed-projects ''`` (any project, over the config file's list) or
    ``--sk-file ''`` (no file read) were taken without a word. An empty flag is refused as
    a flag that is no number is: 64, the usage, the flag and what it takes."""
    done = run_worker(*argv, "--dry-run" if argv[0] == "run" else "--rate=1", cwd=tmp_path)
    assert done.returncode == 64, done.stderr
    assert "usage: devserver-reaper" in done.stderr
    assert done.stderr.splitlines()[-1] == f"devserver-reaper {argv[0]}: {said}"


def test_every_text_setting_flag_of_every_command_refuses_an_empty_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No text setting flag takes '' (each says what it takes): parsed in-process for all."""
    texts = {flag for flag, kind, _ in SETTING_FLAGS if kind not in (int, float, "bool")}
    for command, flags in COMMAND_SETTINGS.items():
        for flag in texts & set(flags):
            with pytest.raises(SystemExit) as stopped:
                build_parser().parse_args([command, flag, ""])
            assert stopped.value.code == 64, (command, flag)
            last = capsys.readouterr().err.splitlines()[-1]
            assert last.startswith(f"devserver-reaper {command}: {flag} must be "), last
            assert last.endswith(", not empty"), last


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["run", "--plan", "", "--dry-run"], "run: --plan must be a file path, not empty"),
        (["run", "-i", "", "--dry-run"],
         "run: --input/-i must be a file path, or - for stdin, not empty"),
        (["check", "--config", ""], "check: --config must be a file path, not empty"),
        (["plan", "show", ""], "plan: PLAN must be a file path, not empty"),
        (["report", " "], "report: LEDGER must be a file path, not empty"),
        (["simulate", "--port", "0", "--ids-file", ""],
         "simulate: --ids-file must be a file path, not empty"),
    ],
    ids=["run-plan", "run-input", "check-config", "plan-show", "report", "simulate"],
)  # fmt: skip
def test_a_file_the_command_line_names_empty_is_a_usage_error(
    tmp_path: Path, argv: list[str], said: str
) -> None:
    """``run --plan ''`` ended in a TypeError traceback; ``check --config ''`` named no file
    and read none without a word; ``plan show ''`` and ``report ''`` read the current
    directory ("is a directory"); ``simulate --ids-file ''`` wrote no ids and served. Each
    is refused as a setting's file flag given empty is: 64, naming it."""
    done = run_worker(*argv, cwd=tmp_path)
    assert done.returncode == 64, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == f"devserver-reaper {said}"


@pytest.mark.parametrize(
    ("toml", "said"),
    [
        ('stream = ""', "stream (REAPER_STREAM or the config file) must not be empty"),
        ('consumer = ""', "consumer (REAPER_CONSUMER or the config file) must not be empty"),
        ('allowed_projects = ""', "allowed_projects (REAPER_ALLOWED_PROJECTS or the config "
         "file) must not be empty: list at least one entry, or write [] for none"),
        ('sk_file = ""', "sk_file (REAPER_SK_FILE or the config file) must be a file path, "
         "not empty"),
        ('protect_file = ""', "reaper.toml: protect_file must be a file path, not empty"),
    ],
    ids=["stream", "consumer", "allowed-projects", "sk-file", "protect-file"],
)  # fmt: skip
def test_an_empty_text_setting_in_the_config_file_is_refused_in_words(
    tmp_path: Path, toml: str, said: str
) -> None:
    """The same settings empty in the config file: 78 (an invalid setting), in words."""
    (tmp_path / "reaper.toml").write_text(toml + "\n", encoding="utf-8")
    (tmp_path / "ids.txt").write_text("job-1\n")
    done = run_worker("run", "-i", "ids.txt", "--dry-run", "--config", "reaper.toml",
                      cwd=tmp_path)  # fmt: skip
    assert done.returncode == 78, done.stderr
    assert done.stderr == f"devserver-reaper: {said}\n"


def test_config_is_read_whether_given_before_or_after_the_command(tmp_path: Path) -> None:
    """--config on the command and on the subcommand both name the file."""
    config = tmp_path / "reaper.toml"
    config.write_text("batch_size = 0\n", encoding="utf-8")
    for argv in (["--config", str(config), "check"], ["check", "--config", str(config)]):
        done = run_worker(*argv, cwd=tmp_path)
        assert done.returncode == 78, argv
        assert "batch_size" in done.stderr


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_during_start_up_exits_75_without_a_traceback(stop: signal.Signals) -> None:
    """The signal arrives while the settings load, before ``run`` has its own handling:
    it used to kill the process (143) or raise KeyboardInterrupt with a traceback."""
    child = (
        "import os, signal, sys, worker.settings as s\n"
        "load = s.load_settings\n"
        "def stopped(*a, **k):\n"
        f"    os.kill(os.getpid(), {int(stop)})\n"
        "    return load(*a, **k)\n"
        "s.load_settings = stopped\n"
        "from worker.cli import main\n"
        "main(['run', '-i', '-', '--yes', '--endpoint', 'http://127.0.0.1:9',\n"
        "      '--project-id', 'p1', '--ak', 'AK', '--sk', 'SK'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 75, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["simulate", "--jobs", "99999999999"],
        ["simulate", "--jobs", "-5"],
        ["simulate", "--port", "70000"],
        ["simulate", "--port", "-1"],
        ["demo", "--jobs", "-1"],
    ],
)
def test_simulator_sizes_out_of_range_are_usage_errors(args: list[str]) -> None:
    """They used to crash (OverflowError, ValueError) or, for a huge --jobs, fill memory
    (24 GB within seconds) before the first request could be served."""
    done = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "must be a whole number" in done.stderr and "Traceback" not in done.stderr


QUOTA = "--quota must be a number of calls a second from 0 to 100,000 (0: no limit)"


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--quota", "inf", f"{QUOTA}, not inf"),
        ("--quota", "1e400", f"{QUOTA}, not inf"),
        ("--quota", "nan", f"{QUOTA}, not nan"),
        ("--burst", "inf", "--burst must be a whole number from 1 to 10,000, not inf"),
        ("--burst", "0", "--burst must be a whole number from 1 to 10,000, not 0"),
        ("--burst", "many", "--burst must be a whole number from 1 to 10,000"),
        ("--latency-ms", "1e300",
         "--latency-ms must be a number of milliseconds from 0 to 60,000, not 1e+300"),
        ("--latency-ms", "inf",
         "--latency-ms must be a number of milliseconds from 0 to 60,000, not inf"),
        ("--max-batch", "0", "--max-batch must be a whole number from 1 to 100,000, not 0"),
        ("--fault-rate", "nan", "--fault-rate must be a number from 0 to 1, not nan"),
        ("--port", "70000", "--port must be a whole number from 0 to 65,535, not 70,000"),
        ("--window", "inf",
         "--window must be a number of seconds from 0 to 3,600 (0: a token bucket), not inf"),
    ],
)  # fmt: skip
def test_simulate_says_each_number_flags_range_in_the_users_words(
    flag: str, value: str, said: str
) -> None:
    """``--quota 1e400`` said "argument --quota: the quota (calls a second; 0 for no limit)
    must be a finite number of at least 0, not inf", ``--burst inf`` argparse's "invalid int
    value: 'inf'", and ``--latency-ms 1e300`` was taken (``check`` against it then waited on
    calls never answered). Each number flag has a range, said as a setting flag's is: the
    flag, what it takes, the number given (never text); 64, before anything is served."""
    done = subprocess.run(
        [sys.executable, "-m", "worker", "simulate", "--port", "0", flag, value],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert done.stderr.splitlines()[-1] == f"devserver-reaper simulate: {said}"
    assert "listening" not in done.stdout


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--window", "10"],
         "--window counts --quota x --window calls: it needs a --quota above 0"),
        (["--window", "10", "--quota", "30", "--burst", "2"],
         "--burst is a token bucket's: a --window count has none (leave it 1)"),
        (["--window", "10", "--quota", "0.01"],
         "--window 10 at --quota 0.01 counts 0.1 calls a window: it must count from 1 to "
         "1,000,000"),
        (["--quota", "30", "--window-kind", "sliding"],
         "--window-kind counts over a --window: give --window SECONDS too (without it the "
         "quota is a token bucket's)"),
    ],
)  # fmt: skip
def test_simulate_says_a_window_that_cannot_count_in_the_flags_words(
    flags: list[str], said: str
) -> None:
    """``--window`` (a count over a long window in place of the token bucket) with no quota,
    with a burst (a bucket's), or counting under a call a window, or a ``--window-kind``
    with no window (it was dropped: a token bucket served): 64, one line naming the flags,
    before anything is served."""
    done = subprocess.run(
        [sys.executable, "-m", "worker", "simulate", "--port", "0", *flags],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert done.stderr.splitlines() == [f"devserver-reaper simulate: {said}"]
    assert "listening" not in done.stdout


# -- issue 24: secrets on the command line, core dumps ----------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--sk", CANARY], "--sk"),
        (["--security-token", CANARY], "--security-token"),
        (["--redis-url", f"redis://user:{CANARY}@127.0.0.1:1/0"], "--redis-url"),
        # redis-py takes any query argument as a connection setting, the password too
        (["--redis-url", f"redis://127.0.0.1:1/0?password={CANARY}"], "--redis-url"),
        (["--redis-url", f"rediss://127.0.0.1:1/0?username=u&password={CANARY}"], "--redis-url"),
    ],
)
def test_a_secret_given_as_a_flag_is_warned_about_once_and_never_printed(
    tmp_path: Path, flags: list[str], named: str
) -> None:
    """Every user of the machine reads flags in ``ps``: say so and name the *_file setting."""
    rest = (
        ["enqueue", "--input", "x"]
        if named == "--redis-url"
        else ["check", "--region", "cn-north-4"]
    )
    done = run_worker(*rest[:1], *flags, *rest[1:], cwd=tmp_path)
    warnings = [line for line in done.stderr.splitlines() if "every user" in line]
    assert len(warnings) == 1, done.stderr
    assert named in warnings[0]
    assert CANARY not in done.stderr + done.stdout


def test_a_password_less_redis_url_flag_and_a_secret_from_the_environment_warn_nothing(
    tmp_path: Path,
) -> None:
    """Only a secret on the command line is warned about: a --redis-url without a password,
    the SK in the environment, say nothing."""
    quiet = run_worker("enqueue", "--redis-url", "redis://127.0.0.1:1/0", "--input", "x",
                       env={"REAPER_SK": CANARY}, cwd=tmp_path)  # fmt: skip
    assert "every user" not in quiet.stderr


def test_the_process_makes_no_core_dump_that_would_hold_its_keys(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "worker", "simulate", "--port", "0", "--jobs", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp_path,
    ) as process:  # fmt: skip
        try:
            assert process.stdout is not None
            assert process.stdout.readline()  # started: its limits are set by now
            limits = Path(f"/proc/{process.pid}/limits").read_text()
        finally:
            process.terminate()
            process.wait(timeout=20)
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["run", "--inptu", "ids.txt"], "run: unknown flag --inptu (did you mean --input?)"),
        (
            ["run", "-i", "ids.txt", "--dry-runn"],
            "run: unknown flag --dry-runn (did you mean --dry-run?)",
        ),
        (["discover", "--statu", "X"], "discover: unknown flag --statu (did you mean --status?)"),
        (["check", "--concurrency", "2"], "check: --concurrency is a flag of run, serve and demo"),
        (["ru"], "unknown command 'ru' (did you mean run?)"),
        (["run", "--status", "FINISHED", "--project", "cn-east-3", "--yes"],
         "run: run takes no --project: its filters select in the settings' project "
         "(--project-id, or --region for the project IAM names after it), and an --input line "
         "names its own; to select in other or several projects, write a plan with discover "
         "--project ... --plan FILE, review it (plan show FILE), then run --plan FILE"),
    ],
    ids=["before-a-required-flag", "after-the-input", "discover", "another-commands", "command",
         "run-project"],
)  # fmt: skip
def test_a_mistyped_flag_is_named_with_a_suggestion_and_the_commands_usage(
    argv: list[str], said: str
) -> None:
    done = run_worker(*argv)
    assert done.returncode == 64
    usage, message = done.stderr.splitlines()
    command = argv[0] if argv[0] != "ru" else ""
    assert usage.startswith(f"usage: devserver-reaper {command}".rstrip()), usage
    assert said in message, message


def test_rate_that_is_not_a_number_says_what_it_must_be_in_one_line() -> None:
    done = run_worker("run", "-i", "ids.txt", "--yes", "--rate", "fast")
    assert done.returncode == 78
    assert done.stderr == (
        "devserver-reaper: --rate must be a number of calls per second "
        "(more than 0, at most 10,000) or 'auto'\n"
    )


# -- help in the user's words -------------------------------------------------------------------


def _help(command: str) -> str:
    done = run_worker(command, "--help")
    assert done.returncode == 0, done.stderr
    return done.stdout


def _sections(text: str) -> dict[str, str]:
    """``--help``'s sections by title (``options``, ``safety: ...``, ``examples``)."""
    parts = re.split(r"^(\S[^\n]*):\n", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize("command", sorted(COMMAND_SETTINGS))
def test_every_command_has_examples_and_names_values_in_the_users_words(command: str) -> None:
    """Placeholders say what to type (FILE, N, SECONDS), never a field name (SUB_CONFIG,
    FILTER_STATUS), and every command shows examples of itself."""
    sections = _sections(_help(command))
    assert f"devserver-reaper {command}" in sections["examples"]
    for action in _subcommands()[command]._actions:
        if action.option_strings and action.nargs != 0 and not action.choices:
            assert action.metavar is not None, action.option_strings
            assert re.fullmatch(r"[A-Z]+(?:[/|][A-Z]+)*", str(action.metavar)), action.metavar


def test_run_groups_its_flags_and_keeps_the_safety_flags_apart() -> None:
    sections = _sections(_help("run"))
    safety = sections["safety: what may be deleted, and when"]
    for flag in ("--dry-run", "--yes", "--max-deletions", "--protect", "--protected-statuses"):
        assert re.search(rf"^  {flag}\b", safety, re.MULTILINE), flag
    assert "--rate" not in safety and "--input" not in safety
    assert re.search(r"^  --input FILE", sections["input"], re.MULTILINE)
    assert re.search(r"^  --rate CALLS/S", sections["rate, retries and time limits"], re.M)


def test_a_command_without_a_queue_shows_no_queue_group_and_no_value_is_left_unnamed() -> None:
    """``check --help`` showed a "queue (Redis) and health" group holding ``--iam-endpoint
    VALUE``: a flag no group named fell there, with a placeholder that says nothing."""
    helps = {name: parser.format_help() for name, parser in _subcommands().items()}
    check, run = _sections(helps["check"]), _sections(helps["run"])
    assert not any(title.startswith("queue") for title in check), list(check)
    assert re.search(r"^  --iam-endpoint URL ", check["connection and credentials"], re.M)
    safety = run["safety: what may be deleted, and when"]
    assert re.search(r"^  --allowed-projects IDS$", safety, re.M)
    assert not [name for name, text in helps.items() if " VALUE" in text]


@pytest.mark.parametrize("command", ["serve", "run", "enqueue"])
def test_every_setting_with_a_default_says_it_in_help(command: str) -> None:
    """What a flag does when it is left out is said where it is offered, as docs/reference.md
    says it: serve's --help gave no default for --max-deliveries (5), --reclaim-after (300),
    --http-port (8080) or --log-level (info), the settings a deployment tunes first."""
    from worker.settings import Settings

    text = _help(command)
    flags = re.findall(r"^  (--[a-z-]+)(?: [A-Z/]+)?\s+(.*?)(?=^  -|^\S|\Z)", text, re.M | re.S)
    assert flags
    for flag, said in flags:
        field = Settings.model_fields.get(flag[2:].replace("-", "_"))
        if field is None or field.default in (None, False) or field.default_factory:
            continue
        assert "default" in " ".join(said.split()), (flag, field.default, said)


def test_serve_does_not_offer_the_flags_it_refuses() -> None:
    text = _help("serve")
    for refused in ("--dry-run", "--yes", "--max-deletions", "--confirm-project-over"):
        assert refused not in text


@pytest.mark.parametrize("columns", ["60", "80", "100"])
def test_help_never_breaks_a_line_at_a_words_hyphen(columns: str) -> None:
    """``simulate --help`` showed its default key as ``[demo-`` beside ``--ak``, the rest
    (``secret-key]``) on the next line; a flag named in a help text could be cut the same
    way (``--sk-`` / ``file``). A line breaks between words only, at any width."""
    for command in sorted(COMMAND_SETTINGS):
        text = run_worker(command, "--help", env={"COLUMNS": columns}).stdout
        broken = [line for line in text.splitlines() if re.search(r"\w-$", line)]
        assert not broken, (command, broken)
        if command == "simulate":
            assert "[demo-secret-key]" in text


def test_simulate_help_shows_every_default() -> None:
    section = _sections(_help("simulate"))["the simulated project [defaults in brackets]"]
    for default in ("[127.0.0.1]", "[8443]", "[1000]", "[demo-project]", "[DEMOAK]", "[0]"):
        assert default in section, default
    assert "--log-format" not in _help("simulate")  # it reads no settings: it offers none


@pytest.mark.parametrize(
    ("words", "offered"),
    [
        (["ru"], ["run"]),
        (["run", "--dry"], ["--dry-run"]),
        (["run", "--input-format", "js"], ["json", "jsonl"]),
        (["discover", "--time-field", ""], ["create_at", "update_at"]),
        (["serve", "--dry"], []),
        (["run", "--plan", "pl"], ["plan.json"]),
        (["plan", ""], ["show"]),
        (["plan", "show", "pl"], ["plan.json"]),
        (["completion", ""], ["bash", "zsh"]),
        (["run", "--log-format", ""], ["auto", "console", "json"]),
        (["serve", "--credential-source", "p"], ["pod-identity", "profile"]),
        (["check", "--log-level", "w"], ["warning"]),
        (["serve", "--stream", ""], []),
        (["run", "--rate", "p"], []),
        (["discover", "--project", ""], []),
        (["run", "--dry-run", "pl"], []),
        (["run", "--dry-run", "--inp"], ["--input", "--input-format"]),
        (["--config", "pl"], ["plan.json"]),
        (["run", "--ca-bundle", "pl"], ["plan.json"]),
        (["report", "pl"], ["plan.json"]),
    ],
)
def test_bash_completion_offers_commands_flags_values_and_files(
    tmp_path: Path, words: list[str], offered: list[str]
) -> None:
    """Each flag's fixed values (a setting's too: --log-format, --credential-source), files
    after a flag that takes one and in a file argument (plan show PLAN, report LEDGER), and
    no file where a name, URL or number goes (--stream, --rate) or where a command takes no
    argument (run): there its flags. Before, --log-format offered no value, --stream and a
    word of run offered the directory's files, and --config before the command the
    commands."""
    script = run_worker("completion", "bash").stdout
    (tmp_path / "plan.json").write_text("{}")
    line = " ".join(shlex.quote(word) for word in ["devserver-reaper", *words])
    probe = (
        f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words)}; _devserver_reaper\n"
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(
        ["bash", "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert sorted(done.stdout.split()) == offered


ZSH = shutil.which("zsh")


@pytest.mark.skipif(ZSH is None and not IN_CI, reason="needs zsh (CI installs it)")
def test_zsh_loads_the_completion_and_completes_a_command_and_a_flag_value_at_tab(
    tmp_path: Path,
) -> None:
    """In a real zsh on a pseudo-terminal (no rc files, a home of its own), as a person
    sets it up: ``source <(devserver-reaper completion zsh)``, then TAB after ``ru`` gives
    ``run``, after ``run --input-format js`` lists ``json`` and ``jsonl``, and the script
    loaded without a word on the screen. zsh read the bash script's ``${COMP_WORDS[@]:1:
    COMP_CWORD-1}`` as a history modifier: every TAB said ``unrecognized modifier `C'``."""
    from tests.tty import Terminal

    assert ZSH is not None, "zsh is needed under CI=true"
    bin_dir = str(Path(sys.executable).parent)  # where devserver-reaper is installed
    env = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(tmp_path),
           "ZDOTDIR": str(tmp_path), "PS1": "ready> "}  # fmt: skip
    term = Terminal(["-f", "-i"], env, program=[ZSH])
    try:
        term.expect("ready> ")
        term.type(b"source <(devserver-reaper completion zsh); echo loaded-$?\n")
        term.expect("loaded-0")
        term.type(b"devserver-reaper ru\t")
        term.expect_on_screen("ready> devserver-reaper run")
        term.type(b" --input-format js\t")
        term.expect_on_screen("--input-format json")  # the two choices' common part
        term.type(b"\t")  # a second TAB lists them
        term.expect_on_screen("jsonl")
        listed = term.screen_text()
        term.type(b"\x15devserver-reaper serve --log-format co\t")  # a setting's values
        term.expect_on_screen("serve --log-format console")
    finally:
        term.process.kill()
        term.wait(timeout=30)
    screen = term.screen_text()
    assert re.search(r"^json +jsonl *$", listed, re.MULTILINE), listed
    for noise in ("not found", "parse error", "insecure", "compinit:"):
        assert noise not in screen, screen


def test_the_values_completion_offers_for_a_setting_are_the_settings_own() -> None:
    """helptext.CHOICES (what TAB offers after --log-format) is the setting's Literal."""
    from typing import get_args

    from worker.helptext import CHOICES

    for flag, values in CHOICES.items():
        field = Settings.model_fields[flag.removeprefix("--").replace("-", "_")]
        assert values == get_args(field.annotation), flag
    literal = {
        name
        for name, field in Settings.model_fields.items()
        if all(isinstance(arg, str) for arg in get_args(field.annotation) or [0])
    }
    assert {f"--{name.replace('_', '-')}" for name in literal} == set(CHOICES)
