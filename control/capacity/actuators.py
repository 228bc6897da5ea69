"""Scale actuators: thin adapters that add or remove cloud capacity (control/capacity/scaler.py decides).

    instances() -> list[CloudInstance]      what the cloud has now (count, removable, cost)
    scale_out(decision) -> dict             add one instance; returns what it did
    scale_in(decision) -> dict              remove decision.instance (drained first where we route)
    adopt() -> list[str]                    after a daemon restart: take back what still runs

LocalProcessScaler  extra hosts on this machine, named `cloud-N`, on free ports: a Triton and its host
                    agent, each with a pid file (control/local/procs.py) so `triton-hybrid down` stops
                    them too. A new instance starts like every host (control/local/agents.start_host):
                    its agent prepares the desired versions from S3, Triton starts on them, the agent
                    registers it in S3 and smoke-checks every model; only when the agent's /ready says
                    every model is live at its desired version does it get
                    `add server` in both HAProxy backends with weight 0 (HAProxy 2.6 runtime
                    API, dynamic servers; every check setting explicit), `enable health`/`enable
                    server`, wait for HAProxy's health check to report it UP, and only then hand it
                    to the controller, whose next tick gives it weight. Scale-in: drain in both
                    backends (through the controller, so its tick keeps the drain), wait until
                    HAProxy shows no session/queued request and Triton no pending request, take it
                    out of the registry, maint + `del server`, stop the process. If it never gets
                    idle within drain_timeout_s the drain is undone and nothing is stopped.
AsgScaler           AWS Auto Scaling group desired capacity (boto3; tests: the local moto server).
K8sScaler           replicas of the cloud Triton Deployment: patch a manifest file, or
                    `kubectl scale` (config `k8s_mode`).
DryRunScaler        logs and counts.
"""
from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Protocol

import requests
import yaml

from control.adapters import haproxy_config
from control.adapters.haproxy_runtime import HAProxyError, HAProxyRuntime
from control.adapters.triton import TritonAdminError
from control.capacity.scaler import CloudInstance, ScaleDecision
from control.config import InstanceConfig
from control.local.admin_keys import admin_key
from control.local.agents import agent_name, start_host
from control.local.procs import ComponentError, free_port, load_managed, managed_names
from control.traffic.triton_metrics import parse

log = logging.getLogger(__name__)


class ScaleError(RuntimeError):
    pass


class ScaleActuator(Protocol):
    """What the capacity job (control/daemon/capacity_job.py) needs of a way to add cloud capacity."""
    name: str

    def instances(self) -> list[CloudInstance]: ...

    def scale_out(self, decision: ScaleDecision) -> dict: ...

    def scale_in(self, decision: ScaleDecision) -> dict: ...

    def adopt(self) -> list[str]: ...


class InstanceRegistry(Protocol):
    """The daemon's instance registry as the local scaler uses it (control/daemon/registry.py)."""
    def add_instance(self, inst: InstanceConfig) -> None: ...

    def remove_instance(self, name: str) -> None: ...

    def begin_drain(self, name: str) -> None: ...

    def end_drain(self, name: str) -> None: ...


def template_instance(settings) -> InstanceConfig:
    sc = settings.control.scaler
    if sc.template_instance:
        return settings.instance(sc.template_instance)
    cloud = settings.site_instances("cloud")
    if not cloud:
        raise ScaleError("no cloud instance in the registry to copy (set control.scaler.template_instance)")
    return cloud[0]


def new_instance_cost(settings) -> float:
    try:
        return template_instance(settings).cost_per_hour
    except (ScaleError, Exception):  # noqa: BLE001
        return 0.0


def ready_versions(settings, inst, timeout: float = 5.0) -> dict[str, list[int]]:
    """{model: sorted READY versions} from the instance's repository index (admin key)."""
    from control.adapters.triton import TritonAdmin, ready_versions_of  # noqa: PLC0415 - tritonclient only when used
    admin = TritonAdmin(inst.name, inst.http_url, admin_key(settings, inst), timeout=timeout)
    return {k: sorted(v) for k, v in sorted(ready_versions_of(admin.index()).items())}


