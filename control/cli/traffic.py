"""CLI of the control plane: `control run`, `weights show|set|clear`, `drain`, `undrain`,
`policy show`, `history` (all with --json).

Writes (weights set/clear, drain, undrain) go through the daemon's admin API with the token from
the config: the leading daemon writes them to the operator state in S3 (_control/operator.json, so
the other site's control plane inherits them), applies them at once and audits them; a standby
answers 409 naming the leader; if the daemon is down they fail with a clear message. Read-only views (weights show, policy show, history) ask the API and, when the
daemon is down, read the SQLite database directly (and say so).
"""
from __future__ import annotations

import json
import re

import click
from pydantic import ValidationError

from control.cli import settings_from
from control.cli.output import history_options, json_option, since_param
from control.cli.output import print_result as _print
from control.daemon.api import policy_view
from control.daemon.client import AdminClient, daemon_or_database, weights_summary


# ---- control run --------------------------------------------------------------------------------
@click.group("control")
def control_group():
    """The control-plane daemon."""


@control_group.command("run")
@click.option("--actuator", "actuators", type=click.Choice(["haproxy", "route53", "entries", "dry-run"]), multiple=True,
              help="Override control.actuators (repeat for several: --actuator haproxy --actuator route53).")
@click.pass_context
def run_cmd(ctx, actuators):
    """Run the control loop (poll, decide+apply, sync), the admin API and the metrics endpoint."""
    settings = settings_from(ctx)
    if actuators:
        try:
            control = type(settings.control).model_validate({**settings.control.model_dump(), "actuators": list(actuators)})
        except ValidationError as e:
            raise click.BadParameter("; ".join(err["msg"] for err in e.errors()), param_hint="--actuator") from None
        settings = settings.model_copy(update={"control": control})
    from control.daemon.controller import run  # noqa: PLC0415
    run(settings)


# ---- weights ------------------------------------------------------------------------------------
@click.group("weights")
def weights_group():
    """Show or set the traffic weights between on-prem and cloud."""


def _human_weights(d):
    w = d.get("weights") or {}
    click.echo(f"source: {d.get('source', 'daemon')}")
    click.echo(f"site weights: onprem={w.get('onprem')} cloud={w.get('cloud')}")
    for name, v in (d.get("instance_weights") or {}).items():
        click.echo(f"  {name}: {v}")
    if d.get("override"):
        o = d["override"]
        click.echo(f"override: {o['weights']} ({o.get('ttl_left_s')}s left)")
    if d.get("drained"):
        click.echo(f"drained: {', '.join(d['drained'])}")
    if d.get("last_decision"):
        click.echo(f"last decision: {d['last_decision']['reason']}: {d['last_decision']['message']}")
    if d.get("error") and d.get("source") != "daemon":
        click.echo(f"note: {d['error']}")


@weights_group.command("show")
@json_option
@click.pass_context
def weights_show(ctx, as_json):
    """Current weights (from the daemon; from the database when it is down)."""
    _print(weights_summary(settings_from(ctx)), as_json, _human_weights)


