"""The host agent of a local-stack instance: the same `triton-hybrid agent` a production host runs,
pointed at this machine's run dir, as a managed process of its own (`agent-<instance>`).

    prepare_host(settings, inst)   # `agent --once` in this process: the stable versions on disk
    start_agent(settings, inst)    # the agent loop beside the instance's Triton, its API on agent_port
    wait_agent_ready(...)          # until its /ready says every model is live at its desired version
    start_host(settings, inst)     # the three above around the instance's Triton (`up`, the local scaler)

The agent is the only writer of `run_dir/instances/<name>/repository` (DESIGN.md, "Hosts, agents and
desired state"): `up`, the supervisor and the local scaler start Triton on that directory and leave
its contents to the agent. Its config file (`run_dir/instances/<name>/agent.yaml`, mode 600) names
the instance's admin key and API token by file, never inline.
"""
from __future__ import annotations

import sys
from pathlib import Path

import requests
import yaml

from control.config import AgentConfig, plain_dump
from control.local.admin_keys import (
    agent_token_path,
    ensure_admin_key,
    ensure_agent_token,
    key_path,
)
from control.local.procs import (
    ComponentError,
    ManagedProcess,
    NotReady,
    http_ok,
    load_managed,
    private_dir,
    require_free_ports,
    start_ready,
    wait_for_process,
    write_private,
)
from control.local.triton_server import start_instance

PREFIX = "agent-"


def agent_name(instance) -> str:
    """The agent's component name (pid file, log file): `agent-<instance>`."""
    return f"{PREFIX}{instance.name}"


def instance_dir(settings, instance) -> Path:
    return settings.run_path / "instances" / instance.name


def repository_path(settings, instance) -> Path:
    """The directory the instance's Triton serves and its agent alone writes."""
    return instance_dir(settings, instance) / "repository"


def agent_config_for(settings, instance, **overrides) -> AgentConfig:
    """The AgentConfig of one instance of the registry (the local stack, the scaler's new instances):
    the config's `agent` section (intervals, timeouts) with this instance's name, site, capacity and
    addresses, Triton on its own address, the repository under `run_dir/instances/<name>/`, and the
    instance's own admin key and agent token read from their 0600 files (generated if missing).
    `overrides`: any AgentConfig field."""
    root = instance_dir(settings, instance)
    ensure_admin_key(settings, instance)
    ensure_agent_token(settings, instance)
    key_file = key_path(settings, instance)
    base = dict(instance=instance.name, site=instance.site, triton_url=instance.http_url,
                repository_dir=str(root / "repository"), state_dir=str(root / "agent"),
                token_file=str(agent_token_path(settings, instance)),
                keep_versions=settings.s3.keep_versions, load_timeout_s=settings.triton.startup_timeout_s,
                capacity=instance.capacity, api_host=instance.host, api_port=instance.agent_port or 0,
                advertise_http_url=instance.http_url, advertise_grpc_url=instance.grpc_url,
                advertise_metrics_url=instance.metrics_url, advertise_agent_url=instance.agent_url)
    # The key from its file; a key set in the config (triton.admin_keys) has no file: passed inline.
    base |= {"admin_key_file": str(key_file)} if key_file.exists() else {"admin_key": ensure_admin_key(settings, instance)}
    return AgentConfig.model_validate(plain_dump(settings.agent) | base | overrides)


def write_agent_config(settings, instance, cfg: AgentConfig) -> Path:
    """The agent's own config file: S3 + its agent section only (mode 600: S3 credentials)."""
    path = instance_dir(settings, instance) / "agent.yaml"
    private_dir(path.parent)
    write_private(path, yaml.safe_dump({"run_dir": str(settings.run_path), "s3": plain_dump(settings.s3),
                                        "agent": plain_dump(cfg)}, sort_keys=False))
    return path


def prepare_host(settings, instance) -> None:
    """`agent --once` before the instance's Triton starts (the Kubernetes init container's job): the
    desired versions pulled, verified and named by each model's live config.pbtxt. Raises
    ComponentError naming each model that could not be prepared."""
    from control.agent.main import Agent  # noqa: PLC0415 - boto3 and tritonclient only when a host starts

    agent = Agent(settings.s3, agent_config_for(settings, instance))
    result = agent.converge_once()
    if result is None:
        raise ComponentError(agent_name(instance), f"could not read the desired state: {agent.last_error}")
    if not result.prepared:
        bad = [f"{r.model} v{r.target}: {r.state} {r.error or r.reason}" for r in result.reports.values()
               if r.state not in ("live", "prepared")]
        raise ComponentError(agent_name(instance), "models not prepared: " + "; ".join(bad))


