"""Start and stop the local HAProxy with the generated config (checked by `haproxy -c` first)."""
from __future__ import annotations

import shutil
import subprocess

from control.adapters.haproxy_config import (
    config_path,
    install_guard,
    render,
    socket_path,
)
from control.local.procs import (
    ComponentError,
    ManagedProcess,
    http_ok,
    require_free_ports,
    start_ready,
)

NAME = "haproxy"


def haproxy_binary(settings) -> str:
    binary = shutil.which(settings.haproxy.binary) or shutil.which(settings.haproxy.binary, path="/usr/sbin:/sbin")
    if not binary:
        raise ComponentError(NAME, f"{settings.haproxy.binary!r} not found; install it with `make system-deps` "
                                   "(apt-get install haproxy)")
    return binary


def write_config(settings, site: str | None = None) -> str:
    """`site`: a site entry's config (its own site's servers first; control/entry/)."""
    binary = haproxy_binary(settings)
    path = config_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(settings, site=site))
    if settings.haproxy.guard:
        install_guard(path.parent)  # haproxy.cfg loads the Lua request guard from its own folder
    check = subprocess.run([binary, "-c", "-q", "-f", str(path)], capture_output=True, text=True)
    if check.returncode != 0:
        raise ComponentError(NAME, f"generated config {path} is invalid", (check.stdout + check.stderr).strip())
    return binary


def start_haproxy(settings, timeout: float = 15.0, site: str | None = None) -> ManagedProcess:
    h = settings.haproxy
    require_free_ports(NAME, [(f"haproxy.{f}", h.host, getattr(h, f)) for f in ("http_port", "grpc_port", "stats_port")])
    binary = write_config(settings, site)
    socket_path(settings).unlink(missing_ok=True)
    # -db: stay in the foreground so the process group we supervise is HAProxy itself.
    return start_ready(NAME, [binary, "-db", "-f", str(config_path(settings))], settings.run_path,
                       lambda: socket_path(settings).exists() and http_ok(f"http://{h.host}:{h.stats_port}/metrics"),
                       timeout, "serving its stats port")
