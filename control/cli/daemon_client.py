"""How the CLI talks to the control daemon: `AdminClient` (the admin API with the configured
token) and `daemon_or_database`, the one fallback every read-only view uses: ask the daemon, and
when it is down read the control database directly (and say so in `source`)."""
from __future__ import annotations

import json
from typing import Callable

import click
import requests

from control.traffic.audit import Audit


class DaemonDown(click.ClickException):
    pass


class AdminClient:
    def __init__(self, settings, timeout: float = 10.0):
        c = settings.control
        self.base = f"http://{c.api_host}:{c.api_port}"
        self.headers = {"Authorization": f"Bearer {c.admin_token.get_secret_value()}"}
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> dict:
        try:
            r = requests.request(method, self.base + path, json=body, params=params, headers=self.headers,
                                 timeout=self.timeout)
        except requests.ConnectionError:
            raise DaemonDown(f"the control daemon is not answering at {self.base} "
                             "(start it with `triton-hybrid up` or `triton-hybrid control run`)") from None
        try:
            data = r.json()
        except ValueError:
            data = {"error": r.text[:300]}
        if r.status_code != 200:
            raise click.ClickException(f"{method} {path}: HTTP {r.status_code}: {data.get('error', data)}")
        return data


def daemon_or_database(settings, path: str, read_db: Callable[[Audit], dict], *, params: dict | None = None,
                       timeout: float = 3.0, any_error: bool = False, no_database: dict | None = None) -> dict:
    """`GET path` from the daemon as {"source": "daemon", ...}; if the daemon is down (with
    `any_error`: or answers an error), `read_db(audit)` from the control database as
    {"source": "database (daemon down)", "error": why, ...}. No database either: `no_database`
    (with source "none"), or a ClickException saying both are missing."""
    try:
        return {"source": "daemon", **AdminClient(settings, timeout=timeout).call("GET", path, params=params)}
    except click.ClickException as e:
        if not (any_error or isinstance(e, DaemonDown)):
            raise
        err = e.format_message()
    if not settings.database_path.exists():
        if no_database is None:
            raise click.ClickException(f"{err}; and there is no control database at {settings.database_path}")
        return {"source": "none", "error": err, **no_database}
    audit = Audit(settings.database_path)
    try:
        return {"source": "database (daemon down)", "error": err, **read_db(audit)}
    finally:
        audit.close()


def print_result(obj, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, default=str))
    else:
        human(obj)
