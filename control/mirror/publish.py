"""Publish model versions from the local repository to S3: ``s3://BUCKET/PREFIX/<model>/<version>/``.

One version is published in this order (see control/mirror/manifest.py for the layout):

1. build the manifest locally (sha256 + size of every file, config.pbtxt included);
2. if the version's manifest already exists: same content -> nothing to do; other content -> a
   clear error (published versions are immutable: publish a new version number);
3. take the version's publish lock (``_publish.lock``, created with If-None-Match: *). A lock of
   another publisher with *other* content refuses this publish, naming the holder; a lock with the
   *same* content (a publish that was killed) or an older one than `lock_stale_s` is taken over
   (If-Match on its ETag), so the next publish completes an interrupted one;
4. upload every file that S3 does not already hold with the same sha256 (object metadata
   ``sha256``): a file equal to one of an earlier version of the model is copied server-side,
   others are uploaded through boto3's transfer manager (multipart above
   ``s3.multipart_threshold_mb``) with a rich progress bar. Every write carries SSE;
5. write the manifest *last*, with If-None-Match: * -- of two concurrent publishers exactly one
   wins, the other gets PublishConflict. Readers (agents, the rollout) only see versions with a
   manifest, so an interrupted publish is invisible;
6. release the lock, apply S3 retention (never a version the desired state or an agent still uses).
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rich.progress import (  # noqa: PLC0415
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from control.adapters import s3 as s3x
from control.mirror.desired import DesiredStateError, DesiredStore, versions_in_use
from control.mirror.manifest import (
    CONTROL_DIR,
    LOCK_NAME,
    MANIFEST_NAME,
    PLACEHOLDER_NAME,
    Manifest,
    ManifestError,
    build_manifest,
    local_versions,
    parse_manifest,
    validate_model_name,
    validate_version,
    version_of,
)

log = logging.getLogger("triton_hybrid.mirror")


class PublishError(RuntimeError):
    """Publishing failed; the message names the model/version/object and what to do."""


class PublishConflict(PublishError):
    """Another publisher holds or won this version."""


@dataclass
class PublishResult:
    model: str
    version: int
    status: str  # "published" | "already-published"
    files: int = 0
    bytes_total: int = 0
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    copied_files: int = 0      # server-side copies from an earlier version (no bytes sent)
    copied_bytes: int = 0
    skipped_files: int = 0     # already in S3 with the same sha256
    skipped_bytes: int = 0
    seconds: float = 0.0
    manifest_key: str = ""
    content_sha256: str = ""
    retired: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _publisher_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _platform(config_text: str) -> str:
    m = re.search(r'^\s*platform\s*:\s*"([^"]+)"', config_text, re.M) or \
        re.search(r'^\s*backend\s*:\s*"([^"]+)"', config_text, re.M)
    return m.group(1) if m else ""


# Reading what S3 holds --------------------------------------------------------------------------

def list_models(client, s3cfg) -> list[str]:
    prefix = f"{s3cfg.prefix}/" if s3cfg.prefix else ""
    out = []
    for name in s3x.list_prefixes(client, s3cfg.bucket, prefix):
        if name == CONTROL_DIR:
            continue
        try:
            out.append(validate_model_name(name))
        except ManifestError:
            continue  # not ours; never build a path from it
    return sorted(out)


def candidate_versions(client, s3cfg, model: str) -> list[int]:
    """Version 'directories' in S3 (with or without a manifest)."""
    out = []
    prefix = s3x.model_prefix(s3cfg, model)
    for name in s3x.list_prefixes(client, s3cfg.bucket, prefix):
        v = version_of(name)
        if v is None:
            # A stray key (`ranker/abc/x`, `ranker/²/x`) is not a version: skip it, never fail the model.
            log.warning("ignoring s3://%s/%s%s/: not a version (positive integer, ASCII digits); remove it",
                        s3cfg.bucket, prefix, name)
            continue
        out.append(v)
    return sorted(out)


def read_manifest(client, s3cfg, model: str, version: int) -> Manifest | None:
    key = s3x.object_key(s3cfg, model, version, MANIFEST_NAME)
    raw = s3x.get_bytes(client, s3cfg.bucket, key)
    if raw is None:
        return None
    return parse_manifest(raw, model, version, source=f"s3://{s3cfg.bucket}/{key}")


def published_versions(client, s3cfg, model: str) -> list[int]:
    """Versions whose manifest exists (the only ones readers see), ascending."""
    out = []
    for v in candidate_versions(client, s3cfg, model):
        if s3x.head(client, s3cfg.bucket, s3x.object_key(s3cfg, model, v, MANIFEST_NAME)) is not None:
            out.append(v)
    return out


class PublishedIndex:
    """`published_versions` for a caller that asks every few seconds (the rollout tick): a version
    whose manifest was seen once stays published (versions are immutable), so each call costs one
    LIST per model plus a HEAD per version not confirmed yet; a version gone from the listing
    (retired) is dropped."""

    def __init__(self, client, s3cfg):
        self.client, self.s3cfg = client, s3cfg
        self._seen: dict[str, set[int]] = {}

    def __call__(self, model: str) -> list[int]:
        listed = candidate_versions(self.client, self.s3cfg, model)
        seen = self._seen.get(model, set()) & set(listed)
        for v in listed:
            if v not in seen and s3x.head(self.client, self.s3cfg.bucket,
                                          s3x.object_key(self.s3cfg, model, v, MANIFEST_NAME)) is not None:
                seen.add(v)
        self._seen[model] = seen
        return sorted(seen)


# Publishing -------------------------------------------------------------------------------------

def _local_path(model_dir: Path, version: int, entry) -> Path | None:
    if entry.scope == "model":
        return model_dir / entry.path
    if entry.path == PLACEHOLDER_NAME and not (model_dir / str(version) / PLACEHOLDER_NAME).exists():
        return None
    return model_dir / str(version) / entry.path


def _acquire_lock(client, s3cfg, lock_key: str, me: dict, lock_stale_s: float, break_lock: bool) -> None:
    body = json.dumps(me).encode()
    bucket = s3cfg.bucket
    try:
        client.put_object(Bucket=bucket, Key=lock_key, Body=body, IfNoneMatch="*", **s3x.sse_args(s3cfg))
        return
    except Exception as e:  # noqa: BLE001
        err = s3x.describe(e, bucket, lock_key)
        if not isinstance(err, s3x.PreconditionFailed):
            raise err from None
    try:
        obj = client.get_object(Bucket=bucket, Key=lock_key)
        etag, holder = obj["ETag"], json.loads(obj["Body"].read() or b"{}")
    except Exception as e:  # noqa: BLE001 - the lock vanished meanwhile: try once more from scratch
        if s3x.is_not_found(e):
            return _acquire_lock(client, s3cfg, lock_key, me, lock_stale_s, break_lock)
        raise s3x.describe(e, bucket, lock_key) from None
    age = time.time() - float(holder.get("started", 0))
    same = holder.get("content_sha256") == me["content_sha256"]
    if not (same or age > lock_stale_s or break_lock):
        raise PublishConflict(
            f"{me['model']} version {me['version']} is being published by {holder.get('publisher', '?')} since "
            f"{time.strftime('%H:%M:%S', time.localtime(float(holder.get('started', 0))))} ({age:.0f}s ago) with other "
            f"content (s3://{bucket}/{lock_key}). Wait for it, publish another version number, or if that publisher "
            f"died rerun with --break-lock")
    try:
        client.put_object(Bucket=bucket, Key=lock_key, Body=body, IfMatch=etag, **s3x.sse_args(s3cfg))
    except Exception as e:  # noqa: BLE001
        err = s3x.describe(e, bucket, lock_key)
        if isinstance(err, s3x.PreconditionFailed):
            raise PublishConflict(f"{me['model']} version {me['version']}: another publisher took the publish lock "
                                  f"s3://{bucket}/{lock_key} at the same moment; retry") from None
        raise err from None


def _release_lock(client, s3cfg, lock_key: str, me: dict) -> None:
    try:
        raw = s3x.get_bytes(client, s3cfg.bucket, lock_key)
        if raw is not None and json.loads(raw).get("publisher") == me["publisher"]:
            client.delete_object(Bucket=s3cfg.bucket, Key=lock_key)
    except Exception:  # noqa: BLE001 - a leftover lock with our content is taken over next time
        pass


def _prior_objects(client, s3cfg, model: str, version: int) -> dict[str, tuple[str, int, str]]:
    """sha256 -> (key, size, ETag at publish) of the files of earlier published versions in S3."""
    index: dict[str, tuple[str, int, str]] = {}
    for v in published_versions(client, s3cfg, model):
        if v == version:
            continue
        try:
            m = read_manifest(client, s3cfg, model, v)
        except ManifestError:
            continue
        if m is None:
            continue
        for f in m.files:
            if f.etag:  # only objects whose published state we can check before copying them
                index[f.sha256] = (s3x.object_key(s3cfg, model, v, f.path), f.size, f.etag)
    return index


class _Progress:
    def __init__(self, enabled: bool, total: int, label: str):
        self.bar = None
        if enabled and total > 0:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task(label, total=total)
            self.bar.start()

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def publish_version(settings, repo_dir: str | Path, model: str, version: int | None = None, *,
                    progress: bool = False, client=None, lock_stale_s: float = 900.0,
                    break_lock: bool = False, retention: bool = True) -> PublishResult:
    """Publish `repo_dir/<model>/<version>` (newest local version by default) to S3."""
    s3cfg = settings.s3
    model = validate_model_name(model)
    model_dir = Path(repo_dir) / model
    if not model_dir.is_dir():
        raise PublishError(f"{model_dir} does not exist; build the repository first (`triton-hybrid repo build`)")
    if version is None:
        versions = local_versions(model_dir)
        if not versions:
            raise PublishError(f"{model_dir} has no version directory (1/, 2/, ...); nothing to publish")
        version = versions[-1]
    version = validate_version(version)
    t0 = time.monotonic()
    me_id = _publisher_id()
    try:
        manifest = build_manifest(model_dir, version, publisher=me_id)
    except ManifestError as e:
        raise PublishError(str(e)) from None
    manifest.platform = _platform((model_dir / "config.pbtxt").read_text(errors="replace"))
    client = client or s3x.make_client(s3cfg)
    bucket = s3cfg.bucket
    s3x.ensure_bucket(client, s3cfg)
    manifest_key = s3x.object_key(s3cfg, model, version, MANIFEST_NAME)
    result = PublishResult(model, version, "published", files=len(manifest.files), bytes_total=manifest.total_bytes,
                           manifest_key=manifest_key, content_sha256=manifest.content_sha256)

    existing = _existing_manifest(client, s3cfg, model, version)
    if existing is not None:
        if existing.content_sha256 != manifest.content_sha256:
            raise PublishConflict(
                f"s3://{bucket}/{manifest_key}: {model} version {version} is already published with other content "
                f"(by {existing.publisher or '?'}); published versions are immutable, publish a new version number")
        result.status = "already-published"
        result.skipped_files, result.skipped_bytes = len(manifest.files), manifest.total_bytes
        result.seconds = time.monotonic() - t0
        return result

    lock_key = s3x.object_key(s3cfg, model, version, LOCK_NAME)
    me = {"publisher": me_id, "started": time.time(), "content_sha256": manifest.content_sha256,
          "model": model, "version": version}
    _acquire_lock(client, s3cfg, lock_key, me, lock_stale_s, break_lock)
    ok = False
    try:
        _upload_files(settings, client, model_dir, manifest, result, progress)
        try:
            client.put_object(Bucket=bucket, Key=manifest_key, Body=manifest.to_json().encode(),
                              ContentType="application/json", IfNoneMatch="*", **s3x.sse_args(s3cfg))
        except Exception as e:  # noqa: BLE001
            err = s3x.describe(e, bucket, manifest_key)
            if isinstance(err, s3x.PreconditionFailed):
                winner = _existing_manifest(client, s3cfg, model, version)
                same = winner is not None and winner.content_sha256 == manifest.content_sha256
                raise PublishConflict(
                    f"s3://{bucket}/{manifest_key}: another publisher ({winner.publisher if winner else '?'}) completed "
                    f"{model} version {version} first ({'same' if same else 'different'} content); this publish lost "
                    f"and changed nothing. {'Nothing to do.' if same else 'Publish a new version number.'}") from None
            raise PublishError(f"{model} version {version}: writing the manifest failed: {err}") from None
        ok = True
    finally:
        if ok:
            _release_lock(client, s3cfg, lock_key, me)
    if retention:
        result.retired = apply_s3_retention(settings, model, client=client)
    result.seconds = time.monotonic() - t0
    return result


def _existing_manifest(client, s3cfg, model, version) -> Manifest | None:
    try:
        return read_manifest(client, s3cfg, model, version)
    except ManifestError as e:
        raise PublishError(f"{e}; the published manifest is damaged: inspect it, delete the version's objects and "
                           "publish again") from None


def _upload_files(settings, client, model_dir: Path, manifest: Manifest, result: PublishResult, progress: bool) -> None:
    s3cfg = settings.s3
    bucket = s3cfg.bucket
    sse = s3x.sse_args(s3cfg)
    prior = _prior_objects(client, s3cfg, manifest.model, manifest.version)
    etags: dict = {}  # entry -> the object's ETag now, recorded in the manifest
    plan = []
    for entry in manifest.files:
        key = s3x.object_key(s3cfg, manifest.model, manifest.version, entry.path)
        h = s3x.head(client, bucket, key)
        if h is not None and h.get("Metadata", {}).get("sha256") == entry.sha256 \
                and int(h.get("ContentLength", -1)) == entry.size:
            etags[entry] = h.get("ETag", "")
            result.skipped_files += 1
            result.skipped_bytes += entry.size
            continue
        plan.append((entry, key))
    to_send = sum(e.size for e, _ in plan if e.sha256 not in prior)
    bar = _Progress(progress, to_send, f"{manifest.model} v{manifest.version}")
    try:
        for entry, key in plan:
            meta = {"sha256": entry.sha256}
            if entry.sha256 in prior and prior[entry.sha256][1] == entry.size:
                src, _, src_etag = prior[entry.sha256]
                try:
                    # A source altered since its publish (tampered) is not copied; the file is
                    # uploaded from the local repository instead. The HEAD check works on every
                    # S3-compatible store (moto ignores CopySourceIfMatch); IfMatch closes the
                    # race on AWS S3.
                    if (s3x.head(client, bucket, src) or {}).get("ETag") != src_etag:
                        raise ValueError(f"{src} changed since it was published")
                    done = client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": src},
                                              CopySourceIfMatch=src_etag, MetadataDirective="REPLACE",
                                              Metadata=meta, **sse)
                    etags[entry] = done["CopyObjectResult"]["ETag"]
                    result.copied_files += 1
                    result.copied_bytes += entry.size
                    continue
                except Exception:  # noqa: BLE001 - retired or altered source: upload instead
                    pass
            local = _local_path(model_dir, manifest.version, entry)
            try:
                if local is None:
                    etags[entry] = client.put_object(Bucket=bucket, Key=key, Body=b"", Metadata=meta, **sse)["ETag"]
                else:
                    client.upload_file(str(local), bucket, key, ExtraArgs={**sse, "Metadata": meta},
                                       Config=s3x.transfer_config(s3cfg), Callback=bar.advance)
                    etags[entry] = client.head_object(Bucket=bucket, Key=key)["ETag"]
            except Exception as e:  # noqa: BLE001
                raise PublishError(f"uploading {local or entry.path} to s3://{bucket}/{key} failed: "
                                   f"{s3x.describe(e, bucket, key)}; rerun the publish, it resumes where it stopped") from None
            result.uploaded_files += 1
            result.uploaded_bytes += entry.size
    finally:
        bar.close()
    manifest.files = [replace(f, etag=etags.get(f, f.etag)) for f in manifest.files]


def apply_s3_retention(settings, model: str, client=None) -> list[int]:
    """Delete published versions beyond the newest `s3.keep_versions`, never one in use: stable,
    canary, or reported live/targeted by any agent (all read from S3, so a lost control-plane
    database changes nothing). When the desired state cannot be read, nothing is deleted. The
    manifest goes first: the version disappears for readers before its files do."""
    s3cfg = settings.s3
    keep_n = max(1, s3cfg.keep_versions)
    client = client or s3x.make_client(s3cfg)
    versions = published_versions(client, s3cfg, model)
    if len(versions) <= keep_n:
        return []
    store = DesiredStore(client, s3cfg)
    try:
        statuses, _ = store.statuses()
        in_use = versions_in_use(store.read().state, statuses, model)
    except (DesiredStateError, s3x.S3Error) as e:
        log.warning("S3 retention of %s skipped: what is in use is unknown (%s)", model, e)
        return []
    keep = set(versions[-keep_n:]) | in_use
    retired = []
    for v in versions:
        if v in keep:
            continue
        vp = s3x.version_prefix(s3cfg, model, v)
        s3x.delete_keys(client, s3cfg.bucket, [vp + MANIFEST_NAME])
        s3x.delete_keys(client, s3cfg.bucket, s3x.list_keys(client, s3cfg.bucket, vp))
        log.info("retired %s v%d from S3 (beyond the newest %d versions)", model, v, keep_n)
        retired.append(v)
    return retired


def repository_models(repo_dir: Path) -> list[str]:
    """Models of a local repository, step models first and ensembles last."""
    models = []
    for d in sorted(Path(repo_dir).iterdir()):
        if d.is_dir() and (d / "config.pbtxt").exists():
            models.append(d.name)
    return sorted(models, key=lambda m: (_platform((Path(repo_dir) / m / "config.pbtxt").read_text(errors="replace"))
                                         == "ensemble", m))


def publish_repository(settings, repo_dir: str | Path, progress: bool = True, client=None,
                       models: list[str] | None = None) -> list[PublishResult]:
    """Publish every model's newest local version that S3 does not hold yet (idempotent)."""
    repo_dir = Path(repo_dir)
    if not repo_dir.is_dir():
        raise PublishError(f"{repo_dir} does not exist; build the repository first (`triton-hybrid repo build`)")
    client = client or s3x.make_client(settings.s3)
    s3x.ensure_bucket(client, settings.s3)
    return [publish_version(settings, repo_dir, m, progress=progress, client=client)
            for m in (models or repository_models(repo_dir))]
