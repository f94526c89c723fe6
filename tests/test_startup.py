"""What a command imports at start-up, and the bytecode the suite's children start from.

Names of modules, never times: a light command must not bring a heavy package back (each
costs tens of milliseconds of CPU on every start; tests/benchmarks/bench_startup.py measures
them), and that is seen in ``sys.modules`` of the real command in a child process.
"""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

import worker
from tests.conftest import PYCACHE, REDIS_URL
from tests.e2e import reaped, reaper_env, write_ids
from tests.test_plan import write as write_plan
from tests.test_report import fill


def test_children_of_the_suite_read_and_write_compiled_bytecode() -> None:
    """A ``python -m worker`` a test starts finds each module compiled by the first process
    that imported it, in the suite's one cache, instead of compiling it from source."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys, worker.cli; "
         "print(sys.flags.dont_write_bytecode, sys.pycache_prefix)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.split() == ["0", str(PYCACHE)]
    package = Path(worker.__file__).resolve().parent
    compiled = PYCACHE / package.relative_to(package.anchor)
    assert list(compiled.glob("cli.*.pyc")), f"no bytecode of worker.cli under {compiled}"


_MODULES_AT_EXIT = (
    "import atexit, runpy, sys\n"
    "path = sys.argv.pop(1)\n"
    "def said():\n"
    "    with open(path, 'w') as out:\n"
    "        out.write('\\n'.join(n for n, m in sys.modules.items() if m is not None))\n"
    "atexit.register(said)\n"
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n"
)
"""``python -m worker ARGS`` that writes the modules it imported to a file at its exit."""

HEAVY = ("pydantic", "pydantic_settings", "structlog", "rich", "pygments", "aiohttp", "anyio",
         "redis", "prometheus_client", "orjson", "worker.settings", "worker.simulator")  # fmt: skip
"""Packages that cost tens of milliseconds of CPU each to import."""


def imported(
    modules: Path, *args: str, env: dict[str, str] | None = None, code: int = 0
) -> set[str]:
    """The packages of ``HEAVY`` the command ``args`` imported, run to its end (exit ``code``)."""
    done = subprocess.run(
        [sys.executable, "-c", _MODULES_AT_EXIT, str(modules), *args],
        capture_output=True, text=True, check=False, env=env, timeout=60,
    )  # fmt: skip
    assert modules.exists(), done.stderr[-2000:]
    assert done.returncode == code, done.stderr[-2000:]  # the command did its work
    return heavy(modules.read_text().split())


def heavy(modules: list[str]) -> set[str]:
    return {h for h in HEAVY for m in modules if m == h or m.startswith(h + ".")}


@pytest.mark.parametrize(
    "args",
    [["--help"], ["run", "--help"], ["serve", "--help"], ["completion", "bash"],
     ["run", "--inptu", "ids.txt"], ["serve", "--batch-size", "many"], ["frobnicate"]],
    ids=["help", "run-help", "serve-help", "completion", "mistyped-flag", "bad-value",
         "unknown-command"],
)  # fmt: skip
def test_help_and_completion_import_nothing_heavy(args: list[str], tmp_path: Path) -> None:
    """Help, the completion script and a usage error (64) are the parser's alone: no
    settings (pydantic), no logging, no HTTP. ``completion`` loaded the settings it never
    reads (0.15 s of CPU)."""
    code = 0 if "--help" in args or "completion" in args else 64
    assert imported(tmp_path / "modules", *args, code=code) == set()


def test_a_run_logs_without_rich_and_touches_no_queue(tmp_path: Path) -> None:
    """A run that writes events imports structlog, which imported rich and pygments for
    tracebacks we never draw (50 ms of CPU): rich comes only with a display. No Redis,
    metrics or simulator either."""
    ids = write_ids(tmp_path / "ids.txt", ["a1b2c3d4-0000-4000-8000-000000000001"])
    env = reaper_env("http://127.0.0.1:9")  # a dry run of --input calls nothing
    found = imported(tmp_path / "modules", "run", "--dry-run", "--input", str(ids),
                     "--events", str(tmp_path / "events.jsonl"), env=env)  # fmt: skip
    assert "structlog" in found  # it did log
    assert found & {"rich", "pygments", "redis", "prometheus_client", "worker.simulator"} == set()


@pytest.mark.parametrize("command", ["plan", "report"])
def test_a_command_reading_a_file_imports_neither_logging_nor_http(
    command: str, tmp_path: Path
) -> None:
    """``plan show`` and ``report`` read a plan or a ledger and call nothing. ``plan show``
    imported structlog (and rich and pygments with it, past the command's import) and
    aiohttp with discover's listing, 0.15 s of CPU of its 0.3 s; ``report`` imported
    structlog for a type of the journal's (``EventLog``)."""
    read = tmp_path / command
    if command == "plan":
        write_plan(read, 3, now=datetime.now(UTC))
        args = ["plan", "show", str(read)]
    else:
        fill(read).close()
        args = ["report", str(read)]
    found = imported(tmp_path / "modules", *args, env=reaper_env("http://127.0.0.1:9"))
    assert found & {"aiohttp", "structlog", "rich", "pygments", "redis"} == set()


_COLLECTOR_AT_EXIT = (
    "import atexit, gc, runpy, sys\n"
    "path = sys.argv.pop(1)\n"
    "def said():\n"
    "    with open(path, 'w') as out:\n"
    "        out.write(repr((gc.isenabled(), gc.get_freeze_count(),\n"
    "                        [each['collections'] for each in gc.get_stats()])))\n"
    "atexit.register(said)\n"
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n"
)
"""``python -m worker ARGS`` that writes, at its exit, whether the garbage collector is on,
how many objects it set aside (``gc.freeze``) and its collections of each generation."""


@pytest.mark.parametrize(
    "args",
    [["run", "--dry-run", "--input", "IDS", "--events", "EVENTS"], ["completion", "bash"]],
    ids=["dry-run", "completion"],
)
def test_a_command_starts_without_collecting_its_modules(args: list[str], tmp_path: Path) -> None:
    """The objects a command's modules make (some 60,000 for a run) live to its exit: the
    collector is off while they come and sets them aside once they are in, on for the
    command's work. Collected as they came they set off a collection of everything and
    ~140 others, 25 ms of a quiet run's 0.3 s of CPU and 0.1 s under load."""
    ids = write_ids(tmp_path / "ids.txt", ["a1b2c3d4-0000-4000-8000-000000000001"])
    named = {"IDS": str(ids), "EVENTS": str(tmp_path / "events.jsonl")}
    said = tmp_path / "collector"
    done = subprocess.run(
        [sys.executable, "-c", _COLLECTOR_AT_EXIT, str(said), *(named.get(a, a) for a in args)],
        capture_output=True, text=True, check=False, env=reaper_env("http://127.0.0.1:9"),
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    enabled, frozen, (_, _, of_everything) = ast.literal_eval(said.read_text())
    assert enabled  # on for the command's work
    assert frozen >= 10_000  # the modules' objects, set aside
    assert of_everything == 0


@pytest.mark.anyio
async def test_enqueue_imports_no_http(tmp_path: Path, redis_prefix: str) -> None:
    """``enqueue`` puts ids on a Redis Stream and calls no API: it imported aiohttp (0.15 s of
    CPU of its start) with ``worker.wiring``, where its Redis client was made."""
    ids = write_ids(tmp_path / "ids.txt", ["a1b2c3d4-0000-4000-8000-000000000001"])
    found = imported(tmp_path / "modules", "enqueue", "--input", str(ids), "--redis-url",
                     REDIS_URL, "--stream", f"{redis_prefix}ids",
                     env=reaper_env("http://127.0.0.1:9"))  # fmt: skip
    assert "redis" in found  # it did enqueue
    assert found & {"aiohttp", "rich", "pygments", "prometheus_client", "worker.simulator"} == set()


@pytest.mark.anyio
async def test_serve_imports_no_display_and_no_simulator(tmp_path: Path, redis_prefix: str) -> None:
    """``serve`` logs JSON and serves metrics: neither rich (through structlog) nor the
    simulator, which a command it does not run once pulled in."""
    modules = tmp_path / "modules"
    env = reaper_env("http://127.0.0.1:9")
    command = [sys.executable, "-c", _MODULES_AT_EXIT, str(modules), "serve",
               "--redis-url", REDIS_URL, "--stream", f"{redis_prefix}ids",
               "--http-port", "0"]  # fmt: skip
    process = await anyio.open_process(command, env=env, stderr=subprocess.DEVNULL)
    async with reaped(process):
        assert process.stdout is not None
        lines = TextReceiveStream(process.stdout)
        seen = ""
        with anyio.fail_after(30):
            while '"serve.started"' not in seen:
                seen += await lines.receive()
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            await process.wait()
    found = heavy(modules.read_text().split())
    assert {"redis", "aiohttp", "prometheus_client"} <= found  # it did start
    assert found & {"rich", "pygments", "worker.simulator"} == set()


_FOLDED_AS_SIGTERM_COMES = (
    "import ast, importlib, runpy, sys\n"
    "imported = importlib.import_module\n"
    "tree = ast.parse(('a = (' + '2 ** 31, ' * 50 + ')\\n') * 1_000)\n"
    "def command(name, *args):\n"
    "    module = imported(name, *args)\n"
    "    print('compiling', flush=True)\n"
    "    compile(tree, '<folded>', 'exec')\n"
    "    return module\n"
    "importlib.import_module = command\n"
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n"
)
"""``python -m worker ARGS`` whose command's import ends by compiling a module of constants to
fold (``2 ** 31``, as ``worker/simulator/app.py`` has; a module without its ``.pyc`` is
compiled at each start), after saying ``compiling``: a signal handled while CPython folds
them, in C, has what it raised dropped (only a KeyboardInterrupt is kept there)."""


@pytest.mark.anyio
async def test_a_sigterm_whose_exit_cpython_dropped_while_compiling_still_stops(
    tmp_path: Path,
) -> None:
    """SIGTERM while a command's modules are compiled (no ``.pyc``: PYTHONDONTWRITEBYTECODE,
    the first start): the handler's SystemExit was dropped by the constant folding, and the
    command ran as if never stopped (``completion`` printed its script and exited 0;
    ``simulate`` served until a second signal, ``run`` went on). It exits 75 now."""
    command = [sys.executable, "-c", _FOLDED_AS_SIGTERM_COMES, "completion", "bash"]
    process = await anyio.open_process(command, stderr=subprocess.DEVNULL)
    async with reaped(process):
        assert process.stdout is not None
        with anyio.fail_after(30):
            said = await process.stdout.receive()
            assert said.startswith(b"compiling"), said
            process.send_signal(signal.SIGTERM)
            rest = b"".join([chunk async for chunk in process.stdout])
            assert await process.wait() == 75, (said + rest)[-300:]
    assert b"complete" not in rest  # no completion script
