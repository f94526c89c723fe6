"""The command line: parse, load settings, hand over to a command. Nothing imports this.

Only the standard library is imported at module level so that ``--help`` starts fast; each
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import gc
import math
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

from worker import __version__, helptext, stdio, stops
from worker.exit_codes import ExitCode


def rules(text: str) -> str:
    """The type of a repeatable setting flag: each use adds comma-separated words."""
    return text


class _JoinAction(argparse.Action):
    """``--protect a --protect b`` arrives as ``"a,b"``; the setting splits it on commas."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        before = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, values if before is None else f"{before},{values}")


# (flag, type, help). One per setting in worker.settings.Settings; a test keeps them in step.
_BOOL = "bool"
SETTING_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("--region", str, "Huawei Cloud region, e.g. cn-north-4 (env REAPER_REGION)"),
    ("--endpoint", str, "API base URL; default derived from --region"),
    ("--project-id", str, "project id (env REAPER_PROJECT_ID or HUAWEICLOUD_SDK_PROJECT_ID)"),
    (
        "--allowed-projects",
        str,
        "comma-separated project ids a line or stream entry may name (serve: default the "
        "--project-id only)",
    ),
    (
        "--allowed-endpoints",
        str,
        "comma-separated endpoint URLs a line, stream entry or plan may name beside the "
        "--endpoint, a region's public one and loopback",
    ),
    (
        "--iam-endpoint",
        str,
        "IAM URL where a --region's project id is looked up when no --project-id is set "
        "(default: the region's IAM)",
    ),
    ("--ak", str, "access key (env REAPER_AK or HUAWEICLOUD_SDK_AK)"),
    ("--sk", str, "secret key; prefer env REAPER_SK / HUAWEICLOUD_SDK_SK or --sk-file"),
    ("--security-token", str, "temporary-credential token; prefer the env or a file"),
    ("--ak-file", str, "read the access key from this file"),
    ("--sk-file", str, "read the secret key from this file (a mounted Secret)"),
    ("--security-token-file", str, "read the security token from this file"),
    ("--ca-bundle", str, "PEM file of extra CAs to trust (private CAs)"),
    (
        "--credential-source",
        str,
        "auto, settings, env, profile, pod-identity or metadata (default auto: in that order)",
    ),
    ("--metadata-url", str, "ECS metadata service (default http://169.254.169.254)"),
    ("--batch-size", int, "ids per DELETE call (1-1000, default 50)"),
    ("--concurrency", int, "API calls on the wire at once at most (default 8)"),
    ("--rate", str, "API calls per second allowed, or 'auto' to find the quota (default 10)"),
    ("--burst", int, "calls allowed at once on top of the rate (default 5)"),
    (
        "--max-attempts",
        int,
        "attempts per batch on 5xx and network errors before the API counts as unavailable "
        "(exit 69, its ids left open; default 6)",
    ),
    ("--deadline", float, "wall-clock limit for the whole run, in seconds"),
    ("--connect-timeout", float, "seconds to connect (default 10)"),
    ("--read-timeout", float, "seconds to wait for an answer (default 60)"),
    ("--max-retry-after", float, "cap on a server's Retry-After, seconds (default 60)"),
    (
        "--retry-base-delay",
        float,
        "seconds the first back-off after a 5xx or network error is drawn up to, doubling "
        "each time up to 30 (default 0.5)",
    ),
    ("--grace", float, "seconds calls in flight may finish after a signal (default 20)"),
    ("--ledger", str, "SQLite ledger that makes run resumable"),
    ("--dry-run", _BOOL, "read, validate and batch, but send no DELETE"),
    ("--yes", _BOOL, "delete without asking (needed when not on a terminal)"),
    (
        "--max-deletions",
        int,
        "never send more than N ids for deletion: in this run, or with --ledger in every run "
        "on that ledger together",
    ),
    (
        "--shard",
        str,
        "take only shard I of N of the ids (I/N, 0-based; auto/N reads I from an Indexed "
        "Job's JOB_COMPLETION_INDEX)",
    ),
    (
        "--confirm-project-over",
        int,
        "on a terminal, ask for the project id to be typed, not 'yes', above this many jobs "
        "(default 1000)",
    ),
    (
        "--protect",
        rules,
        "never delete these: id:ID, name:GLOB, a glob, or an id-or-name "
        "(repeatable; comma-separated)",
    ),
    ("--protect-file", str, "file of protect rules, one per line"),
    ("--protected-types", str, "comma-separated job types never to delete"),
    ("--protected-statuses", str, "comma-separated job statuses never to delete, e.g. PROCESSING"),
    ("--max-fraction", float, "refuse a plan selecting more than this share (0-1] of the jobs"),
    ("--plan-key-file", str, "file holding the key plans are sealed and checked with"),
    (
        "--recheck-max-age",
        float,
        "seconds a job's re-check (plan, protection) holds before its DELETE (default 60)",
    ),
    (
        "--redis-url",
        str,
        "Redis for serve/enqueue, and for run the rate limit shared with them "
        "(default redis://127.0.0.1:6379/0; run: none)",
    ),
    (
        "--stream",
        str,
        "Redis Stream of ids; its rate limit is STREAM:ratelimit (default devserver-reaper:ids)",
    ),
    ("--group", str, "consumer group (default devserver-reaper)"),
    ("--consumer", str, "consumer name (default: host name)"),
    (
        "--max-deliveries",
        int,
        "deliveries before an entry goes to the dead-letter stream (default 5)",
    ),
    (
        "--reclaim-after",
        float,
        "seconds before another consumer's idle entry is taken over (default 300)",
    ),
    ("--redis-timeout", float, "seconds to wait for Redis's answer past a read (default 10)"),
    ("--http-port", int, "port of /healthz, /readyz, /metrics (default 8080; 0 = any free port)"),
    ("--outcomes-max-len", int, "entries the outcomes stream keeps (default 1,000,000)"),
    ("--outcomes-max-age", float, "seconds outcomes are kept (default 7 days; 0 = no limit)"),
    ("--dead-max-len", int, "entries the dead-letter stream keeps (default 1,000,000)"),
    ("--dead-max-age", float, "seconds dead letters are kept (default 7 days; 0 = no limit)"),
    ("--stats-interval", float, "seconds between stats events (default 60; 0 = off)"),
    ("--http-host", str, "address /healthz, /readyz, /metrics listen on (default 0.0.0.0)"),
    ("--log-format", str, "auto, json or console (default auto: console on a terminal)"),
    ("--log-level", str, "debug, info, warning or error (default info)"),
)

