"""``devserver-reaper simulate``: serve the built-in simulator until SIGTERM or SIGINT.

Prints one ready line (scripts and tests wait for it) and never the secret key.
"""

from __future__ import annotations

import argparse
import signal
import sys

import anyio

from worker.exit_codes import ExitCode
from worker.settings import Settings
from worker.simulator import FaultConfig, Simulator, SimulatorConfig, run_simulator


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The simulator the flags describe; ``ValueError`` when they make no sense."""
    return SimulatorConfig(
        project_id=args.project_id,
        ak=args.ak,
        sk=args.sk,
        jobs=args.jobs,
        seed=args.seed,
        quota=args.quota,
        burst=args.burst,
        retry_after=args.retry_after,
        max_batch=args.max_batch,
        faults=FaultConfig.spread(args.fault_rate, latency_ms=args.latency_ms),
        unknown_path=args.unknown_path,
    )


def ready_line(sim: Simulator) -> str:
    return f"simulator listening on {sim.url} project={sim.config.project_id} ak={sim.config.ak}"


async def serve(config: SimulatorConfig, host: str, port: int, ids_file: str | None) -> None:
    """Serve until a signal; the ids file is written before the ready line is printed."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with run_simulator(config, host, port) as sim:
            if ids_file:
                lines = "".join(f"{job_id}\n" for job_id in sim.job_ids())
                await anyio.Path(ids_file).write_text(lines)
            print(ready_line(sim), flush=True)
            async for _ in signals:
                break
            stats = sim.stats
            print(
                f"simulator stopped: calls={stats.calls} deleted={len(sim.deleted)} "
                f"throttled={stats.throttled} max_in_flight={stats.max_in_flight}",
                file=sys.stderr,
                flush=True,
            )


def main(args: argparse.Namespace, settings: Settings) -> int:
    del settings  # the simulator is configured by its own flags only
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
