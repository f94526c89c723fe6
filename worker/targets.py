"""Where an API call is addressed: a project at an endpoint (issue 25, many projects).

A :class:`Target` is the unit every DevServer jobs call goes to: ``/v1/{project_id}/...`` at
``endpoint``, signed with the account's one AK/SK pair (the project travels in the path and
in ``X-Project-Id``, so one pair serves every project of the account). ``region`` is its
name for people (events, ledger, report); ``None`` when only an endpoint was given.

:class:`Address` is what one input line (or stream entry) names beside its id: any of
``project_id``, ``region``, ``endpoint``, each optional. :func:`resolve` fills in the rest
from the settings' default target and returns the :class:`Target`, or a reason a person can
act on (the line is then rejected, never sent). The rules each field is held to are the
settings' own (``project_problem``, ``region_problem``, ``endpoint_problem``): the settings
module calls the same functions.

Pure logic, but for the one look-up :class:`Targets` is given: a project named by region
alone (no ``project_id``, another region than the default's) is IAM's to find
(``GET /v3/projects?name={region}``, ``worker.api.projects``), which :func:`resolve` leaves
to its caller by returning :class:`Unresolved`.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from yarl import URL

from worker.errors import ReaperError, TransientError
from worker.types import PROJECT_ID_RE

REGION_RE = re.compile(r"[a-z]{2}(?:-[a-z0-9]+)+")
MAX_REGION_LENGTH = 64
MAX_ENDPOINT_LENGTH = 256


def endpoint_for(region: str) -> str:
    """The ModelArts endpoint of a region (``ap-southeast-1`` lives under ``.cn``)."""
    if region == "ap-southeast-1":
        return "https://modelarts.ap-southeast-1.myhuaweicloud.cn"
    return f"https://modelarts.{region}.myhuaweicloud.com"


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def project_problem(value: str) -> str | None:
    """Why ``value`` is not a project id (None: it is one)."""
    if PROJECT_ID_RE.fullmatch(value):
        return None
    return "must be 1 to 64 letters, digits and hyphens"


def region_problem(value: str) -> str | None:
    """Why ``value`` is not a region name (None: it is one)."""
    if len(value) <= MAX_REGION_LENGTH and REGION_RE.fullmatch(value):
        return None
    return "must look like cn-north-4 (lower-case letters, digits, hyphens)"


def endpoint_problem(value: str, *, service: str = "modelarts") -> str | None:
    """Why ``value`` is not an endpoint the API may be called at (None: it is one);
    ``service`` names the example's host (``iam`` for an IAM endpoint)."""
    if len(value) > MAX_ENDPOINT_LENGTH:
        return f"must be at most {MAX_ENDPOINT_LENGTH} characters"
    if any(c.isspace() or not c.isprintable() for c in value):
        return "must not hold spaces or control characters"
    if not value.isascii():
        # A client turns ｍｏｄｅｌａｒｔｓ… into modelarts… (IDNA): another spelling of a host,
        # which no check by name (a public endpoint's region, one place a project) would see.
        return "must be ASCII (an internationalised host name in its xn-- form)"
    example = f"https://{service}.cn-north-4.myhuaweicloud.com"
    unread = f"is not a URL with a host that can be read; write it as {example}"
    try:
        parts = urlsplit(value)
    except ValueError:  # http://[127.0.0.1]
        return unread
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http(s) URL such as {example}"
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        return "plain http:// is accepted only for loopback hosts; use https://"
    if parts.username is not None or parts.password is not None:
        return "must not carry a user name or password"
    if parts.query or parts.fragment:
        return "must not carry a query or a fragment"
    try:
        _ = parts.port
    except ValueError:
        return "has an invalid port"
    try:
        sent_to = URL(value)  # as the HTTP client reads it: where its calls would go
    except ValueError:  # http://[::1]x, a backslash in the host
        return unread
    # The rules on trust read urlsplit's host: the client must be calling that one.
    return None if _same_host(parts.hostname, sent_to.raw_host or "") else unread