# Which settings each command shows in --help; all are accepted by the settings loader.
_API = ("--region", "--endpoint", "--project-id", "--iam-endpoint", "--ak", "--sk",
        "--security-token", "--ak-file", "--sk-file", "--security-token-file", "--ca-bundle",
        "--credential-source", "--metadata-url",
        "--connect-timeout", "--read-timeout")  # fmt: skip
_DISPATCH = ("--batch-size", "--concurrency", "--rate", "--burst", "--max-attempts",
             "--max-retry-after", "--retry-base-delay", "--grace", "--dry-run", "--yes",
             "--max-deletions")  # fmt: skip
_QUEUE = ("--redis-url", "--stream", "--group", "--consumer", "--max-deliveries",
          "--reclaim-after", "--redis-timeout", "--http-port", "--outcomes-max-len",
          "--outcomes-max-age", "--dead-max-len", "--dead-max-age", "--stats-interval",
          "--http-host")  # fmt: skip
_LOG = ("--log-format", "--log-level")
_PROTECT = ("--protect", "--protect-file", "--protected-types", "--protected-statuses",
            "--max-fraction", "--plan-key-file", "--recheck-max-age")  # fmt: skip
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "run": _API
    + _DISPATCH
    + (
        "--deadline",
        "--ledger",
        "--shard",
        "--confirm-project-over",
        "--stats-interval",
        "--allowed-projects",
        "--allowed-endpoints",
        "--redis-url",  # the rate limit shared with the other shards and serve (fleet.md)
        "--stream",  # whose key {stream}:ratelimit it is
    )
    + _PROTECT
    + _LOG,
    "discover": (
        *_API,
        "--allowed-endpoints",
        "--rate",
        "--burst",
        "--max-attempts",
        "--max-retry-after",
        "--retry-base-delay",
        *_PROTECT[:-1],
        *_LOG,
    ),
    # serve refuses --dry-run and --max-deletions, and never asks: it does not offer them
    "serve": _API
    + tuple(f for f in _DISPATCH if f not in ("--dry-run", "--yes", "--max-deletions"))
    + ("--allowed-projects", "--allowed-endpoints")
    + _QUEUE
    + tuple(f for f in _PROTECT if f not in ("--max-fraction", "--plan-key-file"))
    + _LOG,
    "enqueue": ("--redis-url", "--stream", "--allowed-endpoints", *_LOG),
    "check": _API + _LOG,
    "demo": ("--batch-size", "--concurrency", "--rate", "--burst"),  # it narrates: no events
    "simulate": (),  # configured by its own flags only
    "completion": (),
    "report": ("--ledger",),
    "plan": ("--plan-key-file", "--rate", "--batch-size"),
}

