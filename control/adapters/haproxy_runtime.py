"""Thin adapter over HAProxy's runtime API (stats socket, `level admin`; DESIGN.md fact 7).

One command per connection (HAProxy's non-interactive mode). Only the commands we need:
`set weight`, `set server ... state ready|drain|maint`, `show servers state`.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from control.adapters.haproxy_config import socket_path

# srv_admin_state bits (haproxy/include/haproxy/server-t.h)
SRV_ADMF_FMAINT = 0x01   # forced maintenance (CLI)
SRV_ADMF_IMAINT = 0x02   # inherited maintenance
SRV_ADMF_CMAINT = 0x04   # maintenance from the config
SRV_ADMF_FDRAIN = 0x08   # forced drain (CLI)
SRV_ADMF_IDRAIN = 0x10   # inherited drain
SRV_ADMF_RMAINT = 0x20   # DNS resolution maintenance
SRV_ADMF_HMAINT = 0x40   # hostname maintenance
OP_STATES = {0: "stopped", 1: "starting", 2: "running", 3: "stopping"}


class HAProxyError(RuntimeError):
    pass


@dataclass(frozen=True)
class ServerState:
    backend: str
    server: str
    addr: str
    op_state: int          # 0 stopped (health check down), 2 running
    admin_state: int
    weight: int            # srv_uweight: the user weight we set
    check_status: int | None = None

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.server}"

    @property
    def admin(self) -> str:
        """ready | drain | maint"""
        if self.admin_state & (SRV_ADMF_FMAINT | SRV_ADMF_IMAINT | SRV_ADMF_CMAINT | SRV_ADMF_RMAINT | SRV_ADMF_HMAINT):
            return "maint"
        if self.admin_state & (SRV_ADMF_FDRAIN | SRV_ADMF_IDRAIN):
            return "drain"
        return "ready"

    @property
    def up(self) -> bool:
        return self.op_state == 2

    def to_dict(self) -> dict:
        return {"backend": self.backend, "server": self.server, "addr": self.addr, "weight": self.weight,
                "admin": self.admin, "up": self.up, "op_state": OP_STATES.get(self.op_state, str(self.op_state))}


def parse_servers_state(text: str) -> list[ServerState]:
    """Parse `show servers state` (format version 1: a version line, a `# field ...` header)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    header = next((ln for ln in lines if ln.startswith("#")), None)
    if header is None:
        raise HAProxyError(f"unexpected `show servers state` output: {text[:200]!r}")
    fields = header.lstrip("#").split()
    idx = {f: i for i, f in enumerate(fields)}
    need = ("be_name", "srv_name", "srv_addr", "srv_op_state", "srv_admin_state", "srv_uweight")
    missing = [f for f in need if f not in idx]
    if missing:
        raise HAProxyError(f"`show servers state` lacks fields {missing}")
    out = []
    for ln in lines:
        if ln.startswith("#") or ln.strip().isdigit():
            continue
        parts = ln.split()
        if len(parts) < len(fields) - 5:  # trailing optional fields may be absent
            continue
        out.append(ServerState(
            backend=parts[idx["be_name"]], server=parts[idx["srv_name"]], addr=parts[idx["srv_addr"]],
            op_state=int(parts[idx["srv_op_state"]]), admin_state=int(parts[idx["srv_admin_state"]]),
            weight=int(parts[idx["srv_uweight"]]),
            check_status=int(parts[idx["srv_check_status"]]) if "srv_check_status" in idx else None))
    return out


class HAProxyRuntime:
    def __init__(self, socket_path: str | Path, timeout_s: float = 2.0):
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s

    @classmethod
    def for_settings(cls, settings, timeout_s: float = 2.0) -> "HAProxyRuntime":
        """The stats socket the generated haproxy.cfg declares."""
        return cls(socket_path(settings), timeout_s)

    def command(self, cmd: str) -> str:
        if "\n" in cmd or ";" in cmd:
            raise HAProxyError(f"refusing a multi-command line: {cmd!r}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout_s)
                s.connect(self.socket_path)
                s.sendall(cmd.encode() + b"\n")
                chunks = []
                while True:
                    b = s.recv(65536)
                    if not b:
                        break
                    chunks.append(b)
        except OSError as e:
            raise HAProxyError(f"HAProxy runtime API at {self.socket_path}: {e}") from None
        return b"".join(chunks).decode("utf-8", "replace")

    def _checked(self, cmd: str) -> str:
        out = self.command(cmd).strip()
        # Success is an empty answer (set weight/state); errors are a sentence.
        if out and not out.startswith("Server state:"):
            raise HAProxyError(f"`{cmd}`: {out}")
        return out

    def servers(self, backend: str | None = None) -> list[ServerState]:
        return parse_servers_state(self.command(f"show servers state {backend}" if backend else "show servers state"))

    def set_weight(self, backend: str, server: str, weight: int) -> None:
        if not 0 <= int(weight) <= 256:
            raise ValueError(f"HAProxy weight must be 0..256, got {weight}")
        self._checked(f"set weight {backend}/{server} {int(weight)}")

    def set_state(self, backend: str, server: str, state: str) -> None:
        if state not in ("ready", "drain", "maint"):
            raise ValueError(f"state must be ready|drain|maint, got {state!r}")
        self._checked(f"set server {backend}/{server} state {state}")

    # ---- dynamic servers (HAProxy >= 2.4; measured on 2.6: `add server` takes weight, check,
    # inter/fastinter/fall/rise, port, check-proto and proto h2; `default-server` lines do NOT
    # apply to servers added this way, so every check setting is passed explicitly) ------------
    def add_server(self, backend: str, server: str, addr: str, args: str = "") -> None:
        out = self.command(f"add server {backend}/{server} {addr} {args}".strip()).strip()
        if "New server registered" not in out:
            raise HAProxyError(f"`add server {backend}/{server}`: {out}")

    def enable_server(self, backend: str, server: str, health: bool = True) -> None:
        if health:
            self._checked(f"enable health {backend}/{server}")
        self._checked(f"enable server {backend}/{server}")

    def del_server(self, backend: str, server: str) -> None:
        """The server must be in maintenance and have no connection left (HAProxy refuses otherwise)."""
        out = self.command(f"del server {backend}/{server}").strip()
        if "Server deleted" not in out:
            raise HAProxyError(f"`del server {backend}/{server}`: {out}")

    def sessions(self, backend: str, server: str) -> int:
        """Current sessions (`scur`) plus queued requests (`qcur`) on one server, from `show stat`."""
        text = self.command(f"show stat {backend} 4 -1")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines or not lines[0].startswith("#"):
            raise HAProxyError(f"unexpected `show stat` output: {text[:200]!r}")
        fields = lines[0].lstrip("# ").split(",")
        for ln in lines[1:]:
            row = dict(zip(fields, ln.split(",")))
            if row.get("pxname") == backend and row.get("svname") == server:
                return int(row.get("scur") or 0) + int(row.get("qcur") or 0)
        raise HAProxyError(f"no server {backend}/{server} in `show stat`")
