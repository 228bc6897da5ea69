"""The rollout phase machine (control/rollout/phases.py) and the canary analysis
(control/rollout/analysis.py): pure functions driven on snapshot sequences with injected time
(tests/rollout_sim.py plays the agents and Triton's numbers)."""
from __future__ import annotations

import pytest

from control.config import RolloutConfig
from control.mirror.desired import Canary, DesiredState, InstanceStatus, ModelState
from control.rollout.analysis import MetricWindow, judge
from control.rollout.phases import (
    Command,
    CommandError,
    CommandKind,
    Inputs,
    Phase,
    Promote,
    Reason,
    SetCanary,
    apply,
    state_of,
    step,
)
from tests.rollout_sim import Fleet, M, Profile, desired_with, run

SIX = {"onprem-1": "onprem", "onprem-2": "onprem", "onprem-3": "onprem",
       "cloud-1": "cloud", "cloud-2": "cloud", "cloud-3": "cloud"}


def cfg(**kw) -> RolloutConfig:
    base = dict(interval_s=10, analysis_window_s=60, max_failed_checks=3, min_requests=50, wave_size=2,
                progress_deadline_s=120, canary_step_weight=25, canary_max_weight=100, status_stale_s=15)
    base.update(kw)
    return RolloutConfig(**base)


def test_happy_path_to_done_with_weight_steps_and_waves_of_at_most_k():
    fleet = Fleet(dict(SIX))
    r = run(fleet, cfg())
    assert [(f, t, why) for f, t, why in r.reasons if f != t] == [
        ("idle", "published", "published"), ("published", "canary", "canary_chosen"),
        ("canary", "analysis", "canary_live"), ("analysis", "promoting", "analysis_passed"),
        ("promoting", "done", "promoted")]
    assert r.weights == [25, 50, 75, 100]
    ms = r.desired.models[M]
    assert ms.stable == 2 and ms.canary is None and ms.rejected == {}
    assert all(v == 2 for v in fleet.live.values())
    waves = [e for e in r.events if e.reason == Reason.WAVE]
    assert len(waves) >= 3 and 1 <= r.max_reloading_promoting <= 2
    done = r.events[-1]
    assert done.at >= 60 and "live on all 6 instances" in done.message


@pytest.mark.parametrize("k", [1, 3])
def test_waves_never_exceed_k(k):
    fleet = Fleet(dict(SIX), load_delay_s=7)
    r = run(fleet, cfg(wave_size=k))
    assert r.desired.models[M].stable == 2
    assert r.max_reloading_promoting == k
    promoted = [a for a in r.actions if isinstance(a, Promote)]
    assert all(len(a.instances) <= k for a in promoted)


def test_error_rate_regression_rolls_back_with_reason_and_rejects():
    fleet = Fleet(dict(SIX), profiles={2: Profile(error_ratio=0.08)})
    r = run(fleet, cfg())
    failed = [e for e in r.events if e.reason == Reason.ERROR_RATE]
    assert [e.to_phase for e in failed] == [Phase.ANALYSIS, Phase.ANALYSIS, Phase.ROLLED_BACK]
    assert "failed check 3/3" in failed[-1].message and "error ratio 0.0800" in failed[-1].message
    ms = r.desired.models[M]
    assert ms.stable == 1 and ms.canary is None
    assert ms.rejected[2].reason.startswith("error_rate: failed check 3/3")
    assert r.weights[-1] == 100  # the canary's weight is given back
    assert not any(isinstance(a, Promote) for a in r.actions)


def test_five_times_slower_p99_rolls_back():
    fleet = Fleet(dict(SIX), profiles={2: Profile(p99_ms=50.0)})
    r = run(fleet, cfg())
    last = r.events[-1]
    assert (last.to_phase, last.reason) == (Phase.ROLLED_BACK, Reason.LATENCY)
    assert "p99 50.0 ms vs 10.0 ms" in last.message and "x5.00 > x1.5" in last.message
    assert r.desired.models[M].rejected[2].reason.startswith("latency")


