"""Drill `entry-rolling-update`: roll a site entry's HAProxy replicas the way Kubernetes rolls the entry
Deployment (deploy/k8s/entry/entry-deployment.yaml), under steady load through the Service VIP.

No cluster can run here (DESIGN.md, fact 13), so the drill does what Kubernetes does around the real
HAProxy processes, taking every number and command from the manifest itself (`EntryPodSpec`):

- a "node" network namespace holds the pod network (a bridge) and the Service: a virtual IP made the
  way kube-proxy's iptables mode makes it, `iptables -t nat` DNAT rules choosing an endpoint with
  `-m statistic --mode random` (`kube_proxy_rules`), in that namespace only; the load generator runs
  there (a client on the node, through the VIP);
- each HAProxy replica is a pod: a network namespace of its own on the bridge, HAProxy started with
  the manifest's args as PID 1 of a PID namespace of its own (so the manifest's preStop `kill -USR1 1`
  means what it means in the container), the Tritons are two more pods;
- readiness: the manifest's readinessProbe (httpGet path/port, periodSeconds), sent from the node;
- rolling update, one replica at a time, in the order the manifest's strategy gives
  (`rollout_plan`: maxUnavailable 0 -> surge one new pod first): start the new pod (the next config
  generation), wait until its probe passes, add its endpoint, wait minReadySeconds; then terminate an
  old pod: remove its endpoint (kube-proxy), run the manifest's preStop inside it (kubelet), SIGTERM
  whatever still runs when the hook returns, SIGKILL after terminationGracePeriodSeconds.

The figures: every request of the load (HTTP and gRPC alternating) and which replica served it
(counted from each replica's own HAProxy request log), per generation.

Needs root, iproute2, iptables, util-linux (unshare, nsenter), curl and haproxy; `available()` says
which is missing. Every namespace and process it made is removed at the end, also on failure.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import yaml

from control.adapters.haproxy_config import config_path
from control.config import PROJECT_ROOT, load_config
from control.deploy.render import K8S_DIR, K8S_REGISTRY
from control.drills.load import OpenLoopLoad, auto_spec
from control.drills.models import ADD_ONE, write_add_model
from control.drills import netns
from control.drills.netns import PREFIX
from control.local.haproxy import write_config
from control.local.procs import ManagedProcess, pid_alive, start_process, start_ready, wait_for_process
from control.local.triton_server import triton_argv, triton_env
from control.waiting import WaitTimeout, wait_until

NAME = "entry-rolling-update"
ENTRY_MANIFEST = K8S_DIR / "entry" / "entry-deployment.yaml"
HAPROXY_CONTAINER = "haproxy"
POD_SUBNET = "10.214.0"        # the pod network, inside the drill's node namespace only
NODE_IP = f"{POD_SUBNET}.1"
SERVICE_VIP = "10.96.0.10"      # a ClusterIP: exists only as DNAT rules in the node namespace
SERVICE_RANGE = "10.96.0.0/16"
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}   # as the k8s registry's instances
BACKENDS = {"onprem-1": 1.0, "cloud-1": 100.0}  # the registry's instances: what their add_one adds
# Each generation's config differs in one visible knob (its health-check interval), as a real config
# change would: a new replica must come up on the new file.
GEN_HEALTH_INTERVAL_MS = {1: 1000, 2: 500}


class RollingError(RuntimeError):
    """The drill cannot run here (a missing tool, no root) or a step of it failed."""


# ---- what the manifest says ----------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    path: str
    port: int
    period_s: float
    timeout_s: float
    failure_threshold: int
    success_threshold: int


@dataclass(frozen=True)
class EntryPodSpec:
    """The entry Deployment's rollout facts, read from the manifest (the one source the drill and the
    cluster share): replicas, strategy, minReadySeconds, the grace period, HAProxy's args, ports,
    readiness probe and preStop command."""

    replicas: int
    max_surge: int
    max_unavailable: int
    min_ready_s: float
    grace_s: float
    args: tuple[str, ...]
    ports: dict[str, int]
    readiness: Probe
    pre_stop: tuple[str, ...]

    @classmethod
    def from_manifest(cls, path: Path = ENTRY_MANIFEST) -> "EntryPodSpec":
        dep = next(d for d in yaml.safe_load_all(Path(path).read_text()) if d and d.get("kind") == "Deployment")
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        c = next((x for x in pod["containers"] if x["name"] == HAPROXY_CONTAINER), None)
        if c is None:
            raise RollingError(f"{path}: no container named {HAPROXY_CONTAINER!r}")
        ports = {p["name"]: int(p["containerPort"]) for p in c.get("ports", [])}
        probe = (c.get("readinessProbe") or {})
        get = probe.get("httpGet") or {}
        if not get:
            raise RollingError(f"{path}: haproxy has no httpGet readinessProbe; the drill runs the manifest's probe")
        port = get["port"] if isinstance(get["port"], int) else ports[get["port"]]
        exec_ = ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}
        if not exec_.get("command"):
            raise RollingError(f"{path}: haproxy has no preStop exec command; the drill runs the manifest's hook")
        ru = (spec.get("strategy") or {}).get("rollingUpdate") or {}
        replicas = int(spec.get("replicas", 1))
        return cls(
            replicas=replicas,
            max_surge=_count(ru.get("maxSurge", "25%"), replicas, up=True),
            max_unavailable=_count(ru.get("maxUnavailable", "25%"), replicas, up=False),
            min_ready_s=float(spec.get("minReadySeconds", 0)),
            grace_s=float(pod.get("terminationGracePeriodSeconds", 30)),
            args=tuple(str(a) for a in (c.get("command", []) + c.get("args", []))),
            ports=ports,
            readiness=Probe(get.get("path", "/"), int(port), float(probe.get("periodSeconds", 10)),
                            float(probe.get("timeoutSeconds", 1)), int(probe.get("failureThreshold", 3)),
                            int(probe.get("successThreshold", 1))),
            pre_stop=tuple(str(a) for a in exec_["command"]))


def _count(v, replicas: int, up: bool) -> int:
    """A rollingUpdate value (an int or a percentage of replicas, rounded as Kubernetes does)."""
    if isinstance(v, str) and v.endswith("%"):
        exact = replicas * int(v[:-1]) / 100
        return int(-(-exact // 1)) if up else int(exact // 1)
    return int(v)


# ---- decisions (pure) ----------------------------------------------------------------------------

class Step(StrEnum):
    START = "start"                  # the new pod's containers start
    READY = "ready"                  # its readiness probe passed
    ADD_ENDPOINT = "add-endpoint"    # kube-proxy adds it to the Service's rules
    AVAILABLE = "available"          # ready for minReadySeconds: the Deployment counts it available
    REMOVE_ENDPOINT = "remove-endpoint"  # the old pod is terminating: kube-proxy drops it
    PRE_STOP = "pre-stop"            # kubelet runs the preStop hook in the old pod
    STOP = "stop"                    # SIGTERM to what still runs, SIGKILL after the grace period


def rollout_plan(old: list[str], new: list[str], max_surge: int, max_unavailable: int) -> list[tuple[Step, str]]:
    """One replica at a time: with maxUnavailable 0 each new pod is started and available before an old
    one terminates (needs maxSurge >= 1); otherwise each old pod terminates before its successor starts."""
    if len(old) != len(new):
        raise ValueError("a rolling update replaces each old replica by one new one")
    if max_unavailable == 0 and max_surge < 1:
        raise ValueError("maxSurge 0 with maxUnavailable 0 cannot make progress (Kubernetes refuses it too)")
    up = [Step.START, Step.READY, Step.ADD_ENDPOINT, Step.AVAILABLE]
    down = [Step.REMOVE_ENDPOINT, Step.PRE_STOP, Step.STOP]
    plan: list[tuple[Step, str]] = []
    for o, n in zip(old, new):
        first, second = ((up, n), (down, o)) if max_unavailable == 0 else ((down, o), (up, n))
        plan += [(s, first[1]) for s in first[0]] + [(s, second[1]) for s in second[0]]
    return plan


def serving_counts(initial: list[str], plan: list[tuple[Step, str]]) -> list[int]:
    """The number of endpoints in the Service after each step of `plan`."""
    eps, out = set(initial), []
    for step, pod in plan:
        if step == Step.ADD_ENDPOINT:
            eps.add(pod)
        elif step == Step.REMOVE_ENDPOINT:
            eps.discard(pod)
        out.append(len(eps))
    return out


def _chain(*parts: str) -> str:
    return "-".join(["THD", *parts])[:28]  # iptables chain names: at most 28 characters


def kube_proxy_rules(vip: str, ports: dict[str, int], endpoints: list[str], stale: list[str] = ()) -> str:
    """iptables-restore input (nat table) for a ClusterIP Service the way kube-proxy's iptables mode
    writes it: per port a service chain that picks endpoint i of n with probability 1/(n-i)
    (`-m statistic --mode random`), the last one unconditionally, each endpoint chain a DNAT. Chains
    are declared (which flushes them) and rewritten in one atomic restore; `stale` chains are removed."""
    if not endpoints:
        raise ValueError("a Service without endpoints: kube-proxy would REJECT; the drill never removes the last one")
    lines = ["*nat", f":{_chain('SERVICES')} - [0:0]"]
    rules = []
    for pname, port in ports.items():
        svc = _chain("SVC", pname.upper())
        lines.append(f":{svc} - [0:0]")
        rules.append(f"-A {_chain('SERVICES')} -d {vip}/32 -p tcp -m tcp --dport {port} -j {svc}")
        n = len(endpoints)
        for i, ep in enumerate(endpoints):
            sep = _chain("SEP", pname.upper(), ep.replace(".", "-"))
            lines.append(f":{sep} - [0:0]")
            cond = f" -m statistic --mode random --probability {1 / (n - i):.10f}" if i < n - 1 else ""
            rules.append(f"-A {svc}{cond} -j {sep}")
            rules.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {ep}:{port}")
    declared = {ln[1:].split()[0] for ln in lines if ln.startswith(":")}
    gone = [c for c in stale if c not in declared]
    lines += [f":{c} - [0:0]" for c in gone] + rules + [f"-X {c}" for c in gone] + ["COMMIT", ""]
    return "\n".join(lines)


def declared_chains(rules: str) -> list[str]:
    return [ln[1:].split()[0] for ln in rules.splitlines() if ln.startswith(":")]


_INFER = re.compile(r'"POST \S*(?:/v2/models/[^/ ]+/infer|/inference\.GRPCInferenceService/ModelInfer) ')
_INTER = re.compile(r"default-server inter (\d+)ms")  # the knob a generation changes (GEN_HEALTH_INTERVAL_MS)
_STATUS = re.compile(r"\] \S+ \S+ \S+ (-?\d+) ")


def served_requests(log_text: str) -> dict[str, int]:
    """Inference requests in one HAProxy's request log (`option httplog`), by HTTP status."""
    out: dict[str, int] = {}
    for ln in log_text.splitlines():
        if _INFER.search(ln):
            m = _STATUS.search(ln)
            k = m.group(1) if m else "?"
            out[k] = out.get(k, 0) + 1
    return out


