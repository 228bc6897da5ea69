"""Separate Triton hosts on one machine (DESIGN.md, "Hosts, agents and desired state", test harness):
each host is a network namespace of its own (SiteNetns: a veth pair, its own address) whose
processes share a private mount namespace with a tmpfs over the host's directory (its repository
and the agent's state). The host's Triton and its agent see the same files; the root namespace,
where the test, the control plane, S3 and HAProxy run, sees an empty directory.

    with HostLab(run_dir, instances, control={...}) as lab:   # S3, every host, HAProxy
        lab.hosts["onprem-1"].files()                          # what that host holds (read from inside)
        lab.hosts["onprem-2"].ns.link_down()                    # cut it off: from clients AND from S3

One mount namespace for several processes: `unshare --mount` gives each process its own, so a
*holder* process makes it (`ip netns exec NS unshare --mount --propagation private sh -c 'mount -t
tmpfs ... DIR && exec sleep infinity'`) and Triton and the agent join it and its network namespace
with `nsenter --target <holder> --mount --net`. `ip netns exec`, `unshare`, `sh -c 'exec ...'` and
`nsenter` all exec (no fork), so each managed pid is the process itself (measured). Every process is a
ManagedProcess (own process group, pid file); `stop()` ends them (agent, Triton, then the holder,
which frees the tmpfs with the namespace) and removes the namespaces, also after a failed start.

Addresses: Triton listens on 0.0.0.0 inside the namespace (only its loopback and its veth end
exist there): the agent calls it on the host's loopback, HAProxy and the rollout's metrics scrape
on the namespace address. The S3 endpoint listens on the root namespace's loopback; each host
reaches it through a TCP forwarder (DelayProxy) on the root end of its veth, so a link down cuts
the host from S3 as well as from clients, as a partition would.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from control.adapters import s3 as s3x
from control.config import DEFAULT_CONFIG, PROJECT_ROOT, Settings
from control.drills import netns
from control.drills.faults import DelayProxy
from control.drills.netns import SiteNetns
from control.local.admin_keys import admin_key, ensure_admin_key
from control.local.agents import agent_config_for, agent_name, write_agent_config
from control.local.haproxy import start_haproxy
from control.local.isolated import isolated_settings
from control.local.procs import (
    ComponentError,
    ManagedProcess,
    free_port,
    http_ok,
    private_dir,
    start_process,
    start_ready,
    wait_for_process,
)
from control.local.s3_endpoint import start_s3_server
from control.local.triton_server import triton_argv, triton_env
from control.mirror.desired import DesiredStore

TWO_ONPREM = (("onprem-1", "onprem", 50, True), ("onprem-2", "onprem", 50, True))
HOLDER_PREFIX = "host-"
# Inside the namespace Triton binds every address it has: its loopback (the agent) and its veth end
# (HAProxy, the metrics scrape). Nothing else exists in a namespace we made.
ALL_ADDRESSES = "0.0.0.0"


class HostError(RuntimeError):
    """A host could not be made or started; the message names the host and the step."""


def available() -> tuple[bool, str]:
    """(True, "") when hosts can be made here (root, iproute2, util-linux's unshare and nsenter);
    else (False, why)."""
    for tool in ("unshare", "nsenter"):
        if not shutil.which(tool):
            return False, f"`{tool}` (util-linux) is not installed"
    return netns.available()


def _mounted(pid: int, path: Path) -> bool:
    """`path` is a tmpfs mount point in the mount namespace of `pid`."""
    try:
        lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return False
    for ln in lines:
        fields = ln.split()
        # mountinfo: id parent major:minor root mount-point options ... - fstype source ...
        if len(fields) > 4 and fields[4] == str(path) and " - tmpfs " in ln:
            return True
    return False


def mount_ns(pid: int | str) -> str:
    """The mount namespace of a process (`self` for this one), as /proc/PID/ns/mnt names it."""
    return os.readlink(f"/proc/{pid}/ns/mnt")


@dataclass
class Host:
    """One Triton host: its namespaces, the processes in them and the forwarder to S3."""

    settings: Settings          # the lab's settings (clients' view: the instance at its namespace address)
    name: str
    ns: SiteNetns
    root: Path                  # the host's directory: a tmpfs inside, an empty directory outside
    tmpfs_size_mb: int = 256
    procs: dict[str, ManagedProcess] = field(default_factory=dict)
    forwarder: DelayProxy | None = None
    s3_port: int = 0            # the forwarder's port on ns.root_ip
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def inst(self):
        return self.settings.instance(self.name)

    @property
    def repository(self) -> Path:
        return self.root / "repository"

    @property
    def state_dir(self) -> Path:
        return self.root / "agent"

    @property
    def holder(self) -> ManagedProcess:
        return self.procs["holder"]

    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command on this host: its network and mount namespaces."""
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--net", f"--wd={PROJECT_ROOT}", "--"]

    def run(self, argv: list[str], timeout: float = 15.0) -> subprocess.CompletedProcess:
        """A short command on this host (e.g. `find` in its repository); raises on failure."""
        p = subprocess.run(self.exec_prefix() + argv, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise HostError(f"host {self.name}: `{' '.join(argv)}` failed: {(p.stderr or p.stdout).strip()}")
        return p

    def files(self, under: str = "") -> list[str]:
        """Files under the host's directory (or `under` in it), relative to it, read from inside."""
        base = self.root / under
        out = self.run(["find", str(base), "-type", "f"]).stdout.split("\n")
        return sorted(str(Path(p).relative_to(self.root)) for p in out if p)

    # Starting -------------------------------------------------------------------------------------
    def start_forwarder(self) -> None:
        """The host's way to S3: root end of its veth -> S3 on the root namespace's loopback."""
        s3 = self.settings.s3
        self.s3_port = free_port(self.ns.root_ip)
        self.forwarder = DelayProxy(self.ns.root_ip, self.s3_port, s3.host, s3.port).start()

    def start_holder(self, timeout: float = 15.0) -> None:
        """The process that owns the host's mount namespace: tmpfs over `root`, then sleeps."""
        private_dir(self.root)  # the mount point (empty, and stays so, in the root namespace)
        script = ('mount -t tmpfs -o "mode=0700,size=$2m" tmpfs "$1" && mkdir -m 0700 "$1/repository" '
                  '&& exec sleep infinity')
        argv = self.ns.exec_prefix() + ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                                        str(self.root), str(self.tmpfs_size_mb)]
        t0 = time.monotonic()
        proc = self.procs["holder"] = start_process(f"{HOLDER_PREFIX}{self.name}", argv, self.settings.run_path,
                                                    meta={"kind": "host", "instance": self.name})
        try:
            wait_for_process(lambda: _mounted(proc.pid, self.root), proc, timeout,
                             f"a tmpfs on {self.root} in its mount namespace")
        except ComponentError:
            self.procs.pop("holder").stop()
            raise
        self.timings["holder_s"] = time.monotonic() - t0

    def start_triton(self, timeout: float = 90.0) -> ManagedProcess:
        inst, s = self.inst, self.settings
        key = ensure_admin_key(s, inst)
        argv = triton_argv(self.repository, inst.http_port, inst.grpc_port, inst.metrics_port, s.run_path,
                           admin_key=key, host=ALL_ADDRESSES, extra_args=s.triton.extra_args,
                           log_verbose=s.triton.log_verbose)
        t0 = time.monotonic()
        self.procs["triton"] = start_ready(
            inst.name, self.exec_prefix() + argv, s.run_path, lambda: http_ok(f"{inst.http_url}/v2/health/ready"),
            timeout, "ready (/v2/health/ready) at its namespace address", log_lines=40, env=triton_env(),
            secret_values=[key], meta={"kind": "triton", "instance": inst.name, "host": self.ns.ns})
        self.timings["triton_s"] = time.monotonic() - t0
        return self.procs["triton"]

    def agent_settings(self) -> Settings:
        """The settings as this host sees them: S3 through its forwarder."""
        s3 = self.settings.s3.model_copy(update={"host": self.ns.root_ip, "port": self.s3_port, "endpoint_url": ""})
        return self.settings.model_copy(update={"s3": s3})

    def start_agent(self, timeout: float = 60.0, **agent) -> ManagedProcess:
        """`triton-hybrid agent` on this host: Triton on the host's loopback, the repository and its
        state in the tmpfs, its API on the namespace address. `agent`: AgentConfig overrides."""
        inst = self.inst
        cfg = agent_config_for(self.settings, inst, triton_url=f"http://127.0.0.1:{inst.http_port}",
                               repository_dir=str(self.repository), state_dir=str(self.state_dir),
                               api_host=inst.host, **agent)
        path = write_agent_config(self.agent_settings(), inst, cfg)
        argv = self.exec_prefix() + [sys.executable, "-m", "control.cli", "--config", str(path), "agent"]
        t0 = time.monotonic()
        self.procs["agent"] = start_ready(agent_name(inst), argv, self.settings.run_path,
                                          lambda: http_ok(f"{inst.agent_url}/healthz"), timeout, "answering /healthz",
                                          meta={"kind": "agent", "instance": inst.name, "host": self.ns.ns})
        self.timings["agent_s"] = time.monotonic() - t0
        return self.procs["agent"]

    def start(self, **agent) -> "Host":
        self.start_forwarder()
        self.start_holder()
        self.start_triton()
        self.start_agent(**agent)
        return self

    # Views ----------------------------------------------------------------------------------------
    def triton_index(self, timeout: float = 5.0) -> list[dict]:
        """Triton's repository index (every model and version it knows, any state), with this
        instance's admin key: an observer's read, from the root namespace."""
        r = requests.post(f"{self.inst.http_url}/v2/repository/index", timeout=timeout,
                          headers={"admin-key": admin_key(self.settings, self.inst)})
        r.raise_for_status()
        return r.json()

    # Stopping -------------------------------------------------------------------------------------
    def stop(self) -> list[str]:
        """Stop the agent, Triton and the holder (the tmpfs goes with the namespace), the forwarder,
        then remove the network namespace. Returns what could not be stopped (empty: all clean)."""
        problems = []
        for name in ("agent", "triton", "holder"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            try:
                proc.stop(timeout=10)
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                problems.append(f"{self.name} {name}: {e}")
        if self.forwarder is not None:
            self.forwarder.stop()
            self.forwarder = None
        self.ns.destroy()
        return problems


class HostLab:
    """Hosts (one namespace each), the S3 endpoint and HAProxy: a fleet of separate Triton hosts on
    one machine. `instances`: (name, site, weight, sensitive_ok); `sections`: config overrides (e.g.
    control={"rollout": {...}}, agent={"interval_s": 0.5}). Needs root (netns.available())."""

    def __init__(self, run_dir: Path, instances=TWO_ONPREM, *, tmpfs_size_mb: int = 256, **sections):
        self.run_dir, self.instances, self.sections = Path(run_dir), tuple(instances), sections
        self.tmpfs_size_mb = tmpfs_size_mb
        self.settings: Settings | None = None
        self.hosts: dict[str, Host] = {}
        self.procs: dict[str, ManagedProcess] = {}
        self.client = None
        self.store: DesiredStore | None = None
        self.timings: dict[str, float] = {}
        self._namespaces: dict[str, SiteNetns] = {}

    def start(self) -> "HostLab":
        ok, why = available()
        if not ok:
            raise HostError(f"cannot make hosts here: {why}")
        t0 = time.monotonic()
        try:
            spaces = self._namespaces
            for name, *_ in self.instances:
                spaces[name] = SiteNetns().create()
            base = yaml.safe_load(DEFAULT_CONFIG.read_text())
            base["instances"] = [{"name": n, "site": s, "weight": w, "sensitive_ok": ok_, "host": spaces[n].ns_ip}
                                 for n, s, w, ok_ in self.instances]
            self.settings = isolated_settings(self.run_dir, instances=None, base=base, **self.sections)
            self.hosts = {n: Host(self.settings, n, ns, self.settings.run_path / "hosts" / n,
                                  tmpfs_size_mb=self.tmpfs_size_mb) for n, ns in spaces.items()}
            self.procs["s3"] = start_s3_server(self.settings)
            self.client = s3x.make_client(self.settings.s3)
            s3x.ensure_bucket(self.client, self.settings.s3)
            self.store = DesiredStore(self.client, self.settings.s3)
            for h in self.hosts.values():
                h.start()
            self.procs["haproxy"] = start_haproxy(self.settings)
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def stop(self) -> list[str]:
        """Everything the lab started, stopped; every namespace removed. Returns the problems met."""
        problems = []
        if "haproxy" in self.procs:
            try:
                self.procs.pop("haproxy").stop(timeout=10)
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                problems.append(f"haproxy: {e}")
        for h in self.hosts.values():
            problems += h.stop()
        for ns in self._namespaces.values():
            ns.destroy()  # also those of hosts that never got made
        if "s3" in self.procs:
            try:
                self.procs.pop("s3").stop(timeout=10)
            except Exception as e:  # noqa: BLE001
                problems.append(f"s3: {e}")
        return problems

    def haproxy_urls(self) -> tuple[str, str]:
        h = self.settings.haproxy
        return f"{h.host}:{h.http_port}", f"{h.host}:{h.grpc_port}"

    def __enter__(self) -> "HostLab":
        return self.start()

    def __exit__(self, *exc) -> None:
        problems = self.stop()
        if problems and exc[0] is None:
            raise ComponentError("host lab", "; ".join(problems))
