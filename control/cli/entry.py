"""`triton-hybrid entry [--once]`: the site entry agent beside one HAProxy (control/entry/,
docs/traffic.md "Site entries")."""
from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from control.cli import settings_from


@click.command("entry")
@click.option("--once", is_flag=True, help="Apply the decided weights once and exit: 0 when HAProxy has them "
                                           "(or none are decided yet), 1 otherwise.")
@click.pass_context
def entry_cmd(ctx, once):
    """Run the site entry agent: apply the weights the control plane decided (traffic.json in S3) to
    this host's HAProxy through its local runtime socket, and report what HAProxy has."""
    from control.entry.main import AgentSetupError, run_entry  # noqa: PLC0415 - boto3 is heavy

    settings = settings_from(ctx)
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
