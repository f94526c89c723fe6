"""SIGTERM in the commands without a stop of their own to make (``check``, ``discover``,
``enqueue``, ``report``): each stops promptly with 75 and leaves nothing half-written
claimed whole, even where CPython dropped the exit the signal's handler raised.

The real command in a subprocess. A handler run while CPython folds a module's constants
(``2**31``, compiled in C) has what it raised dropped: here a module of them is compiled
just before a step of the command (after its import, where start-up no longer looks),
and the signal is sent as it begins; the command went on as if never stopped.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import REDIS_URL
from tests.e2e import reaped, reaper_env, signalled, until, write_ids
from tests.test_report import fill
from worker.simulator import SimulatorConfig, run_simulator

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("clean_env")]

_DROPPED_BEFORE = (
    "import ast, importlib, runpy, sys\n"
    "imported = importlib.import_module\n"
    "owner, name = sys.argv.pop(1).rsplit('.', 1)\n"
    "tree = ast.parse(('a = (' + '2 ** 31, ' * 50 + ')\\n') * 1_000)\n"
    "def command(module_name, *args, **kwargs):\n"
    "    module = imported(module_name, *args, **kwargs)\n"
    "    if module_name.startswith('worker.commands.'):\n"
    "        holder = module\n"
    "        for part in filter(None, owner.split('.')):\n"
    "            holder = getattr(holder, part)\n"
    "        step = getattr(holder, name)\n"
    "        def late(*args, **kwargs):\n"
    "            sys.stderr.write('compiling\\n'); sys.stderr.flush()\n"
    "            compile(tree, '<folded>', 'exec')\n"
    "            return step(*args, **kwargs)\n"
    "        setattr(holder, name, late)\n"
    "    return module\n"
    "importlib.import_module = command\n"
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n"
)
"""``python -m worker ARGS`` whose command's ``STEP`` (the first argument: ``.anyio.run``,
the command module's ``anyio.run``) begins by compiling a module of constants to fold, after
saying ``compiling`` on stderr."""


async def _stopped_at(step: str, args: Sequence[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run the command, SIGTERM it as ``step`` begins; its exit code, stdout and stderr."""
    command = [sys.executable, "-c", _DROPPED_BEFORE, step, *args]
    return await _sigterm_on(b"compiling", command, env)


async def _sigterm_on(
    word: bytes, command: Sequence[str], env: dict[str, str]
) -> tuple[int, str, str]:
    """Run ``command``, SIGTERM it once it says ``word`` on stderr; its exit code, stdout
    and stderr."""
    return await signalled(command, env, [(word, signal.SIGTERM)])


async def test_check_stops_on_a_sigterm_whose_exit_was_dropped() -> None:
    """The check went on to its call and printed ``result OK`` (exit 0)."""
    async with run_simulator(SimulatorConfig(jobs=2)) as sim:
        code, out, err = await _stopped_at(".anyio.run", ["check"], reaper_env(sim.url))
        assert sim.stats.list_calls == 0
    assert code == 75, out + err
    assert "result" not in out and "Traceback" not in err


async def test_discover_stops_on_a_sigterm_whose_exit_was_dropped(tmp_path: Path) -> None:
    """discover listed the project and wrote its plan (exit 0): now no plan, nor a part."""
    plan = tmp_path / "plan.txt"
    async with run_simulator(SimulatorConfig(jobs=20)) as sim:
        args = ["discover", "--all", "--plan", str(plan)]
        code, out, err = await _stopped_at(".anyio.run", args, reaper_env(sim.url))
    assert code == 75, out + err
    assert list(tmp_path.iterdir()) == [] and "Traceback" not in err


async def test_enqueue_stops_on_a_sigterm_whose_exit_was_dropped(
    tmp_path: Path, redis_prefix: str, redis_client: Any
) -> None:
    """enqueue added every id (exit 0); now none (its summary, if it began, says 0)."""
    stream = f"{redis_prefix}ids"
    ids = write_ids(tmp_path / "ids.txt", [f"job-{n}" for n in range(50)])
    args = ["enqueue", "--input", str(ids), "--redis-url", REDIS_URL, "--stream", stream]
    code, out, err = await _stopped_at(".anyio.run", args, reaper_env("http://127.0.0.1:9"))
    assert code == 75, out + err
    assert await redis_client.xlen(stream) == 0
    assert '"enqueued":0' in out or out == "", out  # said, or nothing begun
    assert "Traceback" not in err


async def test_report_stops_on_a_sigterm_whose_exit_was_dropped(tmp_path: Path) -> None:
    """report wrote its whole export (exit 0); now it stops at its first row and removes
    the file it began."""
    ledger = tmp_path / "ledger.db"
    fill(ledger).close()
    export = tmp_path / "export.csv"
    args = ["report", "--ledger", str(ledger), "--format", "csv", "--output", str(export)]
    code, out, err = await _stopped_at(".open_readonly", args, reaper_env("http://127.0.0.1:9"))
    assert code == 75, out + err
    assert not export.exists() and "Traceback" not in err


