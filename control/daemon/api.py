"""Admin HTTP API of the control plane (JSON; flask app on the waitress WSGI server, control.api_port).

Every endpoint but /healthz needs `Authorization: Bearer <control.admin_token>` (compared in
constant time). No or wrong token -> 401; bad input -> 400 with a message naming the field.

  GET    /healthz                    liveness, no auth
  GET    /v1/status                  weights, observed actuator state, instances, override, drains, leader
  GET    /v1/leader                  who leads (lease holder, site, generation, since), this daemon's role
  GET    /v1/weights                 site and instance weights, override
  POST   /v1/weights                 {"weights": {"onprem": 70, "cloud": 30}, "ttl_s": 600, "note": "..."}
                                     ttl_s: control.override_min_ttl_s (1 s) .. override_max_ttl_s (7 d)
  DELETE /v1/weights/override        clear the manual override
  POST   /v1/drain                   {"target": "onprem" | "cloud" | "<instance>"}
  POST   /v1/undrain                 {"target": ...}   (= /v1/ready)
  GET    /v1/policy                  policy config and state
  GET    /v1/history?since=10m&limit=100&all=1     decisions, and the operator actions (overrides, drains)
  GET    /v1/scale                   scaler config, cloud instances, state, last decision, cost
  GET    /v1/scale/history?since=10m&limit=100&all=1    scaling decisions with reasons
  GET    /v1/cost                    cost so far and burn rate per site, cloud budget
  GET    /v1/rollouts[/<model>]      rollout phase, reason, stable/canary/rejected versions, agents, audit
  POST   /v1/rollouts/<model>/<cmd>  cmd: start|pause|resume|promote|abort|rollback;
                                     body {"version": N} for start, {"to": N} for rollback (optional)

A slow or stuck client never reaches the control loop: waitress reads the whole request (headers
and body, at most control.api_max_header_bytes / api_max_body_bytes) on its own I/O thread and
closes a connection idle for control.api_timeout_s; only a complete request is handed to a worker
thread, and only then may an operation take the traffic job's lock (an override applies at once).
A malformed Content-Length is answered 400 by waitress before any of this code runs.

With leader election on (control.leader), a standby answers every change (POST, DELETE) with 409 and
the leader's name: only the leader acts (docs/leader.md). Overrides and drains are written to the
operator state in S3 (_control/operator.json, fenced by the lease generation; control/traffic/operator.py),
so the other site's control plane inherits them; each change is also a row of the operator audit.
The operator state unwritable (S3 down, a newer leader wrote it): 503 with the reason.
"""
from __future__ import annotations

import json
import logging
import time

from flask import Flask, request
from werkzeug.exceptions import HTTPException

from control.adapters import s3 as s3x
from control.capacity.cost import cost_summary
from control.durations import DurationError, parse_duration, since_to_ts
from control.http_api import WaitressServer, bearer_refusal, json_response
from control.leader.gate import NotLeader
from control.mirror.desired import DesiredStateError
from control.mirror.manifest import ManifestError, validate_model_name
from control.rollout.phases import Command, CommandError, CommandKind
from control.traffic import operator as op
from control.traffic.policy import SITES

log = logging.getLogger(__name__)


class OperatorStateUnwritable(RuntimeError):
    """S3 refused or did not answer the operator state write (answered 503: nothing changed)."""


