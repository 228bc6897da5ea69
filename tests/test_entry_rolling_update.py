"""Issue 16: "Rolling update of a site's HAProxy (one replica at a time) under load: 0 failed requests."

The drill (control/drills/rolling.py) does what Kubernetes does around real HAProxy replicas, each in
a network namespace of its own behind a Service VIP made of kube-proxy-style iptables DNAT rules in the
client's namespace; every number and command comes from deploy/k8s/entry/entry-deployment.yaml. The
decisions (rollout order, the rules) are pure and tested here without root; the drill itself needs root.
"""
from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from control.cli import cli
from control.drills import netns, rolling
from control.drills.rolling import (
    ENTRY_MANIFEST,
    EntryPodSpec,
    Step,
    kube_proxy_rules,
    rollout_plan,
    served_requests,
    serving_counts,
)

DRILL_OK, DRILL_WHY = rolling.available()


def test_the_drill_takes_the_rollout_facts_from_the_entry_manifest():
    spec = EntryPodSpec.from_manifest()
    dep = yaml.safe_load(ENTRY_MANIFEST.read_text())
    haproxy = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "haproxy")
    assert spec.pre_stop == tuple(haproxy["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -USR1 1" in spec.pre_stop[-1]          # HAProxy's soft stop, PID 1 of the container
    assert (spec.readiness.path, spec.readiness.port) == ("/metrics", spec.ports["stats"])
    assert spec.replicas >= 2 and (spec.max_surge, spec.max_unavailable) == (1, 0)
    assert spec.args[0] == "haproxy" and "-f" in spec.args
    assert spec.grace_s >= spec.min_ready_s


def test_a_manifest_without_a_prestop_or_probe_is_refused_by_name(tmp_path):
    dep = yaml.safe_load(ENTRY_MANIFEST.read_text())
    c = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "haproxy")
    del c["lifecycle"]
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(dep))
    with pytest.raises(rolling.RollingError, match="no preStop exec command"):
        EntryPodSpec.from_manifest(tmp_path / "d.yaml")


def test_percent_values_round_like_kubernetes():
    assert rolling._count("25%", 2, up=True) == 1 and rolling._count("25%", 2, up=False) == 0
    assert rolling._count(1, 2, up=True) == 1


def test_surge_first_never_serves_with_fewer_than_the_replicas():
    """maxUnavailable 0, maxSurge 1 (the manifest): each new pod is available before an old one goes;
    the Service never has fewer endpoints than replicas, at most one more."""
    old, new = ["a0", "a1"], ["b0", "b1"]
    plan = rollout_plan(old, new, max_surge=1, max_unavailable=0)
    assert plan[:4] == [(Step.START, "b0"), (Step.READY, "b0"), (Step.ADD_ENDPOINT, "b0"), (Step.AVAILABLE, "b0")]
    assert plan[4:7] == [(Step.REMOVE_ENDPOINT, "a0"), (Step.PRE_STOP, "a0"), (Step.STOP, "a0")]
    counts = serving_counts(old, plan)
    assert min(counts) == 2 and max(counts) == 3
    # every pod is ready before it gets traffic, and an endpoint leaves before its preStop runs
    for pod in new:
        assert plan.index((Step.READY, pod)) < plan.index((Step.ADD_ENDPOINT, pod))
    for pod in old:
        assert plan.index((Step.REMOVE_ENDPOINT, pod)) < plan.index((Step.PRE_STOP, pod))


def test_terminate_first_goes_down_by_one_and_no_more():
    plan = rollout_plan(["a0", "a1"], ["b0", "b1"], max_surge=0, max_unavailable=1)
    assert plan[0] == (Step.REMOVE_ENDPOINT, "a0")
    assert min(serving_counts(["a0", "a1"], plan)) == 1
    with pytest.raises(ValueError, match="cannot make progress"):
        rollout_plan(["a0"], ["b0"], max_surge=0, max_unavailable=0)


def test_kube_proxy_rules_pick_each_endpoint_with_equal_chance():
    text = kube_proxy_rules("10.96.0.10", {"http": 8000}, ["10.0.0.2", "10.0.0.3", "10.0.0.4"])
    svc = [ln for ln in text.splitlines() if ln.startswith("-A THD-SVC-HTTP ")]
    # 1/3, then 1/2 of the rest, then the rest: 1/3 each
    assert "--probability 0.3333333333" in svc[0] and "--probability 0.5000000000" in svc[1]
    assert "statistic" not in svc[2]
    dnat = [ln for ln in text.splitlines() if "DNAT" in ln]
    assert [ln.split()[-1] for ln in dnat] == ["10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000"]
    assert "-A THD-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 8000 -j THD-SVC-HTTP" in text
    # an endpoint that left: its chain is declared (flushed) and deleted in the same restore
    again = kube_proxy_rules("10.96.0.10", {"http": 8000}, ["10.0.0.3"], stale=rolling.declared_chains(text))
    assert "-X THD-SEP-HTTP-10-0-0-2" in again and "-X THD-SEP-HTTP-10-0-0-3" not in again
    assert again.rstrip().endswith("COMMIT")
    with pytest.raises(ValueError, match="without endpoints"):
        kube_proxy_rules("10.96.0.10", {"http": 8000}, [])