_NO_PROGRESS = (
    "import runpy, sys\n"
    "from worker.batchsize import BatchSize\n"
    "piece, pieces = BatchSize.piece, []\n"
    "def counted(self, ids):\n"
    "    pieces.append(ids)\n"
    "    if len(pieces) == 2:\n"
    "        sys.stderr.write('spinning\\n'); sys.stderr.flush()\n"
    "    return piece(self, ids)\n"
    "BatchSize.cap = property(lambda self: 0)\n"
    "BatchSize.piece = counted\n"
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n"
)
"""``python -m worker ARGS`` whose learnt batch limit is 0 ids a call (as a ledger's row
edited past sense gave before 6063c5c): each piece of a batch is empty, and its split goes
round and round, sending nothing. ``spinning`` on stderr once it goes round."""


async def test_a_run_that_goes_round_without_progress_still_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    """A dispatcher loop that sends nothing and awaits nothing (a batch split into pieces
    of 0 ids) kept the event loop busy: SIGTERM was never heard, and the run spun until
    ``kill -9``. A stop wins now: 75 once the grace is over, every id open, nothing sent."""
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        command = [sys.executable, "-c", _NO_PROGRESS, "run", "--input", str(ids), "--yes",
                   "--grace", "1", "--ledger", str(tmp_path / "ledger.db")]  # fmt: skip
        code, out, err = await _sigterm_on(b"spinning", command, reaper_env(sim.url))
        assert sim.stats.delete_calls == 0 and len(sim.job_ids()) == 5
    assert code == 75, (out + err)[-2000:]
    assert '"open":5' in out, out[-2000:]


_FINALIZING = (
    "import gc, os, runpy, sys\n"
    "class Last:\n"
    "    def __del__(self):\n"
    "        os.write(2, b'finalizing\\n')\n"
    "        os.read(0, 1)\n"
    "freeze = gc.freeze\n"
    "def frozen():\n"  # a module of its own, made once the command's are frozen: emptied last
    "    freeze()\n"
    "    sys.modules['last'] = type(sys)('last')\n"
    "    sys.modules['last'].last = Last()\n"
    "gc.freeze = frozen\n"
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n"
)
"""``python -m worker ARGS`` that, as the interpreter ends (the command done, its modules
emptied, the system's signal handlers back), says ``finalizing`` on stderr and reads its
stdin until it closes."""


async def test_enqueue_stopped_again_as_the_interpreter_ends_exits_75(
    redis_prefix: str, redis_client: Any
) -> None:
    """A SIGTERM heard by enqueue's loop, then a Ctrl-C as the interpreter ends: 75, not
    killed by SIGINT (-2). The interpreter puts the system's handlers back as it ends: in
    tmux, 6 of 8 enqueues stopped twice by hand died so, after their summary and stop line,
    and the shell read it as a Ctrl-C (the line after them in the script not run)."""
    stream = f"{redis_prefix}ids"
    args = ["enqueue", "--input", "-", "--redis-url", REDIS_URL, "--stream", stream]
    command = [sys.executable, "-c", _FINALIZING, *args]
    process = await anyio.open_process(command, env=reaper_env("http://127.0.0.1:9"))
    async with reaped(process):
        assert process.stdin is not None and process.stderr is not None
        await process.stdin.send("".join(f"job-{n}\n" for n in range(600)).encode())

        async def added() -> bool:
            return bool(await redis_client.xlen(stream) == 500)

        await until(added)
        process.send_signal(signal.SIGTERM)
        err = b""
        with anyio.fail_after(60):  # a hang's guard, not a measure
            while b"finalizing" not in err:
                err += await process.stderr.receive()
            process.send_signal(signal.SIGINT)
            await process.stdin.aclose()  # the read ends: on its way back the SIGINT lands
            err += b"".join([chunk async for chunk in process.stderr])
            code = await process.wait()
    assert code == 75, err.decode()[-2000:]
    assert b"stopped by SIGTERM" in err and b"Traceback" not in err, err.decode()[-2000:]


async def test_enqueue_stopped_while_its_input_is_slow_to_come_says_what_it_added(
    redis_prefix: str, redis_client: Any
) -> None:
    """600 ids on a pipe left open: the first 500 (a chunk) go on the stream, and the
    reading thread waits for the rest. SIGTERM then: 75, the summary counts the 500, and
    no traceback (closing the entries under the thread raised "generator already
    executing", exit 1)."""
    stream = f"{redis_prefix}ids"
    args = ["enqueue", "--input", "-", "--redis-url", REDIS_URL, "--stream", stream]
    command = [sys.executable, "-m", "worker", *args]
    process = await anyio.open_process(command, env=reaper_env("http://127.0.0.1:9"))
    async with reaped(process):
        assert process.stdin is not None and process.stdout is not None
        lines = "".join(f"job-{n}\n" for n in range(600))
        await process.stdin.send(lines.encode())

        async def added() -> bool:
            return bool(await redis_client.xlen(stream) == 500)

        await until(added)
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(60):  # a hang's guard, not a measure
            out = b"".join([chunk async for chunk in process.stdout])
            code = await process.wait()
        assert process.stderr is not None
        err = b"".join([chunk async for chunk in process.stderr]).decode()
    assert code == 75, err[-2000:]
    assert '"enqueued":500' in out.decode() and "Traceback" not in err, err[-2000:]
    assert f"stopped by SIGTERM: 500 ids are on the stream {stream}" in err
    assert await redis_client.xlen(stream) == 500


