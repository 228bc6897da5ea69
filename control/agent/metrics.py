"""The agent's own Prometheus metrics (served at /metrics by control/agent/api.py)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from control.agent.errors import FailureKind

P = "triton_hybrid_agent_"


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.live_version = Gauge(P + "model_live_version", "Version of the model clients get on this host "
                                  "(0: none)", ["model"], registry=r)
        self.desired_version = Gauge(P + "model_desired_version", "Version the desired state names for this host",
                                     ["model"], registry=r)
        self.model_converged = Gauge(P + "model_converged", "1 when the model is live at its desired version",
                                     ["model"], registry=r)
        self.converged = Gauge(P + "converged", "1 when every model is live at its desired version", registry=r)
        self.converge_errors = Counter(P + "converge_errors", "Failures while converging, by kind", ["kind"],
                                       registry=r)
        self.pulls = Counter(P + "pulls", "Version pulls, by result", ["result"], registry=r)
        self.pulled_bytes = Counter(P + "pulled_bytes", "Bytes downloaded from S3 by this process", registry=r)
        self.last_converge = Gauge(P + "last_converge_timestamp_seconds", "Unix time the last pass ended",
                                   registry=r)
        self.converge_duration = Histogram(P + "converge_duration_seconds", "Duration of one pass", registry=r,
                                           buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        # Start the counters at 0 so a rate() or an alert sees a series before the first event.
        for k in (*FailureKind, "desired", "status", "internal"):
            self.converge_errors.labels(str(k))
        for res in ("ok", "failed"):
            self.pulls.labels(res)
        self.converged.set(0)
