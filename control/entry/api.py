"""The entry agent's HTTP API (flask on waitress, entry.api_host:api_port).

    GET /healthz     200 while the agent process serves (liveness), no auth
    GET /ready       200 when HAProxy answered on its runtime socket in the last pass, else 503; no auth
    GET /metrics     Prometheus text (control/entry/metrics.py), no auth
    GET /v1/status   the report (also written to S3); `Authorization: Bearer <entry.token>`

Nothing here changes HAProxy: weights come only from traffic.json in S3, written by the leader.
"""
from __future__ import annotations

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from control.http_api import WaitressServer, bearer_refusal, json_response


def create_app(agent, token: str) -> Flask:
    token_b = token.encode()
    app = Flask("triton-hybrid-entry")

    @app.get("/healthz")
    def healthz():
        return json_response(200, {"ok": True, "entry": agent.id})

    @app.get("/ready")
    def ready():
        snap = agent.snapshot()
        body = {"ready": agent.ready, "applied_revision": snap["applied_revision"], "errors": snap["errors"]}
        return json_response(200 if agent.ready else 503, body)

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(agent.metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/v1/status")
    def status():
        refused = bearer_refusal(token_b, "triton-hybrid-entry")
        return refused or json_response(200, agent.snapshot())

    @app.errorhandler(404)
    def not_found(_e):
        return json_response(404, {"error": f"no endpoint {request.path}"})

    return app


def serve_api(agent, token: str, cfg) -> WaitressServer:
    return WaitressServer(create_app(agent, token), cfg.api_host, cfg.api_port, "triton-hybrid-entry",
                          threads=cfg.api_threads, channel_timeout=cfg.api_timeout_s).start()
