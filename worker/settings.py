"""Settings: flags over ``REAPER_*`` environment over a TOML config file over defaults.

This module sits at the edge with the command line; the pipeline stages never import it.
Secrets are ``SecretStr`` and never appear in ``repr``, logs or validation errors.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from worker.errors import ConfigError
from worker.types import PROJECT_ID_RE

MAX_BATCH_SIZE = 1000
DEFAULT_BATCH_SIZE = 50

REGIONS = (
    "cn-north-1", "cn-north-2", "cn-north-4", "cn-north-9", "cn-north-11", "cn-north-12",
    "cn-south-1", "cn-east-3", "cn-east-4", "cn-southwest-2", "cn-southwest-3",
    "ap-southeast-1", "ap-southeast-2", "ap-southeast-3", "ap-southeast-4",
    "la-south-2", "la-north-2", "af-south-1", "af-north-1", "tr-west-1", "me-east-1",
    "sa-brazil-1",
)  # fmt: skip


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


def _env(*names: str) -> Any:
    return AliasChoices(*names)


class Settings(BaseSettings):
    """Every setting of SPEC.md. Field names are the flag names with ``_`` for ``-``."""

    model_config = SettingsConfigDict(
        env_prefix="REAPER_",
        extra="forbid",
        hide_input_in_errors=True,
        populate_by_name=True,
        validate_default=True,
    )

    # -- where and who ------------------------------------------------------------------
    region: str | None = Field(default=None, validation_alias=_env("region", "REAPER_REGION", "HUAWEICLOUD_SDK_REGION"))
    endpoint: str | None = None
    project_id: str | None = Field(
        default=None,
        validation_alias=_env("project_id", "REAPER_PROJECT_ID", "HUAWEICLOUD_SDK_PROJECT_ID"),
    )
    ak: str | None = Field(default=None, validation_alias=_env("ak", "REAPER_AK", "HUAWEICLOUD_SDK_AK"))
    sk: SecretStr | None = Field(default=None, validation_alias=_env("sk", "REAPER_SK", "HUAWEICLOUD_SDK_SK"))
    security_token: SecretStr | None = Field(
        default=None,
        validation_alias=_env(
            "security_token", "REAPER_SECURITY_TOKEN", "HUAWEICLOUD_SDK_SECURITY_TOKEN"
        ),
    )
    ak_file: Path | None = None
    sk_file: Path | None = None
    security_token_file: Path | None = None
    ca_bundle: Path | None = None

    # -- how fast -----------------------------------------------------------------------
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=MAX_BATCH_SIZE)
    concurrency: int = Field(default=8, ge=1, le=256)
    rate: float = Field(default=10.0, gt=0, le=10_000)
    burst: int = Field(default=5, ge=1, le=10_000)
    max_attempts: int = Field(default=6, ge=1, le=50)
    deadline: float | None = Field(default=None, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0, le=300)
    read_timeout: float = Field(default=60.0, gt=0, le=600)
    max_retry_after: float = Field(default=60.0, gt=0, le=3600)
    grace: float = Field(default=20.0, ge=0, le=600)

    # -- run ------------------------------------------------------------------------------
    ledger: Path | None = None
    dry_run: bool = False
    yes: bool = False
    max_deletions: int | None = Field(default=None, ge=0)

    # -- serve / enqueue ------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream: str = Field(default="devserver-reaper:ids", min_length=1)
    group: str = Field(default="devserver-reaper", min_length=1)
    consumer: str = Field(default_factory=socket.gethostname, min_length=1)
    max_deliveries: int = Field(default=5, ge=1, le=1000)
    reclaim_after: float = Field(default=300.0, gt=0)
    http_port: int = Field(default=8080, ge=0, le=65535)

    # -- output ---------------------------------------------------------------------------
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("project_id")
    @classmethod
    def _project_id(cls, value: str | None) -> str | None:
        if value is not None and not PROJECT_ID_RE.fullmatch(value):
            raise ValueError("must be 1 to 64 letters, digits and hyphens")
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        if value is not None and not value.replace("-", "").isalnum():
            raise ValueError("must look like cn-north-4")
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as https://modelarts.cn-north-4.myhuaweicloud.com")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError("plain http:// is accepted only for loopback hosts; use https://")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or a fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _read_secret_files(self) -> Settings:
        for name in ("ak", "sk", "security_token"):
            path: Path | None = getattr(self, f"{name}_file")
            if path is None:
                continue
            try:
                text = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"{name}_file {path} cannot be read: {exc.strerror}") from None
            object.__setattr__(self, name, text if name == "ak" else SecretStr(text))
        return self

    @property
    def api_endpoint(self) -> str:
        """The endpoint in force; ``ConfigError`` when neither it nor a region is set."""
        if self.endpoint:
            return self.endpoint
        if self.region:
            return endpoint_for(self.region)
        raise ConfigError("set endpoint or region (REAPER_ENDPOINT / REAPER_REGION)")

    def require_api(self) -> None:
        """Check what a command that calls the API needs, naming what is missing."""
        missing = [
            flag
            for flag, value in (
                ("--project-id", self.project_id),
                ("--ak", self.ak),
                ("--sk", self.sk),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"missing settings: {', '.join(missing)}")
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
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("REAPER_CONFIG") or _CONFIG_FILE.get()
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)


class _ConfigFile:
    """The ``--config`` path, passed around the pydantic-settings source hook."""

    path: str | None = None

    def get(self) -> str | None:
        return self.path


_CONFIG_FILE = _ConfigFile()


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings, turning any validation error into a ``ConfigError`` with no input values.

    ``overrides`` are the flags the user gave (``None`` means "not given").
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        _CONFIG_FILE.path = str(path)
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    except (OSError, ValueError) as exc:  # a malformed TOML file, for one
        raise ConfigError(f"invalid configuration: {type(exc).__name__}: {exc}") from None
    finally:
        _CONFIG_FILE.path = None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per field, naming the field and the rule, never the value given."""
    lines = ["invalid settings:"]
    for error in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {message}")
    return "\n".join(lines)
