"""A site in a network namespace of its own, linked to the root namespace by a veth pair.

Addresses: a private /30 we create ourselves (10.213.N.1 root side, 10.213.N.2 in the namespace);
traffic flows only between those two endpoints. Names carry a unique prefix (`thd` + a short id)
so cleanup never touches anything we did not make. `SiteNetns` is a context manager: the
namespace and the veth pair are removed on exit, also when the drill fails. `Bridge` joins several
namespaces on one segment (the two-site and rolling-update drills); `run` is the one runner of the
drills' network commands.

Needs root and iproute2. `available()` says whether namespaces can be made here, and why not.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field

PREFIX = "thd"


class NetnsError(RuntimeError):
    pass


def run(argv: list[str], *, check: bool = True, stdin: str | None = None,
        timeout: float = 20) -> subprocess.CompletedProcess:
    """The one runner of the drills' network commands (ip, iptables, tc): a failure names the
    command and what it printed."""
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {(p.stderr or p.stdout).strip()}")
    return p


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run((["ip", "-n", ns] if ns else ["ip"]) + list(args), check=check, timeout=10)


def available() -> tuple[bool, str]:
    """(True, "") when this machine can make a namespace and a veth pair; else (False, reason)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root (running as uid %d)" % os.geteuid()
    if not shutil.which("ip"):
        return False, "iproute2 (`ip`) is not installed"
    probe = f"{PREFIX}probe{os.getpid() % 100000}"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return False, f"cannot create a network namespace: {(p.stderr or p.stdout).strip()}"
    try:
        v = subprocess.run(["ip", "link", "add", f"{probe}a", "type", "veth", "peer", "name", f"{probe}b"],
                           capture_output=True, text=True)
        if v.returncode != 0:
            return False, f"cannot create a veth pair: {(v.stderr or v.stdout).strip()}"
        subprocess.run(["ip", "link", "del", f"{probe}a"], capture_output=True)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


