"""The manifest of one published model version: which files, their sha256 and size.

A version exists for readers only when its manifest object exists; the publisher writes it last
(conditionally, so exactly one of two concurrent publishers wins). Every path in a manifest, and
every key built from one, goes through `validate_relpath` first: a path that could escape the
model's directory on a host (``..``, absolute, backslash, empty segments) is refused.

Layout of one version in S3, under ``PREFIX/<model>/<version>/``:

- ``<relpath>`` for every file of the version directory (scope ``version``; on a host it lands
  in ``<repo>/<model>/<version>/<relpath>``);
- ``config.pbtxt`` (and any other model-level file, scope ``model``): the model's configuration
  as it was for this version; on a host it becomes ``<repo>/<model>/config.pbtxt`` when this
  version goes live (with a version policy naming it);
- ``.placeholder`` when the version directory is empty (an ensemble): S3 has no empty directories
  and Triton needs the version directory (DESIGN.md fact 3);
- ``_manifest.json``: this manifest, written last.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

FORMAT = 1
CONTROL_DIR = "_control"  # <prefix>/_control/: desired state and agent status (control/mirror/desired.py), not a model
MANIFEST_NAME = "_manifest.json"
LOCK_NAME = "_publish.lock"
PLACEHOLDER_NAME = ".placeholder"
RESERVED = {MANIFEST_NAME, LOCK_NAME}
CHUNK = 1024 * 1024
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ManifestError(ValueError):
    """A manifest, a path or a key is invalid; the message names it."""


class UnsafePathError(ManifestError):
    """A path or object key would escape the directory it belongs to."""


def validate_relpath(path: str, what: str = "path") -> str:
    """Return `path` if it is a safe relative POSIX path; raise UnsafePathError otherwise."""
    if not isinstance(path, str) or path == "":
        raise UnsafePathError(f"{what} is empty")
    if "\x00" in path:
        raise UnsafePathError(f"{what} {path!r} contains a NUL byte")
    if "\\" in path:
        raise UnsafePathError(f"{what} {path!r} contains a backslash; only '/'-separated relative paths are accepted")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise UnsafePathError(f"{what} {path!r} is absolute; it would escape the repository directory")
    for seg in path.split("/"):
        if seg == "":
            raise UnsafePathError(f"{what} {path!r} has an empty segment ('//' or a trailing '/')")
        if seg in (".", ".."):
            raise UnsafePathError(f"{what} {path!r} has a {seg!r} segment; it would escape the repository directory")
    return path


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not _MODEL_NAME.match(name) or ".." in name:
        raise UnsafePathError(f"model name {name!r} is not allowed (letters, digits, '_', '-', '.'; no '..')")
    return name


def validate_version(version) -> int:
    try:
        v = int(version)
    except (TypeError, ValueError):
        raise ManifestError(f"version {version!r} is not an integer") from None
    if v < 1 or str(v) != str(version).strip():
        raise ManifestError(f"version {version!r} must be a positive integer without leading zeros")
    return v


def safe_join(root: Path, relpath: str) -> Path:
    """`root / relpath`, after validation and a resolve() check that the result stays in root."""
    validate_relpath(relpath)
    root = Path(root)
    target = root.joinpath(*PurePosixPath(relpath).parts)
    base = root.resolve()
    resolved = target.resolve()
    if resolved != base and base not in resolved.parents:
        raise UnsafePathError(f"path {relpath!r} resolves outside {root} (a symlink?)")
    return target


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class FileEntry:
    path: str          # relative to the version directory (scope "version") or the model dir ("model")
    sha256: str
    size: int
    scope: str = "version"
    # The S3 ETag the object had when this manifest was written; a later server-side copy of the
    # object is made only if it still has it (CopySourceIfMatch), so a tampered object is never
    # copied into a new version. Not part of content_sha256.
    etag: str = ""

    @property
    def key_suffix(self) -> str:
        """The part of the object key after ``PREFIX/<model>/<version>/``."""
        return self.path


@dataclass
class Manifest:
    model: str
    version: int
    files: list[FileEntry]
    created: float = field(default_factory=time.time)
    publisher: str = ""
    platform: str = ""
    format: int = FORMAT

    @property
    def content_sha256(self) -> str:
        """A digest of the file list alone: two manifests with the same files have the same one."""
        canon = json.dumps([[f.scope, f.path, f.sha256, f.size] for f in sorted(self.files, key=_order)],
                           separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def version_files(self) -> list[FileEntry]:
        return [f for f in self.files if f.scope == "version"]

    def model_files(self) -> list[FileEntry]:
        return [f for f in self.files if f.scope == "model"]

    def to_json(self) -> str:
        return json.dumps({
            "format": self.format, "model": self.model, "version": self.version, "created": self.created,
            "publisher": self.publisher, "platform": self.platform, "content_sha256": self.content_sha256,
            "files": [{"path": f.path, "scope": f.scope, "sha256": f.sha256, "size": f.size,
                       **({"etag": f.etag} if f.etag else {})}
                      for f in sorted(self.files, key=_order)],
        }, indent=1, sort_keys=True)


def _order(f: FileEntry):
    return (f.scope, f.path)


def parse_manifest(raw: bytes | str, model: str | None = None, version: int | None = None,
                   source: str = "manifest") -> Manifest:
    """Parse and validate a manifest; every path is checked before anyone uses it."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{source}: unknown manifest format {data.get('format') if isinstance(data, dict) else data!r}")
    try:
        m = Manifest(model=validate_model_name(data["model"]), version=validate_version(data["version"]),
                     files=[], created=float(data.get("created", 0)), publisher=str(data.get("publisher", "")),
                     platform=str(data.get("platform", "")))
        seen = set()
        for f in data["files"]:
            scope = f.get("scope", "version")
            if scope not in ("version", "model"):
                raise ManifestError(f"{source}: file {f.get('path')!r} has unknown scope {scope!r}")
            path = validate_relpath(f["path"], f"{source}: file path")
            if path in RESERVED:
                raise ManifestError(f"{source}: file path {path!r} is reserved")
            if path in seen:
                raise ManifestError(f"{source}: file path {path!r} is listed twice")
            seen.add(path)
            sha = str(f["sha256"]).lower()
            if not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise ManifestError(f"{source}: file {path!r} has an invalid sha256 {sha!r}")
            size = int(f["size"])
            if size < 0:
                raise ManifestError(f"{source}: file {path!r} has a negative size")
            m.files.append(FileEntry(path, sha, size, scope, str(f.get("etag", ""))))
    except (KeyError, TypeError) as e:
        raise ManifestError(f"{source}: missing or malformed field {e}") from None
    if model is not None and m.model != model:
        raise ManifestError(f"{source} is for model {m.model!r}, expected {model!r}")
    if version is not None and m.version != version:
        raise ManifestError(f"{source} is for version {m.version}, expected {version}")
    if not m.version_files():
        raise ManifestError(f"{source}: the version has no files (an empty version needs its placeholder)")
    if "content_sha256" in data and data["content_sha256"] != m.content_sha256:
        raise ManifestError(f"{source}: content_sha256 does not match its file list (edited by hand?)")
    return m


