"""Admin HTTP API: bearer-token auth, input validation naming the field, and the operations
(through the real flask app on waitress; the actuator is the dry-run one, no Triton needed); a slow
client, malformed Content-Length and short TTLs (issue 15, finding 3)."""
from __future__ import annotations

import time

import pytest
import requests

from control.adapters import s3 as s3x
from control.daemon.api import serve_api
from control.daemon.controller import Controller
from control.drills.models import write_add_model
from control.local.isolated import isolated_settings as make_settings
from control.local.procs import free_port
from control.mirror.desired import DesiredStore, InstanceStatus, seed_stable
from control.mirror.publish import publish_version
from control.traffic.actuators import DryRunActuator

TOKEN = "test-admin-token-123"


@pytest.fixture
def s3(s3_server):
    """The module's S3 endpoint, emptied: no operator state of an earlier test."""
    settings, client = s3_server
    for key in s3x.list_keys(client, settings.s3.bucket, ""):
        client.delete_object(Bucket=settings.s3.bucket, Key=key)
    return {"port": settings.s3.port, "start_local_server": False}


def no_override(c) -> bool:
    """Nothing an operator set reached S3 (read past the daemon's cache)."""
    return c.operator.store.read().state.override is None


@pytest.fixture
def svc(tmp_path, s3):
    settings = make_settings(tmp_path / "run", instances=(("onprem-1", "onprem", 100, True), ("cloud-1", "cloud", 0, False)),
                             control={"admin_token": TOKEN, "actuators": ["dry-run"]}, s3=s3)
    c = Controller(settings, actuator=DryRunActuator(settings.instances))
    srv = serve_api(settings, c)
    base = f"http://{settings.control.api_host}:{settings.control.api_port}"
    yield base, c
    srv.shutdown()
    c.close()


def call(base, method, path, body=None, token=TOKEN, **kw):
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return requests.request(method, base + path, json=body, headers=headers, timeout=10, **kw)


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x", TOKEN[:-1], "Bearer " + TOKEN])
@pytest.mark.parametrize("method,path", [("GET", "/v1/status"), ("GET", "/v1/weights"), ("POST", "/v1/weights"),
                                         ("POST", "/v1/drain"), ("GET", "/v1/history"), ("GET", "/v1/policy")])
def test_no_or_wrong_token_is_401(svc, token, method, path):
    base, c = svc
    r = call(base, method, path, {"weights": {"onprem": 0, "cloud": 100}, "ttl_s": 60}, token=token)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert no_override(c)  # nothing happened


def test_other_auth_schemes_are_401(svc):
    base, _ = svc
    r = requests.get(base + "/v1/status", headers={"Authorization": f"Basic {TOKEN}"}, timeout=5)
    assert r.status_code == 401


def test_healthz_needs_no_token(svc):
    base, _ = svc
    assert call(base, "GET", "/healthz", token=None).json() == {"ok": True}


@pytest.mark.parametrize("body,field", [
    ({"weights": {"onprem": 70, "cloud": 20}}, "weights"),
    ({"weights": {"onprem": 70}}, "weights.cloud"),
    ({"weights": {"onprem": "70", "cloud": 30}}, "weights.onprem"),
    ({"weights": {"onprem": 170, "cloud": -70}}, "weights.onprem"),
    ({"weights": {"onprem": 70.5, "cloud": 29.5}}, "weights.onprem"),
    ({"weights": {"onprem": True, "cloud": 99}}, "weights.onprem"),
    ({"weights": {"onprem": 70, "cloud": 30, "mars": 0}}, "weights.mars"),
    ({"weights": [70, 30]}, "weights"),
    ({}, "weights"),
    ({"weights": {"onprem": 70, "cloud": 30}, "ttl_s": "soon"}, "ttl_s"),
    ({"weights": {"onprem": 70, "cloud": 30}, "ttl_s": 0}, "ttl_s"),
    ({"weights": {"onprem": 70, "cloud": 30}, "ttl_s": "30d"}, "ttl_s"),
    ({"weights": {"onprem": 70, "cloud": 30}, "note": 5}, "note"),
])
def test_bad_weights_are_400_naming_the_field(svc, body, field):
    base, c = svc
    r = call(base, "POST", "/v1/weights", body)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field
    assert r.json()["error"].startswith(field + ":")
    assert no_override(c)


