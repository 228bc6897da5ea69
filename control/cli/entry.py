"""`triton-hybrid entry [--once]`: the site entry agent beside one HAProxy (control/entry/,
docs/traffic.md "Site entries")."""
from __future__ import annotations

import logging
import os
import signal
import stat
import sys
import threading
from pathlib import Path

import click

from control.cli import settings_from

TOKEN_ENV = "TRITON_HYBRID__ENTRY__TOKEN"


def check_token_file(settings, environ=os.environ) -> None:
    """Refuse an entry.token that comes from a config file others can read (mode 600, token_file or env)."""
    src = Path(settings.source) if settings.source else None
    if not settings.entry.token.get_secret_value() or TOKEN_ENV in environ or src is None or not src.exists():
        return
    mode = stat.S_IMODE(src.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise click.ClickException(f"{src} holds entry.token but is readable by others (mode {mode:o}): run "
                                   f"`chmod 600 {src}`, or move it to entry.token_file (mode 600) or {TOKEN_ENV}")


@click.command("entry")
@click.option("--once", is_flag=True, help="Apply the decided weights once and exit: 0 when HAProxy has them "
                                           "(or none are decided yet), 1 otherwise.")
@click.pass_context
def entry_cmd(ctx, once):
    """Run the site entry agent: apply the weights the control plane decided (traffic.json in S3) to
    this host's HAProxy through its local runtime socket, and report what HAProxy has."""
    from control.entry.main import AgentSetupError, run_entry  # noqa: PLC0415 - boto3 is heavy

    settings = settings_from(ctx)
    check_token_file(settings)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        code = run_entry(settings, once=once, stop=stop)
    except AgentSetupError as e:
        raise click.ClickException(str(e)) from None
    sys.exit(code)