_CLOSING = (
    "import runpy, sys\n"
    "import worker.commands.run as run\n"
    "whole = run.run_async\n"
    "async def closing(*args, **kwargs):\n"
    "    code = await whole(*args, **kwargs)\n"
    "    sys.stderr.write('closing\\n'); sys.stderr.flush()\n"
    "    sys.stdin.read()\n"
    "    return code\n"
    "run.run_async = closing\n"
    "runpy.run_module('worker', run_name='__main__', alter_sys=True)\n"
)
"""``python -m worker run ARGS`` that, once the run has said its summary and its loop's
signal watch has ended, says ``closing`` on stderr and waits on stdin: the last stretch."""


async def test_a_run_stopped_after_its_summary_exits_75_saying_so_not_143(tmp_path: Path) -> None:
    """SIGTERM after the dispatch and the summary, as the run closes: the signal watch of its
    loop was gone and the system's handler back, so the signal killed it (143, no word).
    Now 75 and a line saying the summary stands; every id deleted and in the ledger."""
    ledger = tmp_path / "ledger.db"
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        command = [sys.executable, "-c", _CLOSING, "run", "--input", str(ids), "--yes",
                   "--ledger", str(ledger)]  # fmt: skip
        code, out, err = await _sigterm_on(b"closing", command, reaper_env(sim.url))
        assert sim.job_ids() == []
    assert code == 75, (out + err)[-2000:]
    assert '"deleted":5' in out and '"open":0' in out, out[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err[-2000:]


async def test_a_run_stopped_again_and_again_after_its_summary_says_it_once(
    tmp_path: Path,
) -> None:
    """A SIGTERM after the summary, then 301 more of SIGTERM, Ctrl-C and SIGHUP as it ends
    (a supervisor or a person that insists): one line and 75. Each used to raise again
    where the first one's exit was unwinding: a line for each, "Exception ignored in:
    <module 'threading'>" or the loop's ``__del__`` with a traceback, or the process killed
    by SIGINT (-2) once the interpreter had put the system's handlers back."""
    ledger = tmp_path / "ledger.db"
    insisting = [(b"", signal.SIGTERM), (b"", signal.SIGINT), (b"", signal.SIGHUP)] * 100
    async with run_simulator(SimulatorConfig(jobs=5)) as sim:
        ids = write_ids(tmp_path / "ids.txt", sim.job_ids())
        command = [sys.executable, "-c", _CLOSING, "run", "--input", str(ids), "--yes",
                   "--ledger", str(ledger)]  # fmt: skip
        steps = [(b"closing", signal.SIGTERM), (b"as it closed", signal.SIGTERM), *insisting]
        code, out, err = await signalled(command, reaper_env(sim.url), steps)
    assert code == 75, (out + err)[-2000:]
    assert '"deleted":5' in out and '"open":0' in out, out[-2000:]
    assert err.count("stopped by") == 1, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]


async def test_a_run_s_chunk_handed_over_as_the_loop_closes_leaves_no_coroutine_unawaited(
    tmp_path: Path,
) -> None:
    """The input thread ``run`` shares with ``enqueue`` (``pipeline.read_in_background``):
    its second chunk read only as the loop closes after a SIGTERM. The hand-over made a
    coroutine the closed loop never ran ("RuntimeWarning: coroutine ... was never awaited",
    an error under ``-W error::RuntimeWarning``); now 75 and no warning."""
    from tests.test_enqueue import _HANDED_OVER_AS_THE_LOOP_CLOSES

    many = [f"00000000-0000-4000-8000-{n:012d}" for n in range(4500)]  # 2,000 a chunk
    async with run_simulator(SimulatorConfig(jobs=0)) as sim:
        ids = write_ids(tmp_path / "ids.txt", many)
        command = [sys.executable, "-W", "error::RuntimeWarning", "-c",
                   _HANDED_OVER_AS_THE_LOOP_CLOSES, "run", "--input", str(ids), "--yes",
                   "--grace", "1"]  # fmt: skip
        code, out, err = await _sigterm_on(b"reading", command, reaper_env(sim.url))
    assert code == 75, (out + err)[-2000:]
    assert "never awaited" not in err and "RuntimeWarning" not in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
