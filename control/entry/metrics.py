"""The entry agent's own Prometheus metrics (served at /metrics by control/entry/api.py)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

P = "triton_hybrid_entry_"
ERROR_KINDS = ("traffic", "haproxy", "report", "state_file", "internal")


class EntryMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.applied_revision = Gauge(P + "applied_revision", "traffic.json revision this HAProxy has (-1: none)",
                                      registry=r)
        self.weight = Gauge(P + "instance_weight", "Weight of an instance in this HAProxy (shared backends)",
                            ["instance"], registry=r)
        self.s3_ok = Gauge(P + "s3_ok", "1 when the last read of traffic.json succeeded", registry=r)
        self.errors = Counter(P + "errors", "Failures of a pass, by kind", ["kind"], registry=r)
        self.last_apply = Gauge(P + "last_apply_timestamp_seconds", "Unix time weights were last applied",
                                registry=r)
        for k in ERROR_KINDS:
            self.errors.labels(k)
        self.applied_revision.set(-1)
