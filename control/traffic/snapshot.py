"""What the policy knows about one instance at one moment.

State rules (never "healthy and idle" by default):
  unhealthy  judged down: k of the last n readiness probes failed (refused, not 200), or HAProxy's
             own health check reports it DOWN (control/traffic/health.py decides, over a window)
  degraded   a probe was slow (read timeout) or failed, but not enough to call it down, or
             HAProxy still reports it UP: it keeps serving, it does not count as load signal
  unknown    ready, but metrics missing / garbage / stale, or no rate yet (needs two scrapes)
  healthy    ready, metrics parsed, rates from two fresh scrapes

`probe` is the raw outcome of this scrape's readiness GET (`ok`, `slow`, `failed`); the poller's
`state` is the state of this one scrape, before the window and HAProxy's view are applied.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import StrEnum


class InstanceState(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"


class Probe(StrEnum):
    """Outcome of one readiness probe (`GET /v2/health/ready`)."""

    OK = "ok"            # 200 in time
    SLOW = "slow"        # no answer within the poll timeout (busy, loading a model): not "down"
    FAILED = "failed"    # refused, reset, or an answer other than 200


STATES = tuple(s.value for s in InstanceState)


@dataclass(frozen=True)
class InstanceSnapshot:
    name: str
    site: str                       # onprem | cloud
    taken_at: float                 # unix time of the scrape
    state: InstanceState
    reason: str = ""                # why unknown/unhealthy, human-readable
    ready: bool | None = None
    capacity: float = 1.0
    sensitive_ok: bool = False
    gpu_util: float | None = None   # 0..1
    gpu_mem_used_bytes: float | None = None
    gpu_mem_total_bytes: float | None = None
    power_w: float | None = None
    cpu_util: float | None = None   # 0..1 (host)
    request_rate: float | None = None
    failure_rate: float | None = None
    queue_ms: float | None = None
    latency_ms: float | None = None
    pending: float | None = None
    scrape_ms: float | None = None
    probe: Probe | None = None      # None: not probed (recorded before probes were kept, or never polled)

    @property
    def utilization(self) -> float | None:
        """GPU utilization where there is a GPU, CPU utilization otherwise."""
        return self.gpu_util if self.gpu_util is not None else self.cpu_util

    @property
    def util_kind(self) -> str:
        return "gpu" if self.gpu_util is not None else "cpu"

    def aged(self, now: float, stale_after_s: float) -> "InstanceSnapshot":
        """This snapshot as seen at `now`: a healthy one older than `stale_after_s` is unknown."""
        age = now - self.taken_at
        if self.state is InstanceState.HEALTHY and age > stale_after_s:
            return replace(self, state=InstanceState.UNKNOWN, reason=f"metrics stale ({age:.1f}s old)")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        d["probe"] = None if self.probe is None else self.probe.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InstanceSnapshot":
        d = dict(d)
        d["state"] = InstanceState(d["state"])
        if d.get("probe") is not None:
            d["probe"] = Probe(d["probe"])
        return cls(**d)

    def summary(self) -> dict:
        """The few fields the audit keeps per decision."""
        def r(x, n=3):
            return None if x is None else round(x, n)
        return {"state": self.state.value, "util": r(self.utilization), "kind": self.util_kind,
                "queue_ms": r(self.queue_ms, 2), "rps": r(self.request_rate, 1), "reason": self.reason or None,
                "probe": None if self.probe is None else self.probe.value}
