"""The local scale actuator on the real version path: S3 (moto's server) -> publish -> desired state
-> the new `cloud-2` starts like every host (its agent prepares the desired versions, Triton starts,
the agent registers it in S3 and smoke-checks every model) -> only when its agent is ready: HAProxy
`add server` (both backends) -> served through HAProxy -> scale-in: drain, `del server`, stop the
agent and Triton. A new instance whose agent cannot bring a desired version live is never registered."""
from __future__ import annotations

import time

import pytest
import requests

from control.adapters import s3 as s3x
from control.adapters.haproxy_runtime import HAProxyRuntime
from control.capacity.actuators import LocalProcessScaler, ScaleError, ready_versions
from control.capacity.scaler import ScaleDecision, ScalerState
from control.config import load_config
from control.daemon.controller import Controller
from control.drills.load import run_load
from control.drills.models import write_add_model
from control.local import stack as local_stack
from control.local.agents import start_host
from control.local.haproxy import start_haproxy
from control.local.isolated import isolated_settings as make_settings
from control.local.s3_endpoint import start_s3_server
from control.mirror.desired import DesiredStore, seed_stable
from control.mirror.publish import publish_repository, publish_version
from control.traffic.triton_metrics import parse

pytestmark = pytest.mark.slow


def decision(action, instance=None):
    return ScaleDecision(action, "test", "test", 1, 2 if action == "out" else 1, instance, ScalerState(), {})


@pytest.fixture(scope="module")
def env(tmp_path_factory):

    root = tmp_path_factory.mktemp("scalesync")
    settings = make_settings(root / "run", instances=(("onprem-1", "onprem", 0, True), ("cloud-1", "cloud", 100, False)),
                             control={"actuators": ["haproxy"], "scaler": {"enabled": True, "ready_timeout_s": 60,
                                                                        "drain_timeout_s": 10}},
                             haproxy={"served_models": ["add_one"]})  # through the proxy's allowlist
    repo = root / "repo"
    write_add_model(repo, 1, 1.0)
    write_add_model(repo, 2, 2.0)
    procs = []
    c = None
    try:
        procs.append(start_s3_server(settings))
        client = s3x.make_client(settings.s3)
        publish_repository(settings, repo, progress=False, client=client)
        DesiredStore(client, settings.s3).update(seed_stable({"add_one": 2}), by="test")
        procs += start_host(settings, settings.instance("cloud-1"), ready_timeout=60)
        procs.append(start_haproxy(settings))
        c = Controller(settings)
        yield settings, c
    finally:
        if c is not None:
            c.close()
        for p in procs[::-1]:
            p.stop()
        local_stack.down(settings)  # what the scaler started (pid files in the run dir), also when a test failed


