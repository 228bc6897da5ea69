"""The traffic job: poll every instance, judge health, decide (pure policy), apply through the
weight actuator, read back, audit, export metrics.

  poll    every control.poll_interval_s: scrape every instance (control/traffic/poller.py)
  decide  every control.decide_interval_s: the poller's probe windows + the actuator's observed
          state (weights, HAProxy's health verdict) -> control/traffic/health.py -> snapshots,
          + operator controls (S3, control/traffic/operator.py) -> control/traffic/policy.py -> apply
          + read back -> audit + metrics.
          Each tick starts from the state the actuator *observes*, so a hand edit or an HAProxy
          restart (drift) is reconciled.

Restart-safe: the policy state comes back from the last audit row, but a failover in it is only
a suspicion (`PolicyState.as_resumed`) until health has been observed; the current weights come
from the actuator's observed state.

`lock` serialises ticks (one policy state, one plan in flight). It is never held while waiting
on a client: the admin API calls `tick()` with a complete, validated request.
"""
from __future__ import annotations

import logging
import threading
import time

from control.daemon.jobs import DecisionJob, Scheduled
from control.daemon.metrics import ControlMetrics
from control.daemon.registry import Registry
from control.leader.gate import Gate
from control.traffic.actuators import ActuatorError, Observed, Plan, WeightActuator
from control.traffic.audit import Audit
from control.traffic.operator import OperatorView, import_legacy
from control.traffic.health import assess
from control.traffic.policy import (
    SITES,
    Controls,
    Decision,
    PolicyState,
    Reason,
    decide,
    normalize,
    split,
)
from control.traffic.poller import Poller
from control.traffic.snapshot import InstanceSnapshot, InstanceState

log = logging.getLogger("triton_hybrid.control")


def home_weights(settings) -> dict[str, int]:
    h = settings.control.policy.home_onprem_weight
    return {"onprem": h, "cloud": 100 - h}


