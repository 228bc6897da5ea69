"""`triton-hybrid control run`: the control loop.

APScheduler jobs (BackgroundScheduler; `run()` blocks until SIGTERM/SIGINT):
  poll    every control.poll_interval_s: scrape every instance (control/traffic/poller.py)
  decide  every control.decide_interval_s: snapshots + weights + operator controls -> policy ->
          actuator apply + read back -> audit row + metrics. Each tick starts from the state the
          actuator *observes*, so a hand edit or an HAProxy restart (drift) is reconciled.
  sync    every control.sync_interval_s: control.mirror.sync.sync_all(settings) when that module exists.
  scale   every control.scaler.interval_s: cost ledger (control/capacity/cost.py) and, when the scaler is
          enabled, snapshots + cloud weight + cloud instances -> control/capacity/scaler.py -> scale
          actuator (control/capacity/actuators.py) -> audit row (scale_decisions) + metrics.
The registry is mutable at run time: `Controller.add_instance/remove_instance` (the scaler's
instances) update the settings' instance list, the poller and the weight actuator together.
Restart-safe: the policy state comes back from the last audit row, the current weights from the
actuator's observed state.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import signal
import threading
import time

from control.traffic.actuators import ActuatorError, Plan, make_actuator
from control.traffic.audit import Audit
from control.daemon.metrics import ControlMetrics
from control.traffic.policy import SITES, Decision, PolicyState, decide, normalize, split
from control.traffic.poller import Poller
from control.capacity.scaler import ScaleDecision, ScalerState, decide_scale

log = logging.getLogger("triton_hybrid.control")


def home_weights(settings) -> dict[str, int]:
    h = settings.control.policy.home_onprem_weight
    return {"onprem": h, "cloud": 100 - h}


class Controller:
    def __init__(self, settings, actuator=None, metrics: ControlMetrics | None = None, clock=time.time):
        self.settings = settings
        self.cfg = settings.control.policy
        self.clock = clock
        self.metrics = metrics or ControlMetrics()
        self.audit = Audit(settings.database_path)
        self.actuator = actuator or make_actuator(settings)
        self.metrics.init_series(settings.instances, self.actuator.name)
        self.poller = Poller(settings.instances, settings.control.poll_timeout_s, settings.control.dcgm_exporter_urls,
                             clock=clock, on_result=self.metrics.observe_poll)
        self.lock = threading.RLock()
        last = self.audit.last()
        self.state = PolicyState.from_dict(last.state if last else None)
        self.weights = normalize(last.new_weights) if last else home_weights(settings)
        self.resumed_from = "database" if last else "config"
        try:
            obs = self.actuator.observe()
            if obs.site_weights:
                self.weights = obs.site_weights
                self.resumed_from = f"{self.actuator.name} (observed)"
        except ActuatorError as e:
            log.warning("could not observe %s at start: %s", self.actuator.name, e)
        self.last_decision: Decision | None = None
        self.last_plan: Plan | None = None
        self.last_apply_ok: float | None = None
        self.last_error: str | None = None
        self.last_sync: dict | None = None
        self.ticks = 0
        # Instances the scaler is draining before removal: kept drained by every tick.
        self.scale_draining: set[str] = set()
        self.scaler = None  # a scale actuator (control/capacity/actuators.py), set by Daemon if enabled
        self.scale_state = ScalerState.from_dict(self.audit.last_scale_state())
        self.last_scale: ScaleDecision | None = None
        self.last_scale_result: dict | None = None
        self.scale_ticks = 0
        self._cost_ledger = None
        self._cost_seen: dict[str, float] = {}
        log.info("control plane resumed weights %s from %s; policy state %s", self.weights, self.resumed_from,
                 self.state)

    # ---- mutable registry ----------------------------------------------------------------------
    def add_instance(self, inst) -> None:
        """Register an instance at run time (ready, verified and in HAProxy already): the next
        tick polls it and gives it its share of its site's weight."""
        with self.lock:
            if any(i.name == inst.name for i in self.settings.instances):
                raise ValueError(f"instance {inst.name} is already registered")
            # A new list, never an in-place change: the sync job may be iterating the old one.
            self.settings.instances = [*self.settings.instances, inst]
            self._sync_registry()
        log.info("registered instance %s (%s) at %s", inst.name, inst.site, inst.http_url)

    def remove_instance(self, name: str) -> None:
        with self.lock:
            self.settings.instances = [i for i in self.settings.instances if i.name != name]
            self.scale_draining.discard(name)
            self._sync_registry()
            self.poller.forget(name)
        log.info("removed instance %s from the registry", name)

    def _sync_registry(self) -> None:
        insts = list(self.settings.instances)
        self.poller.instances = insts
        if hasattr(self.actuator, "instances"):
            self.actuator.instances = insts
        if hasattr(self.actuator, "names"):
            self.actuator.names = {i.name for i in insts}

    def begin_drain(self, name: str) -> None:
        with self.lock:
            self.scale_draining.add(name)

    def end_drain(self, name: str) -> None:
        with self.lock:
            self.scale_draining.discard(name)

    # ---- jobs ----------------------------------------------------------------------------------
    def poll(self):
        return self.poller.poll_once()

    def tick(self) -> Decision:
        with self.lock:
            now = self.clock()
            snaps = self.poller.latest(now, self.cfg.stale_after_s)
            for inst in self.settings.instances:  # never polled yet: unknown, not idle
                if inst.name not in snaps:
                    from control.traffic.snapshot import InstanceSnapshot, InstanceState  # noqa: PLC0415
                    snaps[inst.name] = InstanceSnapshot(inst.name, inst.site, now, InstanceState.UNKNOWN,
                                                        reason="not polled yet", capacity=inst.capacity)
            controls = self.audit.controls(now)
            # Start from what the actuator really has (reconcile drift); fall back to our memory.
            current = dict(self.weights)
            try:
                obs = self.actuator.observe()
                if obs.site_weights:
                    current = obs.site_weights
            except ActuatorError as e:
                log.warning("observe failed: %s", e)
            old = dict(self.weights)
            d = decide(snaps, old, self.state, self.cfg, now, controls)
            drained = controls.drained | frozenset(self.scale_draining)
            instance_drained = frozenset(
                i.name for i in self.settings.instances if i.name in drained or i.site in drained)
            inst_w = split(d.weights, snaps, self.settings.instances, drained)
            plan = Plan(d.weights, inst_w, instance_drained)
            applied, commands, drift, error = False, [], [], None
            try:
                res = self.actuator.apply(plan)
                applied, commands, drift = True, res.commands, res.drift
                self.last_apply_ok = now
                self.metrics.last_apply.set(now)
                for s in res.observed.servers:
                    if "backend" in s:
                        self.metrics.observed_weight.labels(s["backend"], s["server"]).set(s["weight"])
                if drift and (self.last_plan is None or self.last_plan == plan):
                    # We did not mean to change anything, yet the actuator differed: a hand edit,
                    # an HAProxy restart (config weights), or a lost command.
                    self.metrics.drift.inc()
                    log.warning("reconciled drift on %s: %s", self.actuator.name, drift)
            except ActuatorError as e:
                error = str(e)
                self.metrics.apply_errors.labels(self.actuator.name).inc()
                log.error("apply failed: %s", e)
            self.last_error = error
            self.audit.record(ts=now, reason=d.reason, message=d.message, old=old, new=d.weights,
                              instance_weights=inst_w, inputs={**d.inputs, "observed": current}, state=d.state,
                              actuator=self.actuator.name, applied=applied, commands=commands, drift=drift, error=error)
            if d.weights != old:
                log.info("weights %s -> %s: %s (%s)", old, d.weights, d.reason, d.message)
                self.metrics.weight_changes.labels(d.reason).inc()
            self.weights, self.state, self.last_decision = d.weights, d.state, d
            if applied:
                self.last_plan = plan
            self.ticks += 1
            self._export(d, inst_w, controls)
            if self.ticks % 600 == 0:
                self.audit.prune(now - self.settings.control.audit_retention_h * 3600)
            return d

    # ---- cost and scaling ------------------------------------------------------------------------
    def account_cost(self, now: float | None = None) -> dict:
        """Accrue observed up-time of every registered instance into the cost ledger; export it."""
        from control.capacity.cost import CostLedger  # noqa: PLC0415
        now = self.clock() if now is None else now
        if self._cost_ledger is None:
            self._cost_ledger = CostLedger(self.settings.database_path)
        gap = max(60.0, 3 * self.settings.control.scaler.interval_s)
        snaps = self.poller.latest()
        registered = {i.name for i in self.settings.instances}
        for inst in list(self.settings.instances):
            s = snaps.get(inst.name)
            self._cost_ledger.observe(inst.name, inst.site, inst.cost_per_hour, bool(s and s.ready), now, gap)
        # Capacity outside the registry (ASG instances, k8s replicas): billed while the scale
        # actuator reports it, at the template's cost_per_hour.
        extra = set()
        if self.scaler is not None and self.settings.control.scaler.actuator in ("asg", "k8s"):
            try:
                for ci in self.scaler.instances():
                    if ci.name not in registered:
                        extra.add(ci.name)
                        self._cost_ledger.observe(ci.name, "cloud", ci.cost_per_hour, True, now, gap)
            except Exception as e:  # noqa: BLE001 - cost must not stop the scale job
                log.warning("could not list %s instances for cost: %s", self.scaler.name, e)
        for u in self._cost_ledger.all():  # removed instances stop billing
            if u.instance not in registered and u.instance not in extra and u.up:
                self._cost_ledger.observe(u.instance, u.site, u.cost_per_hour, False, now, gap)
        totals = self._cost_ledger.totals(now, fresh_s=gap)
        for site, t in totals.items():
            seen = self._cost_seen.get(site, 0.0)
            if t["dollars"] > seen:
                self.metrics.cost.labels(site).inc(t["dollars"] - seen)
                self._cost_seen[site] = t["dollars"]
            self.metrics.burn_rate.labels(site).set(t["burn_per_hour"])
        budget = self.settings.control.scaler.budget_per_hour
        self.metrics.cloud_budget.set(-1 if budget is None else budget)
        return totals

    def scale_tick(self) -> ScaleDecision | None:
        from control.capacity.actuators import ScaleError, new_instance_cost  # noqa: PLC0415
        now = self.clock()
        totals = self.account_cost(now)
        sc = self.settings.control.scaler
        if not sc.enabled or self.scaler is None:
            return None
        snaps = self.poller.latest(now, self.cfg.stale_after_s)
        with self.lock:
            cloud_weight = int(self.weights.get("cloud", 0))
            draining = set(self.scale_draining)
        insts = [i for i in self.scaler.instances() if i.name not in draining]
        cost = {"cloud_burn_per_hour": sum(i.cost_per_hour for i in insts),
                "sites": {k: {"dollars": v["dollars"], "burn_per_hour": v["burn_per_hour"]} for k, v in totals.items()}}
        d = decide_scale(snaps, cloud_weight, insts, sc, self.scale_state, now, new_instance_cost(self.settings))
        result, error = None, None
        if d.action != "hold":
            log.info("scale %s: %s (%s)", d.action, d.reason, d.message)
            try:
                result = self.scaler.scale_out(d) if d.action == "out" else self.scaler.scale_in(d)
            except (ScaleError, ActuatorError) as e:
                error = str(e)
                self.metrics.scale_errors.labels(d.action).inc()
                log.error("scale %s failed: %s", d.action, e)
            except Exception as e:  # noqa: BLE001 - boto3/kubectl errors: audit them, keep the loop
                error = f"{type(e).__name__}: {e}"
                self.metrics.scale_errors.labels(d.action).inc()
                log.exception("scale %s failed", d.action)
        after = len(self.scaler.instances())
        with self.lock:  # one SQLite connection, shared with the decide job and the API
            self.audit.record_scale(ts=now, action=d.action, reason=d.reason, message=d.message, count_before=d.count,
                                    count_after=after, instance=(result or {}).get("instance") or d.instance,
                                    inputs=d.inputs, state=d.state.to_dict(), cost=cost, actuator=self.scaler.name,
                                    result=result, error=error)
        self.metrics.scale_decisions.labels(d.action, d.reason).inc()
        self.metrics.cloud_instances.set(after)
        self.scale_state, self.last_scale, self.last_scale_result = d.state, d, (
            {"result": result, "error": error, "at": now} if d.action != "hold" else self.last_scale_result)
        self.scale_ticks += 1
        if self.scale_ticks % 600 == 0:
            with self.lock:
                self.audit.prune_scale(now - self.settings.control.audit_retention_h * 3600)
        return d

    def scale_status(self) -> dict:
        from control.capacity.cost import cost_summary  # noqa: PLC0415
        sc = self.settings.control.scaler
        d = self.last_scale
        try:
            insts = [i.__dict__ for i in self.scaler.instances()] if self.scaler else []
        except Exception as e:  # noqa: BLE001
            insts = [{"error": str(e)}]
        return {"enabled": sc.enabled, "actuator": None if self.scaler is None else self.scaler.name,
                "min_instances": sc.min_instances, "max_instances": sc.max_instances,
                "budget_per_hour": sc.budget_per_hour, "instances": insts, "draining": sorted(self.scale_draining),
                "state": self.scale_state.to_dict(),
                "last_decision": None if d is None else {"action": d.action, "reason": d.reason, "message": d.message},
                "last_action": self.last_scale_result, "cost": cost_summary(self.settings)}

    def _export(self, d: Decision, inst_w: dict, controls) -> None:
        m = self.metrics
        m.decisions.labels(d.reason).inc()
        for site in SITES:
            m.site_weight.labels(site).set(d.weights[site])
            m.failover.labels(site).set(1 if d.state.failover_site == site else 0)
        for inst in self.settings.instances:
            m.weight.labels(inst.site, inst.name).set(inst_w.get(inst.name, 0))
        m.override.set(1 if d.reason == "override" else 0)
        for target in {*(i.name for i in self.settings.instances), *SITES}:
            m.drained.labels(target).set(1 if target in controls.drained else 0)

    def sync(self):
        if importlib.util.find_spec("control.mirror.sync") is None:
            return None
        mod = importlib.import_module("control.mirror.sync")
        fn = getattr(mod, "sync_all", None)
        if fn is None:
            return None
        result = fn(self.settings)
        self.last_sync = {"at": self.clock(), "result": result if isinstance(result, (dict, list, str)) else repr(result)}
        self.metrics.last_sync.set(self.clock())
        self._export_sync(result)
        return result

    def _export_sync(self, result) -> None:
        """Best effort: accept {instance: {model: {"live": v, "published": p}}} or objects with those attrs."""
        if not isinstance(result, dict):
            return
        for inst, models in result.items():
            if not isinstance(models, dict):
                continue
            for model, v in models.items():
                live = v.get("live") if isinstance(v, dict) else getattr(v, "live", None)
                pub = v.get("published") if isinstance(v, dict) else getattr(v, "published", None)
                if isinstance(live, (int, float)):
                    self.metrics.live_version.labels(inst, model).set(live)
                    if isinstance(pub, (int, float)):
                        self.metrics.sync_lag.labels(inst, model).set(pub - live)

    # ---- views for the API ---------------------------------------------------------------------
    def status(self) -> dict:
        now = self.clock()
        snaps = self.poller.latest(now, self.cfg.stale_after_s)
        controls = self.audit.controls(now)
        try:
            observed = self.actuator.observe().to_dict()
        except ActuatorError as e:
            observed = {"error": str(e)}
        d = self.last_decision
        ov = controls.override
        return {
            "daemon": "running", "actuator": self.actuator.name, "weights": self.weights,
            "instance_weights": split(self.weights, snaps, self.settings.instances, controls.drained),
            "observed": observed,
            "last_decision": None if d is None else {"reason": d.reason, "message": d.message},
            "policy_state": self.state.to_dict(),
            "override": None if ov is None or ov.expires_at <= now else
            {"weights": ov.weights, "expires_at": ov.expires_at, "ttl_left_s": round(ov.expires_at - now, 1),
             "by": ov.by, "note": ov.note},
            "drained": sorted(controls.drained),
            "instances": {k: v.to_dict() for k, v in snaps.items()},
            "last_apply_ok": self.last_apply_ok, "last_error": self.last_error, "resumed_from": self.resumed_from,
            "last_sync": self.last_sync,
            "scaling": {"enabled": self.settings.control.scaler.enabled,
                        "actuator": None if self.scaler is None else self.scaler.name,
                        "draining": sorted(self.scale_draining),
                        "last_decision": None if self.last_scale is None else
                        {"action": self.last_scale.action, "reason": self.last_scale.reason,
                         "message": self.last_scale.message}},
        }

    def close(self):
        self.poller.close()
        self.audit.close()
        if self._cost_ledger is not None:
            self._cost_ledger.close()


