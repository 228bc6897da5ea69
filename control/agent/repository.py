"""The host's model repository, as Triton serves it and as the agent keeps it.

    <repository_dir>/<model>/config.pbtxt            the live config: version_policy names the live version only
    <repository_dir>/<model>/<version>/...           a verified version (only complete ones are renamed in)
    <repository_dir>/<model>__candidate_v<N>/        a version under test (hard links), never called by clients
    <state_dir>/meta/<model>/<version>/              that version's model-level files + its _manifest.json
    <state_dir>/staging/<model>/<version>-<sha>/     downloads in progress (resumed after a restart)
    <state_dir>/failed.json                          versions that failed on this host, with the reason

The state directory sits outside the repository (Triton would list it as a model) and on the same
filesystem (renames are atomic only there).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from google.protobuf import text_format

from control.mirror.manifest import (
    MANIFEST_NAME,
    ManifestError,
    local_versions,
    validate_model_name,
)

CANDIDATE_SUFFIX = "__candidate_v"


class RepositoryError(RuntimeError):
    """The host's directories are unusable; the message names them and what to do."""


def _proto(text: str):
    # protobuf + tritonclient.grpc deferred: heavy, and only needed when a config is touched.
    from tritonclient.grpc import model_config_pb2  # noqa: PLC0415

    cfg = model_config_pb2.ModelConfig()
    text_format.Parse(text, cfg)
    return cfg


def parse_config(path: Path):
    return _proto(Path(path).read_text())


def render_config(config_text: str, name: str, versions: list[int]) -> str:
    """`config_text` renamed to `name`, serving exactly `versions`."""
    cfg = _proto(config_text)
    cfg.name = name
    cfg.version_policy.Clear()
    cfg.version_policy.specific.versions[:] = sorted(versions)
    return text_format.MessageToString(cfg)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def ensemble_using(root: Path, model: str):
    """(ensemble config, its live version dir) of an ensemble in the repository `root` that has `model`
    as a step and a stored smoke request; (None, None) when there is none."""
    for cfg_path in sorted(Path(root).glob("*/config.pbtxt")):
        if CANDIDATE_SUFFIX in cfg_path.parent.name:
            continue
        try:
            cfg = parse_config(cfg_path)
        except Exception:  # noqa: BLE001 - not parseable: not ours to smoke with
            continue
        if cfg.platform != "ensemble" or not any(st.model_name == model for st in cfg.ensemble_scheduling.step):
            continue
        versions = list(cfg.version_policy.specific.versions)
        if versions and (cfg_path.parent / str(max(versions)) / "smoke.json").is_file():
            return cfg, cfg_path.parent / str(max(versions))
    return None, None