def test_comparisons_are_per_site():
    """Cloud hardware is 4x slower than on-prem for every version; v2 is as fast as v1 on each site.
    A canary on each site passes; compared with the other site's numbers the cloud one would fail."""
    profiles = {("onprem", 1): Profile(p99_ms=10), ("onprem", 2): Profile(p99_ms=11),
                ("cloud", 1): Profile(p99_ms=40), ("cloud", 2): Profile(p99_ms=42)}
    fleet = Fleet(dict(SIX), profiles=profiles)
    r = run(fleet, cfg(canary_share_per_site=0.34))
    chosen = next(e for e in r.events if e.reason == Reason.CANARY_CHOSEN)
    assert "onprem" in chosen.message and "cloud" in chosen.message
    assert r.desired.models[M].stable == 2
    # and the cloud canary, against cloud stable vs against on-prem stable:
    c = cfg()
    canary = MetricWindow("cloud-1", "cloud", 500, 0, p99_ms=42)
    same = judge(["cloud-1"], ["cloud-2", "onprem-2"], {"cloud-1": "cloud", "cloud-2": "cloud", "onprem-2": "onprem"},
                 {"cloud-1": canary, "cloud-2": MetricWindow("cloud-2", "cloud", 500, 0, p99_ms=40),
                  "onprem-2": MetricWindow("onprem-2", "onprem", 500, 0, p99_ms=10)}, c)
    assert same.reason == Reason.CHECK_PASSED
    other = judge(["cloud-1"], ["onprem-2"], {"cloud-1": "cloud", "onprem-2": "onprem"},
                  {"cloud-1": canary, "onprem-2": MetricWindow("onprem-2", "onprem", 500, 0, p99_ms=10)}, c)
    assert other.reason == Reason.NO_BASELINE  # never judged against another site


def test_latency_is_judged_on_the_window_not_on_tritons_sliding_p99():
    """Recorded on two hosts (tests/test_two_hosts.py). Triton's p99 is a sliding summary reaching back
    before the analysis window: (1) the stable instance's p99 still held an earlier spike (106 ms at a
    mean of 11 ms) and a canary 5x slower (p99 83 ms, mean 55 ms) passed as "p99 x0.78"; (2) a good
    canary's p99 held one slow request from before the window (61 ms, at means of 11.0 ms vs 11.2 ms)
    through three checks in a row: the good version was rolled back. The window's mean judges."""
    sites = {"onprem-1": "onprem", "onprem-2": "onprem"}
    c = cfg(min_requests=15, max_latency_ratio=2.5)
    slow = {"onprem-1": MetricWindow("onprem-1", "onprem", 35, 0, p99_ms=82.6, mean_ms=55.0),
            "onprem-2": MetricWindow("onprem-2", "onprem", 36, 0, p99_ms=105.959, mean_ms=11.16)}
    check = judge(["onprem-1"], ["onprem-2"], sites, slow, c)
    assert check.reason == Reason.LATENCY, check.message
    assert "mean latency 55.0 ms vs 11.2 ms" in check.message and "p99 82.6 ms vs 106.0 ms" in check.message
    cold = {"onprem-1": MetricWindow("onprem-1", "onprem", 18, 0, p99_ms=61.286, mean_ms=11.02),
            "onprem-2": MetricWindow("onprem-2", "onprem", 17, 0, p99_ms=16.26, mean_ms=11.22)}
    check = judge(["onprem-1"], ["onprem-2"], sites, cold, c)
    assert check.passed, check.message
    assert "mean latency x0.98; p99 61.3 ms vs 16.3 ms" in check.message


def test_not_enough_traffic_waits_then_stops_at_the_deadline_without_rejecting():
    fleet = Fleet(dict(SIX), profiles={1: Profile(rps=0.2), 2: Profile(rps=0.2)})
    c = cfg()
    r = run(fleet, c, until=600, stop_when_idle=False)
    stop = [e for e in r.events if e.to_phase == Phase.STOPPED]
    assert len(stop) == 1 and stop[0].reason == Reason.NOT_ENOUGH_TRAFFIC
    live_at = next(e.at for e in r.events if e.reason == Reason.CANARY_LIVE)
    assert stop[0].at == pytest.approx(live_at + c.progress_deadline_s, abs=c.interval_s + 1)
    assert not any(e.reason in (Reason.ERROR_RATE, Reason.LATENCY) for e in r.events)  # never a failure
    ms = r.desired.models[M]
    assert ms.stable == 1 and 2 not in ms.rejected
    assert ms.canary is not None and ms.canary.instances == []  # withdrawn, record kept
    assert state_of(ms, 0).phase == Phase.STOPPED
    # not restarted by itself (it is not newer than what stopped)...
    assert [p for _, p in r.phases][-1] == "stopped"


