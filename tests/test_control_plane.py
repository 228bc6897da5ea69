"""Acceptance of the control plane against two real Tritons behind a real HAProxy.

A tiny Python-backend model (`slow_add`, ~10 ms per request, one instance) so that a bounded load
on on-prem builds a real queue in Triton (`nv_inference_queue_duration_us`). Both Tritons share
this host and so its CPU utilization; the policy here uses queue time only (`util_signal: none`).
Measured figures are printed (`-s`) and appended to reports/control_plane.json.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from click.testing import CliRunner
from tritonclient.utils import InferenceServerException

from bench.common import load_queries, triton_http_caller
from bench.rollout import SteadyLoad, next_version_dir
from control.adapters import s3 as s3x
from control.adapters.haproxy_runtime import HAProxyRuntime
from control.cli import cli
from control.daemon.controller import Controller, Daemon
from control.drills.load import run_load
from control.drills.models import write_add_model
from control.local import stack as local_stack
from control.local.haproxy import start_haproxy
from control.local.isolated import isolated_settings as make_settings
from control.local.s3_endpoint import start_s3_server
from control.local.triton_server import start_triton
from control.traffic.actuators import DryRunActuator
from control.traffic.audit import Audit
from control.traffic.policy import PolicyState
from control.traffic.triton_metrics import parse
from control.waiting import WaitTimeout, wait_until

pytestmark = pytest.mark.slow

MODEL = "slow_add"
POLICY = {"util_signal": "none", "queue_time_high_ms": 15.0, "queue_time_low_ms": 3.0, "sustain_ticks": 2,
          "max_step": 25, "cooldown_s": 1.0, "failback_healthy_s": 3.0, "stale_after_s": 3.0,
          "home_onprem_weight": 100, "max_cloud_weight": 100}
# Open-loop load (like users), above one Triton's ~90 req/s of the 10 ms model.
LOAD_RPS = 130.0
REPORT = Path(__file__).resolve().parent.parent / "reports" / "control_plane.json"
FIGURES: dict = {}


def write_repo(root: Path) -> Path:
    write_add_model(root / "repo", 1, 1.0, name=MODEL, delay_ms=10, batched=False)
    return root / "repo"


def success_counts(settings) -> dict[str, float]:
    return {i.name: parse(requests.get(i.metrics_url, timeout=2).text).success for i in settings.instances}


def wait_for(pred, timeout, step=0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):

    root = tmp_path_factory.mktemp("cp")
    settings = make_settings(root / "run", instances=(("onprem-1", "onprem", 100, True), ("cloud-1", "cloud", 0, False)),
                             control={"policy": POLICY, "poll_interval_s": 0.5, "decide_interval_s": 0.5,
                                      "rollout": {"enabled": False}},
                             haproxy={"served_models": [MODEL]})  # through the proxy's allowlist
    repo = write_repo(root)
    procs, stack_info = [], {}
    try:
        for inst in settings.instances:
            procs.append(start_triton(inst.name, repo, inst.http_port, inst.grpc_port, inst.metrics_port,
                                      settings.run_path, load_models=(MODEL,), ready_timeout=60))
        procs.append(start_haproxy(settings))
        procs.append(start_s3_server(settings))  # the operator state (overrides, drains) lives in S3
        s3x.ensure_bucket(s3x.make_client(settings.s3), settings.s3)
        daemon = Daemon(settings).start()
        stack_info = {"settings": settings, "daemon": daemon, "procs": {p.name: p for p in procs}, "repo": repo,
               "rt": HAProxyRuntime.for_settings(settings)}
        yield stack_info
        stack_info["daemon"].stop()
    finally:
        for p in [*procs, *stack_info.get("procs", {}).values()][::-1]:
            p.stop()
        if FIGURES:
            REPORT.parent.mkdir(exist_ok=True)
            REPORT.write_text(json.dumps(FIGURES, indent=2))


def api(stack, method, path, body=None):
    s = stack["settings"].control
    r = requests.request(method, f"http://{s.api_host}:{s.api_port}{path}", json=body, timeout=10,
                         headers={"Authorization": f"Bearer {s.admin_token.get_secret_value()}"})
    assert r.status_code == 200, r.text
    return r.json()


def haproxy_weights(stack, backend="be_triton_http"):
    return {s.server: s.weight for s in stack["rt"].servers() if s.backend == backend}


def counted_after(settings, before: dict[str, float], n: int) -> dict[str, float]:
    """Success counters once Triton's metrics (refreshed every second) count n requests since `before`."""
    def counted():
        now = success_counts(settings)
        return now if sum(now[k] - before[k] for k in now) >= n else None
    return wait_until(counted, 10, f"Triton's metrics counting the {n} requests")


