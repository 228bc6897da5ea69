"""`triton-hybrid deploy ...`: render the site configs from a deploy registry with the same
generators the local stack uses, and check the Kubernetes manifests.

  triton-hybrid deploy render-haproxy    --config deploy/sites.yaml --out deploy/haproxy/haproxy.cfg
  triton-hybrid deploy render-prometheus --config deploy/sites.yaml --out deploy/prometheus/prometheus.sites.yml
  triton-hybrid deploy check-k8s         (control/deploy/kustomize.py: kubectl kustomize + schema + checks)
"""
from __future__ import annotations

from pathlib import Path

import click

from control.config import PROJECT_ROOT, ConfigError
from control.deploy.kustomize import KustomizeError, check_tree
from control.deploy.render import (
    HAPROXY_OUT,
    K8S_REGISTRY,
    SITES_REGISTRY,
    k8s_generated,
    load_registry,
    render_haproxy,
    render_prometheus,
)


def _load(path):
    try:
        return load_registry(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


@click.group("deploy")
def deploy_group() -> None:
    """Render and check the deploy/ configs for the on-prem and cloud sites."""


@deploy_group.command("render-haproxy")
@click.option("--config", "registry", default=str(SITES_REGISTRY), show_default=True,
              type=click.Path(exists=True, dir_okay=False), help="Deploy registry (config schema).")
@click.option("--out", default=str(HAPROXY_OUT), show_default=True, type=click.Path(dir_okay=False))
@click.option("--k8s", is_flag=True, help="Also render the Kubernetes site entries' configs (deploy/k8s/entry/haproxy.cfg, "
                                         "entry.yaml, overlays/<site>/haproxy.cfg) from "
                                         "deploy/k8s/control-plane/triton-hybrid.yaml.")
def render_haproxy_cmd(registry: str, out: str, k8s: bool) -> None:
    """haproxy.cfg from the registry (control/adapters/haproxy_config.py, as for the local stack)."""
    _load(registry)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(render_haproxy(Path(registry)))
    click.echo(f"wrote {out}")
    if k8s:
        _load(K8S_REGISTRY)
        for path, text in k8s_generated(K8S_REGISTRY).items():
            path.write_text(text)
            click.echo(f"wrote {path}")


@deploy_group.command("render-prometheus")
@click.option("--config", "registry", default=str(SITES_REGISTRY), show_default=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Default: deploy/prometheus/prometheus.sites.yml (and prometheus.yml for deploy/local.yaml).")
def render_prometheus_cmd(registry: str, out: str | None) -> None:
    """prometheus.yml from the registry (control/adapters/prometheus_config.py)."""
    _load(registry)
    text, default_out = render_prometheus(Path(registry))
    target = Path(out) if out else default_out
    target.write_text(text)
    click.echo(f"wrote {target}")


@deploy_group.command("check-k8s")
@click.option("--root", default=str(PROJECT_ROOT / "deploy" / "k8s"), show_default=True,
              type=click.Path(exists=True, file_okay=False))
def check_k8s_cmd(root: str) -> None:
    """Render base + overlays with `kubectl kustomize`, validate the objects against the Kubernetes
    schema and check them (no inline Secret data, readiness probes, references, pinned images)."""
    try:
        results = check_tree(Path(root))
    except KustomizeError as e:
        raise click.ClickException(str(e)) from None
    bad = False
    for name, res in results.items():
        kinds = ", ".join(f"{k} {n}" for k, n in res.summary())
        if res.problems:
            bad = True
            click.echo(f"FAIL {name}: " + "; ".join(res.problems))
        else:
            click.echo(f"ok   {name}: {len(res.resources)} resources ({kinds})")
    if bad:
        raise click.ClickException("the Kubernetes manifests have problems (above)")
