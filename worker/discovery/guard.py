"""Protection and plan re-checks, as a ``BatchProcessor`` wrapped around another one.

``Guard.process(batch)`` decides, id by id, what may go on to the wrapped processor (the
dispatcher) and ends the rest itself:

1. ids protected by id end ``skipped`` (reason ``protected``) with no API call at all;
2. when a plan is being applied, an id the plan does not hold ends ``skipped``
   (``not_in_plan``): the plan is the whole of what was reviewed;
3. when a rule needs the job itself (a protected name pattern, type or status, or the plan's
   filters), the job is read just before its batch goes out: on a page of the list call read
   ahead of the batches (``worker.discovery.recheck``), else with the show call, through the
   same paced call as the DELETEs (``worker.pacing.paced``: the same breaker, limiter and
   retries). A job that is gone ends ``absent`` (``deleted`` unconfirmed, ``answer_lost``,
   when a DELETE of it went out unanswered: a dead run's, or this batch's before its check
   expired and it was read again); a protected one ``skipped``
   (``protected``); one that no longer matches the plan's filters ``skipped``
   (``plan_mismatch``); one that cannot be read (a 4xx) ``failed``, because a job we cannot
   check is a job we do not delete;
4. once ``--max-deletions`` is spent, and no share of it taken may come back (a batch
   whose check expired gives back what it did not send: a batch waits for those), the rest
   end ``skipped`` (``max_deletions``) unread;
5. once the plan being applied has expired (``PlanCheck.expired``: on the run's clock or on
   the system's, whichever says so first), the rest end ``skipped`` (``plan_expired``)
   unread, and no check holds past that instant: a batch read before it whose DELETE's turn
   comes after is not sent, and ends so too, at the expiry: its wait for a rate token ends
   then (``worker.discovery.expiry``).

Whatever reaches the dispatcher has passed every rule, whatever the input said. Because it is
a wrapper, ``run``, ``run --plan`` and ``serve`` share it: ``Guard(inner=dispatcher, ...)``.
A check holds ``max_age`` seconds (``--recheck-max-age``, 60) from the read it rests on: the
dispatcher sends no attempt past that (``Batch.fresh_until``) and hands the ids back to be
read again. Within that bound there is a window between the read and the DELETE; the API
offers no conditional delete to close it.
"""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from worker.batcher import DeletionBudget
from worker.clock import Clock, MonotonicClock
from worker.discovery.expiry import deleting
from worker.discovery.filters import Filters
from worker.errors import (
    ApiError,
    ApiUnavailable,
    ClientError,
    ConfigError,
    another_job,
    file_problem,
)
from worker.pacing.paced import PacedReader, Stopped
from worker.types import (
    JOB_ID_RE,
    Batch,
    JobRecord,
    Result,
    gone,
    skipped,
    unverified,
)

if TYPE_CHECKING:
    from worker.discovery.plan import SealedPlan
    from worker.discovery.recheck import ListingRecheck

DEFAULT_MAX_AGE = 60.0
"""Seconds a job's check holds: its DELETE goes out no later than this after the read."""
STALE_ROUNDS = 3
"""Times a job whose check expired before its DELETE went out is checked again."""

__all__ = ["Guard", "PacedReader", "PlanCheck", "Protection", "Stopped", "load_protection"]
_GLOB_CHARS = frozenset("*?[")
_KIND_RE = re.compile(r"[\w -]+")
"""What reads as a kind before a colon (``nmae``, ``job_name``, ``id ``): anything else there
(``*:x``) is part of a bare glob."""
_BRACKETS_RE = re.compile(r"[\[\]]")
_COMMENT_RE = re.compile(r"(?:^|\s)#.*")
"""A ``#`` comment in a protect file: at the start of a line or after a space, so that
``name:team#1`` stays whole."""
PROTECT_FILE_LIMIT = 4 * 1024 * 1024


