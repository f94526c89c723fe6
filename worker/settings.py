"""Settings: flags over ``REAPER_*`` environment over a TOML config file over defaults.

``HUAWEICLOUD_SDK_PROJECT_ID`` and ``HUAWEICLOUD_SDK_IAM_ENDPOINT`` sit just below
``REAPER_PROJECT_ID`` and ``REAPER_IAM_ENDPOINT`` and above the config file. The SDK's keys
(``HUAWEICLOUD_SDK_AK``, ``_SK``, ``_SECURITY_TOKEN``) are not settings: they are one
credential source of their own (``worker.api.credentials``), used whole, so an access key
from here is never paired with a secret key from there. ``HUAWEICLOUD_SDK_REGION``
is not read: in the SDK it prefixes endpoint overrides, it does not name the region.

A secret can be read from a file (``--sk-file``, ``REAPER_SK_FILE``, ``sk_file`` in the
config): the file counts at the level where it was named, so ``--sk`` still beats
``REAPER_SK_FILE``. The files that gave the keys are remembered (``secret_files``) so that
a rotated Secret can be read again.

This module sits at the edge with the command line; the pipeline stages never import it.
Secrets are ``SecretStr`` and never appear in ``repr``, logs or validation errors.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from worker.api.secrets import access_key_problem, read_key_file, service_url_problem
from worker.errors import ConfigError
from worker.targets import (
    endpoint_for,
    endpoint_problem,
    normal_endpoint,
    project_problem,
    region_problem,
)
from worker.types import holds_control

MAX_BATCH_SIZE = 1000
DEFAULT_BATCH_SIZE = 50

REGIONS = (
    "cn-north-1", "cn-north-2", "cn-north-4", "cn-north-9", "cn-north-11", "cn-north-12",
    "cn-south-1", "cn-east-3", "cn-east-4", "cn-southwest-2", "cn-southwest-3",
    "ap-southeast-1", "ap-southeast-2", "ap-southeast-3", "ap-southeast-4",
    "la-south-2", "la-north-2", "af-south-1", "af-north-1", "tr-west-1", "me-east-1",
    "sa-brazil-1",
)  # fmt: skip


# The SDK's variable -> our setting. Below REAPER_*, above the config file. Its keys are a
# credential source of their own (see the module docstring), and its REGION is not a region.
SDK_ENVIRONMENT = {
    "HUAWEICLOUD_SDK_PROJECT_ID": "project_id",
    "HUAWEICLOUD_SDK_IAM_ENDPOINT": "iam_endpoint",
}
SECRETS = ("ak", "sk", "security_token")


class Settings(BaseSettings):
    """Every setting of docs/reference.md. Field names are the flag names with ``_`` for ``-``."""

    model_config = SettingsConfigDict(
        env_prefix="REAPER_",
        extra="forbid",
        allow_inf_nan=False,  # --deadline inf: no deadline said as a number (see _range)
        hide_input_in_errors=True,
        validate_default=True,
    )

    # -- where and who ------------------------------------------------------------------
    region: str | None = None
    endpoint: str | None = None
    project_id: str | None = None
    allowed_projects: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allowed_endpoints: Annotated[list[str], NoDecode] = Field(default_factory=list)
    iam_endpoint: str | None = None  # where a region's project id is looked up (api/projects)
    ak: str | None = None
    sk: SecretStr | None = None
    security_token: SecretStr | None = None
    ak_file: Path | None = None
    sk_file: Path | None = None
    security_token_file: Path | None = None
    ca_bundle: Path | None = None
    credential_source: Literal["auto", "settings", "env", "profile", "pod-identity", "metadata"] = (
        "auto"
    )
    metadata_url: str = "http://169.254.169.254"

    # -- how fast -----------------------------------------------------------------------
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=MAX_BATCH_SIZE)
    concurrency: int = Field(default=8, ge=1, le=256)
    rate: Literal["auto"] | Annotated[float, Field(gt=0, le=10_000)] = 10.0
    burst: int = Field(default=5, ge=1, le=10_000)
    max_attempts: int = Field(default=6, ge=1, le=50)
    deadline: float | None = Field(default=None, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0, le=300)
    read_timeout: float = Field(default=60.0, gt=0, le=600)
    max_retry_after: float = Field(default=60.0, gt=0, le=3600)
    retry_base_delay: float = Field(default=0.5, gt=0, le=30)  # full jitter's first ceiling
    grace: float = Field(default=20.0, ge=0, le=600)

    # -- run ------------------------------------------------------------------------------
    ledger: Path | None = None
    dry_run: bool = False
    yes: bool = False
    max_deletions: int | None = Field(default=None, ge=0)
    shard: str | None = Field(default=None, min_length=1)  # "I/N" or "auto/N": worker.input.shard
    confirm_project_over: int = Field(default=1000, ge=0)  # above: type the project id

    # -- protection and plans (see worker.discovery.guard and worker.discovery.plan) ---------
    protect: Annotated[list[str], NoDecode] = Field(default_factory=list)
    protect_file: Path | None = None
    protected_types: Annotated[list[str], NoDecode] = Field(default_factory=list)
    protected_statuses: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_fraction: float | None = Field(default=None, gt=0, le=1)
    recheck_max_age: float = Field(default=60.0, ge=1, le=3600)
    plan_key_file: Path | None = None
    _protect_files: tuple[Path, ...] = PrivateAttr(default=())
    _secret_files: dict[str, Path] = PrivateAttr(default_factory=dict)
    _warnings: tuple[str, ...] = PrivateAttr(default=())
    _said_as: dict[str, str] = PrivateAttr(default_factory=dict)  # see named()

    # -- serve / enqueue ------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream: str = Field(default="devserver-reaper:ids", min_length=1)
    group: str = Field(default="devserver-reaper", min_length=1)
    consumer: str = Field(default_factory=socket.gethostname, min_length=1)
    max_deliveries: int = Field(default=5, ge=1, le=1000)
    reclaim_after: float = Field(default=300.0, gt=0)
    redis_timeout: float = Field(default=10.0, gt=0, le=300)  # serve: past a read's block
    http_port: int = Field(default=8080, ge=0, le=65535)
    outcomes_max_len: int = Field(default=1_000_000, ge=1)
    outcomes_max_age: float = Field(default=7 * 24 * 3600.0, ge=0)
    dead_max_len: int = Field(default=1_000_000, ge=1)
    dead_max_age: float = Field(default=7 * 24 * 3600.0, ge=0)
    stats_interval: float = Field(default=60.0, ge=0)
    http_host: str = "0.0.0.0"

    # -- output ---------------------------------------------------------------------------
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("ak", "sk", "security_token")
    @classmethod
    def _printable(cls, value: str | SecretStr | None) -> str | SecretStr | None:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is not None and holds_control(text):
            raise ValueError("must not hold a control character (a line break in a file?)")
        return value

    @field_validator("ak")
    @classmethod
    def _access_key(cls, value: str | None) -> str | None:
        problem = None if value is None else access_key_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("rate", mode="before")
    @classmethod
    def _rate_word(cls, value: object) -> object:
        """``auto`` as people type it: `` Auto`` from a YAML manifest is still auto."""
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator(
        "ak_file", "sk_file", "security_token_file", "ca_bundle", "ledger", "plan_key_file",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _file_path(cls, value: object) -> object:
        """An empty path is no file: ``Path("")`` is the current directory, and an empty key
        file setting was passed over without a word."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("must be a file path, not empty")
        return value

    @field_validator("sk", "security_token", mode="before")
    @classmethod
    def _secret_given(cls, value: object) -> object:
        if isinstance(value, str) and not value:
            raise ValueError("must not be empty (leave it out, or give the key)")
        return value

    @field_validator("project_id")
    @classmethod
    def _project_id(cls, value: str | None) -> str | None:
        if value is not None and (problem := project_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("allowed_projects", "allowed_endpoints", mode="before")
    @classmethod
    def _id_list(cls, value: object) -> object:
        return word_list(_not_blank(value))

    @field_validator("allowed_projects", "allowed_endpoints")
    @classmethod
    def _allowed(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """Each entry held to its setting's rule; endpoints kept as compared (normalised)."""
        endpoints = info.field_name == "allowed_endpoints"
        check = endpoint_problem if endpoints else project_problem
        for entry in value:
            if (problem := check(entry)) is not None:
                raise ValueError(f"{entry!r}: each entry {problem}")
        return list(dict.fromkeys(normal_endpoint(e) if endpoints else e for e in value))

    @field_validator("protect", "protected_types", "protected_statuses", mode="before")
    @classmethod
    def _word_list(cls, value: object) -> object:
        return word_list(_not_blank(value))

    @model_validator(mode="wrap")
    @classmethod
    def _protection_adds_up(cls, data: Any, handler: ModelWrapValidatorHandler[Settings]) -> Any:
        """Each source's protection joins the others' (see ``ADDED_UP``)."""
        sourced = (data.pop(_LAYERS_KEY, None) if isinstance(data, dict) else None) or []
        read = (data.pop(_FILES_KEY, None) if isinstance(data, dict) else None) or _FilesRead()
        for said_as, layer in sourced:  # a bad rule is said with the source that gave it
            _check_protection(layer, said_as)
        layers = [layer for _, layer in sourced]
        for name in ("protect", "protected_types", "protected_statuses"):
            given = [value for layer in layers if (value := layer.get(name)) is not None]
            if len(given) > 1:
                data[name] = word_list(given)  # each source's words, in one list
        named = [layer["protect_file"] for layer in layers if "protect_file" in layer]
        for said_as, layer in sourced:
            if not str(layer.get("protect_file", "-")).strip():
                raise ConfigError(f"{said_as('protect_file')} must be a file path, not empty")
        settings = handler(data)
        files: list[Path | None] = [Path(name) for name in named] or [settings.protect_file]
        settings._protect_files = tuple(dict.fromkeys(f for f in files if f is not None))
        settings._secret_files = dict(read.files)
        settings._warnings = tuple(read.warnings)
        settings._said_as = dict(read.said_as)
        return settings

    @field_validator("protected_types", "protected_statuses")
    @classmethod
    def _upper_words(cls, value: list[str]) -> list[str]:
        _check_words(value)
        return [word.strip().upper() for word in value]

    @field_validator("protect")
    @classmethod
    def _protect_rules(cls, value: list[str]) -> list[str]:
        _check_rules(value)
        return [rule.strip() for rule in value if rule.strip()]

    @field_validator("region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        if value is not None and (problem := region_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("endpoint", "iam_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        service = "iam" if info.field_name == "iam_endpoint" else "modelarts"
        if (problem := endpoint_problem(value, service=service)) is not None:
            raise ValueError(problem)
        return normal_endpoint(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        # Never repeats the URL: it may carry a password.
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        databases = parse_qs(parts.query).get("db", [])
        if parts.scheme != "unix" and parts.path.strip("/"):
            databases.append(parts.path.strip("/"))
        if not all(db.isascii() and db.isdigit() for db in databases):
            # redis-py would quietly use database 0 instead.
            raise ValueError("the database must be a number, as in redis://host:6379/0")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value

    @field_validator("http_host")
    @classmethod
    def _http_host(cls, value: str) -> str:
        """An address to listen on: an IP address (``0.0.0.0``, ``::``, ``127.0.0.1``, the
        pod's own) or ``localhost``."""
        if value == "localhost":
            return value
        try:
            return str(ipaddress.ip_address(value.strip("[]")))
        except ValueError:
            raise ValueError(
                "must be an IP address to listen on, such as 0.0.0.0 or 127.0.0.1"
            ) from None

    @field_validator("metadata_url")
    @classmethod
    def _metadata_url(cls, value: str) -> str:
        # The ECS metadata service is plain http on a link-local address by design; plain
        # http anywhere else would hand its keys to whoever is on the way.
        problem = service_url_problem(value)
        if problem:
            raise ValueError(problem)
        return value.rstrip("/")

    @property
    def secret_files(self) -> dict[str, Path]:
        """The files the keys in force were read from: ``{"sk": Path(...)}`` and so on."""
        return dict(self._secret_files)

    @property
    def warnings(self) -> tuple[str, ...]:
        """What a person should hear about these settings (a key file others can read)."""
        return self._warnings

    def named(self, field: str) -> str:
        """``field`` as the user gave it, for a message: ``--plan-key-file`` for a flag,
        ``REAPER_PLAN_KEY_FILE``, ``reaper.toml: plan_key_file``."""
        return self._said_as.get(field) or setting_name(field, flag=False)

    def files_read(self, exclude: str | None = None) -> tuple[tuple[str, str], ...]:
        """The files a command reads besides its input, which an output it writes
        (``--results``, ``--events``, ``discover --plan``, ``report --output``) may not name,
        each with what it is: written over, a protect file's rules were lost to the next run
        (lines of JSON or a plan protect no job), and so were an exclusion list and a key."""
        files = [(str(path), "a protect_file") for path in self.protect_files]
        files += [(str(path), f"the {name}_file") for name, path in self.secret_files.items()]
        if self.plan_key_file is not None:
            files.append((str(self.plan_key_file), "the plan_key_file"))
        if exclude is not None:
            files.append((exclude, "the --exclude file"))
        return tuple(files)

    @property
    def protect_files(self) -> tuple[Path, ...]:
        """Every ``protect_file`` named, by any source (``protect_file`` is the first)."""
        return self._protect_files

    @property
    def api_endpoint(self) -> str:
        """The endpoint in force; ``ConfigError`` when neither it nor a region is set."""
        if self.endpoint:
            return self.endpoint
        if self.region:
            return endpoint_for(self.region)
        raise ConfigError("set endpoint or region (REAPER_ENDPOINT / REAPER_REGION)")

    @property
    def trusted_endpoints(self) -> frozenset[str]:
        """The endpoints a line, stream entry or plan may name beside a region's public one
        and loopback (``worker.targets.untrusted``): the endpoint in force, if any, and
        ``allowed_endpoints``."""
        own = self.endpoint or (endpoint_for(self.region) if self.region else None)
        return frozenset((*self.allowed_endpoints, *([normal_endpoint(own)] if own else [])))

    def require_api(self, *, endpoint: bool = True) -> None:
        """Check what a command that calls the API needs before any call, naming what is missing.

        Keys may come from the environment, a profile file, pod identity or ECS metadata
        (``worker.api.credentials``), so they are required here only when ``credential_source``
        says they must be in the settings.
        """
        missing = []
        if self.credential_source == "settings":
            missing = [flag for flag, value in (("--ak", self.ak), ("--sk", self.sk)) if not value]
        if missing:
            raise ConfigError(f"missing settings: {', '.join(missing)}")
        if endpoint:  # False: every call's endpoint is named elsewhere (discover --project)
            _ = self.api_endpoint

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        variables = {setting: variable for variable, setting in SDK_ENVIRONMENT.items()}
        # Each source, and how a message names a setting it gave (see Settings.named).
        sources: list[tuple[PydanticBaseSettingsSource, Callable[[str], str]]] = [
            (init_settings, lambda field: setting_name(field, flag=True)),
            (env_settings, lambda field: f"REAPER_{field.upper()}"),
            (_SdkEnvironment(settings_cls), lambda field: variables.get(field, field)),
        ]
        config_file = _CONFIG_FILE.get() or os.environ.get("REAPER_CONFIG")
        if config_file:
            toml = TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file))
            beside = _BesideFile(toml, Path(config_file).absolute().parent)
            sources.append((beside, f"{config_file}: {{}}".format))  # "c.toml: sk_file"
        read = _FilesRead()  # secrets a source of higher precedence has given, and from where
        # What each source says of ADDED_UP, in order, with how it names a setting.
        layers: list[tuple[Callable[[str], str], dict[str, Any]]] = []
        return tuple(
            _Layer(_SecretFiles(source, read, said_as), layers, read, said_as)
            for source, said_as in sources
        )


# The --config path, handed to the source hook above (which pydantic calls with no arguments).
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("reaper_config_file", default=None)

ADDED_UP = ("protect", "protect_file", "protected_types", "protected_statuses")
"""Settings whose sources add up instead of the highest one winning: protection. A team's
config file protects ``prod-*``; a flag's ``--protect id:x`` must add to that, not quietly
replace it (and with it, every rule the team relies on)."""

PATH_SETTINGS = tuple(
    name for name, field in Settings.model_fields.items()
    if field.annotation is Path or Path in get_args(field.annotation)
)  # fmt: skip
"""Settings that name a file: relative in the config file, taken from its directory."""

_LAYERS_KEY = "__layers__"
"""Where the sources hand the validator what each gave for ADDED_UP, highest first."""

_FILES_KEY = "__secret_files__"
"""Where the sources hand the validator the key files they read (a ``_FilesRead``)."""


class _FilesRead:
    """Shared by one load's sources: which secrets are decided, from which file, and what
    the files' checks had to say."""

    def __init__(self) -> None:
        self.decided: set[str] = set()
        self.files: dict[str, Path] = {}
        self.warnings: list[str] = []
        self.said_as: dict[str, str] = {}  # each setting given, as its source calls it


_TYPE_WORDS = "each entry must be a job type or status such as FINISHED or ASCEND_DIAGNOSIS"


def _check_words(value: list[str]) -> None:
    """``protected_types`` and ``protected_statuses``: ``ValueError`` for a word that is no
    job type or status."""
    for word in value:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", word.strip()):
            raise ValueError(_TYPE_WORDS)


def _check_rules(value: list[str]) -> None:
    """``protect``: ``ValueError`` for a rule that does not parse, said after the setting's
    own name (``'x': ...``, not ``protect rule 'x': ...``)."""
    from worker.discovery.guard import Protection

    try:
        Protection.parse(value)
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("protect rule ")) from None


def _check_protection(given: dict[str, Any], said_as: Callable[[str], str]) -> None:
    """One source's protection rules, types and statuses, checked before they add up with
    the other sources': a bad one is said with the source that gave it (``--protect``,
    ``REAPER_PROTECT``, ``c.toml: protect``), as a protect file's rule is with its file
    and line; ``ConfigError`` (78). A value that is no list of words is left to the
    settings' own validation."""
    checks = (("protect", _check_rules), ("protected_types", _check_words),
              ("protected_statuses", _check_words))  # fmt: skip
    for name, check in checks:
        if name not in given:
            continue
        words = word_list(given[name])
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            continue
        try:
            check(words)
        except ValueError as exc:
            raise ConfigError(f"{said_as(name)} {exc}") from None


def _not_blank(value: object) -> object:
    """A list setting given as blank text (``allowed_projects = ""``) is refused: it read as
    no entry at all, for ``allowed_projects`` any project; an empty TOML list (``[]``) says
    none on purpose."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty: list at least one entry, or write [] for none")
    return value


def word_list(value: object) -> object:
    """A list (TOML), or one string of comma-separated words (a flag, the environment), or a
    JSON list in that string (``'["a", "b"]'``, pydantic-settings' form for a list).

    A comma inside brackets is part of a glob (``prod-[ab,c]*``), not a separator, and an
    item of a list is split like a string: ``["a, b"]`` is two words, not one that matches
    nothing."""
    if isinstance(value, str):
        listed = _json_list(value)
        if listed is None:
            return [word.strip() for word in _WORD_SEP.split(value) if word.strip()]
        value = listed
    if isinstance(value, list | tuple):
        words: list[object] = []
        for item in value:  # a string, or one source's list when sources add up
            split = word_list(item)
            words += split if isinstance(split, list) else [split]
        return words
    return value


def _json_list(text: str) -> list[object] | None:
    if not text.strip().startswith("["):
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return None  # a glob such as [ab]*
    return parsed if isinstance(parsed, list) else None


_WORD_SEP = re.compile(r"\n|,(?![^\[]*\])")


class _Whole(PydanticBaseSettingsSource):
    """A source that gives all its values at once (``__call__``), none field by field."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False


class _Wrapping(_Whole):
    """A source made of another one's values."""

    def __init__(self, inner: PydanticBaseSettingsSource) -> None:
        super().__init__(inner.settings_cls)
        self._inner = inner


class _Layer(_Wrapping):
    """Passes a source's values through, noting what it gave for ``ADDED_UP``."""

    def __init__(
        self,
        inner: PydanticBaseSettingsSource,
        layers: list[tuple[Callable[[str], str], dict[str, Any]]],
        read: _FilesRead,
        said_as: Callable[[str], str] = str,
    ) -> None:
        """``said_as``: how a message names a setting this source gave (``--protect``,
        ``REAPER_PROTECT``, ``c.toml: protect``)."""
        super().__init__(inner)
        self._layers = layers
        self._read = read
        self._said_as = said_as

    def __call__(self) -> dict[str, Any]:
        data = self._inner()
        given = {k: data[k] for k in ADDED_UP if data.get(k) is not None}
        self._layers.append((self._said_as, given))
        return {**data, _LAYERS_KEY: self._layers, _FILES_KEY: self._read}


class _SdkEnvironment(_Whole):
    """``HUAWEICLOUD_SDK_*``: honoured, but the more specific ``REAPER_*`` wins over them."""

    def __call__(self) -> dict[str, Any]:
        return {
            setting: os.environ[variable]
            for variable, setting in SDK_ENVIRONMENT.items()
            if os.environ.get(variable)
        }


class _BesideFile(_Wrapping):
    """A config file's relative paths, taken from the file's own directory.

    ``protect_file = "protect.txt"`` in a team's ``config/reaper.toml`` names the
    ``protect.txt`` beside it; read from the current directory it was whichever file of that
    name was there, or none, when the run started elsewhere (another shard's, a stale copy)
    and the wrong jobs were protected. Flags and the environment are typed where the
    command runs, so theirs stay relative to the current directory. The directory is not
    resolved: a Kubernetes ConfigMap's files are links into a directory renamed on each
    update, and the path through the mount point keeps following them."""

    def __init__(self, inner: PydanticBaseSettingsSource, directory: Path) -> None:
        super().__init__(inner)
        self._directory = directory

    def __call__(self) -> dict[str, Any]:
        data = dict(self._inner())
        for name in PATH_SETTINGS:
            value = data.get(name)
            # An empty value is left to its validation ("must be a file path, not empty").
            if isinstance(value, str) and value.strip() and not Path(value).is_absolute():
                data[name] = str(self._directory / value)
        return data


class _SecretFiles(_Wrapping):
    """Reads ``ak_file``, ``sk_file`` and ``security_token_file`` within one source.

    Resolving per source keeps precedence for the secret itself (``--sk`` beats
    ``REAPER_SK_FILE``). Within one source the file, the deliberate choice (a mounted
    Secret), wins over a value given beside it. A file is not even read when a source of
    higher precedence (called first, sharing ``decided``) has given that secret: a broken
    ``REAPER_SK_FILE`` cannot fail a run that ``--sk`` decides.
    """

    def __init__(
        self,
        inner: PydanticBaseSettingsSource,
        read: _FilesRead,
        said_as: Callable[[str], str] = str,
    ) -> None:
        """``said_as``: how a message names a key file setting of this source (``--sk-file``,
        ``REAPER_SK_FILE``, ``sk_file in reaper.toml``)."""
        super().__init__(inner)
        self._read = read
        self._said_as = said_as

    def __call__(self) -> dict[str, Any]:
        data = dict(self._inner())
        for field in data:  # the first source to give it is the one in force
            self._read.said_as.setdefault(field, self._said_as(field))
        for name in SECRETS:
            path = data.get(f"{name}_file")
            if name in self._read.decided:
                continue
            if isinstance(path, str | os.PathLike) and str(path):
                setting = f"{name}_file"
                key_file = read_key_file(setting, Path(path), called=self._said_as(setting))
                data[name] = key_file.text
                self._read.files[name] = Path(path)
                if key_file.warning:
                    self._read.warnings.append(key_file.warning)
            if data.get(name) is not None:  # absent, or not a path: its validation says so
                self._read.decided.add(name)
        return data


MIN_PLAN_KEY = 16


def read_plan_key(
    settings: Settings, warn: Callable[[str], None] = lambda text: None
) -> bytes | None:
    """The plan key (``plan_key_file``; None when it is not set): a secret file like the
    others (``warn`` is told when others may read it), and at least 16 bytes, or it is no
    key (``ConfigError``, 78, naming the setting as given; never quoting the key)."""
    path, name = settings.plan_key_file, settings.named("plan_key_file")
    if path is None:
        return None
    read = read_key_file("plan_key_file", path, called=name)
    if read.warning is not None:
        warn(read.warning)
    key = read.text.encode()
    if len(key) < MIN_PLAN_KEY:
        raise ConfigError(
            f"{name} {path} holds fewer than {MIN_PLAN_KEY} bytes: not a key "
            "(make one with: head -c 32 /dev/urandom | base64 > plan.key)"
        )
    return key


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings, turning any validation error into a ``ConfigError`` with no input values.

    ``overrides`` are the flags the user gave (``None`` means "not given"). ``config`` is
    ``--config``; without it ``REAPER_CONFIG`` names the file. A named file that is not
    there is an error, not an empty config.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    named_by = "--config" if config is not None else "REAPER_CONFIG"
    also = os.environ.get("REAPER_CONFIG") or None
    if config is not None and also is not None and Path(also) != Path(config):
        # One would be dropped, and with it its protection rules: refused, never guessed.
        raise ConfigError(
            f"two config files named: --config {config} and REAPER_CONFIG={also}; name one "
            "(unset REAPER_CONFIG, or drop --config)"
        )
    config = config if config is not None else also
    path = None if config is None else Path(config)
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} ({named_by}) does not exist")
    token = _CONFIG_FILE.set(path)
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, given)) from None
    except tomllib.TOMLDecodeError as exc:
        # Only where: tomllib's message may quote a character of the value (of a secret).
        where = re.search(r"\(at ([^)]*)\)$", str(exc))
        place = where.group(1) if where else "somewhere"
        raise ConfigError(f"config file {path} is not valid TOML (at {place})") from None
    except (OSError, ValueError) as exc:  # a malformed TOML file, for one
        raise ConfigError(f"invalid configuration: {type(exc).__name__}: {exc}") from None
    finally:
        _CONFIG_FILE.reset(token)