def start_agent(settings, instance, argv_prefix: list[str] | None = None, timeout: float = 60.0) -> ManagedProcess:
    """Start `triton-hybrid agent` for one instance (optionally wrapped, e.g. `ip netns exec NS`) and
    wait until its API answers /healthz."""
    if not instance.agent_port:
        raise ComponentError(agent_name(instance), f"instance {instance.name} has no agent_port in the config")
    name = agent_name(instance)
    require_free_ports(name, [("agent API port", instance.host, instance.agent_port)])
    cfg = agent_config_for(settings, instance)
    path = write_agent_config(settings, instance, cfg)
    argv = list(argv_prefix or []) + [sys.executable, "-m", "control.cli", "--config", str(path), "agent"]
    return start_ready(name, argv, settings.run_path, lambda: http_ok(f"{instance.agent_url}/healthz"), timeout,
                       "answering /healthz", meta={"kind": "agent", "instance": instance.name})


def start_host(settings, instance, ready_timeout: float | None = None, say=lambda _m: None,
               triton_running: bool = False, agent_running: bool = False) -> list[ManagedProcess]:
    """One instance's host, as a Kubernetes pod runs it: `agent --once` prepares the desired versions
    on disk (the init container), Triton starts on them (`--load-model=*` loads each live
    config.pbtxt), then the agent loop starts beside it (the sidecar); returns once the agent's
    /ready says every model is live at its desired version, smoke-checked. A part already running
    (`up` after a crash) is kept: a running agent has the repository prepared already. Returns the
    processes started; on failure stops them and raises ComponentError."""
    timeout = ready_timeout or settings.triton.startup_timeout_s
    procs: list[ManagedProcess] = []
    try:
        if not triton_running:
            if not agent_running:
                say(f"preparing {instance.name}'s models (its agent, once)")
                prepare_host(settings, instance)
            say(f"starting Triton {instance.name} ({instance.site}) on {instance.http_url}")
            procs.append(start_instance(settings, instance, repository_path(settings, instance), ready_timeout=timeout))
        if agent_running:
            agent = load_managed(settings.run_path, agent_name(instance))
        else:
            say(f"starting {instance.name}'s agent on {instance.agent_url}")
            procs.append(agent := start_agent(settings, instance))
        wait_agent_ready(agent, instance, timeout)
    except BaseException:
        for p in reversed(procs):
            p.stop()
        raise
    return procs


def agent_ready(instance) -> bool:
    """The agent's /ready: every model live at its desired version."""
    return bool(_ready_body(instance).get("ready"))


def _ready_body(instance) -> dict:
    try:
        return requests.get(f"{instance.agent_url}/ready", timeout=2.0).json()
    except (requests.RequestException, ValueError) as e:
        return {"ready": False, "last_error": f"/ready unreadable ({type(e).__name__})"}


def _summary(body: dict) -> str:
    waiting = body.get("not_live") or {}
    return "; ".join(f"{m} v{r.get('target')}: {r.get('state')} {r.get('error') or r.get('reason') or ''}".strip()
                     for m, r in waiting.items()) or body.get("last_error") or "nothing reported"


def wait_agent_ready(proc: ManagedProcess, instance, timeout: float) -> None:
    """Until the agent's /ready is 200 (every model live at its desired version). A version that
    failed on the host (verify, load, smoke: the agent does not retry it) ends the wait at once;
    the error names each model that is not live and why."""
    last: dict = {}  # one /ready per poll: what `ready` read, `failed` judges

    def ready() -> bool:
        last.clear()
        last.update(_ready_body(instance))
        return bool(last.get("ready"))

    def failed() -> str | None:
        bad = any(r.get("state") in ("failed", "refused") for r in (last.get("not_live") or {}).values())
        return f"a desired version failed on this host: {_summary(last)}" if bad else None

    try:
        wait_for_process(ready, proc, timeout, "ready (/ready: every model live)", interval=0.2, failed=failed)
    except NotReady as e:
        raise ComponentError(proc.name, f"{e.message}; not live: {_summary(last)}", e.log_tail) from None


def agent_status(settings, instance, timeout: float = 2.0) -> dict:
    """The agent's /v1/status (with the instance's token), or {"error": ...}."""
    try:
        r = requests.get(f"{instance.agent_url}/v1/status", timeout=timeout,
                         headers={"Authorization": f"Bearer {ensure_agent_token(settings, instance)}"})
        return r.json() if r.ok else {"error": f"/v1/status answered {r.status_code}"}
    except (requests.RequestException, ValueError) as e:
        return {"error": type(e).__name__}
