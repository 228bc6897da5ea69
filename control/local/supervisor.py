"""The local stack's supervisor: `triton-hybrid supervise`, started by `up` as a managed process of
its own and stopped first by `down`. It needs nothing but the run dir's pid files, so it keeps
working while the control daemon is down.

Every `poll_interval_s` it looks at each managed instance's Triton and host agent. One whose pid
file is there (not removed by a deliberate stop, not marked `stopping`) but whose process is gone
has crashed: the supervisor at once reaps what the dead process left in its process group (a
Triton's Python-backend stubs), then restarts it with the same code `up` uses, backing off per
`decide`. A Triton restarts on the same per-instance repository (its agent's config.pbtxt files
pin the live versions, so `--load-model=*` loads what was served before); HAProxy's health check
on /v2/health/ready puts it back into rotation only once it is ready, and its agent smoke-checks
the reloaded versions again.

Records: a log line per event (logs/supervisor.log) and <run_dir>/supervisor/state.json (0600):
per instance the restart counter, recent restart times, whether it gave up, and the last events.
Production does not run this: systemd (`Restart=on-failure`, deploy/systemd/) or the kubelet do.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Callable

from control.local.agents import agent_name, repository_path, start_agent
from control.local.procs import (
    AlreadyRunning,
    ComponentError,
    ManagedProcess,
    load_managed,
    private_dir,
    rss_bytes,
    start_process,
    wait_for_process,
    wait_ports_free,
    write_private,
)
from control.local.triton_server import server_binary, start_instance

NAME = "supervisor"
MAX_EVENTS = 50
log = logging.getLogger("triton_hybrid.supervisor")


class Action(StrEnum):
    RESTART = "restart"
    WAIT = "wait"          # backing off
    GIVE_UP = "give-up"    # crash loop: too many restarts in the window


class Event(StrEnum):
    CRASHED = "crashed"
    REAPED = "reaped"
    RESTARTED = "restarted"
    RESTART_FAILED = "restart-failed"
    GAVE_UP = "gave-up"
    RECOVERED = "recovered"  # running again without us (e.g. `up` after we gave up)


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    due: float  # when the restart may happen


def backoff(n: int, cfg) -> float:
    """Delay before the n-th restart within the window: the first is immediate, then doubling."""
    return 0.0 if n <= 1 else min(cfg.backoff_initial_s * 2 ** (n - 2), cfg.backoff_max_s)


def decide(now: float, crashed_at: float, restart_times: list[float], cfg) -> Decision:
    """What to do about an instance found dead at `crashed_at`, given its earlier restart times."""
    recent = [t for t in restart_times if now - t < cfg.window_s]
    if len(recent) >= cfg.max_restarts:
        return Decision(Action.GIVE_UP, f"{len(recent)} restarts within {cfg.window_s:g}s "
                                        f"(triton.supervise.max_restarts={cfg.max_restarts})", now)
    delay = backoff(len(recent) + 1, cfg)
    due = crashed_at + delay
    if now < due:
        return Decision(Action.WAIT, f"backing off {delay:g}s after {len(recent)} restart(s) in the window", due)
    return Decision(Action.RESTART, f"restart {len(recent) + 1} within the window (backoff {delay:g}s)", due)


def state_path(settings) -> Path:
    return settings.run_path / NAME / "state.json"


def read_state(settings) -> dict:
    try:
        return json.loads(state_path(settings).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _instance_state() -> dict:
    return {"restarts": 0, "restart_times": [], "crashed_at": None, "given_up": None, "events": []}


def supervised(settings) -> dict[str, Callable[[], ManagedProcess]]:
    """{component name: how to start it again}: each managed instance's Triton and agent."""
    out: dict[str, Callable[[], ManagedProcess]] = {}
    for inst in settings.instances:
        if inst.managed:
            out[inst.name] = lambda i=inst: start_instance(settings, i, repository_path(settings, i))
            out[agent_name(inst)] = lambda i=inst: start_agent(settings, i)
    return out


def listening_ports(settings) -> dict[str, list[tuple[str, str, int]]]:
    """{component name: its (setting, host, port)}: what a restart waits to be released."""
    out: dict[str, list[tuple[str, str, int]]] = {}
    for inst in settings.instances:
        if inst.managed:
            out[inst.name] = [(f"{inst.name}.{f}", inst.host, getattr(inst, f))
                              for f in ("http_port", "grpc_port", "metrics_port")]
            out[agent_name(inst)] = [(f"{inst.name}.agent_port", inst.host, inst.agent_port)] if inst.agent_port else []
    return out


