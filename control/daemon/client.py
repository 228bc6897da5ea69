"""How other processes (the CLI, `status`) talk to the control daemon: `AdminClient` (the admin API
with the configured token) and `daemon_or_database`, the one fallback every read-only view uses: ask
the daemon, and when it is down read the control database directly (and say so in `source`)."""
from __future__ import annotations

import time
from typing import Callable

import requests

from control.adapters import s3 as s3x
from control.mirror.desired import DesiredStateError
from control.traffic.audit import Audit
from control.traffic.operator import OperatorStore


class DaemonError(RuntimeError):
    """The daemon refused a call (the message has the HTTP status and its error)."""


class DaemonDown(DaemonError):
    """The daemon is not answering."""


class AdminClient:
    def __init__(self, settings, timeout: float = 10.0):
        c = settings.control
        self.base = f"http://{c.api_host}:{c.api_port}"
        self.headers = {"Authorization": f"Bearer {c.admin_token.get_secret_value()}"}
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> dict:
        try:
            r = requests.request(method, self.base + path, json=body, params=params, headers=self.headers,
                                 timeout=self.timeout)
        except requests.ConnectionError:
            raise DaemonDown(f"the control daemon is not answering at {self.base} "
                             "(start it with `triton-hybrid up` or `triton-hybrid control run`)") from None
        try:
            data = r.json()
        except ValueError:
            data = {"error": r.text[:300]}
        if r.status_code != 200:
            raise DaemonError(f"{method} {path}: HTTP {r.status_code}: {data.get('error', data)}")
        return data


def daemon_or_database(settings, path: str, read_db: Callable[[Audit], dict], *, params: dict | None = None,
                       timeout: float = 3.0, any_error: bool = False, no_database: dict | None = None) -> dict:
    """`GET path` from the daemon as {"source": "daemon", ...}; if the daemon is down (with
    `any_error`: or answers an error), `read_db(audit)` from the control database as
    {"source": "database (daemon down)", "error": why, ...}. No database either: `no_database`
    (with source "none"), or a DaemonDown saying both are missing."""
    try:
        return {"source": "daemon", **AdminClient(settings, timeout=timeout).call("GET", path, params=params)}
    except DaemonError as e:
        if not (any_error or isinstance(e, DaemonDown)):
            raise
        err = str(e)
    if not settings.database_path.exists():
        if no_database is None:
            raise DaemonDown(f"{err}; and there is no control database at {settings.database_path}")
        return {"source": "none", "error": err, **no_database}
    audit = Audit(settings.database_path)
    try:
        return {"source": "database (daemon down)", "error": err, **read_db(audit)}
    finally:
        audit.close()


def weights_summary(settings) -> dict:
    """For `triton-hybrid status`: the weights part, from the daemon or (daemon down) the database
    and the operator state in S3 (override, drains)."""
    def read_db(audit) -> dict:
        last = audit.last()
        now = time.time()
        out = {"weights": last.new_weights if last else None,
               "instance_weights": last.instance_weights if last else None,
               "last_decision": None if last is None else {"reason": last.reason, "message": last.message,
                                                           "time": last.to_dict()["time"]}}
        try:
            st = OperatorStore(s3x.make_client(settings.s3, connect_timeout=2, read_timeout=3), settings.s3).read().state
        except (s3x.S3Error, DesiredStateError) as e:
            return out | {"operator_state_error": str(e)}
        ov = st.override
        return out | {"override": None if ov is None or ov.expires_at <= now else
                      {"weights": ov.weights, "ttl_left_s": round(ov.expires_at - now, 1)},
                      "drained": sorted(st.drains)}
    return daemon_or_database(settings, "/v1/weights", read_db, any_error=True, no_database={"weights": None})
