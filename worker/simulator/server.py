"""Run a simulator on a real socket for the length of an ``async with`` block."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web

from worker.simulator.app import build_app
from worker.simulator.config import SimulatorConfig
from worker.simulator.state import Simulator

SHUTDOWN_TIMEOUT_S = 1.0
"""Calls still in flight (a latency sleep) get this long when the block ends."""


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@asynccontextmanager
async def run_simulator(
    config: SimulatorConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    clock: Callable[[], float] | None = None,
    wall: Callable[[], float] | None = None,
) -> AsyncIterator[Simulator]:
    """Serve a fresh simulator on ``host:port`` (0 = a free port); ``sim.url`` says where."""
    kwargs = {}
    if clock is not None:
        kwargs["clock"] = clock
    if wall is not None:
        kwargs["wall"] = wall
    sim = Simulator(config, **kwargs)
    runner = web.AppRunner(
        build_app(sim),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        server = site._server
        sockets: list[socket.socket] = list(getattr(server, "sockets", None) or ())
        bound_port = sockets[0].getsockname()[1] if sockets else port
        sim.url = _url(host, bound_port)
        yield sim
    finally:
        await runner.cleanup()
