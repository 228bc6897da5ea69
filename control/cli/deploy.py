"""`triton-hybrid deploy ...`: render the site configs from a deploy registry with the same
generators the local stack uses, and check the Kubernetes manifests.

  triton-hybrid deploy render-haproxy    --config deploy/sites.yaml --out deploy/haproxy/haproxy.cfg
  triton-hybrid deploy render-prometheus --config deploy/sites.yaml --out deploy/prometheus/prometheus.sites.yml
  triton-hybrid deploy check-k8s         (control/deploy/kustomize.py: overlays resolve, no inline secrets)
"""
from __future__ import annotations

from pathlib import Path

import click

from control.config import PROJECT_ROOT, ConfigError, load_config

SITES_REGISTRY = PROJECT_ROOT / "deploy" / "sites.yaml"
HAPROXY_OUT = PROJECT_ROOT / "deploy" / "haproxy" / "haproxy.cfg"
K8S_REGISTRY = PROJECT_ROOT / "deploy" / "k8s" / "control-plane" / "triton-hybrid.yaml"
K8S_HAPROXY_OUT = PROJECT_ROOT / "deploy" / "k8s" / "control-plane" / "haproxy.cfg"


def _load(path) -> object:
    try:
        # Secrets never come from a deploy registry; the environment must not leak into a committed file.
        return load_config(path, environ={})
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def render_haproxy(registry: Path = SITES_REGISTRY) -> str:
    from control.adapters.haproxy_config import render  # noqa: PLC0415

    return render(load_config(registry, environ={}))


def render_k8s_haproxy(registry: Path = K8S_REGISTRY) -> str:
    """HAProxy in Kubernetes; its stats socket is in run_dir, the state volume both containers mount."""
    from control.adapters.haproxy_config import render  # noqa: PLC0415

    return render(load_config(registry, environ={}))


@click.group("deploy")
def deploy_group() -> None:
    """Render and check the deploy/ configs for the on-prem and cloud sites."""


@deploy_group.command("render-haproxy")
@click.option("--config", "registry", default=str(SITES_REGISTRY), show_default=True,
              type=click.Path(exists=True, dir_okay=False), help="Deploy registry (config schema).")
@click.option("--out", default=str(HAPROXY_OUT), show_default=True, type=click.Path(dir_okay=False))
@click.option("--k8s", is_flag=True, help="Also render deploy/k8s/control-plane/haproxy.cfg from its triton-hybrid.yaml.")
def render_haproxy_cmd(registry: str, out: str, k8s: bool) -> None:
    """haproxy.cfg from the registry (control/adapters/haproxy_config.py, as for the local stack)."""
    _load(registry)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(render_haproxy(Path(registry)))
    click.echo(f"wrote {out}")
    if k8s:
        K8S_HAPROXY_OUT.write_text(render_k8s_haproxy())
        click.echo(f"wrote {K8S_HAPROXY_OUT}")


@deploy_group.command("render-prometheus")
@click.option("--config", "registry", default=str(SITES_REGISTRY), show_default=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Default: deploy/prometheus/prometheus.sites.yml (and prometheus.yml for deploy/local.yaml).")
def render_prometheus_cmd(registry: str, out: str | None) -> None:
    """prometheus.yml from the registry (control/adapters/prometheus_config.py)."""
    from control.adapters import prometheus_config as pc  # noqa: PLC0415

    settings = _load(registry)
    local = Path(registry).resolve() == (PROJECT_ROOT / "deploy" / "local.yaml").resolve()
    text = pc.render_local_example(settings) if local else pc.render_sites_example(settings)
    target = Path(out) if out else (pc.LOCAL_EXAMPLE if local else pc.SITES_EXAMPLE)
    target.write_text(text)
    click.echo(f"wrote {target}")


@deploy_group.command("check-k8s")
@click.option("--root", default=str(PROJECT_ROOT / "deploy" / "k8s"), show_default=True,
              type=click.Path(exists=True, file_okay=False))
def check_k8s_cmd(root: str) -> None:
    """Resolve base + overlays and check them (YAML parses, no inline Secret data, readiness probes)."""
    from control.deploy.kustomize import check_tree  # noqa: PLC0415

    results = check_tree(Path(root))
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