def test_a_stopped_rollout_resumes_on_command_and_a_newer_version_supersedes_it():
    fleet = Fleet(dict(SIX), profiles={1: Profile(rps=0.2), 2: Profile(rps=0.2)})
    r = run(fleet, cfg(), until=400, stop_when_idle=False)
    d = r.desired
    st = state_of(d.models[M], 400)
    new, actions, ev = step(st, Inputs(M, d.models[M], commands=(Command(CommandKind.RESUME, by="ann"),),
                                       published=(1, 2)), cfg(), 401)
    assert (ev.from_phase, ev.to_phase, ev.reason, ev.by) == (Phase.STOPPED, Phase.PUBLISHED, Reason.OPERATOR_RESUME,
                                                             "ann")
    new, actions, ev = step(st, Inputs(M, d.models[M], published=(1, 2, 3)), cfg(), 401)
    assert (ev.from_phase, ev.to_phase, ev.reason, new.version) == (Phase.IDLE, Phase.PUBLISHED, Reason.PUBLISHED, 3)


def test_agent_never_reports_during_promotion_stops_at_the_deadline():
    fleet = Fleet(dict(SIX), dead={"cloud-3"})
    c = cfg()
    r = run(fleet, c, until=1000, stop_when_idle=False)
    stop = [e for e in r.events if e.to_phase == Phase.STOPPED]
    assert len(stop) == 1 and stop[0].reason == Reason.AGENT_NOT_REPORTING and "cloud-3" in stop[0].message
    promoting_since = next(e.at for e in r.events if e.to_phase == Phase.PROMOTING and e.from_phase != Phase.PROMOTING)
    assert promoting_since < stop[0].at <= promoting_since + 5 * 10 + c.progress_deadline_s
    ms = r.desired.models[M]
    assert ms.stable == 1 and ms.canary.instances == [] and 2 not in ms.rejected


def test_agent_never_reports_is_skipped_when_configured():
    fleet = Fleet(dict(SIX), dead={"cloud-3"})
    r = run(fleet, cfg(on_unreachable="skip"), until=1000)
    skip = [e for e in r.events if e.reason == Reason.SKIPPED_UNREACHABLE]
    assert len(skip) == 1 and "cloud-3" in skip[0].message
    done = r.events[-1]
    assert done.reason == Reason.PROMOTED and "live on all 5 instances" in done.message and "cloud-3" in done.message
    assert r.desired.models[M].stable == 2  # cloud-3 converges to stable v2 when its agent is back


def test_canary_agent_goes_quiet_stop_or_choose_another():
    # the first chosen canary (cloud-1: sites in name order) stops reporting just after being chosen
    fleet = Fleet(dict(SIX), dead_after={"cloud-1": 2})
    r = run(fleet, cfg(), until=600, stop_when_idle=False)
    stop = next(e for e in r.events if e.to_phase == Phase.STOPPED)
    assert stop.reason == Reason.AGENT_NOT_REPORTING and "cloud-1" in stop.message and "canary" in stop.message
    fleet = Fleet(dict(SIX), dead_after={"cloud-1": 2})
    r = run(fleet, cfg(on_unreachable="skip"), until=1500)
    kinds = [(f, t, why) for f, t, why in r.reasons if why == "skipped_unreachable"]
    assert kinds == [("canary", "published", "skipped_unreachable")]
    second = [e for e in r.events if e.reason == Reason.CANARY_CHOSEN][1]
    assert "cloud-1" not in second.message
    assert r.desired.models[M].stable == 2


def test_load_failure_rolls_back_at_once():
    fleet = Fleet(dict(SIX), fail_versions={2: "onnxruntime: invalid model"})
    r = run(fleet, cfg())
    last = r.events[-1]
    assert (last.to_phase, last.reason) == (Phase.ROLLED_BACK, Reason.LOAD_FAILED)
    assert "invalid model" in last.message and last.at < 20
    assert r.desired.models[M].rejected[2].reason.startswith("load_failed")


def test_pause_holds_past_the_deadline_and_resume_continues():
    fleet = Fleet(dict(SIX))
    c = cfg()
    r = run(fleet, c, commands={20.0: [Command(CommandKind.PAUSE, by="ann")],
                                520.0: [Command(CommandKind.RESUME, by="ann")]})
    assert ("analysis", "analysis", "operator_pause") in r.reasons
    assert ("analysis", "analysis", "operator_resume") in r.reasons
    paused = [t for t, p in r.phases if 20 < t < 520]
    assert paused and {p for t, p in r.phases if 20 < t < 520} == {"analysis"}  # no stop while paused
    checks_while_paused = [e for e in r.events if 20 < e.at < 520 and e.reason == Reason.CHECK_PASSED]
    assert checks_while_paused == []
    assert r.desired.models[M].stable == 2 and r.events[-1].at > 520


