"""Where signing keys come from. The client asks a ``CredentialSource`` before every attempt."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Credentials:
    """One set of keys. ``sk`` and ``security_token`` never show in ``repr``."""

    ak: str
    sk: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)
    expires_at: datetime | None = None


class CredentialSource(Protocol):
    """Hands out keys that are valid now; refreshes temporary ones before they expire."""

    @property
    def name(self) -> str:
        """Where the keys came from (``settings``, ``environment``, ``profile`` ...)."""
        ...

    async def current(self) -> Credentials: ...


class StaticCredentials:
    """Keys given once, in settings or the environment."""

    def __init__(self, credentials: Credentials, name: str = "settings") -> None:
        self._credentials = credentials
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def current(self) -> Credentials:
        return self._credentials

    def __repr__(self) -> str:
        return f"StaticCredentials(name={self._name!r}, ak={self._credentials.ak!r})"
