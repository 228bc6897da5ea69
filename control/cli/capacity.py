"""CLI of the cloud scaler and cost: `scale show`, `scale history`, `cost` (all with --json).

Read-only: from the daemon's admin API, or (daemon down) the SQLite database, and say so
(control/daemon/client.py, `daemon_or_database`).
"""
from __future__ import annotations

import click

from control.capacity.cost import cost_summary
from control.cli import settings_from
from control.cli.output import history_options, json_option, since_param
from control.cli.output import print_result as _print
from control.daemon.client import daemon_or_database


@click.group("scale")
def scale_group():
    """The cloud scaler: cloud instances, last decision, scaling history."""


@scale_group.command("show")
@json_option
@click.pass_context
def scale_show(ctx, as_json):
    """Scaler limits, cloud instances, state, last decision and cost."""
    settings = settings_from(ctx)
    sc = settings.control.scaler
    config = {"enabled": sc.enabled, "min_instances": sc.min_instances, "max_instances": sc.max_instances,
              "budget_per_hour": sc.budget_per_hour}

    def read_db(audit) -> dict:
        last = audit.scale_history(0, 1)
        return {**config, "last_decision": last[-1] if last else None, "cost": cost_summary(settings)}
    d = daemon_or_database(settings, "/v1/scale", read_db, timeout=10,
                           no_database={**config, "last_decision": None, "cost": cost_summary(settings)})

    def human(d):
        click.echo(f"scaler: {'enabled' if d.get('enabled') else 'disabled'} ({d.get('actuator') or '-'}), "
                   f"instances {d.get('min_instances')}..{d.get('max_instances')}, budget "
                   f"{'none' if d.get('budget_per_hour') is None else '$%g/h' % d['budget_per_hour']}  [{d['source']}]")
        for i in d.get("instances") or []:
            click.echo(f"  {i.get('name')}: ${i.get('cost_per_hour', 0):g}/h{'  (scaled)' if i.get('removable') else ''}")
        ld = d.get("last_decision")
        if ld:
            click.echo(f"last decision: {ld.get('action')} {ld.get('reason')}: {ld.get('message')}")
        _human_cost(d.get("cost") or {})

    _print(d, as_json, human)


@scale_group.command("history")
@history_options("1h", "Every tick, not only actions and reason changes.")
@click.pass_context
def scale_history(ctx, since, limit, all_rows, as_json):
    """Scaling decisions with their reasons (audit)."""
    settings = settings_from(ctx)
    since_ts = since_param(since)
    d = daemon_or_database(settings, "/v1/scale/history", lambda audit: {"decisions": audit.scale_history(
        since_ts, limit, changes_only=not all_rows)}, params={"since": since, "limit": limit, "all": int(all_rows)})

    def human(d):
        rows = d["decisions"]
        click.echo(f"source: {d['source']}")
        if not rows:
            click.echo("no scaling decisions in that window")
        for r in rows:
            err = f"  ERROR: {r['error']}" if r["error"] else ""
            click.echo(f"{r['time']}  {r['action']:<4} {r['reason']:<18} {r['count_before']}->{r['count_after']}  "
                       f"{r['message']}{err}")

    _print(d, as_json, human)


def _human_cost(c: dict) -> None:
    if not c.get("sites"):
        click.echo("cost: nothing recorded yet (the control daemon accrues it)")
    for site, t in sorted((c.get("sites") or {}).items()):
        click.echo(f"cost {site}: ${t['dollars']:.4f} so far ({t['instance_hours']:.3f} instance-hours), "
                   f"burning ${t['burn_per_hour']:g}/h ({', '.join(t['up_instances']) or 'none up'})")
    if c.get("budget_per_hour") is not None:
        click.echo(f"cloud budget: ${c['budget_per_hour']:g}/h, ${c['cloud_budget_left_per_hour']:g}/h left")


@click.command("cost")
@json_option
@click.pass_context
def cost_cmd(ctx, as_json):
    """Cost so far and burn rate per site (instance-hours x cost_per_hour), the cloud budget."""
    settings = settings_from(ctx)
    # The ledger is in the control database: the daemon reads the same table; ask it only for the source.
    d = daemon_or_database(settings, "/v1/cost", lambda audit: cost_summary(settings),
                           no_database=cost_summary(settings))
    _print(d, as_json, _human_cost)
