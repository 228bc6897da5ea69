"""What the control plane's and the agents' HTTP APIs share (flask on waitress): a JSON response,
the bearer-token check (constant time), the server on a thread of its own whose `shutdown()`
stops its loop and closes the listener and every client connection before returning (so the port
is free for a restarted process), and `serve_sidecar_api`: the four endpoints every agent beside a
server has (the host agent beside Triton, the entry agent beside HAProxy):

    GET /healthz     200 while the process serves (liveness), no auth
    GET /ready       200 or 503 with what the agent says (readiness), no auth
    GET /metrics     Prometheus text of its registry, no auth
    GET /v1/status   its full status; `Authorization: Bearer <token>`, compared in constant time
"""
from __future__ import annotations

import hmac
import json
import threading

from collections.abc import Callable

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from waitress.server import create_server


def json_response(code: int, obj, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj, default=str, indent=1), status=code, mimetype="application/json",
                    headers=headers)


def bearer_refusal(token: bytes, realm: str) -> Response | None:
    """None when the request carries `Authorization: Bearer <token>`, else the 401 to answer."""
    h = request.headers.get("Authorization", "")
    given = h[7:].strip().encode() if h[:7].lower() == "bearer " else b""
    if hmac.compare_digest(given, token):
        return None
    return json_response(401, {"error": "missing or wrong bearer token"}, {"WWW-Authenticate": f'Bearer realm="{realm}"'})


class WaitressServer:
    """A flask app on waitress; `limits`: waitress options (threads, channel_timeout, body/header sizes)."""

    def __init__(self, app: Flask, host: str, port: int, name: str, **limits):
        self.server = create_server(app, host=host, port=port, ident=name, cleanup_interval=1,
                                    expose_tracebacks=False, clear_untrusted_proxy_headers=True, **limits)
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.effective_port)

    def _run(self) -> None:
        srv = self.server
        # waitress's own run() loops until its socket map is empty; this loop also ends on shutdown().
        while not self._stopping.is_set():
            srv.asyncore.loop(timeout=0.2, map=srv._map, use_poll=srv.adj.asyncore_use_poll, count=1)
        srv.task_dispatcher.shutdown()
        srv.asyncore.close_all(srv._map)  # the listener, the trigger, every client connection

    def start(self) -> "WaitressServer":
        self.thread.start()
        return self

    def shutdown(self) -> None:
        self._stopping.set()
        self.thread.join(10)


def serve_sidecar_api(name: str, cfg, token: str, *, identity: dict, ready: Callable[[], tuple[bool, dict]],
                      status: Callable[[], dict], registry: CollectorRegistry) -> WaitressServer:
    """Start the API of an agent beside a server (see the module doc) on cfg.api_host:api_port.
    `ready()` -> (ready, the body to show); `status()` -> the token-protected status."""
    token_b = token.encode()
    app = Flask(name)

    @app.get("/healthz")
    def healthz():
        return json_response(200, {"ok": True, **identity})

    @app.get("/ready")
    def ready_():
        ok, body = ready()
        return json_response(200 if ok else 503, {"ready": ok, **body})

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/v1/status")
    def status_():
        return bearer_refusal(token_b, name) or json_response(200, status())

    @app.errorhandler(404)
    def not_found(_e):
        return json_response(404, {"error": f"no endpoint {request.path}"})

    return WaitressServer(app, cfg.api_host, cfg.api_port, name, threads=cfg.api_threads,
                          channel_timeout=cfg.api_timeout_s).start()