# -- rules -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Protection:
    """Jobs never to delete: by id, by name pattern (glob), by type, by status.

    Rules, as given to ``--protect`` or written one per line in ``--protect-file``:
    ``id:ID`` protects that id; ``name:GLOB`` protects names matching the glob; a bare word
    with ``*``, ``?`` or ``[`` is a name glob; any other bare word protects both the id *and*
    the exact name it spells (a name such as ``nightly-train`` is a valid id too, and guessing
    wrong would delete what the user meant to keep). Id rules cost nothing; name, type and
    status rules cost one show call per id.
    """

    ids: frozenset[str] = frozenset()  # in lower case: see protects_id
    names: tuple[str, ...] = ()
    types: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()
    # Each name rule with the globs it is matched as: itself, and itself with its ``[`` and
    # ``]`` the characters themselves (``model[1]`` is the name of job ``model[1]`` as much
    # as a class matching ``model1``; ``[prod]-*`` the prefix of ``[prod]-db``), each also
    # without case (``prod-*`` and ``Prod-DB``). Which was meant is a guess, and protecting
    # every reading is the guess that deletes nothing by mistake.
    _patterns: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        patterns = []
        for pattern in self.names:
            globs = dict.fromkeys((pattern, _BRACKETS_RE.sub(r"[\g<0>]", pattern)))
            patterns.append((pattern, tuple((glob, glob.casefold()) for glob in globs)))
        object.__setattr__(self, "_patterns", tuple(patterns))

    @classmethod
    def parse(
        cls,
        rules: Iterable[str] = (),
        *,
        types: Iterable[str] = (),
        statuses: Iterable[str] = (),
    ) -> Protection:
        ids: set[str] = set()
        names: list[str] = []
        for raw in rules:
            rule = raw.strip()
            if not rule:
                continue
            kind, sep, value = rule.partition(":")
            kind, value = kind.strip(), value.strip()
            if sep and _KIND_RE.fullmatch(kind) and kind not in ("id", "name"):
                raise ValueError(
                    f"protect rule {rule!r}: {kind!r} is not a kind of rule (id:ID or "
                    f"name:GLOB; for a name that holds a colon, name:{rule})"
                )
            if sep and kind in ("id", "name"):
                if not value:
                    raise ValueError(f"protect rule {rule!r} names nothing")
                if kind == "id":
                    if not JOB_ID_RE.fullmatch(value):
                        raise ValueError(f"protect rule {rule!r}: not a valid job id")
                    ids.add(value.lower())
                else:
                    names.append(value)
            elif _GLOB_CHARS & set(rule):
                names.append(rule)
            else:
                if JOB_ID_RE.fullmatch(rule):
                    ids.add(rule.lower())
                names.append(rule)
        return cls(
            ids=frozenset(ids),
            names=tuple(dict.fromkeys(_nfc(name) for name in names)),
            types=frozenset(t.strip().upper() for t in types if t.strip()),
            statuses=frozenset(s.strip().upper() for s in statuses if s.strip()),
        )

    @property
    def active(self) -> bool:
        return bool(self.ids or self.names or self.types or self.statuses)

    @property
    def needs_record(self) -> bool:
        """Whether some rule looks at more than the id (and so costs a show call per id)."""
        return bool(self.record_rules())

    def record_rules(self) -> tuple[str, ...]:
        """The kinds of rule given that read a job's record, not its id alone (``name``,
        ``type``, ``status``): what a dry run of ids, which reads no job, cannot check."""
        kinds = (("name", self.names), ("type", self.types), ("status", self.statuses))
        return tuple(kind for kind, rules in kinds if rules)

    def bare_ids(self) -> tuple[str, ...]:
        """Name rules that are also id rules: bare words (``nightly-train``), which protect
        the id and the name they spell. ``id:WORD`` protects the id alone."""
        return tuple(name for name in self.names if name.lower() in self.ids)

    def protects_id(self, job_id: str) -> bool:
        """Whether an id rule names ``job_id``, in any case: a UUID's hex digits are the
        same in either (RFC 4122), and an API that looks ids up without case would delete
        ``0a92...`` when sent ``0A92...``."""
        return job_id.lower() in self.ids

    def reason(self, record: JobRecord) -> str | None:
        """Which rule protects ``record``, or ``None``."""
        if self.protects_id(record.id):
            return "id"
        job_type, status = _word(record.type), _word(record.status)
        name = _nfc(record.name) if record.name and not record.name.isspace() else None
        if job_type is not None and job_type in self.types:
            return f"type {record.type}"
        if status is not None and status in self.statuses:
            return f"status {record.status}"
        if name is not None:  # NFC: 'café' typed as one character or as e and an accent
            folded = name.casefold()
            for pattern, globs in self._patterns:
                if any(
                    fnmatch.fnmatchcase(name, glob) or fnmatch.fnmatchcase(folded, low)
                    for glob, low in globs
                ):
                    return f"name {pattern}"
        # A field a rule reads that the record lacks protects it: unknown is not a no.
        for rules, value, what in ((self.types, job_type, "type"),
                                   (self.statuses, status, "status"),
                                   (self.names, name, "name")):  # fmt: skip
            if rules and value is None:
                return f"{what} unknown"
        return None

    def protects(self, record: JobRecord) -> bool:
        return self.reason(record) is not None

    def __repr__(self) -> str:
        return (
            f"Protection(ids={len(self.ids)}, names={list(self.names)!r}, "
            f"types={sorted(self.types)!r}, statuses={sorted(self.statuses)!r})"
        )