def netem_available() -> tuple[bool, str]:
    """tc netem needs the sch_netem kernel module; some kernels (containers, microVMs) lack it."""
    ok, why = available()
    if not ok:
        return False, why
    if not shutil.which("tc"):
        return False, "`tc` (iproute2) is not installed"
    name = f"{PREFIX}nt{os.getpid() % 100000}"
    try:
        _ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
        p = subprocess.run(["tc", "qdisc", "add", "dev", f"{name}a", "root", "netem", "delay", "1ms"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            return False, f"tc netem unavailable: {(p.stderr or p.stdout).strip()}"
        return True, ""
    except NetnsError as e:
        return False, str(e)
    finally:
        subprocess.run(["ip", "link", "del", f"{name}a"], capture_output=True)


def free_subnet(prefix: str) -> int:
    """A third octet N such that no address of this machine starts with `prefix`.N. (prefix "10.213"),
    picked at random so that two drills running at once rarely race for the same one."""
    used = set()
    for tok in run(["ip", "-o", "-4", "addr", "show"], timeout=10).stdout.split():
        if tok.startswith(prefix + "."):
            try:
                used.add(int(tok.split(".")[2]))
            except (IndexError, ValueError):
                pass
    free = [n for n in range(1, 255) if n not in used]
    if not free:
        raise NetnsError(f"no free {prefix}.N.0 subnet left")
    return random.choice(free)


@dataclass
class Bridge:
    """A Linux bridge with an address, in the root namespace (ns None) or inside namespace `ns`;
    `attach` puts another namespace on it through a veth pair. Removed with its namespace, or by
    destroy() when in the root namespace."""

    name: str
    ip: str
    prefix_len: int = 24
    ns: str | None = None
    created: bool = False

    def create(self) -> "Bridge":
        _ip("link", "add", self.name, "type", "bridge", ns=self.ns)
        self.created = True
        _ip("addr", "add", f"{self.ip}/{self.prefix_len}", "dev", self.name, ns=self.ns)
        _ip("link", "set", self.name, "up", ns=self.ns)
        return self

    def attach(self, ns: str, port: str, inside: str, ip: str) -> None:
        """Namespace `ns` joins the bridge: a veth pair with `port` on the bridge and `inside` in `ns`
        holding `ip`; `ns`'s loopback comes up too."""
        _ip("link", "add", port, "type", "veth", "peer", "name", inside, "netns", ns, ns=self.ns)
        _ip("link", "set", port, "master", self.name, "up", ns=self.ns)
        _ip("addr", "add", f"{ip}/{self.prefix_len}", "dev", inside, ns=ns)
        _ip("link", "set", inside, "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)

    def destroy(self) -> None:
        if self.created:
            _ip("link", "del", self.name, ns=self.ns, check=False)
            self.created = False


@dataclass
class SiteNetns:
    """A namespace `thd<id>` with a veth pair `thd<id>r` (root side) / `thd<id>n` (namespace side)."""

    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000:04d}{random.randrange(16**3):03x}")
    subnet: int | None = None  # third octet of 10.213.N.0/30
    created: bool = False
    delay_ms: float = 0.0
    ns: str = field(init=False)
    veth_root: str = field(init=False)
    veth_ns: str = field(init=False)
    root_ip: str = field(init=False)
    ns_ip: str = field(init=False)

    def __post_init__(self) -> None:
        """Names and addresses follow from the tag and the subnet (create() picks one if none is given)."""
        self.ns, self.veth_root, self.veth_ns = (f"{PREFIX}{self.tag}{end}" for end in ("", "r", "n"))
        self.root_ip, self.ns_ip = (f"10.213.{self.subnet}.{host}" for host in (1, 2))

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def create(self) -> "SiteNetns":
        if self.subnet is None:
            self.subnet = free_subnet("10.213")
            self.__post_init__()
        try:
            _ip("netns", "add", self.ns)
            self.created = True
            _ip("link", "add", self.veth_root, "type", "veth", "peer", "name", self.veth_ns)
            _ip("link", "set", self.veth_ns, "netns", self.ns)
            _ip("addr", "add", f"{self.root_ip}/30", "dev", self.veth_root)
            _ip("link", "set", self.veth_root, "up")
            _ip("addr", "add", f"{self.ns_ip}/30", "dev", self.veth_ns, ns=self.ns)
            _ip("link", "set", self.veth_ns, "up", ns=self.ns)
            _ip("link", "set", "lo", "up", ns=self.ns)
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Remove the veth pair and the namespace; safe to call twice."""
        _ip("link", "del", self.veth_root, check=False)
        if self.created:
            _ip("netns", "del", self.ns, check=False)
            self.created = False

    def exists(self) -> bool:
        return self.ns in _ip("netns", "list").stdout.split()

    # Faults ----------------------------------------------------------------------------------
    def link_down(self) -> None:
        """Cut the site off: the namespace side goes down, packets to it are silently dropped
        (the root side keeps its route), like a partition, not like a refused connection."""
        _ip("link", "set", self.veth_ns, "down", ns=self.ns)

    def link_up(self) -> None:
        _ip("link", "set", self.veth_ns, "up", ns=self.ns)

    def add_delay(self, ms: float) -> None:
        """tc netem delay on both veth ends (each way ms/2, so the round trip grows by ms)."""
        half = f"{ms / 2:.1f}ms"
        for argv in (["tc", "qdisc", "replace", "dev", self.veth_root, "root", "netem", "delay", half],
                     ["ip", "netns", "exec", self.ns, "tc", "qdisc", "replace", "dev", self.veth_ns, "root", "netem",
                      "delay", half]):
            run(argv)
        self.delay_ms = ms

    def clear_delay(self) -> None:
        run(["tc", "qdisc", "del", "dev", self.veth_root, "root"], check=False)
        run(["ip", "netns", "exec", self.ns, "tc", "qdisc", "del", "dev", self.veth_ns, "root"], check=False)
        self.delay_ms = 0.0

    def __enter__(self) -> "SiteNetns":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()


def leftovers() -> list[str]:
    """Namespaces with our prefix (for a test's cleanup assertion)."""
    out = _ip("netns", "list", check=False).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(PREFIX)]
