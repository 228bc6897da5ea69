"""Render the sites' configs from a deploy registry (a config file of the same schema as
deploy/local.yaml) with the generators the local stack uses: one HAProxy and one Prometheus
generator for every environment."""
from __future__ import annotations

from pathlib import Path

import yaml

from control.adapters import haproxy_config, prometheus_config
from control.config import PROJECT_ROOT, Settings, load_config

SITES_REGISTRY = PROJECT_ROOT / "deploy" / "sites.yaml"
HAPROXY_OUT = PROJECT_ROOT / "deploy" / "haproxy" / "haproxy.cfg"
K8S_REGISTRY = PROJECT_ROOT / "deploy" / "k8s" / "control-plane" / "triton-hybrid.yaml"
K8S_DIR = PROJECT_ROOT / "deploy" / "k8s"
# The site entries' HAProxy (deploy/k8s/entry/): the entry's default config and its agent's config,
# and each overlay's own haproxy.cfg (its site's servers first), merged over the default.
K8S_HAPROXY_OUT = K8S_DIR / "entry" / "haproxy.cfg"
K8S_ENTRY_CONFIG_OUT = K8S_DIR / "entry" / "entry.yaml"
K8S_SITES = ("onprem", "cloud")
# What the entry agent needs of the registry: where S3 is, the instances its HAProxy lists, run_dir
# (where haproxy.cfg puts the runtime socket). No secret: those come from the entry's Secret.
ENTRY_SECTIONS = ("run_dir", "s3", "haproxy", "instances")
LOCAL_REGISTRY = PROJECT_ROOT / "deploy" / "local.yaml"


def load_registry(path: Path) -> Settings:
    # Secrets never come from a deploy registry: the environment must not leak into a committed file.
    return load_config(path, environ={})


def render_haproxy(registry: Path = SITES_REGISTRY, site: str | None = None) -> str:
    return haproxy_config.render(load_registry(registry), site=site)


def k8s_site_haproxy_out(site: str) -> Path:
    return K8S_DIR / "overlays" / site / "haproxy.cfg"


def render_entry_config(registry: Path = K8S_REGISTRY) -> str:
    """The entry agent's config (deploy/k8s/entry/entry.yaml): the registry's sections it needs, and
    its API on the pod's network (probes, Prometheus). Site and name come from the pod's env."""
    load_registry(registry)  # refuse an invalid registry before writing anything from it
    raw = yaml.safe_load(Path(registry).read_text()) or {}
    data = {k: raw[k] for k in ENTRY_SECTIONS if k in raw}
    data["entry"] = {"api_host": "0.0.0.0", "api_port": 8410, "interval_s": 2.0}
    head = (f"# Generated from {Path(registry).relative_to(PROJECT_ROOT)} by `triton-hybrid deploy render-haproxy "
            "--k8s`; do not edit by hand.\n# The site entry agent's config (control/entry/): site and name come from "
            "the pod (TRITON_HYBRID__ENTRY__SITE, __NAME),\n# the S3 keys and the API token from its Secret "
            "(entry-env.sh).\n")
    return head + yaml.safe_dump(data, sort_keys=False)


def k8s_generated(registry: Path = K8S_REGISTRY) -> dict[Path, str]:
    """Every file `deploy render-haproxy --k8s` writes, with its content."""
    out = {K8S_HAPROXY_OUT: render_haproxy(registry), K8S_ENTRY_CONFIG_OUT: render_entry_config(registry)}
    out |= {k8s_site_haproxy_out(site): render_haproxy(registry, site) for site in K8S_SITES}
    return out


def render_prometheus(registry: Path) -> tuple[str, Path]:
    """(text, default output path): the local example for deploy/local.yaml, else the sites' one."""
    settings = load_registry(registry)
    if Path(registry).resolve() == LOCAL_REGISTRY.resolve():
        return prometheus_config.render_local_example(settings), prometheus_config.LOCAL_EXAMPLE
    return prometheus_config.render_sites_example(settings), prometheus_config.SITES_EXAMPLE