def _nfc(text: str) -> str:
    """``text`` in Unicode's composed form: a name rule and a job's name that read the same
    are compared the same, however each was typed or stored."""
    return unicodedata.normalize("NFC", text)


def _word(value: str | None) -> str | None:
    """A type or status as the rules hold them (stripped, upper case); blank is unknown."""
    word = None if value is None else value.strip().upper()
    return word or None


def read_protect_file(path: Path, named: str = "protect_file") -> list[tuple[int, str]]:
    """Rules one per line, each with its line number; blank lines and ``#`` comments (at a
    line's start or after a space) ignored. ``ConfigError`` if unreadable, or if it holds no
    rule: an empty file (an empty ConfigMap mount, a truncated copy) must not turn protection
    off without a word. ``named``: the setting as the user gave it (``--protect-file``,
    ``REAPER_PROTECT_FILE``)."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(PROTECT_FILE_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(f"{named} {path} cannot be read: {file_problem(exc)}") from None
    if len(raw) > PROTECT_FILE_LIMIT:
        raise ConfigError(f"{named} {path} is larger than {PROTECT_FILE_LIMIT} bytes")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Notepad's) is not part of a rule
    except UnicodeDecodeError:
        raise ConfigError(f"{named} {path} is not UTF-8 text") from None
    rules = [
        (number, rule)
        for number, line in enumerate(text.splitlines(), start=1)
        if (rule := _COMMENT_RE.sub("", line).strip())
    ]
    if not rules:
        what = "is empty" if not text.strip() else "holds only comments and blank lines"
        raise ConfigError(
            f"{named} {path} {what}: it protects nothing; give it the rules it should hold, "
            f"or leave {named} unset"
        )
    return rules


def load_protection(
    rules: Sequence[str],
    protect_files: Sequence[Path],
    types: Sequence[str],
    statuses: Sequence[str],
    named: str = "protect_file",
) -> Protection:
    """Protection from the settings' values, for the commands (the edge) to call; ``named``:
    how a message names the protect files' setting."""
    everything = list(rules)
    for protect_file in protect_files:
        for number, rule in read_protect_file(protect_file, named):
            try:
                Protection.parse([rule])  # a bad rule is said with its file and line
            except ValueError as exc:
                raise ConfigError(f"{named} {protect_file}, line {number}: {exc}") from None
            everything.append(rule)
    try:
        return Protection.parse(everything, types=types, statuses=statuses)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# -- the guard ---------------------------------------------------------------------------------


class CheckedProcessor(Protocol):
    """What the guard hands checked batches to (``worker.dispatcher.Dispatcher``)."""

    async def delete_checked(self, batch: Batch) -> Batch:
        """Delete ``batch``; the ids not sent because ``batch.fresh_until`` had passed, as a
        batch whose ``unsure`` names those of them sent without a readable answer."""
        ...


class Outcomes(Protocol):
    """Where the guard's own outcomes go (the dispatcher's ``Journal`` is one)."""

    async def finished(self, results: Sequence[Result]) -> None: ...


