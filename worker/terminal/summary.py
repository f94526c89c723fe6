"""The end of a run, for a person: counts, what is left, why it stopped, and what to type next.

The ``run.summary`` event is for programs; this is the same run in a person's words. A run
stopped with work left says how much of the input is left (not only the ids that were in
flight) and prints the exact command that resumes it; a dry run says what it would delete.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from worker.terminal.failure import fix_for
from worker.terminal.progress import rate

SECRET_FLAGS = frozenset({"--sk", "--security-token", "--ak"})
"""Flags whose value is never printed back, even in a command to copy."""

URL_FLAGS = frozenset({"--redis-url"})
"""Flags whose URL is printed back without its password (``redis://:...@host``)."""

_ROWS = ("deleted", "unconfirmed", "absent", "failed", "rejected", "skipped", "open",
         "repeated", "already_done", "already_failed", "retries")  # fmt: skip
"""Counts of ``run.summary``, in this order, shown when not 0 (``unconfirmed`` is of the
deleted: known gone, the API never returned their records)."""


def rules_in_words(kinds: Sequence[str]) -> str:
    """``run.summary``'s ``unchecked_rules`` in words: ``the name and status rules``."""
    words = list(kinds)
    listed = ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)
    return f"the {listed} rules"  # a kind of rule, of one rule or many


def _label(key: str) -> str:
    """A count's name in words: ``already done``, not the field's ``already_done``."""
    return key.replace("_", " ")


def command_line(argv: Sequence[str], prog: str = "devserver-reaper") -> str:
    """``argv`` as a command to paste, with the value of every secret flag replaced."""
    words: list[str] = []
    follows: str | None = None  # the word before, unless it was a hidden flag's value
    for word in argv:
        flag, eq, value = word.partition("=")
        if follows in SECRET_FLAGS:
            words.append("...")
        elif follows in URL_FLAGS:
            words.append(_without_password(word))
        elif eq and flag in SECRET_FLAGS:
            words.append(f"{flag}=...")
        elif eq and flag in URL_FLAGS:
            words.append(f"{flag}={_without_password(value)}")
        else:
            words.append(word)
        follows = None if follows in SECRET_FLAGS | URL_FLAGS else word
    return shlex.join([prog, *words])