READS_NO_SETTINGS = frozenset({"completion", "simulate"})
"""Commands configured by their own flags alone: they take no settings, and load none (the
settings' pydantic is about 0.2 s of CPU of a start)."""


_MEANT = {"--secret-key": "--sk", "--access-key": "--ak", "--project": "--project-id",
          "--dryrun": "--dry-run", "--input-file": "--input", "--file": "--input"}  # fmt: skip
"""Flags people type from other tools, and ours they mean."""

_NOT_HERE = {
    ("run", "--project"): (
        "run takes no --project: its filters select in the settings' project (--project-id, "
        "or --region for the project IAM names after it), and an --input line names its own; "
        "to select in other or several projects, write a plan with discover --project ... "
        "--plan FILE, review it (plan show FILE), then run --plan FILE"
    ),
}
"""A flag of another command that a command refuses with its own reason."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 64 as docs/reference.md says, not 2, and echoes no secret.

    argparse repeats unrecognised arguments verbatim: ``enqueue --sk KEY`` (a command that
    takes no ``--sk``) would print the key. Only the flag names are shown. Abbreviations
    are off so that ``--s=KEY`` is unrecognised too, not "ambiguous: --s=KEY".
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.argv: list[str] = []  # what was typed, for errors that explain themselves
        self.siblings: Mapping[str, _Parser] = {}
        self._commands: dict[str, _Parser] = {}

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        words = list(sys.argv[1:] if args is None else args)
        self.argv = words
        for sub in self.commands.values():
            sub.argv, sub.siblings = words, self.commands
        parsed, extras = self.parse_known_args(words, namespace)
        if extras:
            # Said by the command they were typed for, with its usage, not by the top level.
            command = self.commands.get(getattr(parsed, "command", None) or "", self)
            command.error(command.unknown(extras, self.commands))
        run = getattr(parsed, "run_parser", None)
        if run is not None and parsed.input is None and parsed.plan is None:
            from worker.discovery.filters import filters_given

            if not filters_given(vars(parsed)):
                run.error("say what to delete: --input FILE, --plan PLAN, or discover's "
                          "filters (--status, --older-than ...)")  # fmt: skip
        return parsed

    @property
    def commands(self) -> dict[str, _Parser]:
        return self._commands

    def unknown(self, extras: Sequence[str], commands: Mapping[str, _Parser]) -> str:
        """``unknown flag --inptu (did you mean --input?)``: flag names only, never a value."""
        flags = [word.split("=", 1)[0] for word in extras if word.startswith("-")]
        hidden = sum(1 for word in extras if not word.startswith("-") or "=" in word)
        mine = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        said = []
        name = next((name for name, sub in commands.items() if sub is self), "")
        for flag in flags:
            if (name, flag) in _NOT_HERE:
                said.append(_NOT_HERE[name, flag])
                continue
            close = [_MEANT[flag]] if _MEANT.get(flag) in mine else []
            close = close or difflib.get_close_matches(flag, mine, n=1, cutoff=0.6)
            elsewhere = [name for name, sub in commands.items() if sub is not self
                         and flag in sub._option_string_actions]  # fmt: skip
            if elsewhere:
                where = ", ".join(elsewhere[:-1]) + " and " if len(elsewhere) > 1 else ""
                said.append(f"{flag} is a flag of {where}{elsewhere[-1]}, not of this command")
            elif close:
                said.append(f"unknown flag {flag} (did you mean {close[0]}?)")
            else:
                said.append(f"unknown flag {flag}")
        if hidden and not flags:
            said.append(f"unexpected argument{'s' if hidden > 1 else ''} (not shown)")
        return "; ".join(said) + f"; see {self.prog} --help"

    def error(self, message: str) -> NoReturn:
        # argparse stops at the first problem, often one a mistyped flag caused ("--input
        # is required" for --inptu): the mistyped flag is the news.
        words = self.argv
        strays = [w for w in words if w.startswith("--") and w != "--"
                  and w.split("=", 1)[0] not in self._option_string_actions]  # fmt: skip
        if strays and not self.commands:  # a command's parser, not the top level's
            message = self.unknown(strays, self.siblings)
        elif message.startswith("argument COMMAND: invalid choice"):
            typed = next((w for w in words if not w.startswith("-")), "")
            close = difflib.get_close_matches(typed, self.commands, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            message = f"unknown command {typed!r}{hint}; commands: {', '.join(self.commands)}"
        elif message.startswith("argument ") and ": must be " in message:  # --plan, PLAN
            message = message.removeprefix("argument ").replace(": must be ", " must be ", 1)
        from worker.terminal.wrap import columns, fit

        # On a terminal, both broken between words ("did you m" / "ean", "--e" / "xclude").
        width = columns(sys.stderr)
        usage = self.format_usage().rstrip("\n")
        if width is not None and len(usage) > width:
            rows = textwrap.wrap(usage, width, subsequent_indent=" " * 7,
                                 break_on_hyphens=False, break_long_words=False)  # fmt: skip
            usage = "\n".join(rows)
        said = f"{self.prog}: {message}"
        self._print_message(usage + "\n", sys.stderr)
        self.exit(ExitCode.USAGE, (said if width is None else fit(said, width)) + "\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """argparse's help, but a line is never broken at a word's hyphen: simulate's default
    key ``[demo-secret-key]`` showed as ``[demo-`` beside ``--ak``, then ``secret-key]``, and a
    flag named in a help text (``--sk-file``) could be cut as ``--sk-`` and ``file``."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


