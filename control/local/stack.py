"""The local hybrid stack: S3 endpoint -> publish + desired state -> per instance a host (its agent
prepares the desired versions, its Triton starts on them, the agent loop goes on beside it) ->
HAProxy -> control-plane daemon (and Prometheus on request) -> the supervisor that restarts a
crashed Triton or agent. The same architecture as two real sites: the stack never writes an
instance's repository, its agent does (docs/agent.md).
`up` starts the components in that order, only those not already running (a second `up` after a
crash or a manual stop completes the stack), and, when one cannot start, stops what it started and
raises an error that names the component and shows its log. `down` stops only what the pid files
say we started, reaps what dead components left in their process groups, and keeps the run dir's
data.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable

import requests
from prometheus_client.parser import text_string_to_metric_families

from control.capacity.cost import cost_summary
from control.daemon.client import weights_summary
from control.local.admin_keys import admin_key
from control.local.agents import agent_name, agent_status, start_host
from control.local.haproxy import start_haproxy
from control.local.procs import (
    AlreadyRunning,
    ComponentError,
    ManagedProcess,
    http_ok,
    load_managed,
    managed_names,
    port_in_use,
    private_dir,
    require_free_ports,
    rss_bytes,
    start_ready,
)
from control.local.s3_endpoint import start_s3_server
from control.local.supervisor import NAME as SUPERVISOR_NAME
from control.local.supervisor import read_state as supervisor_state
from control.local.supervisor import start_supervisor

CONTROL_NAME = "control"
Say = Callable[[str], None]


class ProcState(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"   # no pid file: never started, or stopped on purpose
    DEAD = "dead"         # pid file left but the process is gone: crashed or killed from outside


@dataclass
class Stack:
    settings: object
    procs: list[ManagedProcess] = field(default_factory=list)  # started by this `up`
    kept: list[str] = field(default_factory=list)              # already running, left alone

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()


def _quiet(_: str) -> None:
    pass


def running_components(settings) -> list[str]:
    return [n for n in managed_names(settings.run_path) if (p := load_managed(settings.run_path, n)) and p.alive]


def publish_models(settings, say: Say = _quiet) -> dict[str, int]:
    """Publish the built repository to S3 and, on a first deployment, make each model's newest
    published version its stable version in the desired state (a model with a stable version keeps
    it: newer versions go through the rollout). Returns {model: stable version}."""
    repo_dir = settings.path(settings.models.repository_dir)
    if not repo_dir.is_dir() or not any(repo_dir.iterdir()):
        raise ComponentError("model repository", f"{repo_dir} is missing or empty; build it first with "
                                                 "`triton-hybrid export` and `triton-hybrid repo build` (`make demo` does both)")
    # boto3 only when needed
    from control.adapters import s3 as s3x  # noqa: PLC0415
    from control.mirror.desired import DesiredStore, seed_stable  # noqa: PLC0415
    from control.mirror.publish import publish_repository  # noqa: PLC0415

    say(f"publishing {repo_dir} to s3://{settings.s3.bucket}/{settings.s3.prefix}/")
    client = s3x.make_client(settings.s3)
    results = publish_repository(settings, repo_dir, progress=False, client=client)
    store = DesiredStore(client, settings.s3)
    state = store.update(seed_stable({r.model: r.version for r in results}), by="triton-hybrid up")
    return {m: st.stable for m, st in state.models.items() if st.stable is not None}


def start_control_daemon(settings, timeout: float = 30.0) -> ManagedProcess:
    c = settings.control
    require_free_ports(CONTROL_NAME, [(f"control.{f}", c.api_host, getattr(c, f)) for f in ("api_port", "metrics_port")])
    argv = [sys.executable, "-m", "control.cli"]
    if settings.source:
        argv += ["--config", settings.source]
    # Ready when both servers answer: the metrics exporter and the admin API start separately, and a
    # caller's first request goes to the API.
    return start_ready(CONTROL_NAME, argv + ["control", "run"], settings.run_path,
                       lambda: http_ok(f"http://{c.api_host}:{c.metrics_port}/metrics")
                       and http_ok(f"http://{c.api_host}:{c.api_port}/healthz"), timeout,
                       "exporting its metrics and answering on its admin API")


def planned_ports(settings, with_control: bool, with_prometheus: bool = False,
                  running: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, str, str, int]]:
    """(component, config field, host, port) of every port `up` will bind (components in
    `running` are kept and bind nothing new)."""
    out = []
    if settings.s3.start_local_server:
        out.append(("s3", "s3.port", settings.s3.host, settings.s3.port))
    for idx, inst in enumerate(settings.instances):
        if inst.managed:
            out += [(inst.name, f"instances[{idx}].{f}", inst.host, getattr(inst, f))
                    for f in ("http_port", "grpc_port", "metrics_port")]
            out.append((agent_name(inst), f"instances[{idx}].agent_port", inst.host, inst.agent_port))
    h = settings.haproxy
    out += [("haproxy", f"haproxy.{f}", h.host, getattr(h, f)) for f in ("http_port", "grpc_port", "stats_port")]
    if with_control:
        c = settings.control
        out += [(CONTROL_NAME, f"control.{f}", c.api_host, getattr(c, f)) for f in ("api_port", "metrics_port")]
    if with_prometheus:
        out.append(("prometheus", "control.prometheus_port", settings.control.api_host, settings.control.prometheus_port))
    return [p for p in out if p[0] not in running]


def preflight(settings, with_control: bool, with_prometheus: bool = False,
              running: set[str] | frozenset[str] = frozenset()) -> None:
    """Fail before starting anything when a port is taken: nothing to clean up, a precise message."""
    for component, fld, host, port in planned_ports(settings, with_control, with_prometheus, running):
        if port_in_use(host, port):
            raise ComponentError(component, f"port {host}:{port} ({fld}) is already in use but not by a process "
                                            f"this run dir started (no live pid file in {settings.run_path}/pids); "
                                            "stop what holds it (e.g. a daemon started by hand) or change the port "
                                            "in the config")


def up(settings, with_prometheus: bool = False, with_control: bool | None = None, say: Say = _quiet) -> Stack:
    """Start every component of the stack that is not running yet; keep those that are."""
    private_dir(settings.run_path)
    running = set(running_components(settings))
    for name in sorted(running):
        say(f"{name} is already running (pid {load_managed(settings.run_path, name).pid}); kept")
    with_control = settings.control.start_daemon if with_control is None else with_control
    preflight(settings, with_control, with_prometheus, running)
    stack = Stack(settings, kept=sorted(running))
    try:
        s3_started = False
        if settings.s3.start_local_server and "s3" not in running:
            say(f"starting the local S3 endpoint on {settings.s3.url}")
            stack.procs.append(start_s3_server(settings))
            s3_started = True
        hosts = [i for i in settings.instances if i.managed]
        missing = [i for i in hosts if i.name not in running or agent_name(i) not in running]
        # moto keeps objects in memory: a new S3 endpoint needs the repository published again.
        if missing or s3_started:
            publish_models(settings, say)
        for inst in missing:
            try:
                stack.procs += start_host(settings, inst, say=say, triton_running=inst.name in running,
                                          agent_running=agent_name(inst) in running)
            except AlreadyRunning:  # the supervisor restarted it meanwhile
                say(f"{inst.name} was started meanwhile; kept")
        if "haproxy" not in running:
            say(f"starting HAProxy on {settings.haproxy.host}:{settings.haproxy.http_port} (HTTP) and "
                f":{settings.haproxy.grpc_port} (gRPC)")
            stack.procs.append(start_haproxy(settings))
        if with_control and CONTROL_NAME not in running:
            say("starting the control-plane daemon")
            stack.procs.append(start_control_daemon(settings))
        if with_prometheus and "prometheus" not in running:
            from control.local.prometheus import start_prometheus  # noqa: PLC0415
            say("starting Prometheus")
            stack.procs.append(start_prometheus(settings))
        if settings.triton.supervise.enabled and SUPERVISOR_NAME not in running:
            say("starting the supervisor (restarts a crashed Triton)")
            stack.procs.append(start_supervisor(settings))
    except BaseException:
        stack.stop()
        raise
    return stack


def down(settings, say: Say = _quiet) -> list[str]:
    """Stop every component whose pid file is in the run dir, the supervisor first (so it restarts
    nothing), then newest layer first; reap the leftovers of components that died. Raises
    ComponentError naming every component some process of which would not go."""
    # An agent before its Triton: it never loads into a Triton that is going away.
    order = [SUPERVISOR_NAME, "prometheus", CONTROL_NAME, "haproxy"] + [agent_name(i) for i in settings.instances] \
        + [i.name for i in settings.instances] + ["s3"]
    names = managed_names(settings.run_path)
    stopped, failed = [], []
    for name in sorted(names, key=lambda n: order.index(n) if n in order else len(order)):
        proc = load_managed(settings.run_path, name)
        if proc is None:
            continue
        if proc.alive:
            say(f"stopping {name} (pid {proc.pid})")
            stopped.append(name)
        elif left := proc.leftovers():
            say(f"{name} is dead; reaping {len(left)} leftover process(es) of its group {proc.pgid} "
                f"({rss_bytes(left) / 2**20:.0f} MiB)")
        try:
            proc.stop()
        except ComponentError as e:
            failed.append(str(e))
    if failed:
        raise ComponentError("down", "; ".join(failed))
    return stopped


# Status -----------------------------------------------------------------------------------------

def _triton_status(settings, inst) -> dict:
    out = {"ready": False, "models": {}}
    try:
        out["ready"] = http_ok(f"{inst.http_url}/v2/health/ready", timeout=1.0)
        index = requests.post(f"{inst.http_url}/v2/repository/index", json={"ready": False}, timeout=2.0,
                              headers={"admin-key": admin_key(settings, inst)})
        if index.ok:
            for m in index.json():
                if m.get("state") == "READY":
                    out["models"].setdefault(m["name"], []).append(m.get("version"))
    except requests.RequestException as e:
        out["error"] = type(e).__name__
    except ComponentError as e:  # no key file yet: never started
        out["error"] = str(e)
    return out


def haproxy_weights(settings) -> dict[str, dict[str, int]]:
    """Current server weights per backend, read from HAProxy's Prometheus exporter."""
    h = settings.haproxy
    text = requests.get(f"http://{h.host}:{h.stats_port}/metrics", timeout=2.0).text
    weights: dict[str, dict[str, int]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "haproxy_server_weight":
            for s in fam.samples:
                weights.setdefault(s.labels["proxy"], {})[s.labels["server"]] = int(s.value)
    return weights


def status(settings) -> dict:
    run = settings.run_path
    comps = []

    def proc_info(name: str) -> dict:
        p = load_managed(run, name)
        alive = bool(p and p.alive)
        info = {"name": name, "pid": p.pid if alive else None, "running": alive,
                "state": ProcState.RUNNING if alive else ProcState.STOPPED if p is None else ProcState.DEAD}
        if p is not None and not alive:
            # Left behind in the dead component's process group (e.g. Python-backend stubs).
            info["leftovers"] = p.leftovers()
            info["leftover_rss_bytes"] = rss_bytes(info["leftovers"])
        return info

    sup = supervisor_state(settings).get("instances", {})

    s3 = settings.s3
    info = proc_info("s3") | {"kind": "s3", "url": s3.url, "bucket": s3.bucket, "prefix": s3.prefix}
    try:
        info["healthy"] = http_ok(f"{s3.url}/moto-api/") if s3.start_local_server else None
    except requests.RequestException:
        info["healthy"] = False
    comps.append(info)

    for inst in settings.instances:
        info = proc_info(inst.name) | {"kind": "triton", "site": inst.site, "http": inst.http_url,
                                       "grpc": inst.grpc_url, "metrics": inst.metrics_url}
        t = _triton_status(settings, inst)
        info["healthy"] = t["ready"]
        info["models"] = t["models"]
        if inst.name in sup:
            info["restarts"] = sup[inst.name]["restarts"]
            info["restart_given_up"] = sup[inst.name]["given_up"]
        comps.append(info)
        name = agent_name(inst)
        info = proc_info(name) | {"kind": "agent", "instance": inst.name, "api": inst.agent_url}
        if info["running"]:
            # What the agent reports (its API, with the instance's token): per model target, live, state.
            st = agent_status(settings, inst)
            info["healthy"] = bool(st.get("ready"))  # the status carries it: no second request
            info["error"] = st.get("error") or st.get("last_error") or ""
            info["versions"] = {m: {k: r.get(k) for k in ("target", "live", "state", "error")}
                                for m, r in (st.get("models") or {}).items()}
            info["not_live"] = sorted(m for m, r in info["versions"].items()
                                      if r["state"] != "live" or r["live"] != r["target"])
        else:
            info["healthy"] = False
        if name in sup:
            info["restarts"] = sup[name]["restarts"]
            info["restart_given_up"] = sup[name]["given_up"]
        comps.append(info)

    h = settings.haproxy
    info = proc_info("haproxy") | {"kind": "haproxy", "http": f"{h.host}:{h.http_port}",
                                   "grpc": f"{h.host}:{h.grpc_port}", "stats": f"http://{h.host}:{h.stats_port}/stats"}
    try:
        info["weights"] = haproxy_weights(settings)
        info["healthy"] = True
    except requests.RequestException:
        info["healthy"] = False
    comps.append(info)

    c = settings.control
    info = proc_info(CONTROL_NAME) | {"kind": "control", "api": f"http://{c.api_host}:{c.api_port}",
                                      "metrics": f"http://{c.api_host}:{c.metrics_port}/metrics"}
    try:
        info["healthy"] = http_ok(info["metrics"]) if info["running"] else False
    except requests.RequestException:
        info["healthy"] = False

    # The decided site weights, override and drains: from the daemon, or its database when down.
    info["decision"] = weights_summary(settings)

    info["cost"] = cost_summary(settings)
    if settings.control.leader.enabled:
        from control.leader.status import leader_summary  # noqa: PLC0415 - boto3 only when needed
        info["leader"] = leader_summary(settings)
    comps.append(info)
    info = proc_info(SUPERVISOR_NAME) | {"kind": "supervisor", "enabled": settings.triton.supervise.enabled}
    info["healthy"] = info["running"]
    comps.append(info)
    return {"time": time.time(), "run_dir": str(run), "components": comps}