def _without_password(url: str) -> str:
    """``url`` with its password, in the user part or a ``?password=`` (redis-py reads
    both), as ``...``; a URL that does not parse as ``...`` whole."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "..."
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:...@{host}"
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "password" for key, _ in query):
        shown = [(key, "..." if key == "password" else value) for key, value in query]
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(shown, safe=".")))
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True, slots=True)
class RunEnd:
    """What the summary says, beyond ``run.summary``'s fields."""

    fields: Mapping[str, Any]  # run.summary's
    total: int | None = None  # ids of a plan, lines of a file, entries of an input read whole
    exact_total: bool = False  # a file's lines include comments; the others are exact
    read: int = 0  # entries read from the input
    would_delete: int = 0  # a dry run's ids that a real run would send
    command: str | None = None  # the command that was run, to run again
    ledger: bool = False
    error: BaseException | None = None
    ca_bundle: str | None = None  # the CA bundle trusted, as named, for a certificate's cure

    @property
    def done(self) -> int:
        f = self.fields
        finished = sum(f.get(k, 0) for k in ("deleted", "absent", "failed", "rejected", "skipped"))
        return int(finished + f.get("repeated", 0) + f.get("already_done", 0))

    @property
    def stopped_early(self) -> bool:
        return self.fields.get("exit_code") in (69, 75) or bool(self.fields.get("open"))

    def left(self) -> int | None:
        """Ids of the input not done: those open, and those never read. None: unknown."""
        if self.total is None:
            return None
        return max(self.total - self.done, int(self.fields.get("open", 0)))

    def text(self) -> str:
        f = self.fields
        dry = bool(f.get("dry_run"))
        lines = ["", "devserver-reaper run summary"]
        if dry:
            kinds = self._unchecked() if self.would_delete else ""
            unread = f"  (at most: {kinds} rules not checked)" if kinds else ""
            lines.append(f"  {'would delete':<13}{self.would_delete:>12,}" + unread)
        for key in _ROWS:
            value = f.get(key, 0)
            if key == "skipped" and dry:
                value -= self.would_delete
            if value:
                label = _label(key)  # "already failed" is one wider: the figure keeps its edge
                lines.append(f"  {label:<13}{value:>{25 - max(len(label), 13)},}" + self._why(key))
        if "max_deletions_left" in f:
            cap, left = f["max_deletions"], f["max_deletions_left"]
            lines.append(f"  {'cap left':<13}{left:>12,} of {cap:,}")
        lines.append(f"  {'duration':<13}{f['duration_s']:>11.1f}s")
        if not dry:
            lines.append(f"  {'rate':<13}{rate(f['ids_per_s']):>8} ids/s")
        lines.append(f"  {'exit code':<13}{f['exit_code']:>12}")
        lines += self._projects()
        lines += self._after()
        return "\n".join(lines)

    def _unchecked(self) -> str:
        """The kinds of rule a dry run of ids could not check (``name, status``), if any."""
        return ", ".join(self.fields.get("unchecked_rules") or ())

    def _why(self, key: str) -> str:
        """After the ``skipped`` count, why (``max_deletions 255``): a skip may be what was
        asked (protected) or work left undone (the cap, exit 1)."""
        reasons = self.fields.get("skipped_by_reason") or {}
        why = [f"{reason} {n:,}" for reason, n in reasons.items() if reason != "dry_run" and n]
        return f"  ({', '.join(why)})" if key == "skipped" and why else ""

    def _projects(self) -> list[str]:
        """A line per project when the input named projects (``run.summary``'s
        ``projects``): its outcomes that are not zero, and whether it was taken out."""
        projects = self.fields.get("projects") or []
        lines = ["  by project:"] if projects else []
        for project in projects:
            counts = [f"{_label(key)} {project[key]:,}" for key in _ROWS if project.get(key)]
            out = ["taken out: its ids left open"] if project.get("out") else []
            where = project.get("region") or project.get("endpoint")
            lines.append(f"    {project['project_id']} ({where}): "
                         + (", ".join(counts + out) or "nothing done"))  # fmt: skip
        return lines

    def _after(self) -> list[str]:
        said: list[str] = []
        if "error" in self.fields:
            said.append(f"error: {self.fields['error']}")
            fix = fix_for(self.error, ca_bundle=self.ca_bundle) if self.error is not None else None
            if fix:
                said.append(f"fix:   {fix}")
        settled_before = self.fields.get("already_done", 0)
        if self.done == settled_before and not self.stopped_early and "error" not in self.fields:
            others = self.fields.get("other_shards")
            said.append("nothing to do: " + (
                f"the ledger holds the input's {settled_before:,} ids done already"
                if settled_before else f"the input's {others:,} ids are other shards'"
                if others else "the input gave no ids"))  # fmt: skip
        if self.fields.get("dry_run"):
            jobs = f"up to {self.would_delete:,} job{'s' * (self.would_delete != 1)}"
            said.append(f"dry run: nothing was sent; a real run would delete "
                        f"{jobs if self.would_delete else 'none'}")  # fmt: skip
            if self.would_delete and (kinds := self.fields.get("unchecked_rules")):
                said[-1] += f", less those {rules_in_words(kinds)} protect:"
                said.append("  a dry run of ids reads no job, so it checks id rules alone; "
                            "a run, or a plan's dry run, reads the jobs for the rest")  # fmt: skip
        expired = (self.fields.get("skipped_by_reason") or {}).get("plan_expired", 0)
        if expired:
            said.append(f"the plan has expired: {expired:,} of its jobs were not "
                        "sent; run discover again, review the new plan and run it")  # fmt: skip
        if self.stopped_early:
            said += self._resume()
        return said

    def _resume(self) -> list[str]:
        left = self.left()
        if left == 0 and self.exact_total:  # stopped once the input was done (| head)
            return ["stopped after the input was done: none of its ids is left to do"]
        if left is None:  # a stream stopped before its end: whether it held more is unknown
            said = [f"stopped before {'any of' if not self.read else 'the end of'} the input "
                    "was read"]  # fmt: skip
        elif self.exact_total:
            said = [f"stopped with work left: {left:,} ids of the input are not done"]
        else:
            said = [f"stopped with work left: up to {left:,} ids of the input are not done"]
        if self.command is None:
            return said
        if self.ledger:
            said.append(f"resume: {self.command}")
        else:
            said.append(f"run again: {self.command}")
            said.append(
                "  (no --ledger: every id is sent again, and those deleted already come "
                "back absent; give --ledger FILE to resume where a run stops)"
            )
        return said