@dataclass(frozen=True, slots=True)
class PlanCheck:
    """What a job must still be to be deleted under a plan: one of its jobs (``reviewed``:
    id -> what the reviewer saw of it), not excluded after the review (``--exclude``),
    matching its filters, and as it was reviewed."""

    filters: Filters
    reviewed: ReviewedJobs
    excluded: frozenset[str] = frozenset()
    # When the plan expires, on the guard's clock (None: never): no DELETE goes out after.
    expires: float | None = None
    expires_at: str = ""  # the same instant as the plan says it, for the skipped ids' detail
    # And on the system's clock (epoch seconds; None: never): expired when EITHER says so.
    wall_expires: float | None = None

    @classmethod
    def of(
        cls,
        plan: SealedPlan,
        excluded: frozenset[str] = frozenset(),
        section: int | None = None,
        expires: float | None = None,
    ) -> PlanCheck:
        """The check of ``plan``'s jobs: all of them, or those of ``section`` alone (a plan
        of several projects: a job is deleted only in the project it was planned in), until
        ``expires`` on the guard's clock, and no later than its ``expires_at`` on the
        system's."""
        reviewed = plan.reviewed if section is None else plan.reviewed_in(section)
        at = plan.header.to_json()["expires_at"]
        wall = None if expires is None else plan.header.expires_at.timestamp()
        return cls(plan.filters, reviewed, excluded, expires, at, wall)

    def expired(self, clock: Clock) -> bool:
        """Has the plan expired, by either clock? The run's (``now`` past ``expires``), which
        no change of the system's time moves back; or the system's, past ``expires_at``,
        which goes on where the run's clock may not have (a clock stepped forward to the
        right time; a machine suspended where the run's clock stands still then). A DELETE
        on an expired plan is the one that must not go out: the earlier of the two wins."""
        if self.expires is not None and clock.now() >= self.expires:
            return True
        return self.wall_expires is not None and clock.wall() >= self.wall_expires

    def changed(self, record: JobRecord) -> str | None:
        """Which field the job no longer has as reviewed (``status was ... , now ...``).

        The plan's filters may not cover it (``--all``, or a name filter when the status
        changed): what is deleted must be what somebody looked at, not merely what still
        matches. Times are left out: ``update_at`` moves with no change a reviewer cares about.
        """
        seen = self.reviewed.get(record.id)
        if seen is None:  # the show call answered with another job than the one asked for
            return f"id {record.id!r} is not one the plan holds"
        for name in ("type", "status", "name", "user_name"):
            then, now = getattr(seen, name), getattr(record, name)
            if then != now:
                return f"{name} was {then!r} when reviewed, now {now!r}"
        return None


class ReviewedJobs(Protocol):
    """A plan's jobs by id (``worker.discovery.plan.PlanJobs``, or a dict)."""

    def __contains__(self, job_id: object, /) -> bool: ...

    def get(self, job_id: str, /) -> Reviewed | None: ...


class Reviewed(Protocol):
    """A job as a plan recorded it (``worker.discovery.plan.PlanJob``)."""

    @property
    def type(self) -> str | None: ...
    @property
    def status(self) -> str | None: ...
    @property
    def name(self) -> str | None: ...
    @property
    def user_name(self) -> str | None: ...


@dataclass(slots=True)
class GuardCounts:
    checked: int = 0
    listed: int = 0  # checked on a listing's record
    shown: int = 0  # checked on a show call's
    stale: int = 0  # passed, but their check expired before their DELETE could go out
    passed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


