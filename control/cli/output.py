"""What CLI commands share: printing a result (JSON with --json, else the command's own human form)
and the options of the audit-history commands."""
from __future__ import annotations

import json
import time

import click

from control.durations import DurationError, since_to_ts


def print_result(obj, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, default=str))
    else:
        human(obj)


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def history_options(default_since: str, all_help: str):
    """--since, --limit, --all and --json, as every audit-history command takes them."""
    def wrap(f):
        for opt in reversed([
            click.option("--since", default=default_since, show_default=True, help="10m, 2h, 1d or an ISO time."),
            click.option("--limit", default=50, show_default=True),
            click.option("--all", "all_rows", is_flag=True, help=all_help),
            json_option]):
            f = opt(f)
        return f
    return wrap


def since_param(since: str) -> float | None:
    """--since as a timestamp; a bad value is a usage error naming the option."""
    try:
        return since_to_ts(since, time.time())
    except DurationError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None
