"""`triton-hybrid control run`: the control loop.

APScheduler jobs (BackgroundScheduler; `run()` blocks until SIGTERM/SIGINT):
  poll    every control.poll_interval_s: scrape every instance (control/poller.py)
  decide  every control.decide_interval_s: snapshots + weights + operator controls -> policy ->
          actuator apply + read back -> audit row + metrics. Each tick starts from the state the
          actuator *observes*, so a hand edit or an HAProxy restart (drift) is reconciled.
  sync    every control.sync_interval_s: control.sync.sync_all(settings) when that module exists.
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

from control.actuators import ActuatorError, Plan, make_actuator
from control.audit import Audit
from control.control_metrics import ControlMetrics
from control.policy import SITES, Decision, PolicyState, decide, normalize, split
from control.poller import Poller

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
        log.info("control plane resumed weights %s from %s; policy state %s", self.weights, self.resumed_from,
                 self.state)

    # ---- jobs ----------------------------------------------------------------------------------
    def poll(self):
        return self.poller.poll_once()

    def tick(self) -> Decision:
        with self.lock:
            now = self.clock()
            snaps = self.poller.latest(now, self.cfg.stale_after_s)
            for inst in self.settings.instances:  # never polled yet: unknown, not idle
                if inst.name not in snaps:
                    from control.snapshot import InstanceSnapshot, InstanceState  # noqa: PLC0415
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
            instance_drained = frozenset(
                i.name for i in self.settings.instances if i.name in controls.drained or i.site in controls.drained)
            inst_w = split(d.weights, snaps, self.settings.instances, controls.drained)
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
        if importlib.util.find_spec("control.sync") is None:
            return None
        mod = importlib.import_module("control.sync")
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
        }

    def close(self):
        self.poller.close()
        self.audit.close()


class Daemon:
    """The scheduler, the admin API and the metrics endpoint around one Controller."""

    def __init__(self, settings, actuator=None, serve_metrics: bool = True, serve_api: bool = True):
        from apscheduler.schedulers.background import BackgroundScheduler  # noqa: PLC0415

        self.settings = settings
        self.controller = Controller(settings, actuator)
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                                           "misfire_grace_time": 5})
        c = settings.control
        self.scheduler.add_job(self._safe(self.controller.poll), "interval", seconds=c.poll_interval_s, id="poll")
        self.scheduler.add_job(self._safe(self.controller.tick), "interval", seconds=c.decide_interval_s, id="decide")
        self.scheduler.add_job(self._safe(self.controller.sync), "interval", seconds=c.sync_interval_s, id="sync")
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
            from control.api import serve_api  # noqa: PLC0415
            self.api = serve_api(self.settings, self.controller)
        self.controller.poll()  # one scrape now, so the first decision has data
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
