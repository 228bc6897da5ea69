"""The rollout phase machine for ONE model: a pure function of snapshots, like Flagger's canary loop.

    step(state, inputs, cfg, now) -> (new_state, actions, transition | None)

`state` is the rollout's progress as kept in S3 desired state (`models[m].canary.rollout`, see
`state_of`), or None when no rollout runs. `inputs` are snapshots: the model's desired state, every
agent's InstanceStatus, one MetricWindow per instance, the published versions, operator commands.
`actions` are data; `apply` turns them (and the new state) into a new DesiredState, and the
controller writes that with a conditional write. No I/O, no clock: `now` is given.

    idle -> published -> canary -> analysis -> promoting -> done
                  \\          \\          \\            \\
                   `----------`----------`------------`--> rolled_back (version rejected) | stopped

Every transition carries a Reason. A rollout never hangs: each phase has `progress_deadline_s`
of no progress (an instance going live, a passed check), then it stops with the reason, or goes
on without the unreachable instances (`on_unreachable: skip`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from control.mirror.desired import (
    Canary,
    DesiredState,
    InstanceStatus,
    ModelState,
    reject,
)
from control.rollout.analysis import Check, MetricWindow, judge
from control.rollout.reasons import ACTIVE, TERMINAL, Phase, Reason

__all__ = ["Phase", "Reason", "RolloutState", "Inputs", "Command", "CommandKind", "CommandError", "Transition",
           "SetCanary", "Promote", "SetCanaryWeight", "SetStable", "Reject", "step", "apply", "state_of",
           "FULL_WEIGHT", "ACTIVE", "TERMINAL"]

FULL_WEIGHT = 100  # % of an instance's own weight: what a canary returns to when its analysis ends
FAILED_STATES = frozenset({"failed", "error"})


class RolloutState(BaseModel):
    """A rollout's progress; kept in S3 (desired.models[m].canary.rollout), so a restarted controller
    (or the other site's) carries on where this one stopped."""

    version: int = Field(ge=1)
    from_version: int | None = None
    phase: Phase
    reason: Reason
    message: str = ""
    by: str = ""
    started_at: float
    phase_since: float                 # the progress-deadline clock: last progress in this phase
    analysis_since: float | None = None
    canaries: list[str] = Field(default_factory=list)   # the instances under analysis
    failed_checks: int = 0
    last_check_at: float | None = None
    last_check: str = ""               # reason: message of the last check
    weight: int | None = None          # canary weight (% of its own), None: not managed
    paused: bool = False
    skipped: list[str] = Field(default_factory=list)    # unreachable instances gone on without
    live_count: int = 0                # instances live at `version` (progress during waves)
    # "site": the canary is judged against its site's stable instances; "self": against its own
    # stable version before `switched_at` (a site with one instance: lone_instance_self_baseline).
    baseline: Literal["site", "self"] = "site"
    switched_at: float | None = None   # when the canaries were told to switch (end of a self baseline)


class CommandKind(StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    ABORT = "abort"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Command:
    kind: CommandKind
    by: str = "operator"
    version: int | None = None   # START: the version to roll out
    to: int | None = None        # ROLLBACK: the version to go back to (default: the previous one)


class CommandError(ValueError):
    """An operator command that cannot apply now; the message says why and what to do."""


# ---- actions (data; `apply` performs them on a DesiredState) --------------------------------------
@dataclass(frozen=True)
class SetCanary:
    """canary := (version, instances): those instances serve `version` (empty: the canary is withdrawn)."""
    version: int
    instances: tuple[str, ...] = ()


@dataclass(frozen=True)
class Promote:
    """One wave: these instances join the ones serving the new version."""
    instances: tuple[str, ...]


@dataclass(frozen=True)
class SetCanaryWeight:
    """Traffic weight of a canary instance, in % of its own weight (applied by the weight hook)."""
    instance: str
    weight: int


@dataclass(frozen=True)
class SetStable:
    version: int


@dataclass(frozen=True)
class Reject:
    version: int
    reason: str


Action = SetCanary | Promote | SetCanaryWeight | SetStable | Reject


@dataclass(frozen=True)
class Transition:
    """One event worth an audit row, a metric and a log line: a phase change, or a notable event
    within a phase (a failed check, a wave, a pause)."""
    model: str
    version: int
    from_phase: Phase
    to_phase: Phase
    reason: Reason
    message: str
    at: float
    by: str = ""
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model": self.model, "version": self.version, "from": str(self.from_phase), "to": str(self.to_phase),
                "reason": str(self.reason), "message": self.message, "at": self.at, "by": self.by,
                "details": self.details}


@dataclass(frozen=True)
class Inputs:
    model: str
    desired: ModelState
    statuses: Mapping[str, InstanceStatus] = field(default_factory=dict)
    windows: Mapping[str, MetricWindow] = field(default_factory=dict)
    published: tuple[int, ...] = ()
    commands: tuple[Command, ...] = ()
    # Instances that should exist even without a status (the configured registry): an agent that
    # never reported is waited for, not forgotten.
    expected: tuple[str, ...] = ()
    # "self" baselines: canary instance -> its window on the stable version before it switched.
    baselines: Mapping[str, MetricWindow] = field(default_factory=dict)


Result = tuple[RolloutState | None, list, Transition | None]


def state_of(ms: ModelState | None, now: float) -> RolloutState | None:
    """The rollout kept in a model's desired state. A canary written by hand (no rollout data, or
    data this release cannot read) is adopted as a canary in its `canary` phase, so it is analysed
    like any other instead of being left alone."""
    if ms is None or ms.canary is None:
        return None
    try:
        st = RolloutState.model_validate(ms.canary.rollout) if ms.canary.rollout else None
    except ValidationError:
        st = None
    if st is None or st.version != ms.canary.version:
        return RolloutState(version=ms.canary.version, from_version=ms.stable, phase=Phase.CANARY,
                            reason=Reason.CANARY_CHOSEN, message="canary set in desired state by hand; adopted",
                            started_at=now, phase_since=now, canaries=list(ms.canary.instances))
    return st


# ---- the machine ------------------------------------------------------------------------------------
class _View:
    """Read helpers over one tick's inputs."""

    def __init__(self, inputs: Inputs, cfg, now: float):
        self.i, self.cfg, self.now, self.model = inputs, cfg, now, inputs.model

    def entry(self, name: str) -> dict:
        st = self.i.statuses.get(name)
        return (st.models.get(self.model) or {}) if st is not None else {}

    def fresh(self, name: str) -> bool:
        st = self.i.statuses.get(name)
        return st is not None and self.now - st.at <= self.cfg.status_stale_s

    def forgotten(self, name: str) -> bool:
        """A long-silent status of an instance not in the registry: a decommissioned host."""
        st = self.i.statuses.get(name)
        return (name not in self.i.expected and st is not None
                and self.now - st.at > self.cfg.forget_after_s)

    def live_at(self, name: str, version: int | None) -> bool:
        e = self.entry(name)
        return (version is not None and self.fresh(name) and e.get("live") == version
                and e.get("state") not in FAILED_STATES)

    def failed_at(self, name: str, version: int) -> str | None:
        """The agent's error if it reports that `version` failed to load, else None."""
        e = self.entry(name)
        if e.get("state") in FAILED_STATES and e.get("target") == version:
            return str(e.get("error") or e.get("state"))
        return None

    def site(self, name: str) -> str:
        st = self.i.statuses.get(name)
        return st.site if st is not None else "?"

    def deadline_passed(self, st: RolloutState) -> bool:
        return self.now - st.phase_since >= self.cfg.progress_deadline_s


def _to(st: RolloutState, phase: Phase, reason: Reason, message: str, now: float, **changes) -> RolloutState:
    upd = dict(phase=phase, reason=reason, message=message, **changes)
    if phase != st.phase:
        upd.setdefault("phase_since", now)
    return st.model_copy(update=upd)


def _event(model: str, old: RolloutState | None, new: RolloutState, now: float, by: str = "",
           details: dict | None = None) -> Transition:
    return Transition(model, new.version, old.phase if old is not None else Phase.IDLE, new.phase, new.reason,
                      new.message, now, by or new.by, details or {})


def _restore_weights(st: RolloutState) -> list:
    if st.weight is None or st.weight >= FULL_WEIGHT:
        return []
    return [SetCanaryWeight(c, FULL_WEIGHT) for c in st.canaries]


def _rollback(model: str, st: RolloutState, reason: Reason, message: str, now: float, by: str = "",
              details: dict | None = None) -> Result:
    new = _to(st, Phase.ROLLED_BACK, reason, message, now, paused=False)
    actions = _restore_weights(st) + [Reject(st.version, f"{reason}: {message}")]
    return new, actions, _event(model, st, new, now, by, details)


def _stop(model: str, st: RolloutState, reason: Reason, message: str, now: float, by: str = "",
          details: dict | None = None) -> Result:
    """Withdraw the canary (every instance back to stable), keep the record; the version is NOT
    rejected: nothing proved it bad. `resume` starts it again, `promote` forces it, `abort` rejects it."""
    new = _to(st, Phase.STOPPED, reason, message, now, paused=False, weight=None)
    actions = _restore_weights(st) + [SetCanary(st.version, ())]
    return new, actions, _event(model, st, new, now, by, details)


def _candidate(inputs: Inputs) -> int | None:
    """The newest published version above stable that is not rejected."""
    ms = inputs.desired
    newer = [v for v in inputs.published if v > (ms.stable or 0) and v not in ms.rejected]
    return max(newer) if newer else None


def _start(inputs: Inputs, old: RolloutState | None, version: int, reason: Reason, message: str, now: float,
           by: str) -> Result:
    ms = inputs.desired
    if ms.stable is None:
        new = RolloutState(version=version, from_version=None, phase=Phase.PROMOTING, reason=Reason.FIRST_VERSION,
                           message=f"v{version}: no stable version to compare with; promoting in waves",
                           by=by, started_at=now, phase_since=now)
    else:
        new = RolloutState(version=version, from_version=ms.stable, phase=Phase.PUBLISHED, reason=reason,
                           message=message, by=by, started_at=now, phase_since=now)
    ev = _event(inputs.model, old, new, now, by)
    if old is not None:  # a stopped rollout superseded by a newer version: the event starts from idle
        ev = Transition(ev.model, ev.version, Phase.IDLE, ev.to_phase, ev.reason, ev.message, now, ev.by)
    return new, [SetCanary(version, ())], ev


def _choose_canaries(v: _View, st: RolloutState) -> tuple[list[str], str, str]:
    """Instances to serve the canary: fresh, live at stable, never skipped; only in sites that keep at
    least one stable instance beside the canary (the baseline). When no site has two and
    lone_instance_self_baseline is on, a site's only instance, judged against its own stable
    version before it switched. Returns (chosen, why-none, baseline)."""
    stable = v.i.desired.stable
    by_site: dict[str, list[str]] = {}
    for name in sorted(v.i.statuses):
        if name not in st.skipped and v.live_at(name, stable):
            by_site.setdefault(v.site(name), []).append(name)
    eligible = {s: names for s, names in sorted(by_site.items()) if len(names) >= 2}
    if not eligible and by_site and v.cfg.lone_instance_self_baseline:
        chosen = [names[0] for names in by_site.values()][: v.cfg.canary_instances]
        return chosen, "", "self"
    if not eligible:
        if by_site:
            return [], (f"no site has two instances live at v{stable} (have: "
                        + ", ".join(f"{s}: {len(n)}" for s, n in by_site.items())
                        + "); a canary needs a stable instance of its own site to be compared with "
                        "(or lone_instance_self_baseline)"), "site"
        return [], f"no agent reports v{stable} live (statuses: {len(v.i.statuses)})", "site"
    cfg = v.cfg
    if cfg.canary_share_per_site is not None:
        chosen = []
        for names in eligible.values():
            k = min(len(names) - 1, max(1, math.floor(cfg.canary_share_per_site * len(names))))
            chosen += names[:k]
        return chosen, "", "site"
    chosen, rnd = [], 0
    while len(chosen) < cfg.canary_instances:  # round robin over the sites, each keeps one stable
        took = False
        for names in eligible.values():
            if rnd < len(names) - 1 and len(chosen) < cfg.canary_instances:
                chosen.append(names[rnd])
                took = True
        if not took:
            break
        rnd += 1
    return chosen, "", "site"


def _unreachable_or_stop(v: _View, st: RolloutState, waiting: list[str], phase_name: str,
                         canary_phase: bool) -> Result:
    """The progress deadline passed with `waiting` instances not live: skip the unreachable ones
    (on_unreachable=skip) or stop with the reason."""
    unreachable = [n for n in waiting if not v.fresh(n)]
    if v.cfg.on_unreachable == "skip" and unreachable and len(unreachable) == len(waiting):
        skipped = sorted(set(st.skipped) | set(unreachable))
        msg = (f"{', '.join(unreachable)}: no agent status for {v.cfg.progress_deadline_s:.0f}s during {phase_name}; "
               "going on without (on_unreachable=skip)")
        actions: list = []
        if canary_phase:
            canaries = [c for c in st.canaries if c not in unreachable]
            cur = v.i.desired.canary.instances if v.i.desired.canary else []
            actions.append(SetCanary(st.version, tuple(c for c in cur if c not in unreachable)))
            if not canaries:  # choose the canary again among the reachable instances
                new = _to(st, Phase.PUBLISHED, Reason.SKIPPED_UNREACHABLE, msg, v.now, canaries=[],
                          skipped=skipped, phase_since=v.now, weight=None)
                return new, actions, _event(v.model, st, new, v.now)
            new = _to(st, st.phase, Reason.SKIPPED_UNREACHABLE, msg, v.now, canaries=canaries, skipped=skipped,
                      phase_since=v.now)
        else:
            new = _to(st, st.phase, Reason.SKIPPED_UNREACHABLE, msg, v.now, skipped=skipped, phase_since=v.now)
        return new, actions, _event(v.model, st, new, v.now)
    if unreachable:
        return _stop(v.model, st, Reason.AGENT_NOT_REPORTING,
                     f"{', '.join(unreachable)}: no agent status for {v.cfg.progress_deadline_s:.0f}s during "
                     f"{phase_name} (progress deadline; on_unreachable={v.cfg.on_unreachable})", v.now)
    return _stop(v.model, st, Reason.NOT_LIVE_IN_TIME,
                 f"{', '.join(waiting)}: v{st.version} not live within {v.cfg.progress_deadline_s:.0f}s during "
                 f"{phase_name} (progress deadline)", v.now)


def _published(v: _View, st: RolloutState) -> Result:
    chosen, why, baseline = _choose_canaries(v, st)
    history_s = v.now - st.started_at
    if chosen and baseline == "self" and history_s < v.cfg.analysis_window_s:
        # The canary's own stable version is its baseline: a whole window of it before the switch.
        why = (f"collecting {v.cfg.analysis_window_s:.0f}s of {', '.join(chosen)}'s own v{v.i.desired.stable} "
               f"metrics before its switch (the only instance of its site; {history_s:.0f}s so far)")
        chosen = []
    if chosen:
        against = ("its own stable version before the switch (the only instance of its site)" if baseline == "self"
                   else "the stable instances of its site")
        new = _to(st, Phase.CANARY, Reason.CANARY_CHOSEN,
                  f"v{st.version} on {', '.join(chosen)} ({', '.join(sorted({v.site(c) for c in chosen}))}), "
                  f"judged against {against}",
                  v.now, canaries=chosen, failed_checks=0, last_check_at=None, last_check="", weight=None,
                  baseline=baseline, switched_at=v.now)
        return new, [SetCanary(st.version, tuple(chosen))], _event(v.model, st, new, v.now)
    if v.deadline_passed(st):
        reason = Reason.NO_BASELINE if "no site has two" in why else Reason.AGENT_NOT_REPORTING
        return _stop(v.model, st, reason, f"no canary chosen within {v.cfg.progress_deadline_s:.0f}s: {why}", v.now)
    if st.message != why:  # remember why it waits (status shows it); not an event
        return st.model_copy(update={"message": why}), [], None
    return st, [], None


def _canary(v: _View, st: RolloutState) -> Result:
    for c in st.canaries:
        err = v.failed_at(c, st.version)
        if err is not None:
            return _rollback(v.model, st, Reason.LOAD_FAILED, f"{c}: v{st.version} failed to load: {err}", v.now)
    waiting = [c for c in st.canaries if not v.live_at(c, st.version)]
    if not waiting:
        weight = None
        actions: list = []
        if v.cfg.canary_step_weight > 0:
            weight = min(v.cfg.canary_step_weight, v.cfg.canary_max_weight)
            actions = [SetCanaryWeight(c, weight) for c in st.canaries]
        new = _to(st, Phase.ANALYSIS, Reason.CANARY_LIVE,
                  f"v{st.version} live on {', '.join(st.canaries)}" + (f"; canary weight {weight}%" if weight else ""),
                  v.now, analysis_since=v.now, last_check_at=None, failed_checks=0, weight=weight)
        return new, actions, _event(v.model, st, new, v.now)
    if v.deadline_passed(st):
        return _unreachable_or_stop(v, st, waiting, "canary", canary_phase=True)
    return st, [], None


def _analysis(v: _View, st: RolloutState) -> Result:
    for c in st.canaries:
        err = v.failed_at(c, st.version)
        if err is not None:
            return _rollback(v.model, st, Reason.LOAD_FAILED, f"{c}: v{st.version} failed to load: {err}", v.now)
    if st.last_check_at is not None and v.now - st.last_check_at < v.cfg.interval_s:
        return st, [], None
    canary_set = set(v.i.desired.canary.instances) if v.i.desired.canary else set(st.canaries)
    stable = [n for n in v.i.statuses if n not in canary_set and v.live_at(n, v.i.desired.stable)]
    sites = {n: s.site for n, s in v.i.statuses.items()}
    # A canary whose agent went quiet (or that fell back to another version) has no valid window.
    windows = {n: w for n, w in v.i.windows.items() if n not in st.canaries or v.live_at(n, st.version)}
    check: Check = judge(st.canaries, stable, sites, windows, v.cfg,
                         baselines=v.i.baselines if st.baseline == "self" else None)
    details = {"check": check.to_dict()}
    base = dict(last_check_at=v.now, last_check=f"{check.reason}: {check.message}")
    if check.failed:
        n = st.failed_checks + 1
        msg = f"failed check {n}/{v.cfg.max_failed_checks}: {check.message}"
        if n >= v.cfg.max_failed_checks:
            return _rollback(v.model, st.model_copy(update=dict(base, failed_checks=n)), check.reason, msg, v.now,
                             details=details)
        new = _to(st, st.phase, check.reason, msg, v.now, failed_checks=n, **base)
        return new, [], _event(v.model, st, new, v.now, details=details)
    if check.passed:
        actions: list = []
        weight = st.weight
        if weight is not None and weight < v.cfg.canary_max_weight:
            weight = min(v.cfg.canary_max_weight, weight + v.cfg.canary_step_weight)
            actions = [SetCanaryWeight(c, weight) for c in st.canaries]
        judged_s = v.now - (st.analysis_since or v.now)
        if judged_s >= v.cfg.analysis_window_s and (weight is None or weight >= v.cfg.canary_max_weight):
            done = st.model_copy(update=dict(base, weight=weight))
            new = _to(done, Phase.PROMOTING, Reason.ANALYSIS_PASSED,
                      f"v{st.version} passed {judged_s:.0f}s of analysis ({st.failed_checks} failed checks): "
                      f"{check.message}", v.now, live_count=0)
            return new, actions + _restore_weights(done), _event(v.model, st, new, v.now, details=details)
        new = st.model_copy(update=dict(base, weight=weight, phase_since=v.now, reason=Reason.CHECK_PASSED,
                                        message=check.message))
        ev = _event(v.model, st, new, v.now, details=details) if actions else None  # a weight step is an event
        return new, actions, ev
    # no judgement: not enough traffic, no baseline, a canary not reporting -> wait, up to the deadline
    if v.deadline_passed(st):
        quiet = [c for c in st.canaries if not v.fresh(c)]
        if quiet:
            return _unreachable_or_stop(v, st, quiet, "analysis", canary_phase=True)
        return _stop(v.model, st, check.reason,
                     f"no judgement for {v.cfg.progress_deadline_s:.0f}s (progress deadline): {check.message}",
                     v.now, details=details)
    return st.model_copy(update=dict(base, reason=check.reason, message=check.message)), [], None


def _promoting(v: _View, st: RolloutState) -> Result:
    cur = list(v.i.desired.canary.instances) if v.i.desired.canary else []
    for c in cur:
        err = v.failed_at(c, st.version)
        if err is not None:
            return _rollback(v.model, st, Reason.LOAD_FAILED, f"{c}: v{st.version} failed to load: {err}", v.now)
    every = [n for n in sorted(set(v.i.statuses) | set(v.i.expected)) if n not in st.skipped and not v.forgotten(n)]
    live = [n for n in every if v.live_at(n, st.version)]
    if len(live) > st.live_count:
        st = st.model_copy(update=dict(live_count=len(live), phase_since=v.now))
    if every and len(live) == len(every):
        new = _to(st, Phase.DONE, Reason.PROMOTED,
                  f"v{st.version} live on all {len(every)} instances"
                  + (f" (skipped, will converge when back: {', '.join(st.skipped)})" if st.skipped else ""), v.now)
        return new, [SetStable(st.version)], _event(v.model, st, new, v.now)
    in_flight = [n for n in cur if n not in live and n not in st.skipped]
    free = v.cfg.wave_size - len(in_flight)
    rest = sorted((n for n in every if n not in cur), key=lambda n: (not v.fresh(n), n))
    wave = rest[:max(0, free)]
    if wave:
        new = _to(st, st.phase, Reason.WAVE,
                  f"v{st.version} to {', '.join(wave)} ({len(live)}/{len(every)} live, at most {v.cfg.wave_size} "
                  "reloading at once)", v.now)
        return new, [Promote(tuple(wave))], _event(v.model, st, new, v.now)
    if v.deadline_passed(st):
        waiting = in_flight or [n for n in every if n not in live]
        return _unreachable_or_stop(v, st, waiting, "promotion", canary_phase=False)
    return st, [], None


def _command(inputs: Inputs, st: RolloutState | None, cmd: Command, cfg, now: float) -> Result:
    model, ms = inputs.model, inputs.desired
    active = st is not None and st.phase in ACTIVE
    if cmd.kind == CommandKind.START:
        version = cmd.version or _candidate(inputs)
        if version is None:
            raise CommandError(f"{model}: no published version newer than stable v{ms.stable} that is not rejected; "
                               "publish one, or name it with --version")
        if active:
            raise CommandError(f"{model}: a rollout of v{st.version} is in progress ({st.phase}); "
                               "abort or promote it first")
        _check_version(inputs, version, "start")
        if version == ms.stable:
            raise CommandError(f"{model}: v{version} is already stable")
        return _start(inputs, st, version, Reason.OPERATOR_START, f"v{version} started by {cmd.by}", now, cmd.by)
    if cmd.kind == CommandKind.ROLLBACK:
        return _operator_rollback(inputs, st, cmd, now)
    if st is None:
        raise CommandError(f"{model}: no rollout in progress (stable v{ms.stable}); `rollout start {model}` begins one")
    if cmd.kind == CommandKind.ABORT:
        return _rollback(model, st, Reason.OPERATOR_ABORT, f"v{st.version} aborted by {cmd.by}", now, cmd.by)
    if cmd.kind == CommandKind.PAUSE:
        if not active:
            raise CommandError(f"{model}: the rollout of v{st.version} is {st.phase}; nothing to pause")
        if st.paused:
            return st, [], None
        new = _to(st, st.phase, Reason.OPERATOR_PAUSE, f"paused by {cmd.by} in {st.phase}", now, paused=True)
        return new, [], _event(model, st, new, now, cmd.by)
    if cmd.kind == CommandKind.RESUME:
        if st.phase == Phase.STOPPED:  # start over: choose the canary again, fresh deadlines
            new = _to(st, Phase.PUBLISHED, Reason.OPERATOR_RESUME, f"v{st.version} restarted by {cmd.by}", now,
                      canaries=[], failed_checks=0, skipped=[], weight=None, paused=False, last_check_at=None,
                      last_check="", analysis_since=None)
            return new, [SetCanary(st.version, ())], _event(model, st, new, now, cmd.by)
        if not st.paused:
            return st, [], None
        new = _to(st, st.phase, Reason.OPERATOR_RESUME, f"resumed by {cmd.by} in {st.phase}", now, paused=False,
                  phase_since=now, last_check_at=None)
        return new, [], _event(model, st, new, now, cmd.by)
    if cmd.kind == CommandKind.PROMOTE:
        if st.phase == Phase.PROMOTING:
            if not st.paused:
                return st, [], None
            new = _to(st, st.phase, Reason.OPERATOR_PROMOTE, f"promotion resumed by {cmd.by}", now, paused=False,
                      phase_since=now)
            return new, [], _event(model, st, new, now, cmd.by)
        new = _to(st, Phase.PROMOTING, Reason.OPERATOR_PROMOTE,
                  f"v{st.version} promoted by {cmd.by} from {st.phase} (analysis skipped)", now, paused=False,
                  live_count=0)
        actions = _restore_weights(st)
        if st.phase == Phase.STOPPED:
            actions.append(SetCanary(st.version, ()))
        return new, actions, _event(model, st, new, now, cmd.by)
    raise CommandError(f"unknown command {cmd.kind!r}")


def _check_version(inputs: Inputs, version: int, what: str) -> None:
    ms, model = inputs.desired, inputs.model
    if version not in inputs.published:
        have = ", ".join(f"v{p}" for p in sorted(inputs.published)) or "none"
        raise CommandError(f"{model}: v{version} is not published in the mirror (published: {have}); cannot {what}")
    if version in ms.rejected:
        raise CommandError(f"{model}: v{version} is rejected ({ms.rejected[version].reason}); cannot {what}. "
                           "A rejected version never goes live again: publish a new version")


def _operator_rollback(inputs: Inputs, st: RolloutState | None, cmd: Command, now: float) -> Result:
    model, ms = inputs.model, inputs.desired
    if st is not None and st.phase != Phase.DONE:
        # a rollout in progress (or stopped): reject its version, every instance back to stable (or `to`)
        extra: list = []
        if cmd.to is not None and cmd.to != ms.stable:
            if cmd.to == st.version:
                raise CommandError(f"{model}: v{cmd.to} is the version being rolled back")
            _check_version(inputs, cmd.to, "roll back to it")
            extra = [SetStable(cmd.to)]
        dest = cmd.to or ms.stable
        new, actions, ev = _rollback(model, st, Reason.OPERATOR_ROLLBACK,
                                     f"v{st.version} rolled back by {cmd.by}; stable v{dest}", now, cmd.by)
        return new, actions + extra, ev
    if ms.stable is None:
        raise CommandError(f"{model}: no stable version to roll back from")
    if cmd.to is None:
        older = [p for p in inputs.published if p < ms.stable and p not in ms.rejected]
        if not older:
            raise CommandError(f"{model}: no published, non-rejected version older than v{ms.stable}; name one with --to")
        to = max(older)
    else:
        to = cmd.to
        if to >= ms.stable:
            raise CommandError(f"{model}: --to v{to} is not older than stable v{ms.stable}; "
                               "a newer version goes out with `rollout start`")
        _check_version(inputs, to, "roll back to it")
    old = RolloutState(version=ms.stable, from_version=to, phase=Phase.IDLE, reason=Reason.OPERATOR_ROLLBACK,
                       started_at=now, phase_since=now, by=cmd.by)
    new = _to(old, Phase.ROLLED_BACK, Reason.OPERATOR_ROLLBACK, f"stable v{ms.stable} rolled back to v{to} by {cmd.by}",
              now)
    return new, [Reject(ms.stable, f"{Reason.OPERATOR_ROLLBACK}: rolled back to v{to} by {cmd.by}"),
                 SetStable(to)], _event(model, None, new, now, cmd.by)


def step(state: RolloutState | None, inputs: Inputs, cfg, now: float) -> Result:
    """One decision for one model. Operator commands (if any) are handled first and alone: the tick
    that applies a command does nothing else, so its effect is exactly what was asked.
    Raises CommandError for a command that cannot apply (nothing changes then)."""
    if inputs.commands:
        actions: list = []
        ev = None
        for cmd in inputs.commands:
            state, acts, e = _command(inputs, state, cmd, cfg, now)
            actions += acts
            ev = e or ev
            if state is not None and state.phase in (Phase.DONE, Phase.ROLLED_BACK):
                break
        return state, actions, ev
    ms = inputs.desired
    if state is None or state.phase == Phase.STOPPED:
        cand = _candidate(inputs) if cfg.start_on_publish else None
        if cand is not None and (state is None or cand > state.version):
            return _start(inputs, state, cand, Reason.PUBLISHED, f"v{cand} published (stable v{ms.stable})", now, "")
        return state, [], None
    if state.phase in TERMINAL:
        return state, [], None
    if ms.stable == state.version:
        new = _to(state, Phase.DONE, Reason.SUPERSEDED, f"stable set to v{state.version} outside the rollout", now)
        return new, [SetStable(state.version)], _event(inputs.model, state, new, now)
    if state.paused:
        return state, [], None
    v = _View(inputs, cfg, now)
    if state.phase == Phase.PUBLISHED:
        return _published(v, state)
    if state.phase == Phase.CANARY:
        return _canary(v, state)
    if state.phase == Phase.ANALYSIS:
        return _analysis(v, state)
    return _promoting(v, state)


def apply(desired: DesiredState, model: str, new: RolloutState | None, actions: list, by: str,
          now: float) -> DesiredState:
    """The actions and the new rollout state, written into a copy of `desired` (pure). Weight actions
    are not desired state (the controller hands them to its weight hook)."""
    d = desired.model_copy(deep=True)
    for a in actions:
        m = d.models.setdefault(model, ModelState())
        if isinstance(a, SetCanary):
            m.canary = Canary(version=a.version, instances=list(a.instances))
        elif isinstance(a, Promote):
            if m.canary is not None:
                m.canary.instances = sorted(set(m.canary.instances) | set(a.instances))
        elif isinstance(a, SetStable):
            m.stable = a.version
            m.canary = None
        elif isinstance(a, Reject):
            d = reject(model, a.version, a.reason, by, now)(d)
    m = d.models.get(model)
    if new is not None and new.phase not in (Phase.DONE, Phase.ROLLED_BACK, Phase.IDLE) and m is not None \
            and m.canary is not None and m.canary.version == new.version:
        m.canary.rollout = new.model_dump(mode="json")
    return d