@contextmanager
def file_lock(path: Path, blocking: bool = True):
    """An exclusive flock on `path` (made if absent); yields False at once when held and not blocking."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class HostRepository:
    def __init__(self, repository_dir: str | Path, state_dir: str | Path):
        self.root = Path(repository_dir)
        self.state = Path(state_dir)

    @classmethod
    def for_agent(cls, cfg) -> "HostRepository":
        return cls(cfg.repository_dir, cfg.state_path)

    def ensure(self) -> "HostRepository":
        """Create both directories; refuse a state dir on another filesystem or inside the repository."""
        for d, what in ((self.root, "agent.repository_dir"), (self.state, "agent.state_dir")):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RepositoryError(f"{what} {d} cannot be created ({e.strerror}); fix the path or its "
                                      "permissions") from None
        root, state = self.root.resolve(), self.state.resolve()
        if root == state or root in state.parents:
            raise RepositoryError(f"agent state dir {self.state} is inside the repository {self.root}: Triton would "
                                  "list it as a model. Set agent.state_dir outside it (default: <repository_dir>.agent)")
        if os.stat(root).st_dev != os.stat(state).st_dev:
            raise RepositoryError(f"agent state dir {self.state} and repository {self.root} are on different "
                                  "filesystems: a verified version could not be renamed into place atomically. "
                                  "Put agent.state_dir on the repository's volume")
        for d in (self.staging_root, self.state / "meta", self.trash_root):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # Paths -------------------------------------------------------------------------------------
    def model_dir(self, model: str) -> Path:
        return self.root / validate_model_name(model)

    def version_dir(self, model: str, version: int) -> Path:
        return self.model_dir(model) / str(int(version))

    def config_path(self, model: str) -> Path:
        return self.model_dir(model) / "config.pbtxt"

    def meta_dir(self, model: str, version: int) -> Path:
        return self.state / "meta" / validate_model_name(model) / str(int(version))

    @property
    def staging_root(self) -> Path:
        return self.state / "staging"

    @property
    def trash_root(self) -> Path:
        return self.state / "trash"

    def staging_dir(self, model: str, version: int, content_sha256: str) -> Path:
        """Deterministic per content, so a restarted agent finds and resumes its own downloads."""
        return self.staging_root / validate_model_name(model) / f"{int(version)}-{content_sha256[:16]}"

    def discard(self, path: Path) -> None:
        """Remove a directory: renamed away first, so nobody sees it half-deleted."""
        if not path.exists():
            return
        trash = self.trash_root / f"{path.name}.{uuid.uuid4().hex[:8]}"
        self.trash_root.mkdir(parents=True, exist_ok=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def lock(self, blocking: bool = True):
        """One writer of this repository at a time (a second agent, or `agent --once` next to a running one)."""
        return file_lock(self.state / "agent.lock", blocking)

    # What is on disk ---------------------------------------------------------------------------
    def models(self) -> list[str]:
        out = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            if not d.is_dir() or CANDIDATE_SUFFIX in d.name:
                continue
            try:
                out.append(validate_model_name(d.name))
            except ManifestError:
                continue
        return out

    def on_disk_versions(self, model: str) -> set[int]:
        """Versions that were renamed in complete (their directory and their manifest exist)."""
        mdir = self.model_dir(model)
        if not mdir.is_dir():
            return set()
        return {v for v in local_versions(mdir) if (self.meta_dir(model, v) / MANIFEST_NAME).is_file()}

    def live_config_version(self, model: str) -> int | None:
        p = self.config_path(model)
        if not p.exists():
            return None
        try:
            cfg = parse_config(p)
        except Exception:  # noqa: BLE001 - protobuf's ParseError; an unreadable config names no version
            return None
        versions = list(cfg.version_policy.specific.versions)
        return max(versions) if versions else None

    def is_ensemble(self, model: str) -> bool:
        p = self.config_path(model)
        try:
            return p.exists() and parse_config(p).platform == "ensemble"
        except Exception:  # noqa: BLE001 - see live_config_version
            return False

    # The live config ---------------------------------------------------------------------------
    def read_config(self, model: str) -> str | None:
        p = self.config_path(model)
        return p.read_text() if p.exists() else None

    def restore_config(self, model: str, text: str | None) -> None:
        if text is None:
            self.config_path(model).unlink(missing_ok=True)
        else:
            atomic_write(self.config_path(model), text)

    def write_live_config(self, model: str, version: int) -> None:
        """`<repo>/<model>/config.pbtxt` = the version's config, serving exactly that version (atomic)."""
        meta = self.meta_dir(model, version)
        mdir = self.model_dir(model)
        mdir.mkdir(parents=True, exist_ok=True)
        # Other model-level files of that version (labels ...) first, so the config never names a
        # version whose files are not in place.
        for p in meta.iterdir():
            if p.is_file() and p.name not in ("config.pbtxt", MANIFEST_NAME):
                tmp = mdir / f".{p.name}.{uuid.uuid4().hex[:8]}"
                shutil.copy2(p, tmp)
                os.replace(tmp, mdir / p.name)
        atomic_write(mdir / "config.pbtxt", render_config((meta / "config.pbtxt").read_text(), model, [version]))

    # Candidates --------------------------------------------------------------------------------
    def candidate_name(self, model: str, version: int) -> str:
        return f"{model}{CANDIDATE_SUFFIX}{int(version)}"

    def build_candidate(self, model: str, version: int) -> tuple[str, Path]:
        """`<model>__candidate_v<N>` serving the version (hard links: no copy); returns (name, version dir)."""
        name = self.candidate_name(model, version)
        cdir = self.root / name
        shutil.rmtree(cdir, ignore_errors=True)
        shutil.copytree(self.version_dir(model, version), cdir / str(version), copy_function=os.link)
        meta = self.meta_dir(model, version)
        for p in meta.iterdir():
            if p.is_file() and p.name not in ("config.pbtxt", MANIFEST_NAME):
                os.link(p, cdir / p.name)
        (cdir / "config.pbtxt").write_text(render_config((meta / "config.pbtxt").read_text(), name, [version]))
        return name, cdir / str(version)

    def candidates(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if d.is_dir() and CANDIDATE_SUFFIX in d.name)

    def remove_candidate(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)

    def ensemble_using(self, model: str):
        return ensemble_using(self.root, model)

    # Versions ----------------------------------------------------------------------------------
    def remove_version(self, model: str, version: int) -> None:
        self.discard(self.version_dir(model, version))
        self.discard(self.meta_dir(model, version))

    def apply_retention(self, keep: int, protect: dict[str, set[int]] | None = None) -> list[tuple[str, int]]:
        """Keep the newest `keep` version directories per model; never the one config.pbtxt names nor
        those in `protect` (e.g. the desired target). Returns what was removed."""
        keep = max(1, keep)
        removed = []
        for model in self.models():
            versions = local_versions(self.model_dir(model))
            spare = set(versions[-keep:]) | set((protect or {}).get(model, ()))
            live = self.live_config_version(model)
            if live is not None:
                spare.add(live)
            for v in versions:
                if v not in spare:
                    self.remove_version(model, v)
                    removed.append((model, v))
        return removed


class FailureBook:
    """Versions that failed on this host (a file in the state dir, so a restart does not retry a
    broken version forever). Versions are immutable: the fix for a failed one is a new version."""
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "failed.json"
        try:
            self._data: dict[str, dict[str, dict]] = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            self._data = {}

    def versions(self, model: str) -> set[int]:
        return {int(v) for v in self._data.get(model, {})}

    def get(self, model: str, version: int) -> dict | None:
        return self._data.get(model, {}).get(str(version))

    def record(self, model: str, version: int, kind: str, reason: str, at: float) -> None:
        self._data.setdefault(model, {})[str(version)] = {"kind": str(kind), "reason": reason, "at": at}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(self._data, indent=1, sort_keys=True))

    def as_dict(self) -> dict:
        return json.loads(json.dumps(self._data))