def _same_host(read: str, sent_to: str) -> bool:
    """Whether the host the rules read (``urlsplit``) is the one the client calls (yarl)."""
    if read == sent_to.lower():
        return True
    try:
        return ipaddress.ip_address(read) == ipaddress.ip_address(sent_to)
    except ValueError:
        return False


def normal_endpoint(value: str) -> str:
    """An endpoint as kept and compared, everywhere (settings, lines, plans): its scheme
    and host in lower case (neither is case-sensitive), without the scheme's own port
    (``:443`` for https, ``:80`` for http: the same server), its path as given but without
    a trailing ``/``."""
    parts = urlsplit(value.strip())
    scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
    netloc = netloc.removesuffix(_DEFAULT_PORTS.get(scheme, "\0"))
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), parts.query, parts.fragment))


_DEFAULT_PORTS: Final = {"https": ":443", "http": ":80"}


@dataclass(frozen=True, slots=True)
class Target:
    """One project at one endpoint: where a call goes, and what its quota is kept per.

    Equal targets are one target: a rate limiter is kept per target, a circuit breaker per
    ``endpoint``. ``region`` names it for people and does not take part in where calls go.
    """

    project_id: str
    endpoint: str
    region: str | None = None

    @property
    def where(self) -> str:
        """The region, else the endpoint: how events and the summary name its place."""
        return self.region or self.endpoint

    def __str__(self) -> str:
        return f"{self.project_id}@{self.where}"


@dataclass(frozen=True, slots=True)
class Address:
    """What an input line names beside its id; each field already held to its rule."""

    project_id: str | None = None
    region: str | None = None
    endpoint: str | None = None

    def __bool__(self) -> bool:
        return bool(self.project_id or self.region or self.endpoint)


@dataclass(frozen=True, slots=True)
class Unresolved:
    """:func:`resolve`'s answer for a place other than the default's named without a
    project id: the project must be looked up (IAM, by ``region``), or the line rejected
    with :attr:`reason`."""

    endpoint: str
    region: str | None

    @property
    def reason(self) -> str:
        where = f"region {self.region}" if self.region else f"endpoint {self.endpoint}"
        return f"names {where} but no project_id (a project id belongs to one region)"


@dataclass(frozen=True, slots=True)
class LookupFailed:
    """:meth:`Targets.fresh`'s answer when IAM did not give the project of ``region``:
    ``reason`` says why (as a line's rejection does), ``error`` is IAM's failure."""

    region: str
    reason: str
    error: ReaperError

    @property
    def later(self) -> bool:
        """IAM could not be reached, or kept failing (5xx, throttled): a later try may
        succeed, so the entry waits rather than being refused."""
        return isinstance(self.error, TransientError)


FIELDS: Final = ("project_id", "region", "endpoint")
"""The names an input line may give beside the id, in this order."""


def _squashed(key: str) -> str:
    """A key as compared with the fields' names: NFKC (full-width letters are letters), case
    folded, and without what separates words (``Project ID``, ``project_id ``, ``project.id``
    and ``projectId`` are each ``projectid``)."""
    return _SEPARATORS.sub("", unicodedata.normalize("NFKC", key).casefold())


_SEPARATORS = re.compile(r"[\W_]+")


def misnamed_by(read: tuple[str, ...] = ()) -> Callable[[Collection[str]], str | None]:
    """The check of one reader's keys: why a line (or stream entry, or CSV header) is
    refused for a key that is one of :data:`FIELDS`, or of the id fields that reader reads
    (``read``: ``id``, ``job_id``), spelled otherwise (``PROJECT_ID``, ``projectId``,
    ``Region``, ``project id``, ``ID``), else None. Read as it is, that key would be
    ignored and the id sent to the default project (or another id read): the project the
    line names would not be the one it is deleted in."""
    squashed = {_squashed(name): name for name in (*FIELDS, *read)}
    clean = set(squashed.values())  # and keys found to spell no field otherwise

    def misnamed(keys: Collection[str]) -> str | None:
        if clean.issuperset(keys):  # each line of an input names the same few keys
            return None
        for key in keys:
            if key in clean or len(key) > 64:
                continue
            field = squashed.get(_squashed(key))
            if field is not None:
                return f"names {key!r}, which is not read: the field is {field!r}"
            if len(clean) < 1024:  # hostile input naming new keys on every line
                clean.add(key)
        return None

    return misnamed