class LocalProcessScaler:
    name = "local"

    def __init__(self, settings, controller: InstanceRegistry, runtime: HAProxyRuntime | None = None,
                 clock=time.time):
        self.settings = settings
        self.sc = settings.control.scaler
        self.controller = controller
        self.rt = runtime or HAProxyRuntime.for_settings(settings)
        self.backends = list(haproxy_config.ALL_BACKENDS)
        self.clock = clock
        self.state_dir = settings.run_path / "scaled"

    # ---- view -----------------------------------------------------------------------------------
    def owned(self) -> set[str]:
        return {p.stem for p in self.state_dir.glob("*.json")} if self.state_dir.is_dir() else set()

    def instances(self) -> list[CloudInstance]:
        owned = self.owned()
        return [CloudInstance(i.name, i.name in owned, i.cost_per_hour, i.capacity)
                for i in self.settings.instances if i.site == "cloud"]

    def adopt(self) -> list[str]:
        """After a daemon restart: scaled instances whose process still runs rejoin the registry
        (re-added to HAProxy if it lost them); records of dead ones are dropped."""
        back = []
        known = {i.name for i in self.settings.instances}
        for name in sorted(self.owned()):
            rec = self.state_dir / f"{name}.json"
            inst = InstanceConfig.model_validate(json.loads(rec.read_text()))
            proc = load_managed(self.settings.run_path, name)
            if proc is None or not proc.alive:
                self._stop_host(inst)  # its agent, if it outlived its Triton; the record goes
                continue
            if name in known:
                continue
            have = {(s.backend, s.server) for s in self.rt.servers()}
            for be in self.backends:
                if (be, name) not in have:
                    self._add_server(be, inst)
            self.controller.add_instance(inst)
            back.append(name)
        return back

    def _next_name(self) -> str:
        taken = {i.name for i in self.settings.instances} | self.owned() | set(managed_names(self.settings.run_path))
        n = 1
        while f"{self.sc.name_prefix}{n}" in taken:
            n += 1
        return f"{self.sc.name_prefix}{n}"

    # ---- out ------------------------------------------------------------------------------------
    def _server_args(self, be: str, inst: InstanceConfig) -> tuple[str, str]:
        h = self.settings.haproxy
        chk = (f"inter {h.health_interval_ms}ms fastinter {max(h.health_interval_ms // 2, 1)}ms "
               f"fall {h.health_fall} rise {h.health_rise}")
        if "grpc" in be:
            return f"{inst.host}:{inst.grpc_port}", f"proto h2 weight 0 check port {inst.http_port} check-proto h1 {chk}"
        return f"{inst.host}:{inst.http_port}", f"weight 0 check {chk}"

    def _add_server(self, be: str, inst: InstanceConfig) -> list[str]:
        addr, args = self._server_args(be, inst)
        self.rt.add_server(be, inst.name, addr, args)
        self.rt.enable_server(be, inst.name)
        return [f"add server {be}/{inst.name} {addr} {args}", f"enable health {be}/{inst.name}",
                f"enable server {be}/{inst.name}"]

    def scale_out(self, decision: ScaleDecision) -> dict:
        t0 = self.clock()
        tpl = template_instance(self.settings)
        name = self._next_name()
        inst = InstanceConfig(name=name, site="cloud", host=tpl.host, http_port=free_port(tpl.host),
                              grpc_port=free_port(tpl.host), metrics_port=free_port(tpl.host),
                              agent_port=free_port(tpl.host), weight=0, capacity=tpl.capacity,
                              cost_per_hour=tpl.cost_per_hour, sensitive_ok=False, managed=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        rec = self.state_dir / f"{name}.json"
        rec.write_text(inst.model_dump_json())
        procs, added = [], []
        try:
            procs = start_host(self.settings, inst, ready_timeout=self.sc.ready_timeout_s)
            t_ready = self.clock()
            got = ready_versions(self.settings, inst)
            cmds = []
            for be in self.backends:
                cmds += self._add_server(be, inst)
                added.append(be)
            deadline = time.monotonic() + max(10.0, self.settings.haproxy.health_interval_ms / 1000 * 10)
            while not self._up_everywhere(name):
                if time.monotonic() > deadline:
                    raise ScaleError(f"HAProxy's health check never reported {name} UP")
                time.sleep(0.1)
            t_up = self.clock()
            self.controller.add_instance(inst)
            return {"instance": name, "http_port": inst.http_port, "grpc_port": inst.grpc_port,
                    "agent_port": inst.agent_port, "versions": got, "ready_at": t_ready, "registered_at": t_up,
                    "seconds_to_ready": round(t_ready - t0, 2),
                    "seconds_to_registered": round(t_up - t0, 2), "commands": cmds}
        except (ComponentError, HAProxyError, ScaleError, TritonAdminError, requests.RequestException, OSError) as e:
            for be in added:
                self._remove_server(be, name)
            for p in reversed(procs):
                p.stop()
            rec.unlink(missing_ok=True)
            raise ScaleError(f"scale-out of {name} failed: {e}") from None

    def _up_everywhere(self, name: str) -> bool:
        st = {s.backend: s for s in self.rt.servers() if s.server == name}
        return all(be in st and st[be].up and st[be].admin == "ready" for be in self.backends)

    # ---- in -------------------------------------------------------------------------------------
    def _remove_server(self, be: str, name: str) -> None:
        try:
            self.rt.set_state(be, name, "maint")
            self.rt.del_server(be, name)
        except HAProxyError as e:
            log.warning("removing %s/%s from HAProxy: %s", be, name, e)

    def _inflight(self, inst: InstanceConfig) -> float:
        n = float(sum(self.rt.sessions(be, inst.name) for be in self.backends))
        try:
            n += parse(requests.get(inst.metrics_url, timeout=2).text).pending or 0.0
        except Exception as e:  # noqa: BLE001 - unknown counts as busy
            log.warning("pending requests of %s unknown: %s", inst.name, e)
            return float("inf")
        return n

    def scale_in(self, decision: ScaleDecision) -> dict:
        name = decision.instance
        if name not in self.owned():
            raise ScaleError(f"{name} was not started by the scaler; not removing it")
        inst = self.settings.instance(name)
        t0 = self.clock()
        self.controller.begin_drain(name)
        try:
            for be in self.backends:
                self.rt.set_state(be, name, "drain")
            deadline = time.monotonic() + self.sc.drain_timeout_s
            quiet = 0
            while quiet < 3:  # three readings in a row with nothing in flight
                if time.monotonic() > deadline:
                    raise ScaleError(f"{name} still had requests in flight after {self.sc.drain_timeout_s:g}s "
                                     "of drain: not stopped, drain undone")
                quiet = quiet + 1 if self._inflight(inst) == 0 else 0
                time.sleep(0.3)
        except (ScaleError, HAProxyError) as e:
            self.controller.end_drain(name)
            raise ScaleError(str(e)) from None
        t_drained = self.clock()
        self.controller.remove_instance(name)
        for be in self.backends:
            self._remove_server(be, name)
        self._stop_host(inst)
        return {"instance": name, "seconds_to_drained": round(t_drained - t0, 2),
                "seconds_to_stopped": round(self.clock() - t0, 2)}

    def _stop_host(self, inst: InstanceConfig) -> None:
        """Its agent first (it never loads into a Triton that is going away), then its Triton."""
        for component in (agent_name(inst), inst.name):
            proc = load_managed(self.settings.run_path, component)
            if proc is not None:
                proc.stop()
        (self.state_dir / f"{inst.name}.json").unlink(missing_ok=True)

    def stop_all(self) -> None:
        for name in list(self.owned()):
            self._stop_host(InstanceConfig.model_validate_json((self.state_dir / f"{name}.json").read_text()))


class AsgScaler:
    """Desired capacity of an AWS Auto Scaling group. In-flight safety there belongs to the cloud
    side (a lifecycle hook / the load balancer's deregistration delay); this adapter only moves
    the desired count by one, and never below the group's MinSize or above its MaxSize."""
    name = "asg"

    def __init__(self, group: str, client=None, endpoint_url: str = "", region: str = "us-east-1",
                 cost_per_hour: float = 0.0, capacity: float = 1.0):
        if not group:
            raise ScaleError("control.scaler.asg_name is empty")
        if client is None:
            import boto3  # noqa: PLC0415
            client = boto3.client("autoscaling", region_name=region, endpoint_url=endpoint_url or None)
        self.client, self.group = client, group
        self.cost_per_hour, self.capacity = cost_per_hour, capacity

    @classmethod
    def from_settings(cls, settings) -> "AsgScaler":
        sc = settings.control.scaler
        return cls(sc.asg_name, endpoint_url=sc.asg_endpoint_url, region=sc.asg_region,
                   cost_per_hour=new_instance_cost(settings))

    def describe(self) -> dict:
        groups = self.client.describe_auto_scaling_groups(AutoScalingGroupNames=[self.group])["AutoScalingGroups"]
        if not groups:
            raise ScaleError(f"no Auto Scaling group named {self.group!r}")
        return groups[0]

    def desired(self) -> int:
        return int(self.describe()["DesiredCapacity"])

    def set_desired(self, n: int) -> dict:
        g = self.describe()
        if not g["MinSize"] <= n <= g["MaxSize"]:
            raise ScaleError(f"desired capacity {n} is outside the group's {g['MinSize']}..{g['MaxSize']}")
        self.client.set_desired_capacity(AutoScalingGroupName=self.group, DesiredCapacity=n, HonorCooldown=False)
        got = self.desired()
        if got != n:
            raise ScaleError(f"{self.group}: set desired capacity {n}, read back {got}")
        return {"group": self.group, "desired_before": int(g["DesiredCapacity"]), "desired": got}

    def instances(self) -> list[CloudInstance]:
        g = self.describe()
        ids = [i["InstanceId"] for i in g.get("Instances", []) if i.get("LifecycleState") != "Terminating"]
        n = int(g["DesiredCapacity"])
        names = (ids + [f"{self.group}-pending-{k}" for k in range(n)])[:n]
        return [CloudInstance(x, True, self.cost_per_hour, self.capacity) for x in names]

    def adopt(self) -> list[str]:
        """The group keeps its instances across a daemon restart: nothing to take back."""
        return []

    def scale_out(self, decision: ScaleDecision) -> dict:
        return self.set_desired(self.desired() + 1)

    def scale_in(self, decision: ScaleDecision) -> dict:
        return self.set_desired(self.desired() - 1)


class K8sScaler:
    """`replicas` of the cloud Triton Deployment: in a manifest file (then applied by the GitOps
    tool or `kubectl apply`), or live through `kubectl scale`. Pod drain is the Deployment's own
    (preStop + terminationGracePeriodSeconds, readiness gate)."""
    name = "k8s"

    def __init__(self, mode: str, deployment: str, namespace: str = "", manifest: str | Path = "",
                 kubectl: str = "kubectl", cost_per_hour: float = 0.0, capacity: float = 1.0, runner=subprocess.run):
        self.mode, self.deployment, self.namespace = mode, deployment, namespace
        self.manifest = Path(manifest) if manifest else None
        self.kubectl, self.runner = kubectl, runner
        self.cost_per_hour, self.capacity = cost_per_hour, capacity
        if mode == "manifest" and self.manifest is None:
            raise ScaleError("control.scaler.k8s_manifest is empty")

    @classmethod
    def from_settings(cls, settings) -> "K8sScaler":
        sc = settings.control.scaler
        return cls(sc.k8s_mode, sc.k8s_deployment, sc.k8s_namespace,
                   settings.path(sc.k8s_manifest) if sc.k8s_manifest else "", sc.kubectl,
                   new_instance_cost(settings))

    def _docs(self):
        return list(yaml.safe_load_all(self.manifest.read_text()))

    def _find(self, docs) -> dict:
        for d in docs:
            if isinstance(d, dict) and d.get("kind") == "Deployment" and d.get("metadata", {}).get("name") == self.deployment:
                return d
        raise ScaleError(f"no Deployment {self.deployment!r} in {self.manifest}")

    def _kubectl(self, *args) -> str:
        argv = [self.kubectl, *args] + (["-n", self.namespace] if self.namespace else [])
        r = self.runner(argv, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise ScaleError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout.strip()

    def replicas(self) -> int:
        if self.mode == "kubectl":
            return int(self._kubectl("get", f"deployment/{self.deployment}", "-o", "jsonpath={.spec.replicas}") or 0)
        return int(self._find(self._docs()).get("spec", {}).get("replicas", 1))

    def set_replicas(self, n: int) -> dict:
        before = self.replicas()
        if self.mode == "kubectl":
            self._kubectl("scale", f"deployment/{self.deployment}", f"--replicas={n}")
        else:
            docs = self._docs()
            self._find(docs).setdefault("spec", {})["replicas"] = n
            tmp = self.manifest.with_suffix(self.manifest.suffix + ".tmp")
            tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
            tmp.replace(self.manifest)
        return {"deployment": self.deployment, "mode": self.mode, "replicas_before": before, "replicas": n}

    def instances(self) -> list[CloudInstance]:
        return [CloudInstance(f"{self.deployment}-{k}", True, self.cost_per_hour, self.capacity)
                for k in range(self.replicas())]

    def adopt(self) -> list[str]:
        """The Deployment keeps its replicas across a daemon restart: nothing to take back."""
        return []

    def scale_out(self, decision: ScaleDecision) -> dict:
        return self.set_replicas(self.replicas() + 1)

    def scale_in(self, decision: ScaleDecision) -> dict:
        return self.set_replicas(max(self.replicas() - 1, 0))


class DryRunScaler:
    name = "dry-run"

    def __init__(self, settings):
        self.settings = settings
        self.extra: list[str] = []

    def instances(self) -> list[CloudInstance]:
        cost = new_instance_cost(self.settings)
        return ([CloudInstance(i.name, False, i.cost_per_hour, i.capacity) for i in self.settings.site_instances("cloud")]
                + [CloudInstance(n, True, cost) for n in self.extra])

    def adopt(self) -> list[str]:
        return []

    def scale_out(self, decision: ScaleDecision) -> dict:
        self.extra.append(f"dry-run-{len(self.extra) + 1}")
        log.info("dry-run: would add a cloud instance (%s)", decision.message)
        return {"instance": self.extra[-1]}

    def scale_in(self, decision: ScaleDecision) -> dict:
        if decision.instance in self.extra:
            self.extra.remove(decision.instance)
        log.info("dry-run: would remove %s", decision.instance)
        return {"instance": decision.instance}


def make_scale_actuator(settings, controller: InstanceRegistry, **kw) -> ScaleActuator:
    kind = settings.control.scaler.actuator
    if kind == "local":
        return LocalProcessScaler(settings, controller, **kw)
    if kind == "asg":
        return AsgScaler.from_settings(settings)
    if kind == "k8s":
        return K8sScaler.from_settings(settings)
    return DryRunScaler(settings)


__all__ = ["AsgScaler", "DryRunScaler", "InstanceRegistry", "K8sScaler", "LocalProcessScaler", "ScaleActuator",
           "ScaleError", "make_scale_actuator",
           "new_instance_cost", "ready_versions", "template_instance"]
