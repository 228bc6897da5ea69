"""Admin HTTP API of the control plane (JSON; stdlib ThreadingHTTPServer on control.api_port).

Every endpoint but /healthz needs `Authorization: Bearer <control.admin_token>` (compared in
constant time). No or wrong token -> 401; bad input -> 400 with a message naming the field.

  GET    /healthz                    liveness, no auth
  GET    /v1/status                  weights, observed actuator state, instances, override, drains
  GET    /v1/weights                 site and instance weights, override
  POST   /v1/weights                 {"weights": {"onprem": 70, "cloud": 30}, "ttl_s": 600, "note": "..."}
  DELETE /v1/weights/override        clear the manual override
  POST   /v1/drain                   {"target": "onprem" | "cloud" | "<instance>"}
  POST   /v1/undrain                 {"target": ...}   (= ready)
  GET    /v1/policy                  policy config and state
  GET    /v1/history?since=10m&limit=100&all=1
  GET    /v1/scale                   scaler config, cloud instances, state, last decision, cost
  GET    /v1/scale/history?since=10m&limit=100&all=1    scaling decisions with reasons
  GET    /v1/cost                    cost so far and burn rate per site, cloud budget
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from control.traffic.policy import SITES

log = logging.getLogger(__name__)
MAX_TTL_S = 7 * 24 * 3600
MAX_BODY = 64 * 1024


class BadRequest(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def parse_duration(text: str | int | float, field: str = "ttl") -> float:
    """'90', '90s', '10m', '2h', '1d' -> seconds."""
    if isinstance(text, bool):
        raise BadRequest(field, "must be a duration like 600, 90s, 10m, 2h")
    if isinstance(text, (int, float)):
        secs = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
        if not m:
            raise BadRequest(field, f"{text!r} is not a duration (use e.g. 600, 90s, 10m, 2h)")
        secs = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if not 0 < secs <= MAX_TTL_S:
        raise BadRequest(field, f"must be between 1s and {MAX_TTL_S // 86400}d, got {secs:g}s")
    return secs


def validate_weights(w) -> dict[str, int]:
    if not isinstance(w, dict):
        raise BadRequest("weights", "must be an object like {\"onprem\": 70, \"cloud\": 30}")
    unknown = set(w) - set(SITES)
    if unknown:
        raise BadRequest(f"weights.{sorted(unknown)[0]}", f"unknown site (sites: {', '.join(SITES)})")
    out = {}
    for site in SITES:
        if site not in w:
            raise BadRequest(f"weights.{site}", "missing")
        v = w[site]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 100:
            raise BadRequest(f"weights.{site}", f"must be an integer 0..100, got {v!r}")
        out[site] = v
    if sum(out.values()) != 100:
        raise BadRequest("weights", f"must add up to 100, got {sum(out.values())}")
    return out


def validate_target(settings, target) -> tuple[str, str]:
    if not isinstance(target, str) or not target:
        raise BadRequest("target", "must be a site (onprem, cloud) or an instance name")
    if target in SITES:
        return target, "site"
    if target in {i.name for i in settings.instances}:
        return target, "instance"
    known = ", ".join([*SITES, *(i.name for i in settings.instances)])
    raise BadRequest("target", f"unknown site or instance {target!r} (known: {known})")


def since_to_ts(since: str | None, now: float) -> float | None:
    if not since:
        return None
    try:
        return now - parse_duration(since, "since")
    except BadRequest:
        pass
    try:
        from datetime import datetime, timezone  # noqa: PLC0415
        dt = datetime.fromisoformat(since.replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    except ValueError:
        raise BadRequest("since", f"{since!r} is neither a duration (10m, 2h) nor an ISO time") from None


def policy_view(settings, state: dict | None) -> dict:
    return {"config": settings.control.policy.model_dump(), "state": state,
            "instances": [{"name": i.name, "site": i.site, "capacity": i.capacity, "cost_per_hour": i.cost_per_hour,
                           "sensitive_ok": i.sensitive_ok, "http": i.http_url, "grpc": i.grpc_url,
                           "metrics": i.metrics_url} for i in settings.instances]}


class AdminService:
    """The operations behind the endpoints (also used by tests without HTTP)."""

    def __init__(self, settings, controller):
        self.settings = settings
        self.c = controller

    def status(self) -> dict:
        return self.c.status()

    def weights(self) -> dict:
        s = self.c.status()
        return {k: s[k] for k in ("weights", "instance_weights", "override", "drained", "last_decision", "observed")}

    def set_weights(self, body: dict, by: str) -> dict:
        w = validate_weights(body.get("weights"))
        ttl = parse_duration(body.get("ttl_s", body.get("ttl", 600)), "ttl_s")
        note = body.get("note", "")
        if not isinstance(note, str) or len(note) > 500:
            raise BadRequest("note", "must be a string of at most 500 characters")
        ov = self.c.audit.set_override(w, ttl, by=by, note=note, now=self.c.clock())
        d = self.c.tick()  # apply now, not at the next tick
        return {"override": ov, "decision": {"reason": d.reason, "weights": d.weights, "message": d.message}}

    def clear_override(self) -> dict:
        cleared = self.c.audit.clear_override(self.c.clock())
        d = self.c.tick()
        return {"cleared": cleared, "decision": {"reason": d.reason, "weights": d.weights}}

    def drain(self, body: dict, by: str, undrain: bool = False) -> dict:
        target, kind = validate_target(self.settings, body.get("target"))
        if undrain:
            changed = self.c.audit.undrain(target)
        else:
            self.c.audit.drain(target, kind, by=by, now=self.c.clock())
            changed = True
        d = self.c.tick()
        return {"target": target, "kind": kind, "drained": not undrain, "changed": changed,
                "decision": {"reason": d.reason, "weights": d.weights, "message": d.message}}

    def policy(self) -> dict:
        return policy_view(self.settings, self.c.state.to_dict())

    def history(self, query: dict) -> dict:
        now = time.time()
        since = since_to_ts((query.get("since") or [None])[0], now)
        try:
            limit = int((query.get("limit") or ["100"])[0])
        except ValueError:
            raise BadRequest("limit", "must be an integer") from None
        if not 1 <= limit <= 10000:
            raise BadRequest("limit", "must be 1..10000")
        all_rows = (query.get("all") or ["0"])[0] in ("1", "true", "yes")
        rows = self.c.audit.history(since, limit, changes_only=not all_rows)
        return {"decisions": [r.to_dict() for r in rows]}

    def scale(self) -> dict:
        return self.c.scale_status()

    def scale_history(self, query: dict) -> dict:
        since = since_to_ts((query.get("since") or [None])[0], time.time())
        try:
            limit = int((query.get("limit") or ["100"])[0])
        except ValueError:
            raise BadRequest("limit", "must be an integer") from None
        all_rows = (query.get("all") or ["0"])[0] in ("1", "true", "yes")
        return {"decisions": self.c.audit.scale_history(since, max(1, min(limit, 10000)), changes_only=not all_rows)}

    def cost(self) -> dict:
        from control.capacity.cost import cost_summary  # noqa: PLC0415
        return cost_summary(self.settings)


def make_handler(service: AdminService, token: str):
    token_b = token.encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "triton-hybrid-control"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # route to logging, not stderr
            log.debug("api %s - %s", self.address_string(), fmt % args)

        def _send(self, code: int, obj) -> None:
            body = json.dumps(obj, default=str, indent=1).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if code == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="triton-hybrid"')
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            h = self.headers.get("Authorization", "")
            given = h[7:].strip().encode() if h[:7].lower() == "bearer " else b""
            return hmac.compare_digest(given, token_b)

        def _body(self) -> dict:
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise BadRequest("Content-Length", "not an integer") from None
            if n > MAX_BODY:
                raise BadRequest("body", f"larger than {MAX_BODY} bytes")
            raw = self.rfile.read(n) if n else b""
            if not raw:
                return {}
            try:
                data = json.loads(raw)
            except ValueError as e:
                raise BadRequest("body", f"not valid JSON: {e}") from None
            if not isinstance(data, dict):
                raise BadRequest("body", "must be a JSON object")
            return data

        def _route(self, method: str) -> None:
            url = urlparse(self.path)
            path = url.path.rstrip("/") or "/"
            if method == "GET" and path == "/healthz":
                return self._send(200, {"ok": True})
            if not self._authorized():
                # Drain the body so the connection stays usable.
                n = int(self.headers.get("Content-Length") or 0)
                if 0 < n <= MAX_BODY:
                    self.rfile.read(n)
                return self._send(401, {"error": "missing or wrong bearer token"})
            by = f"api:{self.client_address[0]}"
            routes = {
                ("GET", "/v1/status"): lambda: service.status(),
                ("GET", "/v1/weights"): lambda: service.weights(),
                ("POST", "/v1/weights"): lambda: service.set_weights(self._body(), by),
                ("DELETE", "/v1/weights/override"): lambda: service.clear_override(),
                ("POST", "/v1/drain"): lambda: service.drain(self._body(), by),
                ("POST", "/v1/undrain"): lambda: service.drain(self._body(), by, undrain=True),
                ("POST", "/v1/ready"): lambda: service.drain(self._body(), by, undrain=True),
                ("GET", "/v1/policy"): lambda: service.policy(),
                ("GET", "/v1/history"): lambda: service.history(parse_qs(url.query)),
                ("GET", "/v1/scale"): lambda: service.scale(),
                ("GET", "/v1/scale/history"): lambda: service.scale_history(parse_qs(url.query)),
                ("GET", "/v1/cost"): lambda: service.cost(),
            }
            fn = routes.get((method, path))
            if fn is None:
                if any(p == path for _, p in routes):
                    return self._send(405, {"error": f"{method} not allowed on {path}"})
                return self._send(404, {"error": f"no endpoint {path}"})
            try:
                # One SQLite connection and one policy state: API calls and scheduler ticks take turns.
                with service.c.lock:
                    result = fn()
                return self._send(200, result)
            except BadRequest as e:
                return self._send(400, {"error": str(e), "field": e.field})
            except Exception as e:  # noqa: BLE001
                log.exception("api %s %s failed", method, path)
                return self._send(500, {"error": f"{type(e).__name__}: {e}"})

        def do_GET(self):  # noqa: N802
            self._route("GET")

        def do_POST(self):  # noqa: N802
            self._route("POST")

        def do_DELETE(self):  # noqa: N802
            self._route("DELETE")

    return Handler


def serve_api(settings, controller, host: str | None = None, port: int | None = None) -> ThreadingHTTPServer:
    c = settings.control
    service = AdminService(settings, controller)
    srv = ThreadingHTTPServer((host or c.api_host, port if port is not None else c.api_port),
                              make_handler(service, c.admin_token.get_secret_value()))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, name="admin-api", daemon=True).start()
    return srv
