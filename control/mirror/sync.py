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

import fcntl
import hashlib
import importlib
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from control.adapters import s3 as s3x
from control.mirror.manifest import (
    MANIFEST_NAME, Manifest, ManifestError, UnsafePathError, parse_manifest, safe_join, sha256_file,
    local_versions, validate_model_name,
)
from control.mirror.publish import list_models, published_versions, read_manifest
from control.mirror.state import MirrorState
from control.adapters.triton import TritonAdmin, TritonAdminError, TritonUnreachable, ready_versions_of

CANDIDATE_SUFFIX = "__candidate_v"
SmokeFn = Callable[..., None]  # (admin, model name to call, version, version_dir); raises on failure


class SyncError(RuntimeError):
    def __init__(self, kind: str, message: str):
        self.kind = kind  # verify | load | smoke | unreachable
        super().__init__(message)


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


def _meta_dir(settings, instance, model: str, version: int) -> Path:
    return instance_root(settings, instance) / "meta" / model / str(version)


def _staging(settings, instance) -> Path:
    p = instance_root(settings, instance) / "staging"
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextmanager
def instance_lock(settings, instance, blocking: bool = True):
    """One sync per instance at a time (the daemon's job and a CLI call may overlap)."""
    root = instance_root(settings, instance)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "sync.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# Smoke checks -----------------------------------------------------------------------------------

_SMOKE: dict[str, SmokeFn] = {}


def register_smoke(model: str, fn: SmokeFn) -> None:
    """A smoke check for `model`: fn(admin, name_to_call, version, version_dir) raises on failure."""
    _SMOKE[model] = fn


def default_smoke(admin: TritonAdmin, model: str, version: int, version_dir: Path | None = None) -> None:
    """Ready + one inference with zero inputs built from the model's config."""
    if not admin.model_ready(model, version):
        raise TritonAdminError(f"{model} v{version} is not ready on {admin.name}")
    admin.infer_zeros(model, version)


def _ensemble_smoke(mod) -> SmokeFn:
    """`model_repository.smoke`: the stored search_ranking request and its reference answer
    (`<version dir>/smoke.json`), sent to whichever name is under test (candidate or live)."""
    def check(admin: TritonAdmin, model: str, version: int, version_dir: Path | None = None) -> None:
        import tritonclient.http as th  # noqa: PLC0415

        if version_dir is None or not (Path(version_dir) / "smoke.json").is_file():
            return default_smoke(admin, model, version)
        inputs, expected = mod.smoke_request(version_dir)
        with admin.client(30.0) as c:
            res = c.infer(model, mod.to_infer_inputs(inputs, th), model_version=str(version))
        problems = mod.check_response({n: res.as_numpy(n) for n in mod.OUTPUTS}, expected)
        if problems:
            raise TritonAdminError("; ".join(problems))
    return check


def _load_config(path: Path):
    from google.protobuf import text_format  # noqa: PLC0415
    from tritonclient.grpc import model_config_pb2  # noqa: PLC0415

    cfg = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), cfg)
    return cfg


def _ensemble_using(repo: Path, model: str):
    """(ensemble config, its live version dir) of an ensemble on the host that has `model` as a step."""
    for cfg_path in sorted(repo.glob("*/config.pbtxt")):
        if CANDIDATE_SUFFIX in cfg_path.parent.name:
            continue
        try:
            cfg = _load_config(cfg_path)
        except Exception:  # noqa: BLE001 - not parseable: not ours to smoke with
            continue
        if cfg.platform != "ensemble" or not any(st.model_name == model for st in cfg.ensemble_scheduling.step):
            continue
        versions = list(cfg.version_policy.specific.versions)
        if versions and (cfg_path.parent / str(max(versions)) / "smoke.json").is_file():
            return cfg, cfg_path.parent / str(max(versions))
    return None, None


