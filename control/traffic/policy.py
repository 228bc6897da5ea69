"""The traffic policy: a pure function, no I/O, no clock.

    decide(snapshots, current, state, cfg, now, controls) -> Decision(weights, reason, message, state)

`weights` are per site (onprem + cloud = 100). Rules, first match wins (one reason per decision,
like Flagger's canary analysis):

 1. failover        a site with no ready instance (all `unhealthy`) gets 0; the other gets 100.
                    Beats overrides and drains: traffic to a dead site is an outage. `unhealthy`
                    is judged over a window of probes and HAProxy's own health check
                    (control/traffic/health.py); a `degraded` instance (a slow probe) is not down.
 2. failback        after a failover, weights return only once the failed site has been healthy
                    for `failback_healthy_s` (`failback_wait` until then).
    resume          a failover read back from the database after a restart is not trusted:
                    until the failed site has been observed (`resume_wait`, weights held), and
                    dropped at once (`resume_healthy`, pre-failover weights) if the site answers
                    its probes; if it is still down, rule 1 keeps the failover.
 3. drain           an operator-drained site gets 0.
 4. override        manual weights with a TTL (`override_expired` once it lapses).
 5. scaling         on-prem first. On-prem hot (utilization > high or queue time > high) for
                    `sustain_ticks` ticks -> move up to `max_step` points to the cloud, at most once
                    per `cooldown_s`, within min/max weights. Cool (utilization < low and queue <
                    low) for `sustain_ticks` -> move back toward `home_onprem_weight`. Between the
                    bands (hysteresis) the counters reset and nothing moves.
    unknown metrics never count as calm: an on-prem site whose instances are all `unknown` holds
    the weights (`unknown_metrics`); an unknown cloud gets no extra weight.

`split(...)` maps site weights to instance weights by capacity (also pure).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Mapping

from control.traffic.snapshot import InstanceSnapshot, InstanceState

SITES = ("onprem", "cloud")



class Reason(StrEnum):
    """Why a decision was made (the `reason` column of the audit, the `reason` metric label)."""

    STEADY = "steady"
    SCALE_OUT_UTIL = "scale_out_util"
    SCALE_OUT_QUEUE = "scale_out_queue"
    SCALE_IN_RECOVERED = "scale_in_recovered"
    HOLD_COOLDOWN = "hold_cooldown"
    HOLD_SUSTAIN = "hold_sustain"
    AT_LIMIT = "at_limit"
    HOLD_PROJECTION = "hold_projection"
    HOLD_CLOUD_BUSY = "hold_cloud_busy"
    FAILOVER_ONPREM_DOWN = "failover_onprem_down"
    FAILOVER_CLOUD_DOWN = "failover_cloud_down"
    FAILBACK_WAIT = "failback_wait"
    FAILBACK = "failback"
    RESUME_WAIT = "resume_wait"
    RESUME_HEALTHY = "resume_healthy"
    OVERRIDE = "override"
    OVERRIDE_EXPIRED = "override_expired"
    DRAIN = "drain"
    NO_HEALTHY_SITE = "no_healthy_site"
    UNKNOWN_METRICS = "unknown_metrics"

    @classmethod
    def failover(cls, site: str) -> "Reason":
        return cls(f"failover_{site}_down")


FAILOVER_REASONS = frozenset({Reason.FAILOVER_ONPREM_DOWN, Reason.FAILOVER_CLOUD_DOWN})
REASONS = tuple(r.value for r in Reason)


@dataclass(frozen=True)
class Override:
    weights: dict[str, int]
    expires_at: float
    by: str = ""
    note: str = ""


@dataclass(frozen=True)
class Controls:
    """Operator inputs: at most one active override, drained sites and instances."""

    override: Override | None = None
    drained: frozenset[str] = frozenset()     # site names and/or instance names


@dataclass(frozen=True)
class PolicyState:
    """What the policy carries from tick to tick (persisted in the audit table as JSON)."""

    hot_ticks: int = 0
    cool_ticks: int = 0
    last_change_at: float | None = None
    failover_site: str | None = None          # the site traffic was failed away from
    failover_healthy_since: float | None = None
    pre_failover: dict[str, int] | None = None
    override_expires_at: float | None = None  # the override seen last tick (to report expiry once)
    saturation_rps: float | None = None       # lowest on-prem request rate seen while it was hot
    saturation_at: float | None = None
    # Read back from the database at start: a failover in it is not trusted until health is observed.
    resumed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def as_resumed(self) -> "PolicyState":
        """This state as a restarted daemon reads it: any failover in it is only a suspicion."""
        return replace(self, resumed=self.failover_site is not None)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "PolicyState":
        if not d:
            return cls()
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Decision:
    weights: dict[str, int]
    reason: Reason
    message: str
    state: PolicyState
    inputs: dict = field(default_factory=dict)

    @property
    def changed_from(self):
        return self.inputs.get("current")


@dataclass(frozen=True)
class SiteView:
    state: str                  # healthy | unhealthy | unknown | empty (degraded instances: unknown)
    util: float | None          # capacity-weighted mean over healthy instances
    util_kind: str | None
    queue_ms: float | None      # worst healthy instance
    rate: float | None = None   # requests/s summed over healthy instances
    answering: int = 0          # instances whose newest readiness probe answered 200


def normalize(weights: Mapping[str, int | float]) -> dict[str, int]:
    """Two site weights as integers summing to 100 (cloud takes the rounding)."""
    on = float(weights.get("onprem", 0))
    cl = float(weights.get("cloud", 0))
    tot = on + cl
    if tot <= 0:
        return {"onprem": 100, "cloud": 0}
    onprem = int(round(100 * on / tot))
    return {"onprem": onprem, "cloud": 100 - onprem}


def site_view(snaps: list[InstanceSnapshot], cfg, drained: frozenset[str] = frozenset()) -> SiteView:
    snaps = [s for s in snaps if s.name not in drained]
    if not snaps:
        return SiteView("empty", None, None, None, None)
    answering = sum(1 for s in snaps if s.ready and s.state is not InstanceState.UNHEALTHY)
    healthy = [s for s in snaps if s.state is InstanceState.HEALTHY]
    if not healthy:
        state = "unhealthy" if all(s.state is InstanceState.UNHEALTHY for s in snaps) else "unknown"
        return SiteView(state, None, None, None, None, answering)
    signal = cfg.util_signal
    util, kind = None, None
    if signal != "none":
        use_gpu = signal == "gpu" or (signal == "auto" and any(s.gpu_util is not None for s in healthy))
        kind = "gpu" if use_gpu else "cpu"
        vals = [(s.gpu_util if use_gpu else s.cpu_util, s.capacity) for s in healthy]
        vals = [(v, c) for v, c in vals if v is not None]
        if vals:
            cap = sum(c for _, c in vals) or 1.0
            util = sum(v * c for v, c in vals) / cap
    queues = [s.queue_ms for s in healthy if s.queue_ms is not None]
    rates = [s.request_rate for s in healthy if s.request_rate is not None]
    return SiteView("healthy", util, kind, max(queues) if queues else None, sum(rates) if rates else None,
                    answering)


def _clamp_scaling(onprem: int, cfg) -> dict[str, int]:
    lo = max(cfg.min_onprem_weight, 100 - cfg.max_cloud_weight)
    onprem = max(lo, min(100, onprem))
    return {"onprem": onprem, "cloud": 100 - onprem}


def decide(snapshots: Mapping[str, InstanceSnapshot] | list[InstanceSnapshot], current: Mapping[str, int],
           state: PolicyState, cfg, now: float, controls: Controls = Controls()) -> Decision:
    """One policy tick. `cfg` is a PolicyConfig; `now` a unix time; snapshots already aged."""
    snaps = list(snapshots.values()) if isinstance(snapshots, Mapping) else list(snapshots)
    cur = normalize(current)
    drained = set(controls.drained)
    # A site whose instances are all drained is a drained site (an operator act, not a failure).
    for site in SITES:
        members = [s.name for s in snaps if s.site == site]
        if members and all(m in drained for m in members):
            drained.add(site)
    drained = frozenset(drained)
    views = {site: site_view([s for s in snaps if s.site == site], cfg, drained) for site in SITES}
    inputs = {
        "current": cur,
        "sites": {k: {"state": v.state, "util": None if v.util is None else round(v.util, 3),
                      "util_kind": v.util_kind, "queue_ms": None if v.queue_ms is None else round(v.queue_ms, 2)}
                  for k, v in views.items()},
        "instances": {s.name: s.summary() for s in snaps},
        "override": None if controls.override is None else asdict(controls.override),
        "drained": sorted(drained),
    }

    def out(weights, reason: Reason, message, st):
        return Decision(normalize(weights), Reason(reason), message, st, inputs)

    down = {site for site, v in views.items() if v.state in ("unhealthy", "empty") and site not in drained}
    # ---- 1. failover ------------------------------------------------------------------------
    if len(down) == 2:
        return out(cur, Reason.NO_HEALTHY_SITE, "no site has a ready instance; weights kept as they are",
                   replace(state, hot_ticks=0, cool_ticks=0))
    if down:
        failed = next(iter(down))
        other = "cloud" if failed == "onprem" else "onprem"
        target = {failed: 0, other: 100}
        if state.failover_site == failed:
            st = replace(state, failover_healthy_since=None, hot_ticks=0, cool_ticks=0, resumed=False)
            return out(target, Reason.failover(failed), f"{failed} still has no ready instance; all traffic on {other}", st)
        pre = state.pre_failover if state.failover_site else cur
        st = replace(state, failover_site=failed, failover_healthy_since=None, pre_failover=pre,
                     hot_ticks=0, cool_ticks=0, last_change_at=now, resumed=False)
        return out(target, Reason.failover(failed),
                   f"{failed} has no ready instance ({views[failed].state}); all traffic to {other}", st)
    # ---- 2. failback ------------------------------------------------------------------------
    if state.failover_site and state.resumed:
        # A failover read back after a restart: the site is not down (rule 1 did not fire). Drop
        # it once the site answers its probes; hold, and move nothing, until it has been observed.
        failed = state.failover_site
        if views[failed].answering == 0:
            return out(cur, Reason.RESUME_WAIT, f"resumed a failover of {failed} from the database; holding "
                       f"weights until {failed} has been observed ({views[failed].state})", state)
        back = normalize(state.pre_failover or {"onprem": cfg.home_onprem_weight, "cloud": 100 - cfg.home_onprem_weight})
        st = replace(state, failover_site=None, failover_healthy_since=None, pre_failover=None, resumed=False,
                     hot_ticks=0, cool_ticks=0, last_change_at=now if back != cur else state.last_change_at)
        return out(back, Reason.RESUME_HEALTHY, f"resumed a failover of {failed} from the database, but {failed} "
                   f"answers its probes: failover dropped, weights {back}", st)
    state = replace(state, resumed=False)
    if state.failover_site:
        failed = state.failover_site
        other = "cloud" if failed == "onprem" else "onprem"
        held = {failed: 0, other: 100}
        if views[failed].state != "healthy":
            st = replace(state, failover_healthy_since=None)
            return out(held, Reason.FAILBACK_WAIT, f"{failed} is {views[failed].state}; failback clock not started", st)
        since = state.failover_healthy_since if state.failover_healthy_since is not None else now
        healthy_for = now - since
        if healthy_for < cfg.failback_healthy_s:
            st = replace(state, failover_healthy_since=since)
            return out(held, Reason.FAILBACK_WAIT,
                       f"{failed} healthy for {healthy_for:.1f}s of {cfg.failback_healthy_s:.1f}s", st)
        back = normalize(state.pre_failover or {"onprem": cfg.home_onprem_weight, "cloud": 100 - cfg.home_onprem_weight})
        st = replace(state, failover_site=None, failover_healthy_since=None, pre_failover=None,
                     hot_ticks=0, cool_ticks=0, last_change_at=now)
        return out(back, Reason.FAILBACK, f"{failed} healthy for {healthy_for:.1f}s; weights restored to {back}", st)
    # ---- 3. drain ---------------------------------------------------------------------------
    drained_sites = [s for s in SITES if s in drained]
    if len(drained_sites) == 2:
        return out(cur, Reason.NO_HEALTHY_SITE, "both sites are drained; weights kept as they are", state)
    if drained_sites:
        site = drained_sites[0]
        other = "cloud" if site == "onprem" else "onprem"
        st = replace(state, hot_ticks=0, cool_ticks=0,
                     last_change_at=now if cur[site] != 0 else state.last_change_at)
        return out({site: 0, other: 100}, Reason.DRAIN, f"{site} drained by an operator; all traffic to {other}", st)
    # ---- 4. override ------------------------------------------------------------------------
    ov = controls.override
    if ov is not None and ov.expires_at > now:
        st = replace(state, hot_ticks=0, cool_ticks=0, override_expires_at=ov.expires_at,
                     last_change_at=now if normalize(ov.weights) != cur else state.last_change_at)
        return out(ov.weights, Reason.OVERRIDE,
                   f"manual override {normalize(ov.weights)} by {ov.by or 'operator'} for {ov.expires_at - now:.0f}s more"
                   + (f" ({ov.note})" if ov.note else ""), st)
    expired_now = state.override_expires_at is not None
    state = replace(state, override_expires_at=None)
    # ---- 5. scaling -------------------------------------------------------------------------
    on, cl = views["onprem"], views["cloud"]
    if on.state == "unknown":
        st = replace(state, hot_ticks=0, cool_ticks=0)
        return out(cur, Reason.OVERRIDE_EXPIRED if expired_now else Reason.UNKNOWN_METRICS,
                   "on-prem metrics unknown (stale, missing or garbage): holding weights", st)
    util_hot = on.util is not None and on.util > cfg.onprem_util_high
    queue_hot = on.queue_ms is not None and on.queue_ms > cfg.queue_time_high_ms
    util_cool = on.util is None or on.util < cfg.onprem_util_low
    queue_cool = on.queue_ms is None or on.queue_ms < cfg.queue_time_low_ms
    if on.util is None and on.queue_ms is None:
        util_cool = queue_cool = False  # no signal at all is not "calm"
    desc = (f"on-prem util={'n/a' if on.util is None else f'{on.util:.2f}'}({on.util_kind or '-'}) "
            f"queue={'n/a' if on.queue_ms is None else f'{on.queue_ms:.1f}ms'}")
    in_cooldown = state.last_change_at is not None and now - state.last_change_at < cfg.cooldown_s
    prefix = ("" if not expired_now else
              "override expired; " if ov is not None else "override cleared by an operator; ")

    def hold(reason: Reason, msg, st):
        return out(cur, Reason.OVERRIDE_EXPIRED if expired_now else reason, prefix + msg, st)

    if state.saturation_at is not None and now - state.saturation_at > cfg.saturation_memory_s:
        state = replace(state, saturation_rps=None, saturation_at=None)
    total_rate = sum(v.rate for v in (on, cl) if v.rate is not None)
    if util_hot or queue_hot:
        st = replace(state, hot_ticks=state.hot_ticks + 1, cool_ticks=0)
        if on.rate:
            sat = on.rate if state.saturation_rps is None else min(state.saturation_rps, on.rate)
            st = replace(st, saturation_rps=sat, saturation_at=now)
        why = Reason.SCALE_OUT_UTIL if util_hot else Reason.SCALE_OUT_QUEUE
        if st.hot_ticks < cfg.sustain_ticks:
            return hold(Reason.HOLD_SUSTAIN, f"{desc} above threshold for {st.hot_ticks}/{cfg.sustain_ticks} ticks", st)
        if cl.state != "healthy":
            return hold(Reason.UNKNOWN_METRICS, f"{desc} is hot but the cloud is {cl.state}: not adding cloud weight", st)
        cloud_busy = ((cl.util is not None and cl.util > cfg.onprem_util_high)
                      or (cl.queue_ms is not None and cl.queue_ms > cfg.queue_time_high_ms))
        if cloud_busy:
            return hold(Reason.HOLD_CLOUD_BUSY, f"{desc} is hot, but so is the cloud (util="
                        f"{'n/a' if cl.util is None else f'{cl.util:.2f}'} queue="
                        f"{'n/a' if cl.queue_ms is None else f'{cl.queue_ms:.1f}ms'}): no headroom to shift to", st)
        target = _clamp_scaling(cur["onprem"] - cfg.max_step, cfg)
        if target == cur:
            return hold(Reason.AT_LIMIT, f"{desc} hot but weights already at the limit {cur}", st)
        if in_cooldown:
            return hold(Reason.HOLD_COOLDOWN, f"{desc} hot; cooldown {cfg.cooldown_s - (now - state.last_change_at):.1f}s left", st)
        st = replace(st, last_change_at=now)
        return out(target, why, prefix + f"{desc} above threshold for {st.hot_ticks} ticks: {cur} -> {target}", st)
    if util_cool and queue_cool:
        st = replace(state, cool_ticks=state.cool_ticks + 1, hot_ticks=0)
        home = cfg.home_onprem_weight
        if cur["onprem"] == home:
            st = replace(st, saturation_rps=None, saturation_at=None)  # calm at home: forget
            return hold(Reason.STEADY, f"{desc} calm; at home weights", st)
        if st.cool_ticks < cfg.sustain_ticks:
            return hold(Reason.HOLD_SUSTAIN, f"{desc} below threshold for {st.cool_ticks}/{cfg.sustain_ticks} ticks", st)
        if in_cooldown:
            return hold(Reason.HOLD_COOLDOWN, f"{desc} calm; cooldown {cfg.cooldown_s - (now - state.last_change_at):.1f}s left", st)
        step = min(cfg.max_step, abs(home - cur["onprem"]))
        onprem = cur["onprem"] + step if home > cur["onprem"] else cur["onprem"] - step
        target = _clamp_scaling(onprem, cfg)
        if state.saturation_rps and target["onprem"] > cur["onprem"]:
            projected = total_rate * target["onprem"] / 100.0
            limit = cfg.scale_in_headroom * state.saturation_rps
            if projected >= limit:
                return hold(Reason.HOLD_PROJECTION,
                            f"{desc} calm, but at {target} on-prem would get ~{projected:.0f} req/s; it was hot at "
                            f"{state.saturation_rps:.0f} req/s (limit {limit:.0f})", st)
        st = replace(st, last_change_at=now)
        return out(target, Reason.SCALE_IN_RECOVERED, prefix + f"{desc} below threshold for {st.cool_ticks} ticks: {cur} -> {target}", st)
    st = replace(state, hot_ticks=0, cool_ticks=0)
    return hold(Reason.STEADY, f"{desc} inside the hysteresis band", st)


def split(site_weights: Mapping[str, int], snapshots: Mapping[str, InstanceSnapshot] | None, instances,
          drained: frozenset[str] = frozenset(), canary: Mapping[str, int] | None = None) -> dict[str, int]:
    """Instance weights: each site's weight split across its serving instances by capacity.

    Serving = not drained (by name or site) and not `unhealthy`; an `unknown` instance keeps its
    share (HAProxy's own health check still guards it). If no instance of a site is serving, the
    site's weight is split over all its non-drained instances (HAProxy will skip dead ones).
    `canary`: {instance: % of its own share} for canaries under analysis (the rollout's step
    weight, Flagger's stepWeight/maxWeight); the rest of the site's weight goes to its other
    instances, so the site total stays exact."""
    snapshots = snapshots or {}
    canary = canary or {}
    out: dict[str, int] = {i.name: 0 for i in instances}
    for site in SITES:
        members = [i for i in instances if i.site == site and i.name not in drained and site not in drained]
        serving = [i for i in members
                   if i.name not in snapshots or snapshots[i.name].state is not InstanceState.UNHEALTHY]
        pool = serving or members
        w = int(site_weights.get(site, 0))
        if not pool or w <= 0:
            continue
        eff = {i.name: (max(i.capacity, 0.0) or 1.0) * min(max(canary.get(i.name, 100), 0), 100) / 100
               for i in pool}
        total = sum(eff.values())  # 0 only when every member is a canary at 0%: split evenly then
        shares = [(i, w * eff[i.name] / total if total else w / len(pool)) for i in pool]
        given = 0
        for i, share in shares:
            out[i.name] = int(share)
            given += int(share)
        # Largest remainders get the leftover points so the site total stays exact.
        for i, share in sorted(shares, key=lambda t: t[1] - int(t[1]), reverse=True)[: w - given]:
            out[i.name] += 1
    return out