# ---- the machinery -------------------------------------------------------------------------------

REQUIRED_TOOLS = {"ip": "iproute2", "iptables-restore": "iptables", "unshare": "util-linux",
                  "nsenter": "util-linux", "curl": "curl"}


def available() -> tuple[bool, str]:
    """(True, "") when this machine can run the drill; else (False, what is missing and how to get it)."""
    if os.geteuid() != 0:
        return False, f"the {NAME} drill needs root for network namespaces and iptables (running as uid {os.geteuid()})"
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items()
                      if not shutil.which(tool) and not shutil.which(tool, path="/usr/sbin:/sbin")})
    if missing:
        return False, f"missing {', '.join(missing)}: install with `make system-deps` (apt-get install {' '.join(missing)})"
    probe = f"{PREFIX}rp{os.getpid() % 100000}"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return False, f"cannot create a network namespace: {(p.stderr or p.stdout).strip()}"
    try:
        t = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
                            "-m", "statistic", "--mode", "random", "--probability", "0.5", "-j", "DNAT",
                            "--to-destination", "10.0.0.1:1"], capture_output=True, text=True)
        if t.returncode != 0:
            return False, f"iptables cannot write nat DNAT rules with -m statistic here: {(t.stderr or t.stdout).strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


def _run(argv: list[str], stdin: str | None = None) -> str:
    return netns.run(argv, stdin=stdin).stdout