def named_twice(keys: list[str], read: tuple[str, ...], keeps: str) -> str | None:
    """Why a line or entry whose ``keys`` (every key, in order) name one of the fields
    ``read`` more than once is refused, else None: which value was meant is a guess, and
    ``keeps`` says what a reader would do (``a JSON reader would keep the last``)."""
    for name in read:
        if (times := keys.count(name)) > 1:
            said = "twice" if times == 2 else f"{times} times"
            return f"names {name!r} {said}: which one is meant is not clear ({keeps})"
    return None


def address(fields: dict[str, str | None]) -> Address | str:
    """The :class:`Address` of a line's fields (absent or empty: not named), or the reason
    the first bad one is refused, naming the field."""
    named: dict[str, str] = {}
    for name in FIELDS:
        value = fields.get(name)
        if value is None or value == "":
            continue
        check = {"project_id": project_problem, "region": region_problem,
                 "endpoint": endpoint_problem}[name]  # fmt: skip
        problem = check(value)
        if problem is not None:
            return f"{name} {problem}"
        named[name] = normal_endpoint(value) if name == "endpoint" else value
    region, endpoint = named.get("region"), named.get("endpoint")
    if region is not None and endpoint is not None:
        theirs = public_region(endpoint)
        if theirs is not None and theirs != region:
            # Sent there, its outcome would name a region its calls never went to.
            return f"endpoint {endpoint} is region {theirs}'s, not region {region}'s"
    return Address(**named)


_PUBLIC = re.compile(r"modelarts\.([a-z]{2}(?:-[a-z0-9]+)+)\.myhuaweicloud\.(?:com|cn)")


def untrusted(endpoint: str, trusted: Collection[str]) -> str | None:
    """Why a line, a stream entry or a plan may not name ``endpoint`` (None: it may).

    Each call sent there carries the account's access key id, a signature and (temporary
    credentials) its security token: whoever writes a line must not choose where they go.
    Trusted are the ``trusted`` endpoints (the settings' own and ``allowed_endpoints``,
    normalised: :func:`normal_endpoint`), a region's public ModelArts endpoint
    (:func:`endpoint_for`: https, no port of its own) and loopback (tests, the simulator)."""
    if endpoint in trusted:
        return None
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if is_loopback(host):
        return None
    if parts.scheme == "https" and parts.port is None and _PUBLIC.fullmatch(host):
        return None
    return (
        f"endpoint {endpoint} is not one the settings trust (their endpoint, a region's "
        "public ModelArts endpoint, loopback, or one of allowed_endpoints): its calls would "
        "carry the account's signature there"
    )


def public_region(endpoint: str) -> str | None:
    """The region whose public ModelArts endpoint ``endpoint`` is (:func:`endpoint_for`),
    else None (a private, proxy or test endpoint says nothing of its region)."""
    host = urlsplit(endpoint).hostname or ""
    found = _PUBLIC.fullmatch(host)
    return found.group(1) if found else None