def measure_split(stack, n=400, protocol="http"):
    settings = stack["settings"]
    url = f"127.0.0.1:{settings.haproxy.http_port if protocol == 'http' else settings.haproxy.grpc_port}"
    before = success_counts(settings)
    res = run_load(url, MODEL, protocol=protocol, concurrency=2, duration_s=60, max_requests=n, shape=(1, 4))
    assert res.failure == 0, res.errors
    # Triton refreshes its metrics every second: wait until they count every request sent.
    after = counted_after(settings, before, n)
    d = {k: after[k] - before[k] for k in after}
    tot = sum(d.values())
    assert tot == n, d
    return {k: round(100 * v / tot, 1) for k, v in d.items()}


def test_01_starts_home_and_healthy(stack):
    c: Controller = stack["daemon"].controller
    assert wait_for(lambda: all(s.state.value == "healthy" for s in c.poller.latest().values()), 10)
    assert wait_for(lambda: haproxy_weights(stack) == {"onprem-1": 100, "cloud-1": 0}, 5)
    assert c.weights == {"onprem": 100, "cloud": 0}


@pytest.mark.parametrize("protocol,onprem", [("http", 70), ("grpc", 70), ("http", 20), ("grpc", 85)])
def test_02_measured_split_matches_set_weights(stack, protocol, onprem):
    cloud = 100 - onprem
    api(stack, "POST", "/v1/weights", {"weights": {"onprem": onprem, "cloud": cloud}, "ttl_s": 120})
    assert haproxy_weights(stack, "be_triton_http") == {"onprem-1": onprem, "cloud-1": cloud}
    assert haproxy_weights(stack, "be_triton_grpc") == {"onprem-1": onprem, "cloud-1": cloud}
    split = measure_split(stack, 400, protocol)
    FIGURES[f"split_{onprem}_{cloud}_{protocol}"] = split
    assert abs(split["onprem-1"] - onprem) <= 5 and abs(split["cloud-1"] - cloud) <= 5, split
    api(stack, "DELETE", "/v1/weights/override")


