"""What the policy knows about one instance at one moment.

State rules (never "healthy and idle" by default):
  unhealthy  readiness GET failed or was not 200 (the server is down or not ready)
  unknown    ready, but metrics missing / garbage / stale, or no rate yet (needs two scrapes)
  healthy    ready, metrics parsed, rates from two fresh scrapes
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import Enum


class InstanceState(str, Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"


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
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InstanceSnapshot":
        d = dict(d)
        d["state"] = InstanceState(d["state"])
        return cls(**d)

    def summary(self) -> dict:
        """The few fields the audit keeps per decision."""
        def r(x, n=3):
            return None if x is None else round(x, n)
        return {"state": self.state.value, "util": r(self.utilization), "kind": self.util_kind,
                "queue_ms": r(self.queue_ms, 2), "rps": r(self.request_rate, 1), "reason": self.reason or None}