ENV_PREFIX = "REAPER_"
NOT_SETTINGS = frozenset({"REAPER_CONFIG"})
"""``REAPER_*`` variables read that are not settings: the config file's path."""


def refuse_unknown_variables(environ: Mapping[str, str]) -> None:
    """``ConfigError`` (78) for a ``REAPER_*`` variable that names no setting (checked by
    the commands that read the settings: not ``simulate`` or ``completion``).

    pydantic-settings reads the variables of the fields it knows and passes over the rest,
    so ``REAPER_DRYRUN=true`` ran for real and ``REAPER_PROTECTED_STATUS=PROCESSING``
    protected nothing, without a word, where the same typo in the config file is refused.
    The variables are matched as pydantic-settings matches them, in any case."""
    settings = {ENV_PREFIX + field.upper() for field in Settings.model_fields}
    unknown = sorted(
        name for name in environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in settings | NOT_SETTINGS
    )  # fmt: skip
    if not unknown:
        return
    said = []
    for name in unknown[:5]:
        close = difflib.get_close_matches(name.upper(), sorted(settings), n=1, cutoff=0.75)
        said.append(f"{name} (did you mean {close[0]}?)" if close else name)
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    verb = "is not a setting" if len(unknown) == 1 else "are not settings"
    raise ConfigError(
        f"{', '.join(said)}{more} {verb}: one spelt wrong would be left out without a word "
        "(spell it as docs/reference.md lists the settings, or unset it)"
    )