_LATE = frozenset(
    flag
    for flag, group in helptext.SETTING_GROUP.items()
    if group in (helptext.INPUT, helptext.OUTPUT)
)
"""Setting flags shown after a command's own flags of their group (--input before --ledger)."""


def _groups(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The command's flag groups, in ``helptext.GROUPS`` order (empty ones are not shown)."""
    return {title: parser.add_argument_group(title) for title in helptext.GROUPS}


def _add_settings(groups: dict[str, Any], flags: Sequence[str]) -> None:
    table = {flag: (kind, text) for flag, kind, text in SETTING_FLAGS}
    for flag in flags:
        kind, text = table[flag]
        group = groups[helptext.SETTING_GROUP.get(flag, helptext.QUEUE)]
        dest = "setting_" + flag.removeprefix("--").replace("-", "_")
        if kind == _BOOL:
            group.add_argument(flag, dest=dest, action="store_const", const=True, help=text)
        elif kind is rules:
            group.add_argument(
                flag, dest=dest, type=_text(flag), action=_JoinAction, help=text, metavar="RULE"
            )
        else:
            metavar = helptext.METAVAR[flag]
            typed = (
                _number(kind, seconds=metavar == "SECONDS") if kind in (int, float)
                else _text(flag)
            )  # fmt: skip
            group.add_argument(flag, dest=dest, type=typed, help=text, metavar=metavar)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="devserver-reaper",
        formatter_class=_Help,
        description=(
            "Delete Huawei Cloud ModelArts DevServer jobs in bulk: safely, fast, resumably."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (env REAPER_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    known = parser.commands

    flags: dict[str, dict[str, Any]] = {}

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=text,
            description=text,
            usage=helptext.USAGE[name],
            epilog=helptext.EXAMPLES[name],
            formatter_class=_Help,
        )
        known[name] = sub
        groups = flags[name] = _groups(sub)
        _add_settings(groups, [f for f in COMMAND_SETTINGS[name] if f not in _LATE])
        if name not in READS_NO_SETTINGS:
            groups[helptext.SETTINGS].add_argument(
                "--config", dest="sub_config", metavar="FILE",
                help="TOML settings file (env REAPER_CONFIG); flags and REAPER_* win over it",
            )  # fmt: skip
        return sub

    run = command(
        "run",
        "delete the job ids read from --input, a --plan, or the jobs discover's filters "
        "select; print a summary",
    )
    into, shown = flags["run"][helptext.INPUT], flags["run"][helptext.OUTPUT]
    source = into.add_mutually_exclusive_group()
    source.add_argument("--input", "-i", metavar="FILE", help="file of ids, or - for stdin")
    source.add_argument(
        "--plan", metavar="FILE",
        help="apply a plan written by discover --plan (refused if altered or expired)",
    )  # fmt: skip
    into.add_argument(
        "--exclude", metavar="FILE",
        help="with --plan: ids (one a line) not to delete after all; recorded as skipped",
    )  # fmt: skip
    _add_filters(run, "instead of --input or --plan: select, seal and apply in one go")
    run.set_defaults(run_parser=run)  # which the parse checks for a source of ids
    into.add_argument(
        "--input-format",
        choices=("auto", "text", "jsonl", "csv", "json"),
        default="auto",
        help="format of --input (default: from the file name; text for stdin)",
    )
    into.add_argument(
        "--retry-failed", action="store_true", help="with --ledger: try failed ids again"
    )
    shown.add_argument(
        "--results", metavar="FILE", help="write one JSON line per id with its outcome here"
    )
    shown.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="progress display on stderr (default: when stderr is a terminal)",
    )
    shown.add_argument(
        "--verbose", "-v", action="count", default=0,
        help="on a terminal, also a line for every id (DRY-RUN delete <id> in a dry run)",
    )  # fmt: skip
    shown.add_argument(
        "--quiet", "-q", action="count", default=0,
        help="on a terminal, only the summary: no progress, no warnings",
    )  # fmt: skip
    shown.add_argument(
        "--events", metavar="FILE",
        help="append every event to FILE as JSON lines (instead of stdout)",
    )  # fmt: skip

    discover = command(
        "discover", "list jobs matching filters; print their ids, or write a plan to review"
    )
    _add_filters(discover, None)
    discover.add_argument(
        "--project", action="append", metavar="PROJECT",
        help="scan this project instead of the settings' one: REGION (its project from IAM), "
        "ID, ID@REGION, ID@URL or REGION@URL; repeat it (or separate with commas) to scan "
        "several into one plan naming each",
    )  # fmt: skip
    out = flags["discover"][helptext.OUTPUT]
    out.add_argument(
        "--output", "-o", choices=("table", "ids", "jsonl"),
        help="a table with a review of the selection (the default on a terminal), ids one per "
        "line (for run --input -; the default elsewhere), or full records as JSON lines",
    )  # fmt: skip
    out.add_argument(
        "--plan", metavar="FILE", help="write a plan here, to review and apply with run --plan"
    )
    out.add_argument(
        "--plan-ttl", metavar="DURATION", default="24h",
        help="how long the plan stays valid (default 24h, at most 30d)",
    )  # fmt: skip

    plan = command(
        "plan", "plan show PLAN: check a plan's seal and show what it holds (counts by type, "
        "status, user and age, what protection left out) and the next command",
    )  # fmt: skip
    plan.add_argument("action", choices=("show",), help="what to do with the plan")
    plan.add_argument("path", metavar="PLAN", help="the plan file")

    command("serve", "consume ids from a Redis Stream and delete them; serve health")
    command("enqueue", "add the ids read from --input to the Redis Stream")
    queued = flags["enqueue"][helptext.INPUT]
    queued.add_argument(
        "--input", "-i", metavar="FILE", required=True, help="file of ids, or - for stdin"
    )
    queued.add_argument(
        "--input-format", choices=("auto", "text", "jsonl", "csv", "json"), default="auto",
        help="format of --input (default: from the file name; sniffed on stdin)",
    )  # fmt: skip

    command("simulate", "run the built-in ModelArts DevServer jobs simulator")
    sim = known["simulate"].add_argument_group("the simulated project [defaults in brackets]")
    for flag, kind, default, metavar, text in _SIMULATOR_FLAGS:
        choices = metavar if isinstance(metavar, tuple) else None
        sim.add_argument(
            flag, type=kind, default=default, choices=choices,
            metavar=None if choices else metavar,
            help=text + ("" if default is None else " [%(default)s]"),
        )  # fmt: skip
    sim.add_argument(
        "--iam-project", action="append", default=[], metavar="PROJECT",
        help="one more project IAM knows, as NAME=ID (repeatable; a NAME twice is two of it)",
    )  # fmt: skip
    sim.add_argument(
        "--iam-forbidden", action="store_true",
        help="IAM answers 403 to the project list, as to keys without iam:projects:listProjects",
    )  # fmt: skip
    sim.add_argument(
        "--forbidden", action="store_true",
        help="every jobs API call answers 403, as to keys with no ModelArts policy on the project",
    )  # fmt: skip

    demo = command("demo", "a complete tour against the built-in simulator; no account needed")
    demo.add_argument(
        "--jobs", type=_jobs, default=300, metavar="N",
        help="jobs the simulator holds (default %(default)s)",
    )  # fmt: skip

    command("check", "verify settings and credentials with one read-only call")

    report = command("report", "what a ledger holds: counts, open ids, export")
    report.add_argument(
        "ledgers",
        nargs="*",
        metavar="LEDGER",
        help="ledger files to read together, e.g. every shard's of a sharded run",
    )
    report.add_argument(
        "--format", choices=("summary", "jsonl", "csv"), default="summary",
        help="a summary for people, or every outcome as JSON lines or CSV (default summary)",
    )  # fmt: skip
    report.add_argument(
        "--output", "-o", metavar="FILE", help="write the export here (default stdout)"
    )

    completion = command("completion", "print a shell completion script (bash or zsh)")
    completion.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete in")
    for name, groups in flags.items():  # after each command's own input and output flags
        _add_settings(groups, [f for f in COMMAND_SETTINGS[name] if f in _LATE])
    for each in (parser, *known.values()):
        _paths_not_empty(each)
    return parser


def _add_filters(parser: argparse.ArgumentParser, title: str | None) -> None:
    """discover's filter flags, for discover and for run (the same names on both)."""
    server = parser.add_argument_group(
        "filters the server applies" + (f" ({title})" if title else ""),
        "--status and --type ignore case; repeat them or separate words with commas for "
        "any of several",
    )
    for name, example in (("status", "FINISHED,FAILED"), ("type", "COMMON")):
        server.add_argument(
            f"--{name}", dest=f"filter_{name}", action="append", metavar=name.upper(),
            help=f"job {name}, e.g. {example}",
        )  # fmt: skip
    for name in ("name", "id"):
        server.add_argument(f"--{name}", dest=f"filter_{name}", metavar=name.upper(),
                            help=f"job {name}, exactly")  # fmt: skip
    local = parser.add_argument_group("filters applied to each record")
    local.add_argument(
        "--name-glob", metavar="PATTERN", help="name matches this shell pattern, e.g. 'diag-*'"
    )
    local.add_argument(
        "--name-regex", metavar="REGEX", help="name contains a match of this regular expression"
    )
    local.add_argument("--user-name", metavar="USER", help="created by this user")
    local.add_argument(
        "--older-than", metavar="AGE|DATE",
        help="time field before: a duration (30d, 12h) or a date",
    )  # fmt: skip
    local.add_argument(
        "--newer-than", metavar="AGE|DATE", help="time field after: a duration (7d) or a date"
    )
    local.add_argument(
        "--time-field", choices=("create_at", "update_at"), default="create_at",
        help="the time --older-than/--newer-than look at (default create_at)",
    )  # fmt: skip
    local.add_argument("--all", action="store_true", help="allow no filter at all (every job)")
    local.add_argument(
        "--page-size",
        type=_number(int, seconds=False),
        metavar="N",
        help="ask the server for pages of this size",
    )


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, keyed by setting name."""
    return {
        key.removeprefix("setting_"): value
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    }


MAX_SIMULATED_JOBS = 5_000_000
"""The simulator keeps every job in memory, about a kilobyte each: more is a typo."""


def _number(kind: type[float], *, seconds: bool) -> Callable[[str], float]:
    """A setting flag's number (and discover's ``--page-size``), said in words when it is
    none (argparse said "invalid float value: 'abc'", repeating what was typed): ``must be
    a number of seconds``, ``must be a whole number, not 2.5`` (a number is repeated, never
    text)."""

    def parse(text: str) -> float:
        try:
            return kind(text)
        except ValueError:
            pass
        try:
            given = f", not {float(text):g}"
        except ValueError:
            given = ""
        what = "a whole number" if kind is int else "a number" + " of seconds" * seconds
        raise argparse.ArgumentTypeError(f"must be {what}{given}") from None

    return parse


_PATH_EXPECTED = {"--input": "a file path, or - for stdin", "-i": "a file path, or - for stdin"}
_FILES = frozenset({"FILE", "PLAN", "LEDGER"})
"""What the command line's own flags and arguments that name a file are called: each is
refused empty as a setting's file flag is (``run --plan ''`` ended in a traceback,
``check --config ''`` named no file without a word, ``plan show ''`` read a directory)."""


def _paths_not_empty(parser: argparse.ArgumentParser) -> None:
    """Every flag or argument of ``parser`` that names a file (``--plan FILE``, ``PLAN``)
    refuses an empty one, as a usage error in the words of ``_text``."""
    for action in parser._actions:
        if action.metavar in _FILES and action.type in (None, str):
            action.type = _text(action.option_strings[0] if action.option_strings
                                else str(action.metavar))  # fmt: skip


def _text(flag: str) -> Callable[[str], str]:
    """A setting flag's text, refused empty (or blank) as a usage error (64) in the words of
    what it must be (``--stream must be the name of a Redis Stream, not empty``): the
    settings said "String should have at least 1 character" (78), and took some empty
    values without a word (``--allowed-projects ''`` stood for any project over the config
    file's list, ``--sk-file ''`` read no file)."""
    expected = helptext.EXPECTED.get(flag) or _PATH_EXPECTED.get(flag, "a file path")

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"must be {expected}, not empty")
        return text

    return parse