def test_03_load_on_onprem_moves_weight_to_cloud_and_back(stack):
    c: Controller = stack["daemon"].controller
    settings = stack["settings"]
    assert wait_for(lambda: c.weights == {"onprem": 100, "cloud": 0}, 20), c.weights
    recorded, stop = [], threading.Event()

    def record():
        while not stop.is_set():
            snaps = c.poller.latest()
            recorded.append({"now": time.time(), "snapshots": {k: v.to_dict() for k, v in snaps.items()}})
            time.sleep(0.5)

    rec = threading.Thread(target=record, daemon=True)
    rec.start()
    load_stop = threading.Event()
    out = {}
    t_load = time.monotonic()
    lt = threading.Thread(target=lambda: out.setdefault("r", run_load(
        f"127.0.0.1:{settings.haproxy.http_port}", MODEL, concurrency=8, duration_s=40, max_requests=100_000,
        rate_limit_rps=LOAD_RPS, stop=load_stop)), daemon=True)
    lt.start()
    moved = wait_for(lambda: c.weights["cloud"] >= 25, 30)
    t_moved = time.monotonic() - t_load
    # Keep the load on for a while: the weights should settle (hysteresis), not swing home.
    during = []
    t_hold = time.monotonic()
    while time.monotonic() - t_hold < 10 and lt.is_alive():
        during.append(c.weights["cloud"])
        time.sleep(0.25)
    peak = {"onprem": 100 - max(during), "cloud": max(during)}
    load_stop.set()
    lt.join(30)
    t_stop = time.monotonic()
    back = wait_for(lambda: c.weights == {"onprem": 100, "cloud": 0}, 40)
    t_back = time.monotonic() - t_stop
    stop.set()
    rec.join(2)
    hist = [r.to_dict() for r in c.audit.history(time.time() - 200, 1000, changes_only=True)]
    reasons = [h["reason"] for h in hist]
    changes = [b - a for a, b in zip(during, during[1:]) if b != a]
    reversals = sum(1 for a, b in zip(changes, changes[1:]) if a * b < 0)
    FIGURES["load"] = {"seconds_to_first_cloud_step": round(t_moved, 1), "peak_weights": dict(peak),
                       "cloud_weight_while_loaded": sorted(set(during)), "direction_reversals_while_loaded": reversals,
                       "seconds_back_home_after_load": round(t_back, 1), "load": out["r"].to_dict(),
                       "reasons": reasons, "policy": POLICY}
    print(json.dumps(FIGURES["load"], indent=1))
    if os.environ.get("TRITON_HYBRID_RECORD"):
        (Path(__file__).parent / "fixtures" / "recorded_snapshots.json").write_text(
            json.dumps({"note": "recorded by tests/test_control_plane.py (TRITON_HYBRID_RECORD=1): poller "
                        "snapshots of two real Tritons, open-loop load on on-prem, then none",
                        "policy": POLICY, "ticks": recorded}, indent=0))
    assert moved, f"weight never moved to the cloud: {c.weights}, reasons {reasons}"
    # Window: sustain_ticks x decide_interval plus a poll: well under 10 s on this machine.
    assert t_moved < 10, t_moved
    assert "scale_out_queue" in reasons
    assert min(during) > 0, f"weight went home while the load was still on: {during}"
    # Flapping is a weight that keeps swinging (>= 3 reversals in 10 s without the anti-flap rule,
    # tests/test_policy.py pins 0 on recorded snapshots). Live on a shared 2-core host, the measured
    # "hot" rate is noisy: one step back and forth (2 reversals) was seen once in four CI runs.
    assert reversals <= 2, f"weights flapped under a steady load: {during}"
    assert back, f"weight did not come back: {c.weights}"
    assert "scale_in_recovered" in reasons
    assert haproxy_weights(stack) == {"onprem-1": 100, "cloud-1": 0}


def test_04_override_holds_for_ttl_then_expires(stack):
    c: Controller = stack["daemon"].controller
    t0 = time.monotonic()
    api(stack, "POST", "/v1/weights", {"weights": {"onprem": 40, "cloud": 60}, "ttl_s": "4s"})
    assert haproxy_weights(stack) == {"onprem-1": 40, "cloud-1": 60}
    held = []
    while time.monotonic() - t0 < 3.5:
        held.append(c.weights["cloud"])
        time.sleep(0.2)
    assert set(held) == {60}, held
    assert wait_for(lambda: c.last_decision and c.last_decision.reason != "override", 3)
    back = wait_for(lambda: c.weights == {"onprem": 100, "cloud": 0}, 20)
    FIGURES["override_ttl_4s"] = {"held_s": round(3.5, 1), "seconds_until_home": round(time.monotonic() - t0, 1)}
    assert back
    reasons = [r.reason for r in c.audit.history(time.time() - 30, 500, changes_only=True)]
    assert "override_expired" in reasons


