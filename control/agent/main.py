"""The agent's loop: every `agent.interval_s` read the desired state (ETag-conditional GET: an unchanged
object costs one 304), converge (control/agent/converge.py), report the status to S3 and on the API.

    agent = Agent(settings.s3, settings.agent)      # the agent gets its own section + S3's, not Settings
    result = agent.converge_once()                  # one pass (the init container's `agent --once`)
    agent.run(stop_event)                           # the loop (the sidecar / systemd service)

The agent registers itself by writing its InstanceStatus (name, site, addresses, capacity, models)
to `<prefix>/_control/status/<instance>.json`; the control plane discovers instances from these.
"""
from __future__ import annotations

import logging
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from control.adapters import s3 as s3x
from control.adapters.triton import TritonAdmin
from control.agent.converge import Converger, PassResult
from control.agent.loader import Loader
from control.agent.metrics import AgentMetrics
from control.agent.repository import FailureBook, HostRepository
from control.agent.smoke import SmokeFn
from control.mirror.desired import (
    DesiredState,
    DesiredStateError,
    DesiredStore,
    InstanceStatus,
    Read,
)
from control.mirror.manifest import ManifestError, validate_model_name

log = logging.getLogger("triton_hybrid.agent")
MB = 1024 * 1024


class AgentSetupError(RuntimeError):
    """The agent cannot start: its config names something unusable; the message says what to do."""


def read_secret(value, path: str, field: str) -> str:
    """A secret from its file (must be readable by its owner only) or from the config value."""
    if not path:
        return value.get_secret_value()
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise AgentSetupError(f"{field}_file {p} does not exist") from None
    # Group read is allowed: a Kubernetes Secret volume with fsGroup turns 0400 into 0440
    # (kubernetes/kubernetes#57923); anything for others, or group write, is refused.
    if mode & (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO):
        raise AgentSetupError(f"{field}_file {p} is open to others (mode {stat.S_IMODE(mode):o}): "
                              f"run `chmod 600 {p}`")
    return p.read_text().strip()