def parse_assignments(pairs: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for p in pairs:
        m = re.fullmatch(r"(\w+)=(\d+)", p.strip())
        if not m:
            raise click.BadParameter(f"{p!r}: use SITE=WEIGHT, e.g. onprem=70 cloud=30", param_hint="WEIGHTS")
        out[m.group(1)] = int(m.group(2))
    # One site given: the other gets the rest (`weights set onprem=70`).
    if len(out) == 1 and next(iter(out)) in ("onprem", "cloud") and 0 <= next(iter(out.values())) <= 100:
        site, w = next(iter(out.items()))
        out["cloud" if site == "onprem" else "onprem"] = 100 - w
    return out


@weights_group.command("set")
@click.argument("pairs", nargs=-1, required=True, metavar="onprem=N cloud=M")
@click.option("--ttl", default="10m", show_default=True, help="How long the override holds (600, 90s, 10m, 2h).")
@click.option("--note", default="", help="Why (kept in the audit).")
@json_option
@click.pass_context
def weights_set(ctx, pairs, ttl, note, as_json):
    """Manual override of the site weights for --ttl (through the daemon's admin API)."""
    settings = settings_from(ctx)
    body = {"weights": parse_assignments(pairs), "ttl_s": ttl, "note": note}
    d = AdminClient(settings).call("POST", "/v1/weights", body)
    _print(d, as_json, lambda d: click.echo(
        f"override {d['override']['weights']} for {d['override']['ttl_s']:.0f}s; now {d['decision']['weights']} "
        f"({d['decision']['reason']})"))


@weights_group.command("clear")
@json_option
@click.pass_context
def weights_clear(ctx, as_json):
    """End the manual override now."""
    d = AdminClient(settings_from(ctx)).call("DELETE", "/v1/weights/override")
    _print(d, as_json, lambda d: click.echo(f"override cleared: {d['cleared']}; now {d['decision']['weights']}"))


# ---- drain / undrain ----------------------------------------------------------------------------
def _drain_command(name: str, help_text: str, say):
    @click.command(name, help=help_text)
    @click.argument("target")
    @json_option
    @click.pass_context
    def cmd(ctx, target, as_json):
        d = AdminClient(settings_from(ctx)).call("POST", f"/v1/{name}", {"target": target})
        _print(d, as_json, lambda d: click.echo(f"{say(d)}; weights now {d['decision']['weights']}"))
    return cmd


drain_cmd = _drain_command("drain", "Drain a site (onprem|cloud) or an instance: no new traffic until `undrain`.",
                           lambda d: f"drained {d['kind']} {d['target']}")
undrain_cmd = _drain_command("undrain", "Put a drained site or instance back in service (HAProxy state ready).",
                             lambda d: f"{d['target']} ready (was drained: {d['changed']})")


# ---- policy -------------------------------------------------------------------------------------
@click.group("policy")
def policy_group():
    """The traffic policy."""


@policy_group.command("show")
@json_option
@click.pass_context
def policy_show(ctx, as_json):
    """Policy thresholds, the instance registry and the policy's carried state."""
    settings = settings_from(ctx)

    def read_db(audit) -> dict:
        last = audit.last()
        return policy_view(settings, last.state if last else None)
    d = daemon_or_database(settings, "/v1/policy", read_db, no_database=policy_view(settings, None))

    def human(d):
        click.echo(f"source: {d['source']}")
        for k, v in d["config"].items():
            click.echo(f"  {k}: {v}")
        click.echo("instances:")
        for i in d["instances"]:
            click.echo(f"  {i['name']} ({i['site']}) capacity={i['capacity']} cost/h={i['cost_per_hour']} "
                       f"sensitive_ok={i['sensitive_ok']} {i['http']}")
        click.echo(f"state: {d['state']}")
    _print(d, as_json, human)


# ---- history ------------------------------------------------------------------------------------
@click.command("history")
@history_options("1h", "Every tick, not only changes and notable decisions.")
@click.pass_context
def history_cmd(ctx, since, limit, all_rows, as_json):
    """Audited policy decisions (from the daemon; from the database when it is down)."""
    settings = settings_from(ctx)
    ts = since_param(since)
    params = {"since": since, "limit": limit, "all": int(all_rows)}
    d = daemon_or_database(settings, "/v1/history", lambda audit: {"decisions": [
        r.to_dict() for r in audit.history(ts, limit, changes_only=not all_rows)],
        "operator_actions": audit.operator_history(ts, limit)}, params=params, timeout=5)

    def human(d):
        click.echo(f"source: {d['source']}")
        for r in d["decisions"]:
            ow, nw = r["old_weights"], r["new_weights"]
            arrow = f"{ow['onprem']}/{ow['cloud']} -> {nw['onprem']}/{nw['cloud']}"
            err = f" ERROR {r['error']}" if r.get("error") else ""
            click.echo(f"{r['time']}  {r['reason']:<20} {arrow:<16} {r['message']}{err}")
        # What operators changed (overrides, drains), as written to the operator state in S3.
        for r in d.get("operator_actions", []):
            click.echo(f"{r['time']}  operator {r['action']:<11} {r['target'] or '-':<16} by {r['by'] or '?'} "
                       f"(generation {r['generation']}, revision {r['revision']}) {json.dumps(r['detail'])}")
    _print(d, as_json, human)
