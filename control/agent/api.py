"""The agent's HTTP API (flask on waitress, agent.api_host:api_port).

    GET /healthz     200 while the agent process serves (liveness), no auth
    GET /ready       200 only when every model is live at its desired version, else 503 (readiness), no auth
    GET /metrics     Prometheus text (control/agent/metrics.py), no auth
    GET /v1/status   the full status (what is also written to S3) + local failures;
                     `Authorization: Bearer <agent.token>`, compared in constant time
"""
from __future__ import annotations

from control.http_api import WaitressServer, serve_sidecar_api


def _ready(agent) -> tuple[bool, dict]:
    snap = agent.snapshot()
    waiting = {m: r for m, r in snap["models"].items() if r.get("state") != "live" or r.get("live") != r.get("target")}
    return agent.ready, {"desired_revision": snap["desired_revision"], "not_live": waiting,
                         "last_error": snap["last_error"]}


def serve_api(agent, token: str, cfg) -> WaitressServer:
    return serve_sidecar_api("triton-hybrid-agent", cfg, token, identity={"instance": agent.cfg.instance},
                             ready=lambda: _ready(agent), status=agent.snapshot, registry=agent.metrics.registry)
