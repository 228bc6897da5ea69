"""The cloud scaler: a pure function, no I/O, no clock (like control/traffic/policy.py, fed by the same
snapshots, but separate from it: the policy moves weight, the scaler moves capacity).

    decide_scale(snapshots, cloud_weight, instances, cfg, state, now, new_cost) -> ScaleDecision

`instances` are the cloud's current instances (`CloudInstance`: name, whether the scaler may
remove it, its cost per hour). Rules, first match wins (one reason per decision):

 1. below_min / above_max   the count is outside [min_instances, max_instances]: fix it.
 2. over_budget             the cloud's burn rate (sum of cost_per_hour) exceeds budget_per_hour:
                            scale in (an idle victim only).
 3. unknown_metrics         no serving cloud instance has fresh metrics: hold, counters reset.
 4. hot                     cloud weight >= out_min_cloud_weight and its load is high for
                            `sustain_ticks` ticks -> out, unless at_max, hold_cooldown (out_cooldown_s
                            since the last scale event) or budget_cap (the new instance would take the
                            burn rate above budget_per_hour: the message says so).
 5. idle                    cloud weight <= in_max_cloud_weight and requests/s per capacity below
                            rps_per_capacity_low (and utilization below util_low) continuously for
                            idle_cooldown_s -> in; the victim is the newest removable instance with
                            nothing in flight (`hold_inflight` when every candidate has requests
                            in flight: never scale in an instance that is serving).
 6. steady                  otherwise; counters reset.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Mapping

from control.traffic.snapshot import InstanceSnapshot, InstanceState


class ScaleAction(StrEnum):
    OUT = "out"
    IN = "in"
    HOLD = "hold"


class ScaleReason(StrEnum):
    BELOW_MIN = "below_min"
    ABOVE_MAX = "above_max"
    OVER_BUDGET = "over_budget"
    UNKNOWN_METRICS = "unknown_metrics"
    SCALE_OUT_LOAD = "scale_out_load"
    HOLD_SUSTAIN = "hold_sustain"
    AT_MAX = "at_max"
    HOLD_COOLDOWN = "hold_cooldown"
    BUDGET_CAP = "budget_cap"
    SCALE_IN_IDLE = "scale_in_idle"
    HOLD_IDLE_COOLDOWN = "hold_idle_cooldown"
    AT_MIN = "at_min"
    HOLD_INFLIGHT = "hold_inflight"
    NO_REMOVABLE = "no_removable"
    STEADY = "steady"


ACTIONS = tuple(a.value for a in ScaleAction)
REASONS = tuple(r.value for r in ScaleReason)


@dataclass(frozen=True)
class CloudInstance:
    name: str
    removable: bool = True        # started by the scaler (configured instances are never removed)
    cost_per_hour: float = 0.0
    capacity: float = 1.0


@dataclass(frozen=True)
class ScalerState:
    hot_ticks: int = 0
    idle_since: float | None = None
    last_scale_at: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "ScalerState":
        if not d:
            return cls()
        return cls(**{k: d[k] for k in ("hot_ticks", "idle_since", "last_scale_at") if k in d})


@dataclass(frozen=True)
class ScaleDecision:
    action: ScaleAction
    reason: ScaleReason
    message: str
    count: int                    # cloud instances before
    target: int                   # cloud instances wanted after
    instance: str | None          # the instance to remove (action "in")
    state: ScalerState
    inputs: dict

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.to_dict()
        return d


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def cloud_load(snapshots: Mapping[str, InstanceSnapshot], instances: list[CloudInstance], cfg) -> dict | None:
    """Load of the serving cloud instances; None when none has fresh metrics."""
    names = {i.name for i in instances}
    snaps = [s for s in snapshots.values() if s.site == "cloud" and (not names or s.name in names)]
    fresh = [s for s in snaps if s.state is InstanceState.HEALTHY]
    if not fresh:
        return None
    if cfg.util_signal == "none":
        util = None
    elif cfg.util_signal == "gpu":
        util = _mean(s.gpu_util for s in fresh)
    elif cfg.util_signal == "cpu":
        util = _mean(s.cpu_util for s in fresh)
    else:
        util = _mean(s.utilization for s in fresh)
    cap = sum(max(s.capacity, 0.0) for s in fresh) or float(len(fresh))
    rps = sum(s.request_rate or 0.0 for s in fresh)
    return {"util": util, "queue_ms": _mean(s.queue_ms for s in fresh), "rps": rps,
            "rps_per_capacity": rps / cap, "serving": len(fresh),
            "pending": {s.name: (s.pending or 0.0) for s in snaps}}


def decide_scale(snapshots: Mapping[str, InstanceSnapshot], cloud_weight: int, instances: list[CloudInstance],
                 cfg, state: ScalerState, now: float, new_cost_per_hour: float = 0.0) -> ScaleDecision:
    n = len(instances)
    burn = sum(i.cost_per_hour for i in instances)
    budget = cfg.budget_per_hour
    load = cloud_load(snapshots, instances, cfg)
    inputs = {"cloud_weight": cloud_weight, "count": n, "burn_per_hour": round(burn, 4), "budget_per_hour": budget,
              "load": None if load is None else {k: (round(v, 3) if isinstance(v, float) else v)
                                                  for k, v in load.items()}}

    def out(reason, message, st):
        return ScaleDecision(ScaleAction.OUT, ScaleReason(reason), message, n, n + 1, None, replace(st, hot_ticks=0, idle_since=None,
                                                                               last_scale_at=now), inputs)

    def hold(reason, message, st):
        return ScaleDecision(ScaleAction.HOLD, ScaleReason(reason), message, n, n, None, st, inputs)

    def scale_in(reason, message, st):
        pending = (load or {}).get("pending", {})
        cands = [i for i in instances if i.removable]
        if not cands:
            return hold("no_removable", f"{message}; but no cloud instance was started by the scaler", st)
        idle = [i for i in cands if not pending.get(i.name)]
        if not idle:
            busy = ", ".join(f"{i.name}={pending.get(i.name):g}" for i in cands)
            return hold("hold_inflight", f"{message}; but every candidate has requests in flight ({busy})", st)
        victim = sorted(idle, key=lambda i: _order(i.name))[-1]
        return ScaleDecision(ScaleAction.IN, ScaleReason(reason), f"{message}: remove {victim.name}", n, n - 1, victim.name,
                             replace(st, hot_ticks=0, idle_since=None, last_scale_at=now), inputs)

    def over(cost):
        return budget is not None and cost > budget + 1e-9

    # 1. limits
    if n < cfg.min_instances:
        if over(burn + new_cost_per_hour):
            return hold("budget_cap", f"{n} cloud instances is below min_instances={cfg.min_instances}, but "
                        f"another at ${new_cost_per_hour:g}/h would take the cloud burn rate from ${burn:g}/h to "
                        f"${burn + new_cost_per_hour:g}/h, over the budget of ${budget:g}/h", state)
        return out("below_min", f"{n} cloud instances is below min_instances={cfg.min_instances}", state)
    if n > cfg.max_instances:
        return scale_in("above_max", f"{n} cloud instances is above max_instances={cfg.max_instances}", state)
    # 2. budget
    if over(burn) and n > cfg.min_instances:
        return scale_in("over_budget", f"cloud burn rate ${burn:g}/h is over the budget of ${budget:g}/h", state)
    # 3. metrics
    if load is None:
        return hold("unknown_metrics", "no cloud instance has fresh metrics: no scaling on unknown load",
                    replace(state, hot_ticks=0, idle_since=None))
    # 4. hot
    signals = []
    if load["util"] is not None and load["util"] > cfg.util_high:
        signals.append(f"utilization {load['util']:.2f} > {cfg.util_high:g}")
    if load["queue_ms"] is not None and load["queue_ms"] > cfg.queue_ms_high:
        signals.append(f"queue {load['queue_ms']:.1f} ms > {cfg.queue_ms_high:g} ms")
    if cfg.rps_per_capacity_high is not None and load["rps_per_capacity"] > cfg.rps_per_capacity_high:
        signals.append(f"{load['rps_per_capacity']:.1f} req/s per capacity > {cfg.rps_per_capacity_high:g}")
    if cloud_weight >= cfg.out_min_cloud_weight and signals:
        st = replace(state, hot_ticks=state.hot_ticks + 1, idle_since=None)
        why = f"cloud weight {cloud_weight} >= {cfg.out_min_cloud_weight} and " + ", ".join(signals)
        if st.hot_ticks < cfg.sustain_ticks:
            return hold("hold_sustain", f"{why} ({st.hot_ticks}/{cfg.sustain_ticks} ticks)", st)
        if n >= cfg.max_instances:
            return hold("at_max", f"{why}; already at max_instances={cfg.max_instances}", st)
        if state.last_scale_at is not None and now - state.last_scale_at < cfg.out_cooldown_s:
            left = cfg.out_cooldown_s - (now - state.last_scale_at)
            return hold("hold_cooldown", f"{why}; cooldown {left:.0f}s left", st)
        if over(burn + new_cost_per_hour):
            return hold("budget_cap", f"{why}; scale-out refused: another cloud instance at ${new_cost_per_hour:g}/h "
                        f"would take the cloud burn rate from ${burn:g}/h to ${burn + new_cost_per_hour:g}/h, over "
                        f"the budget of ${budget:g}/h", st)
        return out("scale_out_load", f"{why} for {st.hot_ticks} ticks: {n} -> {n + 1}", st)
    # 5. idle
    util_idle = load["util"] is None or load["util"] < cfg.util_low
    if cloud_weight <= cfg.in_max_cloud_weight and load["rps_per_capacity"] < cfg.rps_per_capacity_low and util_idle:
        since = state.idle_since if state.idle_since is not None else now
        st = replace(state, hot_ticks=0, idle_since=since)
        why = (f"cloud idle (weight {cloud_weight} <= {cfg.in_max_cloud_weight}, "
               f"{load['rps_per_capacity']:.1f} req/s per capacity < {cfg.rps_per_capacity_low:g})")
        if n <= cfg.min_instances:
            return hold("at_min", f"{why}; already at min_instances={cfg.min_instances}", st)
        if now - since < cfg.idle_cooldown_s:
            return hold("hold_idle_cooldown", f"{why} for {now - since:.0f}s of {cfg.idle_cooldown_s:g}s", st)
        return scale_in("scale_in_idle", f"{why} for {now - since:.0f}s", st)
    return hold("steady", "cloud load within bands", replace(state, hot_ticks=0, idle_since=None))


def _order(name: str):
    """`cloud-10` sorts after `cloud-9`."""
    head = name.rstrip("0123456789")
    tail = name[len(head):]
    return (head, int(tail) if tail else -1, name)