def _step_smoke(mod) -> SmokeFn:
    """A step model of an ensemble: the ensemble's stored smoke request is run step by step
    through the loaded pipeline with the model under test (candidate or new version) in its
    place, and the end result must be a well-formed ranking. Without such an ensemble on the
    host: the generic check."""
    def check(admin: TritonAdmin, name: str, version: int, version_dir: Path | None = None) -> None:
        import numpy as np  # noqa: PLC0415
        import tritonclient.http as th  # noqa: PLC0415

        model = name.split(CANDIDATE_SUFFIX, 1)[0]
        repo = Path(version_dir).parent.parent if version_dir is not None else None
        ens, ens_dir = _ensemble_using(repo, model) if repo is not None else (None, None)
        if ens is None:
            return default_smoke(admin, name, version)
        inputs, expected = mod.smoke_request(ens_dir)
        tensors = dict(inputs)
        pending = list(ens.ensemble_scheduling.step)
        with admin.client(30.0) as c:
            while pending:
                step = next((st for st in pending if all(v in tensors for v in st.input_map.values())), None)
                if step is None:
                    raise TritonAdminError(f"ensemble {ens.name}: steps {[st.model_name for st in pending]} "
                                           "cannot be fed (inputs missing)")
                pending.remove(step)
                ins = []
                for key, src in step.input_map.items():
                    arr = np.asarray(tensors[src])
                    dt = "BYTES" if arr.dtype == object else th.np_to_triton_dtype(arr.dtype)
                    i = th.InferInput(key, list(arr.shape), dt)
                    i.set_data_from_numpy(arr)
                    ins.append(i)
                is_target = step.model_name == model
                res = c.infer(name if is_target else step.model_name, ins,
                              model_version=str(version) if is_target else "",
                              outputs=[th.InferRequestedOutput(k) for k in step.output_map])
                for key, dst in step.output_map.items():
                    tensors[dst] = res.as_numpy(key)
        # Structure only (outputs present, shapes agree, scores ranked): the stored reference
        # answer belongs to the ensemble's version, and a retrained step legitimately changes it.
        # The ensemble's own smoke check, after its steps, compares against the reference.
        problems = mod.check_response({n: tensors.get(n) for n in mod.OUTPUTS}, None)
        if problems:
            raise TritonAdminError(f"the {ens.name} smoke request through {name} v{version}: " + "; ".join(problems))
    return check


def smoke_for(model: str) -> SmokeFn:
    """A registered check; else model_repository.smoke's stored request: for the ensemble itself,
    and run step by step for the ensemble's step models; else the generic one."""
    if model in _SMOKE:
        return _SMOKE[model]
    try:
        mod = importlib.import_module("model_repository.smoke")
    except ImportError:
        return default_smoke
    if not hasattr(mod, "smoke_request"):
        return default_smoke
    if model == getattr(mod, "ENSEMBLE", None):
        return _ensemble_smoke(mod)
    return _step_smoke(mod)


# Pull + verify ----------------------------------------------------------------------------------

def _download_verified(client, bucket: str, key: str, dest: Path, entry) -> None:
    """Download one manifest file, never reading more than its manifest size + 1 byte: an oversized
    object is refused as soon as it shows it is too big (a Range request caps what S3 sends, the
    loop caps what is read), then size and sha256 are checked before the file is used."""
    limit = entry.size + 1
    try:
        # An empty object has no byte 0: a Range on it is refused (416), so size-0 files read whole (capped below).
        obj = client.get_object(Bucket=bucket, Key=key, **({"Range": f"bytes=0-{entry.size}"} if entry.size else {}))
    except Exception as e:  # noqa: BLE001
        if s3x.is_not_found(e):
            raise SyncError("verify", f"s3://{bucket}/{key} is listed in the manifest but missing; "
                                      "the version is incomplete, publish a new version") from None
        err = s3x.describe(e, bucket, key)
        raise SyncError("unreachable" if isinstance(err, s3x.S3Unreachable) else "verify", str(err)) from None
    h = hashlib.sha256()
    n = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    body = obj["Body"]
    try:
        with open(dest, "wb") as f:
            for chunk in body.iter_chunks(min(1024 * 1024, limit)):
                chunk = chunk[: limit - n]
                h.update(chunk)
                n += len(chunk)
                f.write(chunk)
                if n >= limit:
                    break
    except Exception as e:  # noqa: BLE001
        raise SyncError("unreachable", f"s3://{bucket}/{key}: download interrupted ({type(e).__name__})") from None
    finally:
        body.close()
    if n > entry.size:
        dest.unlink(missing_ok=True)
        raise SyncError("verify", f"s3://{bucket}/{key}: larger than the {entry.size} bytes its manifest says; "
                                  f"refused after reading {n} bytes. The object was replaced or damaged; publish a "
                                  "new version. The previous version keeps serving")
    if n != entry.size or h.hexdigest() != entry.sha256:
        raise SyncError("verify", f"s3://{bucket}/{key}: checksum mismatch (got sha256 {h.hexdigest()[:16]}... "
                                  f"{n} bytes, manifest says {entry.sha256[:16]}... {entry.size} bytes); the object "
                                  "was tampered with or damaged. Refused; the previous version keeps serving")


def verify_local(settings, instance, manifest: Manifest) -> list[str]:
    """Problems of the version on disk against its manifest (empty list = verified)."""
    repo = repository_path(settings, instance)
    vdir = repo / manifest.model / str(manifest.version)
    meta = _meta_dir(settings, instance, manifest.model, manifest.version)
    problems = []
    for e in manifest.files:
        base = vdir if e.scope == "version" else meta
        try:
            p = safe_join(base, e.path)
        except UnsafePathError as err:
            problems.append(str(err))
            continue
        if not p.is_file():
            problems.append(f"{p} missing")
            continue
        sha, size = sha256_file(p)
        if sha != e.sha256 or size != e.size:
            problems.append(f"{p} differs from the manifest")
    return problems


