"""Is an instance down? Judged over a window of probes and HAProxy's own health check (pure).

    judge(history, lb_up, cfg, now) -> InstanceSnapshot    the newest snapshot with its judged state
    assess(histories, lb_up, cfg, now) -> {name: snapshot}  every instance

One slow readiness probe is not an outage: a Triton loading a model version (every rollout) or
busy for a moment answers late, while HAProxy keeps serving from it. The rules, first match wins:

 1. HAProxy's health check reports the server DOWN (every shared backend that checks it, none in
    maintenance)                     -> unhealthy: the proxy will not route to it anyway.
 2. the newest probe answered 200    -> the poller's state (healthy, or unknown without rates).
 3. HAProxy reports the server UP    -> degraded, never unhealthy: the proxy still routes there.
 4. `health_failures_to_down` (k) of the last `health_window` (n) probes were refused or not
    200                              -> unhealthy.
 5. none of the last n probes answered (slow or failed, window full) -> unhealthy: a hung server
    that no HAProxy vouches for.
 6. otherwise                        -> degraded (slow or failed, below the threshold).
`lb_up` is None where there is no HAProxy view (dry-run or Route53 actuator, a server in
maintenance, not in HAProxy): then rules 4-6 alone decide.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

from control.traffic.snapshot import InstanceSnapshot, InstanceState, Probe


def _window_text(window: Sequence[Probe | None]) -> str:
    failed = sum(p is Probe.FAILED for p in window)
    slow = sum(p is Probe.SLOW for p in window)
    return f"{failed} failed and {slow} slow of the last {len(window)} probes"


def judge(history: Sequence[InstanceSnapshot], lb_up: bool | None, cfg, now: float) -> InstanceSnapshot:
    """`history`: this instance's raw snapshots, oldest first (the poller keeps the last n)."""
    latest = history[-1].aged(now, cfg.stale_after_s)
    window = [s.probe for s in history[-cfg.health_window:]]
    if lb_up is False:
        return replace(latest, state=InstanceState.UNHEALTHY,
                       reason="HAProxy's health check reports it DOWN" + (f"; {latest.reason}" if latest.reason else ""))
    if latest.probe is None or latest.probe is Probe.OK:
        return latest  # answered (or recorded before probes were kept): as the poller saw it
    why = f"{latest.reason} ({_window_text(window)})"
    if lb_up is True:
        return replace(latest, state=InstanceState.DEGRADED, reason=f"{why}; HAProxy's health check reports it UP")
    if sum(p is Probe.FAILED for p in window) >= cfg.health_failures_to_down:
        return replace(latest, state=InstanceState.UNHEALTHY, reason=why)
    if len(window) >= cfg.health_window and all(p in (Probe.SLOW, Probe.FAILED) for p in window):
        return replace(latest, state=InstanceState.UNHEALTHY, reason=f"no probe answered in time: {why}")
    return replace(latest, state=InstanceState.DEGRADED, reason=why)


def assess(histories: Mapping[str, Sequence[InstanceSnapshot]], lb_up: Mapping[str, bool], cfg,
           now: float) -> dict[str, InstanceSnapshot]:
    return {name: judge(h, lb_up.get(name), cfg, now) for name, h in histories.items() if h}
