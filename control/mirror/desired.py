"""Desired state and agent status in the S3 mirror, next to the versions both sites already read.

    <prefix>/_control/desired.json           what every Triton host should serve (one writer at a time)
    <prefix>/_control/status/<instance>.json what one host's agent serves now (written by that agent only)

The desired state is durable, survives the loss of either site, and lets a new or restarted host
converge with no control plane running. Every write is conditional: the first with If-None-Match: *,
every later one with If-Match on the ETag that was read, so two writers never overwrite each other;
a lost race is re-read and re-decided (`DesiredStore.update` takes a pure function of the state).
Each object carries the sha256 of its body in its metadata and is checked before use: a damaged or
stray object is refused with an error naming the key, never half-read.

Per model: `stable` (the version every instance serves), `canary` (a version and the instances that
serve it instead of stable, during a rollout), `rejected` (versions that must never go live again,
with the reason). An instance's target for a model is the canary version if the instance is in the
canary, else stable.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from control.adapters import s3 as s3x
from control.mirror.manifest import CONTROL_DIR, validate_model_name

DESIRED_NAME = "desired.json"
SCHEMA = 1


class DesiredStateError(RuntimeError):
    """The desired state object is missing, damaged, or from a newer release; the message names the key."""


class Canary(BaseModel):
    version: int = Field(ge=1)
    instances: list[str] = Field(default_factory=list)
    # The rollout's progress (phase, reason, failed checks, ...), written by the rollout controller
    # and opaque here: control/rollout/phases.RolloutState validates it. Agents read only the above.
    rollout: dict[str, Any] = Field(default_factory=dict)


class Rejection(BaseModel):
    reason: str
    at: float
    by: str = ""


class ModelState(BaseModel):
    stable: int | None = Field(default=None, ge=1)
    canary: Canary | None = None
    rejected: dict[int, Rejection] = Field(default_factory=dict)

    def target(self, instance: str) -> int | None:
        if self.canary is not None and instance in self.canary.instances:
            return self.canary.version
        return self.stable


class ControlObject(BaseModel):
    """What every object a ControlObjectStore keeps carries: who wrote it, when, its revision, and the
    writing leader's generation (the fencing token a newer leader's write raises)."""
    schema_version: int = SCHEMA
    revision: int = 0          # +1 on every write
    generation: int = 0        # the writing leader's lease generation (fencing token)
    updated_at: float = 0.0
    updated_by: str = ""


class DesiredState(ControlObject):
    models: dict[str, ModelState] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, ModelState]) -> dict[str, ModelState]:
        for name in v:
            validate_model_name(name)
        return v

    def targets(self, instance: str) -> dict[str, int]:
        """{model: version} this instance should serve (models without a stable or canary version skipped)."""
        return {m: t for m, s in sorted(self.models.items()) if (t := s.target(instance)) is not None}

    def is_rejected(self, model: str, version: int) -> bool:
        s = self.models.get(model)
        return s is not None and version in s.rejected


class InstanceStatus(BaseModel):
    """What one host's agent reports: its registration (addresses, site, capacity) and what it serves."""
    instance: str
    site: str
    http_url: str = ""
    grpc_url: str = ""
    metrics_url: str = ""
    agent_url: str = ""
    capacity: float = 1.0
    at: float = 0.0
    ready: bool = False        # every model live at its desired version
    desired_revision: int = -1  # the desired state revision the agent last converged to (or tried)
    models: dict[str, dict] = Field(default_factory=dict)  # {model: {"live": v, "state": ..., "error": ...}}


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def control_key(s3cfg, *parts: str) -> str:
    return "/".join(p for p in (s3cfg.prefix, CONTROL_DIR, *parts) if p)


@dataclass
class Read:
    state: Any          # the store's model (DesiredState for DesiredStore)
    etag: str | None  # None: the object does not exist yet
    written: bool = False  # from update_read: this state was just written (not: nothing to do)


class DamagedObject(RuntimeError):
    """An object's body does not match the sha256 in its metadata (the message names the key)."""


@dataclass
class Got:
    body: bytes | None  # None: not modified since the ETag given (304)
    etag: str


