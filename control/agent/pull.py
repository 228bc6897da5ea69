"""Download one published version onto the host, verified, resumable, and invisible to Triton until complete.

Every file is streamed into `<staging>/<scope>/<path>.part`, never reading more than its manifest
size + 1 byte (a Range request caps what S3 sends, the loop what is read), so an oversized object is
refused as soon as it shows it is too big; then size and sha256 are checked and the file is renamed
to its final name. A restarted agent finds its staging directory (named after the version and its
content digest), keeps the verified files, and continues a `.part` file from its length. Only when
every file is verified is the version directory renamed into the repository; even there Triton does
not serve it until the live config names it (control/agent/loader.py).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from control.adapters import s3 as s3x
from control.agent.errors import AgentError, FailureKind
from control.agent.repository import HostRepository
from control.mirror.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    UnsafePathError,
    parse_manifest,
    safe_join,
    sha256_file,
)

log = logging.getLogger("triton_hybrid.agent.pull")
DEFAULT_CHUNK = 1024 * 1024


class Throttle:
    """Keeps the average download rate at or below `bytes_per_s` (None: no cap)."""

    def __init__(self, bytes_per_s: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate, self.clock, self.sleep = bytes_per_s, clock, sleep
        self.t0 = clock()
        self.sent = 0

    def take(self, n: int) -> None:
        if not self.rate:
            return
        self.sent += n
        ahead = self.sent / self.rate - (self.clock() - self.t0)
        if ahead > 0:
            self.sleep(ahead)


def _hash_prefix(path: Path) -> tuple["hashlib._Hash", int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(DEFAULT_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h, n


def download_verified(client, bucket: str, key: str, dest: Path, entry: FileEntry, *,
                      chunk_bytes: int = DEFAULT_CHUNK, throttle: Throttle | None = None,
                      on_bytes: Callable[[int], None] | None = None) -> None:
    """Make `dest` a verified copy of s3://bucket/key per `entry` (size, sha256); resume a `.part`."""
    if dest.is_file():
        if sha256_file(dest) == (entry.sha256, entry.size):
            return  # verified before a restart
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        have = part.stat().st_size if part.exists() else 0
        if have > entry.size:
            part.unlink()
            have = 0
        h, have = _hash_prefix(part) if have else (hashlib.sha256(), 0)
        resumed = have > 0
        if have < entry.size or entry.size == 0:
            h, have = _fetch(client, bucket, key, part, entry, h, have, chunk_bytes, throttle, on_bytes)
        if have > entry.size:
            part.unlink(missing_ok=True)
            raise AgentError(FailureKind.VERIFY, f"s3://{bucket}/{key}: larger than the {entry.size} bytes its manifest "
                                                 f"says; refused after reading {have} bytes. The object was replaced or "
                                                 "damaged; publish a new version. The previous version keeps serving")
        if have == entry.size and h.hexdigest() == entry.sha256:
            os.replace(part, dest)
            return
        part.unlink(missing_ok=True)
        if not (resumed and attempt == 1):
            break  # a fresh download that does not match: the object is wrong
        # A resumed file that does not match: the object may have changed under it; once from zero.
    raise AgentError(FailureKind.VERIFY, f"s3://{bucket}/{key}: checksum mismatch (got sha256 {h.hexdigest()[:16]}... "
                                         f"{have} bytes, manifest says {entry.sha256[:16]}... {entry.size} bytes); the "
                                         "object was tampered with or damaged. Refused; the previous version keeps serving")


