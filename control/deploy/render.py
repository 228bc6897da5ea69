"""Render the sites' configs from a deploy registry (a config file of the same schema as
deploy/local.yaml) with the generators the local stack uses: one HAProxy and one Prometheus
generator for every environment."""
from __future__ import annotations

from pathlib import Path

from control.adapters import haproxy_config, prometheus_config
from control.config import PROJECT_ROOT, Settings, load_config

SITES_REGISTRY = PROJECT_ROOT / "deploy" / "sites.yaml"
HAPROXY_OUT = PROJECT_ROOT / "deploy" / "haproxy" / "haproxy.cfg"
K8S_REGISTRY = PROJECT_ROOT / "deploy" / "k8s" / "control-plane" / "triton-hybrid.yaml"
K8S_HAPROXY_OUT = PROJECT_ROOT / "deploy" / "k8s" / "control-plane" / "haproxy.cfg"
LOCAL_REGISTRY = PROJECT_ROOT / "deploy" / "local.yaml"


def load_registry(path: Path) -> Settings:
    # Secrets never come from a deploy registry: the environment must not leak into a committed file.
    return load_config(path, environ={})


def render_haproxy(registry: Path = SITES_REGISTRY) -> str:
    return haproxy_config.render(load_registry(registry))


def render_prometheus(registry: Path) -> tuple[str, Path]:
    """(text, default output path): the local example for deploy/local.yaml, else the sites' one."""
    settings = load_registry(registry)
    if Path(registry).resolve() == LOCAL_REGISTRY.resolve():
        return prometheus_config.render_local_example(settings), prometheus_config.LOCAL_EXAMPLE
    return prometheus_config.render_sites_example(settings), prometheus_config.SITES_EXAMPLE
