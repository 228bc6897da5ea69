"""`triton-hybrid agent [--once]`: the host agent beside one Triton (control/agent/, docs/agent.md)."""
from __future__ import annotations

import logging
import os
import signal
import stat
import sys
import threading
from pathlib import Path

import click

from control.agent.repository import RepositoryError
from control.cli import settings_from

SECRET_ENV = ("TRITON_HYBRID__AGENT__TOKEN", "TRITON_HYBRID__AGENT__ADMIN_KEY")


def check_secret_file(settings, environ=os.environ) -> None:
    """Refuse agent secrets that come from a config file others can read (use mode 600, a *_file, or env)."""
    src = Path(settings.source) if settings.source else None
    a = settings.agent
    in_file = [name for name, secret, env in (("agent.token", a.token, SECRET_ENV[0]),
                                               ("agent.admin_key", a.admin_key, SECRET_ENV[1]))
               if secret.get_secret_value() and env not in environ]
    if not in_file or src is None or not src.exists():
        return
    mode = stat.S_IMODE(src.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise click.ClickException(f"{src} holds {' and '.join(in_file)} but is readable by others (mode {mode:o}): "
                                   f"run `chmod 600 {src}`, or move the secrets to agent.token_file / "
                                   "agent.admin_key_file (mode 600) or the environment")


@click.command("agent")
@click.option("--once", is_flag=True, help="Converge once and exit: 0 when every model is live (or prepared on "
                                           "disk for a Triton that has not started), 1 otherwise. For an init container.")
@click.pass_context
def agent_cmd(ctx, once):
    """Run the host agent: pull, verify, load and report the models the desired state names for
    this host (agent.instance), through Triton's repository API on the loopback."""
    from control.agent.main import AgentSetupError, run_agent  # noqa: PLC0415 - boto3/tritonclient are heavy

    settings = settings_from(ctx)
    check_secret_file(settings)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = settings.agent
    # Relative paths resolve against the project root, like every other path of the config.
    cfg = cfg.model_copy(update={"repository_dir": str(settings.path(cfg.repository_dir)),
                                 "state_dir": str(settings.path(cfg.state_dir)) if cfg.state_dir else ""})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        code = run_agent(settings.s3, cfg, once=once, stop=stop)
    except (AgentSetupError, RepositoryError) as e:
        raise click.ClickException(str(e)) from None
    sys.exit(code)
