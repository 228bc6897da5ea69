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
from control.daemon.controller import Controller
from control.local.isolated import isolated_settings
from control.mirror.desired import DesiredStateError
from control.traffic.actuators import DryRunActuator
from control.traffic.audit import Audit
from control.traffic.operator import (
    OperatorState,
    OperatorStore,
    OperatorView,
    clear_override,
    drain,
    import_legacy,
    set_override,
    undrain,
)
from control.traffic.policy import Override
from control.waiting import wait_until
from tests.test_control_plane import FakeTriton
from tests.test_leader_sites import BOUND, follows, leads, s3, site_settings  # noqa: F401 - s3: the fixture

INSTANCES = ("onprem-1", "onprem-2", "cloud-1")


# ---- for other tests that drive a Controller's decision with an override --------------------------
def s3_at(endpoint: str) -> dict:
    """The `s3` config section for an S3 endpoint already running (e.g. conftest's moto_endpoint)."""
    return {"port": int(endpoint.rsplit(":", 1)[1]), "start_local_server": False}


def operator_override(c, weights: dict[str, int], ttl_s: float = 60.0) -> None:
    """An override in the controller's operator state (S3), as the admin API writes it."""
    s3x.ensure_bucket(c.operator.store.client, c.settings.s3)
    assert c.operator.change(set_override(weights, ttl_s, "test", "", time.time()), by="test").written
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
        wait_until(lambda: time.time() > expires_at + 4.5, TTL_S + 10, "the override to expire")
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


# ---- the pure changes ----------------------------------------------------------------------------
def test_changes_are_pure_and_say_when_there_is_nothing_to_do():
    s = OperatorState()
    s = set_override({"onprem": 30, "cloud": 70}, 60, "op", "why", now=100.0)(s)
    assert s.override.expires_at == 160.0 and s.controls().override.weights == {"onprem": 30, "cloud": 70}
    assert clear_override(now=161.0)(s.model_copy(deep=True)) is None        # expired already: nothing to clear
    assert clear_override(now=150.0)(s.model_copy(deep=True)).override is None
    s = drain("onprem-2", "instance", "op", 100.0)(s)
    assert drain("onprem-2", "instance", "op", 101.0)(s.model_copy(deep=True)) is None
    assert s.controls().drained == frozenset({"onprem-2"})
    assert undrain("cloud-1")(s.model_copy(deep=True)) is None
    assert undrain("onprem-2")(s.model_copy(deep=True)).drains == {}


def test_import_from_the_database_adds_drains_and_an_override_only_when_s3_has_none_in_force():
    legacy_ov = Override({"onprem": 20, "cloud": 80}, expires_at=500.0, by="old")
    drains = [{"target": "cloud", "kind": "site", "created_at": 1.0, "by": ""}]
    s = import_legacy(legacy_ov, drains, now=100.0)(OperatorState())
    assert s.drains["cloud"].kind == "site" and s.override.weights == {"onprem": 20, "cloud": 80}
    newer = set_override({"onprem": 50, "cloud": 50}, 600, "op", "", now=90.0)(OperatorState())
    s = import_legacy(legacy_ov, [], now=100.0)(newer)
    assert s is None  # S3's override in force wins; nothing else to import
    assert import_legacy(Override({"onprem": 1, "cloud": 99}, 50.0), [], now=100.0)(OperatorState()) is None


# ---- the store and the daemon's copy, against the real S3 endpoint ------------------------------
@pytest.fixture
def store(s3):
    settings, client, _ = s3
    st = OperatorStore(client, settings.s3)
    client.delete_object(Bucket=settings.s3.bucket, Key=st.key)
    return st


def test_writes_are_fenced_and_a_damaged_object_is_refused_naming_it(store):
    store.update(drain("onprem", "site", "a", 1.0), by="a", generation=3)
    with pytest.raises(DesiredStateError, match="generation 3; this writer has 2: a newer leader"):
        store.update(undrain("onprem"), by="old", generation=2)
    assert "onprem" in store.read().state.drains
    store.client.put_object(Bucket=store.bucket, Key=store.key, Body=b'{"drains": {}}',
                            Metadata={"sha256": "0" * 64})
    with pytest.raises(DesiredStateError, match=r"operator\.json: sha256 of the body does not match.*weights set"):
        store.read()


def test_the_view_reads_at_most_every_refresh_and_at_once_under_a_new_generation(store, s3_calls):
    calls = s3_calls(store.client)
    t = [1000.0]
    view = OperatorView(store, refresh_s=5.0, generation=lambda: 7, clock=lambda: t[0])
    assert view.state().drains == {} and calls["GetObject"] == 1
    other = OperatorStore(store.client, store.s3cfg)  # another writer (a previous leader)
    other.update(drain("cloud-1", "instance", "x", t[0]), by="x", generation=6)
    calls.reset()
    t[0] += 1
    assert view.state(t[0]).drains == {} and calls["GetObject"] == 0   # cached: no request per tick
    assert "cloud-1" in view.state(t[0], leading_generation=7).drains   # leads now: re-read at once
    calls.reset()
    view.state(t[0] + 5.0)                                              # refresh: conditional GET, 304
    assert calls["GetObject"] == 1
    # Its own write updates the copy: decided on at once, no read.
    calls.reset()
    r = view.change(undrain("cloud-1"), by="api")
    assert r.written and r.state.generation == 7 and view.state(t[0] + 1.0).drains == {} and calls["GetObject"] == 0


def test_operator_state_in_the_database_of_an_earlier_release_is_imported_once(tmp_path, s3, store):
    s3settings, _, _ = s3
    settings = isolated_settings(tmp_path / "run", instances=(("onprem-1", "onprem", 90, True), ("onprem-2", "onprem",
                                                               0, True), ("cloud-1", "cloud", 10, False)),
                                 s3={"port": s3settings.s3.port, "start_local_server": False},
                                 control={"actuators": ["dry-run"]})
    audit = Audit(settings.database_path)  # what an earlier release left: a drain, an override in force
    audit.conn.execute("INSERT INTO control_drains (target, kind, created_at, by) VALUES ('onprem-2', 'instance', 1, 'op')")
    audit.conn.execute("INSERT INTO control_overrides (created_at, expires_at, weights, by, note) VALUES (?,?,?,?,?)",
                       (time.time(), time.time() + 600, json.dumps({"onprem": 60, "cloud": 40}), "op", ""))
    audit.close()
    c = Controller(settings, actuator=DryRunActuator(settings.instances))
    try:
        d = c.tick()
        assert d.reason == "override" and d.weights == {"onprem": 60, "cloud": 40}
        st = store.read().state
        assert set(st.drains) == {"onprem-2"} and st.override.weights == {"onprem": 60, "cloud": 40}
        assert c.audit.legacy_controls() == (None, [])
        [row] = c.audit.operator_history()
        assert row["action"] == "import" and row["detail"]["drains"] == ["onprem-2"]
        c.tick()
        assert len(c.audit.operator_history()) == 1 and store.read().state.revision == st.revision
    finally:
        c.close()
