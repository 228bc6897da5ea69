"""Acceptance of the elastic cloud scaler against real Tritons behind a real HAProxy (issue 9).

Two Tritons (onprem-1, cloud-1) serving the ~10 ms `slow_add` Python model of
tests/test_control_plane.py, the daemon with the policy and the scaler, the local-process scale
actuator. An open-loop burst on HAProxy -> on-prem queues -> the policy moves weight to the cloud
-> the cloud's load per instance stays high -> the scaler starts `cloud-2` (a host like any other:
its agent pulls the desired versions from the S3 mirror and smoke-checks them; only then in HAProxy
with weight 0 until its health check is UP) -> the
controller gives it weight -> the burst ends -> weight goes home -> the cloud idles for the
cooldown -> `cloud-2` is drained, deleted from HAProxy and stopped. Zero failed requests.
Then a lower budget: the same burst is refused a scale-out, and the audit says why.
Figures are printed (`-s`) and written to reports/scaling.json.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from control.adapters import s3 as s3x
from control.adapters.haproxy_runtime import HAProxyRuntime
from control.capacity.actuators import LocalProcessScaler
from control.cli import cli
from control.drills.load import run_load
from control.local.admin_keys import ensure_admin_key
from control.local.haproxy import start_haproxy
from control.local.isolated import isolated_settings as make_settings
from control.local.s3_endpoint import start_s3_server
from control.local.triton_server import start_triton
from control.mirror.desired import DesiredStore, seed_stable
from control.mirror.publish import publish_repository
from control.traffic.triton_metrics import parse
from tests.test_control_plane import MODEL, POLICY, wait_for, write_repo

pytestmark = pytest.mark.slow

SCALER = {"enabled": True, "actuator": "local", "interval_s": 1.0, "min_instances": 1, "max_instances": 2,
          "util_signal": "none", "queue_ms_high": 1000.0, "rps_per_capacity_high": 45.0,
          "rps_per_capacity_low": 2.0, "out_min_cloud_weight": 40, "in_max_cloud_weight": 10,
          "sustain_ticks": 2, "out_cooldown_s": 5.0, "idle_cooldown_s": 5.0, "budget_per_hour": 10.0,
          "ready_timeout_s": 60.0, "drain_timeout_s": 20.0}
LOAD_RPS = 130.0
REPORT = Path(__file__).resolve().parent.parent / "reports" / "scaling.json"
FIGURES: dict = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from control.daemon.controller import Daemon  # noqa: PLC0415 - deferred: pulls in boto3, botocore, tritonclient

    root = tmp_path_factory.mktemp("scale")
    settings = make_settings(root / "run", instances=(("onprem-1", "onprem", 100, True), ("cloud-1", "cloud", 0, False)),
                             control={"policy": POLICY, "poll_interval_s": 0.5, "decide_interval_s": 0.5,
                                      "rollout": {"enabled": False}, "scaler": SCALER},
                             haproxy={"served_models": [MODEL]})  # through the proxy's allowlist
    settings.instance("onprem-1").cost_per_hour = 1.0
    settings.instance("cloud-1").cost_per_hour = 4.0
    repo = write_repo(root)
    procs, daemon = [], None
    try:
        # The mirror the scaled instance's agent pulls from: the repository published, stable in desired state.
        procs.append(start_s3_server(settings))
        client = s3x.make_client(settings.s3)
        published = publish_repository(settings, repo, progress=False, client=client)
        DesiredStore(client, settings.s3).update(seed_stable({r.model: r.version for r in published}),
                                                 by="test")
        for inst in settings.instances:
            procs.append(start_triton(inst.name, repo, inst.http_port, inst.grpc_port, inst.metrics_port,
                                      settings.run_path, load_models=(MODEL,), ready_timeout=60,
                                      admin_key=ensure_admin_key(settings, inst)))
        procs.append(start_haproxy(settings))
        daemon = Daemon(settings, scale_actuator=lambda c: LocalProcessScaler(settings, c))
        daemon.start()
        yield {"settings": settings, "daemon": daemon, "rt": HAProxyRuntime.for_settings(settings)}
    finally:
        if daemon is not None:
            daemon.stop()
            daemon.controller.scaler.stop_all()
        for p in procs[::-1]:
            p.stop()
        if FIGURES:
            REPORT.parent.mkdir(exist_ok=True)
            REPORT.write_text(json.dumps(FIGURES, indent=2, default=str))


def served(inst) -> float:
    return parse(requests.get(inst.metrics_url, timeout=2).text).success


def burst(settings, stop, out, duration=60):
    out["r"] = run_load(f"127.0.0.1:{settings.haproxy.http_port}", MODEL, concurrency=8, duration_s=duration,
                        max_requests=100_000, rate_limit_rps=LOAD_RPS, stop=stop)


def test_01_burst_scales_out_then_in_with_zero_failures(stack):
    settings, c, rt = stack["settings"], stack["daemon"].controller, stack["rt"]
    assert wait_for(lambda: c.weights == {"onprem": 100, "cloud": 0} and len(c.scaler.instances()) == 1, 20)
    timeline, watch_stop = [], threading.Event()

    def watch():  # what HAProxy gives cloud-2, sampled every 0.1 s
        while not watch_stop.is_set():
            try:
                w = {s.backend: (s.weight, s.up) for s in rt.servers() if s.server == "cloud-2"}
            except Exception:  # noqa: BLE001
                w = None
            timeline.append((time.time(), w, dict(c.weights)))
            time.sleep(0.1)

    wt = threading.Thread(target=watch, daemon=True)
    wt.start()
    stop, out = threading.Event(), {}
    t0 = time.time()
    lt = threading.Thread(target=burst, args=(settings, stop, out), daemon=True)
    lt.start()
    moved = wait_for(lambda: c.weights["cloud"] >= SCALER["out_min_cloud_weight"], 30)
    t_moved = time.time()
    scaled = wait_for(lambda: any(r["action"] == "out" for r in c.audit.scale_history(t0, 100)), 40)
    out_row = next((r for r in c.audit.scale_history(t0, 100) if r["action"] == "out"), None)
    registered = wait_for(lambda: "cloud-2" in {i.name for i in settings.instances}, 60)
    cloud2 = settings.instance("cloud-2") if registered else None
    # Keep the burst on until cloud-2 has served a share of it.
    got_traffic = registered and wait_for(lambda: served(cloud2) >= 100, 30)
    t_served = time.time()
    time.sleep(2)
    stop.set()
    lt.join(30)
    t_end = time.time()
    scaled_in = wait_for(lambda: any(r["action"] == "in" for r in c.audit.scale_history(t_end, 100)), 60)
    in_row = next((r for r in c.audit.scale_history(t_end, 100) if r["action"] == "in"), None)
    gone = wait_for(lambda: "cloud-2" not in {s.server for s in rt.servers()}, 30)
    t_gone = time.time()
    watch_stop.set()
    wt.join(2)
    res = out["r"]
    res_after = run_load(f"127.0.0.1:{settings.haproxy.http_port}", MODEL, concurrency=2, duration_s=10,
                         max_requests=200)
    first_weight = next((t for t, w, _ in timeline if w and any(x[0] > 0 for x in w.values())), None)
    weights_when_added = next((w for t, w, _ in timeline if w), None)
    result = (out_row or {}).get("result") or {}
    hist = c.audit.scale_history(t0, 1000, changes_only=True)
    FIGURES["burst"] = {
        "load": res.to_dict(), "load_after_scale_in": res_after.to_dict(),
        "s_load_to_cloud_weight_ge_40": round(t_moved - t0, 1),
        "s_load_to_scale_out_decision": None if out_row is None else round(out_row["ts"] - t0, 1),
        "s_decision_to_ready": result.get("seconds_to_ready"),
        "s_decision_to_registered_in_haproxy_and_controller": result.get("seconds_to_registered"),
        "s_load_to_cloud2_weight_gt_0": None if first_weight is None else round(first_weight - t0, 1),
        "cloud2_versions": result.get("versions"),
        "cloud2_haproxy_when_first_seen": weights_when_added,
        "s_load_to_cloud2_served_100": round(t_served - t0, 1),
        "s_load_end_to_scale_in_decision": None if in_row is None else round(in_row["ts"] - t_end, 1),
        "s_load_end_to_cloud2_removed": round(t_gone - t_end, 1),
        "scale_in_result": (in_row or {}).get("result"),
        "reasons": [(r["time"], r["action"], r["reason"], r["message"]) for r in hist],
        "cost": c.scale_status()["cost"], "scaler": SCALER, "policy": POLICY,
    }
    print(json.dumps(FIGURES["burst"], indent=1, default=str))
    assert moved, c.weights
    assert scaled and out_row["reason"] == "scale_out_load", hist
    assert out_row["error"] is None, out_row
    assert registered and result["versions"] == {MODEL: [1]}  # the desired (stable) version, from S3
    # New instance: no weight until the controller registered it (after ready + HAProxy UP).
    assert all(x[0] == 0 for x in weights_when_added.values()), weights_when_added
    assert first_weight is not None and first_weight >= result["registered_at"] - 0.01
    assert got_traffic
    assert scaled_in and in_row["reason"] == "scale_in_idle" and in_row["instance"] == "cloud-2", hist
    assert in_row["error"] is None, in_row
    assert gone and in_row["count_after"] == 1
    assert not Path(settings.run_path / "pids" / "cloud-2.json").exists()
    assert not Path(settings.run_path / "pids" / "agent-cloud-2.json").exists()
    assert res.failure == 0, (res.errors, res.error_samples)
    assert res_after.failure == 0 and res_after.success == 200
    m = c.metrics.registry
    assert m.get_sample_value("triton_hybrid_scale_decisions_total", {"action": "out", "reason": "scale_out_load"}) == 1
    assert m.get_sample_value("triton_hybrid_cloud_instances") == 1
    assert m.get_sample_value("triton_hybrid_cost_dollars_total", {"site": "cloud"}) > 0
    assert m.get_sample_value("triton_hybrid_cost_burn_rate_dollars_per_hour", {"site": "cloud"}) == 4.0


def test_02_budget_cap_stops_scale_out_and_says_so(stack):
    settings, c = stack["settings"], stack["daemon"].controller
    settings.control.scaler.budget_per_hour = 6.0   # cloud-1 burns 4/h; another would make 8/h
    assert wait_for(lambda: c.weights == {"onprem": 100, "cloud": 0}, 30)
    stop, out = threading.Event(), {}
    t0 = time.time()
    lt = threading.Thread(target=burst, args=(settings, stop, out), daemon=True)
    lt.start()
    capped = wait_for(lambda: any(r["reason"] == "budget_cap" for r in c.audit.scale_history(t0, 200)), 40)
    stop.set()
    lt.join(30)
    rows = c.audit.scale_history(t0, 1000)
    cap = next((r for r in rows if r["reason"] == "budget_cap"), None)
    FIGURES["budget_cap"] = {"message": cap and cap["message"], "s_load_to_budget_cap": cap and round(cap["ts"] - t0, 1),
                             "load": out["r"].to_dict()}
    print(json.dumps(FIGURES["budget_cap"], indent=1))
    assert capped, [r["reason"] for r in rows]
    assert "budget" in cap["message"] and "$8/h" in cap["message"] and "$6/h" in cap["message"]
    assert not any(r["action"] == "out" for r in rows)
    assert len(c.scaler.instances()) == 1
    assert out["r"].failure == 0
    api = settings.control
    r = requests.get(f"http://{api.api_host}:{api.api_port}/v1/scale", timeout=5,
                     headers={"Authorization": f"Bearer {api.admin_token.get_secret_value()}"})
    assert r.status_code == 200 and r.json()["last_decision"] is not None
    r = requests.get(f"http://{api.api_host}:{api.api_port}/v1/cost", timeout=5,
                     headers={"Authorization": f"Bearer {api.admin_token.get_secret_value()}"})
    assert r.status_code == 200 and r.json()["sites"]["cloud"]["burn_per_hour"] == 4.0
    assert r.json()["cloud_budget_left_per_hour"] == 2.0

    out = CliRunner().invoke(cli, ["--config", settings.source, "scale", "history", "--since", "10m"])
    assert out.exit_code == 0 and "budget_cap" in out.output and "scale_out_load" in out.output, out.output
    out = CliRunner().invoke(cli, ["--config", settings.source, "cost"])
    assert out.exit_code == 0 and "cost cloud: $" in out.output, out.output
    FIGURES["cli_cost"] = out.output
