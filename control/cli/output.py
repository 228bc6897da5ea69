"""How CLI commands print a result: JSON with --json, else the command's own human form."""
from __future__ import annotations

import json

import click


def print_result(obj, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, default=str))
    else:
        human(obj)
