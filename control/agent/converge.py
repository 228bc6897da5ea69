"""One pass of the agent: desired targets -> a decision per model -> actions -> a report per model.

The decision (`decide`) is a pure function of what the desired state says (target, rejected
versions), what is on this host's disk (verified versions, the version the live config names), what
Triton has READY, the versions that failed here before, and whether this agent smoke-checked the
live version since it started. `Converger` gathers those facts, acts, and reports; a failure of one
model never stops the others.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from control.adapters import s3 as s3x
from control.adapters.triton import TritonAdmin, TritonAdminError, ready_versions_of
from control.agent.errors import AgentError, FailureKind
from control.agent.loader import Loader
from control.agent.metrics import AgentMetrics
from control.agent.pull import Throttle, pull_version
from control.agent.repository import FailureBook, HostRepository
from control.mirror.desired import DesiredState
from control.mirror.manifest import MANIFEST_NAME, Manifest, ManifestError
from control.mirror.publish import read_manifest

log = logging.getLogger("triton_hybrid.agent")


class Action(StrEnum):
    KEEP = "keep"        # nothing to do
    VERIFY = "verify"    # the live config names the target and Triton has it READY: smoke it once, then live
    LOAD = "load"        # the live config names the target, on disk, not READY: load, wait, smoke
    ROLL = "roll"        # pull (if needed), candidate load + smoke, go live
    PREPARE = "prepare"  # Triton not answering, nothing (verified) live: pull + write the live config (init container)
    REFUSE = "refuse"    # never load the target (rejected, or failed here before); what serves keeps serving
    WAIT = "wait"        # Triton not answering and another version live: nothing safe to do


class Reason(StrEnum):
    LIVE = "live"
    PREPARED = "prepared"                  # on disk, named by the live config; Triton loads it when it starts
    NOT_VERIFIED = "not-verified"          # not smoke-checked by this agent since it started
    NOT_LOADED = "not-loaded"
    NEW_TARGET = "new-target"
    MISSING_ON_DISK = "missing-on-disk"
    REJECTED = "rejected"
    FAILED_HERE = "failed-on-this-host"
    TRITON_DOWN = "triton-not-answering"


class ModelPhase(StrEnum):
    LIVE = "live"
    PREPARED = "prepared"
    REFUSED = "refused"
    FAILED = "failed"
    WAITING = "waiting"


@dataclass(frozen=True)
class ModelView:
    """The facts about one model that the decision needs."""
    model: str
    target: int
    rejected: frozenset[int] = frozenset()
    failed: frozenset[int] = frozenset()
    on_disk: frozenset[int] = frozenset()
    live_config: int | None = None
    ready: frozenset[int] = frozenset()
    verified: bool = False   # the live-config version passed a smoke check by this agent process


@dataclass(frozen=True)
class Decision:
    model: str
    target: int
    action: Action
    reason: Reason
    previous: int | None = None  # the version clients get now (kept on failure)


def decide(v: ModelView, triton_up: bool) -> Decision:
    t = v.target
    serving = v.live_config if v.live_config is not None and v.live_config in v.ready else None

    def d(action: Action, reason: Reason) -> Decision:
        return Decision(v.model, t, action, reason, serving)
    if t in v.rejected:
        return d(Action.REFUSE, Reason.REJECTED)
    if t in v.failed:
        return d(Action.REFUSE, Reason.FAILED_HERE)
    at_target = v.live_config == t and t in v.on_disk
    if not triton_up:
        if at_target:
            return d(Action.KEEP, Reason.PREPARED)
        # Nothing live, or the live config names the target but this agent never verified that copy
        # (a repository written before it, e.g. by an older release): pull + verify replaces it.
        if v.live_config is None or v.live_config == t:
            return d(Action.PREPARE, Reason.TRITON_DOWN)
        return d(Action.WAIT, Reason.TRITON_DOWN)
    if at_target:
        if t in v.ready:
            return d(Action.KEEP, Reason.LIVE) if v.verified else d(Action.VERIFY, Reason.NOT_VERIFIED)
        return d(Action.LOAD, Reason.NOT_LOADED)
    return d(Action.ROLL, Reason.MISSING_ON_DISK if v.live_config == t else Reason.NEW_TARGET)


def plan(desired: DesiredState, instance: str, *, failed: dict[str, set[int]], on_disk: dict[str, set[int]],
         live_config: dict[str, int | None], ready: dict[str, set[int]], verified: set[tuple[str, int]],
         triton_up: bool) -> list[Decision]:
    """Decisions for every model the desired state targets on `instance` (pure)."""
    out = []
    for model, target in desired.targets(instance).items():
        lc = live_config.get(model)
        out.append(decide(ModelView(
            model, target, frozenset(desired.models[model].rejected), frozenset(failed.get(model, ())),
            frozenset(on_disk.get(model, ())), lc, frozenset(ready.get(model, ())),
            lc is not None and (model, lc) in verified), triton_up))
    return out


@dataclass
class ModelReport:
    """One model in the agent's status (the contract with the rollout, docs/rollout.md "What the agent
    must report"): `target` the version the desired state asks for, `live` the one clients get now,
    `state`, and `error` with `kind` when the target is not live; `reason` is the decision's reason."""
    model: str
    target: int
    live: int | None
    state: ModelPhase
    action: Action
    reason: str = ""
    error: str = ""
    kind: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in asdict(self).items()}