class CheckedObjects:
    """The lower level every control object shares (the lease, desired.json, traffic.json,
    operator.json): JSON bodies with their sha256 in the metadata, checked on every read, encrypted
    at rest (s3x.sse_args), and written only conditionally where one writer must not overwrite
    another (If-Match on the ETag read; If-None-Match: * to create)."""

    def __init__(self, client, s3cfg):
        self.client, self.s3cfg = client, s3cfg
        self.bucket = s3cfg.bucket

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def get(self, key: str, if_none_match: str | None = None) -> Got | None:
        """The body and ETag (None: no such object; Got.body None: unchanged since `if_none_match`).
        Raises s3x.S3Error (unreachable, denied) or DamagedObject."""
        cond = {"IfNoneMatch": if_none_match} if if_none_match else {}
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key, **cond)
            body = obj["Body"].read()
        except Exception as e:  # noqa: BLE001 - classified below
            if cond and s3x.error_code(e) in ("304", "NotModified"):
                return Got(None, if_none_match)
            if s3x.is_not_found(e):
                return None
            raise s3x.describe(e, self.bucket, key) from None
        self.check(key, body, obj.get("Metadata", {}))
        return Got(body, obj["ETag"])

    def check(self, key: str, body: bytes, meta: dict) -> None:
        if meta.get("sha256") != _sha(body):
            raise DamagedObject(f"{self.where(key)}: sha256 of the body does not match its metadata: the object is "
                                "damaged or was not written by triton-hybrid")

    def put(self, key: str, body: bytes, **cond) -> str:
        """Write `body` (with its sha256); `cond`: IfMatch / IfNoneMatch, or none for a key only one
        writer ever writes. Raises s3x.PreconditionFailed when the condition does not hold."""
        try:
            r = self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/json",
                                       Metadata={"sha256": _sha(body)}, **cond, **s3x.sse_args(self.s3cfg))
        except Exception as e:  # noqa: BLE001
            raise s3x.describe(e, self.bucket, key) from None
        return r["ETag"]

    def put_if(self, key: str, body: bytes, etag: str | None) -> str:
        """Write `body` if the object is still at `etag` (None: only if it does not exist)."""
        return self.put(key, body, **({"IfMatch": etag} if etag else {"IfNoneMatch": "*"}))


class ControlObjectStore:
    """One JSON object under `_control/`, read with ETag conditions and written only with If-Match /
    If-None-Match, with generation fencing. Subclasses name the object (`name`) and its pydantic model
    (`model`: a BaseModel with schema_version, revision, generation, updated_at, updated_by).
    DesiredStore (desired.json), control/traffic/entries.TrafficStore (traffic.json) and
    control/traffic/operator.OperatorStore (operator.json) are three."""

    name: str = DESIRED_NAME
    model: type[BaseModel] = DesiredState
    schema: int = SCHEMA
    what: str = "desired state"
    # What an operator does when the object is damaged (the error names it).
    restore_hint: str = "delete it and set the versions again (`triton-hybrid rollout`)"
    # Whether a new leader's fencing write may create the object when it does not exist yet.
    fence_creates: bool = True

    def __init__(self, client, s3cfg):
        self.client, self.s3cfg = client, s3cfg
        self.objects = CheckedObjects(client, s3cfg)
        self.bucket = s3cfg.bucket
        self.key = control_key(s3cfg, self.name)

    def read(self, previous: Read | None = None) -> Read:
        """The object and its ETag. Given the previous read, the object is fetched only when it
        changed (If-None-Match: S3 answers 304 and `previous` is returned as it is)."""
        try:
            got = self.objects.get(self.key, previous.etag if previous is not None and previous.etag else None)
        except DamagedObject as e:
            raise DesiredStateError(f"{e}. Nothing was changed; restore it from a backup or {self.restore_hint}") \
                from None
        if got is None:
            return Read(self.model(), None)
        if got.body is None:
            return previous
        return Read(self._validate(got.body, self.key, self.model), got.etag)

    def _parse(self, body: bytes, meta: dict, key: str, model):
        try:
            self.objects.check(key, body, meta)
        except DamagedObject as e:
            raise DesiredStateError(f"{e}. Nothing was changed; restore it from a backup or {self.restore_hint}") \
                from None
        return self._validate(body, key, model)

    def _validate(self, body: bytes, key: str, model):
        where = self.objects.where(key)
        try:
            state = model.model_validate_json(body)
        except ValidationError as e:
            raise DesiredStateError(f"{where}: not a valid {model.__name__}: {e.errors()[0]['msg']} at "
                                    f"{'.'.join(str(p) for p in e.errors()[0]['loc'])}") from None
        if model is self.model and state.schema_version > self.schema:
            raise DesiredStateError(f"{where}: schema {state.schema_version} is newer than this release knows "
                                    f"({self.schema}); upgrade triton-hybrid")
        return state

    def _put(self, key: str, body: bytes, **cond) -> str:
        return self.objects.put(key, body, **cond)

    def write(self, state, etag: str | None) -> str:
        """Write `state` if the object is still at `etag` (None: only if it does not exist).
        Raises s3x.PreconditionFailed when another writer got there first."""
        return self.objects.put_if(self.key, state.model_dump_json(indent=1).encode(), etag)

    def update(self, change: Callable[[Any], Any | None], by: str, generation: int = 0,
               attempts: int = 8, clock: Callable[[], float] = time.time, current: Read | None = None):
        """Read, apply `change` (pure: returns the new state, or None for "nothing to do"), write
        conditionally; on a lost race re-read and re-decide. Returns the state now in S3 (the very
        `current.state` object when nothing was written). `current`: a read the caller already made,
        used for the first attempt instead of reading again."""
        return self.update_read(change, by, generation, attempts, clock, current).state

    def update_read(self, change: Callable[[Any], Any | None], by: str, generation: int = 0,
                    attempts: int = 8, clock: Callable[[], float] = time.time, current: Read | None = None) -> Read:
        """`update`, returning the state with its ETag (a cache of the object stays valid without a read)."""
        for attempt in range(attempts):
            cur = current if attempt == 0 and current is not None else self.read()
            if generation < cur.state.generation:
                raise DesiredStateError(f"s3://{self.bucket}/{self.key} was written by generation "
                                        f"{cur.state.generation}; this writer has {generation}: a newer leader "
                                        "exists, refusing to write")
            new = change(cur.state.model_copy(deep=True))
            if new is None:
                return Read(cur.state, cur.etag)  # (the very state object: `update` callers compare with `is`)
            new = new.model_copy(update={"revision": cur.state.revision + 1, "generation": generation,
                                         "updated_at": clock(), "updated_by": by})
            try:
                return Read(new, self.write(new, cur.etag), written=True)
            except s3x.PreconditionFailed:
                continue  # another writer won: re-read, re-decide
        raise DesiredStateError(f"s3://{self.bucket}/{self.key}: lost {attempts} write races in a row; "
                                "another writer keeps changing it. Try again")

    def read_all(self, folder: str, model, key_of: Callable[[Any], str],
                 what: str = "status") -> tuple[dict[str, Any], list[str]]:
        """Every object under `_control/<folder>/` parsed as `model`, by its key's name: ({name: obj},
        [problems]). A damaged or stray object (one whose content belongs under another key) is
        skipped and named, never half-read."""
        out, problems = {}, []
        prefix = control_key(self.s3cfg, folder) + "/"
        for key in s3x.list_keys(self.client, self.bucket, prefix):
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=key)
                st = self._parse(obj["Body"].read(), obj.get("Metadata", {}), key, model)
            except (DesiredStateError, s3x.S3Error) as e:
                problems.append(str(e))
                continue
            except Exception as e:  # noqa: BLE001 - a vanished object between list and get
                problems.append(f"s3://{self.bucket}/{key}: {type(e).__name__}: {e}")
                continue
            want = key_of(st)
            if key != want:
                name = want.rsplit("/", 1)[-1].removesuffix(".json")
                problems.append(f"s3://{self.bucket}/{key}: holds the {what} of {name!r}; ignored")
                continue
            out[key[len(prefix):].removesuffix(".json")] = st
        return out, problems