@dataclass
class Pod:
    name: str
    ns: str
    ip: str


@dataclass
class PodNetwork:
    """A node namespace with a bridge (the pod network) and the pods' namespaces on it."""

    tag: str = field(default_factory=lambda: f"{os.getpid() % 1000:03d}{random.randrange(16**3):03x}")
    pods: dict[str, Pod] = field(default_factory=dict)
    node: str = ""
    bridge: netns.Bridge | None = None
    made: list[str] = field(default_factory=list)   # every namespace this network created
    _next_ip: int = 2

    def create(self) -> "PodNetwork":
        self.node = f"{PREFIX}{self.tag}node"
        _run(["ip", "netns", "add", self.node])
        self.made.append(self.node)
        _run(["ip", "-n", self.node, "link", "set", "lo", "up"])
        self.bridge = netns.Bridge("thdbr", NODE_IP, ns=self.node).create()   # goes with the node namespace
        # The ClusterIP range: routed onto the pod network; the DNAT in OUTPUT picks the pod.
        _run(["ip", "-n", self.node, "route", "add", SERVICE_RANGE, "dev", self.bridge.name, "src", NODE_IP])
        return self

    def add_pod(self, name: str) -> Pod:
        k = self._next_ip
        self._next_ip += 1
        ns = f"{PREFIX}{self.tag}p{k}"
        _run(["ip", "netns", "add", ns])
        self.made.append(ns)
        pod = self.pods[name] = Pod(name, ns, f"{POD_SUBNET}.{k}")
        self.bridge.attach(ns, f"thdv{k}", "eth0", pod.ip)
        return pod

    def remove_pod(self, name: str) -> None:
        pod = self.pods.pop(name, None)
        if pod:
            subprocess.run(["ip", "netns", "del", pod.ns], capture_output=True)

    def http_ok(self, url: str, timeout_s: float = 1.0) -> bool:
        """An HTTP GET from the node (how the kubelet probes a pod): 2xx/3xx within the timeout."""
        p = subprocess.run(["ip", "netns", "exec", self.node, "curl", "-fsS", "-o", "/dev/null", "--max-time",
                            f"{timeout_s:g}", url], capture_output=True, timeout=timeout_s + 10)
        return p.returncode == 0

    def destroy(self) -> None:
        for name in list(self.pods):
            self.remove_pod(name)
        if self.node:
            subprocess.run(["ip", "netns", "del", self.node], capture_output=True)
            self.node = ""


