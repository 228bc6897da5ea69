"""Site entries: the weights the control plane decided, in S3, for every site's HAProxy.

    <prefix>/_control/traffic.json                 the decided instance weights and drains (one writer: the leader)
    <prefix>/_control/entries/<site>-<name>.json   what one entry's HAProxy has now (written by its entry agent)

Each site has its own client entry (HAProxy, several replicas or LB hosts); an entry agent beside each
HAProxy applies traffic.json through the local runtime socket (control/entry/). The control plane never
talks to an entry's runtime API: nothing admin-level is reachable from the network, and an entry whose
site is cut off keeps the weights it last applied. Writes are conditional and fenced by the writer's
lease generation, like the desired state (control/mirror/desired.ControlObjectStore).

    actuator = EntriesActuator(TrafficStore(client, s3cfg), instances, generation=lease.generation)
    actuator.apply(plan)     # writes traffic.json when the plan differs from it (If-Match, fenced)
    actuator.observe()       # traffic.json + the entries' reports: health = any fresh entry sees it UP
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, Field

from control.adapters import s3 as s3x
from control.leader.gate import NotLeader
from control.mirror.desired import ControlObject, ControlObjectStore, DesiredStateError, Read, control_key
from control.mirror.manifest import ManifestError, validate_model_name
from control.traffic.actuators import ActuatorError, ApplyResult, Observed, Plan, site_weights_from_instances

TRAFFIC_NAME = "traffic.json"
ENTRIES_DIR = "entries"
TRAFFIC_SCHEMA = 1


class TrafficState(ControlObject):
    schema_version: int = TRAFFIC_SCHEMA
    site_weights: dict[str, int] = Field(default_factory=dict)
    instance_weights: dict[str, int] = Field(default_factory=dict)
    drained: list[str] = Field(default_factory=list)

    def plan(self) -> Plan:
        return Plan(dict(self.site_weights), dict(self.instance_weights), frozenset(self.drained))


class EntryReport(BaseModel):
    """What one entry agent reports: the traffic revision its HAProxy has, and HAProxy's own view."""
    site: Literal["onprem", "cloud"]
    name: str
    at: float = 0.0
    applied_revision: int = -1     # -1: nothing applied yet (HAProxy runs its config weights)
    applied_generation: int = 0
    source: str = ""               # where the applied weights came from: s3 | state_file | "" (config)
    s3_ok: bool = False            # the last read of traffic.json succeeded
    instance_weights: dict[str, int] = Field(default_factory=dict)   # observed in HAProxy
    drained: list[str] = Field(default_factory=list)
    health: dict[str, bool] = Field(default_factory=dict)            # HAProxy's health check verdicts
    errors: list[str] = Field(default_factory=list)

    @property
    def entry(self) -> str:
        return f"{self.site}-{self.name}"


def entry_id(site: str, name: str) -> str:
    eid = f"{site}-{name}"
    try:
        validate_model_name(eid)  # same character rules: the name becomes a key
    except ManifestError as e:
        raise ValueError(f"entry name {name!r}: {e}") from None
    return eid


class TrafficStore(ControlObjectStore):
    """Conditional reads and writes of traffic.json, and the entries' reports."""

    name = TRAFFIC_NAME
    model = TrafficState
    schema = TRAFFIC_SCHEMA
    what = "traffic weights"
    restore_hint = "delete it: the leading control plane writes it again on its next decision"
    # An empty traffic.json is a plan with every weight 0: fencing raises the generation of an
    # existing one only; the leader's first decision creates it.
    fence_creates = False

    def report_key(self, site: str, name: str) -> str:
        return control_key(self.s3cfg, ENTRIES_DIR, f"{entry_id(site, name)}.json")

    def write_report(self, report: EntryReport) -> None:
        """One entry agent writes its own key only, so no condition is needed."""
        self._put(self.report_key(report.site, report.name), report.model_dump_json(indent=1).encode())

    def reports(self) -> tuple[dict[str, EntryReport], list[str]]:
        return self.read_all(ENTRIES_DIR, EntryReport, lambda r: self.report_key(r.site, r.name), "report")


