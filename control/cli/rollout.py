"""`triton-hybrid rollout status|start|promote|abort|pause|resume|rollback MODEL`: model version
rollouts (docs/rollout.md). Works straight against S3 desired state and the audit, daemon or not;
every command goes through the same phase machine as the daemon's ticks."""
from __future__ import annotations

import getpass
import json

import click
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from control.cli import settings_from
from control.cli.output import json_option
from control.daemon.client import AdminClient

console = Console()


def _operator() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "cli"


def _controller(ctx):

    from control.rollout.controller import from_settings  # noqa: PLC0415 - boto3 is heavy
    # A registry of its own: the CLI's counters are not the daemon's (its audit rows are shared).
    return from_settings(settings_from(ctx), registry=CollectorRegistry(), by=_operator())


def _errors():
    from control.adapters.s3 import S3Error  # noqa: PLC0415
    from control.mirror.desired import DesiredStateError  # noqa: PLC0415
    from control.rollout.phases import CommandError  # noqa: PLC0415
    return (CommandError, DesiredStateError, S3Error)


def run_command(ctx, model: str, kind: str, by: str | None, as_json: bool, **kw) -> None:
    """One command through the rollout machine; prints the transition. Without leader election:
    straight against S3 (daemon or not). With it (control.leader.enabled) only the leader may write
    the desired state, so the command goes to the control plane's admin API (a standby answers 409
    naming the leader)."""
    settings = settings_from(ctx)
    if settings.control.leader.enabled:
        body = {k: v for k, v in kw.items() if v is not None}
        t = AdminClient(settings).call("POST", f"/v1/rollouts/{model}/{kind}", body)["transition"]
    else:
        from control.rollout.phases import Command, CommandKind  # noqa: PLC0415
        ctl = _controller(ctx)
        try:
            tr = ctl.command(model, Command(CommandKind(kind), by=by or _operator(), **kw))
        except _errors() as e:
            raise click.ClickException(str(e)) from None
        finally:
            ctl.close()
        t = tr.to_dict() if tr is not None else None
    if as_json:
        click.echo(json.dumps(t, indent=2))
    elif t is None:
        click.echo(f"{model}: nothing to do ({kind}: already so)")
    else:
        click.echo(f"{model} v{t['version']}: {t['from']} -> {t['to']} ({t['reason']}): {t['message']}")


@click.group("rollout")
def rollout_group() -> None:
    """Model version rollouts: canary, analysis against the same site, promotion in waves."""


def _common(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print the transition as JSON.")(f)
    f = click.option("--by", default=None, help="Who asks (audit, rejection records); default cli:$USER.")(f)
    return click.argument("model")(f)


@rollout_group.command("status")
@click.argument("model", required=False)
@click.option("--history", default=10, show_default=True, help="Audit rows to show per model.")
@json_option
@click.pass_context
def status_cmd(ctx, model, history, as_json):
    """Phase, reason, canary and rejected versions of MODEL (all models without one)."""
    ctl = _controller(ctx)
    try:
        st = ctl.status(model, history)
    except _errors() as e:
        raise click.ClickException(str(e)) from None
    finally:
        ctl.close()
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    if not st["models"]:
        click.echo("no model in desired state yet")
    for name, m in st["models"].items():
        r = m["rollout"] or {}
        line = f"[bold]{name}[/bold]: {m['phase']}, stable v{m['stable']}"
        if m["canary"]:
            line += f", canary v{m['canary']['version']} on {', '.join(m['canary']['instances']) or 'none'}"
        if r:
            line += f" — {r['reason']}: {r['message']}" + (" [yellow](paused)[/yellow]" if r.get("paused") else "")
            if r.get("failed_checks"):
                line += f" (failed checks {r['failed_checks']})"
        console.print(line)
        for v, rej in m["rejected"].items():
            console.print(f"  rejected v{v}: {rej['reason']} ({rej['by']})")
        if m["instances"]:
            t = Table("instance", "site", "live", "target", "state", "age s", "error", box=None)
            for n, i in m["instances"].items():
                t.add_row(n, i["site"], str(i.get("live")), str(i.get("target")), str(i.get("state", "")),
                          str(i["age_s"]), str(i.get("error") or ""))
            console.print(t)
        for h in m["history"]:
            console.print(f"  {h['time']} v{h['version']} {h['from_phase']} -> {h['to_phase']} ({h['reason']}): "
                          f"{h['message']}")
    for p in st["problems"]:
        console.print(f"[yellow]warning:[/yellow] {p}")


# kind -> (help, the option it takes besides MODEL/--by/--json: (flag, keyword, help) or None)
_COMMANDS = {
    "start": ("Start a rollout of MODEL (when start_on_publish is off, or to pick a version).",
              ("--version", "version", "Version to roll out (default: newest published).")),
    "promote": ("Skip the rest of the analysis: promote MODEL's canary version in waves now.", None),
    "abort": ("Reject MODEL's rollout version; every instance returns to stable.", None),
    "pause": ("Hold MODEL's rollout where it is (no checks, no waves, no deadline) until resume.", None),
    "resume": ("Resume a paused rollout (deadline restarts), or restart a stopped one.", None),
    "rollback": ("Reject MODEL's current version (the rollout's, else stable) and serve the previous one (or --to).",
                 ("--to", "to", "Version to go back to (default: the previous one).")),
}


def _command(kind: str, help_text: str, option) -> None:
    def cmd(ctx, model, by, as_json, **extra):
        run_command(ctx, model, kind, by, as_json, **extra)
    if option is not None:
        flag, keyword, option_help = option
        cmd = click.option(flag, keyword, type=int, default=None, help=option_help)(cmd)
    rollout_group.command(kind, help=help_text)(_common(click.pass_context(cmd)))


for _kind, (_help, _option) in _COMMANDS.items():
    _command(_kind, _help, _option)