@dataclass
class PassResult:
    triton_up: bool
    reports: dict[str, ModelReport] = field(default_factory=dict)
    removed: list[tuple[str, int]] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        """Every targeted model live at its target (as Kubernetes readiness means it)."""
        return all(r.state == ModelPhase.LIVE and r.live == r.target for r in self.reports.values())

    @property
    def prepared(self) -> bool:
        """Every targeted model live, or prepared for a Triton that has not started (init container)."""
        return all(r.state in (ModelPhase.LIVE, ModelPhase.PREPARED) for r in self.reports.values())


class Converger:
    def __init__(self, instance: str, s3cfg, client, repo: HostRepository, admin: TritonAdmin, loader: Loader,
                 failures: FailureBook, metrics: AgentMetrics, *, keep_versions: int, chunk_bytes: int,
                 bandwidth_bytes_s: float | None, clock: Callable[[], float] = time.time):
        self.instance, self.s3cfg, self.client = instance, s3cfg, client
        self.repo, self.admin, self.loader, self.failures, self.metrics = repo, admin, loader, failures, metrics
        self.keep_versions, self.chunk_bytes, self.bandwidth = keep_versions, chunk_bytes, bandwidth_bytes_s
        self.clock = clock
        self.verified: set[tuple[str, int]] = set()
        self._warned: set[str] = set()
        self._reported: set[str] = set()  # models with metric series, removed when no longer desired

    def _ready(self) -> dict[str, set[int]] | None:
        try:
            return ready_versions_of(self.admin.index()) if self.admin.server_live() else None
        except TritonAdminError:
            return None

    def _warn_once(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            log.warning("%s", msg)

    def run(self, desired: DesiredState) -> PassResult:
        ready = self._ready()
        triton_up = ready is not None
        if triton_up:
            self.loader.remove_candidates()
        targets = desired.targets(self.instance)
        decisions = plan(desired, self.instance,
                         failed={m: self.failures.versions(m) for m in targets},
                         on_disk={m: self.repo.on_disk_versions(m) for m in targets},
                         live_config={m: self.repo.live_config_version(m) for m in targets},
                         ready=ready or {}, verified=self.verified, triton_up=triton_up)
        manifests: dict[str, Manifest | AgentError] = {
            d.model: self._manifest(d.model, d.target) for d in decisions if d.action in (Action.ROLL, Action.PREPARE)}

        def is_ensemble(d: Decision) -> bool:
            m = manifests.get(d.model)
            return m.platform == "ensemble" if isinstance(m, Manifest) else self.repo.is_ensemble(d.model)
        result = PassResult(triton_up)
        for d in sorted(decisions, key=lambda d: (is_ensemble(d), d.model)):  # an ensemble's steps first
            result.reports[d.model] = self._act(d, desired, manifests.get(d.model))
        result.removed = self.repo.apply_retention(self.keep_versions, {m: {t} for m, t in targets.items()})
        if triton_up:
            after = self._ready() or {}
            for r in result.reports.values():
                lc = self.repo.live_config_version(r.model)
                r.live = lc if lc is not None and lc in after.get(r.model, set()) else None
                if r.state == ModelPhase.LIVE and r.live != r.target:
                    r.state, r.error = ModelPhase.WAITING, f"v{r.target} is not READY on Triton any more"
        self._observe(result)
        return result

    def _manifest(self, model: str, version: int) -> Manifest | AgentError:
        try:
            m = read_manifest(self.client, self.s3cfg, model, version)
        except ManifestError as e:
            self._warn_once(f"{model} v{version}: {e}; this model is not changed, the others go on")
            return AgentError(FailureKind.MANIFEST, str(e))
        except s3x.S3Error as e:
            return AgentError(FailureKind.UNREACHABLE, str(e))
        if m is None:
            key = s3x.object_key(self.s3cfg, model, version, MANIFEST_NAME)
            return AgentError(FailureKind.UNPUBLISHED, f"{model} v{version} is not published (no s3://{self.s3cfg.bucket}/"
                                                       f"{key}); waiting for it")
        return m

    def _act(self, d: Decision, desired: DesiredState, manifest) -> ModelReport:
        t0 = time.monotonic()
        rep = ModelReport(d.model, d.target, d.previous, ModelPhase.LIVE, d.action, str(d.reason))
        try:
            if d.action == Action.REFUSE:
                if d.reason == Reason.REJECTED:
                    rj = desired.models[d.model].rejected[d.target]
                    rep.state, rep.kind = ModelPhase.REFUSED, str(FailureKind.REJECTED)
                    rep.error = f"v{d.target} is rejected ({rj.reason}); not loaded"
                else:
                    # Still "failed" with the first reason, pass after pass: the rollout ties it to the target.
                    f = self.failures.get(d.model, d.target) or {}
                    rep.state, rep.kind, rep.error = ModelPhase.FAILED, f.get("kind", ""), f.get("reason", "?")
                self._warn_once(f"{d.model} v{d.target}: {rep.error}")
            elif d.action == Action.WAIT:
                rep.state = ModelPhase.WAITING
                rep.error = f"Triton is not answering; v{d.previous or '?'} stays, v{d.target} waits"
            elif d.action == Action.KEEP:
                rep.state = ModelPhase.PREPARED if d.reason == Reason.PREPARED else ModelPhase.LIVE
            elif d.action in (Action.VERIFY, Action.LOAD):
                self.loader.adopt(d.model, d.target)
                self.verified.add((d.model, d.target))
                log.info("%s v%d verified live", d.model, d.target)
            else:  # ROLL, PREPARE
                if isinstance(manifest, AgentError):
                    raise manifest
                self._pull(manifest)
                if d.action == Action.PREPARE:
                    self.repo.write_live_config(d.model, d.target)
                    rep.state = ModelPhase.PREPARED
                    log.info("%s v%d prepared for Triton's start", d.model, d.target)
                else:
                    self.loader.go_live(d.model, d.target, d.previous)
                    self.verified.add((d.model, d.target))
        except AgentError as e:
            rep.kind, rep.error = str(e.kind), str(e)
            self.metrics.converge_errors.labels(str(e.kind)).inc()
            if e.permanent:
                rep.state = ModelPhase.FAILED
                self.failures.record(d.model, d.target, e.kind, str(e), self.clock())
                log.error("%s v%d: %s", d.model, d.target, e)
            else:
                rep.state = ModelPhase.WAITING
                self._warn_once(f"{d.model} v{d.target}: {e}")
        except Exception as e:  # noqa: BLE001 - one model's surprise must not stop the others
            rep.state, rep.kind, rep.error = ModelPhase.WAITING, "internal", f"unexpected {type(e).__name__}: {e}"
            self.metrics.converge_errors.labels("internal").inc()
            log.exception("%s v%d: unexpected failure", d.model, d.target)
        rep.seconds = round(time.monotonic() - t0, 3)
        return rep

    def _pull(self, manifest: Manifest) -> None:
        throttle = Throttle(self.bandwidth) if self.bandwidth else None
        try:
            if pull_version(self.client, self.s3cfg, self.repo, manifest, chunk_bytes=self.chunk_bytes,
                            throttle=throttle, on_bytes=self.metrics.pulled_bytes.inc):
                self.metrics.pulls.labels("ok").inc()
        except AgentError:
            self.metrics.pulls.labels("failed").inc()
            raise

    def _observe(self, result: PassResult) -> None:
        m = self.metrics
        for gone in self._reported - set(result.reports):
            for g in (m.desired_version, m.live_version, m.model_converged):
                g.remove(gone)
        self._reported = set(result.reports)
        for r in result.reports.values():
            m.desired_version.labels(r.model).set(r.target)
            m.live_version.labels(r.model).set(r.live or 0)
            m.model_converged.labels(r.model).set(1 if r.state == ModelPhase.LIVE and r.live == r.target else 0)
        m.converged.set(1 if result.converged else 0)
