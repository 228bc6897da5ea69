"""The traffic policy, tick by tick, over snapshot sequences: one test per rule, plus flapping."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from control.config import InstanceConfig, PolicyConfig
from control.traffic.policy import (
    Controls,
    Decision,
    Override,
    PolicyState,
    decide,
    normalize,
    split,
)
from control.traffic.snapshot import InstanceSnapshot, InstanceState

H, U, K = InstanceState.HEALTHY, InstanceState.UNHEALTHY, InstanceState.UNKNOWN
CFG = PolicyConfig(onprem_util_high=0.8, onprem_util_low=0.5, queue_time_high_ms=20, queue_time_low_ms=5,
                   sustain_ticks=3, max_step=20, cooldown_s=3, failback_healthy_s=10, home_onprem_weight=100)
HOME = {"onprem": 100, "cloud": 0}


def snap(name="onprem-1", site="onprem", state=H, util=0.3, queue=1.0, gpu=True, t=0.0, cap=1.0):
    return InstanceSnapshot(name=name, site=site, taken_at=t, state=state, ready=state is not U, capacity=cap,
                            gpu_util=util if gpu else None, cpu_util=None if gpu else util, queue_ms=queue,
                            request_rate=100.0)


def world(on_state=H, on_util=0.3, on_queue=1.0, cl_state=H, gpu=True):
    return {"onprem-1": snap("onprem-1", "onprem", on_state, on_util, on_queue, gpu),
            "cloud-1": snap("cloud-1", "cloud", cl_state, 0.1, 0.5, gpu)}


class Run:
    """Feeds one world per tick (1 s apart) and keeps every decision."""

    def __init__(self, cfg=CFG, weights=HOME, t0=1000.0):
        self.cfg, self.weights, self.state, self.t = cfg, dict(weights), PolicyState(), t0
        self.log: list[Decision] = []

    def tick(self, snaps, controls=Controls(), dt=1.0) -> Decision:
        self.t += dt
        d = decide(snaps, self.weights, self.state, self.cfg, self.t, controls)
        self.weights, self.state = d.weights, d.state
        self.log.append(d)
        return d

    def ticks(self, n, snaps, **kw):
        return [self.tick(snaps, **kw) for _ in range(n)]

    @property
    def reasons(self):
        return [d.reason for d in self.log]


def test_calm_at_home_is_steady():
    r = Run()
    for d in r.ticks(5, world()):
        assert d.weights == HOME and d.reason == "steady"


def test_sustained_gpu_load_moves_weight_to_cloud_in_steps_with_cooldown():
    r = Run()
    r.ticks(12, world(on_util=0.95))
    # 2 ticks of sustain, then a step, then cooldown (3 s) between steps.
    assert r.reasons[:3] == ["hold_sustain", "hold_sustain", "scale_out_util"]
    assert r.log[2].weights == {"onprem": 80, "cloud": 20}
    assert r.reasons[3:5] == ["hold_cooldown", "hold_cooldown"]
    assert r.log[5].reason == "scale_out_util" and r.log[5].weights == {"onprem": 60, "cloud": 40}
    steps = [abs(a.weights["cloud"] - b.weights["cloud"]) for a, b in zip(r.log, r.log[1:])]
    assert max(steps) <= CFG.max_step


def test_queue_time_alone_triggers_scale_out_on_a_cpu_host():
    r = Run()
    r.ticks(3, world(on_util=0.1, on_queue=50.0, gpu=False))
    assert r.log[-1].reason == "scale_out_queue" and r.weights == {"onprem": 80, "cloud": 20}


def test_cpu_utilization_is_the_signal_where_there_is_no_gpu():
    r = Run()
    r.ticks(3, world(on_util=0.9, gpu=False))
    assert r.log[-1].reason == "scale_out_util"
    assert r.log[-1].inputs["sites"]["onprem"]["util_kind"] == "cpu"


def test_util_signal_none_ignores_shared_host_cpu():
    r = Run(cfg=CFG.model_copy(update={"util_signal": "none"}))
    r.ticks(5, world(on_util=0.99, on_queue=1.0, gpu=False))
    assert r.weights == HOME and set(r.reasons) == {"steady"}


def test_recovery_brings_weight_back_home_in_steps():
    r = Run(weights={"onprem": 40, "cloud": 60})
    r.ticks(20, world(on_util=0.2, on_queue=1.0))
    assert r.weights == HOME
    assert "scale_in_recovered" in r.reasons
    changes = [d for d in r.log if d.reason == "scale_in_recovered"]
    assert len(changes) == 3  # 40 -> 60 -> 80 -> 100
    assert r.reasons[-1] == "steady"


def test_hysteresis_band_moves_nothing_and_resets_counters():
    r = Run(weights={"onprem": 60, "cloud": 40})
    r.ticks(10, world(on_util=0.65, on_queue=10.0))  # between low and high on both signals
    assert r.weights == {"onprem": 60, "cloud": 40}
    assert set(r.reasons) == {"steady"}
    assert r.state.hot_ticks == 0 and r.state.cool_ticks == 0


def test_flapping_input_never_moves_weight():
    """Hot, cool, hot, cool...: never `sustain_ticks` in a row, so no change at all."""
    r = Run(weights={"onprem": 60, "cloud": 40})
    for i in range(30):
        r.tick(world(on_util=0.95 if i % 2 else 0.1))
    assert r.weights == {"onprem": 60, "cloud": 40}
    assert not any(d.reason.startswith("scale") for d in r.log)


def test_flapping_with_two_hot_ticks_then_one_cool_never_moves():
    r = Run()
    for i in range(30):
        r.tick(world(on_util=0.95 if i % 3 != 2 else 0.65))
    assert r.weights == HOME


def test_min_onprem_and_max_cloud_bound_scaling():
    cfg = CFG.model_copy(update={"max_cloud_weight": 50, "cooldown_s": 0})
    r = Run(cfg=cfg)
    r.ticks(20, world(on_util=0.99))
    assert r.weights == {"onprem": 50, "cloud": 50}
    assert r.reasons[-1] == "at_limit"
    cfg = CFG.model_copy(update={"min_onprem_weight": 70, "cooldown_s": 0})
    r = Run(cfg=cfg)
    r.ticks(20, world(on_util=0.99))
    assert r.weights == {"onprem": 70, "cloud": 30}


def test_unknown_onprem_metrics_hold_weights_never_count_as_idle():
    r = Run(weights={"onprem": 40, "cloud": 60})
    r.ticks(20, world(on_state=K))
    assert r.weights == {"onprem": 40, "cloud": 60}
    assert set(r.reasons) == {"unknown_metrics"}


def test_stale_snapshot_becomes_unknown():
    s = snap(t=100.0)
    assert s.aged(103.0, 5.0).state is H
    stale = s.aged(106.0, 5.0)
    assert stale.state is K and "stale" in stale.reason


def test_unknown_cloud_gets_no_extra_weight():
    r = Run()
    r.ticks(6, world(on_util=0.95, cl_state=K))
    assert r.weights == HOME
    assert r.reasons[-1] == "unknown_metrics"


def test_failover_when_onprem_down_and_failback_after_healthy_time():
    r = Run(weights={"onprem": 80, "cloud": 20})
    d = r.tick(world(on_state=U))
    assert d.reason == "failover_onprem_down" and d.weights == {"onprem": 0, "cloud": 100}
    r.ticks(3, world(on_state=U))
    # Back up, but flapping healthy/unknown restarts the failback clock.
    r.ticks(5, world())
    r.tick(world(on_state=K))
    assert r.log[-1].reason == "failback_wait" and r.weights["onprem"] == 0
    r.ticks(9, world())
    assert r.weights == {"onprem": 0, "cloud": 100}
    assert r.reasons[-1] == "failback_wait"
    r.ticks(2, world())
    assert r.reasons[-1] == "failback" or r.reasons[-2] == "failback"
    assert r.weights == {"onprem": 80, "cloud": 20}  # pre-failover weights restored


def test_failover_when_cloud_down():
    r = Run(weights={"onprem": 50, "cloud": 50})
    d = r.tick(world(cl_state=U))
    assert d.reason == "failover_cloud_down" and d.weights == {"onprem": 100, "cloud": 0}


def test_both_sites_down_keeps_weights():
    r = Run(weights={"onprem": 50, "cloud": 50})
    d = r.tick(world(on_state=U, cl_state=U))
    assert d.reason == "no_healthy_site" and d.weights == {"onprem": 50, "cloud": 50}


def test_manual_override_holds_for_ttl_then_expires():
    r = Run()
    ov = Override({"onprem": 30, "cloud": 70}, expires_at=r.t + 5.5, by="alice")
    c = Controls(override=ov)
    r.ticks(5, world(on_util=0.2), controls=c)
    assert set(r.reasons) == {"override"} and r.weights == {"onprem": 30, "cloud": 70}
    d = r.tick(world(on_util=0.2), controls=c)  # now past expires_at: the daemon still passes it
    assert d.reason == "override_expired" and d.weights == {"onprem": 30, "cloud": 70}
    r.ticks(30, world(on_util=0.2))
    assert r.weights == HOME
    assert r.reasons.count("override_expired") == 1


def test_override_beats_load_but_failover_beats_override():
    r = Run()
    c = Controls(override=Override({"onprem": 90, "cloud": 10}, expires_at=r.t + 100))
    r.ticks(6, world(on_util=0.99), controls=c)
    assert r.weights == {"onprem": 90, "cloud": 10}
    d = r.tick(world(on_state=U), controls=c)
    assert d.reason == "failover_onprem_down" and d.weights == {"onprem": 0, "cloud": 100}


def test_drain_site_and_instance():
    r = Run()
    d = r.tick(world(), controls=Controls(drained=frozenset({"onprem"})))
    assert d.reason == "drain" and d.weights == {"onprem": 0, "cloud": 100}
    # Draining the only on-prem instance drains the site (not a failover: no failback wait).
    d = r.tick(world(), controls=Controls(drained=frozenset({"onprem-1"})))
    assert d.reason == "drain" and d.weights == {"onprem": 0, "cloud": 100}
    assert r.state.failover_site is None


def test_split_by_capacity_and_health():
    inst = [InstanceConfig(name="on-a", site="onprem", http_port=1, grpc_port=2, metrics_port=3, capacity=3),
            InstanceConfig(name="on-b", site="onprem", http_port=4, grpc_port=5, metrics_port=6, capacity=1),
            InstanceConfig(name="cl-a", site="cloud", http_port=7, grpc_port=8, metrics_port=9)]
    w = split({"onprem": 70, "cloud": 30}, {}, inst)
    assert w == {"on-a": 53, "on-b": 17, "cl-a": 30} or w == {"on-a": 52, "on-b": 18, "cl-a": 30}
    assert w["on-a"] + w["on-b"] == 70
    snaps = {"on-a": snap("on-a", state=U)}
    assert split({"onprem": 70, "cloud": 30}, snaps, inst) == {"on-a": 0, "on-b": 70, "cl-a": 30}
    assert split({"onprem": 70, "cloud": 30}, {}, inst, frozenset({"on-b"})) == {"on-a": 70, "on-b": 0, "cl-a": 30}


def test_normalize():
    assert normalize({"onprem": 3, "cloud": 1}) == {"onprem": 75, "cloud": 25}
    assert normalize({"onprem": 0, "cloud": 0}) == {"onprem": 100, "cloud": 0}


def test_state_round_trips_through_json():
    r = Run()
    r.tick(world(on_state=U))
    st = PolicyState.from_dict(json.loads(json.dumps(r.state.to_dict())))
    assert st == r.state


RECORDED = Path(__file__).parent / "fixtures" / "recorded_snapshots.json"


@pytest.mark.skipif(not RECORDED.exists(), reason="no recorded snapshot sequence")
def test_recorded_load_sequence_scales_out_and_back():
    """Snapshots recorded by the poller from two real Tritons while a load ran on on-prem and
    stopped (tests/test_control_plane.py writes them); replayed through the pure policy."""
    data = json.loads(RECORDED.read_text())
    cfg = PolicyConfig(**data["policy"])
    r = Run(cfg=cfg)
    for tick in data["ticks"]:
        snaps = {k: InstanceSnapshot.from_dict(v) for k, v in tick["snapshots"].items()}
        r.t = tick["now"] - 1.0
        r.tick(snaps)
    assert any(d.reason.startswith("scale_out") for d in r.log)
    peak = max(d.weights["cloud"] for d in r.log)
    assert peak >= cfg.max_step
    assert r.weights["cloud"] < peak  # came back at least one step once the load stopped


def plant(weights, total_rps, saturation_rps=60.0):
    """A toy on-prem site: queue time jumps once its share of the traffic passes its capacity."""
    r = total_rps * weights["onprem"] / 100
    q = 30.0 if r >= saturation_rps else 0.5
    on = snap("onprem-1", "onprem", H, 0.3, q, gpu=False)
    on = InstanceSnapshot(**{**on.__dict__, "request_rate": r})
    cl = InstanceSnapshot(**{**snap("cloud-1", "cloud", H, 0.1, 0.5, gpu=False).__dict__,
                             "request_rate": total_rps - r})
    return {"onprem-1": on, "cloud-1": cl}


def test_steady_load_settles_instead_of_flapping_then_returns_when_load_drops():
    """The feedback loop: moving weight away cools on-prem at once. Without the saturation
    projection the weight would swing 50 <-> 75 forever; with it, it settles."""
    cfg = CFG.model_copy(update={"util_signal": "none", "cooldown_s": 1})
    r = Run(cfg=cfg)
    for _ in range(60):
        r.tick(plant(r.weights, 124))
    clouds = [d.weights["cloud"] for d in r.log]
    changes = [b - a for a, b in zip(clouds, clouds[1:]) if b != a]
    reversals = sum(1 for a, b in zip(changes, changes[1:]) if a * b < 0)
    assert reversals == 0, clouds
    assert r.weights["cloud"] >= 50 and "hold_projection" in r.reasons
    for _ in range(30):
        r.tick(plant(r.weights, 20))
    assert r.weights == HOME


def test_without_projection_the_same_load_flaps():
    """Proves the test above can fail: headroom 1.0 and a saturation forgotten at once."""
    cfg = CFG.model_copy(update={"util_signal": "none", "cooldown_s": 1, "saturation_memory_s": 0.0})
    r = Run(cfg=cfg)
    for _ in range(60):
        r.tick(plant(r.weights, 124))
    clouds = [d.weights["cloud"] for d in r.log]
    changes = [b - a for a, b in zip(clouds, clouds[1:]) if b != a]
    assert sum(1 for a, b in zip(changes, changes[1:]) if a * b < 0) >= 3


def test_no_shift_to_a_cloud_that_is_hot_too():
    r = Run(weights={"onprem": 50, "cloud": 50})
    w = world(on_util=0.95)
    w["cloud-1"] = snap("cloud-1", "cloud", H, util=0.97, queue=40.0)
    r.ticks(6, w)
    assert r.weights == {"onprem": 50, "cloud": 50}
    assert r.reasons[-1] == "hold_cloud_busy"


# ---- health over a window of probes, HAProxy's view, restarts (issue 15, findings 2 and 4) ------
from control.traffic.health import assess, judge  # noqa: E402
from control.traffic.policy import Reason  # noqa: E402
from control.traffic.snapshot import Probe  # noqa: E402

HCFG = CFG.model_copy(update={"health_window": 3, "health_failures_to_down": 2, "home_onprem_weight": 99})
OK, SLOW, FAIL = Probe.OK, Probe.SLOW, Probe.FAILED


def probed(name, site, probe, t):
    """One poller snapshot (raw, before judging) with readiness outcome `probe` at time t."""
    if probe is OK:
        return InstanceSnapshot(name=name, site=site, taken_at=t, state=H, ready=True, gpu_util=0.3, queue_ms=1.0,
                                request_rate=100.0, probe=OK)
    state, why = (InstanceState.DEGRADED, "/v2/health/ready no answer within 0.8s (ReadTimeout)") if probe is SLOW \
        else (U, "/v2/health/ready failed: ConnectionError")
    return InstanceSnapshot(name=name, site=site, taken_at=t, state=state, reason=why, ready=False, probe=probe)


class Pipeline:
    """Poller windows -> health.assess (with HAProxy's verdict) -> policy.decide, one tick a second:
    what the traffic job does, on a recorded sequence of probe outcomes and injected time."""

    def __init__(self, cfg=HCFG, weights=None, state=None, t0=1000.0):
        self.cfg, self.t = cfg, t0
        self.weights = dict(weights or {"onprem": 99, "cloud": 1})
        self.state = state or PolicyState()
        self.hist: dict[str, list] = {"onprem-1": [], "cloud-1": []}
        self.log: list[Decision] = []

    def tick(self, onprem=OK, cloud=OK, lb=None) -> Decision:
        self.t += 1.0
        self.hist["onprem-1"].append(probed("onprem-1", "onprem", onprem, self.t - 0.2))
        self.hist["cloud-1"].append(probed("cloud-1", "cloud", cloud, self.t - 0.2))
        hist = {k: v[-self.cfg.health_window:] for k, v in self.hist.items()}
        snaps = assess(hist, lb or {}, self.cfg, self.t)
        d = decide(snaps, self.weights, self.state, self.cfg, self.t)
        self.weights, self.state = d.weights, d.state
        self.log.append(d)
        return d

    @property
    def failovers(self) -> list[Decision]:
        return [d for d in self.log if d.reason.startswith("failover")]


def test_one_failed_probe_is_degraded_k_of_n_is_down():
    p = Pipeline()
    for _ in range(3):
        p.tick()
    d = p.tick(onprem=FAIL)
    assert d.reason != Reason.FAILOVER_ONPREM_DOWN and d.weights == {"onprem": 99, "cloud": 1}
    assert d.inputs["instances"]["onprem-1"]["state"] == "degraded"
    assert "1 failed and 0 slow of the last 3 probes" in d.inputs["instances"]["onprem-1"]["reason"]
    p.tick()                        # OK again: one failure in the window, never two
    p.tick(onprem=FAIL)             # window: FAIL, OK, FAIL -> 2 of 3 failed
    assert p.log[-1].reason == Reason.FAILOVER_ONPREM_DOWN, p.log[-1]
    assert p.weights == {"onprem": 0, "cloud": 100}
    assert len(p.failovers) == 1


def test_a_crash_is_still_detected_within_k_probes():
    p = Pipeline()
    p.tick()
    reasons = [p.tick(onprem=FAIL).reason for _ in range(3)]
    assert reasons[0] != Reason.FAILOVER_ONPREM_DOWN and reasons[1] == Reason.FAILOVER_ONPREM_DOWN


def test_slow_probes_are_degraded_not_down():
    """A rollout: readiness answers late on every other probe for a while; never a failover."""
    p = Pipeline()
    seq = [OK, SLOW, OK, SLOW, SLOW, OK, SLOW, OK, OK, SLOW, SLOW, OK, OK]
    for probe in seq:
        p.tick(onprem=probe)
    assert p.failovers == [], [d.reason for d in p.log]
    assert {d.weights["onprem"] for d in p.log} == {99}
    assert any(d.inputs["instances"]["onprem-1"]["state"] == "degraded" for d in p.log)


def test_a_hung_server_without_haproxy_is_down_once_no_probe_answers():
    p = Pipeline()
    p.tick()
    assert [p.tick(onprem=SLOW).reason.startswith("failover") for _ in range(3)] == [False, False, True]


def test_haproxy_up_while_probes_time_out_or_fail_means_no_failover():
    """HAProxy's own health check says UP: our probes timing out (or even failing) are not an outage."""
    p = Pipeline()
    p.tick()
    for probe in (SLOW, FAIL, FAIL, SLOW, FAIL, SLOW):
        d = p.tick(onprem=probe, lb={"onprem-1": True, "cloud-1": True})
        assert not d.reason.startswith("failover"), d
        assert d.inputs["instances"]["onprem-1"]["state"] == "degraded"
        assert "HAProxy's health check reports it UP" in d.inputs["instances"]["onprem-1"]["reason"]
    assert p.weights == {"onprem": 99, "cloud": 1}


def test_haproxy_down_is_down_even_before_k_probes():
    p = Pipeline()
    p.tick()
    d = p.tick(onprem=FAIL, lb={"onprem-1": False, "cloud-1": True})
    assert d.reason == Reason.FAILOVER_ONPREM_DOWN
    assert "HAProxy's health check reports it DOWN" in d.inputs["instances"]["onprem-1"]["reason"]


def test_judge_keeps_recorded_snapshots_without_probes_as_they_were():
    s = snap(state=U)  # recorded before probes were kept: the poller's verdict stands
    assert judge([s], None, HCFG, 1.0).state is U
    assert judge([snap(t=0.0)], None, HCFG, 100.0).state is K  # stale still ages into unknown


def test_restart_with_both_sites_healthy_drops_a_resumed_failover():
    """Issue 15 finding 4: the database says 'failed over from on-prem', both sites answer."""
    stale = PolicyState(failover_site="onprem", pre_failover={"onprem": 99, "cloud": 1}, last_change_at=900.0)
    restored = PolicyState.from_dict(json.loads(json.dumps(stale.to_dict()))).as_resumed()
    p = Pipeline(weights={"onprem": 0, "cloud": 100}, state=restored)
    d = p.tick()
    assert d.reason == Reason.RESUME_HEALTHY and d.weights == {"onprem": 99, "cloud": 1}
    assert d.state.failover_site is None and not d.state.resumed
    p.tick()
    assert Reason.FAILBACK_WAIT not in [x.reason for x in p.log] and p.failovers == []


def test_restart_holds_until_the_failed_site_is_observed():
    restored = PolicyState(failover_site="onprem", pre_failover={"onprem": 99, "cloud": 1}).as_resumed()
    never_polled = {"onprem-1": InstanceSnapshot("onprem-1", "onprem", 1000.0, K, reason="not polled yet"),
                    "cloud-1": snap("cloud-1", "cloud")}
    d = decide(never_polled, {"onprem": 60, "cloud": 40}, restored, HCFG, 1001.0)
    assert d.reason == Reason.RESUME_WAIT and d.weights == {"onprem": 60, "cloud": 40}  # nothing moved
    assert d.state.resumed and d.state.failover_site == "onprem"


def test_restart_with_the_site_still_down_keeps_the_failover():
    restored = PolicyState(failover_site="onprem", pre_failover={"onprem": 99, "cloud": 1}).as_resumed()
    p = Pipeline(weights={"onprem": 0, "cloud": 100}, state=restored)
    d = p.tick(onprem=FAIL, lb={"onprem-1": False})
    assert d.reason == Reason.FAILOVER_ONPREM_DOWN and d.weights == {"onprem": 0, "cloud": 100}
    for _ in range(12):
        p.tick()
    assert p.log[-1].reason in (Reason.FAILBACK, Reason.STEADY) and p.weights == {"onprem": 99, "cloud": 1}
    assert Reason.FAILBACK_WAIT in [x.reason for x in p.log]  # a real failover still waits failback_healthy_s


def test_reasons_are_strings_for_audit_and_metrics():
    assert Reason.FAILOVER_ONPREM_DOWN == "failover_onprem_down" and f"{Reason.STEADY}" == "steady"
    assert json.dumps({"r": Reason.DRAIN}) == '{"r": "drain"}'


def test_split_gives_a_canary_its_step_share_and_the_rest_of_its_site_to_the_others():
    inst = [InstanceConfig(name=n, site=s, http_port=1, grpc_port=2, metrics_port=3)
            for n, s in (("on-a", "onprem"), ("on-b", "onprem"), ("cl-a", "cloud"))]
    assert split({"onprem": 80, "cloud": 20}, {}, inst) == {"on-a": 40, "on-b": 40, "cl-a": 20}
    w = split({"onprem": 80, "cloud": 20}, {}, inst, canary={"on-a": 25})
    assert w == {"on-a": 16, "on-b": 64, "cl-a": 20}  # 25% of an equal share: 1/5 of the site
    assert split({"onprem": 80, "cloud": 20}, {}, inst, canary={"on-a": 100}) == {"on-a": 40, "on-b": 40, "cl-a": 20}
    # the only instance of its site keeps the site's weight whatever its canary share
    assert split({"onprem": 80, "cloud": 20}, {}, inst, canary={"cl-a": 10})["cl-a"] == 20
