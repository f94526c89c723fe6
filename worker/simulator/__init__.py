"""The built-in ModelArts DevServer jobs simulator: the API the demo, tests and benchmarks use.

It speaks the four DevServer job calls with ``SDK-HMAC-SHA256`` verification, a gateway-style
token-bucket quota (or a count over a fixed or sliding window: ``window_s``) with
``Retry-After``, seeded faults (5xx before or after the delete, dropped
connections, truncated bodies, latency), and test-only controls under ``/_sim/``.

    async with run_simulator(SimulatorConfig(jobs=300, quota=50, burst=10)) as sim:
        ...  # talk to sim.url; read sim.deleted, sim.stats
"""

from worker.simulator.app import SIMULATOR_KEY, build_app
from worker.simulator.config import FAULT_KINDS, FaultConfig, SimulatorConfig
from worker.simulator.faults import Fault
from worker.simulator.jobs import JOB_STATUSES, JOB_TYPES, JOBS_EPOCH_MS, Job
from worker.simulator.server import run_simulator
from worker.simulator.state import SimStats, Simulator

__all__ = [
    "FAULT_KINDS",
    "JOBS_EPOCH_MS",
    "JOB_STATUSES",
    "JOB_TYPES",
    "SIMULATOR_KEY",
    "Fault",
    "FaultConfig",
    "Job",
    "SimStats",
    "Simulator",
    "SimulatorConfig",
    "build_app",
    "run_simulator",
]
