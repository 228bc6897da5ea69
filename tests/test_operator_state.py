"""Operator state (overrides, drains) is a control object in S3 (`_control/operator.json`), so a new
leader inherits it (issue 16): two control planes as real processes on one real S3 endpoint
(moto's server, its own process), dry-run actuators, instances answering as fake Tritons in this
process (readiness + a recorded /metrics page: the policy's inputs, not the thing under test).

The operator drains an instance and sets an override on the leader; the leader is SIGKILLed; the
standby leads and its applied decisions (from its own audit) honour the drain and the override,
with the override's expiry (absolute, set on the old leader) still holding.
"""
from __future__ import annotations

import json
import signal
import sqlite3
import time

import pytest
import yaml

from control.adapters import s3 as s3x
from control.config import load_config
from control.daemon.client import AdminClient, DaemonError
from control.local.procs import free_port
from control.local.stack import start_control_daemon
from control.traffic.operator import set_override
from control.waiting import wait_until
from tests.test_control_plane import FakeTriton
from tests.test_leader_sites import BOUND, LEADER, follows, leader_view, leads, s3, site_settings  # noqa: F401

INSTANCES = ("onprem-1", "onprem-2", "cloud-1")


# ---- for other tests that drive a Controller's decision with an override --------------------------
def s3_at(endpoint: str) -> dict:
    """The `s3` config section for an S3 endpoint already running (e.g. conftest's moto_endpoint)."""
    return {"port": int(endpoint.rsplit(":", 1)[1]), "start_local_server": False}


def operator_override(c, weights: dict[str, int], ttl_s: float = 60.0) -> None:
    """An override in the controller's operator state (S3), as the admin API writes it."""
    s3x.ensure_bucket(c.operator.store.client, c.settings.s3)
    c.operator.change(set_override(weights, ttl_s, "test", "", time.time()), by="test")
TTL_S = 25.0


@pytest.fixture
def fakes():
    """Per instance a fake for its HTTP port (readiness) and one for its metrics port."""
    out = {name: (FakeTriton(), FakeTriton()) for name in INSTANCES}
    yield out
    for pair in out.values():
        for f in pair:
            f.srv.shutdown()
            f.srv.server_close()


def pointed_at(settings, fakes):
    """The site's settings with its instances polling the fakes (the config file rewritten, so the
    daemon process started with --config sees the same)."""
    data = yaml.safe_load(open(settings.source))
    data["instances"] = [{"name": n, "site": n.split("-")[0], "weight": 50, "sensitive_ok": n.startswith("onprem"),
                          "host": "127.0.0.1", "http_port": fakes[n][0].port, "metrics_port": fakes[n][1].port,
                          "grpc_port": free_port(), "managed": False} for n in INSTANCES]
    data["control"]["policy"] = {**data["control"].get("policy", {}), "home_onprem_weight": 100}
    with open(settings.source, "w") as f:
        yaml.safe_dump(data, f)
    return load_config(settings.source, environ={})


def decisions(settings, since: float = 0.0) -> list[dict]:
    with sqlite3.connect(settings.database_path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT ts, reason, new_weights, instance_weights, applied FROM "
                                            "control_decisions WHERE ts >= ? ORDER BY id", (since,))]


def applied(settings, since: float = 0.0) -> list[dict]:
    return [r for r in decisions(settings, since) if r["applied"]]


def test_new_leader_inherits_drain_and_override_with_its_expiry(tmp_path, s3, fakes):
    s3settings, _, _ = s3
    a = pointed_at(site_settings(tmp_path, s3settings, "ctl-a", "onprem"), fakes)
    b = pointed_at(site_settings(tmp_path, s3settings, "ctl-b", "cloud"), fakes)
    procs = []
    try:
        procs.append(pa := start_control_daemon(a))
        wait_until(lambda: leads(a), 15, "ctl-a to lead")
        procs.append(start_control_daemon(b))
        wait_until(lambda: follows(b, "ctl-a@onprem"), 15, "ctl-b to follow ctl-a")

        # The operator acts on the leader; the standby refuses and names it.
        with pytest.raises(DaemonError, match="409.*ctl-a@onprem"):
            AdminClient(b).call("POST", "/v1/drain", {"target": "onprem-2"})
        AdminClient(a).call("POST", "/v1/drain", {"target": "onprem-2"})
        ov = AdminClient(a).call("POST", "/v1/weights", {"weights": {"onprem": 30, "cloud": 70}, "ttl_s": TTL_S,
                                                         "note": "issue 16"})["override"]
        expires_at = ov["expires_at"]
        st = AdminClient(a).call("GET", "/v1/weights")
        assert st["override"]["weights"] == {"onprem": 30, "cloud": 70} and st["drained"] == ["onprem-2"]
        assert st["instance_weights"]["onprem-2"] == 0

        killed_at = time.time()
        pa.signal(signal.SIGKILL)
        wait_until(lambda: leads(b), BOUND + 10, "ctl-b to take over", interval=0.05)
        took = time.time() - killed_at
        assert took < expires_at - killed_at, "the takeover outlasted the override: raise TTL_S"

        # The new leader's own view: the same override (same absolute expiry) and the drain.
        wait_until(lambda: any(r["reason"] == "override" for r in applied(b)), 10, "ctl-b to apply a decision")
        st = AdminClient(b).call("GET", "/v1/weights")
        assert st["drained"] == ["onprem-2"], st
        assert st["override"] is not None and st["override"]["expires_at"] == pytest.approx(expires_at), st
        assert st["override"]["weights"] == {"onprem": 30, "cloud": 70}

        # Every decision ctl-b applied before the expiry: the override's weights, onprem-2 drained.
        wait_until(lambda: time.time() > expires_at + 3, TTL_S + 10, "the override to expire")
        rows = applied(b)
        before = [r for r in rows if r["ts"] < expires_at - 0.5]
        after = [r for r in rows if r["ts"] > expires_at + 1.5]
        assert before and after, rows
        for r in before:
            assert r["reason"] == "override" and json.loads(r["new_weights"]) == {"onprem": 30, "cloud": 70}, r
            assert json.loads(r["instance_weights"])["onprem-2"] == 0, r
        # The expiry holds on the new leader: weights go back by policy; the drain stays.
        assert all(r["reason"] != "override" for r in after), after
        assert any(r["reason"] == "override_expired" for r in rows), [r["reason"] for r in rows]
        for r in after:
            assert json.loads(r["instance_weights"])["onprem-2"] == 0, r
        print(f"\nOPERATOR STATE: takeover after {took:.2f}s; ctl-b applied {len(before)} override decisions, "
              f"then {len(after)} after the expiry, onprem-2 drained throughout")

        # Undrain on the new leader: onprem-2 serves again.
        AdminClient(b).call("POST", "/v1/undrain", {"target": "onprem-2"})
        assert AdminClient(b).call("GET", "/v1/weights")["drained"] == []
    finally:
        for p in reversed(procs):
            p.stop()
