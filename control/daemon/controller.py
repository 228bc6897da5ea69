"""`triton-hybrid control run`: the control plane's jobs, the registry they share, and the daemon.

  Registry     (control/daemon/registry.py)      instances (mutable at run time) and scaler drains
  TrafficJob   (control/daemon/traffic_job.py)   poll + health + decide + apply + audit + export
  CapacityJob  (control/daemon/capacity_job.py)  cost ledger + scale decision + scale actuator
  RolloutJob   (control/daemon/rollout_job.py)   model version rollouts (control/rollout/) + agent metrics

`Controller` builds them around one settings object, one audit database and one metrics registry;
`Daemon` schedules what each job lists (APScheduler) and serves the admin API and /metrics.

With `control.leader.enabled`, one Gate (control/leader/gate.py) stands between every job and what
it changes: only the lease holder applies weights, scales, and ticks rollouts (whose desired-state
writes carry the lease generation); a standby polls and decides, for its status.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import datetime, timezone
from types import FunctionType
from typing import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from control.capacity.actuators import (
    InstanceRegistry,
    ScaleActuator,
    make_scale_actuator,
)
from control.config import InstanceConfig
from control.daemon.api import serve_api
from control.daemon.capacity_job import CapacityJob
from control.daemon.jobs import Job
from control.daemon.metrics import ControlMetrics
from control.daemon.registry import Registry
from control.daemon.rollout_job import RolloutJob
from control.daemon.traffic_job import TrafficJob
from control.http_api import WaitressServer
from control.leader import elector as leader_elector
from control.leader.audit import Transition
from control.leader.gate import Gate
from control.leader.lease import Event
from control.traffic.actuators import WeightActuator, actuator_names, make_actuator
from control.leader.store import lease_client
from control.traffic.audit import Audit
from control.traffic.operator import OperatorStore, OperatorView
from control.traffic.policy import Decision

log = logging.getLogger("triton_hybrid.control")
ScaleActuatorFactory = Callable[[InstanceRegistry], ScaleActuator]


def _job_attr(job: str, attr: str, writable: bool = False) -> property:
    """A Controller attribute that is one of its jobs' (the API views and tests read them here)."""
    def get(self):
        return getattr(getattr(self, job), attr)

    def set_(self, value) -> None:
        setattr(getattr(self, job), attr, value)

    return property(get, set_ if writable else None, doc=f"self.{job}.{attr}")


class Controller:
    """The jobs and what they share. The attributes below are the ones tests, the bench and the
    admin API read; the work is in the jobs."""

    def __init__(self, settings, actuator: WeightActuator | None = None, metrics: ControlMetrics | None = None,
                 clock=time.time, on_leader_change: Callable[[Transition], None] | None = None):
        self.settings = settings
        self.clock = clock
        self.metrics = metrics or ControlMetrics()
        self.audit = Audit(settings.database_path)
        self.registry = Registry(settings)
        self.leader = leader_elector.from_settings(settings, self.metrics.registry, on_leader_change)
        self.gate = Gate(self.leader)
        # Every traffic.json write (the `entries` actuator) carries the lease generation.
        self.actuator: WeightActuator = actuator or make_actuator(settings, self.gate.fencing_token)
        for name in actuator_names(self.actuator):
            self.metrics.init_series(settings.instances, name)
        # Overrides and drains: S3 (_control/operator.json), written by the leader only (fenced). Read
        # from the decide tick: short timeouts, no retries (the next refresh is the retry), as the lease.
        client = lease_client(settings.s3, settings.control.leader.s3_timeout_s)
        self.operator = OperatorView(OperatorStore(client, settings.s3),
                                     settings.control.operator_refresh_s, self.gate.fencing_token, clock)
        self.traffic = TrafficJob(settings, self.registry, self.actuator, self.audit, self.metrics, self.operator,
                                  clock, self.gate)
        self.capacity = CapacityJob(settings, self.registry, self.traffic, self.audit, self.metrics, clock, self.gate)
        self.rollout = RolloutJob(settings, self.metrics, clock, registry=self.registry, gate=self.gate)

    @property
    def jobs(self) -> list[Job]:
        return [self.traffic, self.rollout, self.capacity]

    # ---- the registry (the scaler calls these) -------------------------------------------------
    def add_instance(self, inst: InstanceConfig) -> None:
        self.registry.add_instance(inst)

    def remove_instance(self, name: str) -> None:
        self.registry.remove_instance(name)

    def begin_drain(self, name: str) -> None:
        self.registry.begin_drain(name)

    def end_drain(self, name: str) -> None:
        self.registry.end_drain(name)

    # ---- job entry points ----------------------------------------------------------------------
    def poll(self):
        return self.traffic.poll()

    def tick(self) -> Decision:
        return self.traffic.tick()

    def scale_tick(self):
        return self.capacity.tick()

    def account_cost(self, now: float | None = None) -> dict:
        return self.capacity.account_cost(now)

    # ---- state the views read (the jobs' own attributes) ---------------------------------------
    poller = _job_attr("traffic", "poller")
    weights = _job_attr("traffic", "weights")
    state = _job_attr("traffic", "state")
    last_decision = _job_attr("traffic", "last_decision")
    last_error = _job_attr("traffic", "last_error")
    resumed_from = _job_attr("traffic", "resumed_from")
    ticks = _job_attr("traffic", "ticks")
    scaler = _job_attr("capacity", "scaler", writable=True)  # the daemon sets it when the scaler is enabled

    def status(self) -> dict:
        return {**self.traffic.status(), "rollout": self.rollout.last_tick, "scaling": self.capacity.summary(),
                "leader": self.gate.status()}

    def scale_status(self) -> dict:
        return self.capacity.status()

    def close(self) -> None:
        if self.leader is not None:
            self.leader.stop(release=self.settings.control.leader.release_on_stop)
            self.leader.close()
        for job in self.jobs:
            job.close()
        self.audit.close()