def test_bad_json_and_bad_targets_are_400(svc):
    base, _ = svc
    r = requests.post(base + "/v1/weights", data=b"{not json", timeout=5,
                      headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = call(base, "POST", "/v1/drain", {"target": "mars-1"})
    assert r.status_code == 400 and r.json()["field"] == "target" and "onprem-1" in r.json()["error"]
    r = call(base, "POST", "/v1/drain", {})
    assert r.status_code == 400 and r.json()["field"] == "target"
    r = call(base, "GET", "/v1/history", params={"since": "yesterday-ish"})
    assert r.status_code == 400 and r.json()["field"] == "since"
    r = call(base, "GET", "/v1/history", params={"limit": "lots"})
    assert r.status_code == 400 and r.json()["field"] == "limit"


def test_unknown_path_and_method(svc):
    base, _ = svc
    assert call(base, "GET", "/v1/nothing").status_code == 404
    assert call(base, "DELETE", "/v1/status").status_code == 405


def test_set_weights_applies_now_audits_and_expires(svc):
    base, c = svc
    r = call(base, "POST", "/v1/weights", {"weights": {"onprem": 30, "cloud": 70}, "ttl_s": "2s", "note": "drill"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["decision"]["reason"] == "override" and d["decision"]["weights"] == {"onprem": 30, "cloud": 70}
    assert c.actuator.observe().site_weights == {"onprem": 30, "cloud": 70}
    w = call(base, "GET", "/v1/weights").json()
    assert w["override"]["weights"] == {"onprem": 30, "cloud": 70} and 0 < w["override"]["ttl_left_s"] <= 2
    assert w["instance_weights"] == {"onprem-1": 30, "cloud-1": 70}
    h = call(base, "GET", "/v1/history", params={"since": "5m"}).json()["decisions"]
    assert h[-1]["reason"] == "override" and h[-1]["old_weights"] == {"onprem": 100, "cloud": 0}
    assert "by api:127.0.0.1" in h[-1]["message"] and "drill" in h[-1]["message"]
    time.sleep(2.1)
    d = c.tick()
    assert d.reason == "override_expired"
    assert call(base, "GET", "/v1/weights").json()["override"] is None


def test_clear_override(svc):
    base, c = svc
    call(base, "POST", "/v1/weights", {"weights": {"onprem": 50, "cloud": 50}, "ttl_s": 600})
    r = call(base, "DELETE", "/v1/weights/override").json()
    assert r["cleared"] is True and no_override(c)


def test_drain_and_undrain(svc):
    base, c = svc
    r = call(base, "POST", "/v1/drain", {"target": "onprem"}).json()
    assert r["kind"] == "site" and r["decision"]["reason"] == "drain"
    assert r["decision"]["weights"] == {"onprem": 0, "cloud": 100}
    assert call(base, "GET", "/v1/status").json()["drained"] == ["onprem"]
    r = call(base, "POST", "/v1/drain", {"target": "cloud-1"}).json()
    assert r["kind"] == "instance"
    assert c.actuator.observe().drained == {"onprem-1", "cloud-1"}
    call(base, "POST", "/v1/undrain", {"target": "onprem"})
    r = call(base, "POST", "/v1/ready", {"target": "cloud-1"}).json()
    assert r["changed"] is True
    assert call(base, "GET", "/v1/status").json()["drained"] == []
    # The history shows who drained what, in order, with the operator state's revision.
    acts = call(base, "GET", "/v1/history", params={"since": "5m"}).json()["operator_actions"]
    assert [(a["action"], a["target"]) for a in acts][-4:] == [
        ("drain", "onprem"), ("drain", "cloud-1"), ("undrain", "onprem"), ("undrain", "cloud-1")]
    assert all(a["by"].startswith("api:127.0.0.1") for a in acts[-4:])
    assert [a["revision"] for a in acts[-4:]] == sorted(a["revision"] for a in acts[-4:])


def test_status_and_policy_views(svc):
    base, _ = svc
    s = call(base, "GET", "/v1/status").json()
    assert s["actuator"] == "dry-run" and set(s["instances"]) <= {"onprem-1", "cloud-1"}
    assert TOKEN not in str(s)
    p = call(base, "GET", "/v1/policy").json()
    assert p["config"]["max_step"] == 20
    assert [i["name"] for i in p["instances"]] == ["onprem-1", "cloud-1"]
    assert p["instances"][0]["sensitive_ok"] is True


def test_rollouts_through_the_api_and_the_agents_versions_as_metrics(svc, tmp_path):
    """The rollout job ticks the S3 rollout machine; operators drive it through /v1/rollouts; the
    versions each agent reports become triton_hybrid_live_version / version_lag."""
    base, c = svc
    settings = c.settings
    # The module's S3 endpoint (fixture s3_server) holds the mirror too.
    client = s3x.make_client(settings.s3)
    store = DesiredStore(client, settings.s3)
    for v in (1, 2):
        write_add_model(tmp_path / "build", v, float(v))
        publish_version(settings, tmp_path / "build", "add_one", v, client=client, retention=False)
    store.update(seed_stable({"add_one": 1}), by="test")
    store.write_status(InstanceStatus(instance="onprem-1", site="onprem", at=time.time(), ready=True,
                                      models={"add_one": {"target": 1, "live": 1, "state": "live"}}))
    store.write_status(InstanceStatus(instance="cloud-1", site="cloud", at=time.time(),
                                      models={"add_one": {"target": 1, "live": None, "state": "waiting"}}))
    [t] = c.rollout.tick()  # v2 published above stable v1: a rollout starts by itself
    assert (t.model, t.version, str(t.to_phase)) == ("add_one", 2, "published")
    reg = c.metrics.registry
    assert reg.get_sample_value("triton_hybrid_live_version", {"instance": "onprem-1", "model": "add_one"}) == 1
    assert reg.get_sample_value("triton_hybrid_version_lag", {"instance": "onprem-1", "model": "add_one"}) == 0
    assert reg.get_sample_value("triton_hybrid_version_lag", {"instance": "cloud-1", "model": "add_one"}) == 1
    assert reg.get_sample_value("triton_hybrid_last_rollout_tick_timestamp_seconds") > 0

    m = call(base, "GET", "/v1/rollouts/add_one").json()["models"]["add_one"]
    assert (m["phase"], m["stable"], m["canary"]["version"]) == ("published", 1, 2)
    r = call(base, "POST", "/v1/rollouts/add_one/abort")
    assert r.status_code == 200 and r.json()["transition"]["to"] == "rolled_back", r.text
    m = call(base, "GET", "/v1/rollouts").json()["models"]["add_one"]
    assert m["stable"] == 1 and "2" in {str(v) for v in m["rejected"]} and m["canary"] is None
    assert call(base, "GET", "/v1/status").json()["rollout"]["transitions"][0]["to"] == "published"

    bad = call(base, "POST", "/v1/rollouts/add_one/explode")
    assert bad.status_code == 400 and bad.json()["field"] == "command" and "rollback" in bad.json()["error"]
    bad = call(base, "POST", "/v1/rollouts/add_one/rollback", {"to": "one"})
    assert bad.status_code == 400 and bad.json()["field"] == "to"
    bad = call(base, "POST", "/v1/rollouts/add_one/pause")  # nothing runs: the machine says why
    assert bad.status_code == 400 and bad.json()["field"] == "command"
    assert call(base, "POST", "/v1/rollouts/add_one/pause", token=None).status_code == 401


def test_decision_metrics_are_exported(svc):
    base, c = svc
    call(base, "POST", "/v1/weights", {"weights": {"onprem": 60, "cloud": 40}, "ttl_s": 60})
    reg = c.metrics.registry
    assert reg.get_sample_value("triton_hybrid_site_weight", {"site": "cloud"}) == 40
    assert reg.get_sample_value("triton_hybrid_weight", {"site": "onprem", "instance": "onprem-1"}) == 60
    assert reg.get_sample_value("triton_hybrid_decisions_total", {"reason": "override"}) >= 1
    assert reg.get_sample_value("triton_hybrid_override_active") == 1
    assert reg.get_sample_value("triton_hybrid_last_apply_timestamp_seconds") > 0


# ---- issue 15 finding 3: a slow admin client must not freeze the control loop -------------------
import socket  # noqa: E402

from control.daemon.controller import Daemon  # noqa: E402
from control.waiting import wait_until  # noqa: E402


@pytest.fixture
def daemon(tmp_path, s3):
    """The whole daemon (scheduler + admin API), dry-run actuator, decide every 0.2 s."""
    settings = make_settings(tmp_path / "run", instances=(("onprem-1", "onprem", 100, True), ("cloud-1", "cloud", 0, False)),
                             control={"admin_token": TOKEN, "actuators": ["dry-run"], "decide_interval_s": 0.2,
                                      "poll_interval_s": 0.2, "poll_timeout_s": 0.1, "rollout": {"enabled": False}},
                             s3=s3)
    d = Daemon(settings, actuator=DryRunActuator(settings.instances), serve_metrics=False).start()
    yield settings, d
    d.stop()


def raw(settings, data: bytes, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((settings.control.api_host, settings.control.api_port), timeout=timeout)
    s.sendall(data)
    return s


def status_line(sock: socket.socket) -> str:
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\r\n", 1)[0].decode("latin-1")


def test_a_client_holding_a_partial_body_does_not_stop_the_decide_ticks(daemon):
    settings, d = daemon
    c = d.controller
    head = (f"POST /v1/weights HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n").encode()
    sock = raw(settings, head + b'{"weights": {"onprem"')   # and then nothing: a slow or stuck client
    try:
        t0, ticks0 = time.monotonic(), c.ticks
        time.sleep(5.0)  # the client holds its partial body this long; the scheduler must keep ticking
        ticks = c.ticks - ticks0
        held_s = time.monotonic() - t0
        print(f"\ndecide ticks while a client held a partial body for {held_s:.1f}s: {ticks} "
              f"(interval {settings.control.decide_interval_s}s)")
        assert ticks >= 10, f"only {ticks} decide ticks in {held_s:.1f}s while a client held a partial body"
        # Other clients are served meanwhile, and the idle connection is closed after api_timeout_s.
        assert call(f"http://{settings.control.api_host}:{settings.control.api_port}", "GET", "/v1/weights").ok
        sock.settimeout(settings.control.api_timeout_s + 5)
        assert wait_until(lambda: sock.recv(4096) == b"", settings.control.api_timeout_s + 5,
                          "the server to close the stalled connection", interval=0.0)
    finally:
        sock.close()
    assert no_override(c)  # the half-sent override never happened


@pytest.mark.parametrize("value", ["abc", "-1", "1e3", "+5", "5, 5", "0x10", " "])
@pytest.mark.parametrize("token", [TOKEN, None])
def test_malformed_content_length_is_400_not_a_dropped_connection(daemon, value, token):
    settings, d = daemon
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock = raw(settings, f"POST /v1/weights HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {value}\r\n\r\n{{}}".encode(),
               timeout=5)
    try:
        line = status_line(sock)
    except TimeoutError:
        line = "(no answer within 5 s)"
    finally:
        sock.close()
    assert line.startswith("HTTP/1.1 400"), f"Content-Length {value!r}: {line or '(connection dropped)'}"
    assert no_override(d.controller)


@pytest.mark.parametrize("ttl", [0.5, "0.5s", "0.2", 0.999])
def test_ttl_below_the_documented_minimum_is_refused(svc, ttl):
    base, c = svc
    r = call(base, "POST", "/v1/weights", {"weights": {"onprem": 70, "cloud": 30}, "ttl_s": ttl})
    assert r.status_code == 400, f"ttl_s={ttl!r} was accepted: {r.text}"
    assert r.json()["field"] == "ttl_s" and "between 1s" in r.json()["error"]
    assert no_override(c)


def test_body_over_the_size_limit_is_refused(svc):
    base, c = svc
    r = requests.post(base + "/v1/weights", data=b"{" + b" " * (2 * 1024 * 1024) + b"}", timeout=10,
                      headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert r.status_code in (400, 413), r.text
    assert no_override(c)


# ---- issue 16: operator state in S3 ------------------------------------------------------------
def test_operator_changes_go_to_s3_and_only_real_changes_are_audited(svc):
    base, c = svc
    assert call(base, "POST", "/v1/drain", {"target": "cloud-1"}).json()["changed"] is True
    assert call(base, "POST", "/v1/drain", {"target": "cloud-1"}).json()["changed"] is False
    assert call(base, "DELETE", "/v1/weights/override").json()["cleared"] is False
    st = c.operator.store.read().state
    assert set(st.drains) == {"cloud-1"} and st.drains["cloud-1"].by == "api:127.0.0.1"
    rows = c.audit.operator_history()
    assert [(r["action"], r["target"], r["revision"]) for r in rows] == [("drain", "cloud-1", st.revision)]
    assert call(base, "GET", "/v1/status").json()["operator_state"]["revision"] == st.revision


def test_operator_state_unwritable_is_503_and_nothing_changes(tmp_path):
    settings = make_settings(tmp_path / "run", instances=(("onprem-1", "onprem", 100, True), ("cloud-1", "cloud", 0, False)),
                             control={"admin_token": TOKEN, "actuators": ["dry-run"]},
                             s3={"port": free_port(), "start_local_server": False})  # nothing listens there
    c = Controller(settings, actuator=DryRunActuator(settings.instances))
    srv = serve_api(settings, c)
    try:
        base = f"http://{settings.control.api_host}:{settings.control.api_port}"
        r = call(base, "POST", "/v1/drain", {"target": "onprem"})
        assert r.status_code == 503 and "operator.json" in r.json()["error"] and "nothing changed" in r.json()["error"]
        assert c.audit.operator_history() == [] and c.tick().reason != "drain"
    finally:
        srv.shutdown()
        c.close()
