"""The daemon's own Prometheus metrics (names documented in control/README_SECTION_CONTROL.md)."""
from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from control.traffic.policy import SITES
from control.traffic.snapshot import STATES


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        p = "triton_hybrid_"
        self.weight = Gauge(p + "weight", "Weight last applied to an instance (share of 100)", ["site", "instance"], registry=r)
        self.site_weight = Gauge(p + "site_weight", "Site weight decided by the policy", ["site"], registry=r)
        self.observed_weight = Gauge(p + "observed_weight", "Weight read back from the actuator",
                                     ["backend", "instance"], registry=r)
        self.decisions = Counter(p + "decisions", "Policy decisions by reason", ["reason"], registry=r)
        self.weight_changes = Counter(p + "weight_changes", "Decisions that changed site weights", ["reason"], registry=r)
        self.instance_state = Gauge(p + "instance_state", "1 for the instance's current state (judged over the probe "
                                    "window and HAProxy's health check)", ["instance", "state"], registry=r)
        self.instance_util = Gauge(p + "instance_utilization", "Last utilization 0..1", ["instance", "kind"], registry=r)
        self.instance_queue = Gauge(p + "instance_queue_ms", "Mean queue time per request (ms)", ["instance"], registry=r)
        self.instance_rate = Gauge(p + "instance_request_rate", "Requests per second", ["instance"], registry=r)
        self.poll_errors = Counter(p + "poll_errors", "Failed scrapes", ["instance"], registry=r)
        self.poll_duration = Histogram(p + "poll_duration_seconds", "Scrape duration", ["instance"], registry=r,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.last_apply = Gauge(p + "last_apply_timestamp_seconds", "Unix time of the last successful apply", registry=r)
        self.apply_errors = Counter(p + "apply_errors", "Failed applies", ["actuator"], registry=r)
        self.drift = Counter(p + "drift_corrections", "Reconciled actuator drift", registry=r)
        self.failover = Gauge(p + "failover_active", "1 while traffic is failed away from the site", ["site"], registry=r)
        self.override = Gauge(p + "override_active", "1 while a manual override is in force", registry=r)
        self.drained = Gauge(p + "drained", "1 for a drained site or instance", ["target"], registry=r)
        self.version_lag = Gauge(p + "version_lag", "Desired minus live version, as the instance's agent reports",
                                 ["instance", "model"], registry=r)
        self.live_version = Gauge(p + "live_version", "Version live on the instance, as its agent reports (0: none)",
                                  ["instance", "model"], registry=r)
        self.last_rollout_tick = Gauge(p + "last_rollout_tick_timestamp_seconds",
                                       "Unix time of the last completed rollout tick", registry=r)
        self.cloud_instances = Gauge(p + "cloud_instances", "Cloud instances the scaler sees", registry=r)
        self.scale_decisions = Counter(p + "scale_decisions", "Scaling decisions by action and reason",
                                       ["action", "reason"], registry=r)
        self.scale_errors = Counter(p + "scale_errors", "Scale actions that failed", ["action"], registry=r)
        self.cost = Counter(p + "cost_dollars", "Cost so far (instance-hours x cost_per_hour)", ["site"], registry=r)
        self.burn_rate = Gauge(p + "cost_burn_rate_dollars_per_hour", "Current burn rate", ["site"], registry=r)
        self.cloud_budget = Gauge(p + "cloud_budget_dollars_per_hour", "Configured hourly cloud budget (-1: none)",
                                  registry=r)
        for s in SITES:
            self.failover.labels(s).set(0)
        self.override.set(0)

    def init_series(self, instances, actuator: str) -> None:
        """Start event counters at 0 for the labels we know, so a dashboard or an alert sees a
        series (and a rate of 0) before the first error instead of nothing."""
        for inst in instances:
            self.poll_errors.labels(inst.name)
        self.apply_errors.labels(actuator)

    def observe_states(self, snapshots) -> None:
        """The judged state of every instance (control/traffic/health.py), once per decide tick."""
        for snap in snapshots:
            for st in STATES:
                self.instance_state.labels(snap.name, st).set(1 if snap.state.value == st else 0)

    def serve(self, port: int, addr: str = "127.0.0.1"):
        return start_http_server(port, addr=addr, registry=self.registry)

    def observe_poll(self, snap, error: bool, seconds: float) -> None:
        self.poll_duration.labels(snap.name).observe(seconds)
        if error:
            self.poll_errors.labels(snap.name).inc()
        if snap.utilization is not None:
            self.instance_util.labels(snap.name, snap.util_kind).set(snap.utilization)
        if snap.queue_ms is not None:
            self.instance_queue.labels(snap.name).set(snap.queue_ms)
        if snap.request_rate is not None:
            self.instance_rate.labels(snap.name).set(snap.request_rate)