def resolve(
    named: Address,
    default: Target | None,
    *,
    allowed: Collection[str] = (),
    endpoints: Collection[str] = (),
) -> Target | Unresolved | str:
    """The target of a line that names ``named``, else the reason it cannot be sent.

    - nothing named: the default target;
    - a ``project_id`` alone: that project at the default endpoint (a project id belongs to
      one region, so a project elsewhere must name its region or endpoint too);
    - a ``region`` (and no ``endpoint``): the default endpoint when it is the default's
      region, else the region's public endpoint;
    - an ``endpoint``: that endpoint, the region (if named) as its label;
    - a place other than the default's without a ``project_id`` (another region, even at
      the default endpoint): :class:`Unresolved`.

    ``allowed``: when not empty, the only project ids a target may have; any other is
    refused with a reason. ``endpoints``: the endpoints a line may name beside the default's,
    a region's public one and loopback (:func:`untrusted`); any other is refused with a
    reason. ``default`` is None when the settings name no project: then every line must name
    its project and place.
    """
    if not named:
        if default is None:
            return "names no project_id and no default project is set"
        return _allowed(default, allowed)
    endpoint = named.endpoint
    region = named.region
    if endpoint is None:
        if region is None or (default is not None and region == default.region):
            if default is None:
                return "names no region or endpoint and no default is set"
            endpoint, region = default.endpoint, default.region
        else:
            endpoint = endpoint_for(region)
    else:
        trusted = endpoints if default is None else (*endpoints, default.endpoint)
        if (problem := untrusted(endpoint, trusted)) is not None:
            return problem
        if region is None and default is not None and endpoint == default.endpoint:
            region = default.region
    project = named.project_id
    if project is None:
        if default is None or (endpoint, region) != (default.endpoint, default.region):
            # Another region at the default's endpoint is that region's project, not the
            # default's under another name: IAM's to find, as at any other endpoint.
            return Unresolved(endpoint, region)
        project = default.project_id
    return _allowed(Target(project, endpoint, region), allowed)


def placed_twice(target: Target, first: Target, *, settings: bool = False) -> str:
    """Why a line naming ``target`` is rejected when its project goes to ``first``: a
    project is in one region, so the same id sent to both would be one job sent twice (one
    outcome ``deleted``, the other ``absent``, and one of the two places a wrong label)."""
    said = "the settings have it" if settings else "a line before named it"
    return (
        f"names project {target.project_id} at {_place(target)}, but {said} at "
        f"{_place(first)}: a project is in one region, and its ids are not sent to two places"
    )


def _place(target: Target) -> str:
    region = f"region {target.region}" if target.region else "no region"
    return f"{region}, {target.endpoint}"


def _allowed(target: Target, allowed: Collection[str]) -> Target | str:
    if allowed and target.project_id not in allowed:
        return f"project {target.project_id} is not in allowed_projects"
    return target


ProjectLookup = Callable[[str], Awaitable[str]]
"""The project id of a region (IAM's ``GET /v3/projects?name={region}``): raises a
``worker.errors.ReaperError`` saying why when there is none to be had."""