def _ranged(
    kind: type[float], low: float, high: float, what: str = "", note: str = ""
) -> Callable[[str], float]:
    """A number flag of ``simulate`` and ``demo`` held to its range, said as the settings'
    flags are (``--latency-ms must be a number of milliseconds from 0 to 60,000, not
    1e+300``): argparse said "invalid int value: 'inf'", and a range said "the quota ...
    must be a finite number of at least 0, not inf" after "argument --quota:". ``nan``,
    ``inf`` and ``1e400`` (which is inf) are out of every range; a number given is
    repeated, never other text."""
    noun = ("a whole number" if kind is int else "a number") + (f" of {what}" if what else "")

    def said(value: float) -> str:
        whole = math.isfinite(value) and value == int(value) and abs(value) < 1e15
        return f"{int(value):,}" if whole else f"{value:,g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        span = f"from {said(low)} to {said(high)}" + (f" ({note})" if note else "")
        if not low <= value <= high:  # False for nan too
            try:
                given = f", not {said(float(text))}"
            except ValueError:
                given = ""
            raise argparse.ArgumentTypeError(f"must be {noun} {span}{given}")
        return value

    return parse


MAX_SIMULATED_LATENCY_MS = 60_000
"""A minute: a mean above the client's default read timeout (60 s) times out every call; a
huge one (1e300) was taken, and ``check`` against it waited on calls never answered."""