def test_served_requests_counts_inference_lines_of_haproxys_log():
    log = "\n".join([
        '10.214.0.1:4242 [01/Dec/2026:20:00:00.000] fe_http be_triton_http/onprem-1 0/0/0/2/2 200 312 - - ---- '
        '2/2/0/0/0 0/0 "POST /v2/models/add_one/infer HTTP/1.1"',
        '10.214.0.1:4243 [01/Dec/2026:20:00:00.010] fe_grpc be_triton_grpc/cloud-1 0/0/0/2/2 200 90 - - ---- '
        '2/2/0/0/0 0/0 "POST http://10.96.0.10:8001/inference.GRPCInferenceService/ModelInfer HTTP/2.0"',
        '10.214.0.1:4244 [01/Dec/2026:20:00:00.020] fe_http be_triton_http/<NOSRV> 0/-1/-1/-1/0 503 222 - - SC-- '
        '1/1/0/0/0 0/0 "POST /v2/models/add_one/infer HTTP/1.1"',
        '10.214.0.1:4245 [01/Dec/2026:20:00:00.030] fe_stats fe_stats/<PROMEX> 0/0/0/0/0 200 5000 - - LR-- '
        '1/1/0/0/0 0/0 "GET /metrics HTTP/1.1"',
        '10.214.0.1:4246 [01/Dec/2026:20:00:00.040] fe_http be_triton_http/onprem-1 0/0/0/1/1 200 100 - - ---- '
        '1/1/0/0/0 0/0 "GET /v2/models/add_one/config HTTP/1.1"',
    ])
    assert served_requests(log) == {"200": 2, "503": 1}


def test_the_drill_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(rolling.os, "geteuid", lambda: 1000)
    ok, why = rolling.available()
    assert not ok and "needs root" in why
    monkeypatch.setattr(rolling.os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(rolling.shutil, "which", lambda *a, **k: None)
    ok, why = rolling.available()
    assert not ok and "iptables" in why and "make system-deps" in why


@pytest.mark.slow
@pytest.mark.skipif(not DRILL_OK, reason=DRILL_WHY)
def test_rolling_update_of_a_site_entry_under_load_fails_no_request(tmp_path):
    """Two HAProxy replicas of the on-prem entry, rolled to a new config generation one at a time the
    way the manifest says, under 40 requests/s through the Service VIP: no request fails, each request
    is served by exactly one replica (their own logs), both old replicas served before the rollout and
    the new generation after it, and nothing the drill made is left."""
    rep = rolling.run_rolling_update(tmp_path, rate=40.0, say=print)
    print({k: rep[k] for k in ("requests", "failed", "rollout_s", "served_by_generation")})
    for name, v in rep["served_by_replica"].items():
        print(f"  {name} (generation {v['generation']}): {v['served']} requests")
    assert rep["failed"] == 0, rep["failed_samples"]
    assert rep["requests"] >= 40 * rep["rollout_s"] * 0.8
    per = rep["served_by_replica"]
    assert sum(v["served"] for v in per.values()) == rep["requests"]
    assert all(set(v["by_status"]) <= {"200"} for v in per.values())
    assert all(per[f"entry-g1-{k}"]["served"] > 0 for k in range(2))
    assert rep["served_by_generation"]["2"] > 0
    # each replica runs its generation's config (the new one changed a knob)
    assert all(v["config_health_interval_ms"] == [rolling.GEN_HEALTH_INTERVAL_MS[v["generation"]]]
               for v in per.values())
    steps = [(t["step"], t["pod"]) for t in rep["timeline"]]
    assert steps.index(("available", "entry-g2-0")) < steps.index(("remove-endpoint", "entry-g1-0"))
    assert rep["namespaces"] and not set(rep["namespaces"]) & set(netns.leftovers())


def test_cli_names_the_drill_and_says_why_it_cannot_run_here(monkeypatch, tmp_path):
    monkeypatch.setattr(rolling, "available", lambda: (False, "the entry-rolling-update drill needs root (test)"))
    r = CliRunner().invoke(cli, ["drill", "entry-rolling-update", "--reports", str(tmp_path)])
    assert r.exit_code == 1 and "needs root (test)" in r.output, r.output