def build_manifest(model_dir: Path, version: int, publisher: str = "") -> Manifest:
    """The manifest of `model_dir/<version>/` plus the model-level files (config.pbtxt ...).

    An empty version directory (an ensemble) gets a `.placeholder` entry. Symlinks that point
    outside the model directory and reserved names are refused with the file named.
    """
    model_dir = Path(model_dir)
    model = validate_model_name(model_dir.name)
    version = validate_version(version)
    vdir = model_dir / str(version)
    if not vdir.is_dir():
        raise ManifestError(f"{vdir} does not exist; nothing to publish for {model} version {version}")
    files: list[FileEntry] = []
    for p in sorted(vdir.rglob("*")):
        if p.is_dir() or "__pycache__" in p.parts:
            continue
        rel = p.relative_to(vdir).as_posix()
        _check_local(p, model_dir, rel)
        sha, size = sha256_file(p)
        files.append(FileEntry(rel, sha, size, "version"))
    if not files:
        files.append(FileEntry(PLACEHOLDER_NAME, EMPTY_SHA256, 0, "version"))
    version_paths = {f.path for f in files}
    for p in sorted(model_dir.iterdir()):
        if p.is_file():
            rel = p.name
            _check_local(p, model_dir, rel)
            if rel in version_paths:
                raise ManifestError(f"{p}: a model-level file and a file of version {version} are both named "
                                    f"{rel!r}; they would share one S3 key. Rename one of them")
            sha, size = sha256_file(p)
            files.append(FileEntry(rel, sha, size, "model"))
    if not any(f.path == "config.pbtxt" and f.scope == "model" for f in files):
        raise ManifestError(f"{model_dir}/config.pbtxt is missing; Triton needs it to load {model}")
    return Manifest(model=model, version=version, files=files, publisher=publisher)


def _check_local(p: Path, model_dir: Path, rel: str) -> None:
    validate_relpath(rel, f"file {p}")
    if rel in RESERVED:
        raise ManifestError(f"{p}: the name {rel!r} is reserved for the mirror; rename the file")
    if p.is_symlink():
        target = p.resolve()
        if model_dir.resolve() not in target.parents:
            raise UnsafePathError(f"{p} is a symlink to {target}, outside {model_dir}; copy the file instead")


_VERSION_NAME = re.compile(r"[1-9][0-9]*")


def version_of(name: str) -> int | None:
    """The version a directory (or S3 prefix) name stands for, or None when it is not one.
    ASCII digits only: `str.isdigit()` accepts '²', which `int()` then refuses."""
    return int(name) if _VERSION_NAME.fullmatch(name) else None


def local_versions(model_dir: Path) -> list[int]:
    return sorted(v for p in Path(model_dir).iterdir() if p.is_dir() and (v := version_of(p.name)) is not None)
