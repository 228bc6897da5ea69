"""Versioned export directories and their metadata.

An export is `<root>/<N>/` with N = 1, 2, ...; it is written into a temporary directory inside the
root and renamed into place at the end, so a version directory is either complete or absent.
Versions are never overwritten. `metadata.json` lists sha256 and size of every other file."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .data import read_manifest, sha256_file
from .errors import ExportError, IntegrityError, VersionExistsError

DEFAULT_ROOT = Path("artifacts/exports")
METADATA = "metadata.json"
_VERSION = re.compile(r"^[1-9][0-9]*$")


def versions(root: Path | str = DEFAULT_ROOT) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and _VERSION.match(p.name))


def next_version(root: Path | str = DEFAULT_ROOT) -> int:
    v = versions(root)
    return (v[-1] + 1) if v else 1


def latest_export(root: Path | str = DEFAULT_ROOT) -> Path:
    v = versions(root)
    if not v:
        raise ExportError(f"no export found under {root}; run `triton-hybrid export` first")
    return Path(root) / str(v[-1])


def check_version_free(root: Path | str, version: int) -> Path:
    if version < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    final = Path(root) / str(version)
    if final.exists():
        raise VersionExistsError(f"export version {version} exists already at {final}; versions are never "
                                 f"overwritten (omit --version to take the next one)")
    return final


STALE_TEMP_SECONDS = 6 * 3600


def remove_stale_temp_dirs(root: Path | str, older_than_s: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Temp dirs of runs that were killed (SIGKILL, power loss) are removed once they are old;
    recent ones may belong to an export still running."""
    gone = []
    root = Path(root)
    if root.is_dir():
        for p in root.glob(".tmp-export-*"):
            if p.is_dir() and time.time() - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def make_temp_dir(root: Path | str) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(root)
    return Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=root))


def file_records(d: Path) -> dict[str, dict]:
    return {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(Path(d).iterdir()) if p.is_file() and p.name != METADATA}


def write_metadata(d: Path, meta: dict) -> dict:
    meta = dict(meta)
    meta["files"] = file_records(d)
    (Path(d) / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def publish(tmp: Path, root: Path | str, version: int | None) -> Path:
    """Rename the finished temp dir to its version directory (never replacing an existing one)."""
    root = Path(root)
    if version is None:
        version = next_version(root)
    final = check_version_free(root, version)
    try:
        os.rename(tmp, final)   # same filesystem (tmp is inside root): atomic
    except OSError as e:
        raise VersionExistsError(f"could not publish export version {version} at {final}: {e}") from None
    return final


def discard(tmp: Path | None) -> None:
    if tmp is not None and Path(tmp).exists():
        shutil.rmtree(tmp, ignore_errors=True)


def load_metadata(d: Path | str, verify: bool = True) -> dict:
    """metadata.json of an export; with verify, every listed file must exist and match its sha256/size."""
    d = Path(d)
    mp = d / METADATA
    meta, files = read_manifest(mp, IntegrityError, f"{mp} is missing: {d} is not an export directory")
    if verify:
        for name, rec in files.items():
            p = d / name
            if not p.is_file():
                raise IntegrityError(f"{p} is listed in {METADATA} but missing")
            if p.stat().st_size != rec["size"] or sha256_file(p) != rec["sha256"]:
                raise IntegrityError(f"{p} does not match the sha256/size recorded in {METADATA}")
    return meta


def source_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