class Targets:
    """The targets of one run: each line's :class:`Address` resolved once (:func:`resolve`),
    every equal target one object, and the targets met so far in the order met.

    A project id goes to one place (endpoint and region) in a run: the default project to
    the settings' own, any other to the first place a line named it at. A line naming it
    elsewhere is rejected with the reason (:func:`placed_twice`), so a job, known by its
    project and id, is never sent twice under two targets (the ledger's and serve's
    de-duplication by target is then de-duplication by project).

    ``allowed``, ``endpoints``: the projects and endpoints a line may name (:func:`resolve`).
    ``lookup``: how a region's project id is found when a line names a region (another than
    the default's) without one; None: such a line is rejected (:class:`Unresolved`)."""

    def __init__(
        self,
        default: Target | None,
        *,
        allowed: Collection[str] = (),
        endpoints: Collection[str] = (),
        lookup: ProjectLookup | None = None,
    ) -> None:
        self.default = default
        self.allowed = frozenset(allowed)
        self.endpoints = frozenset(endpoints)
        self._lookup = lookup
        self._resolved: dict[Address, Target | str] = {}
        self._met: dict[Target, Target] = {}
        # A project is in one region: the one place each project id goes in this run (the
        # default's from the settings, any other's from the first line that named it).
        self._places: dict[str, Target] = {}
        if default is not None:
            self._places[default.project_id] = default

    def resolve(self, named: Address) -> Target | Unresolved | str:
        """:func:`resolve` with this run's default, ``allowed`` and ``endpoints``: pure."""
        return resolve(named, self.default, allowed=self.allowed, endpoints=self.endpoints)

    def look_up_with(self, lookup: ProjectLookup) -> None:
        """Find a region's project with ``lookup`` from now on (the keys and the session
        that sign IAM's calls are made after the targets)."""
        self._lookup = lookup

    def of(self, named: Address) -> Target | str:
        """The target of a line naming ``named``, else the reason it is rejected, without
        looking a project up (see :meth:`find`)."""
        found = self._resolved.get(named)
        if found is None:
            answer = self.resolve(named)
            found = answer.reason if isinstance(answer, Unresolved) else self._keep(answer)
            self._remember(named, found)
        return found

    def known(self, named: Address) -> Target | str | None:
        """What ``named`` was resolved to before in this run, if it was: no await."""
        return self._resolved.get(named)

    async def find(self, named: Address) -> Target | str:
        """:meth:`of`, looking the project of a line's region up (``lookup``) when the line
        names none: once a run for each place, a failure (no such project, IAM refused or
        unreachable) kept as the reason its lines are rejected."""
        found = self._resolved.get(named)
        if found is None:
            answer = await self._find(named)
            found = answer.reason if isinstance(answer, LookupFailed) else answer
            self._remember(named, found)
        return found

    async def fresh(self, named: Address) -> Target | str | LookupFailed:
        """:meth:`find` for a service that lives on: a failed look-up is not kept (IAM is
        asked again for the next entry), and comes back as :class:`LookupFailed`, which
        says whether a later try may succeed."""
        found = self._resolved.get(named)
        if found is None:
            answer = await self._find(named)
            if isinstance(answer, LookupFailed):
                return answer
            found = answer
            self._remember(named, found)
        return found

    async def _find(self, named: Address) -> Target | str | LookupFailed:
        answer = self.resolve(named)
        if not isinstance(answer, Unresolved):
            return self._keep(answer)
        if self._lookup is None or answer.region is None:
            return answer.reason
        try:
            project = await self._lookup(answer.region)
        except ReaperError as exc:
            reason = f"the project of region {answer.region} was not found in IAM: {exc}"
            return LookupFailed(answer.region, reason, exc)
        return self._keep(_allowed(Target(project, answer.endpoint, answer.region), self.allowed))

    def _keep(self, answer: Target | str) -> Target | str:
        """The one object of an equal target; a reason when its project goes elsewhere."""
        if not isinstance(answer, Target):
            return answer
        kept = self._met.get(answer)
        if kept is not None:
            return kept
        first = self._places.setdefault(answer.project_id, answer)
        if first != answer:
            return placed_twice(answer, first, settings=first is self.default)
        self._met[answer] = answer
        return answer

    def _remember(self, named: Address, found: Target | str) -> None:
        if len(self._resolved) >= _KEPT:
            self._resolved.clear()  # hostile input naming a new place on every line
        self._resolved[named] = found

    @property
    def met(self) -> list[Target]:
        """Every target a line resolved to, in the order first met."""
        return list(self._met)

    def __repr__(self) -> str:
        return (
            f"Targets(default={self.default}, allowed={len(self.allowed)}, met={len(self._met)}, "
            f"lookup={self._lookup is not None})"
        )


_KEPT = 4096


def limit_key(base: str, target: Target, default: Target | None) -> str:
    """The Redis key of ``target``'s shared rate limit: ``base`` for the default's place (so
    a one-project fleet keeps its key), else ``base`` with the project and endpoint, since
    a quota is per project and API."""
    if default is not None and (target.project_id, target.endpoint) == (
        default.project_id,
        default.endpoint,
    ):
        return base
    return f"{base}:{target.project_id}@{target.endpoint}"
