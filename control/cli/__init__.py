"""`triton-hybrid`: the admin CLI. Each command group lives next to the code it drives; this file
only assembles them, so a reader finds `sync` in control/sync_cli.py, `export` in export/cli.py."""
from __future__ import annotations

import importlib
import sys

import click

from control.config import ConfigError, load_config
from control.daemon.client import DaemonError

# (module, attribute) of each command or group; imported lazily so that `triton-hybrid status`
# does not pay for torch.
_COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("control.cli.stack", "up_cmd"),
    "down": ("control.cli.stack", "down_cmd"),
    "status": ("control.cli.stack", "status_cmd"),
    "supervise": ("control.cli.stack", "supervise_cmd"),
    "export": ("export.cli", "export_cmd"),
    "export-bench": ("export.cli", "export_bench_cmd"),
    "repo": ("model_repository.cli", "repo_group"),
    "report": ("control.cli.report", "report_cmd"),
    "deploy": ("control.cli.deploy", "deploy_group"),
    "control": ("control.cli.traffic", "control_group"),
    "drill": ("control.cli.drill", "drill_cmd"),
    "weights": ("control.cli.traffic", "weights_group"),
    "drain": ("control.cli.traffic", "drain_cmd"),
    "undrain": ("control.cli.traffic", "undrain_cmd"),
    "policy": ("control.cli.traffic", "policy_group"),
    "history": ("control.cli.traffic", "history_cmd"),
    "scale": ("control.cli.capacity", "scale_group"),
    "cost": ("control.cli.capacity", "cost_cmd"),
    "publish": ("control.cli.mirror", "publish_cmd"),
    "rollback": ("control.cli.mirror", "rollback_cmd"),
    "versions": ("control.cli.mirror", "versions_cmd"),
    "rollout": ("control.cli.rollout", "rollout_group"),
    "agent": ("control.cli.agent", "agent_cmd"),
    "entry": ("control.cli.entry", "entry_cmd"),
}


class LazyGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DaemonError as e:  # the daemon refused or is down: a clean CLI error, no traceback
            raise click.ClickException(str(e)) from None

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(_COMMANDS))

    def get_command(self, ctx, name):
        if name in _COMMANDS:
            module, attr = _COMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup)
@click.option("--config", "config_path", envvar="TRITON_HYBRID_CONFIG", type=click.Path(dir_okay=False),
              help="Config file (default deploy/local.yaml).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Serve search-ranking models on Triton across an on-prem and a cloud site."""
    ctx.obj = {"config_path": config_path}


def settings_from(ctx: click.Context):
    """The loaded settings for a command; a config problem becomes a clean CLI error."""
    root = ctx.find_root()
    if "settings" not in root.obj:
        try:
            root.obj["settings"] = load_config(root.obj.get("config_path"))
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
    return root.obj["settings"]


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
