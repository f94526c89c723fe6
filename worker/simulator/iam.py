"""IAM's project list (KeystoneListProjects), as the simulator answers it.

``GET /v3/projects?name={region}`` is how a client with keys but no project id finds the
project of a region (the official SDK, and ``worker.api.projects``). The simulator knows
its own project under its ``region``, and any more ``iam_projects`` it is told of (a name
given twice is two projects of that name). The call is signed like every other, with the
same keys, but it is another service: it takes no token of the jobs API's quota and is
counted in ``iam_calls``, not ``calls``. ``iam_forbidden`` answers 403, as IAM does for an
IAM user whose policies do not allow ``iam:projects:listProjects``.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from worker.simulator.state import Simulator

PROJECTS_PATH = "/v3/projects"
DOMAIN_ID = "0d3c5a7e9b1f4e2a8c6d4b2f0e8a6c4d"
"""The account the simulated projects belong to (IAM's ``domain_id``)."""


def _answer(sim: Simulator, status: int, payload: Any) -> web.Response:
    trace = sim.next_request_id()
    return web.Response(
        status=status,
        body=orjson.dumps(payload),
        content_type="application/json",
        charset="utf-8",
        headers={"X-IAM-Trace-Id": trace, "X-Request-Id": trace},
    )


def _project(sim: Simulator, name: str, project_id: str) -> dict[str, Any]:
    return {
        "domain_id": DOMAIN_ID,
        "is_domain": False,
        "parent_id": DOMAIN_ID,
        "name": name,
        "description": "",
        "links": {"self": f"{sim.url}{PROJECTS_PATH}/{project_id}"},
        "id": project_id,
        "enabled": True,
    }


def known_projects(sim: Simulator) -> list[tuple[str, str]]:
    """(name, id) of every project IAM knows: the simulator's own first."""
    config = sim.config
    return [(config.region, config.project_id), *config.iam_projects]


async def list_projects(request: web.Request) -> web.Response:
    """``GET /v3/projects[?name=...]``: the signature first (401), then the permission (403)."""
    from worker.simulator.app import SIMULATOR_KEY

    sim = request.app[SIMULATOR_KEY]
    sim.stats.iam_calls += 1
    body = await request.read()
    reason = sim.signature_refused(request.method, request.raw_path, request.headers, body)
    if reason is not None:
        return _answer(sim, 401, {
            "error_code": "APIGW.0301",
            "error_msg": f"Incorrect IAM authentication information: {reason}",
        })  # fmt: skip
    if sim.config.iam_forbidden:
        return _answer(sim, 403, {"error": {
            "code": 403,
            "message": "You are not authorized to perform the requested action: "
            "iam:projects:listProjects.",
            "title": "Forbidden",
        }})  # fmt: skip
    name = request.query.get("name")
    projects = [
        _project(sim, known, project_id)
        for known, project_id in known_projects(sim)
        if name is None or known == name
    ]
    return _answer(sim, 200, {"projects": projects, "links": {"self": sim.url + PROJECTS_PATH}})