def test_05_hand_edit_of_haproxy_is_reconciled(stack):
    c: Controller = stack["daemon"].controller
    assert wait_for(lambda: haproxy_weights(stack) == {"onprem-1": 100, "cloud-1": 0}, 5)
    drift_before = c.metrics.drift._value.get()
    stack["rt"].set_weight("be_triton_http", "cloud-1", 77)
    stack["rt"].set_state("be_triton_grpc", "onprem-1", "maint")
    assert haproxy_weights(stack)["cloud-1"] == 77
    t0 = time.monotonic()
    fixed = wait_for(lambda: haproxy_weights(stack) == {"onprem-1": 100, "cloud-1": 0} and all(
        s.admin == "ready" for s in stack["rt"].servers()), 5)
    FIGURES["drift_reconcile_s"] = round(time.monotonic() - t0, 2)
    assert fixed
    assert c.metrics.drift._value.get() > drift_before


def test_06_drain_and_undrain_an_instance(stack):
    api(stack, "POST", "/v1/drain", {"target": "cloud-1"})
    st = {(s.backend, s.server): s.admin for s in stack["rt"].servers()}
    assert st[("be_triton_http", "cloud-1")] == "drain" and st[("be_triton_grpc", "cloud-1")] == "drain"
    api(stack, "POST", "/v1/undrain", {"target": "cloud-1"})
    st = {(s.backend, s.server): s.admin for s in stack["rt"].servers()}
    assert st[("be_triton_http", "cloud-1")] == "ready"


