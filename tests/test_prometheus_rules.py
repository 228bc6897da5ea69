"""Prometheus config and rules, checked by the real promtool (Debian `prometheus` 2.42):
- the committed configs equal the generator's output from their registries;
- `promtool check config` on them (which also checks every rule file they load);
- `promtool check rules` on every rule file;
- `promtool test rules`: unit tests of the instance-down, not-ready, failover, weight-stuck,
  error-budget-burn and version-mismatch alerts (deploy/prometheus/tests/);
- every PromQL expression of the Grafana dashboards parses (promtool, as recording rules);
- the generated config for a test's own stack (free ports) is valid too.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml
from http_fakes import QuietHandler

from control.adapters import prometheus_config as pc
from control.adapters.prometheus_config import dashboard_queries
from control.config import PROJECT_ROOT, load_config
from control.local.procs import free_port, load_managed
from control.local.prometheus import start_prometheus, stop_prometheus, write_config

PROM_DIR = PROJECT_ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

pytestmark = pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool not installed (apt-get install prometheus)")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_committed_local_config_is_the_generators_output():
    settings = load_config(PROJECT_ROOT / "deploy" / "local.yaml", environ={})
    assert (PROM_DIR / "prometheus.yml").read_text() == pc.render_local_example(settings), \
        "deploy/prometheus/prometheus.yml is stale: run `triton-hybrid deploy render-prometheus`"


def test_committed_sites_config_is_the_generators_output():
    settings = load_config(PROJECT_ROOT / "deploy" / "sites.yaml", environ={})
    assert (PROM_DIR / "prometheus.sites.yml").read_text() == pc.render_sites_example(settings), \
        "deploy/prometheus/prometheus.sites.yml is stale: run `triton-hybrid deploy render-prometheus`"


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.sites.yml"])
def test_promtool_check_config(name):
    r = promtool("check", "config", str(PROM_DIR / name))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 rule files found" in r.stdout


def test_config_scrapes_every_instance_haproxy_and_control_plane():
    settings = load_config(PROJECT_ROOT / "deploy" / "sites.yaml", environ={})
    cfg = yaml.safe_load(pc.render_sites_example(settings))
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    triton = {sc["labels"]["instance"]: (sc["targets"], sc["labels"]["site"]) for sc in jobs["triton"]["static_configs"]}
    assert triton == {i.name: ([f"{i.host}:{i.metrics_port}"], i.site) for i in settings.instances}
    assert jobs["haproxy"]["static_configs"][0]["targets"] == [f"{settings.haproxy.host}:{settings.haproxy.stats_port}"]
    assert {r["regex"]: r["replacement"] for r in jobs["haproxy"]["metric_relabel_configs"]} == \
        {i.name: i.site for i in settings.instances}
    assert jobs["triton-hybrid-control"]["static_configs"][0]["targets"] == \
        [f"{settings.control.api_host}:{settings.control.metrics_port}"]
    assert jobs["triton-hybrid-control"]["honor_labels"] is True


def test_generated_config_for_a_test_stack_is_valid(settings_factory, tmp_path):

    path = write_config(settings_factory())  # runs promtool check config itself
    cfg = yaml.safe_load(path.read_text())
    assert cfg["rule_files"] == [str(pc.RULES_DIR / "*.yml")]


def test_promtool_check_rules():
    files = sorted(str(p) for p in (PROM_DIR / "rules").glob("*.yml"))
    assert len(files) >= 2
    r = promtool("check", "rules", *files)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_severity_summary_and_description():
    for path in (PROM_DIR / "rules").glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
                    assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_issue_alerts_exist():
    alerts = {r["alert"] for p in (PROM_DIR / "rules").glob("*.yml")
              for g in yaml.safe_load(p.read_text())["groups"] for r in g["rules"] if "alert" in r}
    for required in ("TritonInstanceDown", "TritonGPUSaturated", "TritonLatencySLOBurnFast", "TritonLatencySLOBurnSlow",
                     "TritonHybridFailoverActive", "TritonHybridCloudWeightStuckAtMax", "TritonHybridCloudWeightStuckAtMin",
                     "TritonHybridVersionLag", "TritonHybridVersionMismatch", "TritonHybridPollErrors"):
        assert required in alerts


def test_promtool_test_rules():
    tests = sorted((PROM_DIR / "tests").glob("*.yml"))
    assert tests
    r = promtool("test", "rules", *[str(t) for t in tests])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    covered = "\n".join(t.read_text() for t in tests)
    for alert in ("TritonInstanceDown", "TritonHybridFailoverActive"):
        assert f"alertname: {alert}" in covered


def test_dashboard_queries_parse(tmp_path):
    """promtool has no `check query`; every dashboard expression goes into a rule file as a
    recording rule and `promtool check rules` parses it. This covers the GPU-only panels, whose
    data cannot be checked on a CPU machine (see tests/test_prometheus_live.py)."""
    queries = dashboard_queries()
    assert queries
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:q{n}", "expr": q} for n, (_, q) in enumerate(queries)]}]}
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump(rules))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_start_and_stop_a_real_prometheus(settings_factory):
    """control/local/prometheus.py: the process `up --with-prometheus` starts, on its own: ready,
    pid file, its own process group, the generated config loaded with every rule, scraping the
    configured targets (nothing listens there: up == 0), and stopped by its pid file."""
    settings = settings_factory()
    port = free_port()
    proc = start_prometheus(settings, port=port)
    try:
        assert os.getpgid(proc.pid) == proc.pid
        assert load_managed(settings.run_path, "prometheus").pid == proc.pid
        assert (settings.run_path / "prometheus" / "data").is_dir()
        url = f"http://{settings.control.api_host}:{port}"
        groups = requests.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        assert sum(len(g["rules"]) for g in groups) == len(pc.rule_expressions())
        deadline = time.monotonic() + 20
        up = []
        while time.monotonic() < deadline and len(up) < 2 + len(settings.instances):
            up = requests.get(f"{url}/api/v1/query", params={"query": "up"}, timeout=5).json()["data"]["result"]
            time.sleep(0.5)
        assert {(s["metric"]["job"], s["metric"]["instance"]) for s in up} == \
            {("triton", i.name) for i in settings.instances} | {("haproxy", "haproxy"), ("triton-hybrid-control", "control")}
        assert {s["value"][1] for s in up} == {"0"}
    finally:
        assert stop_prometheus(settings) is True
    assert not proc.alive
    assert load_managed(settings.run_path, "prometheus") is None
    assert stop_prometheus(settings) is False


def test_gpu_only_expressions_return_data_from_gpu_shaped_triton_metrics(settings_factory):
    """No GPU host here, so the live test can only check the nv_gpu_* expressions' syntax. This
    test serves tests/fixtures/triton_metrics_gpu.txt (CONSTRUCTED from Triton 2.51's GPU metric
    names and labels, not recorded; see its header) as each instance's /metrics, scrapes it with a
    real Prometheus, and runs every GPU-only dashboard query and alert operand: they must return
    data, so the label schema (gpu_uuid, summed/averaged per instance) matches what they expect."""
    body = (PROJECT_ROOT / "tests" / "fixtures" / "triton_metrics_gpu.txt").read_bytes()

    class Handler(QuietHandler):
        def do_GET(self):  # noqa: N802
            self.reply(body)

    settings = settings_factory()
    servers = [ThreadingHTTPServer((i.host, i.metrics_port), Handler) for i in settings.instances]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    port = free_port()
    start_prometheus(settings, port=port)
    try:
        url = f"http://{settings.control.api_host}:{port}"
        exprs = [(w, e) for w, e in pc.dashboard_queries() if pc.metric_names(e) & pc.GPU_ONLY_METRICS]
        exprs += [(f"alert {n}", op) for n, e, alert in pc.rule_expressions() if alert
                  for op in pc.split_operands(e) if pc.metric_names(op) & pc.GPU_ONLY_METRICS]
        assert len(exprs) >= 6
        deadline = time.monotonic() + 30
        missing = exprs
        while missing and time.monotonic() < deadline:
            time.sleep(1)
            missing = [(w, e) for w, e in missing if not requests.get(
                f"{url}/api/v1/query", params={"query": e}, timeout=5).json()["data"]["result"]]
        assert not missing, missing
        util = []
        while len(util) < len(settings.instances) and time.monotonic() < deadline:
            util = requests.get(f"{url}/api/v1/query", params={"query": 'avg by (instance) (nv_gpu_utilization{job="triton"})'},
                                timeout=5).json()["data"]["result"]
            time.sleep(0.5)
        assert len(util) == len(settings.instances)
        assert all(float(s["value"][1]) == pytest.approx(0.85) for s in util)  # mean of 0.92 and 0.78
    finally:
        stop_prometheus(settings)
        for s in servers:
            s.shutdown()
            s.server_close()