class BadRequest(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def duration_field(value, field: str, lo: float | None = None, hi: float | None = None) -> float:
    """A duration from a request field, within [lo, hi]; BadRequest naming the field otherwise."""
    try:
        secs = parse_duration(value)
    except DurationError as e:
        raise BadRequest(field, str(e)) from None
    if (lo is not None and secs < lo) or (hi is not None and secs > hi) or secs <= 0:
        raise BadRequest(field, f"must be between {lo or 0:g}s and {hi or float('inf'):g}s, got {secs:g}s")
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


def _since(since: str | None) -> float | None:
    try:
        return since_to_ts(since, time.time())
    except DurationError as e:
        raise BadRequest("since", str(e)) from None


def policy_view(settings, state: dict | None) -> dict:
    return {"config": settings.control.policy.model_dump(), "state": state,
            "instances": [{"name": i.name, "site": i.site, "capacity": i.capacity, "cost_per_hour": i.cost_per_hour,
                           "sensitive_ok": i.sensitive_ok, "http": i.http_url, "grpc": i.grpc_url,
                           "metrics": i.metrics_url} for i in settings.instances]}


def _limit(query) -> int:
    try:
        limit = int(query.get("limit", "100"))
    except ValueError:
        raise BadRequest("limit", "must be an integer") from None
    if not 1 <= limit <= 10000:
        raise BadRequest("limit", "must be 1..10000")
    return limit


def _all_rows(query) -> bool:
    return query.get("all", "0") in ("1", "true", "yes")


class AdminService:
    """The operations behind the endpoints (also used by tests without HTTP). `controller` is a
    control.daemon.controller.Controller: its traffic and capacity jobs and its audit."""

    def __init__(self, settings, controller):
        self.settings = settings
        self.c = controller

    def status(self) -> dict:
        return self.c.status()

    def leader(self) -> dict:
        return self.c.gate.status()

    def standby_refusal(self) -> str | None:
        return None if self.c.gate.acting() else self.c.gate.refusal()

    def weights(self) -> dict:
        s = self.c.traffic.status()
        return {k: s[k] for k in ("weights", "instance_weights", "override", "drained", "last_decision", "observed")}

    def set_weights(self, body: dict, by: str) -> dict:
        c = self.settings.control
        w = validate_weights(body.get("weights"))
        ttl = duration_field(body.get("ttl_s", body.get("ttl", 600)), "ttl_s", c.override_min_ttl_s,
                             c.override_max_ttl_s)
        note = body.get("note", "")
        if not isinstance(note, str) or len(note) > 500:
            raise BadRequest("note", "must be a string of at most 500 characters")
        st = self._change(op.set_override(w, ttl, by, note, self.c.clock()), by, "override", "",
                          {"weights": w, "ttl_s": ttl, "note": note}).state
        ov = st.override
        d = self.c.tick()  # apply now, not at the next tick
        return {"override": {"weights": ov.weights, "expires_at": ov.expires_at, "ttl_s": ttl, "by": ov.by,
                             "note": ov.note, "revision": st.revision},
                "decision": {"reason": d.reason, "weights": d.weights, "message": d.message}}

    def clear_override(self, by: str = "") -> dict:
        written = self._change(op.clear_override(self.c.clock()), by, "clear_override").written
        d = self.c.tick()
        return {"cleared": written,
                "decision": {"reason": d.reason, "weights": d.weights}}

    def drain(self, body: dict, by: str, undrain: bool = False) -> dict:
        target, kind = validate_target(self.settings, body.get("target"))
        if undrain:
            changed = self._change(op.undrain(target), by, "undrain", target).written
        else:
            changed = self._change(op.drain(target, kind, by, self.c.clock()), by, "drain", target,
                                   {"kind": kind}).written
        d = self.c.tick()
        return {"target": target, "kind": kind, "drained": not undrain, "changed": changed,
                "decision": {"reason": d.reason, "weights": d.weights, "message": d.message}}

    def _change(self, fn: op.Change, by: str, action: str, target: str = "", detail: dict | None = None):
        """Write the operator state in S3 (fenced; the cached copy follows), then audit the change
        (only a change that was written: a drain of a drained target is no action)."""
        try:
            read = self.c.operator.change(fn, by)
        except (DesiredStateError, s3x.S3Error) as e:
            raise OperatorStateUnwritable(f"the operator state could not be written, nothing changed: {e}") from None
        if read.written:
            self.c.audit.record_operator(ts=self.c.clock(), action=action, target=target, detail=detail, by=by,
                                         generation=read.state.generation, revision=read.state.revision)
        return read

    def policy(self) -> dict:
        return policy_view(self.settings, self.c.state.to_dict())

    def history(self, query) -> dict:
        since = _since(query.get("since"))
        rows = self.c.audit.history(since, _limit(query), changes_only=not _all_rows(query))
        return {"decisions": [r.to_dict() for r in rows],
                "operator_actions": self.c.audit.operator_history(since, _limit(query))}

    def scale(self) -> dict:
        return self.c.scale_status()

    def scale_history(self, query) -> dict:
        since = _since(query.get("since"))
        return {"decisions": self.c.audit.scale_history(since, _limit(query), changes_only=not _all_rows(query))}

    def cost(self) -> dict:
        return cost_summary(self.settings)

    def rollouts(self, model: str | None = None) -> dict:
        return self.c.rollout.controller.status(model)

    def rollout_command(self, model: str, kind: str, body: dict, by: str) -> dict:
        """One operator command through the rollout machine (the same as `triton-hybrid rollout ...`)."""
        try:
            ck = CommandKind(kind)
        except ValueError:
            raise BadRequest("command", f"unknown rollout command {kind!r}; one of "
                                        f"{', '.join(k.value for k in CommandKind)}") from None
        try:
            validate_model_name(model)
        except ManifestError as e:
            raise BadRequest("model", str(e)) from None
        args = {}
        for field in {CommandKind.START: ("version",), CommandKind.ROLLBACK: ("to",)}.get(ck, ()):
            v = body.get(field)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise BadRequest(field, f"must be a version number >= 1, got {v!r}")
            args[field] = v
        try:
            t = self.c.rollout.controller.command(model, Command(ck, by=by, **args))
        except CommandError as e:
            raise BadRequest("command", str(e)) from None
        return {"transition": t.to_dict() if t is not None else None}


def create_app(settings, service: AdminService) -> Flask:
    token_b = settings.control.admin_token.get_secret_value().encode()
    max_body = settings.control.api_max_body_bytes
    app = Flask("triton-hybrid-control")

    def body() -> dict:
        # waitress has read the whole body already (bounded in size and time): no socket I/O here.
        raw = request.get_data(cache=False)
        if len(raw) > max_body:
            raise BadRequest("body", f"larger than {max_body} bytes")
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise BadRequest("body", f"not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise BadRequest("body", "must be a JSON object")
        return data

    def by() -> str:
        return f"api:{request.remote_addr}"

    @app.before_request
    def authenticate():
        if request.path == "/healthz":
            return None
        refused = bearer_refusal(token_b, "triton-hybrid")
        if refused is None and request.method not in ("GET", "HEAD") and (why := service.standby_refusal()):
            return json_response(409, {"error": why, "leader": service.leader().get("leader")})
        return refused

    @app.errorhandler(BadRequest)
    def bad_request(e: BadRequest):
        return json_response(400, {"error": str(e), "field": e.field})

    @app.errorhandler(NotLeader)
    def not_leader(e: NotLeader):  # the lease was lost between the check and the write
        return json_response(409, {"error": str(e), "leader": service.leader().get("leader")})

    @app.errorhandler(OperatorStateUnwritable)
    def s3_unwritable(e: OperatorStateUnwritable):
        return json_response(503, {"error": str(e)})

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        msg = {404: f"no endpoint {request.path}", 405: f"{request.method} not allowed on {request.path}"}
        return json_response(e.code or 500, {"error": msg.get(e.code, e.description)})

    @app.errorhandler(Exception)
    def internal(e: Exception):
        log.exception("api %s %s failed", request.method, request.path)
        return json_response(500, {"error": f"{type(e).__name__}: {e}"})

    routes = [
        ("/healthz", "GET", lambda: {"ok": True}),
        ("/v1/status", "GET", service.status),
        ("/v1/leader", "GET", service.leader),
        ("/v1/weights", "GET", service.weights),
        ("/v1/weights", "POST", lambda: service.set_weights(body(), by())),
        ("/v1/weights/override", "DELETE", lambda: service.clear_override(by())),
        ("/v1/drain", "POST", lambda: service.drain(body(), by())),
        ("/v1/undrain", "POST", lambda: service.drain(body(), by(), undrain=True)),
        ("/v1/ready", "POST", lambda: service.drain(body(), by(), undrain=True)),
        ("/v1/policy", "GET", service.policy),
        ("/v1/history", "GET", lambda: service.history(request.args)),
        ("/v1/scale", "GET", service.scale),
        ("/v1/scale/history", "GET", lambda: service.scale_history(request.args)),
        ("/v1/cost", "GET", service.cost),
    ]
    for k, (path, method, fn) in enumerate(routes):
        app.add_url_rule(path, f"r{k}", (lambda fn=fn: json_response(200, fn())), methods=[method], strict_slashes=False)

    @app.get("/v1/rollouts")
    @app.get("/v1/rollouts/<model>")
    def rollouts(model: str | None = None):
        return json_response(200, service.rollouts(model))

    @app.post("/v1/rollouts/<model>/<kind>")
    def rollout_command(model: str, kind: str):
        return json_response(200, service.rollout_command(model, kind, body(), by()))

    return app


def serve_api(settings, controller, host: str | None = None, port: int | None = None) -> WaitressServer:
    c = settings.control
    app = create_app(settings, AdminService(settings, controller))
    # +1 KiB: a body at the limit still reaches the app, which names the field if over.
    return WaitressServer(app, host or c.api_host, port if port is not None else c.api_port, "triton-hybrid-control",
                          threads=c.api_threads, channel_timeout=c.api_timeout_s,
                          max_request_body_size=c.api_max_body_bytes + 1024,
                          max_request_header_size=c.api_max_header_bytes).start()
