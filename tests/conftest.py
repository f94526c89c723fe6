"""Shared fixtures: the anyio backend, a private HOME, and real Redis."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

IN_CI = os.environ.get("CI", "").lower() == "true"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

PYCACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "pycache"
"""Where the suite's processes keep their bytecode (``PYTHONPYCACHEPREFIX``), as the image
keeps its compiled ``.pyc`` files (``UV_COMPILE_BYTECODE``). Where ``PYTHONDONTWRITEBYTECODE``
is set and nothing is compiled, every ``python -m worker`` a test starts compiled each module
it imports from source: about 0.5 s of CPU of a run's 1.3 s, the environment's cost and not
the product's, paid by hundreds of children. Set here, on import, so that pytest-xdist's
workers and every child inherit it; the first process to import a module writes it."""

os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
sys.dont_write_bytecode = False
sys.pycache_prefix = str(PYCACHE)

# CI runs each property test on the same examples every time, with no deadline: a run on a
# loaded machine must not fail on a new random draw or on a slow example. Developers keep
# the random draws (and the example database) that find new counterexamples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if IN_CI:
    settings.load_profile("ci")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The ``slow`` tests (real processes that run for many seconds) first, each group in
    its own order: pytest-xdist's worksteal hands each worker a contiguous share and lets
    an idle one take the tail of another's, so a long test left to the end is run alone
    while the other worker waits (the order is the same in every worker, as xdist needs)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True, scope="session")
def _private_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The official SDK writes ~/.huaweicloud on import: keep it out of the real home."""
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    yield
    if old is not None:
        os.environ["HOME"] = old


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No REAPER_* or HUAWEICLOUD_* variable of the developer's leaks into a test."""
    for name in list(os.environ):
        if name.startswith(("REAPER_", "HUAWEICLOUD_", "HC_CONTAINER_")):
            monkeypatch.delenv(name)


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own on the real Redis; every key under it is removed after.

    Under CI=true a Redis that does not answer fails the test; elsewhere it skips.
    """
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        if IN_CI:
            pytest.fail(f"Redis at {REDIS_URL} is required under CI=true: {exc}")
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    prefix = f"reaper-test:{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
async def redis_client(redis_prefix: str) -> AsyncIterator[Any]:
    """A client of the test Redis (after ``redis_prefix`` checked it answers), closed after."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()
