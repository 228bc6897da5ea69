"""The host agent of a local-stack instance: its AgentConfig from the instance registry (the same
agent a production host runs, pointed at this machine's run dir and the instance's own admin key)."""
from __future__ import annotations

from pydantic import SecretStr

from control.config import AgentConfig
from control.local.admin_keys import ensure_admin_key


def agent_config_for(settings, instance, **overrides):
    """The AgentConfig of one instance of the registry (the local stack, the scaler's new instances):
    its site, capacity and addresses, Triton on its own address, the repository under
    `run_dir/instances/<name>/repository` (where the local stack's Triton serves it), the state
    beside it, the instance's own Triton admin key (generated if it has none yet).
    `overrides`: any AgentConfig field (api_port, token ...)."""
    root = settings.run_path / "instances" / instance.name
    base = dict(instance=instance.name, site=instance.site, triton_url=instance.http_url,
                repository_dir=str(root / "repository"), state_dir=str(root / "agent"),
                admin_key=SecretStr(ensure_admin_key(settings, instance)), keep_versions=settings.s3.keep_versions,
                load_timeout_s=settings.triton.startup_timeout_s, capacity=instance.capacity,
                advertise_http_url=instance.http_url, advertise_grpc_url=instance.grpc_url,
                advertise_metrics_url=instance.metrics_url)
    return AgentConfig(**{**base, **overrides})