class Supervisor:
    def __init__(self, settings, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.cfg = settings.triton.supervise
        self.clock = clock
        self.components = supervised(settings)
        self.ports = listening_ports(settings)
        previous = read_state(settings).get("instances", {})
        self.instances = {name: previous.get(name, _instance_state()) for name in self.components}

    def _event(self, name: str, event: Event, message: str, **details) -> None:
        st = self.instances[name]
        st["events"] = (st["events"] + [{"t": self.clock(), "event": str(event), "message": message, **details}])[-MAX_EVENTS:]
        log.info("%s: %s", name, message)

    def save(self) -> None:
        path = state_path(self.settings)
        private_dir(path.parent)
        write_private(path, json.dumps({"pid": os.getpid(), "heartbeat": self.clock(), "instances": self.instances},
                                       indent=1))

    def tick(self) -> None:
        for name in self.components:
            self._check(name)
        self.save()

    def _check(self, name: str) -> None:
        st = self.instances[name]
        proc = load_managed(self.settings.run_path, name)
        if proc is None or proc.stopping:  # never started, or stopped on purpose: not ours to restart
            st["crashed_at"] = None
            return
        if proc.alive:
            if st["crashed_at"] is not None or st["given_up"]:
                self._event(name, Event.RECOVERED, f"running again (pid {proc.pid})", pid=proc.pid)
            st["crashed_at"], st["given_up"] = None, None
            return
        now = self.clock()
        if st["crashed_at"] is None:
            st["crashed_at"] = now
            self._event(name, Event.CRASHED, f"process {proc.pid} is gone", pid=proc.pid)
        self._reap(name, proc)
        if st["given_up"]:
            return
        d = decide(now, st["crashed_at"], st["restart_times"], self.cfg)
        if d.action is Action.WAIT:
            return
        if d.action is Action.GIVE_UP:
            st["given_up"] = d.reason
            self._event(name, Event.GAVE_UP, f"not restarting any more: {d.reason}; run `triton-hybrid up` "
                                                  "after fixing the cause")
            return
        st["restart_times"] = [t for t in st["restart_times"] if now - t < self.cfg.window_s] + [now]
        wait_ports_free(self.ports.get(name, []), self.cfg.port_release_s)   # else the start says which is taken
        try:
            new = self.components[name]()
        except AlreadyRunning:
            return  # `up` (or an operator) started it meanwhile; the next tick sees it alive
        except ComponentError as e:
            st["crashed_at"] = self.clock()  # the next backoff counts from this failure
            self._event(name, Event.RESTART_FAILED, f"restart failed ({d.reason}): {e}".splitlines()[0])
            return
        st["restarts"] += 1
        ready_s = round(self.clock() - st["crashed_at"], 2)
        st["crashed_at"] = None
        self._event(name, Event.RESTARTED, f"restarted as pid {new.pid}, ready {ready_s}s after the crash was "
                                                f"seen ({d.reason}; {st['restarts']} restarts in all)",
                    pid=new.pid, seconds_to_ready=ready_s)

    def _reap(self, name: str, proc: ManagedProcess) -> None:
        left = proc.leftovers()
        if not left:
            return
        rss = rss_bytes(left)
        try:
            proc.reap()
        except ComponentError as e:
            self._event(name, Event.REAPED, f"could not reap all leftovers: {e}", pids=left, rss_bytes=rss)
            return
        self._event(name, Event.REAPED, f"reaped {len(left)} leftover process(es) of group {proc.pgid} "
                                        f"({rss / 2**20:.0f} MiB resident)", pids=left, rss_bytes=rss)

    def run(self) -> None:
        """Until SIGTERM (from `down`): SystemExit also interrupts a restart that is waiting for
        readiness; that Triton's pid file is already written, so `down` stops it next."""
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server_binary()  # fail now if tritonserver is missing, and pay pytriton's import before a crash
        log.info("supervising %s every %gs (at most %d restarts per %gs)", ", ".join(self.instances) or "nothing",
                 self.cfg.poll_interval_s, self.cfg.max_restarts, self.cfg.window_s)
        try:
            while True:
                self.tick()
                time.sleep(self.cfg.poll_interval_s)
        finally:
            log.info("stopped")


def start_supervisor(settings) -> ManagedProcess:
    """Start `triton-hybrid supervise` for this config and wait until it has written its state."""
    if not settings.source:
        raise ComponentError(NAME, "needs the stack's config file to start `triton-hybrid supervise` with, and these "
                                   "settings came from none (settings.source is empty); load them from a file or set "
                                   "triton.supervise.enabled: false")
    argv = [sys.executable, "-m", "control.cli", "--config", settings.source, "supervise"]
    proc = start_process(NAME, argv, settings.run_path)
    try:
        wait_for_process(lambda: read_state(settings).get("pid") == proc.pid, proc,
                         settings.triton.supervise.start_timeout_s, "reporting its state")
    except ComponentError:
        proc.stop()
        raise
    return proc
