"""The entry agent's HTTP API (flask on waitress, entry.api_host:api_port).

    GET /healthz     200 while the agent process serves (liveness), no auth
    GET /ready       200 when HAProxy answered on its runtime socket in the last pass, else 503; no auth
    GET /metrics     Prometheus text (control/entry/metrics.py), no auth
    GET /v1/status   the report (also written to S3); `Authorization: Bearer <entry.token>`

Nothing here changes HAProxy: weights come only from traffic.json in S3, written by the leader.
"""
from __future__ import annotations

from control.http_api import WaitressServer, serve_sidecar_api


def _ready(agent) -> tuple[bool, dict]:
    snap = agent.snapshot()
    return agent.ready, {"applied_revision": snap["applied_revision"], "errors": snap["errors"]}


def serve_api(agent, token: str, cfg) -> WaitressServer:
    return serve_sidecar_api("triton-hybrid-entry", cfg, token, identity={"entry": agent.id},
                             ready=lambda: _ready(agent), status=agent.snapshot, registry=agent.metrics.registry)