class DesiredStore(ControlObjectStore):
    """Conditional reads and writes of desired.json (and the agents' status objects)."""

    # ---- agent status --------------------------------------------------------------------------
    def status_key(self, instance: str) -> str:
        validate_model_name(instance)  # same character rules: the name becomes a key
        return control_key(self.s3cfg, "status", f"{instance}.json")

    def write_status(self, status: InstanceStatus) -> None:
        """One agent writes its own key only, so no condition is needed."""
        self._put(self.status_key(status.instance), status.model_dump_json(indent=1).encode())

    def statuses(self) -> tuple[dict[str, InstanceStatus], list[str]]:
        """({instance: status}, [problems]): a damaged or stray status object is skipped and named."""
        return self.read_all("status", InstanceStatus, lambda st: self.status_key(st.instance))


def reject(model: str, version: int, reason: str, by: str, now: float) -> Callable[[DesiredState], DesiredState]:
    """A change for `DesiredStore.update`: mark model/version rejected (kept for good, with the reason);
    a canary of that version ends. Choosing the stable version is the rollout's decision, not this."""
    def change(s: DesiredState) -> DesiredState:
        m = s.models.setdefault(model, ModelState())
        m.rejected[version] = Rejection(reason=reason, at=now, by=by)
        if m.canary is not None and m.canary.version == version:
            m.canary = None
        return s
    return change


def seed_stable(versions: Mapping[str, int]) -> Callable[[DesiredState], DesiredState | None]:
    """A change for `DesiredStore.update`: the first deployment. Each model that has no stable
    version yet gets `versions[model]` (not a rejected one) as stable: with nothing serving there is
    nothing to compare a canary with (the rollout machine's own rule, Reason.FIRST_VERSION). Models
    that have a stable version keep it: a newer version goes through a rollout. None: no change."""
    def change(s: DesiredState) -> DesiredState | None:
        changed = False
        for model, version in sorted(versions.items()):
            m = s.models.setdefault(model, ModelState())
            if m.stable is None and version not in m.rejected:
                m.stable, changed = version, True
        return s if changed else None
    return change


def versions_in_use(desired: DesiredState, statuses: Mapping[str, InstanceStatus], model: str) -> set[int]:
    """Versions of `model` that must stay published: stable, the canary, and what any agent reports
    as its target or live version (a host still serving an older one must be able to pull it again)."""
    out: set[int] = set()
    m = desired.models.get(model)
    if m is not None:
        out |= {v for v in (m.stable, m.canary.version if m.canary else None) if v is not None}
    for st in statuses.values():
        r = st.models.get(model) or {}
        out |= {v for v in (r.get("target"), r.get("live")) if isinstance(v, int)}
    return out
