"""`triton-hybrid up | down | status` for the local stack."""
from __future__ import annotations

import json
import logging
import sys

import click
from rich.console import Console
from rich.table import Table

from control.cli import settings_from
from control.cli.output import json_option
from control.local import stack
from control.local.procs import ComponentError
from control.local.supervisor import Supervisor

console = Console()


@click.command("up")
@click.option("--with-prometheus", is_flag=True, help="Also start a real Prometheus against the stack.")
@click.option("--no-control", is_flag=True, help="Do not start the control-plane daemon.")
@click.pass_context
def up_cmd(ctx, with_prometheus: bool, no_control: bool) -> None:
    """Start the local stack: S3 endpoint, Tritons with their agents, HAProxy, control plane, supervisor.
    Components already running are kept; only the missing ones are started."""
    settings = settings_from(ctx)
    try:
        st = stack.up(settings, with_prometheus=with_prometheus, with_control=False if no_control else None,
                 say=lambda m: console.print(f"[dim]-[/dim] {m}"))
    except ComponentError as e:
        console.print(f"[red]up failed[/red] in [bold]{e.component}[/bold]; everything it started was stopped.")
        raise click.ClickException(str(e)) from None
    h = settings.haproxy
    kept = f" (kept running: {', '.join(st.kept)})" if st.kept else ""
    console.print(f"[green]stack is up[/green]{kept}")
    console.print(f"  clients, HTTP : http://{h.host}:{h.http_port}/v2/models/search_ranking/infer")
    console.print(f"  clients, gRPC : {h.host}:{h.grpc_port}")
    console.print(f"  HAProxy stats : http://{h.host}:{h.stats_port}/stats (Prometheus: /metrics)")
    for inst in settings.instances:
        console.print(f"  {inst.name:<13} : {inst.http_url} (gRPC {inst.grpc_url}, metrics {inst.metrics_url}, "
                      f"agent {inst.agent_url})")
    c = settings.control
    console.print(f"  control API   : http://{c.api_host}:{c.api_port} (metrics :{c.metrics_port})")
    if with_prometheus:
        console.print(f"  Prometheus    : http://{c.api_host}:{c.prometheus_port}")
    console.print(f"  logs, pids    : {settings.run_path}/logs, {settings.run_path}/pids")
    console.print("  stop with     : triton-hybrid down   (or: make down)")


@click.command("down")
@click.pass_context
def down_cmd(ctx) -> None:
    """Stop every process the stack started (data in the run dir is kept)."""
    settings = settings_from(ctx)
    try:
        stopped = stack.down(settings, say=lambda m: console.print(f"[dim]-[/dim] {m}"))
    except ComponentError as e:
        raise click.ClickException(str(e)) from None
    console.print(f"stopped {len(stopped)} component(s); data kept in {settings.run_path}")


@click.command("status")
@json_option
@click.pass_context
def status_cmd(ctx, as_json: bool) -> None:
    """Each component: pid, health, ports, models and versions loaded, weights."""
    settings = settings_from(ctx)
    st = stack.status(settings)
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    weights = next((c.get("weights", {}) for c in st["components"] if c["kind"] == "haproxy"), {})
    # Narrow columns only, details below the table: readable in an 80-column terminal and when piped.
    table = Table(title=f"triton-hybrid stack ({st['run_dir']})", title_justify="left")
    for col in ("component", "kind", "state", "pid", "weight h/g", "not live"):
        table.add_column(col, no_wrap=True)
    details = []
    for c in st["components"]:
        health = "[green]healthy[/green]" if c.get("healthy") else (
            "[red]unhealthy[/red]" if c["running"] or c["kind"] == "triton" else "[dim]stopped[/dim]")
        notes = []
        if c["state"] == "dead":
            health = "[red]dead[/red]"
            if c.get("leftovers"):
                notes.append(f"[red]{len(c['leftovers'])} leftover process(es), "
                             f"{c['leftover_rss_bytes'] / 2**20:.0f} MiB[/red] (`down` or the supervisor reaps them)")
        if c.get("restarts"):
            notes.append(f"{c['restarts']} restart(s) by the supervisor")
        if c.get("restart_given_up"):
            notes.append(f"[red]supervisor gave up: {c['restart_given_up']}[/red]")
        w = ""
        if c["kind"] == "triton":
            w = f"{weights.get('be_triton_http', {}).get(c['name'], '-')}/{weights.get('be_triton_grpc', {}).get(c['name'], '-')}"
        # Models the agent does not serve at their desired version yet (a rollout, a failure).
        not_live = str(len(c["not_live"])) if c["kind"] == "agent" and "not_live" in c else ""
        table.add_row(c["name"], c["kind"], health, str(c["pid"] or "-"), w, not_live)
        endpoints = " ".join(str(c[k]) for k in ("url", "http", "grpc", "api") if c.get(k))
        models = ", ".join(f"{m} v{'/'.join(map(str, v))}" for m, v in sorted(c.get("models", {}).items()))
        versions = ", ".join(f"{m} v{r['live']}" + (f"->v{r['target']} {r['state']}" if m in c["not_live"] else "")
                             for m, r in sorted(c.get("versions", {}).items()))
        if c.get("error"):
            notes.append(f"[yellow]{c['error']}[/yellow]")
        lines = [x for x in (endpoints, models and f"models: {models}", versions and f"serves: {versions}", *notes) if x]
        if lines:
            details.append(f"[bold]{c['name']}[/bold]: " + "\n  ".join(lines))
    console.print(table)
    for d in details:
        console.print(d, overflow="fold")
    control = next((c for c in st["components"] if c["kind"] == "control"), {})
    decision = control.get("decision") or {}
    if decision.get("weights"):
        last = decision.get("last_decision") or {}
        console.print(f"site weights {decision['weights']} ({decision.get('source')}); "
                      f"last decision: {last.get('reason', '-')} {last.get('message', '')}")
    if control.get("leader"):
        from control.leader.status import leader_line  # noqa: PLC0415 - boto3 only when needed
        console.print(leader_line(control["leader"]), soft_wrap=True)
    cost = control.get("cost") or {}
    if cost.get("sites"):
        sites = ", ".join(f"{site} ${v['dollars']:.4f} so far, ${v['burn_per_hour']:.2f}/h now"
                          for site, v in sorted(cost["sites"].items()))
        budget = cost.get("budget_per_hour")
        console.print(f"cost: {sites}" + (f"; cloud budget ${budget:.2f}/h" if budget is not None else ""))


@click.command("supervise")
@click.pass_context
def supervise_cmd(ctx) -> None:
    """Restart crashed Tritons and agents of the local stack (started by `up`, stopped by `down`)."""
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    Supervisor(settings_from(ctx)).run()
