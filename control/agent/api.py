"""The agent's HTTP API (flask on waitress, agent.api_host:api_port).

    GET /healthz     200 while the agent process serves (liveness), no auth
    GET /ready       200 only when every model is live at its desired version, else 503 (readiness), no auth
    GET /metrics     Prometheus text (control/agent/metrics.py), no auth
    GET /v1/status   the full status (what is also written to S3) + local failures;
                     `Authorization: Bearer <agent.token>`, compared in constant time
"""
from __future__ import annotations

import hmac
import json
import threading

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from waitress.server import create_server


def _json(code: int, obj, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj, default=str, indent=1), status=code, mimetype="application/json",
                    headers=headers)


def create_app(agent, token: str) -> Flask:
    token_b = token.encode()
    app = Flask("triton-hybrid-agent")

    @app.get("/healthz")
    def healthz():
        return _json(200, {"ok": True, "instance": agent.cfg.instance})

    @app.get("/ready")
    def ready():
        snap = agent.snapshot()
        waiting = {m: r for m, r in snap["models"].items() if r.get("state") != "live" or r.get("live") != r.get("target")}
        body = {"ready": agent.ready, "desired_revision": snap["desired_revision"], "not_live": waiting,
                "last_error": snap["last_error"]}
        return _json(200 if agent.ready else 503, body)

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(agent.metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/v1/status")
    def status():
        h = request.headers.get("Authorization", "")
        given = h[7:].strip().encode() if h[:7].lower() == "bearer " else b""
        if not hmac.compare_digest(given, token_b):
            return _json(401, {"error": "missing or wrong bearer token"},
                         {"WWW-Authenticate": 'Bearer realm="triton-hybrid-agent"'})
        return _json(200, agent.snapshot())

    @app.errorhandler(404)
    def not_found(_e):
        return _json(404, {"error": f"no endpoint {request.path}"})

    return app


class AgentServer:
    """The API's waitress server on its own thread."""

    def __init__(self, app: Flask, cfg):
        self.server = create_server(app, host=cfg.api_host, port=cfg.api_port, threads=cfg.api_threads,
                                    ident="triton-hybrid-agent", channel_timeout=cfg.api_timeout_s,
                                    cleanup_interval=1, expose_tracebacks=False, clear_untrusted_proxy_headers=True)
        self.thread = threading.Thread(target=self.server.run, name="agent-api", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.effective_port)

    def start(self) -> "AgentServer":
        self.thread.start()
        return self

    def shutdown(self) -> None:
        self.server.close()


def serve_api(agent, token: str, cfg) -> AgentServer:
    return AgentServer(create_app(agent, token), cfg).start()