def refuse_empty_variables(environ: Mapping[str, str]) -> None:
    """``ConfigError`` (78) for a ``REAPER_*`` variable set to nothing (or white space).

    Most settings refused one already (``REAPER_DRY_RUN=``: "must be true or false"), but
    an empty list passed: ``REAPER_ALLOWED_PROJECTS=`` stood for "any project" over the
    config file's list, and a DELETE went to a project the file did not allow; and an
    empty ``REAPER_CONFIG`` named no file, so the team's file and its protection rules were
    left out. An empty value in a manifest is a placeholder, not a choice: unset it."""
    empty = sorted(
        name for name, value in environ.items()
        if name.upper().startswith(ENV_PREFIX) and not value.strip()
    )  # fmt: skip
    if empty:
        verb = "is set but empty" if len(empty) == 1 else "are set but empty"
        raise ConfigError(
            f"{', '.join(empty)} {verb}: give each a value or unset it (an empty value would "
            "quietly replace the config file's; an empty REAPER_CONFIG, name no file)"
        )


_IN_WORDS = {
    "rate": "must be a number of calls per second (more than 0, at most 10,000) or 'auto'",
}
"""Settings whose type is a union, where pydantic reports one failure per branch."""

_SECONDS = frozenset({
    "deadline", "connect_timeout", "read_timeout", "max_retry_after", "retry_base_delay",
    "grace", "recheck_max_age", "reclaim_after", "redis_timeout", "outcomes_max_age",
    "dead_max_age", "stats_interval",
})  # fmt: skip
"""Settings that are a number of seconds: their limits are said in seconds."""