def pull_version(settings, instance, manifest: Manifest, client, state: MirrorState | None = None) -> Path:
    """Make `repository/<model>/<version>/` a verified copy of the published version; return it."""
    model, version = manifest.model, manifest.version
    repo = repository_path(settings, instance)
    vdir = repo / model / str(version)
    meta = _meta_dir(settings, instance, model, version)
    if vdir.is_dir() and (meta / MANIFEST_NAME).exists():
        try:
            on_disk = parse_manifest((meta / MANIFEST_NAME).read_text(), model, version)
        except ManifestError:
            on_disk = None
        if on_disk and on_disk.content_sha256 == manifest.content_sha256 and not verify_local(settings, instance, manifest):
            return vdir
    bucket = settings.s3.bucket
    tmp = _staging(settings, instance) / f"{model}.{version}.{uuid.uuid4().hex[:8]}"
    try:
        for e in manifest.files:
            key = s3x.object_key(settings.s3, model, version, e.path)  # validates the path
            dest = safe_join(tmp / ("version" if e.scope == "version" else "model"), e.path)
            _download_verified(client, bucket, key, dest, e)
        (tmp / "model" / MANIFEST_NAME).write_text(manifest.to_json())
        (tmp / "version").mkdir(exist_ok=True)
        # Everything verified: make it visible (renames on one filesystem).
        meta.parent.mkdir(parents=True, exist_ok=True)
        if meta.exists():
            shutil.rmtree(meta)
        os.rename(tmp / "model", meta)
        (repo / model).mkdir(parents=True, exist_ok=True)
        if vdir.exists():
            trash = _staging(settings, instance) / f"trash.{uuid.uuid4().hex[:8]}"
            os.rename(vdir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp / "version", vdir)
    except UnsafePathError as e:
        raise SyncError("verify", f"{model} v{version}: {e}; refused") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if state is not None:
        state.set_status(instance.name, model, version, "pulled", content_sha256=manifest.content_sha256)
    return vdir


# Configs ----------------------------------------------------------------------------------------

def _render_config(config_text: str, name: str, versions: list[int]) -> str:
    from google.protobuf import text_format  # noqa: PLC0415
    from tritonclient.grpc import model_config_pb2  # noqa: PLC0415

    cfg = model_config_pb2.ModelConfig()
    text_format.Parse(config_text, cfg)
    cfg.name = name
    cfg.version_policy.Clear()
    cfg.version_policy.specific.versions[:] = sorted(versions)
    return text_format.MessageToString(cfg)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_live_config(settings, instance, model: str, version: int) -> None:
    """`<repo>/<model>/config.pbtxt` = the version's config, serving exactly that version."""
    meta = _meta_dir(settings, instance, model, version)
    src = meta / "config.pbtxt"
    model_dir = repository_path(settings, instance) / model
    model_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(model_dir / "config.pbtxt", _render_config(src.read_text(), model, [version]))
    # Other model-level files of that version (labels ...).
    for p in meta.iterdir():
        if p.is_file() and p.name not in ("config.pbtxt", MANIFEST_NAME):
            shutil.copy2(p, model_dir / f".{p.name}.tmp")
            os.replace(model_dir / f".{p.name}.tmp", model_dir / p.name)


def live_config_version(settings, instance, model: str) -> int | None:
    p = repository_path(settings, instance) / model / "config.pbtxt"
    if not p.exists():
        return None
    from google.protobuf import text_format  # noqa: PLC0415
    from tritonclient.grpc import model_config_pb2  # noqa: PLC0415
    cfg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(p.read_text(), cfg)
    except text_format.ParseError:
        return None
    versions = list(cfg.version_policy.specific.versions)
    return max(versions) if versions else None


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
    if not repo.is_dir():
        return
    for d in repo.iterdir():
        if d.is_dir() and CANDIDATE_SUFFIX in d.name:
            if admin is not None:
                try:
                    admin.unload(d.name)
                except TritonAdminError:
                    pass
            shutil.rmtree(d, ignore_errors=True)


# Rolling one model on one instance --------------------------------------------------------------

