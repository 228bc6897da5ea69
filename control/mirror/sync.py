"""Sync published model versions from S3 onto every Triton instance, safely.

Per instance the control plane keeps a local model repository
(``run_dir/instances/<name>/repository``) that Triton serves in explicit model-control mode.
For each model the *target* is the newest published version (manifest present) that an operator
did not roll back from and that did not fail on this instance. Moving a model to its target:

1. **pull**: download every file of the manifest into a staging directory, checking size and
   sha256 while streaming; any mismatch (a tampered or truncated object) refuses the version.
   Only a fully verified version directory is renamed into the repository -- and even there
   Triton does not serve it, because the model's ``config.pbtxt`` names the live version in
   ``version_policy { specific { versions: [...] } }``;
2. **candidate**: the verified version is loaded under a private name
   (``<model>__candidate_v<N>``, hard links to the same files) and smoke-tested. Clients never
   call that name, so a version that loads but answers wrongly is never seen by them;
3. **go live**: ``config.pbtxt`` is rewritten (atomically) to name the new version and the model
   is reloaded through the repository API. Triton keeps the old version serving until the new one
   is loaded, so requests never fail during the switch. Wait ready, smoke again, mark live;
4. **on any failure**: restore the previous ``config.pbtxt`` and reload it (the old version
   keeps serving), remove the new version directory, record the reason.

S3 or Triton unreachable: nothing on the host changes, the failure is recorded and the next
scheduled attempt waits with exponential backoff (``s3.retry_base_delay_s``). `sync_all` is
idempotent: a model already live at its target costs one index call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from control.adapters import s3 as s3x
from control.adapters.triton import (
    TritonAdmin,
    TritonAdminError,
    TritonUnreachable,
    ready_versions_of,
)
from control.agent import pull as _agent_pull
from control.agent.errors import AgentError
from control.agent.loader import Loader
from control.agent.repository import HostRepository, file_lock
from control.agent.smoke import SmokeFn, smoke_for
from control.mirror.manifest import Manifest, ManifestError, validate_model_name
from control.mirror.publish import list_models, published_versions, read_manifest
from control.mirror.state import MirrorState

SMOKE_TIMEOUT_S = 30.0  # what this module always used; the agent has agent.smoke_timeout_s

# Moved to control/agent/ (the host agent); these names stay until the lead removes this module.
SyncError = AgentError  # kind: verify | load | smoke | unreachable

@dataclass
class Outcome:
    instance: str
    model: str
    version: int | None
    status: str          # live | up-to-date | failed | skipped | pulled
    reason: str = ""
    previous: int | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# Paths ------------------------------------------------------------------------------------------

def instance_root(settings, instance) -> Path:
    return settings.run_path / "instances" / instance.name


def repository_path(settings, instance) -> Path:
    return instance_root(settings, instance) / "repository"


def instance_lock(settings, instance, blocking: bool = True):
    """One sync per instance at a time (the daemon's job and a CLI call may overlap)."""
    return file_lock(instance_root(settings, instance) / "sync.lock", blocking)


# Moved to control/agent/ -- thin wrappers over the agent's modules ------------------------------

def _host(settings, instance) -> HostRepository:
    """This control-plane-side layout as the agent's HostRepository: repository/, meta/, staging/."""
    return HostRepository(repository_path(settings, instance), instance_root(settings, instance))


def verify_local(settings, instance, manifest: Manifest) -> list[str]:
    """Problems of the version on disk against its manifest (empty list = verified)."""
    return _agent_pull.verify_local(_host(settings, instance), manifest)


def pull_version(settings, instance, manifest: Manifest, client, state: MirrorState | None = None) -> Path:
    """Make `repository/<model>/<version>/` a verified copy of the published version; return it."""
    host = _host(settings, instance).ensure()
    pulled = _agent_pull.pull_version(client, settings.s3, host, manifest)
    if pulled and state is not None:
        state.set_status(instance.name, manifest.model, manifest.version, "pulled",
                         content_sha256=manifest.content_sha256)
    return host.version_dir(manifest.model, manifest.version)


def write_live_config(settings, instance, model: str, version: int) -> None:
    _host(settings, instance).write_live_config(model, version)


def live_config_version(settings, instance, model: str) -> int | None:
    return _host(settings, instance).live_config_version(model)


# Targets ----------------------------------------------------------------------------------------

def _manifests(settings, client, state: MirrorState | None, models: list[str] | None = None) -> dict[str, dict[int, Manifest | Exception]]:
    """model -> {version: manifest or the error that makes it unusable} for what S3 publishes."""
    out: dict[str, dict[int, Manifest | Exception]] = {}
    for model in (models or list_models(client, settings.s3)):
        out[model] = {}
        for v in published_versions(client, settings.s3, model):
            try:
                m = read_manifest(client, settings.s3, model, v)
            except ManifestError as e:
                out[model][v] = e
                continue
            if m is not None:
                out[model][v] = m
                if state is not None:
                    state.record_published(model, v, m.content_sha256, len(m.files), m.total_bytes, m.created)
    return out


def target_version(versions: list[int], rejected: set[int], failed: set[int]) -> int | None:
    ok = [v for v in versions if v not in rejected and v not in failed]
    return max(ok) if ok else None


def _ordered(models: dict[str, dict]) -> list[str]:
    def is_ensemble(m: str) -> bool:
        return any(isinstance(x, Manifest) and x.platform == "ensemble" for x in models[m].values())
    return sorted(models, key=lambda m: (is_ensemble(m), m))


# The lead's start-up hook -----------------------------------------------------------------------

def prepare_instance_repository(settings, instance, client=None) -> Path:
    """Before Triton starts: pull the target version of every published model (verified) into the
    instance's repository and write each config.pbtxt to serve it. Returns the repository path for
    `tritonserver --model-repository=... --model-control-mode=explicit --load-model=*`.
    A version that fails verification is recorded and the next older one is tried."""
    repo = repository_path(settings, instance)
    repo.mkdir(parents=True, exist_ok=True)
    _remove_candidates(repo)
    client = client or s3x.make_client(settings.s3)
    state = MirrorState.for_settings(settings)
    try:
        with instance_lock(settings, instance):
            catalog = _manifests(settings, client, state)
            for model in _ordered(catalog):
                rejected = set(state.rejected(model))
                failed = state.permanently_failed(instance.name, model)
                while True:
                    target = target_version(list(catalog[model]), rejected, failed)
                    if target is None:
                        break
                    m = catalog[model][target]
                    try:
                        if isinstance(m, Exception):
                            raise SyncError("verify", f"{model} v{target}: {m}")
                        pull_version(settings, instance, m, client, state)
                        write_live_config(settings, instance, model, target)
                        break
                    except SyncError as e:
                        if e.kind == "unreachable":
                            raise
                        state.set_status(instance.name, model, target, "failed", str(e), e.kind)
                        failed.add(target)
        return repo
    finally:
        state.close()


def _remove_candidates(repo: Path, admin: TritonAdmin | None = None) -> None:
    host = HostRepository(repo, repo.parent)
    if admin is not None:
        Loader(admin, host, load_timeout_s=admin.timeout, smoke_timeout_s=SMOKE_TIMEOUT_S).remove_candidates()
    else:
        for name in host.candidates():
            host.remove_candidate(name)


# Rolling one model on one instance --------------------------------------------------------------

def roll_model(settings, instance, admin: TritonAdmin, state: MirrorState, manifest: Manifest, client,
               previous: int | None, smoke: SmokeFn | None = None) -> Outcome:
    """Bring `manifest`'s version live on one instance (control/agent/loader.py); on failure restore `previous`."""
    t0 = time.monotonic()
    model, version = manifest.model, manifest.version
    loader = Loader(admin, _host(settings, instance), load_timeout_s=settings.triton.startup_timeout_s,
                    smoke_timeout_s=SMOKE_TIMEOUT_S, smokes={model: smoke} if smoke else None)
    try:
        pull_version(settings, instance, manifest, client, state)
        loader.go_live(model, version, previous)
    except SyncError as e:
        if e.kind == "unreachable":
            raise
        state.set_status(instance.name, model, version, "failed", str(e), e.kind)
        return Outcome(instance.name, model, version, "failed", str(e), previous, time.monotonic() - t0)
    if previous is not None and previous != version:
        state.set_status(instance.name, model, previous, "pulled", f"replaced by v{version}")
    state.set_status(instance.name, model, version, "live", content_sha256=manifest.content_sha256)
    return Outcome(instance.name, model, version, "live", "", previous, time.monotonic() - t0)


# Instance and fleet -----------------------------------------------------------------------------

def sync_instance(settings, instance, *, client=None, state: MirrorState | None = None, force: bool = True,
                  models: list[str] | None = None, smoke: dict[str, SmokeFn] | None = None) -> list[Outcome]:
    own_state = state is None
    state = state or MirrorState.for_settings(settings)
    try:
        with instance_lock(settings, instance, blocking=force) as got:
            if not got:
                return [Outcome(instance.name, "*", None, "skipped", "another sync of this instance is running")]
            health = state.instance_health(instance.name)
            if not force and time.time() < float(health["next_attempt_at"] or 0):
                return [Outcome(instance.name, "*", None, "skipped",
                                f"backing off after {health['consecutive_failures']} failures: {health['last_error']}")]
            try:
                out = _sync_instance(settings, instance, client or s3x.make_client(settings.s3), state, models, smoke or {})
            except Exception as e:  # noqa: BLE001 - a scheduled job must record, not crash
                known = (SyncError, s3x.S3Error, TritonAdminError, ManifestError)
                msg = str(e) if isinstance(e, known) else f"unexpected {type(e).__name__}: {e}"
                delay = state.instance_failed(instance.name, msg, settings.s3.retry_base_delay_s)
                state.event(instance.name, None, None, "sync-error", msg)
                return [Outcome(instance.name, "*", None, "skipped", f"{msg} (next scheduled attempt in {delay:.1f}s)")]
            state.instance_ok(instance.name)
            return out
    finally:
        if own_state:
            state.close()


def _sync_instance(settings, instance, client, state, models, smoke) -> list[Outcome]:
    admin = TritonAdmin.for_instance(settings, instance)
    if not admin.server_live():
        raise TritonUnreachable(f"Triton {instance.name} ({instance.http_url}) is not answering")
    repo = repository_path(settings, instance)
    _remove_candidates(repo, admin)
    catalog = _manifests(settings, client, state, models)
    loaded = ready_versions_of(admin.index())
    outcomes = []
    for model in _ordered(catalog):
        rejected = set(state.rejected(model))
        failed = state.permanently_failed(instance.name, model)
        target = target_version(list(catalog[model]), rejected, failed)
        if target is None:
            continue
        m = catalog[model][target]
        if isinstance(m, Exception):
            state.set_status(instance.name, model, target, "failed", str(m), "verify")
            outcomes.append(Outcome(instance.name, model, target, "failed", str(m)))
            continue
        live = state.live_version(instance.name, model)
        serving = loaded.get(model, set())
        if target in serving and live_config_version(settings, instance, model) == target:
            if live == target:
                outcomes.append(Outcome(instance.name, model, target, "up-to-date"))
                continue
            # Pulled before Triton started (prepare_instance_repository) and loaded by it: smoke, then live.
            try:
                (smoke.get(model) or smoke_for(model))(admin, model, target, repo / model / str(target))
            except Exception as e:  # noqa: BLE001
                outcomes.append(Outcome(instance.name, model, target, "failed", f"smoke check: {e}"))
                state.set_status(instance.name, model, target, "failed", f"smoke check at start-up: {e}", "smoke")
                continue
            if live is not None and live != target:
                state.set_status(instance.name, model, live, "pulled", f"replaced by v{target}")
            state.set_status(instance.name, model, target, "live", content_sha256=m.content_sha256)
            outcomes.append(Outcome(instance.name, model, target, "live", "verified at start-up", live))
            continue
        previous = live if live in serving else (max(serving) if serving else None)
        outcomes.append(roll_model(settings, instance, admin, state, m, client, previous, smoke.get(model)))
    apply_host_retention(settings, instance, state)
    return outcomes


def sync_all(settings, *, force: bool = False, instance: str | None = None, models: list[str] | None = None,
             client=None, smoke: dict[str, SmokeFn] | None = None) -> dict[str, dict[str, dict]]:
    """Sync every managed instance (or one). Safe to call on a schedule: idempotent, one run per
    instance at a time (a busy instance is skipped), backoff while S3/Triton are unreachable
    (`force=True` ignores the backoff, as the CLI does).

    Returns JSON-ready ``{instance: {model: {"live", "published", "status", "version", "reason",
    "previous", "seconds"}}}``: ``live`` is the live version after this run, ``published`` the
    newest published version not rolled back from; an instance that could not be synced at all
    has one entry under the model ``"*"`` (status ``skipped``, the reason)."""
    client = client or s3x.make_client(settings.s3)
    out: dict[str, dict[str, dict]] = {}
    state = MirrorState.for_settings(settings)
    try:
        for inst in settings.instances:
            if instance and inst.name != instance:
                continue
            if not inst.managed and not instance:
                outcomes = [Outcome(inst.name, "*", None, "skipped", "not managed by this control plane")]
            else:
                outcomes = sync_instance(settings, inst, client=client, state=state, force=force,
                                         models=models, smoke=smoke)
            out[inst.name] = _report(state, inst.name, outcomes, models)
    finally:
        state.close()
    return out


def _report(state: MirrorState, instance: str, outcomes: list[Outcome], models: list[str] | None) -> dict[str, dict]:
    newest: dict[str, int] = {}
    for r in state.published():
        if models and r["model"] not in models:
            continue
        if r["version"] not in state.rejected(r["model"]):
            newest[r["model"]] = max(newest.get(r["model"], 0), r["version"])
    rep: dict[str, dict] = {}
    for o in outcomes:
        rep[o.model] = o.as_dict()
    for model in list(rep) + [m for m in sorted(newest) if m not in rep]:
        if model == "*":
            continue
        d = rep.setdefault(model, {"instance": instance, "model": model, "version": None, "status": "unchanged",
                                   "reason": "", "previous": None, "seconds": 0.0})
        d["live"] = state.live_version(instance, model)
        d["published"] = newest.get(model)
    return rep


# Retention on hosts -----------------------------------------------------------------------------

def apply_host_retention(settings, instance, state: MirrorState) -> list[tuple[str, int]]:
    """Keep the newest `s3.keep_versions` version directories per model on the host; never the
    live one or the one named by config.pbtxt (control/agent/repository.py)."""
    host = _host(settings, instance)
    if not host.root.is_dir():
        return []
    protect = {m: {v} for m in host.models() if (v := state.live_version(instance.name, m)) is not None}
    removed = host.apply_retention(settings.s3.keep_versions, protect)
    for model, v in removed:
        state.set_status(instance.name, model, v, "retired", f"beyond the newest {settings.s3.keep_versions} on the host")
    return removed


# Rollback ---------------------------------------------------------------------------------------

class RollbackError(RuntimeError):
    pass


def rollback(settings, model: str, to: int | None = None, client=None,
             smoke: dict[str, SmokeFn] | None = None) -> dict:
    """Bring the previous (or the named) published version back live on every instance. Versions
    newer than it are marked rejected so the periodic sync does not roll forward again; a newly
    published version is picked up as usual."""
    model = validate_model_name(model)
    client = client or s3x.make_client(settings.s3)
    versions = published_versions(client, settings.s3, model)
    if not versions:
        raise RollbackError(f"{model} has no published version in s3://{settings.s3.bucket}/{settings.s3.prefix}/")
    state = MirrorState.for_settings(settings)
    try:
        rejected = set(state.rejected(model))
        live = {inst.name: state.live_version(inst.name, model) for inst in settings.instances}
        current = max([v for v in live.values() if v is not None], default=None)
        if to is None:
            if current is None:
                raise RollbackError(f"{model} is not live on any instance; name the version with --to")
            older = [v for v in versions if v < current and v not in rejected]
            if not older:
                raise RollbackError(f"{model}: no published version older than the live v{current} "
                                    f"(published: {versions}); nothing to roll back to")
            to = older[-1]
        if to not in versions:
            raise RollbackError(f"{model} v{to} is not published (published: {versions}); "
                                "retention may have removed it")
        state.unreject(model, to)
        for v in versions:
            if v > to:
                state.reject(model, v, f"rolled back to v{to} by the operator")
        for inst in settings.instances:
            if to in state.permanently_failed(inst.name, model):
                raise RollbackError(f"{model} v{to} failed on {inst.name} before "
                                    f"({(state.get(inst.name, model, to) or {}).get('reason')}); pick another version")
    finally:
        state.close()
    results = sync_all(settings, force=True, models=[model], client=client, smoke=smoke)
    return {"model": model, "to": to, "from": current,
            "instances": results}


# Reporting --------------------------------------------------------------------------------------

def lag_report(settings, state: MirrorState | None = None) -> list[dict]:
    """Per instance and model: live version, newest published (not rolled back), and the lag in
    versions. From the state database only (no S3 or Triton call): cheap enough for `status`."""
    own = state is None
    state = state or MirrorState.for_settings(settings)
    try:
        pub: dict[str, list[dict]] = {}
        for r in state.published():
            pub.setdefault(r["model"], []).append(r)
        out = []
        for inst in settings.instances:
            health = state.instance_health(inst.name)
            for model, rows in sorted(pub.items()):
                rejected = set(state.rejected(model))
                avail = [r for r in rows if r["version"] not in rejected]
                newest = max((r["version"] for r in avail), default=None)
                live = state.live_version(inst.name, model)
                newer = [r for r in avail if live is None or r["version"] > live]
                oldest_newer = min((r["published_at"] for r in newer), default=None)
                out.append({"instance": inst.name, "model": model, "live": live, "newest": newest,
                            "lag_versions": len(newer),
                            "lag_s": round(time.time() - oldest_newer, 1) if oldest_newer else 0.0,
                            "last_sync_error": health.get("last_error")})
        return out
    finally:
        if own:
            state.close()