_LIMITS = {
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("more than", "gt"),
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
}


def _number(value: object) -> str | None:
    """A number as people write it (``0``, not ``0.0``; ``10,000``), or None for anything
    that is not one: only a number given is ever repeated in a message, never other text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return str(value)  # inf, -inf, nan: a number as given, however spelt
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,}"


def _rule(field: str, error: Mapping[str, Any]) -> str:
    """What the value must be, in words, from pydantic's error type and its limits: a
    number's limit as people write it, in seconds for a duration, and the number given
    (``must be more than 0 seconds, not -5``)."""
    kind, ctx = error["type"], error.get("ctx") or {}
    given = _number(error.get("input"))
    but = "" if given is None else f", not {given}"
    if kind in _LIMITS:
        word, key = _LIMITS[kind]
        limit = _number(ctx.get(key))
        if limit is not None:
            unit = (" second" if limit == "1" else " seconds") if field in _SECONDS else ""
            return f"must be {word} {limit}{unit}{but}"
    if kind == "finite_number":
        return f"must be {_range(field)}{but}"
    words = {
        "too_short": "must not be empty",
        "string_too_short": "must not be empty",
        "int_parsing": f"must be a whole number{but}",
        "int_from_float": f"must be a whole number{but}",
        "float_parsing": "must be a number" + " of seconds" * (field in _SECONDS),
        "bool_parsing": "must be true or false",
        "literal_error": "must be one of {expected}",
    }
    if kind in words:
        try:
            return words[kind].format(**ctx)
        except KeyError:
            pass
    return str(error["msg"]).removeprefix("Value error, ")


def _range(field: str) -> str:
    """A number setting's range in the words of its limits: ``a finite number of seconds
    (more than 0, at most 300)``, ``a whole number (at least 1, at most 1,000)``; for an
    infinity or a NaN given, which its limits alone did not refuse (``--deadline inf``)."""
    limits = []
    for rule in Settings.model_fields[field].metadata:
        for word, key in _LIMITS.values():
            limit = _number(getattr(rule, key, None))
            if limit is not None:
                limits.append(f"{word} {limit}")
    annotation = Settings.model_fields[field].annotation
    kind = "a whole number" if int in (annotation, *get_args(annotation)) else "a finite number"
    unit = " of seconds" if field in _SECONDS else ""
    return f"{kind}{unit}" + (f" ({', '.join(limits)})" if limits else "")


def setting_name(field: str, *, flag: bool) -> str:
    """A setting named as the user gave it: ``--plan-key-file`` for a flag, else the setting
    with its variable, ``plan_key_file (REAPER_PLAN_KEY_FILE or the config file)``."""
    if flag:
        return "--" + field.replace("_", "-")
    if field in Settings.model_fields:
        return f"{field} (REAPER_{field.upper()} or the config file)"
    return field


def describe_validation_error(exc: ValidationError, given: Iterable[str] = ()) -> str:
    """One line per setting, naming it as it was given (``--rate`` for a flag, else the
    setting with its variable) and what it must be; of the value given, only a number out
    of its range is said (``--deadline must be more than 0 seconds, not -5``), never text,
    which may be a secret given in the wrong place."""
    flags = set(given)
    rules: dict[str, list[str]] = {}
    numbers: dict[str, str] = {}
    for error in exc.errors(include_url=False):  # an input is said only when a number
        field = str(error["loc"][0]) if error["loc"] else "settings"
        rules.setdefault(field, []).append(_rule(field, error))
        if (number := _number(error.get("input"))) is not None:
            numbers[field] = number
    lines = []
    for field, said in rules.items():
        rule = _IN_WORDS.get(field)
        if rule is not None and field in numbers:
            rule += f", not {numbers[field]}"
        lines.append(f"{setting_name(field, flag=field in flags)} "
                     f"{rule or '; '.join(dict.fromkeys(said))}")  # fmt: skip
    if len(lines) == 1:
        return lines[0]
    return "invalid settings:\n" + "\n".join(f"  {line}" for line in lines)