_port = _ranged(int, 0, 65_535)
_jobs = _ranged(int, 0, MAX_SIMULATED_JOBS, "jobs")


_SIMULATOR_FLAGS: tuple[tuple[str, Callable[[str], Any], Any, str | tuple[str, ...], str], ...]
_SIMULATOR_FLAGS = (  # flag, type, default, metavar or choices, help
    ("--host", str, "127.0.0.1", "HOST", "address to listen on"),
    ("--port", _port, 8443, "PORT", "port; 0 picks any free one"),
    ("--jobs", _jobs, 1000, "N", "jobs it holds at start"),
    ("--seed", _ranged(int, 0, 2**32 - 1), 0, "N", "seed for jobs and faults"),
    ("--project-id", str, "demo-project", "ID", "project id it serves"),
    ("--region", str, "cn-north-4", "REGION",
     "region IAM names its project after (GET /v3/projects?name=REGION)"),
    ("--ak", str, "DEMOAK", "KEY", "access key it accepts"),
    ("--sk", str, "demo-secret-key", "KEY", "secret key it accepts (a fake's: not a secret)"),
    ("--quota", _ranged(float, 0, 100_000, "calls a second", "0: no limit"), 0, "CALLS/S",
     "calls per second it allows; 0 for no limit"),
    ("--burst", _ranged(int, 1, 10_000), 1, "N", "burst on top of the quota"),
    ("--window", _ranged(float, 0, 3600, "seconds", "0: a token bucket"), 0, "SECONDS",
     "count the quota over this many seconds (quota x SECONDS calls a window) in place of "
     "the token bucket; 429s point Retry-After to the window's end"),
    ("--window-kind", str, None, ("fixed", "sliding"),
     "a --window counted per fixed window (the default), or over any rolling one "
     "(Retry-After: until the oldest call counted leaves it)"),
    ("--retry-after", str, "seconds", ("off", "seconds", "date"), "Retry-After on a 429"),
    ("--max-batch", _ranged(int, 1, 100_000), 1000, "N", "most ids a DELETE may carry"),
    ("--latency-ms", _ranged(float, 0, MAX_SIMULATED_LATENCY_MS, "milliseconds"), 0, "MS",
     "mean latency of a call (at most a minute)"),
    ("--fault-rate", _ranged(float, 0, 1), 0, "SHARE", "share of calls that fail, 0 to 1"),
    ("--unknown-path", str, "gateway", ("gateway", "html"),
     "answer to a path that is not the API: the gateway's JSON 404, or a bare HTML 404"),
    ("--ids-file", str, None, "FILE", "write the ids of its jobs here, one per line"),
)  # fmt: skip
"""``simulate``'s own flags: it is configured by these alone."""


