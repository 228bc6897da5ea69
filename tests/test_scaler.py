"""The scaler as a pure function (control/capacity/scaler.py) and the cost ledger (control/capacity/cost.py)."""
from __future__ import annotations

from control.capacity.cost import CostLedger, accrue, cost_summary, site_totals
from control.capacity.scaler import CloudInstance, ScalerState, decide_scale
from control.config import ScalerConfig
from control.local.isolated import isolated_settings as make_settings
from control.traffic.snapshot import InstanceSnapshot, InstanceState

CFG = ScalerConfig(enabled=True, min_instances=1, max_instances=3, util_signal="gpu", util_high=0.8, util_low=0.2,
                   queue_ms_high=20, rps_per_capacity_high=None, rps_per_capacity_low=1.0, out_min_cloud_weight=50,
                   in_max_cloud_weight=10, sustain_ticks=3, out_cooldown_s=60, idle_cooldown_s=300,
                   budget_per_hour=None)
BASE = [CloudInstance("cloud-1", False, 2.0)]
TWO = BASE + [CloudInstance("cloud-2", True, 2.0)]


def snap(name, util=0.5, queue=1.0, rps=50.0, pending=0.0, state=InstanceState.HEALTHY, now=1000.0):
    return InstanceSnapshot(name, "cloud", now, state, gpu_util=util, queue_ms=queue, request_rate=rps, pending=pending)


def snaps(*ss):
    return {s.name: s for s in ss}


def run(ticks, weight, insts, cfg=CFG, state=ScalerState(), t0=1000.0, step=1.0, **kw):
    out = []
    for k in range(ticks):
        now = t0 + k * step
        d = decide_scale(snaps(*(snap(i.name, now=now, **kw) for i in insts)), weight, insts, cfg, state, now, 2.0)
        state = d.state
        out.append(d)
    return out


def test_hot_cloud_scales_out_after_sustained_ticks():
    ds = run(3, 60, BASE, util=0.9)
    assert [d.reason for d in ds] == ["hold_sustain", "hold_sustain", "scale_out_load"]
    assert ds[-1].action == "out" and ds[-1].count == 1 and ds[-1].target == 2
    assert "utilization 0.90 > 0.8" in ds[-1].message and "cloud weight 60 >= 50" in ds[-1].message


def test_hot_signal_with_low_cloud_share_holds():
    ds = run(5, 30, BASE, util=0.95, queue=50)
    assert {d.action for d in ds} == {"hold"} and ds[-1].reason == "steady"


def test_one_cool_tick_resets_the_sustain_counter():
    d1 = run(2, 60, BASE, util=0.9)[-1]
    d2 = decide_scale(snaps(snap("cloud-1", util=0.5)), 60, BASE, CFG, d1.state, 1003, 2.0)
    assert d2.reason == "steady" and d2.state.hot_ticks == 0


def test_queue_and_rps_signals():
    assert run(3, 60, BASE, util=0.1, queue=30)[-1].reason == "scale_out_load"
    cfg = CFG.model_copy(update={"rps_per_capacity_high": 40.0, "util_signal": "none"})
    d = run(3, 60, BASE, cfg, util=0.99, rps=41)[-1]
    assert d.reason == "scale_out_load" and "41.0 req/s per capacity > 40" in d.message


def test_cooldown_after_a_scale_event():
    st = ScalerState(hot_ticks=5, last_scale_at=990.0)
    d = decide_scale(snaps(snap("cloud-1", util=0.9)), 60, BASE, CFG, st, 1000.0, 2.0)
    assert d.reason == "hold_cooldown" and "cooldown 50s left" in d.message
    d = decide_scale(snaps(snap("cloud-1", util=0.9)), 60, BASE, CFG, st, 1051.0, 2.0)
    assert d.action == "out" and d.state.last_scale_at == 1051.0 and d.state.hot_ticks == 0


def test_max_instances_caps_scale_out():
    three = TWO + [CloudInstance("cloud-3", True, 2.0)]
    assert run(3, 80, three, util=0.9)[-1].reason == "at_max"


def test_budget_cap_refuses_and_says_so():
    cfg = CFG.model_copy(update={"budget_per_hour": 5.0})
    d = run(3, 80, TWO, cfg, util=0.9)[-1]
    assert d.action == "hold" and d.reason == "budget_cap"
    assert "$4/h to $6/h, over the budget of $5/h" in d.message
    cfg = CFG.model_copy(update={"budget_per_hour": 6.0})
    assert run(3, 80, TWO, cfg, util=0.9)[-1].action == "out"  # exactly at budget is allowed


def test_over_budget_scales_in_an_idle_removable_instance():
    cfg = CFG.model_copy(update={"budget_per_hour": 3.0})
    d = decide_scale(snaps(snap("cloud-1"), snap("cloud-2")), 60, TWO, cfg, ScalerState(), 1000, 2.0)
    assert d.action == "in" and d.reason == "over_budget" and d.instance == "cloud-2"


def test_idle_scales_in_only_after_cooldown():
    ds = run(302, 0, TWO, util=0.05, rps=0.0, queue=0.0)
    reasons = [d.reason for d in ds]
    assert set(reasons[:300]) == {"hold_idle_cooldown"}
    assert ds[300].action == "in" and ds[300].reason == "scale_in_idle" and ds[300].instance == "cloud-2"
    assert ds[300].target == 1