def test_manual_promote_skips_analysis_and_manual_abort_rejects():
    fleet = Fleet(dict(SIX))
    r = run(fleet, cfg(), commands={12.0: [Command(CommandKind.PROMOTE, by="ann")]})
    promote = next(e for e in r.events if e.reason == Reason.OPERATOR_PROMOTE)
    assert (promote.from_phase, promote.to_phase, promote.by) == (Phase.ANALYSIS, Phase.PROMOTING, "ann")
    assert r.desired.models[M].stable == 2 and r.events[-1].at < 60  # well before the analysis window

    fleet = Fleet(dict(SIX))
    r = run(fleet, cfg(), commands={12.0: [Command(CommandKind.ABORT, by="bob")]})
    last = r.events[-1]
    assert (last.to_phase, last.reason, last.by) == (Phase.ROLLED_BACK, Reason.OPERATOR_ABORT, "bob")
    ms = r.desired.models[M]
    assert ms.stable == 1 and ms.canary is None and ms.rejected[2].by == "test"


def test_rollback_command_when_idle_and_its_errors():
    d = desired_with(2)
    ms = d.models[M]
    new, actions, ev = step(None, Inputs(M, ms, published=(1, 2), commands=(Command(CommandKind.ROLLBACK, by="ann"),)),
                            cfg(), 100)
    d2 = apply(d, M, new, actions, "ann", 100)
    assert d2.models[M].stable == 1 and 2 in d2.models[M].rejected and d2.models[M].rejected[2].by == "ann"
    assert (ev.from_phase, ev.to_phase, ev.reason) == (Phase.IDLE, Phase.ROLLED_BACK, Reason.OPERATOR_ROLLBACK)
    # the rejected v2 does not start again by itself
    assert step(None, Inputs(M, d2.models[M], published=(1, 2)), cfg(), 101)[0] is None
    with pytest.raises(CommandError, match="not older than stable v2"):
        step(None, Inputs(M, ms, published=(1, 2, 3), commands=(Command(CommandKind.ROLLBACK, to=3),)), cfg(), 1)
    with pytest.raises(CommandError, match="v1 is rejected"):
        rejected = ms.model_copy(deep=True)
        rejected.rejected[1] = d2.models[M].rejected[2]
        step(None, Inputs(M, rejected, published=(1, 2), commands=(Command(CommandKind.ROLLBACK, to=1),)), cfg(), 1)
    with pytest.raises(CommandError, match="no rollout in progress"):
        step(None, Inputs(M, ms, published=(1, 2), commands=(Command(CommandKind.PAUSE),)), cfg(), 1)


def test_rollback_during_a_rollout_is_an_abort_through_the_machine():
    fleet = Fleet(dict(SIX))
    r = run(fleet, cfg(), commands={30.0: [Command(CommandKind.ROLLBACK, by="ann")]})
    last = r.events[-1]
    assert (last.from_phase, last.to_phase, last.reason) == (Phase.ANALYSIS, Phase.ROLLED_BACK,
                                                             Reason.OPERATOR_ROLLBACK)
    assert r.desired.models[M].stable == 1 and 2 in r.desired.models[M].rejected


def test_first_version_goes_straight_to_waves():
    fleet = Fleet(dict(SIX), stable=None)
    fleet.live = {n: None for n in SIX}
    r = run(fleet, cfg(), desired=desired_with(None), published=(1,))
    assert r.reasons[0] == ("idle", "promoting", "first_version")
    assert r.desired.models[M].stable == 1 and r.max_reloading_promoting <= 2


def test_no_start_without_start_on_publish_but_start_command_works():
    c = cfg(start_on_publish=False)
    ms = ModelState(stable=1)
    assert step(None, Inputs(M, ms, published=(1, 2)), c, 0) == (None, [], None)
    new, actions, ev = step(None, Inputs(M, ms, published=(1, 2), commands=(Command(CommandKind.START, by="ann"),)),
                            c, 0)
    assert new.phase == Phase.PUBLISHED and new.version == 2 and actions == [SetCanary(2, ())]
    with pytest.raises(CommandError, match="not published"):
        step(None, Inputs(M, ms, published=(1, 2), commands=(Command(CommandKind.START, version=5),)), c, 0)


