"""The capacity job: the cost ledger, and (when the scaler is enabled) the scale decision.

  scale   every control.scaler.interval_s: accrue cost (control/capacity/cost.py); with a scale
          actuator: judged snapshots + cloud weight + cloud instances -> control/capacity/scaler.py
          (pure) -> scale actuator (control/capacity/actuators.py) -> audit row (scale_decisions)
          + metrics.
"""
from __future__ import annotations

import logging
import time

from control.capacity.actuators import ScaleActuator, ScaleError, new_instance_cost
from control.capacity.cost import CostLedger, cost_summary
from control.capacity.scaler import (
    ScaleAction,
    ScaleDecision,
    ScalerState,
    decide_scale,
)
from control.daemon.jobs import DecisionJob, Scheduled
from control.daemon.metrics import ControlMetrics
from control.daemon.registry import Registry
from control.daemon.traffic_job import TrafficJob
from control.leader.gate import Gate
from control.traffic.actuators import ActuatorError
from control.traffic.audit import Audit

log = logging.getLogger("triton_hybrid.control")

# Scale actuators whose capacity lives outside the registry (billed while the actuator lists it).
EXTERNAL_CAPACITY = ("asg", "k8s")


class CapacityJob(DecisionJob):
    name = "capacity"

    def __init__(self, settings, registry: Registry, traffic: TrafficJob, audit: Audit, metrics: ControlMetrics,
                 clock=time.time, gate: Gate | None = None):
        super().__init__(settings, registry, audit, metrics, clock)
        self.gate = gate or Gate()
        self.sc = settings.control.scaler
        self.traffic = traffic
        self.scaler: ScaleActuator | None = None  # set by the daemon when the scaler is enabled
        self.state = ScalerState.from_dict(audit.last_scale_state())
        self.last: ScaleDecision | None = None
        self.last_result: dict | None = None
        self.ticks = 0
        self._ledger: CostLedger | None = None
        self._cost_seen: dict[str, float] = {}

    def schedule(self) -> list[Scheduled]:
        return [Scheduled("scale", self.tick, self.sc.interval_s)]

    def account_cost(self, now: float | None = None, listed: list | None = None) -> dict:
        """Accrue observed up-time of every registered instance into the cost ledger; export it.
        `listed`: the actuator's instances where the caller has just listed them (one listing per
        tick: with asg/ec2 each is a cloud API call)."""
        now = self.clock() if now is None else now
        if self._ledger is None:
            self._ledger = CostLedger(self.settings.database_path)
        gap = max(60.0, 3 * self.sc.interval_s)
        snaps = self.traffic.poller.latest()
        instances = self.registry.instances
        registered = {i.name for i in instances}
        for inst in instances:
            s = snaps.get(inst.name)
            self._ledger.observe(inst.name, inst.site, inst.cost_per_hour, bool(s and s.ready), now, gap)
        extra = set()
        if self.scaler is not None and self.sc.actuator in EXTERNAL_CAPACITY:
            try:
                for ci in (self.scaler.instances() if listed is None else listed):
                    if ci.name not in registered:
                        extra.add(ci.name)
                        self._ledger.observe(ci.name, "cloud", ci.cost_per_hour, True, now, gap)
            except Exception as e:  # noqa: BLE001 - cost must not stop the scale job
                log.warning("could not list %s instances for cost: %s", self.scaler.name, e)
        for u in self._ledger.all():  # removed instances stop billing
            if u.instance not in registered and u.instance not in extra and u.up:
                self._ledger.observe(u.instance, u.site, u.cost_per_hour, False, now, gap)
        totals = self._ledger.totals(now, fresh_s=gap)
        for site, t in totals.items():
            seen = self._cost_seen.get(site, 0.0)
            if t["dollars"] > seen:
                self.metrics.cost.labels(site).inc(t["dollars"] - seen)
                self._cost_seen[site] = t["dollars"]
            self.metrics.burn_rate.labels(site).set(t["burn_per_hour"])
        self.metrics.cloud_budget.set(-1 if self.sc.budget_per_hour is None else self.sc.budget_per_hour)
        return totals

    def tick(self) -> ScaleDecision | None:
        now = self.clock()
        acting = self.sc.enabled and self.scaler is not None and self.gate.acting()
        listed, list_error = None, None
        if acting:
            try:
                listed = self.scaler.instances()
            except Exception as e:  # noqa: BLE001 - the cost is still accounted, then the tick fails
                list_error = e
        totals = self.account_cost(now, listed)
        if not acting:  # standby: cost only
            return None
        if list_error is not None:
            raise list_error
        snaps = self.traffic.snapshots(now)
        cloud_weight = int(self.traffic.weights.get("cloud", 0))
        draining = self.registry.draining()
        insts = [i for i in listed if i.name not in draining]
        cost = {"cloud_burn_per_hour": sum(i.cost_per_hour for i in insts),
                "sites": {k: {"dollars": v["dollars"], "burn_per_hour": v["burn_per_hour"]} for k, v in totals.items()}}
        d = decide_scale(snaps, cloud_weight, insts, self.sc, self.state, now, new_instance_cost(self.settings))
        result, error = None, None
        if d.action != ScaleAction.HOLD and not self.gate.acting():
            return None  # the lease was lost during this tick: not attempted
        if d.action != ScaleAction.HOLD:
            log.info("scale %s: %s (%s)", d.action, d.reason, d.message)
            try:
                result = self.scaler.scale_out(d) if d.action == ScaleAction.OUT else self.scaler.scale_in(d)
            except (ScaleError, ActuatorError) as e:
                error = str(e)
                self.metrics.scale_errors.labels(d.action).inc()
                log.error("scale %s failed: %s", d.action, e)
            except Exception as e:  # noqa: BLE001 - boto3/kubectl errors: audit them, keep the loop
                error = f"{type(e).__name__}: {e}"
                self.metrics.scale_errors.labels(d.action).inc()
                log.exception("scale %s failed", d.action)
        after = len(listed) if d.action == ScaleAction.HOLD else len(self.scaler.instances())
        self.audit.record_scale(ts=now, action=d.action, reason=d.reason, message=d.message, count_before=d.count,
                                count_after=after, instance=(result or {}).get("instance") or d.instance,
                                inputs=d.inputs, state=d.state.to_dict(), cost=cost, actuator=self.scaler.name,
                                result=result, error=error)
        self.metrics.scale_decisions.labels(d.action, d.reason).inc()
        self.metrics.cloud_instances.set(after)
        self.state, self.last = d.state, d
        if d.action != ScaleAction.HOLD:
            self.last_result = {"result": result, "error": error, "at": now}
        self.ticks += 1
        if self.ticks % 600 == 0:
            self.audit.prune_scale(now - self.settings.control.audit_retention_h * 3600)
        return d

    def status(self) -> dict:
        d = self.last
        try:
            insts = [i.__dict__ for i in self.scaler.instances()] if self.scaler else []
        except Exception as e:  # noqa: BLE001 - a cloud API error is shown, not raised
            insts = [{"error": str(e)}]
        return {"enabled": self.sc.enabled, "actuator": None if self.scaler is None else self.scaler.name,
                "min_instances": self.sc.min_instances, "max_instances": self.sc.max_instances,
                "budget_per_hour": self.sc.budget_per_hour, "instances": insts,
                "draining": sorted(self.registry.draining()), "state": self.state.to_dict(),
                "last_decision": None if d is None else {"action": d.action, "reason": d.reason, "message": d.message},
                "last_action": self.last_result, "cost": cost_summary(self.settings)}

    def summary(self) -> dict:
        """The scaling part of the daemon's status."""
        d = self.last
        return {"enabled": self.sc.enabled, "actuator": None if self.scaler is None else self.scaler.name,
                "draining": sorted(self.registry.draining()),
                "last_decision": None if d is None else {"action": d.action, "reason": d.reason, "message": d.message}}

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