def test_07_cli_reads_daemon_and_sets_weights(stack, tmp_path):

    settings = stack["settings"]
    data = settings.model_dump(mode="json", exclude={"source"})
    data["control"]["admin_token"] = settings.control.admin_token.get_secret_value()
    data["s3"]["access_key_id"] = settings.s3.access_key_id.get_secret_value()
    data["s3"]["secret_access_key"] = settings.s3.secret_access_key.get_secret_value()
    data["control"]["route53"].pop("access_key_id")
    data["control"]["route53"].pop("secret_access_key")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(data))
    r = CliRunner().invoke(cli, ["--config", str(cfg), "weights", "show", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["source"] == "daemon"
    r = CliRunner().invoke(cli, ["--config", str(cfg), "weights", "set", "onprem=80", "cloud=20", "--ttl", "3s"])
    assert r.exit_code == 0, r.output
    assert haproxy_weights(stack) == {"onprem-1": 80, "cloud-1": 20}, (r.output, stack["daemon"].controller.last_decision)
    r = CliRunner().invoke(cli, ["--config", str(cfg), "weights", "set", "onprem=80", "cloud=30"])
    assert r.exit_code != 0 and "must add up to 100" in r.output
    r = CliRunner().invoke(cli, ["--config", str(cfg), "history", "--since", "5m", "--json"])
    assert r.exit_code == 0 and any(d["reason"] == "override" for d in json.loads(r.output)["decisions"])
    r = CliRunner().invoke(cli, ["--config", str(cfg), "history", "--since", "5m"])
    assert r.exit_code == 0 and re.search(r"operator override +- +by api:127\.0\.0\.1 \(generation", r.output), r.output
    r = CliRunner().invoke(cli, ["--config", str(cfg), "policy", "show", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["config"]["queue_time_high_ms"] == 15.0
    api(stack, "DELETE", "/v1/weights/override")


def test_08_restart_resumes_from_database_and_haproxy(stack):
    d: Daemon = stack["daemon"]
    api(stack, "POST", "/v1/weights", {"weights": {"onprem": 55, "cloud": 45}, "ttl_s": 60})
    d.stop()
    settings = stack["settings"]
    d2 = Daemon(settings)
    assert d2.controller.weights == {"onprem": 55, "cloud": 45}
    assert "observed" in d2.controller.resumed_from
    d2.start()
    stack["daemon"] = d2
    time.sleep(1.5)
    assert d2.controller.last_decision.reason == "override"
    assert haproxy_weights(stack) == {"onprem-1": 55, "cloud-1": 45}
    api(stack, "DELETE", "/v1/weights/override")


def test_085_haproxy_restart_is_reconciled(stack):
    """HAProxy restarts with its config weights (100/0); the daemon puts the override back."""
    c: Controller = stack["daemon"].controller
    api(stack, "POST", "/v1/weights", {"weights": {"onprem": 35, "cloud": 65}, "ttl_s": 60})
    assert haproxy_weights(stack) == {"onprem-1": 35, "cloud-1": 65}
    stack["procs"]["haproxy"].stop()
    stack["procs"]["haproxy"] = start_haproxy(stack["settings"])
    t0 = time.monotonic()
    fixed = wait_for(lambda: haproxy_weights(stack) == {"onprem-1": 35, "cloud-1": 65}
                     and haproxy_weights(stack, "be_triton_grpc") == {"onprem-1": 35, "cloud-1": 65}, 10)
    FIGURES["haproxy_restart_reconcile_s"] = round(time.monotonic() - t0, 2)
    assert fixed
    assert c.last_error is None
    api(stack, "DELETE", "/v1/weights/override")


def test_09_sensitive_requests_stay_onprem_and_get_503_when_it_is_down(stack):
    import tritonclient.http as th  # noqa: PLC0415 - deferred: pulls in tritonclient, gevent
    settings = stack["settings"]
    c: Controller = stack["daemon"].controller
    hdr = {settings.haproxy.sensitive_header: "1"}
    api(stack, "POST", "/v1/weights", {"weights": {"onprem": 0, "cloud": 100}, "ttl_s": 120})
    assert haproxy_weights(stack) == {"onprem-1": 0, "cloud-1": 100}
    before = success_counts(settings)
    url = f"127.0.0.1:{settings.haproxy.http_port}"
    r1 = run_load(url, MODEL, concurrency=2, max_requests=60, duration_s=30, headers=hdr)
    r2 = run_load(f"127.0.0.1:{settings.haproxy.grpc_port}", MODEL, protocol="grpc", concurrency=2,
                  max_requests=60, duration_s=30, headers=hdr)
    r3 = run_load(url, MODEL, concurrency=2, max_requests=60, duration_s=30)  # not sensitive
    assert r1.failure == r2.failure == r3.failure == 0
    after = counted_after(settings, before, 180)
    d = {k: after[k] - before[k] for k in after}
    FIGURES["sensitive_at_0_100"] = {"onprem_served": d["onprem-1"], "cloud_served": d["cloud-1"]}
    assert d["onprem-1"] == 120 and d["cloud-1"] == 60, d
    api(stack, "DELETE", "/v1/weights/override")

    # On-prem down: sensitive -> 503 with a clear body; normal traffic fails over to the cloud.
    t_stop = time.monotonic()
    stack["procs"]["onprem-1"].stop()
    t_down = time.monotonic()
    FIGURES["triton_stop_s"] = round(t_down - t_stop, 1)
    assert wait_for(lambda: c.weights == {"onprem": 0, "cloud": 100}, 10)
    FIGURES["failover_weights_s"] = round(time.monotonic() - t_down, 1)
    # (a list: a 503 Response is falsy)
    got = wait_for(lambda: (lambda r: [r] if r.status_code == 503 else None)(requests.post(
        f"http://{url}/v2/models/{MODEL}/infer", headers=hdr, timeout=5,
        json={"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]})), 10)
    FIGURES["sensitive_503_s"] = round(time.monotonic() - t_down, 1)
    assert got, "no 503 for a sensitive request with on-prem down"
    resp = got[0]
    assert "never sent to the cloud" in resp.text
    assert c.last_decision.reason == "failover_onprem_down"
    normal = run_load(url, MODEL, concurrency=2, max_requests=40, duration_s=30)
    assert normal.failure == 0
    with pytest.raises(InferenceServerException, match="503|never sent to the cloud"):
        th.InferenceServerClient(url).infer(MODEL, [_inp(th)], headers=hdr)

    # Back up: failback only after failback_healthy_s of health.
    inst = settings.instance("onprem-1")
    stack["procs"]["onprem-1"] = start_triton(inst.name, stack["repo"], inst.http_port, inst.grpc_port,
                                              inst.metrics_port, settings.run_path, load_models=(MODEL,))
    t_up = time.monotonic()
    assert wait_for(lambda: c.last_decision.reason == "failback_wait", 10)
    back = wait_for(lambda: c.weights["onprem"] == 100, 20)
    FIGURES["failback_s"] = round(time.monotonic() - t_up, 1)
    assert back
    assert FIGURES["failback_s"] >= POLICY["failback_healthy_s"]


def test_10_restart_with_a_stale_failover_in_the_database_goes_home_at_once(stack):
    """Issue 15 finding 4 with real Tritons: the last audit row says 'failed over from on-prem'
    (what a daemon writes when the Tritons go down before it does, `down` + `up`), HAProxy still
    has 0/100, both Tritons are healthy. The restarted daemon must observe health before trusting
    that state: home weights on HAProxy from its first tick, no failback wait."""
    settings = stack["settings"]
    d: Daemon = stack["daemon"]
    wait_until(lambda: d.controller.weights == {"onprem": 100, "cloud": 0}, 30, "home weights before the restart")
    d.stop()
    audit = Audit(settings.database_path)
    audit.record(ts=time.time(), reason="failover_onprem_down", message="onprem has no ready instance (unhealthy)",
                 old={"onprem": 100, "cloud": 0}, new={"onprem": 0, "cloud": 100},
                 instance_weights={"onprem-1": 0, "cloud-1": 100}, inputs={},
                 state=PolicyState(failover_site="onprem", pre_failover={"onprem": 100, "cloud": 0},
                                   last_change_at=time.time()), actuator="haproxy", applied=True)
    audit.close()
    for be in ("be_triton_http", "be_triton_grpc"):
        stack["rt"].set_weight(be, "onprem-1", 0)
        stack["rt"].set_weight(be, "cloud-1", 100)
    t_restart = time.time()
    d2 = Daemon(settings)
    stack["daemon"] = d2
    d2.start()
    assert haproxy_weights(stack) == {"onprem-1": 100, "cloud-1": 0}, d2.controller.last_decision
    ticks = d2.controller.ticks
    wait_until(lambda: d2.controller.ticks >= ticks + 4, 20, "four decide ticks after the restart")
    rows = d2.controller.audit.history(t_restart, 1000)
    FIGURES["restart_with_stale_failover"] = {"reasons": [r.reason for r in rows],
                                              "weights": sorted({str(r.new_weights) for r in rows})}
    assert all(r.new_weights == {"onprem": 100, "cloud": 0} for r in rows), FIGURES["restart_with_stale_failover"]
    assert not any(r.reason in ("failback_wait", "failover_onprem_down") for r in rows), [r.reason for r in rows]
    assert haproxy_weights(stack) == {"onprem-1": 100, "cloud-1": 0}


def _inp(th):
    i = th.InferInput("INPUT0", [1, 2], "FP32")
    i.set_data_from_numpy(np.ones((1, 2), np.float32))
    return i


# ---- issue 15 findings 2 and 4 at the controller: fake Tritons (readiness + /metrics under test
# control), the dry-run actuator, time as it comes ----------------------------------------------
class FakeTriton:
    """`/v2/health/ready` (answering after `delay` seconds) and a recorded Triton `/metrics` page."""
    def __init__(self):

        self.delay = 0.0
        metrics = (Path(__file__).parent / "fixtures" / "triton_metrics_cpu.txt").read_bytes()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):  # noqa: N802
                if self.path == "/v2/health/ready" and fake.delay:
                    time.sleep(fake.delay)  # the fake's own slowness, not a wait in the test
                body = b"" if self.path == "/v2/health/ready" else metrics
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the poller gave up on a slow answer

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def fake_pair(tmp_path):

    fakes = {"onprem-1": FakeTriton(), "cloud-1": FakeTriton()}
    settings = make_settings(tmp_path / "run", instances=(("onprem-1", "onprem", 99, True), ("cloud-1", "cloud", 1, False)),
                             control={"actuators": ["dry-run"], "poll_timeout_s": 0.3,
                                      "policy": {"home_onprem_weight": 99, "failback_healthy_s": 10.0}})
    for inst in settings.instances:  # point each instance at its fake
        inst.http_port = inst.metrics_port = fakes[inst.name].port
    yield settings, fakes, (lambda: Controller(settings, actuator=DryRunActuator(settings.instances)))
    for f in fakes.values():
        f.srv.shutdown()
        f.srv.server_close()


def test_one_slow_readiness_probe_does_not_fail_a_site_over(fake_pair):
    settings, fakes, make = fake_pair
    c = make()
    try:
        for _ in range(3):
            c.poll()
            c.tick()
        assert c.weights == {"onprem": 99, "cloud": 1}, c.last_decision
        fakes["onprem-1"].delay = 0.6           # one probe answers after the 0.3 s poll timeout
        c.poll()
        fakes["onprem-1"].delay = 0.0
        d = c.tick()
        assert not d.reason.startswith("failover"), d.message
        assert c.weights == {"onprem": 99, "cloud": 1}
        for _ in range(2):
            c.poll()
            c.tick()
        reasons = [r.reason for r in c.audit.history(0, 100, changes_only=False)]
        assert not any(r.startswith("failover") for r in reasons), reasons
    finally:
        c.close()


def test_restart_does_not_resume_a_stale_failover_when_both_sites_answer(fake_pair):
    """Issue 15 finding 4: the database's last row says 'failed over from on-prem' (written before
    a down+up); both sites are healthy now. The restarted controller's first tick must not hold
    all traffic on the cloud for failback_healthy_s."""
    settings, _, make = fake_pair
    audit = Audit(settings.database_path)
    audit.record(ts=time.time() - 30, reason="failover_onprem_down", message="onprem has no ready instance",
                 old={"onprem": 99, "cloud": 1}, new={"onprem": 0, "cloud": 100},
                 instance_weights={"onprem-1": 0, "cloud-1": 100}, inputs={},
                 state=PolicyState(failover_site="onprem", pre_failover={"onprem": 99, "cloud": 1},
                                   last_change_at=time.time() - 30),
                 actuator="dry-run", applied=True)
    audit.close()
    c = make()
    try:
        c.actuator.current.site_weights = {"onprem": 0, "cloud": 100}  # what the routing layer still has
        c.poll()                                                         # what Daemon.start does
        d = c.tick()
        assert d.weights == {"onprem": 99, "cloud": 1}, (d.reason, d.message)
        assert d.reason not in ("failback_wait", "failover_onprem_down")
        assert c.state.failover_site is None
    finally:
        c.close()


# ---- issue 15 finding 2, live: a full rollout under load never fails a site over ----------------
ROLLOUTS = 3


def test_rollout_under_load_makes_no_failover_decision(tmp_path_factory, cpu_repository, tiny_export):
    """S3 + two hosts (Triton + agent) serving the search_ranking ensemble + HAProxy
    (`control.local.stack.up`), the daemon in this process (real HAProxy actuator, its rollout job
    ticking every second). Under a steady ensemble load through HAProxy, publish a changed `ranker`
    version ROLLOUTS times: each goes canary (one Triton per site: judged against its own stable
    version before the switch) -> analysis -> promoted, while Triton loads a new model and serves.
    The audit must hold no failover decision, the weights never leave home, no request fails."""
    from control.mirror.publish import publish_version  # noqa: PLC0415 - deferred: pulls in boto3, botocore

    repo = tmp_path_factory.mktemp("rollout_repo") / "cpu"
    shutil.copytree(cpu_repository, repo)
    settings = make_settings(tmp_path_factory.mktemp("rollout_stack") / "run", models={"repository_dir": str(repo)},
                             control={"start_daemon": False,
                                      "rollout": {"interval_s": 1.0, "analysis_window_s": 8.0, "min_requests": 3,
                                                  "max_latency_ratio": 3.0, "progress_deadline_s": 90.0}})
    queries = load_queries(tiny_export, 8)
    st = local_stack.up(settings)
    daemon = None
    try:
        daemon = Daemon(settings, serve_metrics=False).start()
        c: Controller = daemon.controller
        store = c.rollout.controller.store
        home = {"onprem": settings.control.policy.home_onprem_weight,
                "cloud": 100 - settings.control.policy.home_onprem_weight}
        wait_until(lambda: c.weights == home and all(s.state.value == "healthy" for s in c.poller.latest().values()),
                   30, "both Tritons healthy at home weights")
        h = settings.haproxy
        t0, timings, reasons = time.time(), [], []
        with SteadyLoad(triton_http_caller(f"{h.host}:{h.http_port}", queries), threads=2) as load:
            wait_until(lambda: load.counts()[0] >= 10, 30, "the ensemble load to get going")
            for _ in range(ROLLOUTS):
                v = next_version_dir(repo, "ranker", change=True)
                r0 = time.monotonic()
                publish_version(settings, repo, "ranker")

                def all_live(v=v):
                    statuses, _ = store.statuses()
                    return (store.read().state.models["ranker"].stable == v and
                            all(statuses[i.name].models["ranker"]["live"] == v for i in settings.instances))
                try:
                    wait_until(all_live, 120, f"ranker v{v} promoted and live on every instance", interval=0.5)
                except WaitTimeout:
                    raise AssertionError(json.dumps(c.rollout.controller.status("ranker"), default=str)[:3000]) from None
                timings.append(round(time.monotonic() - r0, 1))
                reasons.append([r["reason"] for r in c.rollout.controller.audit.history("ranker", 20)
                                if r["version"] == v])
            ticks = c.ticks
            wait_until(lambda: c.ticks >= ticks + 3, 30, "three decide ticks after the last rollout")
        rows = c.audit.history(t0, 100_000, changes_only=False)
        failovers = [(r.reason, r.message) for r in rows if r.reason.startswith("failover")]
        not_healthy = sum(1 for r in rows if any(i.get("state") in ("degraded", "unhealthy")
                                                 for i in r.inputs.get("instances", {}).values()))
        weights = sorted({f"{r.new_weights['onprem']}/{r.new_weights['cloud']}" for r in rows})
        FIGURES["rollout_under_load"] = {
            "rollouts": ROLLOUTS, "publish_to_all_live_s": timings, "rollout_reasons": reasons,
            "decisions": len(rows), "failover_decisions": len(failovers),
            "decisions_with_a_degraded_or_unhealthy_instance": not_healthy,
            "weights_seen": weights, "requests_ok": load.ok, "requests_failed": load.failed}
        print(json.dumps(FIGURES["rollout_under_load"], indent=1))
        for r in reasons:  # each went through the canary analysis, judged against its own stable version
            assert r[:2] == ["published", "canary_chosen"] and "analysis_passed" in r and r[-1] == "promoted", r
        assert failovers == [], failovers
        assert weights == [f"{home['onprem']}/{home['cloud']}"], weights
        assert load.failed == 0, load.errors
    finally:
        if daemon is not None:
            daemon.stop()
        st.stop()
        local_stack.down(settings)
        if FIGURES:
            REPORT.parent.mkdir(exist_ok=True)
            REPORT.write_text(json.dumps(FIGURES, indent=2))