class ServiceVIP:
    """The Service's rules in the node namespace, rewritten on every endpoint change (kube-proxy)."""

    def __init__(self, net: PodNetwork, vip: str, ports: dict[str, int]):
        self.net, self.vip, self.ports = net, vip, ports
        self.endpoints: list[str] = []
        self._chains: list[str] = []
        self._hooked = False

    def apply(self, endpoints: list[str]) -> None:
        rules = kube_proxy_rules(self.vip, self.ports, endpoints, stale=self._chains)
        _run(["ip", "netns", "exec", self.net.node, "iptables-restore", "-w", "--noflush"], stdin=rules)
        if not self._hooked:  # `-A OUTPUT -j KUBE-SERVICES`, once
            _run(["ip", "netns", "exec", self.net.node, "iptables", "-w", "-t", "nat", "-A", "OUTPUT",
                  "-j", _chain("SERVICES")])
            self._hooked = True
        self._chains = [c for c in declared_chains(rules) if c != _chain("SERVICES")]
        self.endpoints = list(endpoints)

    def rules(self) -> str:
        return _run(["ip", "netns", "exec", self.net.node, "iptables-save", "-t", "nat"])


@dataclass
class Replica:
    """One HAProxy pod of the entry: its namespace, config generation and HAProxy (PID 1 of its own
    PID namespace)."""

    name: str
    generation: int
    pod: Pod
    proc: ManagedProcess
    config: Path
    started: float
    ready_at: float | None = None

    def haproxy_pid(self) -> int:
        """HAProxy's pid as seen from here (the child of `unshare --fork`)."""
        def child():
            try:
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                return None
            return int(kids[0]) if kids else None
        return wait_until(child, 10, f"{self.name}: HAProxy under unshare")