class TrafficJob(DecisionJob):
    name = "traffic"

    def __init__(self, settings, registry: Registry, actuator: WeightActuator, audit: Audit,
                 metrics: ControlMetrics, operator: OperatorView, clock=time.time, gate: Gate | None = None):
        super().__init__(settings, registry, audit, metrics, clock)
        self.cfg = settings.control.policy
        self.actuator = actuator
        self.operator = operator
        self.gate = gate or Gate()
        # An earlier release kept overrides and drains in the control database: the first time this
        # daemon acts, they go to S3 (once), then the database keeps only the audit.
        ov, drains = audit.legacy_controls()
        self.legacy = (ov, drains) if ov is not None or drains else None
        c = settings.control
        self.poller = Poller(registry.instances, c.poll_timeout_s, c.dcgm_exporter_urls, clock=clock,
                             on_result=metrics.observe_poll, history=self.cfg.health_window)
        registry.subscribe(self.poller)
        registry.subscribe(actuator)
        self.lock = threading.RLock()
        last = audit.last()
        self.state = PolicyState.from_dict(last.state if last else None).as_resumed()
        self.weights = normalize(last.new_weights) if last else home_weights(settings)
        self.resumed_from = "database" if last else "config"
        self.last_health: dict[str, bool] = {}
        self.observe_error: str | None = None
        try:
            obs = actuator.observe()
            self.last_health = dict(obs.health)
            if obs.site_weights:
                self.weights = obs.site_weights
                self.resumed_from = f"{actuator.name} (observed)"
        except ActuatorError as e:
            log.warning("could not observe %s at start: %s", actuator.name, e)
        self.last_decision: Decision | None = None
        self.last_plan: Plan | None = None
        self.last_apply_ok: float | None = None
        self.last_error: str | None = None
        self.ticks = 0
        log.info("control plane resumed weights %s from %s; policy state %s", self.weights, self.resumed_from,
                 self.state)

    def schedule(self) -> list[Scheduled]:
        c = self.settings.control
        return [Scheduled("poll", self.poll, c.poll_interval_s), Scheduled("decide", self.tick, c.decide_interval_s)]

    # ---- inputs --------------------------------------------------------------------------------
    def poll(self) -> dict[str, InstanceSnapshot]:
        return self.poller.poll_once()

    def snapshots(self, now: float, health: dict[str, bool] | None = None) -> dict[str, InstanceSnapshot]:
        """Judged snapshots of every registered instance (never polled yet: unknown, not idle)."""
        snaps = assess(self.poller.histories(), self.last_health if health is None else health, self.cfg, now)
        out = {}
        for inst in self.registry.instances:
            out[inst.name] = snaps.get(inst.name) or InstanceSnapshot(
                inst.name, inst.site, now, InstanceState.UNKNOWN, reason="not polled yet", capacity=inst.capacity,
                sensitive_ok=inst.sensitive_ok)
        return out

    def _observe(self) -> Observed | None:
        try:
            obs = self.actuator.observe()
        except ActuatorError as e:
            log.warning("observe failed: %s", e)
            self.observe_error = str(e)
            return None
        self.observe_error = None
        return obs

    # ---- the tick ------------------------------------------------------------------------------
    def tick(self) -> Decision:
        with self.lock:
            now = self.clock()
            obs = self._observe()
            if obs is not None:
                self.last_health = dict(obs.health)
            snaps = self.snapshots(now)
            controls = self._controls(now)
            # Start from what the actuator really has (reconcile drift); fall back to our memory.
            current = obs.site_weights if obs is not None and obs.site_weights else dict(self.weights)
            old = dict(self.weights)
            d = decide(snaps, old, self.state, self.cfg, now, controls)
            instances = self.registry.instances
            drained = controls.drained | self.registry.draining()
            instance_drained = frozenset(i.name for i in instances if i.name in drained or i.site in drained)
            inst_w = split(d.weights, snaps, instances, drained, self.registry.canary_weights())
            plan = Plan(d.weights, inst_w, instance_drained)
            applied, commands, drift, error = self._apply(plan, now)
            self.last_error = error
            self.audit.record(ts=now, reason=d.reason, message=d.message, old=old, new=d.weights,
                              instance_weights=inst_w, inputs={**d.inputs, "observed": current,
                                                               "haproxy_health": self.last_health},
                              state=d.state, actuator=self.actuator.name, applied=applied, commands=commands,
                              drift=drift, error=error)
            if d.weights != old:
                log.info("weights %s -> %s: %s (%s)", old, d.weights, d.reason, d.message)
                self.metrics.weight_changes.labels(d.reason).inc()
            self.weights, self.state, self.last_decision = d.weights, d.state, d
            if applied:
                self.last_plan = plan
            self.ticks += 1
            self._export(d, inst_w, controls, instances)
            self.metrics.observe_states(snaps.values())
            if self.ticks % 600 == 0:
                self.audit.prune(now - self.settings.control.audit_retention_h * 3600)
            return d

    def _controls(self, now: float):
        """The operator's controls from S3 (the cached copy; re-read at once under a new lease
        generation, so a new leader decides with what its predecessor's operator set)."""
        generation = self.gate.acting_generation()
        if generation is not None and self.legacy is not None:
            self._import_legacy(now)
        return self.operator.state(now, generation).controls()

    def _import_legacy(self, now: float) -> None:
        ov, drains = self.legacy
        try:
            st = self.operator.change(import_legacy(ov, drains, now), by="database import").state
        except Exception as e:  # noqa: BLE001 - S3 down or lease lost: the next acting tick retries
            log.warning("could not import the operator state from the control database yet: %s", e)
            return
        self.audit.record_operator(ts=now, action="import", detail={"drains": [d["target"] for d in drains],
                                   "override": None if ov is None else ov.weights}, by="database import",
                                   generation=st.generation, revision=st.revision)
        self.audit.forget_legacy_controls(now)
        self.legacy = None
        log.info("imported the operator state from the control database into S3: drains %s, override %s",
                 [d["target"] for d in drains], None if ov is None else ov.weights)

    def _apply(self, plan: Plan, now: float) -> tuple[bool, list[str], list[str], str | None]:
        if not self.gate.acting():  # standby: decided (for its status), never applied
            return False, [], [], None
        try:
            res = self.actuator.apply(plan)
        except ActuatorError as e:
            for name in e.by_actuator or [self.actuator.name]:
                self.metrics.apply_errors.labels(name).inc()
            log.error("apply failed: %s", e)
            return False, [], [], str(e)
        # Several actuators: the ones that failed while the others applied (CompositeActuator).
        for name in res.errors:
            self.metrics.apply_errors.labels(name).inc()
        error = "; ".join(f"{name}: {msg}" for name, msg in res.errors.items()) or None
        self.last_apply_ok = now
        self.metrics.last_apply.set(now)
        for s in res.observed.servers:
            if "backend" in s:
                self.metrics.observed_weight.labels(s["backend"], s["server"]).set(s["weight"])
        if res.drift and (self.last_plan is None or self.last_plan == plan):
            # We did not mean to change anything, yet the actuator differed: a hand edit,
            # an HAProxy restart (config weights), or a lost command.
            self.metrics.drift.inc()
            log.warning("reconciled drift on %s: %s", self.actuator.name, res.drift)
        return True, res.commands, res.drift, error

    def _export(self, d: Decision, inst_w: dict, controls: Controls, instances) -> None:
        m = self.metrics
        m.decisions.labels(d.reason).inc()
        for site in SITES:
            m.site_weight.labels(site).set(d.weights[site])
            m.failover.labels(site).set(1 if d.state.failover_site == site else 0)
        for inst in instances:
            m.weight.labels(inst.site, inst.name).set(inst_w.get(inst.name, 0))
        m.override.set(1 if d.reason == Reason.OVERRIDE else 0)
        for target in {*(i.name for i in instances), *SITES}:
            m.drained.labels(target).set(1 if target in controls.drained else 0)

    # ---- views ---------------------------------------------------------------------------------
    def status(self) -> dict:
        now = self.clock()
        obs = self._observe()
        snaps = self.snapshots(now, None if obs is None else obs.health)
        controls = self.operator.state(now).controls()
        d = self.last_decision
        ov = controls.override
        return {
            "daemon": "running", "actuator": self.actuator.name, "weights": self.weights,
            "instance_weights": split(self.weights, snaps, self.registry.instances,
                                      controls.drained | self.registry.draining(), self.registry.canary_weights()),
            "canary_weights": self.registry.canary_weights(),
            "observed": {"error": self.observe_error} if obs is None else obs.to_dict(),
            "last_decision": None if d is None else {"reason": d.reason, "message": d.message},
            "policy_state": self.state.to_dict(),
            "override": None if ov is None or ov.expires_at <= now else
            {"weights": ov.weights, "expires_at": ov.expires_at, "ttl_left_s": round(ov.expires_at - now, 1),
             "by": ov.by, "note": ov.note},
            "drained": sorted(controls.drained),
            "instances": {k: v.to_dict() for k, v in snaps.items()},
            "last_apply_ok": self.last_apply_ok, "last_error": self.last_error, "resumed_from": self.resumed_from,
            "operator_state": self.operator.status(),
        }

    def close(self) -> None:
        self.poller.close()
