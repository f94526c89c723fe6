"""``devserver-reaper simulate``: serve the built-in simulator until SIGTERM or SIGINT.

Prints one ready line first (scripts and tests wait for it), then a block to paste into a
shell that points every command at it. The simulator is a local fake: the key it accepts is
not a secret, so it is printed; nothing else in the tool ever prints a secret key.
"""

from __future__ import annotations

import argparse
import sys

import anyio

from worker import stops
from worker.exit_codes import ExitCode
from worker.simulator import FaultConfig, Simulator, SimulatorConfig, run_simulator

DEMO_SK = SimulatorConfig().sk
"""The key the simulator accepts unless told another: a fake's, not a secret."""


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The simulator the flags describe; ``ValueError`` when they make no sense."""
    if args.window_kind is not None and args.window == 0:
        # Else dropped without a word: a token bucket served where a count was asked for.
        raise ValueError(
            "--window-kind counts over a --window: give --window SECONDS too (without it "
            "the quota is a token bucket's)"
        )
    return SimulatorConfig(
        project_id=args.project_id,
        ak=args.ak,
        sk=args.sk,
        jobs=args.jobs,
        seed=args.seed,
        quota=args.quota,
        burst=args.burst,
        window_s=args.window,
        window_kind=args.window_kind or "fixed",
        retry_after=args.retry_after,
        max_batch=args.max_batch,
        faults=FaultConfig.spread(args.fault_rate, latency_ms=args.latency_ms),
        unknown_path=args.unknown_path,
        region=args.region,
        iam_projects=tuple(_named(pair) for pair in args.iam_project),
        iam_forbidden=args.iam_forbidden,
        forbidden=args.forbidden,
    )


def _named(pair: str) -> tuple[str, str]:
    """``--iam-project NAME=ID`` as (name, id)."""
    name, sep, project_id = pair.partition("=")
    if not sep or not name.strip() or not project_id.strip():
        raise ValueError(f"--iam-project {pair!r}: give NAME=ID, e.g. cn-south-1=0a1b2c")
    return name.strip(), project_id.strip()


def ready_line(sim: Simulator) -> str:
    return f"simulator listening on {sim.url} project={sim.config.project_id} ak={sim.config.ak}"


def export_block(sim: Simulator) -> str:
    """Settings that point every command at ``sim``, ready to paste into a shell."""
    import shlex

    config = sim.config
    # The built-in key is a fake's, printed; a key given with --sk is the user's own choice,
    # and (as everywhere else) never printed back.
    sk = config.sk if config.sk == DEMO_SK else "<the --sk you gave>"
    pairs = {"REAPER_ENDPOINT": sim.url, "REAPER_PROJECT_ID": config.project_id,
             "REAPER_AK": config.ak, "REAPER_SK": sk}  # fmt: skip
    exports = " ".join(f"{name}={shlex.quote(value)}" for name, value in pairs.items())
    return (
        "# a local fake: its key is not a secret. To point every command at it, paste:\n"
        f"export {exports}\n"
        f"# or, to have the project id looked up in its IAM by region: unset REAPER_PROJECT_ID; "
        f"export REAPER_REGION={shlex.quote(config.region)} "
        f"REAPER_IAM_ENDPOINT={shlex.quote(sim.url)}\n"
        "# then: devserver-reaper check; devserver-reaper discover --status FINISHED --plan "
        "plan.txt; devserver-reaper run --plan plan.txt --dry-run"
    )


async def serve(config: SimulatorConfig, host: str, port: int, ids_file: str | None) -> None:
    """Serve until a signal; the ids file is written before the ready line is printed."""
    with stops.receiving() as signals:
        async with run_simulator(config, host, port) as sim:
            if ids_file:
                lines = "".join(f"{job_id}\n" for job_id in sim.job_ids())
                await anyio.Path(ids_file).write_text(lines)
            print(ready_line(sim), flush=True)
            print(export_block(sim), flush=True)
            async for _ in signals:
                break
            stats = sim.stats
            print(
                f"simulator stopped: calls={stats.calls} deleted={len(sim.deleted)} "
                f"throttled={stats.throttled} max_in_flight={stats.max_in_flight}",
                file=sys.stderr,
                flush=True,
            )


def main(args: argparse.Namespace) -> int:
    """The simulator is configured by its own flags only: it takes no settings."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"devserver-reaper simulate: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        anyio.run(serve, config, args.host, args.port, args.ids_file)
    except OSError as exc:
        # Address in use, host not local, ids file not writable: the set-up is wrong.
        print(f"devserver-reaper simulate: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.CONFIG
    return ExitCode.OK