def _candidate_check(settings, instance, admin: TritonAdmin, manifest: Manifest, smoke: SmokeFn) -> None:
    model, version = manifest.model, manifest.version
    repo = repository_path(settings, instance)
    cand = f"{model}{CANDIDATE_SUFFIX}{version}"
    cdir = repo / cand
    shutil.rmtree(cdir, ignore_errors=True)
    try:
        src = repo / model / str(version)
        shutil.copytree(src, cdir / str(version), copy_function=os.link)
        meta = _meta_dir(settings, instance, model, version)
        for p in meta.iterdir():
            if p.is_file() and p.name not in ("config.pbtxt", MANIFEST_NAME):
                os.link(p, cdir / p.name)
        (cdir / "config.pbtxt").write_text(_render_config((meta / "config.pbtxt").read_text(), cand, [version]))
        try:
            admin.load(cand)
        except TritonUnreachable as e:
            raise SyncError("unreachable", str(e)) from None
        except TritonAdminError as e:
            raise SyncError("load", f"{model} v{version} does not load: {e}") from None
        if not admin.wait_model_ready(cand, version, timeout=settings.triton.startup_timeout_s):
            raise SyncError("load", f"{model} v{version} loaded but never became ready")
        try:
            smoke(admin, cand, version, cdir / str(version))
        except Exception as e:  # noqa: BLE001
            raise SyncError("smoke", f"{model} v{version} failed its smoke check: {e}") from None
    finally:
        try:
            admin.unload(cand)
        except TritonAdminError:
            pass
        shutil.rmtree(cdir, ignore_errors=True)


def roll_model(settings, instance, admin: TritonAdmin, state: MirrorState, manifest: Manifest, client,
               previous: int | None, smoke: SmokeFn | None = None) -> Outcome:
    """Bring `manifest`'s version live on one instance; on failure restore `previous`."""
    t0 = time.monotonic()
    model, version = manifest.model, manifest.version
    smoke = smoke or smoke_for(model)
    repo = repository_path(settings, instance)
    vdir = repo / model / str(version)
    config_path = repo / model / "config.pbtxt"
    old_config = config_path.read_text() if config_path.exists() else None
    switched = False
    try:
        pull_version(settings, instance, manifest, client, state)
        _candidate_check(settings, instance, admin, manifest, smoke)
        write_live_config(settings, instance, model, version)
        switched = True
        try:
            admin.load(model)
        except TritonUnreachable as e:
            raise SyncError("unreachable", str(e)) from None
        except TritonAdminError as e:
            raise SyncError("load", f"{model} v{version}: {e}") from None
        if not admin.wait_model_ready(model, version, timeout=settings.triton.startup_timeout_s):
            raise SyncError("load", f"{model} v{version} is not ready after the reload")
        state.set_status(instance.name, model, version, "loaded", content_sha256=manifest.content_sha256)
        try:
            smoke(admin, model, version, vdir)
        except Exception as e:  # noqa: BLE001
            raise SyncError("smoke", f"{model} v{version} failed its smoke check after going live: {e}") from None
    except SyncError as e:
        reason = str(e)
        if switched:
            reason += _restore(admin, config_path, old_config, model)
        if version != previous and e.kind != "unreachable":
            shutil.rmtree(vdir, ignore_errors=True)
        if e.kind == "unreachable":
            raise
        state.set_status(instance.name, model, version, "failed", reason, e.kind)
        return Outcome(instance.name, model, version, "failed", reason, previous, time.monotonic() - t0)
    if previous is not None and previous != version:
        state.set_status(instance.name, model, previous, "pulled", f"replaced by v{version}")
    state.set_status(instance.name, model, version, "live", content_sha256=manifest.content_sha256)
    return Outcome(instance.name, model, version, "live", "", previous, time.monotonic() - t0)


def _restore(admin: TritonAdmin, config_path: Path, old_config: str | None, model: str) -> str:
    try:
        if old_config is not None:
            _atomic_write(config_path, old_config)
            admin.load(model)
            return "; the previous version was reloaded and keeps serving"
        config_path.unlink(missing_ok=True)
        admin.unload(model)
        return "; there was no previous version, the model was unloaded"
    except TritonAdminError as e:
        return f"; restoring the previous version failed too: {e}"


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
    live one or the one named by config.pbtxt."""
    keep_n = max(1, settings.s3.keep_versions)
    repo = repository_path(settings, instance)
    removed = []
    if not repo.is_dir():
        return removed
    for model_dir in repo.iterdir():
        if not model_dir.is_dir() or CANDIDATE_SUFFIX in model_dir.name:
            continue
        try:
            validate_model_name(model_dir.name)
        except ManifestError:
            continue
        versions = local_versions(model_dir)
        protect = set(versions[-keep_n:])
        live = state.live_version(instance.name, model_dir.name)
        if live is not None:
            protect.add(live)
        cfg_v = live_config_version(settings, instance, model_dir.name)
        if cfg_v is not None:
            protect.add(cfg_v)
        for v in versions:
            if v in protect:
                continue
            shutil.rmtree(model_dir / str(v), ignore_errors=True)
            shutil.rmtree(_meta_dir(settings, instance, model_dir.name, v), ignore_errors=True)
            state.set_status(instance.name, model_dir.name, v, "retired", f"beyond the newest {keep_n} on the host")
            removed.append((model_dir.name, v))
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