def main(argv: Sequence[str] | None = None) -> NoReturn:
    gc.disable()  # while the command's modules come in: see _started
    closed = stdio.occupy_closed()  # first: before anything opens a file on fd 0, 1 or 2
    for signum in stops.SIGNALS:  # before the command's own handling: see worker.stops
        signal.signal(signum, stops.raise_stop)
    no_core_dumps()
    if stdio.refused(closed):
        sys.exit(ExitCode.USAGE)
    args = build_parser().parse_args(argv)
    try:
        code: str | int | None = dispatch(args, imported=_started)
    except SystemExit as stopped:  # raise_stop's, or a command's own
        code = stopped.code
    if code == ExitCode.INTERRUPTED:  # a stop said and done: the process ends 75 whatever
        # comes after, never killed by the system's handlers that the interpreter puts back
        # as it ends, through a thread still reading (a second Ctrl-C: -2); run's SIGHUP too
        stops.ended(*[signal.SIGHUP] * callable(signal.getsignal(signal.SIGHUP)))
    sys.exit(code)


def no_core_dumps() -> None:
    """A core dump holds the secret key and the pod's token: the process makes none."""
    import resource

    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


VISIBLE_SECRETS = {
    "sk": "--sk (use --sk-file, REAPER_SK_FILE or REAPER_SK)",
    "security_token": "--security-token (use --security-token-file or REAPER_SECURITY_TOKEN)",
}