def infer_via_haproxy(settings) -> float:
    r = requests.post(f"http://127.0.0.1:{settings.haproxy.http_port}/v2/models/add_one/infer", timeout=10,
                      json={"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]})
    assert r.status_code == 200, r.text
    return r.json()["outputs"][0]["data"][0]


def test_scale_out_starts_a_host_whose_agent_registers_and_gets_weight_only_when_ready(env):
    settings, c = env
    rt = HAProxyRuntime.for_settings(settings)
    s = LocalProcessScaler(settings, c)
    assert ready_versions(settings, settings.instance("cloud-1")) == {"add_one": [2]}
    r = s.scale_out(decision("out"))
    assert r["instance"] == "cloud-2" and r["versions"] == {"add_one": [2]}
    assert (settings.run_path / "pids" / "cloud-2.json").exists()
    assert (settings.run_path / "pids" / "agent-cloud-2.json").exists()
    # The agent registered the instance in S3 (the rollout's registry) before HAProxy got it.
    statuses, problems = DesiredStore(s3x.make_client(settings.s3), settings.s3).statuses()
    reg = statuses["cloud-2"]
    assert not problems and reg.ready and reg.site == "cloud" and reg.http_url == settings.instance("cloud-2").http_url
    assert reg.at <= r["registered_at"] and reg.models["add_one"]["live"] == 2
    servers = {(x.backend, x.server): x for x in rt.servers()}
    assert servers[("be_triton_http", "cloud-2")].up and servers[("be_triton_grpc", "cloud-2")].up
    assert "cloud-2" in {i.name for i in settings.instances} and "cloud-2" in c.actuator.names
    c.poll()
    c.tick()  # the controller now splits the cloud weight over cloud-1 and cloud-2
    w = {x.server: x.weight for x in rt.servers("be_triton_http")}
    assert w["cloud-2"] > 0 and w["cloud-1"] > 0, w
    rt.set_weight("be_triton_http", "cloud-1", 0)   # only cloud-2 now: it really serves v2
    assert infer_via_haproxy(settings) == 2.0
    # gRPC too (proto h2 to the dynamic server, health check on its HTTP port with check-proto h1).
    rt.set_weight("be_triton_grpc", "cloud-1", 0)
    cloud2 = settings.instance("cloud-2")
    before = parse(requests.get(cloud2.metrics_url, timeout=2).text).success
    res = run_load(f"127.0.0.1:{settings.haproxy.grpc_port}", "add_one", protocol="grpc", concurrency=2,
                   duration_s=20, max_requests=40, shape=(1, 4))
    assert res.failure == 0 and res.success == 40, res.errors
    time.sleep(1.2)
    assert parse(requests.get(cloud2.metrics_url, timeout=2).text).success - before == 40
    c.tick()
    out = s.scale_in(decision("in", "cloud-2"))
    assert out["instance"] == "cloud-2"
    assert "cloud-2" not in {x.server for x in rt.servers()}
    assert "cloud-2" not in {i.name for i in settings.instances}
    assert not (settings.run_path / "pids" / "cloud-2.json").exists()
    assert not (settings.run_path / "pids" / "agent-cloud-2.json").exists()
    assert infer_via_haproxy(settings) == 2.0


def test_an_instance_whose_agent_cannot_bring_a_version_live_is_never_registered(env, tmp_path):
    settings, c = env
    rt = HAProxyRuntime.for_settings(settings)
    client = s3x.make_client(settings.s3)
    store = DesiredStore(client, settings.s3)
    write_add_model(tmp_path, 1, 0.0, "broken", fail=True)  # loads, fails its smoke check
    publish_version(settings, tmp_path, "broken", 1, client=client)
    store.update(seed_stable({"broken": 1}), by="test")
    s = LocalProcessScaler(settings, c)
    try:
        t0 = time.monotonic()
        with pytest.raises(ScaleError, match=r"broken v1: failed"):
            s.scale_out(decision("out"))
        # A version failed for good ends the wait at once, not at ready_timeout_s (60 s here).
        assert time.monotonic() - t0 < settings.control.scaler.ready_timeout_s
    finally:
        def forget(d):
            d.models.pop("broken")
            return d
        store.update(forget, by="test")
    assert not any(x.server.startswith("cloud-2") for x in rt.servers())
    assert "cloud-2" not in {i.name for i in settings.instances}
    assert not (settings.run_path / "pids" / "cloud-2.json").exists()
    assert not (settings.run_path / "pids" / "agent-cloud-2.json").exists()
    assert s.owned() == set()


def test_scale_in_refuses_a_configured_instance(env):
    settings, c = env
    with pytest.raises(ScaleError, match="not started by the scaler"):
        LocalProcessScaler(settings, c).scale_in(decision("in", "cloud-1"))


def test_a_restarted_daemon_adopts_running_scaled_instances(env):
    settings, c = env
    s = LocalProcessScaler(settings, c)
    assert s.scale_out(decision("out"))["instance"] == "cloud-2"
    fresh = load_config(settings.source, environ={})   # what a restarted daemon reads: no cloud-2
    assert "cloud-2" not in {i.name for i in fresh.instances}
    c2 = Controller(fresh)
    try:
        s2 = LocalProcessScaler(fresh, c2)
        assert s2.adopt() == ["cloud-2"]
        assert [i.name for i in s2.instances()] == ["cloud-1", "cloud-2"] and s2.instances()[1].removable
        c.remove_instance("cloud-2")   # the old controller is gone
        assert s2.scale_in(decision("in", "cloud-2"))["instance"] == "cloud-2"
        assert not (fresh.run_path / "pids" / "cloud-2.json").exists()
        assert s2.adopt() == [] and s2.owned() == set()
    finally:
        c2.close()
