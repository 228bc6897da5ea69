"""A deterministic fleet for the rollout tests: plays the agents (each instance serves its desired
target `load_delay_s` after it changes, or reports a load error, or never reports) and Triton's
numbers (a metric window per instance from a per-(site, version) profile). Pure data in, snapshots
out; the time is the test's."""
from __future__ import annotations

from dataclasses import dataclass, field

from control.mirror.desired import DesiredState, InstanceStatus, ModelState
from control.rollout.analysis import MetricWindow
from control.rollout.phases import Inputs, Phase, SetCanaryWeight, apply, state_of, step

M = "ranker"


@dataclass
class Profile:
    rps: float = 20.0
    error_ratio: float = 0.001
    p99_ms: float = 10.0


@dataclass
class Fleet:
    sites: dict[str, str]                      # instance -> site
    stable: int = 1
    load_delay_s: float = 3.0
    profiles: dict = field(default_factory=dict)  # (site, version) or version -> Profile
    dead: set = field(default_factory=set)        # agents that never report
    dead_after: dict = field(default_factory=dict)  # instance -> time its agent stops reporting
    fail_versions: dict = field(default_factory=dict)  # version -> load error
    live: dict = field(default_factory=dict)
    live_since: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)   # instance -> (target, since)
    last_at: dict = field(default_factory=dict)

    def __post_init__(self):
        for n in self.sites:
            self.live.setdefault(n, self.stable)
            self.live_since.setdefault(n, -1e9)

    def profile(self, site: str, version: int) -> Profile:
        return self.profiles.get((site, version)) or self.profiles.get(version) or Profile()

    def quiet(self, name: str, now: float) -> bool:
        return name in self.dead or (name in self.dead_after and now >= self.dead_after[name])

    def statuses(self, d: DesiredState, now: float) -> dict[str, InstanceStatus]:
        ms = d.models.get(M) or ModelState()
        out = {}
        for n, site in sorted(self.sites.items()):
            if self.quiet(n, now):
                if n in self.last_at:
                    out[n] = InstanceStatus(instance=n, site=site, at=self.last_at[n],
                                            models={M: {"live": self.live[n], "target": self.live[n], "state": "live"}})
                continue  # never reported: no status object at all
            target = ms.target(n)
            entry = {"live": self.live[n], "target": target, "state": "live"}
            if target is not None and target != self.live[n]:
                if target in self.fail_versions:
                    entry.update(state="failed", error=self.fail_versions[target])
                else:
                    t, since = self.pending.get(n, (None, None))
                    if t != target:
                        self.pending[n] = (target, now)
                    elif now - since >= self.load_delay_s:
                        self.live[n], self.live_since[n] = target, now
                        self.pending.pop(n)
                        entry.update(live=target)
                    if entry["live"] != target:
                        entry["state"] = "loading"
            self.last_at[n] = now
            out[n] = InstanceStatus(instance=n, site=site, at=now, ready=entry["state"] == "live",
                                    metrics_url=f"http://{n}/metrics", models={M: entry})
        return out

    def windows(self, since: float, now: float) -> dict[str, MetricWindow]:
        out = {}
        for n, site in self.sites.items():
            if self.quiet(n, now):
                continue
            start = max(since, self.live_since[n])
            if now - start <= 0:
                continue
            p = self.profile(site, self.live[n])
            req = p.rps * (now - start)
            out[n] = MetricWindow(n, site, req, req * p.error_ratio, p.p99_ms, p.p99_ms / 3, self.live[n])
        return out

    def baseline(self, name: str, version: int, since: float, until: float) -> MetricWindow | None:
        """The instance's own window on `version` in [since, until] (a "self" baseline)."""
        site = self.sites[name]
        if until - since <= 0:
            return None
        p = self.profile(site, version)
        req = p.rps * (until - since)
        return MetricWindow(name, site, req, req * p.error_ratio, p.p99_ms, p.p99_ms / 3, version)

    def reloading(self, d: DesiredState) -> int:
        ms = d.models.get(M) or ModelState()
        return sum(1 for n in self.sites if not self.quiet(n, 0) and ms.target(n) not in (None, self.live[n]))


@dataclass
class Run:
    desired: DesiredState
    events: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    phases: list = field(default_factory=list)     # (t, phase) at every tick
    max_reloading_promoting: int = 0
    end: float = 0.0

    @property
    def reasons(self) -> list[tuple[str, str, str]]:
        return [(str(e.from_phase), str(e.to_phase), str(e.reason)) for e in self.events]

    @property
    def weights(self) -> list[int]:
        return [a.weight for a in self.actions if isinstance(a, SetCanaryWeight)]


def desired_with(stable: int | None = 1) -> DesiredState:
    return DesiredState(models={M: ModelState(stable=stable)})


def run(fleet: Fleet, cfg, desired: DesiredState | None = None, published=(1, 2), until: float = 2000.0,
        dt: float = 1.0, commands: dict | None = None, stop_when_idle: bool = True) -> Run:
    """Tick `step` every `dt` seconds from t=0, feeding the fleet's snapshots, applying the actions."""
    d = desired or desired_with(fleet.stable)
    r = Run(d)
    commands = dict(commands or {})
    now = 0.0
    started = False
    while now <= until:
        statuses = fleet.statuses(d, now)
        st = state_of(d.models.get(M), now)
        windows, baselines = {}, {}
        if st is not None and st.phase == Phase.ANALYSIS:
            windows = fleet.windows(max(now - cfg.analysis_window_s, st.analysis_since), now)
            if st.baseline == "self":
                baselines = {c: w for c in st.canaries if (w := fleet.baseline(
                    c, st.from_version, st.switched_at - cfg.analysis_window_s, st.switched_at)) is not None}
        cmds = tuple(commands.pop(now, ()))
        new, actions, ev = step(st, Inputs(M, d.models.get(M) or ModelState(), statuses, windows, tuple(published),
                                           cmds, tuple(fleet.sites), baselines), cfg, now)
        d = apply(d, M, new, actions, "test", now)
        r.actions += actions
        if ev is not None:
            r.events.append(ev)
        r.phases.append((now, str(new.phase) if new is not None else "idle"))
        if new is not None and new.phase == Phase.PROMOTING:
            r.max_reloading_promoting = max(r.max_reloading_promoting, fleet.reloading(d))
        started = started or new is not None
        if stop_when_idle and started and not commands and (new is None or new.phase in (Phase.DONE,
                                                                                           Phase.ROLLED_BACK)):
            break
        now += dt
    r.desired, r.end = d, now
    return r
