"""The entry agent's loop: every `entry.interval_s` read traffic.json (ETag-conditional GET: an
unchanged object costs one 304), make the local HAProxy match it through the runtime socket, report.

    agent = EntryAgent(settings.s3, settings.entry, settings.instances, runtime)
    agent.pass_once()        # one pass
    agent.run(stop_event)    # the loop (the sidecar / systemd service)

A site entry works alone: when S3 (or the control plane) is gone, the last applied weights stay in
HAProxy and are applied again after an HAProxy restart, from memory or, after an agent restart, from
the state file. A traffic.json of an older generation than the one applied (a restored backup, a
partitioned former leader) is refused.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from control.adapters import haproxy_config
from control.adapters import s3 as s3x
from control.adapters.haproxy_runtime import HAProxyRuntime
from control.agent.main import AgentSetupError, run_with_api
from control.entry.metrics import EntryMetrics
from control.local.procs import write_private
from control.mirror.desired import DesiredStateError, Read
from control.traffic.actuators import ActuatorError, HAProxyActuator
from control.traffic.entries import EntryReport, TrafficState, TrafficStore, entry_id

log = logging.getLogger("triton_hybrid.entry")


class EntryAgent:
    def __init__(self, s3cfg, cfg, instances, runtime: HAProxyRuntime, state_file: Path, *, client=None,
                 clock: Callable[[], float] = time.time):
        try:
            self.id = entry_id(cfg.site, cfg.name)
        except ValueError as e:
            raise AgentSetupError(f"entry.name: {e}") from None
        self.cfg, self.clock, self.state_file = cfg, clock, Path(state_file)
        self.instances = list(instances)
        self.names = {i.name for i in self.instances}
        self.store = TrafficStore(client or s3x.make_client(s3cfg), s3cfg)
        self.haproxy = HAProxyActuator(runtime, self.instances, list(haproxy_config.ALL_BACKENDS),
                                       list(haproxy_config.SENSITIVE_BACKENDS))
        self.metrics = EntryMetrics()
        self._read: Read | None = None
        self._lock = threading.Lock()
        self.applied, self.source = self._load_state()
        self.report = EntryReport(site=cfg.site, name=cfg.name)
        self.haproxy_ok = False

    # The state file --------------------------------------------------------------------------
    def _load_state(self) -> tuple[TrafficState | None, str]:
        try:
            return TrafficState.model_validate_json(self.state_file.read_text()), "state_file"
        except FileNotFoundError:
            return None, ""
        except ValueError as e:
            log.warning("ignoring the state file %s: %s", self.state_file, e)
            return None, ""

    def _save_state(self, state: TrafficState) -> None:
        try:
            write_private(self.state_file, state.model_dump_json(indent=1))
        except OSError as e:
            self.metrics.errors.labels("state_file").inc()
            log.warning("could not write the state file %s: %s", self.state_file, e)

    # One pass ----------------------------------------------------------------------------------
    def _target(self, errors: list[str]) -> tuple[TrafficState | None, bool]:
        """The traffic state to apply, and whether S3 answered."""
        try:
            self._read = self.store.read(self._read)
        except (s3x.S3Error, DesiredStateError) as e:
            self.metrics.errors.labels("traffic").inc()
            errors.append(f"traffic.json unreadable, keeping the weights applied last: {e}")
            return self.applied, False
        got = self._read.state if self._read.etag is not None else None
        if got is None:
            return self.applied, True   # nothing decided yet: HAProxy keeps its config weights
        if self.applied is not None and got.generation < self.applied.generation:
            self.metrics.errors.labels("traffic").inc()
            errors.append(f"traffic.json revision {got.revision} was written by generation {got.generation}, older "
                          f"than the applied one ({self.applied.generation}): refused, keeping revision "
                          f"{self.applied.revision}")
            return self.applied, True
        return got, True

    def pass_once(self) -> EntryReport:
        errors: list[str] = []
        target, s3_ok = self._target(errors)
        self.metrics.s3_ok.set(1 if s3_ok else 0)
        if target is not None:
            unknown = sorted(set(target.instance_weights) - self.names)
            if unknown:
                errors.append(f"traffic.json names instances this entry's haproxy.cfg lacks: {unknown}; render the "
                              "entry's config again with every instance of the registry (`triton-hybrid deploy`)")
            try:
                res = self.haproxy.apply(target.plan())
                if res.commands:
                    log.info("applied traffic revision %d: %s", target.revision, "; ".join(res.commands))
                    self.metrics.last_apply.set(self.clock())
                if self.applied is None or (self.applied.revision, self.applied.generation) != \
                        (target.revision, target.generation):
                    self._save_state(target)
                    self.source = "s3"   # a new revision only ever comes from S3
                self.applied = target
                self.metrics.applied_revision.set(target.revision)
            except ActuatorError as e:
                self.metrics.errors.labels("haproxy").inc()
                errors.append(f"HAProxy: {e}")
        try:
            obs = self.haproxy.observe()
            self.haproxy_ok = True
        except ActuatorError as e:
            self.haproxy_ok = False
            if not any(x.startswith("HAProxy") for x in errors):
                self.metrics.errors.labels("haproxy").inc()
                errors.append(f"HAProxy: {e}")
            obs = None
        if obs is not None:
            for name, w in obs.instance_weights.items():
                self.metrics.weight.labels(name).set(w)
        a = self.applied
        report = EntryReport(
            site=self.cfg.site, name=self.cfg.name, at=self.clock(), s3_ok=s3_ok, errors=errors,
            applied_revision=a.revision if a is not None else -1, applied_generation=a.generation if a else 0,
            source=self.source if a is not None else "",
            instance_weights=obs.instance_weights if obs else {}, drained=sorted(obs.drained) if obs else [],
            health=obs.health if obs else {})
        for e in errors:
            if e not in self.report.errors:
                log.warning("%s", e)
        with self._lock:
            self.report = report
        try:
            self.store.write_report(report)
        except s3x.S3Error as e:
            self.metrics.errors.labels("report").inc()
            log.debug("report not written: %s", e)
        return report

    # What the API shows ------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """HAProxy answered on its runtime socket in the last pass (S3 being gone does not matter)."""
        return self.haproxy_ok

    def snapshot(self) -> dict:
        with self._lock:
            return {"entry": self.id, **self.report.model_dump()}

    # The loop ----------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        log.info("entry %s: HAProxy runtime %s, every %gs", self.id, self.haproxy.rt.socket_path, self.cfg.interval_s)
        while not stop.is_set():
            try:
                self.pass_once()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad pass
                log.exception("entry pass failed")
                self.metrics.errors.labels("internal").inc()
            stop.wait(self.cfg.interval_s)


def entry_paths(settings) -> tuple[Path, Path]:
    """(runtime socket, state file) of this host's entry, from settings.entry or the run dir."""
    c = settings.entry
    sock = settings.path(c.socket) if c.socket else haproxy_config.socket_path(settings)
    state = settings.path(c.state_file) if c.state_file else settings.run_path / f"entry-{c.site}-{c.name}.state.json"
    return sock, state


def run_entry(settings, *, once: bool = False, stop: threading.Event | None = None) -> int:
    """`triton-hybrid entry [--once]`: --once applies once and exits 0 when HAProxy has the weights
    (or there are none yet), else 1. Otherwise serve the API and loop until SIGTERM/SIGINT (`stop`)."""
    from control.entry.api import serve_api  # noqa: PLC0415 - flask/waitress only for the long-running agent

    cfg = settings.entry
    sock, state = entry_paths(settings)
    agent = EntryAgent(settings.s3, cfg, settings.instances, HAProxyRuntime(sock), state)
    if once:
        report = agent.pass_once()
        for e in report.errors:
            log.error("%s", e)
        return 0 if agent.ready and not report.errors else 1
    return run_with_api(agent, cfg, "entry", serve_api, stop)