def test_a_site_with_one_instance_never_hosts_the_canary_and_none_stops_with_no_baseline():
    st = {"onprem-1": "onprem", "cloud-1": "cloud"}
    fleet = Fleet(st)
    r = run(fleet, cfg(lone_instance_self_baseline=False), until=400, stop_when_idle=False)
    stop = next(e for e in r.events if e.to_phase == Phase.STOPPED)
    assert stop.reason == Reason.NO_BASELINE and "onprem: 1" in stop.message


def test_one_instance_per_site_the_canary_is_judged_against_its_own_stable_version():
    """The local stack's shape: the canary's own v1 before the switch is its baseline; a good v2
    is promoted, an erroring or 5x slower v2 is rolled back with the reason."""
    sites = {"onprem-1": "onprem", "cloud-1": "cloud"}
    r = run(Fleet(sites), cfg(), until=600)
    assert r.desired.models[M].stable == 2, r.reasons
    chosen = next(e for e in r.events if e.reason == Reason.CANARY_CHOSEN)
    assert "its own stable version" in chosen.message
    assert ("analysis", "promoting", "analysis_passed") in r.reasons
    for profile, reason in ((Profile(error_ratio=0.2), Reason.ERROR_RATE), (Profile(p99_ms=50.0), Reason.LATENCY)):
        r = run(Fleet(sites, profiles={2: profile}), cfg(), until=600)
        assert r.desired.models[M].stable == 1 and 2 in r.desired.models[M].rejected, r.reasons
        assert r.events[-1].to_phase == Phase.ROLLED_BACK and r.events[-1].reason == reason


def test_config_refuses_both_canary_sizes():
    with pytest.raises(ValueError, match="one of canary_instances or canary_share_per_site"):
        RolloutConfig(canary_instances=2, canary_share_per_site=0.5)


def test_hand_written_canary_is_adopted_and_analysed():
    now = 1000.0
    d = DesiredState(models={M: ModelState(stable=1)})
    d.models[M].canary = Canary(version=2, instances=["onprem-1"])
    st = state_of(d.models[M], now)
    assert st.phase == Phase.CANARY and st.canaries == ["onprem-1"]
    statuses = {"onprem-1": InstanceStatus(instance="onprem-1", site="onprem", at=now,
                                           models={M: {"live": 2, "target": 2, "state": "live"}})}
    new, _, ev = step(st, Inputs(M, d.models[M], statuses, published=(1, 2)), cfg(), now)
    assert ev.to_phase == Phase.ANALYSIS


def test_a_long_gone_instance_outside_the_registry_does_not_block_the_waves():
    fleet = Fleet(dict(SIX))
    c = cfg(forget_after_s=3600)
    d = desired_with(1)
    statuses = fleet.statuses(d, 0)
    statuses["cloud-old"] = InstanceStatus(instance="cloud-old", site="cloud", at=-7200.0,
                                           models={M: {"live": 1, "target": 1, "state": "live"}})
    st = state_of(apply(d, M, None, [SetCanary(2, ())], "t", 0).models[M], 0)
    st = st.model_copy(update={"phase": Phase.PROMOTING})
    ms = ModelState(stable=1, canary=Canary(version=2, instances=[]))
    _, actions, ev = step(st, Inputs(M, ms, statuses, published=(1, 2), expected=tuple(SIX)), c, 1)
    assert ev.reason == Reason.WAVE and "cloud-old" not in ev.message and "/6 live" in ev.message
    # the same status inside the registry is waited for (and stops the rollout at the deadline)
    _, _, ev = step(st, Inputs(M, ms, statuses, published=(1, 2), expected=(*SIX, "cloud-old")), c, 1)
    assert "/7 live" in ev.message


def test_a_latency_ratio_of_tiny_times_is_not_a_failure():
    """Measured in the drills: a 1 ms model read 3.6 ms vs 0.6 ms (x5.7) from one scheduling hiccup.
    A latency failure needs the ratio AND min_latency_delta_ms."""
    canary = MetricWindow("a", "onprem", 100, 0, None, 3.6, 2)
    base = MetricWindow("b", "onprem", 100, 0, None, 0.6, 1)
    assert judge(["a"], ["b"], {"a": "onprem", "b": "onprem"}, {"a": canary, "b": base},
                 cfg(min_latency_delta_ms=5.0)).reason == Reason.CHECK_PASSED
    slow = MetricWindow("a", "onprem", 100, 0, None, 50.0, 2)
    check = judge(["a"], ["b"], {"a": "onprem", "b": "onprem"}, {"a": slow, "b": base}, cfg(min_latency_delta_ms=5.0))
    assert check.reason == Reason.LATENCY and "+49.4 ms" in check.message