class Daemon:
    """The scheduler, the admin API and the metrics endpoint around one Controller.

    `scale_actuator`: a ScaleActuator, or a factory taking the registry (the local scaler needs
    it); None: control.capacity.actuators.make_scale_actuator from the config."""

    def __init__(self, settings, actuator: WeightActuator | None = None, serve_metrics: bool = True,
                 serve_api: bool = True, scale_actuator: ScaleActuator | ScaleActuatorFactory | None = None):
        self.settings = settings
        self.controller = Controller(settings, actuator, on_leader_change=self._leader_changed)
        if settings.control.scaler.enabled:
            self.controller.scaler = self._scale_actuator(scale_actuator)
            try:
                back = self.controller.scaler.adopt()
                if back:
                    log.info("adopted scaled instances still running: %s", back)
            except Exception:  # noqa: BLE001 - a failed adoption must not stop the daemon
                log.exception("could not adopt scaled instances")
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                                           "misfire_grace_time": 5})
        for job in self.controller.jobs:
            for s in job.schedule():
                self.scheduler.add_job(self._safe(s.fn, s.id), "interval", seconds=s.interval_s, id=s.id)
        self.api: WaitressServer | None = None
        self.metrics_server = None
        self.serve_metrics, self.serve_api = serve_metrics, serve_api
        self.stopped = threading.Event()

    def _scale_actuator(self, given: ScaleActuator | ScaleActuatorFactory | None) -> ScaleActuator:
        if given is None:
            return make_scale_actuator(self.settings, self.controller)
        if isinstance(given, FunctionType):  # a factory taking the registry (the local scaler needs it)
            return given(self.controller)
        return given

    @staticmethod
    def _safe(fn, name: str):
        def job():
            try:
                fn()
            except Exception:  # noqa: BLE001 - a failing job must not kill the scheduler
                log.exception("job %s failed", name)
        job.__name__ = job.__qualname__ = name
        return job

    def start(self) -> "Daemon":
        c = self.settings.control
        if self.serve_metrics:
            self.metrics_server = self.controller.metrics.serve(c.metrics_port, c.api_host)
        if self.serve_api:
            self.api = serve_api(self.settings, self.controller)
        if self.controller.leader is not None:
            self.controller.leader.step()  # a lone control plane leads before its first tick
            self.controller.leader.start()
        self.controller.poll()  # one scrape now, so the first decision has data
        # Reconcile at once (restart after a crash): the decided weights go back on HAProxy now,
        # not one decide interval later. A failover read back from the database is not trusted
        # by this tick (control/traffic/policy.py, resume): health decides.
        self._safe(self.controller.tick, "decide")()
        self.scheduler.start()
        log.info("control plane running: api http://%s:%d, metrics :%d, actuator %s", c.api_host, c.api_port,
                 c.metrics_port, self.controller.actuator.name)
        return self

    def _leader_changed(self, t: Transition) -> None:
        """A new leader acts at once: its rollout tick and decision now (from S3 and its own polls)."""
        if t.event not in (Event.ACQUIRED, Event.RECOVERED) or not self.scheduler.running:
            return
        for job_id in ("rollout", "decide"):
            if self.scheduler.get_job(job_id) is not None:
                self.scheduler.modify_job(job_id, next_run_time=datetime.now(timezone.utc))

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        if self.controller.leader is not None:  # stop acting (and hand the lease over) first
            self.controller.leader.stop(release=self.settings.control.leader.release_on_stop)
        try:
            self.scheduler.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - never started
            pass
        if self.api is not None:
            self.api.shutdown()
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