class Agent:
    def __init__(self, s3cfg, cfg, *, client=None, smokes: dict[str, SmokeFn] | None = None,
                 clock: Callable[[], float] = time.time):
        if not cfg.instance:
            raise AgentSetupError("agent.instance is empty: set this host's instance name in the config "
                                  "(or TRITON_HYBRID__AGENT__INSTANCE)")
        try:
            validate_model_name(cfg.instance)  # the name becomes an S3 key
        except ManifestError as e:
            raise AgentSetupError(f"agent.instance: {e}") from None
        self.cfg, self.s3cfg, self.clock = cfg, s3cfg, clock
        self.repo = HostRepository.for_agent(cfg).ensure()
        self.client = client or s3x.make_client(s3cfg)
        self.store = DesiredStore(self.client, s3cfg)
        admin_key = read_secret(cfg.admin_key, cfg.admin_key_file, "agent.admin_key")
        self.admin = TritonAdmin(cfg.instance, cfg.triton_url, admin_key or None, timeout=cfg.load_timeout_s)
        self.metrics = AgentMetrics()
        self.loader = Loader(self.admin, self.repo, load_timeout_s=cfg.load_timeout_s,
                             smoke_timeout_s=cfg.smoke_timeout_s, smokes=smokes)
        self.converger = Converger(
            cfg.instance, s3cfg, self.client, self.repo, self.admin, self.loader, FailureBook(self.repo.state),
            self.metrics, keep_versions=cfg.keep_versions, chunk_bytes=cfg.pull_chunk_bytes,
            bandwidth_bytes_s=cfg.pull_bandwidth_mb_s * MB if cfg.pull_bandwidth_mb_s else None, clock=clock)
        self._desired: Read | None = None
        self._lock = threading.Lock()
        self._status = self._new_status(ready=False)
        self._last: PassResult | None = None
        self.last_error = ""

    # Desired state ---------------------------------------------------------------------------
    def read_desired(self) -> DesiredState:
        """desired.json, fetched only when its ETag changed (304 otherwise)."""
        self._desired = self.store.read(self._desired)
        return self._desired.state

    # One pass ----------------------------------------------------------------------------------
    def _new_status(self, ready: bool, revision: int = -1, models: dict | None = None) -> InstanceStatus:
        c = self.cfg
        return InstanceStatus(instance=c.instance, site=c.site, http_url=c.advertise_http_url,
                              grpc_url=c.advertise_grpc_url, metrics_url=c.advertise_metrics_url,
                              agent_url=c.advertise_agent_url, capacity=c.capacity, at=self.clock(), ready=ready,
                              desired_revision=revision, models=models or {})

    def converge_once(self) -> PassResult | None:
        """One pass; None when the desired state could not be read (nothing on the host changed)."""
        t0 = time.monotonic()
        result = None
        with self.repo.lock(blocking=False) as got:
            if not got:
                self._fail("internal", f"another agent holds {self.repo.state / 'agent.lock'}; this pass is skipped")
                return None
            try:
                desired = self.read_desired()
            except (s3x.S3Error, DesiredStateError) as e:
                self._fail("desired", f"desired state unreadable, nothing changed: {e}")
            else:
                result = self.converger.run(desired)
                status = self._new_status(result.converged, desired.revision,
                                          {m: r.as_dict() for m, r in result.reports.items()})
                with self._lock:
                    self._status, self._last, self.last_error = status, result, ""
        self.metrics.converge_duration.observe(time.monotonic() - t0)
        self.metrics.last_converge.set(self.clock())
        self.write_status()
        return result

    def _fail(self, kind: str, msg: str) -> None:
        self.metrics.converge_errors.labels(kind).inc()
        if msg != self.last_error:
            log.warning("%s", msg)
        with self._lock:
            self.last_error = msg

    def write_status(self) -> None:
        with self._lock:
            status = self._status.model_copy(update={"at": self.clock()})
        try:
            self.store.write_status(status)
        except s3x.S3Error as e:
            self._fail("status", f"writing the status to S3 failed: {e}")

    # What the API shows ------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        # The status of the last pass: an S3 hiccup (desired unreadable, status not written) changes
        # nothing on the host, so it does not take a serving host out of rotation.
        with self._lock:
            return self._status.ready

    def snapshot(self) -> dict:
        with self._lock:
            out = self._status.model_dump()
            out["last_error"] = self.last_error
            out["failed_here"] = self.converger.failures.as_dict()
        return out

    # The loop ----------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        log.info("agent %s: repository %s, Triton %s, every %gs", self.cfg.instance, self.repo.root,
                 self.cfg.triton_url, self.cfg.interval_s)
        while not stop.is_set():
            try:
                self.converge_once()
            except Exception as e:  # noqa: BLE001 - the loop must outlive one bad pass
                log.exception("converge pass failed")
                self._fail("internal", f"unexpected {type(e).__name__}: {e}")
            stop.wait(self.cfg.interval_s)


def run_agent(s3cfg, cfg, *, once: bool = False, stop: threading.Event | None = None) -> int:
    """The `triton-hybrid agent [--once]` entry point. --once: converge once, exit 0 when every model is
    live at its desired version, or prepared on disk for a Triton that has not started yet (a Kubernetes
    init container), else 1. Otherwise serve the API and loop until SIGTERM/SIGINT (`stop`)."""
    from control.agent.api import serve_api  # noqa: PLC0415 - flask/waitress only for the long-running agent

    agent = Agent(s3cfg, cfg)
    if once:
        result = agent.converge_once()
        ok = result is not None and result.prepared
        for r in (result.reports.values() if result else []):
            log.info("%s: target v%s, %s %s", r.model, r.target, r.state, r.error or r.reason)
        if not ok:
            log.error("not converged%s", f": {agent.last_error}" if agent.last_error else "")
        return 0 if ok else 1
    return run_with_api(agent, cfg, "agent", serve_api, stop)


def run_with_api(agent, cfg, section: str, serve_api, stop: threading.Event | None) -> int:
    """The long-running side of an agent beside a server (this one, the entry agent): its status API
    behind its `<section>.token`, then its loop until `stop` (SIGTERM/SIGINT)."""
    token = read_secret(cfg.token, cfg.token_file, f"{section}.token")
    if not token:
        raise AgentSetupError(f"{section}.token is empty: the status API needs a token. Set {section}.token_file "
                              f"(mode 600) or TRITON_HYBRID__{section.upper()}__TOKEN")
    stop = stop or threading.Event()
    server = serve_api(agent, token, cfg)
    log.info("%s API on http://%s:%d", section, cfg.api_host, server.port)
    try:
        agent.run(stop)
    finally:
        server.shutdown()
    return 0