def set_plan(plan: Plan) -> Callable[[TrafficState], TrafficState | None]:
    """A change for `TrafficStore.update`: the plan's weights and drains; None when they are there already."""
    def change(s: TrafficState) -> TrafficState | None:
        w, d, sw = dict(plan.instance_weights), sorted(plan.drained), dict(plan.site_weights)
        if s.instance_weights == w and s.drained == d and s.site_weights == sw:
            return None
        s.instance_weights, s.drained, s.site_weights = w, d, sw
        return s
    return change


def fresh_reports(reports: dict[str, EntryReport], now: float, stale_s: float) -> dict[str, EntryReport]:
    return {k: r for k, r in reports.items() if now - r.at <= stale_s}


def entries_health(reports: dict[str, EntryReport]) -> dict[str, bool]:
    """An instance is UP if any entry's HAProxy sees it UP, DOWN if every entry that checks it sees it
    down (the same rule as one HAProxy's backends); an instance no entry checks has no verdict."""
    seen: dict[str, list[bool]] = {}
    for r in reports.values():
        for inst, up in r.health.items():
            seen.setdefault(inst, []).append(up)
    return {inst: any(ups) for inst, ups in seen.items()}


class EntriesActuator:
    """The control plane's side: it writes traffic.json and reads what the entries report."""

    name = "entries"

    def __init__(self, store: TrafficStore, instances, *, by: str = "control-plane",
                 generation: Callable[[], int] = lambda: 0, stale_s: float = 30.0,
                 clock: Callable[[], float] = time.time):
        self.store, self.by, self.generation, self.stale_s, self.clock = store, by, generation, stale_s, clock
        self._read: Read | None = None
        self.set_instances(instances)

    @classmethod
    def from_settings(cls, settings, generation: Callable[[], int] = lambda: 0) -> "EntriesActuator":
        """`generation`: the daemon's lease generation (Gate.fencing_token; 0 with election off)."""
        leader = settings.control.leader
        by = f"{leader.name}@{leader.site}" if leader.enabled and leader.name else "control-plane"
        return cls(TrafficStore(s3x.make_client(settings.s3), settings.s3), settings.instances, by=by,
                   generation=generation, stale_s=settings.entry.report_stale_s)

    def set_instances(self, instances) -> None:
        self.instances = list(instances)

    def _state(self) -> TrafficState:
        try:
            self._read = self.store.read(self._read)
        except (s3x.S3Error, DesiredStateError) as e:
            raise ActuatorError(str(e)) from None
        return self._read.state

    def observe(self) -> Observed:
        state = self._state()
        try:
            reports, problems = self.store.reports()
        except s3x.S3Error as e:
            raise ActuatorError(str(e)) from None
        fresh = fresh_reports(reports, self.clock(), self.stale_s)
        servers = [{"entry": k, "applied_revision": r.applied_revision, "lagging": r.applied_revision < state.revision,
                    "s3_ok": r.s3_ok, "age_s": round(self.clock() - r.at, 1), "errors": r.errors,
                    "stale": k not in fresh} for k, r in sorted(reports.items())]
        servers += [{"problem": p} for p in problems]
        weights = dict(state.instance_weights)
        return Observed(weights, set(state.drained), servers,
                        dict(state.site_weights) or site_weights_from_instances(weights, self.instances),
                        entries_health(fresh))

    def apply(self, plan: Plan) -> ApplyResult:
        before = self._state()
        try:
            generation = self.generation()
        except NotLeader as e:   # the lease was lost during this tick: write nothing
            raise ActuatorError(f"not writing {self.store.key}: {e}") from None
        try:
            after = self.store.update(set_plan(plan), by=self.by, generation=generation, clock=self.clock,
                                      current=self._read)
        except (s3x.S3Error, DesiredStateError) as e:
            raise ActuatorError(str(e)) from None
        if after is before:
            return ApplyResult(self.observe(), [], [])
        drift = [f"{f} {getattr(before, f)} -> {getattr(after, f)}" for f in ("instance_weights", "drained")
                 if getattr(before, f) != getattr(after, f)]
        return ApplyResult(self.observe(), [f"write {self.store.key} revision {after.revision}"], drift)