def command_line_secrets(overrides: dict[str, Any]) -> list[str]:
    """Secrets given as flags, which every user of the machine can read in ``ps`` and
    ``/proc/PID/cmdline``: one line each, naming the flag and where to put it instead."""
    found = [text for key, text in VISIBLE_SECRETS.items() if overrides.get(key)]
    url = overrides.get("redis_url")
    if isinstance(url, str) and _has_password(url):
        found.append("--redis-url with a password (use REAPER_REDIS_URL or redis_url in --config)")
    return found


def _warn(exposed: list[str], warnings: Sequence[str], settings: Any) -> None:
    """Once, before the command runs, on stderr (stdout may be a command's output), in the
    log's own format so a JSON log stays JSON."""
    if not exposed and not warnings:
        return
    if sys.stderr.isatty() and settings.log_format == "auto":  # a person: a line each
        for flag in exposed:
            sys.stderr.write(f"warning: {flag}: every user of this machine can read it "
                             "(ps, /proc/PID/cmdline)\n")  # fmt: skip
        for warning in warnings:
            sys.stderr.write(f"warning: {warning}\n")
        return
    import structlog

    from worker import logsetup

    logsetup.configure(fmt=settings.log_format, level=settings.log_level, stream=sys.stderr)
    log = structlog.get_logger("devserver_reaper")
    if exposed:
        log.warning(
            "settings.secret_on_command_line",
            flags=exposed,
            why="every user of this machine can read them (ps, /proc/PID/cmdline)",
        )
    for warning in warnings:
        log.warning("settings.key_file_exposed", error=warning)


def _has_password(url: str) -> bool:
    """In the user part or in the query: redis-py takes ``?password=`` as a setting too."""
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        return parts.password is not None or "password" in parse_qs(parts.query)
    except ValueError:
        return False


def _started() -> None:
    """The command's modules are in: the garbage collector, off since ``main`` began, is
    on again, and what they made is set aside (``gc.freeze``) for its collections never to
    walk. A command's start makes some 60,000 objects (classes, functions, pydantic's
    schemas) that live to its exit: collected as they came, they set off about 140
    collections, one of everything, some 25 ms of the 0.3 s of CPU of a run of 5 ids, to
    free 2,000 objects (0.5 MB) left over from making them, kept now."""
    gc.freeze()
    gc.enable()


def dispatch(args: argparse.Namespace, imported: Callable[[], None] = lambda: None) -> int:
    """Run the command ``args`` names; ``imported`` is called once its modules are in."""
    import importlib

    if args.command in READS_NO_SETTINGS:
        alone = importlib.import_module(f"worker.commands.{args.command}")
        imported()
        stops.checkpoint()  # a stop whose exit CPython dropped while the command was imported
        started: int = alone.main(args)
        return started

    from worker.errors import ConfigError
    from worker.settings import load_settings, refuse_empty_variables, refuse_unknown_variables

    config = getattr(args, "sub_config", None) or args.config
    if args.config is not None and config != args.config:  # before and after the command
        print(f"devserver-reaper: two config files named: --config {args.config} before the "
              f"command and --config {config} after it; name one", file=sys.stderr)  # fmt: skip
        return ExitCode.CONFIG
    overrides = settings_overrides(args)
    try:
        refuse_unknown_variables(os.environ)
        refuse_empty_variables(os.environ)
        settings = load_settings(config, **overrides)
    except ConfigError as exc:
        print(f"devserver-reaper: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    with _structlog_without_rich():
        _warn(command_line_secrets(overrides), settings.warnings, settings)
        module = importlib.import_module(f"worker.commands.{args.command}")
    imported()
    stops.checkpoint()
    code: int = module.main(args, settings)
    return code


@contextlib.contextmanager
def _structlog_without_rich() -> Iterator[None]:
    """structlog imports rich (and pygments through it) when rich is installed, to draw
    tracebacks and their locals as we never draw them (logsetup gives the console
    ``plain_traceback`` and JSON ``format_exc_info``): about 50 ms of CPU of every command
    that logs. While the command's modules are imported rich cannot be, so structlog takes
    none; the progress display imports it when it is shown (worker.terminal.screen)."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        yield
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # import rich: ModuleNotFoundError
    try:
        yield
    finally:
        if "rich" in sys.modules and sys.modules["rich"] is None:
            del sys.modules["rich"]
