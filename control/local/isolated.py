"""Settings for a stack of its own on free loopback ports (tests, benchmarks, drills): one helper,
so every isolated stack gets its ports the same way and never collides with `make demo` or another.
"""
from __future__ import annotations

import socket
from pathlib import Path

import yaml

from control.config import DEFAULT_CONFIG, Settings, deep_merge, load_config

DEFAULT_INSTANCES = (("onprem-1", "onprem", 90, True), ("cloud-1", "cloud", 10, False))


class PortPool:
    """Distinct free loopback ports: each socket stays bound until `close()`, so two calls never
    return the same port (binding port 0 and closing can hand a released port out again)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host, self._held = host, []

    def __call__(self) -> int:
        s = socket.socket()
        s.bind((self.host, 0))
        self._held.append(s)
        return s.getsockname()[1]

    def close(self) -> None:
        for s in self._held:
            s.close()
        self._held.clear()

    def __enter__(self) -> "PortPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def with_free_ports(data: dict, port: PortPool) -> dict:
    """`data` (a config as a dict) with every listening port replaced by a free one."""
    data["s3"]["port"] = port()
    data["haproxy"].update({"http_port": port(), "grpc_port": port(), "stats_port": port()})
    data["control"].update({"api_port": port(), "metrics_port": port(), "prometheus_port": port()})
    for inst in data["instances"]:
        inst.update({"http_port": port(), "grpc_port": port(), "metrics_port": port(), "agent_port": port()})
    return data


def isolated_settings(run_dir, instances=DEFAULT_INSTANCES, *, base: dict | None = None, write_file: bool = True,
                      **sections) -> Settings:
    """Settings with everything under run_dir and every port free. `instances`: (name, site, weight,
    sensitive_ok) tuples, or None to keep the base's; `base`: a config dict (default deploy/local.yaml);
    `sections`: overrides deep-merged over it. Written next to run_dir as a YAML file (mode 600: it holds
    secrets) so that CLI calls and a daemon started with `--config` see the same settings."""
    data = base if base is not None else yaml.safe_load(DEFAULT_CONFIG.read_text())
    data = deep_merge(data, {"run_dir": str(run_dir)})
    if instances is not None:
        data["instances"] = [{"name": n, "site": s, "weight": w, "sensitive_ok": ok} for n, s, w, ok in instances]
    with PortPool() as port:
        data = with_free_ports(data, port)
    data = deep_merge(data, sections)
    if not write_file:
        return Settings.model_validate(data)
    path = Path(run_dir).parent / f"config-{Path(run_dir).name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(data))
    return load_config(path, environ={})
