"""The agent's HTTP API (flask on waitress, agent.api_host:api_port).

    GET /healthz     200 while the agent process serves (liveness), no auth
    GET /ready       200 only when every model is live at its desired version, else 503 (readiness), no auth
    GET /metrics     Prometheus text (control/agent/metrics.py), no auth
    GET /v1/status   the full status (what is also written to S3) + local failures;
                     `Authorization: Bearer <agent.token>`, compared in constant time
"""
from __future__ import annotations

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from control.http_api import WaitressServer, bearer_refusal, json_response


def create_app(agent, token: str) -> Flask:
    token_b = token.encode()
    app = Flask("triton-hybrid-agent")

    @app.get("/healthz")
    def healthz():
        return json_response(200, {"ok": True, "instance": agent.cfg.instance})

    @app.get("/ready")
    def ready():
        snap = agent.snapshot()
        waiting = {m: r for m, r in snap["models"].items() if r.get("state") != "live" or r.get("live") != r.get("target")}
        body = {"ready": agent.ready, "desired_revision": snap["desired_revision"], "not_live": waiting,
                "last_error": snap["last_error"]}
        return json_response(200 if agent.ready else 503, body)

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(agent.metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/v1/status")
    def status():
        refused = bearer_refusal(token_b, "triton-hybrid-agent")
        return refused or json_response(200, agent.snapshot())

    @app.errorhandler(404)
    def not_found(_e):
        return json_response(404, {"error": f"no endpoint {request.path}"})

    return app


def serve_api(agent, token: str, cfg) -> WaitressServer:
    return WaitressServer(create_app(agent, token), cfg.api_host, cfg.api_port, "triton-hybrid-agent",
                          threads=cfg.api_threads, channel_timeout=cfg.api_timeout_s).start()