def test_idle_needs_low_share_and_low_rate():
    assert run(400, 30, TWO, util=0.05, rps=0.0)[-1].reason == "steady"   # share above in_max
    assert run(400, 0, TWO, util=0.05, rps=5.0)[-1].reason == "steady"    # still serving


def test_never_scales_in_an_instance_with_requests_in_flight():
    st = ScalerState(idle_since=0.0)
    ss = snaps(snap("cloud-1", rps=0, util=0.0), snap("cloud-2", rps=0, util=0.0, pending=3))
    d = decide_scale(ss, 0, TWO, CFG, st, 1000.0, 2.0)
    assert d.action == "hold" and d.reason == "hold_inflight" and "cloud-2=3" in d.message
    three = TWO + [CloudInstance("cloud-3", True, 2.0)]
    ss["cloud-3"] = snap("cloud-3", rps=0, util=0.0, pending=0)
    ss["cloud-2"] = snap("cloud-2", rps=0, util=0.0, pending=0)
    ss["cloud-3"] = snap("cloud-3", rps=0, util=0.0, pending=2)
    d = decide_scale(ss, 0, three, CFG, st, 1000.0, 2.0)
    assert d.action == "in" and d.instance == "cloud-2"   # the busy newest one is skipped


def test_configured_instances_are_never_removed():
    two_static = [CloudInstance("cloud-1", False, 2.0), CloudInstance("cloud-x", False, 2.0)]
    d = run(400, 0, two_static, util=0.0, rps=0.0)[-1]
    assert d.reason == "no_removable"


def test_min_and_max_limits():
    d = decide_scale({}, 0, [], CFG, ScalerState(), 1000.0, 2.0)
    assert d.action == "out" and d.reason == "below_min"
    cfg = CFG.model_copy(update={"max_instances": 1})
    d = decide_scale(snaps(snap("cloud-1"), snap("cloud-2")), 60, TWO, cfg, ScalerState(), 1000.0, 2.0)
    assert d.action == "in" and d.reason == "above_max"
    assert run(400, 0, BASE, util=0.0, rps=0.0)[-1].reason == "at_min"


def test_unknown_metrics_never_scale():
    st = ScalerState(hot_ticks=2)
    d = decide_scale(snaps(snap("cloud-1", state=InstanceState.UNKNOWN)), 90, BASE, CFG, st, 1000.0, 2.0)
    assert d.reason == "unknown_metrics" and d.state.hot_ticks == 0


def test_scale_numbering_sorts_numerically():
    insts = [CloudInstance("cloud-1", False), CloudInstance("cloud-9", True), CloudInstance("cloud-10", True)]
    ss = snaps(*(snap(i.name, util=0.0, rps=0.0) for i in insts))
    d = decide_scale(ss, 0, insts, CFG, ScalerState(idle_since=0.0), 1000.0)
    assert d.instance == "cloud-10"


# ---- cost -------------------------------------------------------------------------------------
def test_accrue_counts_only_up_intervals_and_caps_gaps():
    u = accrue(None, "cloud-1", "cloud", 3.6, True, 0.0)
    u = accrue(u, "cloud-1", "cloud", 3.6, True, 10.0)      # +10 s up
    u = accrue(u, "cloud-1", "cloud", 3.6, False, 20.0)     # went down: interval not billed
    u = accrue(u, "cloud-1", "cloud", 3.6, True, 30.0)
    u = accrue(u, "cloud-1", "cloud", 3.6, True, 500.0)     # daemon gap > max_gap: not billed
    u = accrue(u, "cloud-1", "cloud", 3.6, True, 520.0)     # +20 s
    assert u.up_seconds == 30.0 and abs(u.dollars - 0.03) < 1e-9


def test_site_totals_and_burn_rate():
    def acc(name, site, cph, t1, up2, t2):
        return accrue(accrue(None, name, site, cph, True, t1), name, site, cph, up2, t2, max_gap_s=1e9)
    a = acc("onprem-1", "onprem", 1.0, 0, True, 3600)
    b = acc("cloud-1", "cloud", 4.0, 1800, True, 3600)
    c = acc("cloud-2", "cloud", 4.0, 3000, False, 3600)
    t = site_totals([a, b, c], 3600)
    assert t["onprem"] == {"dollars": 1.0, "instance_hours": 1.0, "burn_per_hour": 1.0, "up_instances": ["onprem-1"]}
    assert t["cloud"]["dollars"] == 2.0 and t["cloud"]["burn_per_hour"] == 4.0
    assert site_totals([a], 3600 + 1000, fresh_s=60)["onprem"]["burn_per_hour"] == 0.0  # stale: not burning


def test_ledger_persists_and_summary_reads_it(tmp_path):
    settings = make_settings(tmp_path / "run", control={"scaler": {"budget_per_hour": 10.0}})
    led = CostLedger(settings.database_path)
    led.observe("cloud-1", "cloud", 4.0, True, now=0.0)
    led.observe("cloud-1", "cloud", 4.0, True, now=45.0)
    led.close()
    s = cost_summary(settings, now=50.0)
    assert s["sites"]["cloud"]["dollars"] == 0.05 and s["sites"]["cloud"]["burn_per_hour"] == 4.0
    assert s["budget_per_hour"] == 10.0 and s["cloud_budget_left_per_hour"] == 6.0