class Guard:
    """A ``BatchProcessor`` that lets only unprotected (and, with a plan, still planned) ids on."""

    def __init__(
        self,
        *,
        inner: CheckedProcessor,
        outcomes: Outcomes,
        protection: Protection,
        reader: PacedReader | None,
        plan: PlanCheck | None = None,
        recheck: ListingRecheck | None = None,
        clock: Clock | None = None,
        max_age: float = DEFAULT_MAX_AGE,
        budget: DeletionBudget | None = None,
        deletes: bool = True,
    ) -> None:
        """``reader=None`` (a dry run: no API) applies only the rules that need no call;
        ``deletes=False`` (a dry run that reads) tells ``recheck`` no job goes away.

        ``recheck`` answers for most jobs by listing; the show call reads the rest. A job's
        check holds for ``max_age`` seconds on ``clock`` from the read it rests on: its
        DELETE goes out within that or not on that check. Once ``budget`` (the run's
        ``--max-deletions``) is spent, ids are skipped at once, with no look-up.
        """
        self._inner = inner
        self._outcomes = outcomes
        self._protection = protection
        self._reader = reader
        self._plan = plan
        self._recheck = recheck
        self._clock = clock or MonotonicClock()
        self._max_age = max_age
        self._budget = budget
        self._moves = recheck if deletes else None  # whom deletions move the listing for
        self.counts = GuardCounts()

    def __repr__(self) -> str:
        c = self.counts
        return (
            f"Guard(checked={c.checked}, listed={c.listed}, shown={c.shown}, "
            f"passed={c.passed}, skipped={c.skipped!r}, plan={self._plan is not None}, "
            f"protection={self._protection!r}, reader={self._reader!r}, "
            f"recheck={self._recheck!r})"
        )

    @property
    def needs_record(self) -> bool:
        return self._plan is not None or self._protection.needs_record

    @property
    def reader(self) -> PacedReader | None:
        """The paced reads the guard checks with (``None`` in a dry run)."""
        return self._reader

    def checks(self) -> dict[str, int]:
        """How the jobs were checked, for the run's summary."""
        recheck = self._recheck
        return {
            "checked": self.counts.checked,
            "by_listing": self.counts.listed,
            "by_show": self.counts.shown,
            "expired": self.counts.stale,
            "list_calls": 0 if recheck is None else recheck.pages,
        }

    async def process(self, batch: Batch) -> None:
        """Check ``batch``'s ids and hand on those that pass, as often as their checks
        expire. The ids any attempt sent without a readable answer stay in doubt to the end:
        found gone on a later check they are ``deleted`` (``answer_lost``), and when the API
        gives out they are named in ``ApiUnavailable.unsure``."""
        doubt = _Doubt(batch)
        try:
            await self._process(batch, doubt)
        except ApiUnavailable as exc:
            exc.unsure = exc.unsure | doubt.unsure
            raise

    async def _process(self, batch: Batch, doubt: _Doubt) -> None:
        ended: list[Result] = []
        remaining: list[str] = []
        held: list[tuple[str, str, str | None]] = []  # kept from a DELETE, but in doubt
        spent = False
        if self._budget is not None and self._budget.spent:
            # Past --max-deletions only once no share taken may come back (a batch whose
            # check expired gives back what it did not send): till then, waiting.
            with self._reader.waiting() if self._reader is not None else nullcontext():
                await self._budget.settled()
            spent = self._budget.reached
        for job_id in batch.ids:
            rule: tuple[str, str | None] | None = None
            if self._protection.protects_id(job_id):
                rule = ("protected", "id")
            elif self._plan is not None and job_id in self._plan.excluded:
                rule = ("excluded", "excluded after review")
            elif self._plan is not None and job_id not in self._plan.reviewed:
                rule = ("not_in_plan", None)
            elif spent and job_id not in batch.unsure:  # past --max-deletions: nothing to
                # look up, nothing to send. Not an id a dead run sent: it may be gone by that
                # run's hand, which counted it against the cap; it goes on to be settled.
                rule = ("max_deletions", None)
            if rule is None:
                remaining.append(job_id)
            elif job_id in batch.unsure and self._reader is not None:
                held.append((job_id, *rule))
            else:
                ended.append(self._skip(job_id, batch, *rule))
        if held:
            ended += await self._settle_held(held, doubt)
        if ended:
            await self._outcomes.finished(ended)
            ended = []
        if remaining and await self._expired(remaining, doubt):
            return
        known: dict[str, JobRecord] = {}
        fresh_until = None
        wall_until = None if self._plan is None else self._plan.wall_expires
        if remaining and self.needs_record and self._reader is not None:
            remaining, ended, fresh_until = await self._check_records(doubt, remaining, known)
            if ended:
                await self._outcomes.finished(ended)
        rounds = 0
        while remaining:
            self.counts.passed += len(remaining)
            if self._moves is not None:
                self._moves.passed(remaining)
            passed = tuple(remaining)
            name = batch.batch_id if not rounds else f"{batch.batch_id}.r{rounds}"
            unsure = doubt.unsure.intersection(passed)
            checked = Batch(name, passed, unsure, known, fresh_until, batch.target, batch.look,
                            wall_until)  # fmt: skip
            with deleting(self._plan, checked):  # its wait for a token ends at the expiry
                stale = await self._inner.delete_checked(checked)
            if self._moves is not None:
                unsent = set(stale.ids)
                self._moves.settled(i for i in passed if i not in unsent)
            if not stale:
                return
            # Their DELETE's turn came after their check had expired: checked again, or, when
            # that keeps happening, not deleted on a check that old. An attempt that went out
            # before and was not answered may have deleted them: that stays known.
            doubt.learn(stale.unsure, known)
            rounds += 1
            self.counts.passed -= len(stale)
            self.counts.stale += len(stale)
            if await self._expired(stale.ids, doubt):
                return
            if rounds > STALE_ROUNDS:
                await self._outcomes.finished([self._skip(i, doubt.batch, "stale_check", (
                    f"its check could not be kept within {self._max_age:g}s of its DELETE "
                    f"({STALE_ROUNDS} times): not deleted")) for i in stale.ids])  # fmt: skip
                return
            known = {}
            remaining, ended, fresh_until = await self._check_records(doubt, stale.ids, known)
            if ended:
                await self._outcomes.finished(ended)

    async def _settle_held(
        self, held: Sequence[tuple[str, str, str | None]], doubt: _Doubt
    ) -> list[Result]:
        """The outcomes of ids a rule by id keeps from a DELETE now (``protected``,
        ``excluded``, ...) that an earlier attempt or run sent without a readable answer:
        each is read, never sent. Gone, it is ours (``deleted``, ``answer_lost``): 'skipped'
        would tell whoever protected or struck it out that the job is still there. There,
        ``skipped`` with the rule's reason, the attempt kept. Stopped: the rest left open."""
        assert self._reader is not None
        batch = doubt.batch
        ended: list[Result] = []
        for job_id, reason, detail in held:
            self.counts.checked += 1
            self.counts.shown += 1
            try:
                record = await self._reader.show(job_id)
            except Stopped:
                break
            except ClientError as exc:
                ended.append(_unverified(job_id, batch, exc))
                continue
            if record is not None and record.id != job_id:  # not the job asked about
                ended.append(_unverified(job_id, batch, another_job(job_id, record.id)))
            elif record is None:
                ended.append(gone(job_id, unsure=batch.unsure, known=doubt.read, attempts=1,
                                  batch_id=batch.batch_id))  # fmt: skip
            else:
                ended.append(self._skip(job_id, batch, reason, detail))
        return ended

    async def _check_records(
        self, doubt: _Doubt, ids: Sequence[str], known: dict[str, JobRecord]
    ) -> tuple[list[str], list[Result], float | None]:
        """Read each job (on a fresh listing's page, else with a show call): the ids that
        pass, their records kept in ``known``; the outcomes of those that do not; and until
        when the check of the passing ones holds (``max_age`` after the oldest read). An id
        in ``doubt`` found gone is ours (``deleted``, unconfirmed); let go otherwise, it
        keeps an attempt (the next run on the ledger still knows it may be gone)."""
        assert self._reader is not None
        batch = doubt.batch
        passed: list[str] = []
        ended: list[Result] = []
        oldest: float | None = None
        # A page may be older than a DELETE that went out unanswered (read for another batch
        # meanwhile, or an index that lags): an id whose check expired after such a DELETE is
        # read with the show call, which comes after it.
        ask = [i for i in ids if i not in doubt.expired]
        try:
            listed = await self._recheck.listed(ask) if self._recheck is not None and ask else {}
        except Stopped:
            return [], ended, None  # nothing goes on: the unchecked ids stay open
        for job_id in ids:
            self.counts.checked += 1
            seen = listed.get(job_id)
            if seen is not None:
                record: JobRecord | None = seen.record
                read_at = seen.read_at
                self.counts.listed += 1
            else:
                read_at = self._clock.now()
                self.counts.shown += 1
                try:
                    record = await self._reader.show(job_id)
                except Stopped:
                    return [], ended, None
                except ClientError as exc:
                    ended.append(_unverified(job_id, batch, exc))
                    continue
                if record is not None and record.id != job_id:  # not the job asked about
                    ended.append(_unverified(job_id, batch, another_job(job_id, record.id)))
                    continue
            if record is None:  # gone: by our hand, if an attempt (or a run) sent it unanswered
                ended.append(gone(job_id, unsure=batch.unsure, known=doubt.read,
                                  attempts=int(job_id in batch.unsure), batch_id=batch.batch_id,
                                  reason="gone before delete"))  # fmt: skip
                continue
            why = self._protection.reason(record)
            if why is not None:
                ended.append(self._skip(job_id, batch, "protected", why))
                continue
            if self._plan is not None:
                mismatch = self._plan.filters.mismatch(record) or self._plan.changed(record)
                if mismatch is not None:
                    ended.append(self._skip(job_id, batch, "plan_mismatch", mismatch))
                    continue
            passed.append(job_id)
            known[job_id] = record
            oldest = read_at if oldest is None else min(oldest, read_at)
        if oldest is None:
            return passed, ended, None
        until = oldest + self._max_age
        if self._plan is not None and self._plan.expires is not None:
            until = min(until, self._plan.expires)  # no DELETE on a plan that has expired
        return passed, ended, until

    async def _expired(self, ids: Sequence[str], doubt: _Doubt) -> bool:
        """Has the plan expired? Then ``ids`` end ``skipped`` (``plan_expired``), unsent: what
        was reviewed is no longer what may be deleted, and a plan made anew takes them up.
        Their checks end at the expiry too (``_check_records``): a batch checked before it
        whose DELETE's turn comes after comes back here. An id an attempt (or a dead run)
        sent without a readable answer is read first: found gone, it is ours (``deleted``,
        ``answer_lost``), which 'not sent' would deny and no new plan would take up."""
        plan = self._plan
        if plan is None or not plan.expired(self._clock):
            return False
        detail = (f"the plan expired at {plan.expires_at} before its DELETE went out; run "
                  "discover again and review the new plan")  # fmt: skip
        unsent = [i for i in ids if i not in doubt.unsure]
        sent = [i for i in ids if i in doubt.unsure]
        there = sent
        if sent and self._reader is not None:
            there, ended, _ = await self._check_records(doubt, sent, {})
            if ended:
                await self._outcomes.finished(ended)
        again = (f"the plan expired at {plan.expires_at} before its DELETE could go out again "
                 "(one went out unanswered, and the job is still there); run discover again "
                 "and review the new plan")  # fmt: skip
        batch = doubt.batch
        await self._outcomes.finished(
            [self._skip(i, batch, "plan_expired", detail) for i in unsent]
            + [self._skip(i, batch, "plan_expired", again) for i in there]
        )
        return True

    def _skip(self, job_id: str, batch: Batch, reason: str, detail: str | None) -> Result:
        self.counts.skipped[reason] = self.counts.skipped.get(reason, 0) + 1
        return skipped(job_id, batch=batch, reason=reason, detail=detail)


class _Doubt:
    """What one batch knows, over its rounds, of ids that may be gone by our own hand:
    those sent without a readable answer by an earlier run or delivery (``Batch.unsure``)
    or by an attempt of a round whose check then expired (``unsure``, growing), as the
    batch its outcomes are given in; and every record read of its jobs (``read``), for the
    record of a deletion known only by the job's absence."""

    __slots__ = ("batch", "expired", "read")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.read: dict[str, JobRecord] = dict(batch.known)
        self.expired: frozenset[str] = frozenset()  # in doubt when their check expired

    @property
    def unsure(self) -> frozenset[str]:
        return self.batch.unsure

    def learn(self, unsure: frozenset[str], read: Mapping[str, JobRecord]) -> None:
        """A round ended with ``unsure`` sent unanswered, on the records ``read``."""
        self.read.update(read)
        self.expired |= unsure
        if not unsure <= self.batch.unsure:
            self.batch = replace(self.batch, unsure=self.batch.unsure | unsure)


def _unverified(job_id: str, batch: Batch, exc: ApiError) -> Result:
    ours = job_id in batch.unsure
    return unverified(job_id, batch_id=batch.batch_id, attempts=int(ours), error=exc, ours=ours)
