"""A real Prometheus (Debian `prometheus`, 2.42) against the local stack, for
`triton-hybrid up --with-prometheus` and the live tests.

Config: rendered by control/adapters/prometheus_config.py into <run_dir>/prometheus/prometheus.yml, with the
rule files of deploy/prometheus/rules/ (absolute paths) and `promtool check config` first.
Data: <run_dir>/prometheus/data. Process: control/local/procs.py (own process group, pid file
<run_dir>/pids/prometheus.json, log <run_dir>/logs/prometheus.log); start waits for /-/ready.
Port: `control.prometheus_port` (default 9090), on `control.api_host`.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from control.adapters.prometheus_config import (
    LOCAL_EVALUATION_INTERVAL,
    LOCAL_SCRAPE_INTERVAL,
    RULES_DIR,
    render,
)
from control.local.procs import (
    ComponentError,
    ManagedProcess,
    http_ok,
    load_managed,
    require_free_ports,
    start_ready,
)

NAME = "prometheus"


def prometheus_port(settings) -> int:
    return settings.control.prometheus_port


def prometheus_host(settings) -> str:
    return settings.control.api_host


def prometheus_url(settings) -> str:
    return f"http://{prometheus_host(settings)}:{prometheus_port(settings)}"


def prometheus_dir(settings) -> Path:
    return settings.run_path / "prometheus"


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/local/bin")
    if not found:
        raise ComponentError(NAME, f"{name!r} not found; install it with `make system-deps` "
                                   "(apt-get install prometheus)")
    return found


def write_config(settings, rules_dir: Path = RULES_DIR) -> Path:
    """Render the config for this stack and check it (and its rules) with promtool."""
    pdir = prometheus_dir(settings)
    pdir.mkdir(parents=True, exist_ok=True)
    path = pdir / "prometheus.yml"
    path.write_text(render(settings, rule_files=[str(Path(rules_dir) / "*.yml")],
                           scrape_interval=LOCAL_SCRAPE_INTERVAL, evaluation_interval=LOCAL_EVALUATION_INTERVAL,
                           environment="local"))
    check = subprocess.run([_binary("promtool"), "check", "config", str(path)], capture_output=True, text=True)
    if check.returncode != 0:
        raise ComponentError(NAME, f"generated config {path} is invalid", (check.stdout + check.stderr).strip())
    return path


def start_prometheus(settings, timeout: float = 30.0, port: int | None = None) -> ManagedProcess:
    """Start Prometheus for the local stack and wait until it is ready; returns the managed process.
    `port` overrides control.prometheus_port (tests use a free port)."""
    host, port = prometheus_host(settings), port or prometheus_port(settings)
    require_free_ports(NAME, [("control.prometheus_port", host, port)])
    binary = _binary("prometheus")
    config = write_config(settings)
    data = prometheus_dir(settings) / "data"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address={host}:{port}",
        "--storage.tsdb.retention.time=7d",
        "--web.enable-lifecycle",  # POST /-/reload after a config change
        "--log.level=warn",
    ]
    return start_ready(NAME, argv, settings.run_path, lambda: http_ok(f"http://{host}:{port}/-/ready"), timeout, "ready")


def stop_prometheus(settings) -> bool:
    """Stop the Prometheus this run dir started (by its pid file); True if one was running."""
    proc = load_managed(settings.run_path, NAME)
    if proc is None:
        return False
    was_alive = proc.alive
    proc.stop()
    return was_alive