class Daemon:
    """The scheduler, the admin API and the metrics endpoint around one Controller."""

    def __init__(self, settings, actuator=None, serve_metrics: bool = True, serve_api: bool = True,
                 scale_actuator=None):
        from apscheduler.schedulers.background import BackgroundScheduler  # noqa: PLC0415

        self.settings = settings
        self.controller = Controller(settings, actuator)
        if settings.control.scaler.enabled:
            from control.capacity.actuators import make_scale_actuator  # noqa: PLC0415
            if scale_actuator is not None and not hasattr(scale_actuator, "instances"):
                scale_actuator = scale_actuator(self.controller)  # a factory taking the controller
            self.controller.scaler = scale_actuator or make_scale_actuator(settings, self.controller)
            if hasattr(self.controller.scaler, "adopt"):
                try:
                    back = self.controller.scaler.adopt()
                    if back:
                        log.info("adopted scaled instances still running: %s", back)
                except Exception:  # noqa: BLE001
                    log.exception("could not adopt scaled instances")
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                                           "misfire_grace_time": 5})
        c = settings.control
        self.scheduler.add_job(self._safe(self.controller.poll), "interval", seconds=c.poll_interval_s, id="poll")
        self.scheduler.add_job(self._safe(self.controller.tick), "interval", seconds=c.decide_interval_s, id="decide")
        self.scheduler.add_job(self._safe(self.controller.sync), "interval", seconds=c.sync_interval_s, id="sync")
        self.scheduler.add_job(self._safe(self.controller.scale_tick), "interval", seconds=c.scaler.interval_s,
                               id="scale")
        self.api = None
        self.metrics_server = None
        self.serve_metrics, self.serve_api = serve_metrics, serve_api
        self.stopped = threading.Event()

    @staticmethod
    def _safe(fn):
        def job():
            try:
                fn()
            except Exception:  # noqa: BLE001 - a failing job must not kill the scheduler
                log.exception("job %s failed", fn.__name__)
        job.__name__ = job.__qualname__ = fn.__name__
        return job

    def start(self) -> "Daemon":
        c = self.settings.control
        if self.serve_metrics:
            self.metrics_server = self.controller.metrics.serve(c.metrics_port, c.api_host)
        if self.serve_api:
            from control.daemon.api import serve_api  # noqa: PLC0415
            self.api = serve_api(self.settings, self.controller)
        self.controller.poll()  # one scrape now, so the first decision has data
        # Reconcile at once (restart after a crash): the decided weights go back on HAProxy now,
        # not one decide interval later.
        self._safe(self.controller.tick)()
        self.scheduler.start()
        log.info("control plane running: api http://%s:%d, metrics :%d, actuator %s", c.api_host, c.api_port,
                 c.metrics_port, self.controller.actuator.name)
        return self

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        try:
            self.scheduler.shutdown(wait=False)
        except Exception:  # noqa: BLE001
            pass
        if self.api is not None:
            self.api.shutdown()
            self.api.server_close()
        if self.metrics_server is not None:
            server = self.metrics_server[0] if isinstance(self.metrics_server, tuple) else None
            if server is not None:
                server.shutdown()
                server.server_close()
        self.controller.close()

    def run_forever(self) -> None:
        self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopped.set())
        try:
            while not self.stopped.wait(0.5):
                pass
        finally:
            self.stopped.clear()
            self.stop()
            log.info("control plane stopped")


def run(settings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    Daemon(settings).run_forever()