class Drill:
    def __init__(self, run_dir: Path, rate: float = 40.0, spec: EntryPodSpec | None = None,
                 say=lambda m: None, settle_answers: int = 80):
        self.run_dir = Path(run_dir)
        self.rate, self.say, self.settle = rate, say, settle_answers
        self.spec = spec or EntryPodSpec.from_manifest()
        self.t0 = time.monotonic()
        self.timeline: list[dict] = []
        self.replicas: dict[str, Replica] = {}
        self.finished: list[Replica] = []
        self.in_service: set[str] = set()   # the pods whose endpoint the Service has

    def mark(self, step: str, pod: str, **extra) -> None:
        self.timeline.append({"t": round(time.monotonic() - self.t0, 2), "step": str(step), "pod": pod, **extra})
        self.say(f"{time.monotonic() - self.t0:6.1f}s  {step:<16} {pod} {extra or ''}")

    # -- backends: two Triton pods on the pod network
    def start_backends(self, stack: ExitStack) -> dict[str, str]:
        hosts = {}
        for name, add in BACKENDS.items():
            pod = self.net.add_pod(name)
            run = self.run_dir / name
            repo = run / "repository"
            write_add_model(repo, 1, add)
            argv = ["ip", "netns", "exec", pod.ns, *triton_argv(repo, TRITON_PORTS["http"], TRITON_PORTS["grpc"],
                                                                TRITON_PORTS["metrics"], run, host="0.0.0.0")]
            url = f"http://{pod.ip}:{TRITON_PORTS['http']}/v2/health/ready"
            proc = start_ready(name, argv, run, lambda url=url: self.net.http_ok(url), 120,
                               "ready (/v2/health/ready)", env=triton_env())
            stack.callback(proc.stop)
            hosts[name] = pod.ip
        return hosts

    def replica_settings(self, name: str, generation: int, hosts: dict[str, str]):
        """The entry's config for one generation: the k8s registry (deploy/k8s/control-plane/
        triton-hybrid.yaml) with the Tritons at their pod addresses and the drill's model served."""
        raw = yaml.safe_load(K8S_REGISTRY.read_text())
        instances = [{**i, "host": hosts[i["name"]]} for i in raw["instances"] if i["name"] in hosts]
        return load_config(K8S_REGISTRY, environ={}, overrides={
            "run_dir": str(self.run_dir / name), "instances": instances,
            "haproxy": {"served_models": [ADD_ONE], "health_interval_ms": GEN_HEALTH_INTERVAL_MS[generation]}})

    def start_replica(self, name: str, generation: int, hosts: dict[str, str], site: str) -> Replica:
        settings = self.replica_settings(name, generation, hosts)
        h = settings.haproxy
        want = {"http": h.http_port, "grpc": h.grpc_port, "stats": h.stats_port}
        if {k: self.spec.ports.get(k) for k in want} != want:
            raise RollingError(f"the registry's haproxy ports {want} are not the entry manifest's containerPorts "
                               f"{self.spec.ports}: the Service and the probes would miss HAProxy")
        settings.run_path.mkdir(parents=True, exist_ok=True)
        binary = write_config(settings, site)
        pod = self.net.add_pod(name)
        # The manifest's args, with its binary and config path at this machine's places.
        args = list(self.spec.args)
        args[0] = binary
        args[args.index("-f") + 1] = str(config_path(settings))
        argv = ["ip", "netns", "exec", pod.ns, "unshare", "--pid", "--fork", "--kill-child", *args]
        proc = start_process(name, argv, settings.run_path)
        r = Replica(name, generation, pod, proc, config_path(settings), time.monotonic())
        self.replicas[name] = r
        self.mark(Step.START, name, generation=generation, ip=pod.ip)
        return r

    def wait_ready(self, r: Replica) -> None:
        p = self.spec.readiness
        url = f"http://{r.pod.ip}:{p.port}{p.path}"
        wait_for_process(lambda: self.net.http_ok(url, p.timeout_s), r.proc, 60, f"ready ({p.path} on {p.port})",
                         interval=p.period_s)
        r.ready_at = time.monotonic()
        self.mark(Step.READY, r.name, after_s=round(r.ready_at - r.started, 2))

    def wait_available(self, r: Replica) -> None:
        # minReadySeconds: ready, and still ready (probed every periodSeconds) for that long.
        p = self.spec.readiness
        url = f"http://{r.pod.ip}:{p.port}{p.path}"

        def still_ready():
            if not self.net.http_ok(url, p.timeout_s):
                raise RollingError(f"{r.name} failed its readiness probe within minReadySeconds")
            return time.monotonic() - r.ready_at >= self.spec.min_ready_s
        wait_until(still_ready, self.spec.min_ready_s + 30, f"{r.name} available", interval=p.period_s)
        self.mark(Step.AVAILABLE, r.name)

    def terminate(self, r: Replica) -> None:
        """Kubelet's pod termination: the preStop hook, then SIGTERM to what still runs, SIGKILL at the
        end of the grace period."""
        deadline = time.monotonic() + self.spec.grace_s
        pid = r.haproxy_pid()
        self.mark(Step.PRE_STOP, r.name, command=" ".join(self.spec.pre_stop))
        hook = subprocess.Popen(["nsenter", "-t", str(pid), "-p", "-n", "--", *self.spec.pre_stop],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            hook.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hook.kill()
            hook.wait()
        self.mark(Step.STOP, r.name, haproxy_running=r.proc.alive)
        if r.proc.alive and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
        try:
            wait_until(lambda: not r.proc.alive, max(0.1, deadline - time.monotonic()), f"{r.name} to stop",
                       interval=0.05)
        except WaitTimeout:
            r.proc.signal(signal.SIGKILL)
        r.proc.stop()
        self.finished.append(self.replicas.pop(r.name))
        self.net.remove_pod(r.name)

    def set_endpoints(self, step: Step, pod: str) -> None:
        eps = [x.pod.ip for x in self.replicas.values() if x.name in self.in_service]
        self.vip.apply(eps)
        self.mark(step, pod, endpoints=len(eps))

    def run(self) -> dict:
        ok, why = available()
        if not ok:
            raise RollingError(why)
        spec = self.spec
        self.say(f"entry manifest: {spec.replicas} replicas, maxSurge {spec.max_surge}, maxUnavailable "
                 f"{spec.max_unavailable}, minReadySeconds {spec.min_ready_s:g}, grace {spec.grace_s:g}s, preStop "
                 f"{' '.join(spec.pre_stop)!r}, readiness GET {spec.readiness.path} on {spec.readiness.port}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            self.net = PodNetwork().create()
            stack.callback(self.net.destroy)
            stack.callback(self._stop_replicas)
            hosts = self.start_backends(stack)
            service_ports = {"http": spec.ports["http"], "grpc": spec.ports["grpc"]}
            self.vip = ServiceVIP(self.net, SERVICE_VIP, service_ports)
            site = "onprem"
            old = [f"entry-g1-{k}" for k in range(spec.replicas)]
            new = [f"entry-g2-{k}" for k in range(spec.replicas)]
            for name in old:
                self.wait_ready(self.start_replica(name, 1, hosts, site))
                self.in_service.add(name)
            self.set_endpoints(Step.ADD_ENDPOINT, ",".join(old))
            load = LoadProcess(self.net, self.run_dir / "load", SERVICE_VIP, service_ports, self.rate)
            stack.callback(load.close)
            load.start()
            load.wait_answers(self.settle, "load flowing through the Service")
            t_roll = time.monotonic()
            for step, name in rollout_plan(old, new, spec.max_surge, spec.max_unavailable):
                if step == Step.START:
                    self.start_replica(name, 2, hosts, site)
                elif step == Step.READY:
                    self.wait_ready(self.replicas[name])
                elif step == Step.ADD_ENDPOINT:
                    self.in_service.add(name)
                    self.set_endpoints(step, name)
                elif step == Step.AVAILABLE:
                    self.wait_available(self.replicas[name])
                elif step == Step.REMOVE_ENDPOINT:
                    self.in_service.discard(name)
                    self.set_endpoints(step, name)
                elif step == Step.PRE_STOP:
                    self.terminate(self.replicas[name])   # hook, SIGTERM, grace: marks PRE_STOP and STOP
            roll_s = time.monotonic() - t_roll
            load.wait_answers(load.answers() + self.settle, "load through the new replicas")
            records = load.stop()
            for r in list(self.replicas.values()):
                r.proc.stop()
                self.finished.append(self.replicas.pop(r.name))
        return self.report(records, roll_s, new)

    def _stop_replicas(self) -> None:
        for r in list(self.replicas.values()):
            r.proc.stop()

    def report(self, records: list[dict], roll_s: float, new: list[str]) -> dict:
        per = {}
        for r in sorted(self.finished, key=lambda x: x.name):
            counts = served_requests(r.proc.log_path.read_text(errors="replace"))
            per[r.name] = {"generation": r.generation, "served": sum(counts.values()), "by_status": counts,
                           "config_health_interval_ms": sorted({int(x) for x in _INTER.findall(r.config.read_text())})}
        by_gen: dict[int, int] = {}
        for v in per.values():
            by_gen[v["generation"]] = by_gen.get(v["generation"], 0) + v["served"]
        failed = [x for x in records if not x["ok"]]
        return {
            "drill": NAME, "rate": self.rate, "requests": len(records), "failed": len(failed),
            "failed_samples": failed[:5], "rollout_s": round(roll_s, 2),
            "served_by_replica": per, "served_by_generation": {str(k): v for k, v in sorted(by_gen.items())},
            "new_replicas": new, "timeline": self.timeline, "namespaces": list(self.net.made),
            "strategy": {"replicas": self.spec.replicas, "max_surge": self.spec.max_surge,
                         "max_unavailable": self.spec.max_unavailable, "min_ready_s": self.spec.min_ready_s,
                         "grace_s": self.spec.grace_s, "pre_stop": list(self.spec.pre_stop)},
        }


class LoadProcess:
    """The load generator as a process in the node namespace (a client on the node, through the VIP)."""

    def __init__(self, net: PodNetwork, run_dir: Path, vip: str, ports: dict[str, int], rate: float):
        self.net, self.run_dir, self.vip, self.ports, self.rate = net, Path(run_dir), vip, ports, rate
        self.out, self.progress = self.run_dir / "records.json", self.run_dir / "progress.json"
        self.proc: ManagedProcess | None = None
        self.records: list[dict] | None = None

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        argv = ["ip", "netns", "exec", self.net.node, sys.executable, "-m", "control.drills.rolling", "load",
                "--http", f"{self.vip}:{self.ports['http']}", "--grpc", f"{self.vip}:{self.ports['grpc']}",
                "--model", ADD_ONE, "--rate", str(self.rate), "--out", str(self.out), "--progress", str(self.progress)]
        self.proc = start_process("load", argv, self.run_dir, cwd=PROJECT_ROOT)

    def answers(self) -> int:
        try:
            return int(json.loads(self.progress.read_text())["answers"])
        except (OSError, ValueError, KeyError):
            return 0

    def wait_answers(self, n: int, what: str) -> None:
        wait_for_process(lambda: self.answers() >= n, self.proc, 60 + n / self.rate, f"{what} ({n} answers)")

    def close(self) -> None:
        """Stop the generator whatever state it is in (cleanup after a failed drill: nothing is read)."""
        if self.proc is not None:
            self.proc.stop(timeout=30)

    def stop(self) -> list[dict]:
        """SIGTERM: the generator stops scheduling, finishes what is in flight and writes every record."""
        if self.records is None and self.proc is not None:
            self.proc.stop(timeout=30)
            try:
                self.records = json.loads(self.out.read_text())
            except (OSError, ValueError):
                raise RollingError(f"the load generator wrote no records; its log:\n{self.proc.log_tail()}") from None
        return self.records or []


def run_rolling_update(run_dir: Path, rate: float = 40.0, say=lambda m: None) -> dict:
    return Drill(run_dir, rate=rate, say=say).run()


# ---- the load process (`python -m control.drills.rolling load ...`, inside the node namespace) ------

def _load_main(a) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    spec = auto_spec(f"http://{a.http}", a.model)
    load = OpenLoopLoad(a.http, a.grpc, spec, rate=a.rate, duration_s=3600, open_ended=True).start()
    progress = Path(a.progress)
    while not stop.wait(0.25):
        recs = list(load.records)
        tmp = progress.with_suffix(".tmp")
        tmp.write_text(json.dumps({"answers": len(recs), "failed": sum(not r.ok for r in recs)}))
        tmp.replace(progress)
    load.stop()
    records = load.join()
    Path(a.out).write_text(json.dumps([{"i": r.i, "proto": r.proto, "t": round(r.t_start, 3), "ok": r.ok,
                                        "error": r.error} for r in records]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m control.drills.rolling")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ld = sub.add_parser("load", help="open-loop load until SIGTERM, then write every record")
    ld.add_argument("--http", required=True)
    ld.add_argument("--grpc", required=True)
    ld.add_argument("--model", required=True)
    ld.add_argument("--rate", type=float, default=40.0)
    ld.add_argument("--out", required=True)
    ld.add_argument("--progress", required=True)
    a = ap.parse_args(argv)
    _load_main(a)


if __name__ == "__main__":
    main()