def _fetch(client, bucket, key, part: Path, entry: FileEntry, h, have: int, chunk_bytes: int,
           throttle: Throttle | None, on_bytes):
    limit = entry.size + 1
    try:
        # An empty object has no byte 0: a Range on it is refused (416), so size-0 files read whole (capped below).
        rng = {"Range": f"bytes={have}-{entry.size}"} if entry.size else {}
        obj = client.get_object(Bucket=bucket, Key=key, **rng)
    except Exception as e:  # noqa: BLE001 - classified below
        if s3x.is_not_found(e):
            raise AgentError(FailureKind.VERIFY, f"s3://{bucket}/{key} is listed in the manifest but missing; the "
                                                 "version is incomplete, publish a new version") from None
        err = s3x.describe(e, bucket, key)
        kind = FailureKind.UNREACHABLE if isinstance(err, s3x.S3Unreachable) else FailureKind.VERIFY
        raise AgentError(kind, str(err)) from None
    body = obj["Body"]
    try:
        with open(part, "ab") as f:
            for chunk in body.iter_chunks(min(chunk_bytes, limit)):
                chunk = chunk[: limit - have]
                h.update(chunk)
                have += len(chunk)
                f.write(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
                if throttle is not None:
                    f.flush()
                    throttle.take(len(chunk))
                if have >= limit:
                    break
    except Exception as e:  # noqa: BLE001 - a broken connection: the .part is kept and resumed next time
        raise AgentError(FailureKind.UNREACHABLE,
                         f"s3://{bucket}/{key}: download interrupted ({type(e).__name__}); resumed next pass") from None
    finally:
        body.close()
    return h, have


def verify_local(repo: HostRepository, manifest: Manifest) -> list[str]:
    """Problems of the version on disk against its manifest (empty list = verified)."""
    vdir = repo.version_dir(manifest.model, manifest.version)
    meta = repo.meta_dir(manifest.model, manifest.version)
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
        if sha256_file(p) != (e.sha256, e.size):
            problems.append(f"{p} differs from the manifest")
    return problems


def has_verified_copy(repo: HostRepository, manifest: Manifest) -> bool:
    meta = repo.meta_dir(manifest.model, manifest.version) / MANIFEST_NAME
    if not (repo.version_dir(manifest.model, manifest.version).is_dir() and meta.is_file()):
        return False
    try:
        on_disk = parse_manifest(meta.read_text(), manifest.model, manifest.version)
    except ManifestError:
        return False
    return on_disk.content_sha256 == manifest.content_sha256 and not verify_local(repo, manifest)


def local_copies(repo: HostRepository, model: str, skip: int) -> dict[tuple[str, int], Path]:
    """{(sha256, size): path} of the files of the model's other versions on this host, as their
    manifests list them: a new version whose file is unchanged (the publisher copied it inside S3)
    gets a hard link instead of a download."""
    out: dict[tuple[str, int], Path] = {}
    for v in sorted(repo.on_disk_versions(model) - {skip}):
        try:
            m = parse_manifest((repo.meta_dir(model, v) / MANIFEST_NAME).read_text(), model, v)
        except (ManifestError, OSError):
            continue
        for e in m.files:
            base = repo.version_dir(model, v) if e.scope == "version" else repo.meta_dir(model, v)
            out[(e.sha256, e.size)] = base / e.path
    return out


def _link_verified(src: Path, dest: Path, e) -> bool:
    """Hard-link a local file the manifest entry describes, checked again (sha256, size) first."""
    try:
        if sha256_file(src) != (e.sha256, e.size):
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)
        os.link(src, dest)
        return True
    except OSError:
        return False


def pull_version(client, s3cfg, repo: HostRepository, manifest: Manifest, *, chunk_bytes: int = DEFAULT_CHUNK,
                 throttle: Throttle | None = None, on_bytes: Callable[[int], None] | None = None) -> bool:
    """Make `<repo>/<model>/<version>/` a verified copy of the published version. Returns True when
    files were downloaded, False when a verified copy was there already. Raises AgentError."""
    model, version = manifest.model, manifest.version
    if has_verified_copy(repo, manifest):
        return False
    vdir, meta = repo.version_dir(model, version), repo.meta_dir(model, version)
    stage = repo.staging_dir(model, version, manifest.content_sha256)
    for other in stage.parent.glob(f"{version}-*") if stage.parent.is_dir() else []:
        if other != stage:  # a download of other content for this version (republished after retention)
            shutil.rmtree(other, ignore_errors=True)
    have = local_copies(repo, model, version)
    try:
        for e in manifest.files:
            key = s3x.object_key(s3cfg, model, version, e.path)  # validates the path
            dest = safe_join(stage / ("version" if e.scope == "version" else "model"), e.path)
            src = have.get((e.sha256, e.size))
            if src is not None and _link_verified(src, dest, e):
                continue  # the same bytes are on this host already: no download
            download_verified(client, s3cfg.bucket, key, dest, e, chunk_bytes=chunk_bytes, throttle=throttle,
                              on_bytes=on_bytes)
    except UnsafePathError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise AgentError(FailureKind.VERIFY, f"{model} v{version}: {e}; refused") from None
    except AgentError as e:
        if e.kind != FailureKind.UNREACHABLE:
            shutil.rmtree(stage, ignore_errors=True)  # nothing worth resuming
        raise
    (stage / "model").mkdir(parents=True, exist_ok=True)
    (stage / "model" / MANIFEST_NAME).write_text(manifest.to_json())
    (stage / "version").mkdir(exist_ok=True)
    # Everything verified: make it visible (renames on one filesystem), metadata first.
    repo.discard(meta)
    meta.parent.mkdir(parents=True, exist_ok=True)
    os.rename(stage / "model", meta)
    repo.discard(vdir)
    vdir.parent.mkdir(parents=True, exist_ok=True)
    os.rename(stage / "version", vdir)
    shutil.rmtree(stage, ignore_errors=True)
    log.info("pulled %s v%d (%d files, %d bytes), verified", model, version, len(manifest.files), manifest.total_bytes)
    return True
