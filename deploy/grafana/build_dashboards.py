"""Builds the provisioned Grafana dashboards (deploy/grafana/dashboards/*.json) from the panel
lists below: `python deploy/grafana/build_dashboards.py`. The JSON is committed; a test checks it
equals this script's output and tests/test_prometheus_live.py runs every query against a real
Prometheus. Queries use no Grafana macros ($__rate_interval ...), so they run as they are in
Prometheus too. Datasource: the provisioned Prometheus, uid `prometheus`.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "prometheus"}

# Triton request rate: successful requests, summed over the models (the ensemble and its steps).
REQ = 'rate(nv_inference_request_success{job="triton"}[1m])'
PER_MODEL_MEAN_MS = ('sum by (instance, model) (rate({m}{{job="triton"}}[1m])) '
                     '/ clamp_min(sum by (instance, model) (rate(nv_inference_request_success{{job="triton"}}[1m])), 1e-9) / 1000')

# (title, panel type, unit, [(expr, legend)], description)
OVERVIEW = [
    ("Row: Traffic", None, None, [], ""),
    ("Traffic by site (Triton, req/s)", "timeseries", "reqps",
     [(f'sum by (site) ({REQ})', "{{site}}")],
     "Successful inference requests per second, counted by each Triton (all models of the ensemble)."),
    ("Traffic by site (HAProxy, responses/s)", "timeseries", "reqps",
     [('sum by (site) (rate(haproxy_server_http_responses_total{job="haproxy"}[1m]))', "{{site}}")],
     "HTTP and gRPC responses per second through HAProxy, by the site of the server that answered."),
    ("Traffic share by site", "timeseries", "percentunit",
     [(f'sum by (site) ({REQ}) / scalar(sum({REQ}))', "{{site}}")],
     "Share of the requests each site served; compare with the weights below."),
    ("Row: Weights and control-plane decisions", None, None, [], ""),
    ("Site weights (policy)", "timeseries", "none",
     [("max by (site) (triton_hybrid_site_weight)", "{{site}}")],
     "Site weights the policy decided (onprem + cloud = 100)."),
    ("Instance weights (applied / HAProxy)", "timeseries", "none",
     [("max by (instance) (triton_hybrid_weight)", "applied {{instance}}"),
      ('max by (server) (haproxy_server_weight{job="haproxy", proxy="be_triton_http"})', "haproxy {{server}}")],
     "Weight the control plane applied, and the weight HAProxy reports for the same server."),
    ("Decisions by reason (per 5m)", "timeseries", "none",
     [("sum by (reason) (increase(triton_hybrid_decisions_total[5m]))", "{{reason}}")],
     "Policy decisions by reason code (steady, scale_out_util, failover_onprem_down, ...)."),
    ("Failover / override", "stat", "none",
     [("max by (site) (triton_hybrid_failover_active)", "failover {{site}}"),
      ("max(triton_hybrid_override_active)", "override")],
     "1 while traffic has failed over away from a site, or while a manual override is in force."),
    ("Instance state (control plane)", "table", "none",
     [("max by (instance, state) (triton_hybrid_instance_state) == 1", "{{instance}} {{state}}")],
     "The state the control plane gives each instance: healthy, unhealthy or unknown."),
    ("Seconds since the last apply", "stat", "s",
     [("time() - max(triton_hybrid_last_apply_timestamp_seconds)", "")],
     "Age of the last successful weight apply + read-back."),
    ("Poll errors (per second)", "timeseries", "none",
     [("sum by (instance) (rate(triton_hybrid_poll_errors_total[5m]))", "{{instance}}")],
     "Failed metric polls of each Triton by the control plane."),
    ("Poll duration p95", "timeseries", "s",
     [("histogram_quantile(0.95, sum by (le, instance) (rate(triton_hybrid_poll_duration_seconds_bucket[5m])))",
       "{{instance}}")],
     "95th percentile of the control plane's scrape of each Triton."),
    ("Row: Cost and cloud scaling", None, None, [], ""),
    ("Burn rate by site vs. cloud budget ($/h)", "timeseries", "currencyUSD",
     [("sum by (site) (triton_hybrid_cost_burn_rate_dollars_per_hour)", "{{site}}"),
      ("max(triton_hybrid_cloud_budget_dollars_per_hour)", "cloud budget (-1: none)")],
     "Instance-hours x cost_per_hour per site, and the configured hourly cloud budget."),
    # Not triton_hybrid_scale_decisions_total: its {action, reason} series only exist after the
    # scaler's first decision, so the live test cannot see them on a quiet stack (ask: initialize).
    ("Cloud instances (scaler)", "timeseries", "none",
     [("max(triton_hybrid_cloud_instances)", "cloud instances")],
     "Cloud instances the elastic scaler sees; scaling decisions are in `triton-hybrid scale history`."),
    ("Row: Errors", None, None, [], ""),
    ("Triton failures (per second)", "timeseries", "reqps",
     [('sum by (site, instance) (rate(nv_inference_request_failure{job="triton"}[5m]))', "{{instance}}")],
     "Failed inference requests by instance."),
    ("Error ratio by site (5m, SLO 0.1%)", "timeseries", "percentunit",
     [("max by (site) (site:triton_request_errors:ratio_rate5m)", "{{site}}")],
     "Failed / all requests; the error-budget alerts burn on this ratio."),
    ("HAProxy 5xx by backend (per second)", "timeseries", "reqps",
     [('sum by (proxy) (rate(haproxy_backend_http_responses_total{job="haproxy", code="5xx"}[5m]))', "{{proxy}}")],
     "5xx answers from HAProxy, including 503s when no server (or no on-prem server for sensitive requests) is up."),
    ("Row: Latency and queue", None, None, [], ""),
    ("Mean latency by site (ms, SLO 100 ms)", "timeseries", "ms",
     [("max by (site) (site:triton_request_latency_ms:mean5m)", "{{site}}")],
     "Mean end-to-end latency per site over 5m (the slowest model's mean: the ensemble)."),
    ("Mean latency by instance and model (ms)", "timeseries", "ms",
     [(PER_MODEL_MEAN_MS.format(m="nv_inference_request_duration_us"), "{{instance}} {{model}}")],
     "Triton request duration per request, per model."),
    ("Mean queue time by instance and model (ms)", "timeseries", "ms",
     [(PER_MODEL_MEAN_MS.format(m="nv_inference_queue_duration_us"), "{{instance}} {{model}}"),
      ("max by (instance) (triton_hybrid_instance_queue_ms)", "control plane {{instance}}")],
     "Time requests wait in Triton's scheduler queue; the policy scales out on it."),
    ("Pending requests", "timeseries", "none",
     [('sum by (instance) (nv_inference_pending_request_count{job="triton"})', "{{instance}}")],
     "Requests queued or executing in each Triton."),
    ("HAProxy response time (avg of last 1024)", "timeseries", "s",
     [('max by (proxy) (haproxy_backend_response_time_average_seconds{job="haproxy"})', "{{proxy}}")],
     "HAProxy's own running average of backend response time."),
    ("Row: Model versions and rollouts", None, None, [], ""),
    ("Live model version per instance (control plane)", "table", "none",
     [("max by (instance, model) (triton_hybrid_live_version)", "{{instance}} {{model}}")],
     "The version each instance's agent reports live."),
    ("Loaded model versions per instance (Triton)", "table", "none",
     [('count by (instance, model, version) (nv_inference_count{job="triton"})', "{{instance}} {{model}} v{{version}}")],
     "Versions each Triton has loaded, from its own metrics."),
    ("Version lag (versions behind the desired one)", "timeseries", "none",
     [("max by (instance, model) (triton_hybrid_version_lag)", "{{instance}} {{model}}")],
     "Desired version minus live version, as the agents report; the version-lag alert fires after 15m above 0."),
    ("Seconds since the last rollout tick", "stat", "s",
     [("time() - max(triton_hybrid_last_rollout_tick_timestamp_seconds)", "")],
     "Age of the control plane's last completed rollout tick."),
]

INSTANCES = [
    ("Row: Serving", None, None, [], ""),
    ("Requests per instance (req/s)", "timeseries", "reqps",
     [("max by (instance) (instance:triton_requests:rate1m)", "{{instance}}")], "Success + failure per second."),
    ("Up (Prometheus scrape)", "stat", "none",
     [('max by (instance) (up{job="triton"})', "{{instance}}")], "1 when Prometheus scrapes the instance."),
    ("HAProxy server UP", "stat", "none",
     [('max by (server) (haproxy_server_status{job="haproxy", proxy="be_triton_http", state="UP"})', "{{server}}")],
     "1 when HAProxy's /v2/health/ready check passes."),
    ("Row: GPU (GPU hosts only)", None, None, [], ""),
    ("GPU utilization", "timeseries", "percentunit",
     [('avg by (instance) (nv_gpu_utilization{job="triton"})', "{{instance}}")],
     "Mean over the instance's GPUs. Empty on CPU-only hosts: Triton exports nv_gpu_* only with a GPU."),
    ("GPU memory used / total", "timeseries", "bytes",
     [('sum by (instance) (nv_gpu_memory_used_bytes{job="triton"})', "used {{instance}}"),
      ('sum by (instance) (nv_gpu_memory_total_bytes{job="triton"})', "total {{instance}}")],
     "Summed over the instance's GPUs (GPU hosts only)."),
    ("GPU power (W)", "timeseries", "watt",
     [('sum by (instance) (nv_gpu_power_usage{job="triton"})', "{{instance}}")], "GPU hosts only."),
    ("Row: CPU and memory", None, None, [], ""),
    ("CPU utilization", "timeseries", "percentunit",
     [('max by (instance) (nv_cpu_utilization{job="triton"})', "{{instance}}")], "Host CPU, as Triton reports it."),
    ("CPU memory used / total", "timeseries", "bytes",
     [('max by (instance) (nv_cpu_memory_used_bytes{job="triton"})', "used {{instance}}"),
      ('max by (instance) (nv_cpu_memory_total_bytes{job="triton"})', "total {{instance}}")], "Host memory."),
    ("Utilization seen by the control plane", "timeseries", "percentunit",
     [("max by (instance, kind) (triton_hybrid_instance_utilization)", "{{instance}} {{kind}}")],
     "The utilization the policy decides on (GPU where present, else CPU)."),
]


def build(uid: str, title: str, spec: list, tags: list[str]) -> dict:
    panels, y, x, pid = [], 0, 0, 1
    for title_, kind, unit, targets, desc in spec:
        if kind is None:
            if x:
                y, x = y + 8, 0
            panels.append({"id": pid, "type": "row", "title": title_.removeprefix("Row: "), "collapsed": False,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            y += 1
        else:
            panel = {
                "id": pid, "type": kind, "title": title_, "description": desc, "datasource": DS,
                "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [{"refId": chr(ord("A") + n), "datasource": DS, "expr": expr, "legendFormat": legend,
                             **({"instant": True, "format": "table"} if kind == "table" else {})}
                            for n, (expr, legend) in enumerate(targets)],
            }
            if kind == "timeseries":
                panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}}
            panels.append(panel)
            x = 12 if x == 0 else 0
            if x == 0:
                y += 8
        pid += 1
    return {
        "uid": uid, "title": title, "tags": tags, "timezone": "utc", "schemaVersion": 38, "version": 1,
        "editable": True, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": []}, "annotations": {"list": []}, "panels": panels,
    }


DASHBOARDS = {
    "triton-hybrid-overview.json": build("triton-hybrid-overview", "Triton hybrid: traffic, weights, decisions",
                                         OVERVIEW, ["triton-hybrid"]),
    "triton-hybrid-instances.json": build("triton-hybrid-instances", "Triton hybrid: instances (GPU, CPU, memory)",
                                          INSTANCES, ["triton-hybrid"]),
}


def render_all() -> dict[str, str]:
    return {name: json.dumps(d, indent=2) + "\n" for name, d in DASHBOARDS.items()}


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
